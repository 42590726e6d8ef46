"""Every private Lightning / torch / DeepSpeed / torchft / jsonargparse name the package uses, in one place.

The rest of the package calls the small functions here and never touches another package's private name itself
(``tests/compat/test_private_names.py`` scans the package for it). Each function declares, with :func:`_reaches`, the
private names it reaches; the test resolves every one of them on the installed versions, so an upgrade that renames
one fails there, naming it and the version, instead of deep inside a training run. :data:`CHECKED_ON` holds the
versions the names were last checked against; the test warns when an installed version differs from it.

Overrides of Lightning's private hooks (``_configure_launcher``, ``_parse_ckpt_path``, ...) and a subclass's use of
its inherited private attributes (``self._timeout``) stay where they are, as that is how Lightning is extended;
:data:`INHERITED` lists them and the test checks that each still exists on the base class. deepspeed, torchft and
jsonargparse are imported only inside the functions that need them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.types import _PATH

from .addresses import url_host

#: the versions every name below was checked against (``tests/compat/test_private_names.py`` warns when they differ)
CHECKED_ON = {
    "lightning": "2.6.6",
    "torch": "2.13.0",
    "deepspeed": "0.19.8",
    "torchft": "0.2.0",
    "jsonargparse": "4.53.0",
}


@dataclass(frozen=True)
class PrivateName:
    """One private name of another package: ``owner`` is a module (``"a.b"``) or a class (``"a.b:Class"``)."""

    package: str  #: the distribution that ships it (a key of CHECKED_ON)
    owner: str
    name: str
    #: "attr": an attribute of the module / class (a function, method, property); "instance": an attribute the class
    #: sets on its instances (found as ``self.<name>`` in the source of the class or a base)
    kind: str = "attr"
    #: the first version of ``package`` that has it; older versions lack it and the caller copes (None: every version)
    since: Optional[str] = None


#: every private name reached below, filled by :func:`_reaches`
PRIVATE_NAMES: list[PrivateName] = []

_F = TypeVar("_F", bound=Callable[..., Any])


def _reaches(*names: PrivateName) -> Callable[[_F], _F]:
    """Record the private names a function of this module reaches (for the test that resolves them)."""

    def record(fn: _F) -> _F:
        PRIVATE_NAMES.extend(name for name in names if name not in PRIVATE_NAMES)
        fn.__reaches__ = names  # type: ignore[attr-defined]
        return fn

    return record


#: Lightning's private hooks and attributes our subclasses override or use through ``self`` (a subclass's extension
#: points, so they stay at the call sites); tests/compat checks that each still exists on a base class and that the
#: list is complete
INHERITED: dict[str, tuple[str, ...]] = {
    "lightning_localsgd.cli:LocalSGDCLI": ("_parse_ckpt_path", "_run_subcommand"),
    "lightning_localsgd.examples.gpt:GPT": ("_trainer",),
    "lightning_localsgd.strategies.ddp:LocalSGDStrategy": (
        "_checkpoint_io", "_configure_launcher", "_ddp_kwargs", "_get_process_group_backend", "_layer_sync",
        "_process_group_backend", "_register_ddp_hooks", "_setup_model", "_timeout"),
    "lightning_localsgd.strategies.deepspeed:LocalSGDDeepSpeedStrategy": (
        "_configure_launcher", "_get_process_group_backend", "_init_config_if_needed", "_init_deepspeed_distributed",
        "_initialize_deepspeed_inference", "_layer_sync", "_setup_model_and_optimizer", "_timeout"),
    "lightning_localsgd.strategies.fsdp:LocalSGDFSDPStrategy": (
        "_configure_launcher", "_device_mesh", "_get_process_group_backend", "_setup_distributed", "_timeout"),
}


# ---------------------------------------------------------------------------------------------------- type aliases
#: Lightning's strategy registry type (``register_strategies``' argument); Lightning exports no public name for it
StrategyRegistry = _StrategyRegistry
#: Lightning's path type (``str | Path``) of the ``CheckpointIO`` methods; no public alias
PATH = _PATH
PRIVATE_NAMES += [PrivateName("lightning", "lightning.fabric.strategies", "_StrategyRegistry"),
                  PrivateName("lightning", "lightning.fabric.utilities.types", "_PATH")]


# ---------------------------------------------------------------------------------------------------- Lightning loops
_FIT_LOOP = "lightning.pytorch.loops.fit_loop:_FitLoop"
_EPOCH_LOOP = "lightning.pytorch.loops.training_epoch_loop:_TrainingEpochLoop"


@_reaches(PrivateName("lightning", "lightning.pytorch.loops.utilities", "_is_max_limit_reached"))
def is_max_limit_reached(current: int, maximum: int = -1) -> bool:
    """Lightning's own test of a ``max_steps`` / ``max_epochs`` limit (-1: none); the loops keep it private."""
    from lightning.pytorch.loops.utilities import _is_max_limit_reached

    return _is_max_limit_reached(current, maximum)


