"""``LocalSGDFSDPStrategy``: local SGD across worker groups, FSDP2 sharding inside each group.

The ranks form a 2-D device mesh ``("replicate", "shard")`` of shape ``(G, S)`` (:func:`~..topology.build_mesh_topology`):
row ``i`` is worker group ``i`` (FSDP shards the model over it: per-step all-gather / reduce-scatter inside the group
only), column ``k`` is cross group ``k`` (rank ``k`` of every group, holding the same shard). Every ``sync_every``
steps each rank runs the outer step on its own shard with the same shard of the other groups. Nobody gathers the full
model to sync.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Optional

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.strategies.model_parallel import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from typing_extensions import override

from .. import integrity
from ..checkpoint_io import atomic_save
from ..config import LocalSGDConfig, local_sgd_arguments
from ..controller import CHECKPOINT_KEY
from ..tensors import dtensor_to_local, local_view, to_cpu
from ..topology import build_mesh_topology
from .base import LocalSGDMixin, is_fitting

_META_FILE = "meta.pt"


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def _is_fully_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def _reshard(module: nn.Module) -> None:
    """Put every FSDP unit back to its sharded parameters.

    FSDP2 does not reshard the root unit after a forward (its backward would gather it again at once), so after a
    forward-only pass (validation, test, predict) ``module.parameters()`` are the unsharded full tensors until the next
    backward. Whatever reads the shards (the sync, the checkpoint, the sharding check) reshards first.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


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
    (``self.model(input_ids=x).logits``). A checkpoint folder converts to a plain Lightning checkpoint with
    :func:`convert_fsdp_checkpoint` (``lightning-localsgd convert``).

    Args:
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
    """

    strategy_name = "local_sgd_fsdp"
    shards_within_group = True

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
        config = LocalSGDConfig.from_kwargs(local_sgd, self.local_sgd_defaults)
        if local_sgd:
            raise TypeError(f"LocalSGDFSDPStrategy got unexpected keyword argument(s): {sorted(local_sgd)}.")
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
        self._init_local_sgd(config)  # group_size None until the launcher knows the devices per node
        self.auto_wrap_policy = set(auto_wrap_policy) if auto_wrap_policy is not None else None
        self.mp_policy = mp_policy
        self.reshard_after_forward = reshard_after_forward
        self.save_distributed_checkpoint = save_distributed_checkpoint

    # ------------------------------------------------------------------ launch / mesh
    @override
    def setup_environment(self) -> None:
        self._setup_distributed()  # process group (ModelParallelStrategy's), without its own 2-D mesh
        self._resolve_group_size()
        # row i = worker group i (FSDP shards over it), column k = cross group k (the outer reduce)
        self._device_mesh, self.topology = build_mesh_topology(self.root_device.type, self.group_size)
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
            _reshard(self.model)  # a validation pass at the end of a previous fit left the root unit unsharded
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
            self.setup_local_sgd(trainer)

    def _shard(self, module: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        kwargs: dict[str, Any] = {"mesh": self._device_mesh["shard"], "reshard_after_forward": self.reshard_after_forward}
        if self.mp_policy is not None:
            kwargs["mp_policy"] = self.mp_policy
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
        if self.topology.num_groups == 1 or self.local_sgd.restoring:
            return
        src = self.topology.rank_in_group  # global rank of this cross group's member in group 0
        for t in list(self.model.parameters()) + list(self.model.buffers()):
            local = local_view(t.detach())
            if local.numel():
                dist.broadcast(local, src=src, group=self.topology.cross_group)

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
        _reshard(self.lightning_module)  # e.g. the train-end sync right after a validation pass
        self.outer_sync.tensors = self.local_sgd_tensors()[0]  # FSDP may re-view its sharded storage

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
    def _rank_state(self) -> dict[str, Any]:
        """This rank's exact training state: its parameter shards, inner optimizer states, outer state."""
        assert self.lightning_module is not None
        _reshard(self.lightning_module)  # a checkpoint saved right after a validation pass
        params = {n: local_view(p.detach()).cpu().clone() for n, p in self.lightning_module.named_parameters()}
        buffers = {n: b.detach().cpu().clone() for n, b in self.lightning_module.named_buffers()}
        optimizers = [to_cpu(dtensor_to_local(o.state_dict())) for o in self.optimizers]
        return {"params": params, "buffers": buffers, "optimizers": optimizers, **self.local_sgd.rank_state()}

    def _shard_layout(self) -> dict[str, Any]:
        """What :func:`convert_fsdp_checkpoint` needs to rebuild the full model from a group's rank files: each
        parameter's full shape and sharded dimension, and which parameter or buffer each ``state_dict`` key holds
        (tied weights appear under several keys)."""
        module = self.lightning_module
        assert module is not None
        params = {}
        for name, p in module.named_parameters():
            dims = [placement.dim for placement in getattr(p, "placements", ()) if hasattr(placement, "dim")]
            params[name] = {"shape": list(p.shape), "dim": dims[0] if dims else None}
        names = {id(t): n for n, t in [*module.named_buffers(), *module.named_parameters()]}
        keys = {key: names[id(t)] for key, t in module.state_dict(keep_vars=True).items() if id(t) in names}
        return {"params": params, "state_dict": keys}

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("LocalSGDFSDPStrategy.save_checkpoint does not take storage_options.")
        self.note_checkpoint(checkpoint, filepath)
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
            atomic_save(mine, path / _rank_file(self.global_rank))
            if self.is_global_zero:
                meta = self.local_sgd.meta(self.world_size, shards=self._shard_layout())
                atomic_save({**checkpoint, CHECKPOINT_KEY: meta}, path / _META_FILE)
            self.barrier()
            return
        # one file: group 0's full model in Lightning's format, plus every rank's exact shards
        gathered: Optional[list[Any]] = [None] * self.world_size if self.is_global_zero else None
        dist.gather_object(mine, gathered, dst=0)
        if self.is_global_zero:
            assert gathered is not None
            checkpoint[CHECKPOINT_KEY] = self.local_sgd.meta(self.world_size, ranks=gathered)
            if path.is_dir():
                raise IsADirectoryError(f"The checkpoint path exists and is a directory: {path}")
            atomic_save(checkpoint, path)
        self.barrier()

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            meta = integrity.load(path / _META_FILE, map_location="cpu", weights_only=False)
            layout = meta[CHECKPOINT_KEY]
            self.local_sgd.check_meta(layout, self.world_size)
            mine = integrity.load(path / _rank_file(self.global_rank), map_location="cpu", weights_only=False)
        else:
            meta = integrity.load(path, map_location="cpu", weights_only=False)
            layout = meta.get(CHECKPOINT_KEY)
            if layout is None:
                self._load_full_state_dict(meta)  # a plain (e.g. DDP) checkpoint: weights only
                meta.pop("optimizer_states", None)
                return meta
            self.local_sgd.check_meta(layout, self.world_size)
            mine = layout["ranks"][self.global_rank]
            meta.pop("state_dict", None)
            meta.pop("optimizer_states", None)
        self._restore_rank_state(mine)
        self.local_sgd.restore(layout, mine["outer"], mine.get("cluster"))
        return meta

    @torch.no_grad()
    def _restore_rank_state(self, state: Mapping[str, Any]) -> None:
        module = self.lightning_module
        assert module is not None
        for name, p in module.named_parameters():
            local_view(p.detach()).copy_(state["params"][name])
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


