"""DeepSpeed ZeRO inside a worker group, without Lightning: the model-parallel unit that makes the worker group ZeRO's
data-parallel group, the config checks, and the access to ZeRO's fp32 master partitions that local SGD syncs.

Every ``sync_every`` optimizer steps each rank runs the outer step on what the optimizer trains from: its fp32 master
partition (``single_partition_of_fp32_groups`` in stages 1–2, ``fp32_groups_flat_partition`` of DeepSpeed's bf16
optimizer, ``fp32_partitioned_groups_flat`` in stage 3), reduced with the same partition of the other groups over the
cross group (rank ``k`` of every group holds partition ``k``). Then :func:`refresh_module_params` makes the module's
parameters consistent again, as ZeRO does after its own ``step()``. Used by
:class:`~lightning_localsgd.strategies.deepspeed.LocalSGDDeepSpeedStrategy` and :class:`~lightning_localsgd.state.ZeroState`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import Module

from ._compat import zero3_repartition
from .topology import Topology, group_ranks

__all__ = ["WorkerGroupMPU", "broadcast_from_rank_zero", "broadcast_group_zero_partitions", "check_deepspeed_config",
           "guard_reentrant_root_forward", "master_partitions", "refresh_module_params", "zero_optimizer"]


class WorkerGroupMPU:
    """DeepSpeed's "model-parallel unit" for local SGD: data parallel = this rank's worker group, no model parallelism.

    ``deepspeed.initialize(mpu=...)`` takes ZeRO's data-parallel group (partitioning, gradient reduce-scatter,
    parameter all-gather, the batch-size arithmetic of its config) from it. The model-parallel group is the rank alone.
    """

    def __init__(self, topology: Topology, data_parallel_group: dist.ProcessGroup, self_group: dist.ProcessGroup) -> None:
        self.topology = topology
        self._dp_group = data_parallel_group
        self._self_group = self_group

    # data parallel: the worker group
    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self._dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.topology.group_size

    def get_data_parallel_rank(self) -> int:
        return self.topology.rank_in_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return group_ranks(self.topology.world_size, self.topology.group_size)[self.topology.group_index]

    # model (tensor) parallel: none, the rank alone
    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self._self_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_src_rank(self) -> int:
        return self.topology.rank

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_src_rank = get_model_parallel_src_rank


def _zero_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    zero = config.get("zero_optimization")
    return zero if isinstance(zero, Mapping) else {}


def _offload_device(section: Any) -> Optional[str]:
    if isinstance(section, Mapping):
        device = section.get("device")
        return None if device in (None, "none") else str(device)
    return None


def check_deepspeed_config(config: Mapping[str, Any]) -> int:
    """Raise a ``ValueError`` for DeepSpeed settings local SGD cannot sync; return the ZeRO stage."""
    zero = _zero_config(config)
    stage = zero.get("stage", 0) if zero else 0
    if stage not in (1, 2, 3):
        raise ValueError(
            f"LocalSGDDeepSpeedStrategy needs ZeRO stage 1, 2 or 3 inside the worker groups, got stage {stage!r} "
            "(zero_optimization off or stage 0). Pass stage=1, 2 or 3; for plain data parallelism inside a group use "
            "LocalSGDStrategy (DDP) instead."
        )
    offload = {
        "offload_optimizer": _offload_device(zero.get("offload_optimizer")),
        "offload_param": _offload_device(zero.get("offload_param")),
    }
    if zero.get("cpu_offload"):
        offload["offload_optimizer"] = "cpu"
    if zero.get("cpu_offload_params") or zero.get("cpu_offload_param"):
        offload["offload_param"] = "cpu"
    used = {k: v for k, v in offload.items() if v is not None}
    if used:
        what = ", ".join(f"{k} to {v}" for k, v in used.items())
        raise ValueError(
            f"LocalSGDDeepSpeedStrategy does not support ZeRO offloading ({what}): with offloading the fp32 master "
            "partition that the outer step must update lives in CPU memory or on NVMe (swapped in and out by "
            "DeepSpeed), outside the process groups the sync runs over. Turn offloading off (offload_optimizer=False, "
            "offload_parameters=False, or remove it from the DeepSpeed config), e.g. use a larger group_size or ZeRO "
            "stage 3 to save memory."
        )
    if int(zero.get("zero_hpz_partition_size", 1) or 1) > 1:
        raise ValueError(
            "LocalSGDDeepSpeedStrategy does not support ZeRO++ hierarchical partitioning (zero_hpz_partition_size > "
            "1): its secondary partitions are built over DeepSpeed's own groups. Remove zero_hpz_partition_size."
        )
    if int(zero.get("mics_shard_size", -1) or -1) > 0:
        raise ValueError(
            "LocalSGDDeepSpeedStrategy does not support MiCS (mics_shard_size): set group_size to the shard size "
            "instead, so each worker group is one ZeRO partition group."
        )
    return int(stage)


# ---------------------------------------------------------------------------------------------- ZeRO internals
def guard_reentrant_root_forward(optimizer: Any) -> None:
    """ZeRO-3: start DeepSpeed's per-forward parameter trace on the outermost call of the LightningModule only.

    DeepSpeed resets its prefetch trace in a forward pre-hook on the root module. Lightning runs ``training_step``
    through the engine's forward, and a ``training_step`` that calls ``self(x)`` enters the root module a second
    time: the trace is reset mid-forward, never completes, and DeepSpeed then validates it at every step with
    broadcasts from global rank 0 over *all* ranks (``assert_ints_same_as_other_ranks``), one cross-group round
    trip per step. Re-entrant calls of the root module no longer reset the trace.
    """
    # training: the ZeRO-3 optimizer's parameter_offload; evaluation: DeepSpeedZeRoOffload itself
    offload = getattr(optimizer, "parameter_offload", None) or optimizer
    handle = getattr(offload, "fwd_pre_hook", None)
    module = getattr(offload, "module", None)
    if handle is None or module is None or not isinstance(getattr(offload, "forward_hooks", None), list):
        return
    handle.remove()
    depth = [0]

    def start_of_forward(mod: Module, *args: Any) -> None:
        depth[0] += 1
        if depth[0] == 1:
            offload.get_param_coordinator().reset_step()

    def end_of_forward(mod: Module, *args: Any) -> None:
        depth[0] -= 1

    offload.fwd_pre_hook = module.register_forward_pre_hook(start_of_forward, prepend=True)
    offload.forward_hooks.append(module.register_forward_hook(end_of_forward, always_call=True))



def zero_optimizer(engine: Any) -> Any:
    """DeepSpeed's ZeRO optimizer of ``engine``, refused when we cannot find its fp32 master partitions."""
    optimizer = getattr(engine, "optimizer", None)
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if isinstance(getattr(optimizer, attr, None), list):
            return optimizer
    raise TypeError(
        f"LocalSGDDeepSpeedStrategy cannot find the fp32 master partitions in DeepSpeed's optimizer "
        f"{type(optimizer).__name__}: supported are ZeRO stage 1/2 (DeepSpeedZeroOptimizer), stage 3 "
        "(DeepSpeedZeroOptimizer_Stage3) and DeepSpeed's BF16_Optimizer."
    )

