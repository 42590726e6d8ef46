"""Asynchronous checkpoint saves (``async_save=True``): training continues while the files are written.

At a save the training thread does what must see the live state and nothing more: it builds this rank's
:class:`~lightning_localsgd.state.TrainingState` files, copies every tensor of them to host memory
(:func:`stage_to_host`; on the CPU a clone), and hands the copies to this rank's :class:`AsyncCheckpointWriter`. The
optimizer may change the parameters and its state right after the save returns.

The writer's background thread then writes the rank's files (atomically, as a synchronous save does) and takes part in
the **commit**: the ranks' threads exchange "written" / the error over a process group of their own (gloo, created
once, bounded by ``sync_timeout``), and only when every rank's files are written does global rank 0 write ``meta.pt``,
the commit of the folder (:mod:`lightning_localsgd.checkpoint`). A process killed during the write leaves the new
folder without its ``meta.pt`` (not a checkpoint) and every earlier checkpoint untouched: ``save_top_k`` removals asked
for while a write is in flight are deferred until that write is committed, and dropped if it fails.

One write is in flight at a time: the next save, a ``save_top_k`` check at the end of ``fit`` and the strategy's
``teardown`` wait for it first. An error of a background write (on any rank) is raised on the training thread of
every rank there, never swallowed.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Optional

import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["AsyncCheckpointWriter", "CheckpointWriteError", "stage_to_host"]


class CheckpointWriteError(RuntimeError):
    """A background checkpoint write failed (on this rank or another): the checkpoint it wrote was not committed."""


def stage_to_host(obj: Any) -> Any:
    """A copy of a nest of dicts, lists and tuples whose every tensor is a fresh host-memory copy.

    Tensors that share memory in ``obj`` (tied weights: one storage under several keys) share it in the copy, so
    ``torch.save`` writes them once. Other leaves (numbers, strings) are kept as they are.
    """
    copies: dict[Any, Tensor] = {}

    def copy_tensor(t: Tensor) -> Tensor:
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if key not in copies or not t.numel():
            copies[key] = t.to("cpu", copy=True)
        return copies[key]

    def walk(value: Any) -> Any:
        if isinstance(value, Tensor):
            return copy_tensor(value)
        if isinstance(value, dict):
            out = copy.copy(value)  # same class and attributes (a state_dict's ``_metadata``)
            for k, v in value.items():
                out[k] = walk(v)
            return out
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
            return type(value)(*(walk(v) for v in value))
        if isinstance(value, (list, tuple)):
            return type(value)(walk(v) for v in value)
        return value

    return walk(obj)


class AsyncCheckpointWriter:
    """One rank's background checkpoint writer: one write in flight at a time, committed collectively.

    Args:
        timeout: how long a rank's thread waits for the other ranks' threads at the commit (``sync_timeout``, or the
            process group's timeout); ``None``: torch's default.
    """

    def __init__(self, timeout: Optional[timedelta] = None) -> None:
        self.timeout = timeout
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._removals: list[Callable[[], None]] = []
        self._group: Optional[dist.ProcessGroup] = None
        self._lock = threading.Lock()
        #: Seconds the training thread spent copying the last save's state to host memory.
        self.stage_seconds = 0.0

    def submit(self, write: Callable[[], None], commit: Optional[Callable[[], None]], description: str) -> None:
        """Start writing in the background. Collective: every rank calls it once per save, in the same order.

        Args:
            write: writes this rank's files (host copies only: the training thread goes on at once).
            commit: global rank 0's commit (``meta.pt``), run once every rank's ``write`` succeeded; ``None`` on the
                other ranks.
            description: what is saved, for error messages (the checkpoint's path).
        """
        self.wait()
        group = self._commit_group()  # created on the training thread: new_group is collective in call order
        self._thread = threading.Thread(target=self._run, args=(write, commit, description, group),
                                        name="local_sgd-checkpoint-writer", daemon=False)
        self._thread.start()

    def stage(self, obj: Any) -> Any:
        """:func:`stage_to_host` of ``obj``, its seconds kept in :attr:`stage_seconds` (the save's stall)."""
        start = time.perf_counter()
        out = stage_to_host(obj)
        self.stage_seconds = time.perf_counter() - start
        return out

    def wait(self) -> None:
        """Block until the write in flight (if any) is committed; raise its error (from any rank) here."""
        error = self._join()
        if error is not None:
            raise error

    def defer_removal(self, remove: Callable[[], None]) -> bool:
        """While a write is in flight, keep ``remove`` (a ``save_top_k`` removal) until that write is committed;
        ``False``: nothing in flight, the caller removes now."""
        with self._lock:
            if self._thread is None:
                return False
            self._removals.append(remove)
            return True

    def close(self) -> Optional[BaseException]:
        """Wait for the write in flight; return (not raise) its error, for a teardown that must finish first."""
        return self._join()

    # ------------------------------------------------------------------ internals
    def _join(self) -> Optional[BaseException]:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        late = self._take_removals()  # asked for after the thread ran the deferred ones: the write is committed now
        if error is None:
            for remove in late:
                remove()
        return error

    def _commit_group(self) -> Optional[dist.ProcessGroup]:
        """A gloo group of every rank for the background threads (their collectives never meet the training
        thread's, whatever backend trains)."""
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        if self._group is None:
            kwargs = {"timeout": self.timeout} if self.timeout is not None else {}
            self._group = dist.new_group(backend="gloo", **kwargs)
        return self._group

    def _run(self, write: Callable[[], None], commit: Optional[Callable[[], None]], description: str,
             group: Optional[dist.ProcessGroup]) -> None:
        cause: Optional[BaseException] = None
        try:
            status = None
            try:
                write()
            except BaseException as err:  # reported to every rank; raised on the training threads
                cause, status = err, f"{type(err).__name__}: {err}"
            failed = {rank: s for rank, s in enumerate(_gather(status, group)) if s is not None}
            if failed:
                raise CheckpointWriteError(
                    f"the asynchronous save of {description} failed on rank(s) {sorted(failed)}: "
                    + "; ".join(f"rank {r}: {s}" for r, s in sorted(failed.items()))
                    + ". It was not committed (no meta.pt): the previous checkpoints are kept and still load."
                ) from cause
            committed = None
            if commit is not None:  # global rank 0: every rank's files are written
                try:
                    commit()
                    for remove in self._take_removals():  # save_top_k's, deferred until this commit
                        remove()
                except BaseException as err:
                    cause, committed = err, f"{type(err).__name__}: {err}"
            committed = _from_rank_zero(committed, group)
            if committed is not None:
                raise CheckpointWriteError(f"committing the asynchronous save of {description} on rank 0 failed: "
                                           f"{committed}.") from cause
            self._take_removals()  # other ranks: removing is rank 0's
        except BaseException as err:
            if not isinstance(err, CheckpointWriteError):  # e.g. the commit exchange timed out: a rank is gone
                wrapped = CheckpointWriteError(f"the asynchronous save of {description} did not complete: "
                                               f"{type(err).__name__}: {err}. The previous checkpoints are kept.")
                wrapped.__cause__ = err
                err = wrapped
            self._take_removals()  # the new checkpoint may not be there: keep the old ones
            self._error = err
            log.error(f"local SGD: {err}")

    def _take_removals(self) -> list[Callable[[], None]]:
        with self._lock:
            removals, self._removals = self._removals, []
        return removals


def _gather(status: Optional[str], group: Optional[dist.ProcessGroup]) -> list[Optional[str]]:
    if group is None:
        return [status]
    out: list[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, status, group=group)
    return out


def _from_rank_zero(status: Optional[str], group: Optional[dist.ProcessGroup]) -> Optional[str]:
    if group is None:
        return status
    box = [status]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