@_reaches(PrivateName("lightning", _FIT_LOOP, "_can_stop_early"))
def fit_loop_can_stop_early(fit_loop: Any) -> bool:
    """Whether ``min_steps`` / ``min_epochs`` are met, as the fit loop decides it (a private property)."""
    return fit_loop._can_stop_early


@_reaches(PrivateName("lightning", _EPOCH_LOOP, "_num_ready_batches_reached"))
def epoch_batches_done(epoch_loop: Any) -> bool:
    """Whether the epoch loop has reached its last batch of the epoch (private: no public progress flag says it)."""
    return epoch_loop._num_ready_batches_reached()


_BATCHES_THAT_STEPPED = PrivateName("lightning", _EPOCH_LOOP, "_batches_that_stepped", kind="instance")


@_reaches(_BATCHES_THAT_STEPPED)
def batches_that_stepped(epoch_loop: Any) -> int:
    """The epoch loop's count of batches that stepped the optimizer (the loggers' step; saved only privately)."""
    return epoch_loop._batches_that_stepped


@_reaches(_BATCHES_THAT_STEPPED)
def set_batches_that_stepped(epoch_loop: Any, value: int) -> None:
    """Restore the count :func:`batches_that_stepped` reads (a resume / heal not through Lightning's loop state)."""
    epoch_loop._batches_that_stepped = value


# ---------------------------------------------------------------------------------------------------- Lightning SIGTERM
@_reaches(PrivateName("lightning", "lightning.pytorch.trainer.trainer:Trainer", "_signal_connector", kind="instance"))
def signal_connector(trainer: Any) -> Any:
    """The trainer's signal connector, which installs the SIGTERM handler (no public accessor)."""
    return trainer._signal_connector


_SIGTERM_NOTIFIER = PrivateName("lightning", "lightning.pytorch.trainer.connectors.signal_connector:_SignalConnector",
                                "_sigterm_notifier_fn")


@_reaches(_SIGTERM_NOTIFIER)
def set_sigterm_notifier(connector: Any, handler: Callable[[Any, Any], None]) -> None:
    """Make ``handler`` the connector's SIGTERM handler: an instance attribute shadows Lightning's method."""
    connector._sigterm_notifier_fn = handler


@_reaches(_SIGTERM_NOTIFIER)
def clear_sigterm_notifier(connector: Any) -> None:
    """Undo :func:`set_sigterm_notifier`: Lightning's bound method shows through again."""
    connector.__dict__.pop(_SIGTERM_NOTIFIER.name, None)


_BROADCAST_SIGTERM = PrivateName("lightning", _EPOCH_LOOP, "_broadcast_sigterm_tensor", since="2.5")


@_reaches(_BROADCAST_SIGTERM)
def sigterm_broadcast(epoch_loop: Any) -> Optional[Callable[[], None]]:
    """The epoch loop's per-batch SIGTERM flag exchange (Lightning >= 2.5), or ``None`` where it has none."""
    return getattr(epoch_loop, _BROADCAST_SIGTERM.name, None)


@_reaches(_BROADCAST_SIGTERM)
def set_sigterm_broadcast(epoch_loop: Any, exchange: Callable[[], None]) -> None:
    """Replace the per-batch SIGTERM flag exchange :func:`sigterm_broadcast` reads (no public hook for it)."""
    setattr(epoch_loop, _BROADCAST_SIGTERM.name, exchange)


# ---------------------------------------------------------------------------------------------------- Lightning module
_MODULE = "lightning.pytorch.core.module:LightningModule"


@_reaches(PrivateName("lightning", _MODULE, "_trainer", kind="instance"))
def attached_trainer(module: Any) -> Any:
    """The trainer a module is attached to, or ``None`` (the public ``module.trainer`` raises when there is none)."""
    return module._trainer


@_reaches(PrivateName("lightning", _MODULE, "_device_mesh", kind="instance"))
def set_device_mesh(module: Any, mesh: Any) -> None:
    """Give the module the device mesh (``module.device_mesh``), as ModelParallelStrategy does (no public setter)."""
    module._device_mesh = mesh


@_reaches(PrivateName("lightning", "lightning.pytorch.callbacks.progress.rich_progress:RichProgressBar",
                      "_stop_progress"))
