"""``LocalSGDStrategy``: local SGD across worker groups, DDP inside each group."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch import Trainer
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from ..checkpoint_io import with_atomic_default
from ..outer import OuterOptimizerSpec
from ..reliability import check_backend_available, check_ddp_arguments, check_model_matches_checkpoint
from ..topology import build_topology
from .base import CHECKPOINT_KEY, LocalSGDMixin, is_fitting

log = logging.getLogger(__name__)


class LocalSGDStrategy(LocalSGDMixin, DDPStrategy):
    """Local SGD (model averaging or DiLoCo) across worker groups, with DDP inside each group.

    Each worker group of ``group_size`` ranks trains as one DDP replica (gradients all-reduced over the group only);
    groups do not talk between syncs. Every ``sync_every`` optimizer steps the groups run the *outer step*:
    pseudo-gradient ``Δ = θ_g − mean_i θ_i``, ``θ_g ← outer_optimizer(θ_g, Δ)``, every group continues from ``θ_g``.
    Inner optimizer states stay local to each group. Floating-point buffers are averaged at each sync.

    Args:
        sync_every: ``H``, optimizer steps between two syncs (a training step that steps several optimizers counts
            once; gradient accumulation does not change it). Larger ``H`` sends fewer bytes; the paper finds
            ``H`` of 16–256 competitive with DDP. Default 64.
        outer_optimizer: ``"average"`` (plain model averaging: outer SGD with lr 1.0, no momentum), ``"diloco"``
            (outer SGD, Nesterov momentum 0.9, lr 0.7; use AdamW as the inner optimizer), or a callable
            ``params -> torch.optim.Optimizer`` (e.g. ``functools.partial(torch.optim.SGD, lr=0.5)``).
            Default ``"average"``.
        group_size: ranks per worker group; must divide the world size. Set it to the devices per node so only
            the periodic sync crosses nodes. Default 1 (every rank is its own worker).
        warmup_steps: fully synchronous steps (gradients averaged across all ranks) before local SGD starts
            ("post-local SGD"). Default 0.
        outer_state_device: where the global snapshot ``θ_g`` and the outer optimizer state live: ``None`` (the
            parameters' device) or e.g. ``"cpu"`` to keep accelerator memory free. Default None.
        on_nonfinite: what a NaN/inf pseudo-gradient does: ``"raise"`` (default) stops training with an error naming
            the step, leaving ``θ_g`` untouched; ``"skip"`` drops that sync and resets every group to ``θ_g``.
        sync_on_train_end: run a last sync when training ends mid-interval, so every rank ends with the same
            model. Default True.
        sync_timeout: seconds a rank waits at a sync for the other ranks. When a rank crashed, was killed or hangs,
            every other rank stops after at most this long with a ``SyncFailedError`` naming the missing ranks and
            the step (a dead rank is usually reported at once). Must exceed the normal spread of arrival times at a
            sync (e.g. rank 0 writing a checkpoint while the others train on). Default None: the process group's
            ``timeout`` (30 min by default).
        cluster_size: two-stage sync for multi-cluster training: worker groups per cluster (groups ``[c·n, (c+1)·n)``
            form cluster ``c``). Groups sync inside their cluster every ``sync_every`` steps with ``outer_optimizer``
            and clusters sync every ``cluster_sync_every`` steps with ``cluster_outer_optimizer``. Default None: one
            level.
        cluster_sync_every: ``H2``, steps between two syncs across clusters; a multiple of ``sync_every``.
        cluster_outer_optimizer: the outer optimizer across clusters (same forms as ``outer_optimizer``). Default
            ``"diloco"``.
        compression: compress what crosses groups at a sync: ``None`` (fp32 all-reduce), ``"bf16"`` (½ the bytes),
            ``"int8"`` (≈ ¼) or ``"int4"`` (≈ ⅛), with per-block scales and error feedback (the quantization error
            of one sync is added to the next). Default None.
        fragments: streaming sync (Streaming DiLoCo): split the parameters into this many fragments of about equal
            size (runs of whole parameter tensors) that sync on a staggered schedule, fragment ``f`` at steps
            ``(f+1)·sync_every/fragments`` mod ``sync_every``, so each sync moves about 1/fragments of the model and
            the peak bytes per step drop by that factor. ``sync_every`` must be a multiple. Default 1.
        overlap_steps: ``τ``: a fragment's sync is started (its all-reduce launched asynchronously) and applied
            ``τ`` inner steps later, so the communication runs behind those steps. Must be below ``sync_every``.
            Default 0 (applied at once).
        overlap_mix: ``α`` of Streaming DiLoCo: with ``overlap_steps > 0`` a synced fragment continues from
            ``α·θ_local + (1−α)·θ_global`` (its local parameters took ``τ`` steps since the sync started). 0 keeps
            only the global result; the paper uses 0.5. Default 0.
        sync_every_seconds: time-based sync for uneven workers: instead of every ``sync_every`` steps, each group
            syncs at its first step end after this many seconds since the last sync, running as many steps as it
            can in between, and the average is weighted by the tokens each group processed (the elements of each
            batch's first tensor). A slow group delays the others by at most one of its steps. Groups then take
            different numbers of steps, so nothing collective may run between syncs: validation, checkpoint and
            early-stopping callbacks during fit are refused (validate and save after fit), and training ends for all
            groups at the first sync after any group finishes. Default None (step-based).
        **kwargs: every argument of Lightning's ``DDPStrategy`` (``process_group_backend``, ``timeout``,
            ``start_method``, ``find_unused_parameters``, ...). DDP keyword arguments apply to the DDP wrapper inside
            each worker group (only created when ``group_size > 1``). Unless ``checkpoint_io`` is given, checkpoints
            are written atomically (:class:`~lightning_localsgd.checkpoint_io.AtomicCheckpointIO`).
    """

    strategy_name = "local_sgd"

    def __init__(
        self,
        sync_every: int = 64,
        outer_optimizer: OuterOptimizerSpec = "average",
        group_size: int = 1,
        warmup_steps: int = 0,
        outer_state_device: Optional[Union[str, torch.device]] = None,
        on_nonfinite: str = "raise",
        sync_on_train_end: bool = True,
        sync_timeout: Optional[float] = None,
        cluster_size: Optional[int] = None,
        cluster_sync_every: Optional[int] = None,
        cluster_outer_optimizer: OuterOptimizerSpec = "diloco",
        compression: Optional[str] = None,
        fragments: int = 1,
        overlap_steps: int = 0,
        overlap_mix: float = 0.0,
        sync_every_seconds: Optional[float] = None,
        **kwargs: Any,
    ) -> None:
        for name in ("ddp_comm_state", "model_averaging_period"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"LocalSGDStrategy does its own model averaging: remove `{name}` (use sync_every / "
                    "outer_optimizer instead)."
                )
        if kwargs.get("process_group") is not None:
            raise ValueError(
                "LocalSGDStrategy builds the worker groups' process groups itself: remove `process_group` and set "
                "group_size instead."
            )
        kwargs.pop("process_group", None)  # LightningCLI passes every DDP argument, None included
        check_ddp_arguments(kwargs)
        super().__init__(**kwargs)
        self._init_local_sgd(
            sync_every, outer_optimizer, group_size, warmup_steps, outer_state_device, on_nonfinite, sync_on_train_end,
            sync_timeout, cluster_size, cluster_sync_every, cluster_outer_optimizer,
            compression,
            fragments=fragments, overlap_steps=overlap_steps, overlap_mix=overlap_mix,
            sync_every_seconds=sync_every_seconds,
        )

    # ------------------------------------------------------------------ launch / setup
    @override
    def _configure_launcher(self) -> None:
        # The world size is known here, before the processes start: fail early on a bad group_size.
        self._check_world_size(self.num_nodes * self.num_processes)
        check_backend_available(self._process_group_backend)
        super()._configure_launcher()

    @property
    @override
    def checkpoint_io(self) -> CheckpointIO:
        # Lightning's default is TorchCheckpointIO; ours writes atomically (temp file, fsync, rename).
        self._checkpoint_io = with_atomic_default(self._checkpoint_io)
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO) -> None:
        self._checkpoint_io = io

    @override
    def setup(self, trainer: Trainer) -> None:
        if self._layer_sync is not None and is_fitting(trainer):
            raise ValueError(
                "sync_batchnorm=True synchronizes batch statistics across all ranks at every step, which local SGD "
                "avoids (buffers are averaged at each sync instead). Set Trainer(sync_batchnorm=False)."
            )
        super().setup(trainer)
        if is_fitting(trainer):
            self._setup_local_sgd(trainer)

    @override
    def configure_ddp(self) -> None:
        self.topology = build_topology(self.group_size, self._timeout)
        self._add_cluster_groups()
        assert self.model is not None
        if self._restored_state is None:
            _sync_module_states(self.model)  # every rank starts from rank 0's weights, whatever the seeds
        if self.group_size > 1:
            self.model = self._setup_model(self.model)
            self._register_ddp_hooks()
        # group_size == 1: no DDP wrapper at all, so nothing is all-reduced between syncs (DDP's no_sync still
        # reduces on the last micro-batch and is re-enabled by manual optimization).

    @override
    def _setup_model(self, model: Module) -> DistributedDataParallel:
        assert self.topology is not None
        device_ids = self.determine_ddp_device_ids()
        ctx = torch.cuda.stream(torch.cuda.Stream()) if device_ids is not None else nullcontext()
        with ctx:
            return DistributedDataParallel(
                module=model, device_ids=device_ids, process_group=self.topology.inner_group, **self._ddp_kwargs
            )

    @override
    def _local_sgd_shard_group(self) -> Optional[dist.ProcessGroup]:
        # The ranks of a DDP group hold identical replicas: each syncs 1/group_size of the parameters.
        return self.topology.inner_group if self.topology is not None else None

    # ------------------------------------------------------------------ steps
    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[Any] = None,
        **kwargs: Any,
    ) -> Any:
        self._stepped_this_batch = True
        closure = self._wrap_closure_for_warmup(optimizer, closure)
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        state = self._local_sgd_checkpoint(checkpoint)  # collective: every rank takes part
        if self.is_global_zero and state is not None:
            checkpoint = {**checkpoint, CHECKPOINT_KEY: state}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def _own_group_state(self, checkpoint: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return None
        self._check_restored_layout(state, self.world_size)
        return state["groups"][self.global_rank // self.group_size]

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        fitting = is_fitting(trainer)
        group = self._own_group_state(checkpoint) if fitting else None
        if fitting and CHECKPOINT_KEY in checkpoint:
            self._stash_restored_state(checkpoint, self.global_rank, self.world_size)
        elif fitting and checkpoint.get("loops") is not None and self.world_size > 1:
            rank_zero_warn(
                "Resuming from a checkpoint without local-SGD state (e.g. written by plain DDP): local SGD starts a "
                "new interval from rank 0's weights."
            )
        if group is not None:
            checkpoint = {**checkpoint, "state_dict": group["state_dict"]}
        check_model_matches_checkpoint(self.lightning_module, checkpoint, strict=strict)
        super().load_model_state_dict(checkpoint, strict=strict)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        group = self._own_group_state(checkpoint)
        if group is not None and group.get("optimizer_states") is not None:
            checkpoint = {**checkpoint, "optimizer_states": group["optimizer_states"]}
        super().load_optimizer_state_dict(checkpoint)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, start in (("", "popen"), ("_spawn", "spawn"), ("_fork", "fork")):
            strategy_registry.register(
                f"local_sgd{name}", cls, description=f"Local SGD, plain model averaging (start_method '{start}')",
                outer_optimizer="average", start_method=start, override=True,
            )
            strategy_registry.register(
                f"diloco{name}", cls,
                description=f"DiLoCo: outer Nesterov SGD lr 0.7 momentum 0.9 (start_method '{start}')",
                outer_optimizer="diloco", start_method=start, override=True,
            )
