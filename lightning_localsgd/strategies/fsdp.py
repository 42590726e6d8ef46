"""``LocalSGDFSDPStrategy``: local SGD across worker groups, FSDP2 sharding inside each group.

The ranks form a 2-D device mesh ``("replicate", "shard")`` of shape ``(G, S)`` (:func:`~..topology.build_mesh_topology`):
row ``i`` is worker group ``i`` (FSDP shards the model over it: per-step all-gather / reduce-scatter inside the group
only), column ``k`` is cross group ``k`` (rank ``k`` of every group, holding the same shard). Every ``sync_every``
steps each rank runs the outer step on its own shard with the same shard of the other groups. Nobody gathers the full
model to sync. The FSDP2 internals (sharding, resharding, group 0's shards everywhere, full weights into the shards)
live in :mod:`lightning_localsgd.fsdp2`; this module is the Lightning glue.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable, ContextManager, Optional

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from typing_extensions import override

from .._compat import (StrategyRegistry, materialize_distributed_module, optimizers_to_device, set_device_mesh,
                       sync_module_states)
from ..checkpoint import convert_checkpoint, restore_checkpoint, save_checkpoint
from ..config import LocalSGDConfig, local_sgd_arguments
from ..fsdp2 import (broadcast_group_zero_shards, check_user_sharding, is_fully_sharded,  # noqa: F401 (API)
                     load_full_state_dict, reshard, shard_module)
from ..state import ShardedState
from ..tensors import local_view
from ..topology import build_mesh_topology, init_default_group
from .base import LocalSGDMixin, is_fitting


def _call_through_root(module: nn.Module, method: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``module.<method>(*args, **kwargs)`` (e.g. ``training_step``) inside ``module``'s own forward call.

    When the LightningModule is the FSDP root, its forward hooks (lazy init, gathering the root unit's parameters:
    embeddings, final norm, head) only run when ``module(...)`` is called. A step that calls a submodule directly
    (``self.model(input_ids=x).logits``, as Hugging Face and litgpt modules are written) would then meet sharded
    DTensors. Lightning reroutes the steps through the FSDP1 / DeepSpeed wrapper's forward in the same way. The root is
    called with one keyword that is no tensor (the method's name), so FSDP casts or moves none of the step's inputs
    (the step itself calls ``self(x)`` as it likes); the step's own arguments go to it untouched. (Not with no argument
    at all: on a GPU, torch 2.11's root pre-forward indexes the moved inputs and fails on an empty call.)
    """
    step = getattr(module, method)

    def forward(_localsgd_step: str) -> Any:
        del module.forward  # the real forward again, for a step that calls self(x)
        return step(*args, **kwargs)

    module.forward = forward  # type: ignore[method-assign]
    try:
        return module(_localsgd_step=method)
    finally:
        module.__dict__.pop("forward", None)


def check_fsdp_arguments(auto_wrap_policy: Any, mp_policy: Any, save_distributed_checkpoint: Any) -> None:
    """Raise a ``ValueError`` naming the argument and the fix for FSDP arguments local SGD cannot use."""
    if save_distributed_checkpoint is not True:
        raise ValueError(
            f"save_distributed_checkpoint={save_distributed_checkpoint!r}: one full checkpoint file would gather "
            "every rank's shards on rank 0. Leave save_distributed_checkpoint=True (every rank writes its own "
            "files of the checkpoint folder) and convert the folder into one file with `lightning-localsgd "
            "convert FOLDER model.ckpt` when you need one."
        )
    if auto_wrap_policy is not None and not (
        isinstance(auto_wrap_policy, (set, list, tuple))
        and all(isinstance(c, type) and issubclass(c, nn.Module) for c in auto_wrap_policy)
    ):
        raise ValueError(
            f"auto_wrap_policy must be a set of nn.Module classes (e.g. {{MyBlock}}), got {auto_wrap_policy!r}."
        )
    if mp_policy is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        if not isinstance(mp_policy, MixedPrecisionPolicy):
            raise ValueError(
                "mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy, e.g. "
                f"MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32); got {mp_policy!r}."
            )