def stop_live_progress_bar(progress_bar: Any) -> None:
    """End a ``RichProgressBar``'s live display so that text prints below it (no public call does); other bars:
    nothing."""
    stop = getattr(progress_bar, "_stop_progress", None)
    if callable(stop):
        stop()


# ---------------------------------------------------------------------------------------------------- Lightning helpers
@_reaches(PrivateName("lightning", "lightning.fabric.utilities.distributed", "_init_dist_connection"))
def init_dist_connection(cluster_environment: Any, backend: str, global_rank: int, world_size: int,
                         **kwargs: Any) -> None:
    """Start the default process group as Lightning's strategies do (``MASTER_ADDR`` / ``MASTER_PORT`` set from the
    cluster environment, ``init_process_group(**kwargs)``, NCCL's teardown at exit); a private helper."""
    from lightning.fabric.utilities.distributed import _init_dist_connection

    _init_dist_connection(cluster_environment, backend, global_rank, world_size, **kwargs)


@_reaches(PrivateName("lightning", "lightning.pytorch.overrides.distributed", "_sync_module_states"))
def sync_module_states(module: torch.nn.Module) -> None:
    """Broadcast rank 0's parameters and buffers to every rank, as Lightning's DDP does (a private helper)."""
    from lightning.pytorch.overrides.distributed import _sync_module_states

    _sync_module_states(module)


@_reaches(PrivateName("lightning", "lightning.fabric.strategies.model_parallel", "_materialize_distributed_module"))
def materialize_distributed_module(module: torch.nn.Module, device: torch.device) -> None:
    """Materialize a meta-device (sharded) module on ``device``, as ModelParallelStrategy does (a private helper)."""
    from lightning.fabric.strategies.model_parallel import _materialize_distributed_module

    _materialize_distributed_module(module, device)


@_reaches(PrivateName("lightning", "lightning.fabric.utilities.optimizer", "_optimizers_to_device"))
def optimizers_to_device(optimizers: Any, device: torch.device) -> None:
    """Move the optimizers' state to ``device``, as Lightning's strategies do (a private helper)."""
    from lightning.fabric.utilities.optimizer import _optimizers_to_device

    _optimizers_to_device(optimizers, device)


@_reaches(PrivateName("lightning", "lightning.fabric.strategies.deepspeed", "_validate_device_index_selection"))
def validate_device_index_selection(parallel_devices: Any) -> None:
    """Lightning's DeepSpeed check that the devices are ``0..n-1`` in order (a private helper)."""
    from lightning.fabric.strategies.deepspeed import _validate_device_index_selection

    _validate_device_index_selection(parallel_devices)


@_reaches(PrivateName("lightning", "lightning.pytorch.plugins.io.wrapper", "_WrappingCheckpointIO"),
          PrivateName("lightning", "lightning.pytorch.plugins.io.wrapper:_WrappingCheckpointIO",
                      "_base_checkpoint_io_configured", kind="instance"))
def wrapper_lacks_base_io(checkpoint_io: Any) -> bool:
    """Whether ``checkpoint_io`` is a wrapper (``AsyncCheckpointIO``) whose inner IO Lightning has not filled in."""
    from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

    return isinstance(checkpoint_io, _WrappingCheckpointIO) and not checkpoint_io._base_checkpoint_io_configured


# ---------------------------------------------------------------------------------------------------- torch
@_reaches(PrivateName("torch", "torch.distributed.distributed_c10d", "_get_default_store"))
def default_store() -> Optional[dist.Store]:
    """The default process group's rendezvous store, or ``None`` (torch has no public accessor)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # not initialized, or a torch without it
        return None


@_reaches(PrivateName("torch", "torch.distributed:ProcessGroup", "_device_types"),
          PrivateName("torch", "torch.distributed:ProcessGroup", "_get_backend"),
          PrivateName("torch", "torch._C._distributed_c10d:Backend.Options", "_timeout"))
def process_group_timeout(group: dist.ProcessGroup) -> Optional[timedelta]:
    """The current default timeout of a process group (no public getter: None when it cannot be read)."""
    for device_type in getattr(group, "_device_types", [torch.device("cpu")]):
        try:
            return group._get_backend(torch.device(device_type)).options._timeout
        except Exception:
            continue
    return None


# ---------------------------------------------------------------------------------------------------- DeepSpeed
_STAGE3 = "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3"


@_reaches(PrivateName("deepspeed", _STAGE3, "_partition_all_parameters"),
          PrivateName("deepspeed", _STAGE3, "_reassign_or_swap_out_partitioned_parameters"))
def zero3_repartition(opt: Any) -> None:
    """ZeRO-3: release the gathered parameters, then copy each fp32 master partition into the bit16 partition the
    parameters view, as ZeRO's own ``step()`` ends (DeepSpeed has no public call for it)."""
    # release the gathered parameters (the persistent ones included), so the partitions are the source
    opt._partition_all_parameters()
    for i in range(len(opt.fp16_partitioned_groups_flat)):
        # fp32 flat -> partitioned bit16 flat, which the parameters' ds_tensor views point into
        opt._reassign_or_swap_out_partitioned_parameters(i)


