"""The warm-up step's gradient mean across worker groups: every group computes its gradient, they average it, and
each steps its inner optimizer with the mean (as DDP over all groups) until the schedule's local steps begin."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .comm import Communicator

__all__ = ["average_gradients"]


@torch.no_grad()
def average_gradients(comm: Communicator, params: Sequence[Tensor]) -> bool:
    """Replace the gradients of ``params`` by their mean over the members of ``comm`` (one flat all-reduce), or,
    when the members vote against the step (:meth:`Communicator.commit` of a fault-tolerant transport whose
    collective failed), drop them (``grad = None``: the optimizer then skips every parameter). A parameter without
    a gradient gets a zero one first (as DDP with ``find_unused_parameters``); a ``DTensor`` gradient is reduced
    through its local shard. Returns the vote; a failed collective on a transport without a vote (one world, whose
    commit always says yes) raises."""
    failed: Optional[BaseException] = None
    grads = []
    flat = None
    if comm.size > 1:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.detach().to_local() if hasattr(p.grad, "to_local") else p.grad)
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            try:
                comm.all_reduce(flat)
            except Exception as err:  # noqa: BLE001 (fatal unless the members vote to drop the step)
                failed = err
    committed = comm.commit()
    if failed is not None and committed:
        raise failed  # a transport without a vote (one world): a failed collective ends training
    if not committed:  # as torchft's OptimizerWrapper: the step is not applied
        for p in params:
            p.grad = None
        return False
    if flat is not None:
        flat.div_(comm.size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    return True
