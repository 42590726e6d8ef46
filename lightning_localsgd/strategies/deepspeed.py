"""``LocalSGDDeepSpeedStrategy``: local SGD across worker groups, DeepSpeed ZeRO (stage 1, 2 or 3) inside each group.

DeepSpeed's data-parallel group is the rank's worker group: the strategy hands ``deepspeed.initialize`` a
model-parallel unit (``mpu``) whose data-parallel group is the worker group of ``group_size`` ranks and whose
model-parallel group is the rank alone. ZeRO therefore partitions the optimizer state (stage 1), the gradients (stage
2) and the parameters (stage 3) over the worker group only, and every per-step collective stays inside the group.

Every ``sync_every`` optimizer steps each rank runs the outer step on what the optimizer trains from: its fp32 master
partition (``single_partition_of_fp32_groups`` in stages 1–2, ``fp32_groups_flat_partition`` of DeepSpeed's bf16
optimizer, ``fp32_partitioned_groups_flat`` in stage 3), reduced with the same partition of the other groups over the
cross group (rank ``k`` of every group holds partition ``k``). Then the module's parameters are made consistent again,
as ZeRO does after its own ``step()``: stages 1–2 copy the partition into the bit16 partition and all-gather inside the
group; stage 3 copies it into the partitioned bit16 flat buffer that the next forward gathers from, and re-gathers the
persistent (small) parameters. Nobody gathers the full model to sync. The ZeRO internals (the mpu, the config checks,
the master partitions and their refresh) live in :mod:`lightning_localsgd.zero`; this module is the Lightning glue.
"""

from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generator, Mapping, Optional

import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch import Trainer
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.nn import Module
from typing_extensions import override

from .._compat import StrategyRegistry, validate_device_index_selection
from ..checkpoint import check_exact_resume, is_checkpoint_folder, restore_checkpoint, save_checkpoint
from ..config import LocalSGDConfig, local_sgd_arguments
from ..state import ZeroState
from ..topology import build_topology, init_default_group
from ..zero import (WorkerGroupMPU, broadcast_from_rank_zero, broadcast_group_zero_partitions,  # noqa: F401 (API)
                    check_deepspeed_config, guard_reentrant_root_forward, master_partitions, refresh_module_params,
                    zero_optimizer)
from .base import LocalSGDMixin, is_fitting

INSTALL_HINT = "pip install 'lightning-localsgd[deepspeed]'"
_TAG = "checkpoint"  # Lightning's DeepSpeedStrategy tag, inside each group's DeepSpeed folder


def _require_deepspeed() -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise ModuleNotFoundError(
            f"LocalSGDDeepSpeedStrategy needs DeepSpeed, which is not installed ({err}). Install it with "
            f"`{INSTALL_HINT}` (or `pip install 'deepspeed>=0.16'`)."
        ) from err


def check_deepspeed_arguments(kwargs: Mapping[str, Any]) -> None:
    """Raise a ``ValueError`` for arguments of Lightning's ``DeepSpeedStrategy`` that local SGD replaces or refuses."""
    if "process_group" in kwargs or "mpu" in kwargs:
        raise ValueError(
            "LocalSGDDeepSpeedStrategy builds DeepSpeed's data-parallel groups itself (one per worker group): "
            "remove `process_group`/`mpu` and set group_size instead."
        )
    if kwargs.get("load_full_weights"):
        raise ValueError(
            "LocalSGDDeepSpeedStrategy does not support load_full_weights=True (loading one weights file into "
            "ZeRO-3): resume from the checkpoint folder the strategy wrote, or load the weights in the "
            "LightningModule (e.g. in configure_model) before training."
        )


def check_accelerator(accelerator: Any) -> None:
    """Lightning's DeepSpeedStrategy accepts CUDA only; DeepSpeed's CPU accelerator (gloo) works as well."""
    if isinstance(accelerator, CPUAccelerator):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            raise RuntimeError(
                f"Trainer(accelerator='cpu') with DeepSpeed, but DeepSpeed chose its "
                f"'{get_accelerator().device_name()}' accelerator. Set the environment variable DS_ACCELERATOR=cpu "
                "before starting the script."
            )
    elif not isinstance(accelerator, CUDAAccelerator):
        raise RuntimeError(
            f"LocalSGDDeepSpeedStrategy runs on CUDA GPUs or on CPU, not on `{type(accelerator).__name__}`."
        )