# ---------------------------------------------------------------------------------------------------- torchft
_MANAGER = "torchft.manager:Manager"


@_reaches(PrivateName("torchft", _MANAGER, "_quorum_future", kind="instance"))
def quorum_started(manager: Any) -> bool:
    """Whether the torchft manager has started a quorum (before one, ``participating_rank()`` would wait for it)."""
    return manager._quorum_future is not None


@_reaches(PrivateName("torchft", _MANAGER, "_quorum_id", kind="instance"))
def quorum_id(manager: Any) -> int:
    """The id of the torchft manager's current quorum: the lighthouse changes it exactly when the quorum's members
    change (torchft reconfigures its process group then, and only then)."""
    return int(manager._quorum_id)


@_reaches(PrivateName("torchft", _MANAGER, "_pg", kind="instance"))
def managed_process_group(manager: Any) -> Any:
    """The torchft manager's process group across the replica groups (the manager's own collectives wrap only
    all-reduce; all-to-all and all-gather need the group itself)."""
    return manager._pg


@_reaches(PrivateName("torchft", _MANAGER, "_client", kind="instance"),
          PrivateName("torchft", "torchft._torchft:ManagerClient", "_quorum"))
def observe_quorums(manager: Any, callback: Callable[[Any], None]) -> None:
    """Call ``callback`` with every quorum torchft's manager receives (its ``QuorumResult``, on the manager's quorum
    thread, before the process group is reconfigured): the manager keeps neither the members' replica ids nor the
    result itself."""
    client = manager._client

    class ObservedClient:
        def __getattr__(self, name: str) -> Any:
            return getattr(client, name)

        def _quorum(self, *args: Any, **kwargs: Any) -> Any:
            result = client._quorum(*args, **kwargs)
            callback(result)
            return result

    manager._client = ObservedClient()


_SWAP = threading.Lock()  # the two functions below change a module global for a constructor's duration: one at a time


def _built_with(module: Any, name: str, replacement: Any, build: Callable[[], Any]) -> Any:
    """``build()`` while ``module.<name>`` is ``replacement`` (restored after, whatever happens)."""
    with _SWAP:
        original = getattr(module, name)
        setattr(module, name, replacement)
        try:
            return build()
        finally:
            setattr(module, name, original)


@_reaches(PrivateName("torchft", "torchft.manager", "ManagerServer"))
def manager_listening_on(host: str, manager_class: Callable[..., Any], **kwargs: Any) -> Any:
    """A torchft ``Manager`` (``manager_class(**kwargs)``) whose gRPC ``ManagerServer`` (rank 0's, which its job's
    ranks and a healing peer call) listens on ``host`` only and advertises it. torchft 0.2's ``Manager.__init__``
    hard-codes ``bind="[::]:<port>"`` (every interface) and offers no argument for it, so the ``ManagerServer`` it
    builds is swapped, for the constructor's duration, for one given ``host`` (the port stays torchft's choice)."""
    import torchft.manager as torchft_manager

    server_class = torchft_manager.ManagerServer

    def bound_server(*args: Any, bind: str, **server_kwargs: Any) -> Any:
        server_kwargs["hostname"] = url_host(host)  # what it advertises (its address()): where it listens
        return server_class(*args, bind=f"{url_host(host)}:{bind.rsplit(':', 1)[-1]}", **server_kwargs)

    return _built_with(torchft_manager, "ManagerServer", bound_server, lambda: manager_class(**kwargs))


@_reaches(PrivateName("torchft", "torchft.checkpointing.http_transport", "_IPv6HTTPServer"),
          PrivateName("torchft", "torchft.checkpointing.http_transport:HTTPTransport", "_server", kind="instance"))
