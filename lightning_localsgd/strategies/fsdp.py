"""``LocalSGDFSDPStrategy``: local SGD across worker groups, FSDP2 sharding inside each group.

The ranks form a 2-D device mesh ``("replicate", "shard")`` of shape ``(G, S)``: row ``i`` is worker group ``i``
(FSDP shards the model over it: per-step all-gather / reduce-scatter inside the group only), column ``k`` is cross
group ``k`` (rank ``k`` of every group, holding the same shard). Every ``sync_every`` steps each rank runs the outer
step on its own shard with the same shard of the other groups. Nobody gathers the full model to sync.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.strategies.model_parallel import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from typing_extensions import override

from ..outer import OuterOptimizerSpec
from ..topology import Topology, check_group_size
from .base import CHECKPOINT_KEY, LocalSGDMixin, _to_cpu, is_fitting

log = logging.getLogger(__name__)

_META_FILE = "meta.pt"


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def _is_fully_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


class LocalSGDFSDPStrategy(LocalSGDMixin, ModelParallelStrategy):
    """Local SGD across worker groups with FSDP2 (``fully_shard``) sharding inside each group.

    A LightningModule may shard itself in ``configure_model`` with ``fully_shard(module, mesh=self.device_mesh["shard"])``
    (the strategy exposes a 2-D mesh ``("replicate", "shard")``); if it does not, the strategy shards it: every element
    of an ``nn.ModuleList`` (transformer blocks) or an instance of a class in ``auto_wrap_policy``, then every direct
    child of the LightningModule, as Lightning's ``FSDPStrategy`` wraps modules for users.

    Args:
        sync_every: ``H``, optimizer steps between two syncs (see ``LocalSGDStrategy``). Default 64.
        outer_optimizer: ``"average"``, ``"diloco"`` or a callable ``params -> torch.optim.Optimizer``. Default
            ``"average"``.
        group_size: ranks per worker group, the FSDP sharding degree; must divide the world size. Default ``None``:
            the devices per node, so sharding traffic stays inside a node and only syncs cross nodes.
        warmup_steps: fully synchronous steps before local SGD starts. Default 0.
        outer_state_device: where the snapshot and outer optimizer state (of this rank's shard only) live: ``None``
            (the shard's device) or ``"cpu"``. Default None.
        on_nonfinite: ``"raise"`` or ``"skip"`` (see ``LocalSGDStrategy``). Default ``"raise"``.
        sync_on_train_end: run a last sync when training ends mid-interval. Default True.
        sync_timeout: seconds a rank waits at a sync for the others before failing with a ``SyncFailedError`` that
            names the missing ranks and the step (see ``LocalSGDStrategy``). Default None: the process group's timeout.
        auto_wrap_policy: module classes to shard as units when the strategy shards the model (e.g.
            ``{MyTransformerBlock}``). Default None: the elements of every ``nn.ModuleList``.
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy`` for the strategy's own sharding (e.g.
            bf16 parameters with fp32 reduce). The snapshot and the outer step stay fp32.
        reshard_after_forward: FSDP2's ``reshard_after_forward`` for the strategy's own sharding. Default True.
        save_distributed_checkpoint: ``True`` (default): a checkpoint is a folder with one file per rank (its shards,
            its inner optimizer state, its outer state) and ``meta.pt``; ``False``: one file whose ``state_dict`` is
            group 0's full model (loads into a plain FSDP or DDP run) with every rank's shards under ``local_sgd``.
        process_group_backend: ``"gloo"`` (CPU), ``"nccl"`` (CUDA), or None for the device's default.
        timeout: timeout of the process groups.
        cluster_size: two-stage sync: worker groups per cluster (see ``LocalSGDStrategy``). Default None.
        cluster_sync_every: ``H2``, steps between syncs across clusters, a multiple of ``sync_every``.
        cluster_outer_optimizer: outer optimizer across clusters. Default ``"diloco"``.
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
    """

    strategy_name = "local_sgd_fsdp"

    def __init__(
        self,
        sync_every: int = 64,
        outer_optimizer: OuterOptimizerSpec = "average",
        group_size: Optional[int] = None,
        warmup_steps: int = 0,
        outer_state_device: Optional[Union[str, torch.device]] = None,
        on_nonfinite: str = "raise",
        sync_on_train_end: bool = True,
        sync_timeout: Optional[float] = None,
        auto_wrap_policy: Optional[set[type[nn.Module]]] = None,
        mp_policy: Optional[Any] = None,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        cluster_size: Optional[int] = None,
        cluster_sync_every: Optional[int] = None,
        cluster_outer_optimizer: OuterOptimizerSpec = "diloco",
        compression: Optional[str] = None,
        fragments: int = 1,
        overlap_steps: int = 0,
        overlap_mix: float = 0.0,
        sync_every_seconds: Optional[float] = None,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
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
        self._init_local_sgd(
            sync_every, outer_optimizer, 1 if group_size is None else group_size, warmup_steps, outer_state_device,
            on_nonfinite, sync_on_train_end, sync_timeout, cluster_size, cluster_sync_every, cluster_outer_optimizer,
            compression,
            fragments=fragments, overlap_steps=overlap_steps, overlap_mix=overlap_mix,
            sync_every_seconds=sync_every_seconds,
        )
        self.group_size = group_size  # None until the launcher knows the devices per node
        self.auto_wrap_policy = set(auto_wrap_policy) if auto_wrap_policy is not None else None
        self.mp_policy = mp_policy
        self.reshard_after_forward = reshard_after_forward
        self.save_distributed_checkpoint = save_distributed_checkpoint

    # ------------------------------------------------------------------ launch / mesh
    @override
    def _configure_launcher(self) -> None:
        if self.group_size is None:
            self.group_size = self.num_processes
        self._check_world_size(self.num_nodes * self.num_processes)
        super()._configure_launcher()

    @override
    def setup_environment(self) -> None:
        self._setup_distributed()  # process group (ModelParallelStrategy's), without its own 2-D mesh
        if self.group_size is None:
            self.group_size = self.num_processes
        world, rank = self.world_size, self.global_rank
        check_group_size(world, self.group_size)
        groups = world // self.group_size
        # row i = worker group i (FSDP shards over it), column k = cross group k (the outer reduce)
        self._device_mesh = init_device_mesh(
            self.root_device.type, (groups, self.group_size), mesh_dim_names=("replicate", "shard")
        )
        self.topology = Topology(
            world, rank, self.group_size,
            inner_group=self._device_mesh["shard"].get_group(),
            cross_group=self._device_mesh["replicate"].get_group(),
        )
        self._add_cluster_groups()
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

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
        if _is_fully_sharded(self.model):
            self._check_user_sharding(self.model)
        else:
            if not any(p.device.type == "meta" for p in self.model.parameters()):
                from lightning.pytorch.overrides.distributed import _sync_module_states

                _sync_module_states(self.model)  # rank 0's weights everywhere, before slicing them into shards
            self._shard(self.model)
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        self._broadcast_group_zero_shards()
        self.barrier()
        if is_fitting(trainer):
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if is_fitting(trainer):
            _optimizers_to_device(self.optimizers, self.root_device)
            self._setup_local_sgd(trainer)

    def _shard(self, module: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        kwargs: dict[str, Any] = {"mesh": self._device_mesh["shard"], "reshard_after_forward": self.reshard_after_forward}
        if self.mp_policy is not None:
            kwargs["mp_policy"] = self.mp_policy
        from torch.distributed.fsdp import FSDPModule

        units = []
        for m in module.modules():
            if m is module:
                continue
            if self.auto_wrap_policy is not None:
                if isinstance(m, tuple(self.auto_wrap_policy)):
                    units.append(m)
            elif isinstance(m, nn.ModuleList):
                units.extend(m)
        for unit in units:
            if not isinstance(unit, FSDPModule):
                fully_shard(unit, **kwargs)

        # The LightningModule itself is the root unit: it holds everything else (embeddings, final norm, head), so
        # parameters shared between those (tied input/output embeddings) stay in one FSDP group, and FSDP sees a
        # single root, as with Lightning's FSDPStrategy.
        fully_shard(module, **kwargs)

    def _check_user_sharding(self, module: nn.Module) -> None:
        shard_mesh = self._device_mesh["shard"]
        for name, p in module.named_parameters():
            if not isinstance(p, DTensor):
                raise ValueError(
                    f"parameter {name!r} is not sharded while others are: with local SGD every parameter must be "
                    "sharded inside the worker group. Call fully_shard on the module holding it (or on the root)."
                )
            if p.device_mesh != shard_mesh:
                raise ValueError(
                    f"parameter {name!r} is sharded over the mesh {p.device_mesh}, not over this rank's worker group. "
                    "Sharding across worker groups defeats local SGD: use `fully_shard(module, "
                    "mesh=self.device_mesh['shard'])` in configure_model."
                )

    @torch.no_grad()
    def _broadcast_group_zero_shards(self) -> None:
        """Every group starts from group 0's shards (rank k of group 0 sends shard k to its cross group)."""
        assert self.topology is not None and self.model is not None
        if self.topology.num_groups == 1 or self._restored_state is not None:
            return
        src = self.topology.rank_in_group  # global rank of this cross group's member in group 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            local = t.detach().to_local() if isinstance(t, DTensor) else t.detach()
            if local.numel():
                dist.broadcast(local, src=src, group=self.topology.cross_group)

    @override
    def _local_sgd_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        module = self.lightning_module
        params = [p.detach().to_local() if isinstance(p, DTensor) else p.detach()
                  for p in module.parameters() if p.requires_grad]
        buffers = [b for b in module.buffers() if torch.is_floating_point(b)]
        return params, buffers

    @override
    def _local_sgd_fragment_sizes(self, params: list[Tensor]) -> Optional[list[int]]:
        # balance streaming fragments by the full parameters, so every shard of a group cuts at the same tensors
        return [p.numel() for p in self.lightning_module.parameters() if p.requires_grad]

    @override
    def _local_sgd_norm_group(self) -> Optional[dist.ProcessGroup]:
        return self.topology.inner_group if self.topology is not None else None

    @property
    def ddp_bytes_per_step(self) -> int:
        """Bytes DDP would all-reduce per optimizer step on each rank: the full gradients of the model."""
        module = self.lightning_module
        return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)

    @override
    def _before_sync(self) -> None:
        assert self.outer_sync is not None
        self.outer_sync.tensors = self._local_sgd_tensors()[0]  # FSDP may re-view its sharded storage

    # ------------------------------------------------------------------ steps
    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Optional[Any] = None, **kwargs: Any) -> Any:
        self._stepped_this_batch = True
        closure = self._wrap_closure_for_warmup(optimizer, closure)
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def _rank_state(self) -> dict[str, Any]:
        """This rank's exact training state: its parameter shards, inner optimizer states, outer state."""
        assert self.lightning_module is not None
        params = {n: (p.detach().to_local() if isinstance(p, DTensor) else p.detach()).cpu().clone()
                  for n, p in self.lightning_module.named_parameters()}
        buffers = {n: b.detach().cpu().clone() for n, b in self.lightning_module.named_buffers()}
        optimizers = [_to_cpu(_dtensor_to_local(o.state_dict())) for o in self.optimizers]
        return {
            "params": params,
            "buffers": buffers,
            "optimizers": optimizers,
            "outer": self.outer_sync.state_dict() if self.outer_sync is not None else None,
            "cluster": self.cluster_sync.state_dict() if self.cluster_sync is not None else None,
        }

    def _layout(self) -> dict[str, Any]:
        return {
            "format_version": 1, "world_size": self.world_size, "group_size": self.group_size,
            "sync_every": self.sync_every, "warmup_steps": self.warmup_steps, "outer_optimizer": self._outer_name(),
            "schedule": self.schedule.state_dict(), "sync_seconds_total": self.sync_seconds_total,
        }

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("LocalSGDFSDPStrategy.save_checkpoint does not take storage_options.")
        path = Path(self.broadcast(str(filepath)))
        mine = self._rank_state()
        checkpoint = dict(checkpoint)
        if self.save_distributed_checkpoint:
            # One file per rank: between syncs the groups' replicas differ, so no rank's shard is redundant.
            checkpoint.pop("state_dict", None)
            checkpoint.pop("optimizer_states", None)
            if self.is_global_zero:
                if path.is_file():
                    path.unlink()
                path.mkdir(parents=True, exist_ok=True)
            self.barrier()
            _atomic_save(mine, path / _rank_file(self.global_rank))
            if self.is_global_zero:
                _atomic_save({**checkpoint, CHECKPOINT_KEY: self._layout()}, path / _META_FILE)
            self.barrier()
            return
        # one file: group 0's full model in Lightning's format, plus every rank's exact shards
        gathered: Optional[list[Any]] = [None] * self.world_size if self.is_global_zero else None
        dist.gather_object(mine, gathered, dst=0)
        if self.is_global_zero:
            assert gathered is not None
            checkpoint[CHECKPOINT_KEY] = {**self._layout(), "ranks": gathered}
            if path.is_dir():
                raise IsADirectoryError(f"The checkpoint path exists and is a directory: {path}")
            _atomic_save(checkpoint, path)
        self.barrier()

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            meta = torch.load(path / _META_FILE, map_location="cpu", weights_only=False)
            layout = meta[CHECKPOINT_KEY]
            self._check_restored_layout(layout, self.world_size)
            mine = torch.load(path / _rank_file(self.global_rank), map_location="cpu", weights_only=False)
        else:
            meta = torch.load(path, map_location="cpu", weights_only=False)
            layout = meta.get(CHECKPOINT_KEY)
            if layout is None:
                self._load_full_state_dict(meta)  # a plain (e.g. DDP) checkpoint: weights only
                meta.pop("optimizer_states", None)
                return meta
            self._check_restored_layout(layout, self.world_size)
            mine = layout["ranks"][self.global_rank]
            meta.pop("state_dict", None)
            meta.pop("optimizer_states", None)
        self._restore_rank_state(mine)
        if self.outer_sync is not None and mine["outer"] is not None:
            self.outer_sync.load_state_dict(mine["outer"])
        if self.cluster_sync is not None and mine.get("cluster") is not None:
            self.cluster_sync.load_state_dict(mine["cluster"])
        self.schedule.load_state_dict(layout["schedule"])
        self.sync_seconds_total = float(layout.get("sync_seconds_total", 0.0))
        return meta

    @torch.no_grad()
    def _restore_rank_state(self, state: Mapping[str, Any]) -> None:
        module = self.lightning_module
        assert module is not None
        for name, p in module.named_parameters():
            local = p.detach().to_local() if isinstance(p, DTensor) else p.detach()
            local.copy_(state["params"][name])
        for name, b in module.named_buffers():
            if name in state["buffers"]:
                b.copy_(state["buffers"][name])
        if is_fitting(module.trainer):
            for optimizer, saved in zip(self.optimizers, state["optimizers"]):
                optimizer.load_state_dict(_local_to_dtensor(saved, optimizer))

    def _load_full_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        assert self.model is not None
        set_model_state_dict(self.model, checkpoint["state_dict"], options=StateDictOptions(full_state_dict=True))

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # load_checkpoint restored the shards

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass  # load_checkpoint restored each rank's own optimizer state

    @override
    def _check_world_size(self, world_size: int) -> None:
        check_group_size(world_size, self.group_size if self.group_size is not None else 1)
        if self.cluster_size is not None:
            from ..topology import check_cluster_size

            check_cluster_size(world_size // (self.group_size or 1), self.cluster_size)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(
            "local_sgd_fsdp", cls, description="Local SGD (averaging) across groups, FSDP2 inside each group",
            outer_optimizer="average", override=True,
        )
        strategy_registry.register(
            "diloco_fsdp", cls, description="DiLoCo across groups, FSDP2 inside each group",
            outer_optimizer="diloco", override=True,
        )


def _dtensor_to_local(obj: Any) -> Any:
    if isinstance(obj, DTensor):
        return obj.to_local()
    if isinstance(obj, dict):
        return {k: _dtensor_to_local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_dtensor_to_local(v) for v in obj)
    return obj


def _local_to_dtensor(state: Mapping[str, Any], optimizer: Any) -> dict[str, Any]:
    """Turn the local shards of a saved optimizer state back into DTensors shaped like the parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = {"param_groups": state["param_groups"], "state": {}}
    for idx, st in state["state"].items():
        p = params[int(idx)]
        new = {}
        for k, v in st.items():
            if isinstance(p, DTensor) and isinstance(v, Tensor) and v.dim() > 0 and v.shape == p.to_local().shape:
                new[k] = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, shape=p.shape,
                                            stride=p.stride(), run_check=False)
            else:
                new[k] = v
        out["state"][idx] = new
    return out


def _atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash mid-write leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

