"""Syncs across jobs that nobody waits for (``async_sync=True``): the whole federated sync runs beside training.

:class:`BackgroundFederation` is a :class:`~lightning_localsgd.federation.Federation` whose time-based syncs of every
parameter run on a background thread: the quorum (with the wait for the slowest job), the collectives (every codec,
the pipelined compressed reducer included: they run on the engine unchanged) and the outer step, while the training
thread keeps taking inner steps. The split between the threads:

- **start** (training thread, :meth:`~BackgroundFederation.launch`, at the step end where the sync is due): copy what
  the sync sends, ``θ_i_sent`` (the live parameters and floating-point buffers), and point the engine at a second copy
  (its *work* tensors), which the background sync reads and writes (``θ_g_new`` after it) while the live ones train on.
  Only these cheap copies run on the training thread; hooks and parameter access stay there.
- **background** (one thread, one sync in flight): :meth:`Federation.sync <lightning_localsgd.federation.Federation.
  sync>` on the work tensors: quorum, reduce, commit vote, outer step, a failed attempt redone over a new quorum until
  ``sync_timeout`` (it never goes stale: it reads the copies, not the live parameters).
- **apply** (training thread, :meth:`~BackgroundFederation.poll` at every step end, never waiting): once the thread is
  done, the one-step-delayed outer update with the local progress kept (DiLoCoX, arXiv 2506.21263; Eager updates,
  arXiv 2502.12996)::

      θ_i ← θ_g_new + (θ_i − θ_i_sent)          θ_g ← θ_g_new

  i.e. ``θ_i += work − θ_i_sent``. Why this rule: every inner step taken while the sync ran is kept (none is lost and
  none counted twice: the next sync's pseudo-gradient ``θ_g_new − θ_i_sent'`` carries them, weighted by the tokens
  since this sync started), and the outer update reaches every job one sync late, which DiLoCoX and the eager-updates
  paper find costs little at DiLoCo's intervals. ``overlap_mix`` (α-mixing, Streaming DiLoCo) is the alternative
  already in the engine for fragments; with α it would forget a share of ``θ_g_new``'s step, which the delayed rule
  does not. The sync carrying a stop (the end of training) keeps no local progress: every job ends on ``θ_g_new``.

The next sync is due ``sync_every_seconds`` after a sync is *applied* (the clock restarts there, as with time-based
streaming), so at most one is in flight by construction; a sync that comes due while one is still in flight (only a
caller outside the schedule can ask) is not started (:meth:`launch` returns False, counted in :attr:`deferred`): its
tokens stay with the next one, which sends every inner step since the previous start.

**Healing with a sync in flight.** torchft calls the state callbacks on its own threads: ``state_dict`` (a peer heals
from this job) on the quorum thread, ``load_state_dict`` (this job heals) on the thread that formed the quorum, the
background one. Neither may touch the model under the training thread's feet, so both are posted to the training
thread (:meth:`BackgroundFederation.state_dict` / :meth:`load_state_dict`), which runs them at its next step end (or
while it waits in :meth:`settle`) and hands the result back; the background thread waits for it (at most one step).
A job that healed weighs 0 in that sync, its ``θ_i_sent`` becomes the state it loaded, so the delayed rule keeps only
the steps it took after loading. Joining (``on_train_start``), warm-up rounds and the stop at the end run on the
training thread, as in :class:`~lightning_localsgd.federation.Federation`.

**A late job weighs in next time.** A job that trained but missed a sync the others committed (its training thread
started no sync within the lighthouse's join timeout) heals in its next sync's quorum. Instead of the peer's whole
state it takes only ``θ_g_peer`` and the outer optimizer state, keeps its model, inner optimizer, counters and tokens,
and moves what it holds, what it sends and ``θ_i_sent`` by ``θ_g_peer − θ_g_own`` (:meth:`BackgroundFederation.
_merge_late`): it sends ``θ_g_peer − Δ_late``, ``Δ_late = θ_g_own − θ_i_sent`` its pseudo-gradient of the interval
relative to the ``θ_g`` it started from, with its own weight (the tokens since its previous sync started). Staleness:
one sync (or more), weighted by tokens like everyone's, not discounted. Its error feedback restarts from zero.

**Checkpoints and the end.** A checkpoint (and the end of training) first waits for the sync in flight, bounded by
``sync_timeout``, and applies it (:meth:`settle`), so a checkpoint holds one consistent ``(θ_g, outer state, θ_i)``
with nothing in flight.

Jobs of one rank only: with several ranks the sync's collectives inside the job (the layout check's broadcast, the
gather of the slices and the norm over them, the ranks' agreement after a heal) would run on the background thread over
the process groups the training thread's DDP collectives use, and the ranks would have to agree on the step end that
applies a sync (and that loads a healing state): a background process group of the job's own and an agreed poll are
not built.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, TypeVar

import torch
from torch import Tensor

from .engine.outer import OuterSync, SyncResult
from .federation import Federation, LayoutMismatchError, layout_mismatch
from .tensors import tensor_bytes

if TYPE_CHECKING:
    from .config import LocalSGDConfig
    from .engine.schedules import SyncSchedule
    from .syncs import HostFacts

__all__ = ["BackgroundFederation"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How often a training thread waiting in :meth:`BackgroundFederation.settle` looks at the background thread's requests.
_SERVE_EVERY = 0.005


@dataclass
class _InFlight:
    """A sync running beside training: what it sends, the copies it works on, where its result lands."""

    live: list[Tensor]
    """The live tensors (the engine's parameters, then its buffers) the result is applied to."""
    sent: list[Tensor]
    """``θ_i_sent``: copies of them when the sync started."""
    work: list[Tensor]
    """The engine's tensors while it runs: ``θ_i_sent`` going in, ``θ_g_new`` (and the mean buffers) coming out."""
    tensors: int
    """How many of ``live`` are the engine's parameters (the rest are its buffers)."""
    step: int
    """The schedule's step at the start (the step the sync's records name)."""
    inner_steps: int
    """The job's inner steps at the start (the work it carries)."""
    done: Future = field(default_factory=Future)
    """``(result, record)`` of the committed sync, or its error."""


class BackgroundFederation(Federation):
    """A :class:`~lightning_localsgd.federation.Federation` whose time-based syncs of every parameter run beside
    training (``async_sync=True``; see the module docstring for the threads, the rule and healing)."""

    background = True

    def __init__(self, lighthouse: str, group_id: Optional[str], min_groups: int,
                 sync_timeout: Optional[float], run_secret_file: Optional[str] = None) -> None:
        super().__init__(lighthouse, group_id, min_groups, sync_timeout, run_secret_file)
        self._flight: Optional[_InFlight] = None
        self._thread: Optional[threading.Thread] = None
        self._training_thread: Optional[int] = None
        self._foreground = 0
        """>0 while the training thread itself is inside a quorum (join, warm-up, the stop at the end): then torchft's
        state callbacks run directly, as in a Federation."""
        self._requests: "queue.SimpleQueue[tuple[Callable[[], Any], Future]]" = queue.SimpleQueue()
        self.deferred = 0
        """Syncs that came due while one was in flight and were not started (their tokens go with the next)."""
        self._late_kept = False
        """This quorum healed θ_g only: this job sends its own work (see :meth:`_merge_late`)."""
        self.applied: list[dict[str, Any]] = []
        """Per sync applied beside training: the step it started at (``step``), the step end it was applied at
        (``applied_step``), its weight and whether it carried the stop (also in that sync's :attr:`attempts`)."""

    # ------------------------------------------------------------------ setup
    def start(self, schedule: "SyncSchedule", config: "LocalSGDConfig", host: Optional["HostFacts"]) -> Any:
        if host is not None and host.world_size > 1:
            raise ValueError(f"async_sync=True is supported with jobs of one rank only, this job has "
                             f"{host.world_size}: the sync's collectives inside the job (the layout check's "
                             "broadcast, the gather of the slices and the norm over them, the ranks' agreement after "
                             "a heal) would run on the background thread over the process groups the training "
                             "thread's DDP collectives use at the same time, and the job's ranks would have to agree "
                             "on the step end that applies the sync (and loads a healing state). Run one rank per "
                             "job, or leave async_sync=False.")
        self._training_thread = threading.get_ident()
        return super().start(schedule, config, host)

    def shutdown(self) -> None:
        flight, self._flight = self._flight, None
        if flight is not None and not flight.done.done():  # an error path: the thread ends with the manager
            flight.done.cancel()
        super().shutdown()

    # ------------------------------------------------------------------ on the training thread, in a quorum
    def join(self, engine: OuterSync) -> None:
        with self._on_training_thread_now():
            super().join(engine)

    def start_round(self) -> None:
        with self._on_training_thread_now():
            super().start_round()

    def sync(self, engine: OuterSync, weight: Optional[float] = None, stop: Optional[bool] = None) -> SyncResult:
        """A sync of every parameter on the training thread (the stop at the end of training): nothing in flight."""
        assert self._flight is None, "settle() the sync in flight first"
        with self._on_training_thread_now():
            return super().sync(engine, weight, stop)

    @contextlib.contextmanager
    def _on_training_thread_now(self) -> Iterator[None]:
        self._foreground += 1
        try:
            yield
        finally:
            self._foreground -= 1

    # ------------------------------------------------------------------ beside training
    def launch(self, engine: OuterSync, weight: Optional[float] = None, stop: Optional[bool] = None) -> bool:
        """Start a sync of every parameter on the background thread (training thread: copies only). False: one is
        still in flight, nothing started (counted in :attr:`deferred`)."""
        if self._flight is not None:
            self.deferred += 1
            return False
        live = [*engine.tensors, *engine.buffers]
        with torch.no_grad():
            sent = [t.detach().clone() for t in live]
            work = [t.clone() for t in sent]
        flight = _InFlight(live, sent, work, len(engine.tensors), self._step(), self.inner_steps)
        engine.rebind(work[: flight.tensors])  # the sync reads and writes the copies; the live tensors train on
        engine.buffers = work[flight.tensors:]
        self._flight = flight
        self._thread = threading.Thread(target=self._run, args=(engine, flight, weight, stop),
                                        name=f"local-sgd-sync-{self.group_id}", daemon=True)
        self._thread.start()
        return True

    def _run(self, engine: OuterSync, flight: _InFlight, weight: Optional[float], stop: Optional[bool]) -> None:
        """The background thread: the whole sync, over quorums until one commits or ``sync_timeout`` passes."""
        try:
            result = Federation.sync(self, engine, weight, stop)
            record = self.attempts[-1]
        except BaseException as err:  # raised on the training thread when it applies the sync
            if not flight.done.done():
                flight.done.set_exception(err)
            return
        if not flight.done.done():
            flight.done.set_result((result, record))

    def poll(self, engine: OuterSync) -> Optional[SyncResult]:
        """At a step end: run what the background thread asked of this thread; apply its sync if it is done."""
        self._serve()
        if self._flight is None or not self._flight.done.done():
            return None
        return self._apply(engine)

    def settle(self, engine: OuterSync) -> Optional[SyncResult]:
        """Wait for the sync in flight (serving the background thread's requests meanwhile) and apply it; ``None``
        when none is in flight. Bounded: ``sync_timeout`` and the time its last attempt may take."""
        flight = self._flight
        if flight is None:
            return None
        limit = 2 * self.timeout.total_seconds() + 30.0
        deadline = time.monotonic() + limit
        while not flight.done.done():
            self._serve()
            if time.monotonic() > deadline:
                raise TimeoutError(f"local SGD: the federated sync started at step {flight.step} beside training did "
                                   f"not end within {limit:g} s (sync_timeout={self.timeout.total_seconds():g} s).")
            time.sleep(_SERVE_EVERY)
        return self._apply(engine)

    @torch.no_grad()
    def _apply(self, engine: OuterSync) -> SyncResult:
        """The one-step-delayed update with the local progress kept: ``θ_i += θ_g_new − θ_i_sent`` (the sync
        carrying a stop: ``θ_i ← θ_g_new``, so that every job ends on one model)."""
        flight, self._flight = self._flight, None
        assert flight is not None
        engine.rebind(flight.live[: flight.tensors])
        engine.buffers = flight.live[flight.tensors:]
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None
        result, record = flight.done.result()  # the background sync's error is raised here, on the training thread
        for live, sent, work in zip(flight.live, flight.sent, flight.work):
            if result.stop_requested:
                live.copy_(work)
            else:
                live.add_(work.sub_(sent).to(live.dtype))
        record["applied_step"] = self._step()
        self.applied.append({"step": flight.step, "applied_step": record["applied_step"],
                             "weight": record.get("weight"), "stop": bool(result.stop_requested)})
        return result

    # ------------------------------------------------------------------ what the background thread sees
    def _off_training_thread(self) -> bool:
        return self._training_thread is not None and threading.get_ident() != self._training_thread

    def _step(self) -> int:
        # the background sync's records and its redo decision use the step it started at
        if self._flight is not None and self._off_training_thread():
            return self._flight.step
        return super()._step()

    def _steps_sent(self) -> int:
        if self._flight is not None and self._off_training_thread():
            return self._flight.inner_steps
        return super()._steps_sent()

    # ------------------------------------------------------------------ torchft's state callbacks
    def state_dict(self) -> dict[str, Any]:
        """A peer heals from this job: its state, captured on the training thread (torchft asks on its quorum
        thread)."""
        return self._training_thread_runs(super().state_dict)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This job heals: the peer's state is loaded on the training thread, which then sends it (weight 0)."""
        self._training_thread_runs(lambda: self._load_beside(state))

    def _quorum(self, kind: str, fragment: Optional[int], deadline: float) -> dict[str, Any]:
        self._late_kept = False
        return super()._quorum(kind, fragment, deadline)

    def _kept_own_work(self) -> bool:
        return self._late_kept

    def _load_beside(self, state: dict[str, Any]) -> None:
        flight, engine = self._flight, self.engine
        if flight is not None and engine is not None and flight.inner_steps > engine.whole.synced_at:
            self._merge_late(state, flight, engine)
            return
        super().load_state_dict(state)
        if flight is not None:  # what this sync sends and the delayed rule's θ_i_sent: the state just loaded
            with torch.no_grad():
                for live, sent, work in zip(flight.live, flight.sent, flight.work):
                    sent.copy_(live)
                    work.copy_(live)

    @torch.no_grad()
    def _merge_late(self, state: dict[str, Any], flight: _InFlight, engine: OuterSync) -> None:
        """A late job (it trained, and missed a sync the others committed) heals ``θ_g`` and the outer state only:
        it keeps its model, inner optimizer, counters and tokens, and moves what it sends, what it holds and its
        ``θ_i_sent`` by ``θ_g_peer − θ_g_own``, so that it sends ``θ_g_peer − Δ_late`` (``Δ_late = θ_g_own −
        θ_i_sent``: its pseudo-gradient of the interval, stale by the syncs it missed) with its own weight."""
        problem = layout_mismatch(self.layout(), [state["layout"]])
        if problem is not None:
            raise LayoutMismatchError(problem)
        peer = state["training"]
        own, sent_bytes = engine.whole.theta.detach().clone(), engine.bytes_sent
        engine.load_state_dict(peer["rank"]["outer"])  # θ_g_peer and its outer state (no error feedback)
        engine.bytes_sent = sent_bytes  # this job's own count
        shift = engine.whole.theta.to(own.device) - own
        for tensors in (flight.live, flight.sent, flight.work):
            views = engine.layout.owned_views(tensors)
            for view, part in zip(views, shift.split([v.numel() for v in views])):
                view.add_(part.to(view.device, view.dtype))
        federation = peer.get("federation", {})
        self._checked_quorum = federation.get("checked_quorum")  # decide as the peers do
        self._peer_unit = federation.get("fragment")
        self._healed_now = self._late_kept = True
        self.healed_from_peer += 1
        self.healed_bytes += tensor_bytes(peer["rank"]["outer"])
        log.warning(f"local SGD: group {self.group_id} missed a sync of the other groups; it takes their θ_g and "
                    "keeps its own work, which weighs in at this sync (one sync stale)")

    def _training_thread_runs(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the training thread: at once when called there or while it waits in a quorum itself; else
        posted, and waited for (it runs at the training thread's next step end, at most ``sync_timeout``)."""
        if self._foreground or not self._off_training_thread():
            return fn()
        box: Future = Future()
        self._requests.put((fn, box))
        return box.result(timeout=self.timeout.total_seconds())

    def _serve(self) -> None:
        while True:
            try:
                fn, box = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                box.set_result(fn())
            except BaseException as err:  # handed to the background thread that asked
                box.set_exception(err)
