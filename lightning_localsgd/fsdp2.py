"""FSDP2 internals without Lightning: shard a module over the worker group, put it back to its shards after a
forward-only pass, start every group from group 0's shards, load full weights or a saved optimizer state into the
shards. :mod:`lightning_localsgd.strategies.fsdp` (the Lightning glue) and
:class:`~lightning_localsgd.state.ShardedState` use them.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .tensors import local_view
from .topology import Topology

__all__ = ["broadcast_group_zero_shards", "check_user_sharding", "is_fully_sharded", "load_full_state_dict",
           "local_to_dtensor", "reshard", "shard_module"]


def is_fully_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` or to a module inside it."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def reshard(module: nn.Module) -> None:
    """Put every FSDP unit back to its sharded parameters.

    FSDP2 does not reshard the root unit after a forward (its backward would gather it again at once), so after a
    forward-only pass (validation, test, predict) ``module.parameters()`` are the unsharded full tensors until the next
    backward. Whatever reads the shards (the sync, the checkpoint, the sharding check) reshards first.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def shard_module(module: nn.Module, mesh: Any, auto_wrap_policy: Optional[set[type[nn.Module]]], mp_policy: Any,
                 reshard_after_forward: bool) -> None:
    """``fully_shard`` ``module`` over ``mesh`` (the worker group): every element of an ``nn.ModuleList`` (or every
    instance of a class in ``auto_wrap_policy``) as a unit, then ``module`` itself as the root unit."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    units = []
    for m in module.modules():
        if m is module:
            continue
        if auto_wrap_policy is not None:
            if isinstance(m, tuple(auto_wrap_policy)):
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


def check_user_sharding(module: nn.Module, shard_mesh: Any) -> None:
    """Refuse a module the user sharded in ``configure_model`` unless every parameter is sharded over ``shard_mesh``
    (this rank's worker group)."""
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
def broadcast_group_zero_shards(module: nn.Module, topology: Topology) -> None:
    """Every group starts from group 0's shards (rank k of group 0 sends shard k to its cross group)."""
    if topology.num_groups == 1:
        return
    src = topology.rank_in_group  # global rank of this cross group's member in group 0
    for t in list(module.parameters()) + list(module.buffers()):
        local = local_view(t.detach())
        if local.numel():
            dist.broadcast(local, src=src, group=topology.cross_group)


def load_full_state_dict(module: nn.Module, checkpoint: Mapping[str, Any]) -> None:
    """Load the full (unsharded) weights of a plain Lightning checkpoint into the sharded ``module``: every rank
    keeps its own shards of them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, checkpoint["state_dict"], options=StateDictOptions(full_state_dict=True))


def local_to_dtensor(state: Mapping[str, Any], optimizer: Any) -> dict[str, Any]:
    """Turn the local shards of a saved optimizer state back into DTensors shaped like the parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
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
