"""What happens when a rank dies, hangs or is given bad input: sync timeouts, naming the missing ranks, early checks.

A local-SGD rank talks to the other worker groups only at a sync. A rank that crashed, was killed or hangs is therefore
noticed by the others at the next sync, where, without care, they would wait for the process group's timeout (30
minutes by default in Lightning) and then fail with a message from the communication backend that names neither the
rank nor the step. :class:`SyncGuard` wraps every sync:

* each rank records in the rendezvous store (the ``TCPStore`` every ``torch.distributed`` job has) that it reached the
  sync of step ``S`` — one small message, no waiting;
* the sync's collectives run with the timeout ``sync_timeout`` (set on their process groups for the duration of the
  sync only, so the backend itself gives up: nothing is left pending and the process can exit);
* when a collective fails (a peer's connection closed, or the timeout expired), the rank reads the other ranks'
  records and raises :class:`SyncFailedError` naming the ranks that never reached the sync, the step, and how to
  resume.

The sync engine (:class:`~lightning_localsgd.engine.OuterSync`) reduces before it writes anything, so a sync that fails
in its reduce leaves the global parameters of the last good sync in place; checkpoints are written atomically (see
:mod:`lightning_localsgd.checkpoint_io`), so the last checkpoint on disk is always a complete one.

This module also holds the argument checks that are not specific to one strategy (:func:`check_sync_timeout`,
:func:`check_ddp_arguments`, :func:`check_model_matches_checkpoint`).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from ._compat import default_store as _default_store
from ._compat import process_group_timeout as _pg_timeout
from .topology import agent_hosts_store

log = logging.getLogger(__name__)

__all__ = [
    "SyncFailedError",
    "SyncGuard",
    "check_ddp_arguments",
    "check_model_matches_checkpoint",
    "check_sync_timeout",
]

#: Store keys: "rank r reached the sync of step S" (value S), and "rank r started step S, which ends in a sync" (written
#: where the ranks agree on a stop signal before that step, see :mod:`.preemption`), and "rank r read the records of
#: the failed sync of step S" (lets the host of the store wait for the others before it exits, taking the store along).
_MARKER = "local_sgd/reached_sync/{rank}"
_STEP_MARKER = "local_sgd/started_step/{rank}"
_READ_MARKER = "local_sgd/read_failure/{rank}"
#: After a failure that was not a timeout (e.g. a peer's connection closed), how long at most to keep reading the
#: other ranks' records, so that live ranks that are a little behind are not reported as missing.
_MAX_POLL_SECONDS = 10.0
_POLL_INTERVAL = 0.2
#: After a failure inside a sync that every rank had reached, how long past the sync's deadline the live ranks are
#: given to report it (a rank that does not is named as the one that failed).
_REPORT_SECONDS = 5.0
#: How long one access to the rendezvous store may take. The store lives in one process (global rank 0, or the
#: torchrun agent); when that process is frozen (SIGSTOP, a partition) a read blocks forever: every access is bounded.
_STORE_SECONDS = 5.0
#: Words in the message of a RuntimeError raised by a collective that failed (gloo / NCCL / the network); any other
#: RuntimeError inside a sync is a bug and is raised as it is, not reported as a missing rank.
_COMMUNICATION_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "broken pipe",
                        "closed", "reset", "unreachable", "abort", "store")


def _is_communication_error(err: BaseException) -> bool:
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return any(word in text for word in _COMMUNICATION_WORDS)


def _bounded(fn: Any, seconds: float) -> Any:
    """``fn()`` in a daemon thread; raise ``TimeoutError`` when it has not returned within ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # handed to the caller
            box["error"] = err

    thread = threading.Thread(target=run, name="local-sgd-store", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"the rendezvous store did not answer within {seconds:g} s (its host is frozen or cut off)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class SyncFailedError(RuntimeError):
    """A local-SGD sync could not complete: a rank died, hangs, or the network failed.

    Attributes:
        step: the training step whose sync failed.
        rank: the global rank that raised it.
        missing_ranks: global ranks that had not reached the sync when this rank gave up (``[]`` when every rank had
            reached it, ``None`` when they could not be read).
    """

    def __init__(self, message: str, step: int, rank: int, missing_ranks: Optional[list[int]]) -> None:
        super().__init__(message)
        self.step = step
        self.rank = rank
        self.missing_ranks = missing_ranks


# ---------------------------------------------------------------------------------------------------- argument checks
def check_sync_timeout(value: Any) -> Optional[float]:
    """``sync_timeout``: ``None`` or a positive, finite number of seconds."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"sync_timeout must be a positive number of seconds (or None for the process group's `timeout`), got "
            f"{value!r}. It bounds how long a rank waits at a sync for the others, e.g. sync_timeout=600."
        )
    return float(value)


def check_ddp_arguments(kwargs: Mapping[str, Any]) -> None:
    """Check the ``DDPStrategy`` arguments that would otherwise only fail inside the launched processes."""
    timeout = kwargs.get("timeout")
    if timeout is not None and not isinstance(timeout, timedelta):
        raise ValueError(
            f"timeout must be a datetime.timedelta (the process group's timeout, e.g. timedelta(minutes=30)), got "
            f"{timeout!r}. To bound the wait at a local-SGD sync in seconds, use sync_timeout."
        )
    if timeout is not None and timeout.total_seconds() <= 0:
        raise ValueError(f"timeout must be a positive duration, got {timeout!r}.")
    backend = kwargs.get("process_group_backend")
    if backend is not None:
        known = [b for b in dist.Backend.backend_list if b != "undefined"]
        if not isinstance(backend, str):
            raise ValueError(f"process_group_backend must be a backend name such as 'gloo' or 'nccl', got {backend!r}.")
        # "gloo", or per device type: "cpu:gloo,cuda:nccl"
        names = [part.split(":")[-1].strip().lower() for part in backend.split(",")]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(
                f"process_group_backend={backend!r}: unknown backend {unknown[0]!r}. Use one of {known} (or None to "
                "let Lightning pick: 'nccl' on CUDA, 'gloo' on CPU)."
            )


def check_backend_available(backend: Optional[str]) -> None:
    """Fail on the launching machine, before any process starts, when the backend is not built into this torch."""
    if backend is None:
        return
    for name in {part.split(":")[-1].strip().lower() for part in backend.split(",")}:
        if not dist.is_backend_available(name):
            raise ValueError(
                f"process_group_backend={backend!r}: this torch build has no {name!r} backend (e.g. 'nccl' needs a "
                "CUDA build and GPUs). Use 'gloo' on CPU, or None to let Lightning pick."
            )


def check_model_matches_checkpoint(module: torch.nn.Module, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
    """Raise a ``ValueError`` saying what differs when ``checkpoint["state_dict"]`` does not fit ``module``.

    Without it, a checkpoint of another model size fails deep inside ``load_state_dict`` with one line per tensor and
    no hint of what to do.
    """
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        return
    own = module.state_dict()
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and isinstance(v, torch.Tensor) and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = [k for k in own if k not in state] if strict else []
    unexpected = [k for k in state if k not in own] if strict else []
    if not (shapes or missing or unexpected):
        return
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensor(s) have another shape ({'; '.join(shapes[:3])}{'; ...' if len(shapes) > 3 else ''})")
    if missing:
        parts.append(f"{len(missing)} tensor(s) of the model are not in the checkpoint ({', '.join(missing[:3])}"
                     f"{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) of the checkpoint are not in the model ({', '.join(unexpected[:3])}"
                     f"{', ...' if len(unexpected) > 3 else ''})")
    changed = _changed_hparams(module, checkpoint)
    raise ValueError(
        "the checkpoint was written for another model: " + "; ".join(parts) + "."
        + (f" Hyperparameters that differ (checkpoint -> this run): {changed}." if changed else "")
        + " Resume with the model configuration the checkpoint was written with (to train on with a new shape, start "
        "a new run and copy the weights you can reuse into the new model yourself)."
    )


def _changed_hparams(module: torch.nn.Module, checkpoint: Mapping[str, Any]) -> str:
    saved = checkpoint.get("hyper_parameters")
    current = getattr(module, "hparams", None)
    if not isinstance(saved, Mapping) or current is None:
        return ""
    diffs = [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in saved if k in current and saved[k] != current[k]]
    return ", ".join(diffs[:6])


# ---------------------------------------------------------------------------------------------------- the guard
class SyncGuard:
    """Runs a sync's collectives under ``sync_timeout`` and turns their failure into a :class:`SyncFailedError`.

    Args:
        timeout: seconds a rank waits at a sync for the others; ``None`` leaves the process groups' own timeout.
        groups: the process groups the sync talks over (``None`` = the default group).
        rank / world_size: this rank and the number of ranks, for the report.
        fallback_timeout: the process groups' timeout when it cannot be read from them (to restore it afterwards).
        store: where ranks record reaching a sync (default: the default process group's store).
    """

    def __init__(
        self,
        timeout: Optional[float],
        groups: Sequence[Optional[dist.ProcessGroup]],
        rank: int,
        world_size: int,
        fallback_timeout: Optional[timedelta] = None,
        store: Optional[dist.Store] = None,
    ) -> None:
        self.timeout = timeout
        unique: list[dist.ProcessGroup] = []
        for g in groups:
            g = g if g is not None else dist.group.WORLD
            if g is not None and all(g is not u for u in unique):
                unique.append(g)
        self.groups = unique
        self.rank = rank
        self.world_size = world_size
        self.fallback_timeout = fallback_timeout
        self.store = store if store is not None else _default_store()
        self._store_is_default = store is None
        self._marked: dict[str, int] = {}
        self._warned_no_timeout = False

    @classmethod
    def for_engines(cls, timeout: Optional[float], engines: Sequence[Any],
                    fallback_timeout: Optional[timedelta] = None) -> "SyncGuard":
        """The guard of the sync engines of a rank: every process group their communicators talk over."""
        groups = [g for engine in engines for comm in engine.communicators for g in comm.process_groups]
        return cls(
            timeout=timeout,
            groups=groups or [None],
            rank=dist.get_rank() if dist.is_initialized() else 0,
            world_size=dist.get_world_size() if dist.is_initialized() else 1,
            fallback_timeout=fallback_timeout,
        )

    # ------------------------------------------------------------------ timeouts
    @contextmanager
    def timeouts(self) -> Iterator[None]:
        """Run the enclosed collectives with ``timeout`` on the sync's process groups (no-op without a timeout)."""
        if self.timeout is None:
            yield
            return
        restore = []
        for g in self.groups:
            old = _pg_timeout(g) or self.fallback_timeout
            try:
                g.set_timeout(timedelta(seconds=self.timeout))
            except Exception as err:  # a backend without set_timeout: its own timeout applies
                if not self._warned_no_timeout:
                    log.warning(f"local SGD: cannot set sync_timeout on a process group ({err}); its own timeout "
                                "applies to the sync.")
                    self._warned_no_timeout = True
                continue
            if old is not None:
                restore.append((g, old))
        try:
            yield
        finally:
            for g, old in restore:
                try:
                    g.set_timeout(old)
                except Exception:
                    pass

    # ------------------------------------------------------------------ the sync
    @contextmanager
    def sync(self, step: int, before_step: bool = False) -> Iterator[None]:
        """Record that this rank reached the sync of ``step``, run it under the timeout, explain a failure.

        ``before_step``: the collectives run at the start of step ``step`` (which ends in a sync), not at its sync:
        ranks are then named by whether they started that step.
        """
        start = time.monotonic()
        key = _STEP_MARKER if before_step else _MARKER
        store_error = self._mark(step, key)
        try:
            with self.timeouts():
                yield
        except SyncFailedError:
            raise
        except RuntimeError as err:  # gloo/NCCL/network errors are RuntimeErrors (DistError included)
            if not _is_communication_error(err):
                raise  # a bug, not a lost rank: say what it is
            raise self.failure(step, start, err, store_error, key=key) from err

    def _mark(self, step: int, key: str = _MARKER) -> Optional[BaseException]:
        if self.store is None or self._marked.get(key) == step:
            return None
        try:
            self._set(key, step)
            self._marked[key] = step
        except Exception as err:  # the store is gone: its host died. Say so if the sync then fails.
            return err
        return None

    def _set(self, key: str, step: int) -> None:
        store = self.store
        assert store is not None
        _bounded(lambda: store.set(key.format(rank=self.rank), str(step)), _STORE_SECONDS)

    def _read_marks(self, key: str = _MARKER) -> dict[int, Optional[int]]:
        return _bounded(lambda: self._read_marks_unbounded(key), _STORE_SECONDS)

    def _read_marks_unbounded(self, key: str = _MARKER) -> dict[int, Optional[int]]:
        assert self.store is not None
        keys = [key.format(rank=r) for r in range(self.world_size)]
        marks: dict[int, Optional[int]] = {}
        if self.store.check(keys) and hasattr(self.store, "multi_get"):
            for r, value in enumerate(self.store.multi_get(keys)):
                marks[r] = int(value)
            return marks
        for r, key in enumerate(keys):
            marks[r] = int(self.store.get(key)) if self.store.check([key]) else None
        return marks

    def failure(
        self, step: int, start: float, err: BaseException, store_error: Optional[BaseException] = None,
        key: str = _MARKER,
    ) -> SyncFailedError:
        """Build the error for a sync of ``step`` that failed with ``err`` after this rank reached it at ``start``."""
        timed_out = "timed out" in str(err).lower() or "timeout" in str(err).lower()
        # Give the other ranks until the sync's deadline (at most _MAX_POLL_SECONDS more) to show up, so that a live
        # rank that is merely behind is not named. After a timeout at this sync the deadline has passed already; an
        # immediate failure (a closed connection, or the consequence of an earlier timeout) waits for it.
        now = time.monotonic()
        deadline = start + self.timeout if self.timeout is not None else now + _MAX_POLL_SECONDS
        poll_until = min(max(deadline, now), now + _MAX_POLL_SECONDS)
        marks: Optional[dict[int, Optional[int]]] = None
        synced: Optional[dict[int, Optional[int]]] = None
        if self.store is not None and store_error is None:
            try:
                while True:
                    marks = self._read_marks(key)
                    if not _not_at(marks, step) or time.monotonic() >= poll_until:
                        break
                    time.sleep(_POLL_INTERVAL)
                synced = marks if key == _MARKER else self._read_marks(_MARKER)
                self._set(_READ_MARKER, step)
            except Exception as read_err:
                # The store's host left while we polled (it is rank 0, which may have given up first): what was
                # read before still tells who had not arrived. Only without any read is the host itself to blame.
                if marks is None:
                    store_error = read_err
        silent: list[int] = []
        missing_ranks: Optional[list[int]] = _not_at(marks, step) if marks is not None else None
        if marks is not None and not missing_ranks:
            # Every rank reached the sync, so one died or lost its network inside it: it is the one that does not
            # report the failure (the live ones do, within the sync's deadline).
            silent = self._wait_for_readers(step, marks, poll_until + _REPORT_SECONDS)
        elif marks is not None and self._hosts_store():
            self._wait_for_readers(step, marks, poll_until + _STORE_SECONDS)
        head = f"local SGD sync at step {step} failed on rank {self.rank}"
        within = f" within sync_timeout={self.timeout:g} s" if self.timeout is not None and timed_out else ""
        if marks is not None:
            if missing_ranks:
                last = ", ".join(f"rank {r}: " + _last_sync(synced, r) for r in missing_ranks[:8])
                what = (f": rank(s) {missing_ranks} did not reach it{within} - crashed, killed or hanging "
                        f"({last}{', ...' if len(missing_ranks) > 8 else ''})")
            elif silent:
                missing_ranks = silent
                what = (f": every rank reached it, then rank(s) {silent} stopped answering during the sync{within} - "
                        "crashed, killed or lost its network")
            else:
                what = (f": every rank reached it, then its communication failed{within} - a rank crashed or lost "
                        "its network during the sync")
        elif store_error is not None:
            host = (os.environ.get("MASTER_ADDR", "?") + ":" + os.environ.get("MASTER_PORT", "?"))
            reason = _first_line(store_error, 120)
            if agent_hosts_store():  # torchrun: its agent hosts the store
                missing_ranks = None
                what = (f": the rendezvous store at {host} cannot be reached ({reason}), so the torchrun agent "
                        "hosting it is gone")
            else:  # Lightning's launcher and plain init_process_group: global rank 0 hosts the store
                missing_ranks = [0]
                what = (f": rank(s) [0] did not reach it - global rank 0 is gone: the rendezvous store it hosts at "
                        f"{host} cannot be reached ({reason})")
        else:
            missing_ranks = None
            what = ": the communication failed (no rendezvous store to tell which rank is missing)"
        message = (
            head + what + ". The global parameters of the last completed sync were left unchanged and the last "
            "checkpoint on disk was written atomically: restart with `trainer.fit(..., ckpt_path=<last checkpoint>)` on the "
            "same devices, num_nodes and group_size. Cause: " + f"{type(err).__name__}: {_first_line(err)}"
        )
        return SyncFailedError(message, step=step, rank=self.rank, missing_ranks=missing_ranks)

    def _hosts_store(self) -> bool:
        """Whether the store lives in this process (global rank 0 under Lightning's launcher or plain
        ``init_process_group``; under torchrun its agent hosts it)."""
        return self.rank == 0 and self._store_is_default and self.store is not None and not agent_hosts_store()

    def _wait_for_readers(self, step: int, marks: dict[int, Optional[int]], until: float) -> list[int]:
        """Wait (until ``until`` at most) for the ranks that reached the sync to report its failure; return those
        that did not. On the host of the store this also keeps the store up for them: when this process exits first,
        the store goes with it and the others could only blame rank 0."""
        expected = [r for r, s in marks.items() if r != self.rank and s is not None and s >= step]
        while expected and time.monotonic() < until:
            try:
                done = self._read_marks(_READ_MARKER)
            except Exception:
                return []
            expected = [r for r in expected if (done.get(r) or -1) < step]
            if expected:
                time.sleep(_POLL_INTERVAL)
        return expected


def _not_at(marks: dict[int, Optional[int]], step: int) -> list[int]:
    """The ranks whose mark is missing or older than ``step``, in order."""
    return sorted(r for r, s in marks.items() if s is None or s < step)


def _last_sync(synced: Optional[dict[int, Optional[int]]], rank: int) -> str:
    if synced is None:
        return "its last sync could not be read"
    step = synced.get(rank)
    return f"last sync at step {step}" if step is not None else "no sync reached"


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[:limit] + "..."


def stop_local_ranks(strategy: Any, exception: BaseException) -> None:
    """After a failed sync, stop the ranks this process launched (Lightning's popen launcher) instead of leaving them
    to wait for the process group's timeout: the run cannot continue without this rank."""
    if not isinstance(exception, SyncFailedError):
        return
    launcher = getattr(strategy, "launcher", None)
    procs = getattr(launcher, "procs", None)
    if not procs or not hasattr(launcher, "kill"):
        return
    log.info("local SGD: stopping the ranks started by this process after a failed sync.")
    launcher.kill(getattr(signal, "SIGKILL", signal.SIGTERM))