def convert_fsdp_checkpoint(checkpoint_dir: Any, output_file: Any, group: int = 0) -> Path:
    """Turn a :class:`LocalSGDFSDPStrategy` checkpoint folder into a plain Lightning checkpoint file.

    The folder (``save_distributed_checkpoint=True``, the default) holds every rank's shards; the file written here
    holds one worker group's full model under ``state_dict``, in the LightningModule's own names, plus the rest of
    the checkpoint (``epoch``, ``global_step``, hyper-parameters, loops, callbacks), so
    ``LightningModule.load_from_checkpoint(output_file)`` or ``torch.load`` + ``load_state_dict`` read it in a plain
    single process, as Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` does for DeepSpeed folders. No
    optimizer state is written (it is sharded, and each group has its own): use it for inference, evaluation or to
    start a new run, and the folder itself to resume a local-SGD run exactly.

    The last checkpoint of a ``fit`` holds the synced model (the train-end sync runs before it is saved), so every
    group gives the same weights; a checkpoint taken between two syncs holds each group's own model, ``group`` picks
    which (the default, group 0, is also what a single-file checkpoint's ``state_dict`` holds).

    Also on the command line: ``lightning-localsgd convert CHECKPOINT_DIR OUTPUT_FILE [--group N]``.

    Args:
        checkpoint_dir: the folder ``ModelCheckpoint`` / ``Trainer.save_checkpoint`` wrote (``meta.pt`` and one
            ``rankNNNNN.pt`` per rank).
        output_file: the checkpoint file to write (atomically).
        group: which worker group's model to write, ``0 <= group < world_size / group_size``. Default 0.

    Returns:
        The path of the file written.

    Raises:
        ValueError: ``checkpoint_dir`` is not such a folder, or ``group`` is out of range.
    """
    folder, output = Path(checkpoint_dir), Path(output_file)
    if folder.is_file():
        raise ValueError(f"checkpoint_dir={str(folder)!r} is a file, not a LocalSGDFSDPStrategy checkpoint folder: a "
                         "single-file checkpoint (save_distributed_checkpoint=False) already holds group 0's full "
                         "model under `state_dict`; load it directly.")
    if not (folder / _META_FILE).is_file():
        raise ValueError(f"checkpoint_dir={str(folder)!r} is not a LocalSGDFSDPStrategy checkpoint folder (no "
                         f"{_META_FILE}). Pass the folder that ModelCheckpoint / Trainer.save_checkpoint wrote.")
    meta = integrity.load(folder / _META_FILE, map_location="cpu", weights_only=False)
    layout = meta.pop(CHECKPOINT_KEY)
    size = layout["group_size"]
    num_groups = layout["world_size"] // size
    if isinstance(group, bool) or not isinstance(group, int) or not 0 <= group < num_groups:
        raise ValueError(f"group={group!r}: the checkpoint has {num_groups} worker group(s); pass 0 <= group < "
                         f"{num_groups}.")
    ranks = [integrity.load(folder / _rank_file(r), map_location="cpu", weights_only=False)
             for r in range(group * size, (group + 1) * size)]  # row `group` of the mesh, in shard order
    shards = layout.get("shards") or {}
    tensors: dict[str, Tensor] = {}
    for name, first in ranks[0]["params"].items():
        info = shards.get("params", {}).get(name, {"dim": 0 if first.dim() else None})
        full = first if info["dim"] is None else torch.cat([r["params"][name] for r in ranks], dim=info["dim"])
        if "shape" in info and list(full.shape) != info["shape"]:
            raise ValueError(f"{folder}: the shards of {name!r} make a tensor of shape {list(full.shape)}, the model's "
                             f"is {info['shape']}; the folder is incomplete or was written by another layout.")
        tensors[name] = full
    tensors.update(ranks[0]["buffers"])
    keys = shards.get("state_dict") or {name: name for name in tensors}
    meta["state_dict"] = {key: tensors[name] for key, name in keys.items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(meta, output)
    return output