@local_sgd_arguments(
    defaults={"group_size": None},
    docs={"group_size": "ranks per worker group, the FSDP sharding degree; must divide the world size. Default "
                        "``None``: the devices per node, so sharding traffic stays inside a node and only syncs cross "
                        "nodes.",
          "outer_state_device": "where the snapshot and outer optimizer state (of this rank's shard only) live: "
                                "``None`` (the shard's device) or ``\"cpu\"``. Default None."},
)
class LocalSGDFSDPStrategy(LocalSGDMixin, ModelParallelStrategy):
    """Local SGD across worker groups with FSDP2 (``fully_shard``) sharding inside each group.

    A LightningModule may shard itself in ``configure_model`` with ``fully_shard(module, mesh=self.device_mesh["shard"])``
    (the strategy exposes a 2-D mesh ``("replicate", "shard")``); if it does not, the strategy shards it: every element
    of an ``nn.ModuleList`` (transformer blocks) or an instance of a class in ``auto_wrap_policy``, then the
    LightningModule itself as the root unit. When the LightningModule is the root, each step runs inside its forward
    call (as Lightning does for FSDP1 and DeepSpeed), so ``training_step`` may call a submodule directly
    (``self.model(input_ids=x).logits``). A checkpoint is a folder where every rank writes its own shards
    (:mod:`lightning_localsgd.checkpoint`); it converts to a plain Lightning checkpoint with
    :func:`~lightning_localsgd.checkpoint.convert_checkpoint` (``lightning-localsgd convert``).

    Args:
        auto_wrap_policy: module classes to shard as units when the strategy shards the model (e.g.
            ``{MyTransformerBlock}``). Default None: the elements of every ``nn.ModuleList``.
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` for the strategy's own sharding (e.g.
            bf16 parameters with fp32 reduce). The snapshot and the outer step stay fp32.
        reshard_after_forward: FSDP2's ``reshard_after_forward`` for the strategy's own sharding. Default True.
        save_distributed_checkpoint: must be ``True`` (the default): a checkpoint is a folder with one file per rank
            (its shards, its inner optimizer state, its outer state). One full file would gather every rank's shards
            on rank 0; convert a folder into one with ``lightning-localsgd convert FOLDER model.ckpt`` instead.
        process_group_backend: ``"gloo"`` (CPU), ``"nccl"`` (CUDA), or None for the device's default.
        timeout: timeout of the process groups.
    """

    strategy_name = "local_sgd_fsdp"
    shards_within_group = True
    training_state_class = ShardedState

    def __init__(
        self,
        auto_wrap_policy: Optional[set[type[nn.Module]]] = None,
        mp_policy: Optional[Any] = None,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        **local_sgd: Any,
    ) -> None:
        LocalSGDConfig.check_support(local_sgd, "fsdp")  # async_sync: refused, with why
        config = LocalSGDConfig.from_kwargs(local_sgd, self.local_sgd_defaults)
        if local_sgd:
            raise TypeError(f"LocalSGDFSDPStrategy got unexpected keyword argument(s): {sorted(local_sgd)}.")
        check_fsdp_arguments(auto_wrap_policy, mp_policy, save_distributed_checkpoint)
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._init_local_sgd(config)  # group_size None until the launcher knows the devices per node
        self.auto_wrap_policy = set(auto_wrap_policy) if auto_wrap_policy is not None else None
        self.mp_policy = mp_policy
        self.reshard_after_forward = reshard_after_forward
        self.save_distributed_checkpoint = save_distributed_checkpoint

    # ------------------------------------------------------------------ launch / mesh
    @override
    def setup_environment(self) -> None:
        # the default process group over a store listening on MASTER_ADDR only, on the rank's device (set again, as
        # it was, by ModelParallelStrategy's _setup_distributed, which then finds the group started)
        assert self.accelerator is not None
        self.accelerator.setup_device(self.root_device)
        self.set_world_ranks()
        device_id = self.root_device if self.root_device.type != "cpu" else None
        init_default_group(self.cluster_environment, self._get_process_group_backend(), self._timeout, device_id,
                           self.num_nodes)
        self._setup_distributed()  # ModelParallelStrategy's (seed, ranks, backend), without its own 2-D mesh
        self._resolve_group_size()
        # row i = worker group i (FSDP shards over it), column k = cross group k (the outer reduce)
        self._device_mesh, self.topology = build_mesh_topology(self.root_device.type, self.group_size)
        self._add_cluster_groups()
        assert self.lightning_module is not None
        set_device_mesh(self.lightning_module, self._device_mesh)

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # every rank reads its own data: inside a group FSDP is data parallel, across groups local SGD
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: Trainer) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        if any(isinstance(m, FullyShardedDataParallel) for m in self.model.modules()):
            raise TypeError(
                "Found modules wrapped in FSDP1 (`FullyShardedDataParallel`). LocalSGDFSDPStrategy uses FSDP2: shard "
                "with `torch.distributed.fsdp.fully_shard(module, mesh=self.device_mesh['shard'])` in configure_model, "
                "or let the strategy shard the model."
            )
        if is_fully_sharded(self.model):
            reshard(self.model)  # a validation pass at the end of a previous fit left the root unit unsharded
            check_user_sharding(self.model, self._device_mesh["shard"])
        else:
            if not any(p.device.type == "meta" for p in self.model.parameters()):
                sync_module_states(self.model)  # rank 0's weights everywhere, before slicing them into shards
            shard_module(self.model, self._device_mesh["shard"], self.auto_wrap_policy, self.mp_policy,
                         self.reshard_after_forward)
        materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        assert self.topology is not None
        if not self.local_sgd.restoring:
            broadcast_group_zero_shards(self.model, self.topology)
        self.barrier()
        if is_fitting(trainer):
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if is_fitting(trainer):
            optimizers_to_device(self.optimizers, self.root_device)
            self.setup_local_sgd(trainer)

    @override
    def local_sgd_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        module = self.lightning_module
        params = [local_view(p.detach()) for p in module.parameters() if p.requires_grad]
        buffers = [b for b in module.buffers() if torch.is_floating_point(b)]
        return params, buffers

    @override
    def local_sgd_fragment_sizes(self) -> Optional[list[int]]:
        # balance streaming fragments by the full parameters, so every shard of a group cuts at the same tensors
        return [p.numel() for p in self.lightning_module.parameters() if p.requires_grad]

    @override
    def before_local_sgd_sync(self) -> None:
        assert self.outer_sync is not None and self.lightning_module is not None
        reshard(self.lightning_module)  # e.g. the train-end sync right after a validation pass
        self.outer_sync.rebind(self.local_sgd_tensors()[0])  # FSDP may re-view its sharded storage

    # ------------------------------------------------------------------ steps
    def _step(self, method: str, context: Callable[[], ContextManager[Any]], *args: Any, **kwargs: Any) -> Any:
        """A step of the LightningModule; through the root's forward when the LightningModule is the FSDP root."""
        from torch.distributed.fsdp import FSDPModule

        args, kwargs = self.precision_plugin.convert_input((args, kwargs))
        module = self.lightning_module
        assert module is not None
        with context():
            if isinstance(module, FSDPModule):
                return _call_through_root(module, method, *args, **kwargs)
            return getattr(module, method)(*args, **kwargs)

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("training_step", self.precision_plugin.train_step_context, *args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("validation_step", self.precision_plugin.val_step_context, *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("test_step", self.precision_plugin.test_step_context, *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._step("predict_step", self.precision_plugin.predict_step_context, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("LocalSGDFSDPStrategy.save_checkpoint does not take storage_options.")
        self.note_checkpoint(checkpoint, filepath)
        writer = self.checkpoint_writer()
        state = self.training_state
        save_checkpoint(self, checkpoint, filepath, state, writer=writer, shards=state.shard_layout())

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        # a folder, an earlier version's single file, or a plain (e.g. DDP) checkpoint whose full weights are cut into
        # this rank's shards (ShardedState.restore)
        assert self.lightning_module is not None
        return restore_checkpoint(self, checkpoint_path, self.training_state, is_fitting(self.lightning_module.trainer))

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistry) -> None:
        strategy_registry.register(
            "local_sgd_fsdp", cls, description="Local SGD (averaging) across groups, FSDP2 inside each group",
            outer_optimizer="average", override=True,
        )
        strategy_registry.register(
            "diloco_fsdp", cls, description="DiLoCo across groups, FSDP2 inside each group",
            outer_optimizer="diloco", override=True,
        )


def convert_fsdp_checkpoint(checkpoint_dir: Any, output_file: Any, group: int = 0) -> Any:
    """Kept for compatibility: :func:`lightning_localsgd.checkpoint.convert_checkpoint`, which converts the checkpoint
    folder of every strategy."""
    return convert_checkpoint(checkpoint_dir, output_file, group=group)
