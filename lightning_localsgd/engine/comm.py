"""The cross-group communicator: the one interface through which the engine talks to other ranks.

Everything in :mod:`lightning_localsgd.engine` that moves data between ranks goes through a :class:`Communicator`:
the reduce across worker groups, the all-gather of a DDP group's slices, the norm of a sharded pseudo-gradient.
The first implementation, :class:`ProcessGroupCommunicator`, wraps a ``torch.distributed`` process group; a second
one can wrap anything with the same collectives (e.g. a fault-tolerant, reconfigurable process group) without
any change to the engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional, Protocol, Union

import torch.distributed as dist
from torch import Tensor

__all__ = ["Communicator", "ProcessGroupCommunicator", "SyncAbortedError", "Work", "as_communicator"]


class SyncAbortedError(RuntimeError):
    """The members voted against applying a sync (:meth:`Communicator.commit`); nothing was written."""


class Work(Protocol):
    """A collective in flight (``torch.distributed``'s ``Work``): :meth:`wait` blocks until it is done."""

    def wait(self) -> Any: ...


class Communicator(ABC):
    """Collectives over a fixed set of ranks. Every method is collective: every member calls it, in the same order."""

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of members."""

    @property
    @abstractmethod
    def rank(self) -> int:
        """This rank's index among the members, ``0 .. size - 1``."""

    @abstractmethod
    def all_reduce(self, tensor: Tensor, op: str = "sum", async_op: bool = False) -> Optional[Work]:
        """Reduce ``tensor`` in place over the members; ``op`` is ``"sum"`` or ``"max"``."""

    @abstractmethod
    def all_to_all(self, output: Tensor, input: Tensor, async_op: bool = False) -> Optional[Work]:
        """Member ``j`` receives the ``j``-th equal chunk of every member's ``input``, in member order."""

    @abstractmethod
    def all_gather(self, output: Tensor, input: Tensor) -> None:
        """``output`` = the members' ``input`` tensors concatenated in member order."""

    def all_gather_async(self, output: Tensor, input: Tensor) -> Work:
        """:meth:`all_gather` launched without waiting for it: ``output`` is complete once the returned work's
        ``wait`` returns. The default runs it at once (a transport whose all-gather blocks); both built-in
        communicators launch it and return, so that the compressed reduce's pipeline overlaps it with other work."""
        self.all_gather(output, input)
        return _Done()

    @property
    def process_groups(self) -> list[dist.ProcessGroup]:
        """The ``torch.distributed`` process groups underneath, for timeouts (none for other transports)."""
        return []

    @property
    def member_id(self) -> int:
        """A number naming this member across changes of membership, below 2**32 (the sync's screen keeps each
        member's history under it). Default: :attr:`rank`, which is stable in a fixed world."""
        return self.rank

    @property
    def member_name(self) -> str:
        """How the log names this member. Default: its index."""
        return f"worker group {self.rank}"

    def commit(self) -> bool:
        """Whether the sync's collectives succeeded everywhere they must agree; asked once per sync, after the reduce
        and before anything is written. A fixed world always says yes; a fault-tolerant transport votes."""
        return True


class _Done:
    """A collective that already finished."""

    def wait(self) -> None:
        return None


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class ProcessGroupCommunicator(Communicator):
    """A :class:`Communicator` over a ``torch.distributed`` process group (``None``: the default, world group)."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def all_reduce(self, tensor: Tensor, op: str = "sum", async_op: bool = False) -> Optional[Work]:
        return dist.all_reduce(tensor, op=_OPS[op], group=self.group, async_op=async_op)

    def all_to_all(self, output: Tensor, input: Tensor, async_op: bool = False) -> Optional[Work]:
        return dist.all_to_all_single(output, input, group=self.group, async_op=async_op)

    def all_gather(self, output: Tensor, input: Tensor) -> None:
        dist.all_gather_into_tensor(output, input, group=self.group)

    def all_gather_async(self, output: Tensor, input: Tensor) -> Work:
        work = dist.all_gather_into_tensor(output, input, group=self.group, async_op=True)
        assert work is not None
        return work

    @property
    def process_groups(self) -> list[dist.ProcessGroup]:
        group = self.group if self.group is not None else dist.group.WORLD
        return [group] if group is not None else []

    def __repr__(self) -> str:
        return f"ProcessGroupCommunicator(size={self.size}, rank={self.rank})"


def as_communicator(group: Union[Communicator, dist.ProcessGroup, None]) -> Communicator:
    """A communicator as is, or a process group (``None``: the default group) wrapped in one."""
    return group if isinstance(group, Communicator) else ProcessGroupCommunicator(group)