def master_partitions(opt: Any) -> list[Tensor]:
    """This rank's fp32 master partitions, one flat tensor per parameter (sub-)group; same layout in every group."""
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # stage 3
        flats = opt.fp32_partitioned_groups_flat
    elif hasattr(opt, "single_partition_of_fp32_groups"):  # stage 1/2
        flats = opt.single_partition_of_fp32_groups
    else:  # BF16_Optimizer (bf16 with stage 1)
        flats = opt.fp32_groups_flat_partition
    if any(t is None for t in flats):
        raise RuntimeError("LocalSGDDeepSpeedStrategy: a master partition is swapped out (NVMe offload).")
    return [t.detach() for t in flats]

@torch.no_grad()
def refresh_module_params(opt: Any) -> None:
    """After the master partitions changed: make the module's (bit16) parameters equal to them again, as ZeRO
    does at the end of its own ``step()``. Collective inside the worker group."""
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # stage 3
        zero3_repartition(opt)  # release the gathered parameters, then fp32 master partitions -> bit16 partitions
        persistent = getattr(opt, "persistent_parameters", None)
        if persistent:
            persistent[0].all_gather(persistent)
        if hasattr(opt, "invalidate_secondary_tensor"):
            opt.invalidate_secondary_tensor()
    else:  # stage 1/2 and BF16_Optimizer: copy into the bit16 partition, all-gather inside the group
        opt.update_lp_params()


@torch.no_grad()
def broadcast_from_rank_zero(model: Module) -> None:
    """Every rank starts from rank 0's weights and buffers whatever its seed (DeepSpeed itself broadcasts only
    inside its data-parallel group, i.e. the worker group)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if hasattr(t, "ds_id") or t.numel() == 0:
            continue  # already partitioned by zero.Init: handled after the engine exists
        dist.broadcast(t.data, src=0)


@torch.no_grad()
def broadcast_group_zero_partitions(optimizer: Any, topology: Topology) -> None:
    """Every group starts from group 0's master partitions (rank k of group 0 sends partition k to its cross
    group): covers parameters that zero.Init partitioned inside each group from different seeds."""
    if topology.num_groups == 1:
        return
    for t in master_partitions(optimizer):
        if t.numel():
            dist.broadcast(t, src=topology.rank_in_group, group=topology.cross_group)
    refresh_module_params(optimizer)
