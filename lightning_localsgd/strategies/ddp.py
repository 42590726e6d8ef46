"""``LocalSGDStrategy``: local SGD across worker groups, DDP inside each group."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from .._compat import StrategyRegistry, sync_module_states
from ..checkpoint import check_elastic_resume, check_exact_resume, restore_checkpoint, save_checkpoint
from ..checkpoint_io import with_atomic_default
from ..config import LocalSGDConfig, local_sgd_arguments
from ..reliability import check_backend_available, check_ddp_arguments, check_model_matches_checkpoint
from ..topology import build_topology, init_default_group
from .base import LocalSGDMixin, is_fitting


@local_sgd_arguments()
class LocalSGDStrategy(LocalSGDMixin, DDPStrategy):
    """Local SGD (model averaging or DiLoCo) across worker groups, with DDP inside each group.

    Each worker group of ``group_size`` ranks trains as one DDP replica (gradients all-reduced over the group only);
    groups do not talk between syncs. Every ``sync_every`` optimizer steps the groups run the *outer step*:
    pseudo-gradient ``Δ = θ_g − mean_i θ_i``, ``θ_g ← outer_optimizer(θ_g, Δ)``, every group continues from ``θ_g``.
    Inner optimizer states stay local to each group. Floating-point buffers are averaged at each sync.

    Checkpoints are folders (:mod:`lightning_localsgd.checkpoint`): each group's replica written once, split across
    the group's ranks, and every rank's local-SGD state by that rank, in parallel; nothing is gathered on rank 0.
    ``lightning-localsgd convert FOLDER model.ckpt`` turns one into a plain Lightning checkpoint.

    Args:
        **kwargs: every argument of Lightning's ``DDPStrategy`` (``process_group_backend``, ``timeout``,
            ``start_method``, ``find_unused_parameters``, ...). DDP keyword arguments apply to the DDP wrapper inside
            each worker group (only created when ``group_size > 1``). Unless ``checkpoint_io`` is given, checkpoints
            are written atomically (:class:`~lightning_localsgd.checkpoint_io.AtomicCheckpointIO`).
    """

    strategy_name = "local_sgd"

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

    @override
    def setup_distributed(self) -> None:
        # the default process group over a store listening on MASTER_ADDR only; Lightning's then finds it started
        self.set_world_ranks()
        device_id = self.root_device if self.root_device.type != "cpu" else None
        init_default_group(self.cluster_environment, self._get_process_group_backend(), self._timeout, device_id,
                           self.num_nodes)
        super().setup_distributed()

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
            sync_module_states(self.model)  # every rank starts from rank 0's weights, whatever the seeds
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
    def local_sgd_slice_group(self) -> Optional[dist.ProcessGroup]:
        # The ranks of a DDP group hold identical replicas: each syncs 1/group_size of the parameters.
        return self.topology.inner_group if self.topology is not None else None

    # ------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("LocalSGDStrategy.save_checkpoint does not take storage_options: every rank writes its "
                            "own files of the checkpoint folder (lightning_localsgd.checkpoint).")
        self.note_checkpoint(checkpoint, filepath)
        save_checkpoint(self, checkpoint, filepath, self.training_state, writer=self.checkpoint_writer())

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        # a single file (written by an earlier version, every group in it, or by plain DDP) goes through checkpoint_io
        read_file = lambda path: self.checkpoint_io.load_checkpoint(path, weights_only=weights_only)  # noqa: E731
        fitting = is_fitting(self.lightning_module.trainer if self.lightning_module is not None else None)
        return restore_checkpoint(self, checkpoint_path, self.training_state, fitting, self._check_resume_layout,
                                  read_file=read_file)

    def _check_resume_layout(self, layout: Mapping[str, Any]) -> bool:
        """``True``: the checkpoint's layout is this run's (exact resume); ``False``: another world size or
        ``group_size``, resumed from ``θ_g`` with a warning; raises where neither works."""
        if layout["world_size"] == self.world_size and layout["group_size"] == self.group_size:
            check_exact_resume(layout, self.local_sgd.config, self.world_size)
            return True
        check_elastic_resume(layout, self.local_sgd.config)
        rank_zero_warn(
            f"Resuming local SGD on another layout: the checkpoint was written by {layout['world_size']} ranks in "
            f"worker groups of {layout['group_size']}, this run has {self.world_size} ranks and group_size="
            f"{self.group_size}. Every group starts from the global parameters θ_g of the last sync and the outer "
            f"optimizer state; the inner progress since that sync ({layout['schedule'].get('steps_since_sync', 0)} "
            "step(s) per group) is dropped. Inner optimizer and LR scheduler states come from the old groups; the "
            "step counters continue.", category=UserWarning,
        )
        return False

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        check_model_matches_checkpoint(self.lightning_module, checkpoint, strict=strict)
        super().load_model_state_dict(checkpoint, strict=strict)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistry) -> None:
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
