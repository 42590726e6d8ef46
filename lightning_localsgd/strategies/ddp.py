"""``LocalSGDStrategy``: local SGD across worker groups, DDP inside each group."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Mapping, Optional

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
from typing_extensions import override

from ..checkpoint_io import release_freed_memory, with_atomic_default
from ..config import LocalSGDConfig, local_sgd_arguments
from ..controller import CHECKPOINT_KEY
from ..reliability import check_backend_available, check_ddp_arguments, check_model_matches_checkpoint
from ..tensors import to_cpu
from ..topology import build_topology
from .base import LocalSGDMixin, is_fitting


@local_sgd_arguments()
class LocalSGDStrategy(LocalSGDMixin, DDPStrategy):
    """Local SGD (model averaging or DiLoCo) across worker groups, with DDP inside each group.

    Each worker group of ``group_size`` ranks trains as one DDP replica (gradients all-reduced over the group only);
    groups do not talk between syncs. Every ``sync_every`` optimizer steps the groups run the *outer step*:
    pseudo-gradient ``Δ = θ_g − mean_i θ_i``, ``θ_g ← outer_optimizer(θ_g, Δ)``, every group continues from ``θ_g``.
    Inner optimizer states stay local to each group. Floating-point buffers are averaged at each sync.

    Checkpoints are one file: group 0's model and optimizers under the usual ``state_dict`` / ``optimizer_states``
    (it loads into a plain DDP run), every other group's and every rank's local-SGD state under ``local_sgd``.

    Args:
        **kwargs: every argument of Lightning's ``DDPStrategy`` (``process_group_backend``, ``timeout``,
            ``start_method``, ``find_unused_parameters``, ...). DDP keyword arguments apply to the DDP wrapper inside
            each worker group (only created when ``group_size > 1``). Unless ``checkpoint_io`` is given, checkpoints
            are written atomically (:class:`~lightning_localsgd.checkpoint_io.AtomicCheckpointIO`).
    """

    strategy_name = "local_sgd"
    supports_federation = True

    def __init__(self, **kwargs: Any) -> None:
        config = LocalSGDConfig.from_kwargs(kwargs, self.local_sgd_defaults)
        for name in ("ddp_comm_state", "model_averaging_period"):
            if kwargs.get(name) is not None:
                raise ValueError(f"LocalSGDStrategy does its own model averaging: remove `{name}` (use sync_every / "
                                 "outer_optimizer instead).")
        if kwargs.get("process_group") is not None:
            raise ValueError("LocalSGDStrategy builds the worker groups' process groups itself: remove "
                             "`process_group` and set group_size instead.")
        kwargs.pop("process_group", None)  # LightningCLI passes every DDP argument, None included
        check_ddp_arguments(kwargs)
        super().__init__(**kwargs)
        self._init_local_sgd(config)

    # ------------------------------------------------------------------ launch / setup
    @override
    def _configure_launcher(self) -> None:
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
            self.setup_local_sgd(trainer)

    @override
    def configure_ddp(self) -> None:
        self.topology = build_topology(self.group_size, self._timeout)
        self._add_cluster_groups()
        assert self.model is not None
        if not self.local_sgd.restoring:
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
    def local_sgd_shard_group(self) -> Optional[dist.ProcessGroup]:
        # The ranks of a DDP group hold identical replicas: each syncs 1/group_size of the parameters.
        return self.topology.inner_group if self.topology is not None else None

    # ------------------------------------------------------------------ checkpoints
    def _gather_checkpoint_state(self, checkpoint: dict[str, Any]) -> Optional[dict[str, Any]]:
        """Gather every group's model/optimizer state and every rank's engine state to global rank 0. Collective."""
        topo = self.topology
        if self.outer_sync is None or topo is None:
            return None
        mine: dict[str, Any] = {**self.local_sgd.rank_state(), "group": None}
        if topo.rank_in_group == 0 and topo.group_index > 0:
            # group 0's state is the checkpoint's own `state_dict` / `optimizer_states`
            mine["group"] = {"state_dict": checkpoint["state_dict"],
                             "optimizer_states": checkpoint.get("optimizer_states")}
        gathered: Optional[list[Any]] = [None] * topo.world_size if topo.rank == 0 else None
        dist.gather_object(to_cpu(mine), gathered, dst=0)
        if gathered is None:
            return None
        return self.local_sgd.meta(
            topo.world_size,
            groups=[None] + [gathered[i * topo.group_size]["group"] for i in range(1, topo.num_groups)],
            ranks=[g["outer"] for g in gathered],
            clusters=[g["cluster"] for g in gathered],
        )

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        self.note_checkpoint(checkpoint, filepath)
        state = self._gather_checkpoint_state(checkpoint)  # collective: every rank takes part
        if self.is_global_zero and state is not None:
            checkpoint = {**checkpoint, CHECKPOINT_KEY: state}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        if state is not None:
            del checkpoint, state
            release_freed_memory()  # the other groups' states gathered for this file

    def _own_group_state(self, checkpoint: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return None
        self.local_sgd.check_meta(state, self.world_size)
        return state["groups"][self.global_rank // self.group_size]

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        fitting = is_fitting(trainer)
        group = self._own_group_state(checkpoint) if fitting else None
        state = checkpoint.get(CHECKPOINT_KEY)
        if fitting and state is not None:
            rank = self.global_rank
            clusters = state.get("clusters") or [None] * self.world_size
            self.local_sgd.restore(state, state["ranks"][rank], clusters[rank])
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