def http_transport_listening_on(host: str, timeout: timedelta) -> Any:
    """torchft's default healing transport (``HTTPTransport``: the staged training state over plain HTTP, a run
    without a run secret) listening on ``host`` only and advertising it. torchft 0.2 binds it to ``("", 0)`` (every
    interface) and advertises the host name, with no argument for either: its server class is swapped for the
    constructor's duration for one bound to ``host``, and ``address()`` names ``host``."""
    import socket

    from torchft.checkpointing import http_transport as module

    server_class = module._IPv6HTTPServer

    class BoundServer(server_class):  # type: ignore[misc, valid-type]
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def __init__(self, server_address: tuple[str, int], handler: Any) -> None:
            super().__init__((host.strip("[]"), server_address[1]), handler)

    class BoundHTTPTransport(module.HTTPTransport):  # type: ignore[misc]
        def address(self) -> str:
            return f"http://{url_host(host)}:{self._server.socket.getsockname()[1]}/checkpoint/"

    return _built_with(module, "_IPv6HTTPServer", BoundServer,
                       lambda: BoundHTTPTransport(timeout=timeout, num_chunks=0))


# ---------------------------------------------------------------------------------------------------- jsonargparse
@_reaches(PrivateName("jsonargparse", "jsonargparse._util", "import_object"))
def import_class_path(class_path: str) -> Any:
    """The object a dotted class path names, resolved as jsonargparse resolves ``class_path`` (its private helper)."""
    from jsonargparse._util import import_object

    return import_object(class_path)


# ---------------------------------------------------------------------------------------------------- Lightning data
@_reaches(PrivateName("lightning", "lightning.pytorch.utilities.data", "_get_dataloader_init_args_and_kwargs"),
          PrivateName("lightning", "lightning.fabric.utilities.data", "_reinstantiate_wrapped_cls"))
def rebuild_dataloader(dataloader: Any, sampler: Any, cls: type) -> Any:
    """``dataloader`` made again as a ``cls`` with ``sampler``: what Lightning does to inject its
    ``DistributedSampler`` (the arguments the user's loader was made with, recorded by Lightning), with the class
    given (Lightning's own ``_update_dataloader`` keeps the loader's class)."""
    from lightning.fabric.utilities.data import _reinstantiate_wrapped_cls
    from lightning.pytorch.utilities.data import _get_dataloader_init_args_and_kwargs

    args, kwargs = _get_dataloader_init_args_and_kwargs(dataloader, sampler)
    return _reinstantiate_wrapped_cls(dataloader, *args, explicit_cls=cls, **kwargs)


@_reaches(PrivateName("lightning", "lightning.pytorch.trainer.connectors.data_connector", "_parse_num_batches"),
          PrivateName("lightning", _FIT_LOOP, "_combined_loader", kind="instance"),
          PrivateName("lightning", "lightning.pytorch.utilities.combined_loader:CombinedLoader", "_iterator",
                      kind="instance"))
def recount_epoch_batches(trainer: Any) -> None:
    """Count the training batches of the epoch starting now again (Lightning counts them once per fit, in
    ``_FitLoop.setup_data``: the loaders' lengths, capped by ``limit_train_batches``; each epoch's data fetcher stops
    there). Called before the epoch's iteration starts."""
    from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import sized_len

    loop = trainer.fit_loop
    combined = loop._combined_loader
    if combined is None:
        return
    combined.limits = [_parse_num_batches(RunningStage.TRAINING, len(dl), trainer.limit_train_batches)
                       for dl in combined.flattened]
    if combined._iterator is not None:  # the last epoch's iterator, which the combined loader's length reads
        combined._iterator.limits = combined.limits
    batches = sized_len(combined)
    loop.max_batches = batches if batches is not None else float("inf")


@_reaches(PrivateName("lightning", _FIT_LOOP, "_data_fetcher", kind="instance"),
          PrivateName("lightning", _FIT_LOOP, "_combined_loader", kind="instance"),
          PrivateName("lightning", "lightning.pytorch.loops.fetchers:_DataFetcher", "fetched", kind="instance"),
          PrivateName("lightning", "lightning.pytorch.loops.fetchers:_DataFetcher", "length", kind="instance"))
def rewind_epoch_fetcher(trainer: Any) -> None:
    """The running epoch's training data moved under Lightning (a live rewind, its batch counter set with it): the
    epoch's data fetcher counts the batches fetched from that counter and ends at the epoch's length again (it ends
    the epoch at ``fetched >= length``), and the batch just trained is not the epoch's last any more."""
    from lightning.pytorch.utilities.data import sized_len

    loop = trainer.fit_loop
    progress = loop.epoch_loop.batch_progress
    progress.is_last_batch = False
    fetcher = loop._data_fetcher
    if fetcher is None:
        return
    fetcher.fetched = progress.current.ready
    if loop._combined_loader is not None:
        fetcher.length = sized_len(loop._combined_loader)
    fetcher.done = fetcher.length is not None and fetcher.fetched >= fetcher.length