def inference_config(config: Mapping[str, Any], zero_stage_3: bool) -> dict[str, Any]:
    """The DeepSpeed config of an evaluation engine (as Lightning's): precision, and ZeRO-3's partitioning."""
    inference: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
    for key in ("fp16", "bf16"):
        if key in config:
            inference[key] = config[key]
    if zero_stage_3:
        inference["zero_allow_untested_optimizer"] = config.get("zero_allow_untested_optimizer", True)
        inference["zero_optimization"] = config["zero_optimization"]
    return inference


def check_layout(layout: Mapping[str, Any], config: LocalSGDConfig, world_size: int, zero_stage: int) -> None:
    """Refuse to resume from a checkpoint whose layout (ranks, groups, ZeRO stage) this run cannot load."""
    check_exact_resume(layout, config, world_size)
    if layout.get("zero_stage", zero_stage) != zero_stage:
        raise ValueError(
            f"cannot resume: the checkpoint was written with ZeRO stage {layout['zero_stage']}, this run uses "
            f"stage {zero_stage}. Resume with the same stage."
        )


@local_sgd_arguments(
    defaults={"group_size": None},
    docs={"group_size": "ranks per worker group = ZeRO's data-parallel size; must divide the world size. Default "
                        "``None``: the devices per node, so ZeRO's traffic stays inside a node and only syncs cross "
                        "nodes.",
          "warmup_steps": "must be 0: fully synchronous warm-up steps are not supported with DeepSpeed (ZeRO reduces "
                          "the gradients into its own partitioned buffers inside the group).",
          "outer_state_device": "where the snapshot and the outer optimizer state (of this rank's partition only) "
                                "live: ``None`` (the partition's device) or ``\"cpu\"``. Default None.",
          "fragments": "streaming sync (see ``LocalSGDStrategy``); not supported with DeepSpeed (ZeRO keeps the "
                       "parameters as flat partitions, not per-tensor fragments): leave 1.",
          "overlap_steps": "streaming sync; not supported with DeepSpeed: leave 0.",
          "overlap_mix": "streaming sync; not supported with DeepSpeed: leave 0.",
          "sync_every_seconds": "time-based sync (see ``LocalSGDStrategy``); not supported with DeepSpeed yet: leave "
                                "None."},
)
class LocalSGDDeepSpeedStrategy(LocalSGDMixin, DeepSpeedStrategy):
    """Local SGD across worker groups with DeepSpeed ZeRO (stage 1, 2 or 3) inside each group.

    Each worker group of ``group_size`` ranks is one ZeRO data-parallel group: ZeRO partitions optimizer state,
    gradients (stage 2) and parameters (stage 3) over it, and all per-step communication stays inside it. Every
    ``sync_every`` optimizer steps each rank runs the outer step on its own fp32 master partition with the same
    partition of the other groups (one all-reduce over the cross group), then the group's bit16 parameters are
    refreshed from it as after a ZeRO step.

    Args:
        **kwargs: every argument of Lightning's ``DeepSpeedStrategy``: ``stage`` (default 2), ``config`` (a DeepSpeed
            config dict or JSON path; its ``zero_optimization`` must use stage 1–3), ``allgather_bucket_size``,
            ``reduce_bucket_size``, ``logging_level``, ``process_group_backend``, ``timeout``, ... ZeRO offloading
            (``offload_optimizer``/``offload_parameters``) is refused: the master weights would live outside the
            sync's process groups.

    Checkpoints are the folders of :mod:`lightning_localsgd.checkpoint`: each group's ZeRO partitions written by
    DeepSpeed on the group's ranks (between syncs the groups' weights and optimizer states differ), every rank's
    outer state by that rank, nothing gathered. ``fit(ckpt_path=...)`` resumes exactly; ``lightning-localsgd convert
    FOLDER model.ckpt`` writes one group's full weights as a plain Lightning checkpoint.
    """

    strategy_name = "local_sgd_deepspeed"
    training_state_class = ZeroState
    shards_within_group = True  # the other partitions of this group's model live on the other ranks of the group

    def __init__(self, **kwargs: Any) -> None:
        _require_deepspeed()
        LocalSGDConfig.check_support(kwargs, "deepspeed")  # warm-up, streaming, time-based sync: refused, with why
        config = LocalSGDConfig.from_kwargs(kwargs, self.local_sgd_defaults)
        check_deepspeed_arguments(kwargs)
        super().__init__(**kwargs)
        assert isinstance(self.config, dict)
        self.zero_stage = check_deepspeed_config(self.config)
        self._init_local_sgd(config)  # group_size None until the launcher knows the devices per node
        self._mpu: Optional[WorkerGroupMPU] = None

    # ------------------------------------------------------------------ launch / process groups
    @override
    def setup_environment(self) -> None:
        check_accelerator(self.accelerator)
        DDPStrategy.setup_environment(self)  # accelerator + setup_distributed (below), without DeepSpeed's CUDA check

    @override
    def setup_distributed(self) -> None:
        assert self.parallel_devices is not None
        if self.root_device.type != "cpu":
            validate_device_index_selection(self.parallel_devices)
        reset_seed()
        self.set_world_ranks()
        # the default process group over a store listening on MASTER_ADDR only (DeepSpeed then finds it started);
        # bound to the rank's GPU where DeepSpeed would bind it (CUDA, more than one rank)
        bind = self.root_device.type == "cuda" and self.world_size > 1
        init_default_group(self.cluster_environment, self._get_process_group_backend(), self._timeout,
                           self.root_device if bind else None, self.num_nodes)
        self._init_deepspeed_distributed()
        self._resolve_group_size()
        self.topology = build_topology(self.group_size, self._timeout)
        self._add_cluster_groups()
        # the model-parallel group of DeepSpeed's mpu: this rank alone (and the data-parallel group when group_size == 1)
        self_group = dist.new_group([self.global_rank], use_local_synchronization=True)
        dp_group = self.topology.inner_group if self.topology.inner_group is not None else self_group
        self._mpu = WorkerGroupMPU(self.topology, dp_group, self_group)

    # ------------------------------------------------------------------ model / engine
    @contextmanager
    @override
    def model_sharded_context(self) -> Generator[None, None, None]:
        import deepspeed

        self._init_config_if_needed()
        if self.zero_stage_3 and self._mpu is None:
            raise RuntimeError(
                "LocalSGDDeepSpeedStrategy: ZeRO-3 partitions parameters over the worker group, which exists only once "
                "the processes are set up. Create large modules in `LightningModule.configure_model`."
            )
        with deepspeed.zero.Init(
            enabled=self.zero_stage_3,
            remote_device=self.remote_device,
            config_dict_or_path=self.config,
            data_parallel_group=self._mpu.get_data_parallel_group() if self._mpu is not None else None,
        ):
            yield

    @override
    def _setup_model_and_optimizer(self, model: Module, optimizer: Optional[Any], lr_scheduler: Optional[Any] = None):
        import deepspeed

        assert self._mpu is not None, "setup_environment must run first"
        device_rank = self.root_device.index if self.root_device.index is not None else self.local_rank
        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=device_rank),
            config=self.config,
            model=model,
            model_parameters=model_parameters,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            mpu=self._mpu,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer

    @override
    def _initialize_deepspeed_inference(self, model: Module) -> None:
        # as Lightning's, with the worker group as DeepSpeed's data-parallel group (ZeRO-3 partitions over it, and a
        # checkpoint's partitions match it)
        import deepspeed
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        assert isinstance(self.config, dict) and self._mpu is not None
        remove_module_hooks(model)
        device_rank = self.root_device.index if self.root_device.index is not None else self.local_rank
        engine, _, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=device_rank), config=inference_config(self.config, self.zero_stage_3),
            model=model, optimizer=None, lr_scheduler=None, model_parameters=[], mpu=self._mpu,
            dist_init_required=False,
        )
        self.model = engine

    @override
    def setup(self, trainer: Trainer) -> None:
        fitting = is_fitting(trainer)
        if fitting and self._layer_sync is not None:
            raise ValueError(
                "sync_batchnorm=True synchronizes batch statistics across all ranks at every step, which local SGD "
                "avoids (buffers are averaged at each sync instead). Set Trainer(sync_batchnorm=False)."
            )
        assert self.model is not None
        broadcast_from_rank_zero(self.model)
        super().setup(trainer)
        guard_reentrant_root_forward(getattr(self.model, "optimizer", None) if self.model is not None else None)
        if fitting:
            self.zero_optimizer  # fails early for an optimizer wrapper we cannot sync
            assert self.topology is not None
            broadcast_group_zero_partitions(self.zero_optimizer, self.topology)
            self.setup_local_sgd(trainer)

    @property
    def zero_optimizer(self) -> Any:
        """DeepSpeed's ZeRO optimizer, whose fp32 master partitions are what this rank syncs."""
        return zero_optimizer(self.deepspeed_engine)

    @override
    def local_sgd_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        module = self.lightning_module
        buffers = [b for b in module.buffers() if torch.is_floating_point(b)]
        return master_partitions(self.zero_optimizer), buffers

    @override
    def before_local_sgd_sync(self) -> None:
        assert self.outer_sync is not None
        self.outer_sync.rebind(master_partitions(self.zero_optimizer))  # a checkpoint load may re-create them

    @override
    def after_local_sgd_sync(self) -> None:
        # the partitions hold θ_g now (also after a skipped sync): the module's parameters follow them
        refresh_module_params(self.zero_optimizer)

    @override
    def reset_inner_optimizers(self) -> None:
        # the torch optimizer that ZeRO runs on the fp32 master partitions holds the state (e.g. Adam's moments)
        inner = getattr(self.zero_optimizer, "optimizer", None)
        if inner is not None and hasattr(inner, "state"):
            inner.state.clear()

    @override
    def is_real_optimizer_step(self) -> bool:
        # DeepSpeed accumulates gradients itself: Lightning calls optimizer_step on every micro-batch and the engine
        # steps on the accumulation boundary only. H counts the real steps.
        return self.deepspeed_engine.is_gradient_accumulation_boundary()

    # ------------------------------------------------------------------ checkpoints
    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` is not supported by LocalSGDDeepSpeedStrategy "
                "(DeepSpeed writes the checkpoint, not a CheckpointIO)."
            )
        self.note_checkpoint(checkpoint, filepath)
        writer = self.checkpoint_writer()  # DeepSpeed writes its partitions itself, synchronously; the rest async
        if self.outer_sync is None or self.topology is None:
            super().save_checkpoint(checkpoint, filepath)  # outside fit: Lightning's own DeepSpeed folder
            return

        def write_partitions(folder: str) -> None:
            # Between syncs every group has its own weights and optimizer partitions: each group's ranks write its
            # own DeepSpeed checkpoint (one file per data-parallel rank); Lightning's state is in meta.pt.
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.deepspeed_engine.save_checkpoint(folder, client_state={}, tag=_TAG,
                                                  exclude_frozen_parameters=self.exclude_frozen_parameters)

        save_checkpoint(self, checkpoint, filepath, self.training_state, write_partitions=write_partitions,
                        writer=writer, zero_stage=self.zero_stage)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = str(checkpoint_path)
        if not is_checkpoint_folder(path):
            if os.path.isdir(os.path.join(path, _TAG)):
                rank_zero_warn(
                    "Resuming from a DeepSpeed checkpoint without local-SGD state (e.g. written by plain "
                    "DeepSpeedStrategy): every group loads it and local SGD starts a new interval."
                )
                return super().load_checkpoint(checkpoint_path, weights_only)
            raise FileNotFoundError(
                f"{path} is not a LocalSGDDeepSpeedStrategy checkpoint folder (no meta.pt). Pass the folder that "
                "ModelCheckpoint / Trainer.save_checkpoint wrote."
            )
        assert self.lightning_module is not None
        fitting = is_fitting(self.lightning_module.trainer)
        if not fitting and self.zero_stage_3:
            raise NotImplementedError(
                "validate/test/predict from a ZeRO-3 checkpoint folder in a new Trainer: DeepSpeed's ZeRO-3 inference "
                "engine cannot load partitions written by a data-parallel subgroup (the worker group). Convert it "
                f"into one weights file with `lightning-localsgd convert {path} model.ckpt` and load that, or "
                "evaluate inside trainer.fit (the validation loop)."
            )
        check = lambda layout: check_layout(layout, self.local_sgd.config, self.world_size, self.zero_stage)  # noqa: E731

        def read_partitions(folder: str) -> None:  # the group's own DeepSpeed checkpoint (group 0's outside fit)
            _, client_state = self.deepspeed_engine.load_checkpoint(
                folder, tag=_TAG, load_optimizer_states=fitting, load_lr_scheduler_states=False,
                load_module_strict=self.lightning_module.strict_loading,
            )
            if client_state is None:
                raise MisconfigurationException(f"DeepSpeed could not load the checkpoint of this rank's group from "
                                                f"{path}.")

        return restore_checkpoint(self, path, self.training_state, fitting, check, read_partitions=read_partitions)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistry) -> None:
        for outer, name, what in (("average", "local_sgd", "Local SGD (averaging)"), ("diloco", "diloco", "DiLoCo")):
            strategy_registry.register(
                f"{name}_deepspeed", cls, description=f"{what} across groups, DeepSpeed ZeRO stage 2 inside each group",
                outer_optimizer=outer, stage=2, override=True,
            )
            for stage in (1, 2, 3):
                strategy_registry.register(
                    f"{name}_deepspeed_stage_{stage}", cls,
                    description=f"{what} across groups, DeepSpeed ZeRO stage {stage} inside each group",
                    outer_optimizer=outer, stage=stage, override=True,
                )
