"""When to sync: schedules behind one protocol, in a registry (``sync_schedule="name"`` picks one).

A schedule counts *training steps that ran at least one optimizer step* (gradient accumulation does not change
``H``; a training step that steps two optimizers counts once). After each one, :meth:`SyncSchedule.step` says what
this step does (an :class:`Action`) and :meth:`SyncSchedule.communicates_next` whether the next step crosses worker
groups. Only the schedule writes its counters; the controller tells it about syncs it ran itself (:meth:`synced`).

Every schedule starts with ``warmup_steps`` fully synchronous steps (post-local SGD), then:

* ``"periodic"``: a sync every ``sync_every`` steps;
* ``"two_stage"``: that sync inside each cluster, and every ``cluster_sync_every`` steps one across clusters too;
* ``"streaming"``: fragment ``f`` starts its sync at local step ``t ≡ (f+1)·H/F (mod H)``, applied ``τ`` steps later;
* ``"time_based"``: a sync at the first step end ``sync_every_seconds`` after the last one, token-weighted;
* ``"time_based_streaming"``: time-based with ``fragments``: one fragment's sync every ``sync_every_seconds/F``
  seconds, the fragments in turn, each weighted by the tokens since that fragment's last sync.

Add one by subclassing :class:`SyncSchedule` and calling :func:`register_schedule`; ``sync_schedule="name"`` picks it.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Any, Callable, Optional, Sequence

from .fragment import FragmentTokens

__all__ = ["Action", "PeriodicSchedule", "StreamingSchedule", "SyncSchedule", "TimeBasedSchedule",
           "TimeBasedStreamingSchedule", "TwoStageSchedule", "build_schedule", "register_schedule", "schedule_names"]


class Action(Enum):
    NONE = "none"
    END_WARMUP = "end_warmup"
    """The warm-up is over: every group holds the same parameters; take them as θ_g."""
    SYNC = "sync"
    """A sync of every parameter (inside each cluster, with two-stage sync)."""
    SYNC_ALL = "sync_all"
    """Two-stage sync: the level-1 sync inside each cluster, then the level-2 sync across clusters."""
    STREAM = "stream"
    """Streaming sync: start the syncs of :attr:`SyncSchedule.starting`, apply those of :attr:`SyncSchedule.finishing`."""
    TIMED_SYNC = "timed_sync"
    """A sync weighted by :attr:`SyncSchedule.tokens_since_sync` (time-based)."""


class SyncSchedule:
    """The protocol, with the warm-up and a sync every ``sync_every`` local steps.

    Subclasses override :meth:`local_step` (what a step after the warm-up does) and, when they keep more counters,
    :meth:`state_dict` / :meth:`load_state_dict`.

    Args:
        sync_every: ``H``, local steps between two syncs.
        warmup_steps: fully synchronous steps before local SGD starts.
    """

    lockstep = True
    """Every group takes the same steps between syncs (a time-based schedule does not)."""
    counts_tokens = False
    """:meth:`record_tokens` matters (only the time-based schedule weighs groups by tokens)."""
    streaming = False
    """Fragments sync on staggered steps (:attr:`starting` / :attr:`finishing` say which)."""

    def __init__(self, sync_every: int, warmup_steps: int = 0) -> None:
        self.sync_every = sync_every
        self.warmup_steps = warmup_steps
        self.steps_done = 0
        """Training steps completed since the start of training (warm-up included)."""
        self.steps_since_sync = 0
        """Local steps since the last sync (or the end of the warm-up): the position inside the interval."""
        self.tokens_since_sync = 0
        self.starting: list[int] = []
        self.finishing: list[int] = []

    @property
    def in_warmup(self) -> bool:
        """True while the *next* step is a fully synchronous warm-up step."""
        return self.steps_done < self.warmup_steps

    @property
    def local_steps(self) -> int:
        """Steps since the end of the warm-up."""
        return max(0, self.steps_done - self.warmup_steps)

    def start(self) -> None:
        """Training (re)starts now."""

    def record_tokens(self, tokens: int) -> None:
        self.tokens_since_sync += tokens

    def step(self) -> Action:
        """Record one completed training step and return what to do now."""
        warm = self.in_warmup
        self.steps_done += 1
        if warm:
            if self.steps_done == self.warmup_steps:
                self.synced()
                return Action.END_WARMUP
            return Action.NONE
        return self.local_step()

    def local_step(self) -> Action:
        """A step after the warm-up: a sync every ``sync_every`` steps."""
        self.steps_since_sync += 1
        if self.steps_since_sync >= self.sync_every:
            self.steps_since_sync = 0
            return Action.SYNC
        return Action.NONE

    def communicates_next(self) -> bool:
        """Whether the next step crosses worker groups (a warm-up step or one that ends in a sync)."""
        return self.in_warmup or self.steps_since_sync + 1 >= self.sync_every

    def needs_final_sync(self) -> bool:
        """At the end of training: whether the groups hold parameters not synced yet."""
        return not self.in_warmup and self.steps_since_sync > 0

    def synced(self) -> None:
        """A sync of every parameter ran (at the end of training, or by the clock): a new interval starts."""
        self.steps_since_sync = 0
        self.tokens_since_sync = 0

    def fragment_weight(self, fragment: int) -> Optional[float]:
        """The weight of this group in the sync of ``fragment`` that starts now (``None``: every group weighs 1)."""
        return None

    def fragment_applied(self, fragment: Optional[int], applied: bool = True) -> None:
        """The sync of ``fragment`` ended at this step end: applied, or (``applied=False``) dropped by the transport."""

    def bind_fragments(self, fragments: Sequence[FragmentTokens]) -> None:
        """Keep what this schedule counts per fragment in the engine's fragments (``OuterSync.fragments``, in order),
        taking over the counts so far."""

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "steps_since_sync": self.steps_since_sync}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])
        self.steps_since_sync = int(state["steps_since_sync"])
        self.tokens_since_sync = int(state.get("tokens_since_sync", 0))


class PeriodicSchedule(SyncSchedule):
    """A sync every ``sync_every`` steps after the warm-up."""


class TwoStageSchedule(SyncSchedule):
    """A sync inside each cluster every ``sync_every`` steps, across clusters every ``cluster_sync_every`` steps."""

    def __init__(self, sync_every: int, warmup_steps: int = 0, cluster_sync_every: Optional[int] = None) -> None:
        super().__init__(sync_every, warmup_steps)
        self.cluster_sync_every = cluster_sync_every if cluster_sync_every is not None else sync_every
        self.syncs_since_cluster_sync = 0
        """Level-1 syncs since the last sync across clusters."""

    def local_step(self) -> Action:
        if super().local_step() is Action.NONE:
            return Action.NONE
        self.syncs_since_cluster_sync += 1
        if self.syncs_since_cluster_sync * self.sync_every >= self.cluster_sync_every:
            self.syncs_since_cluster_sync = 0
            return Action.SYNC_ALL
        return Action.SYNC

    def needs_final_sync(self) -> bool:
        return super().needs_final_sync() or (not self.in_warmup and self.syncs_since_cluster_sync > 0)

    def synced(self) -> None:
        super().synced()
        self.syncs_since_cluster_sync = 0

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "syncs_since_cluster_sync": self.syncs_since_cluster_sync}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.syncs_since_cluster_sync = int(state.get("syncs_since_cluster_sync", 0))


class StreamingSchedule(SyncSchedule):
    """Streaming sync: ``fragments`` F staggered by ``H/F`` steps, each applied ``overlap_steps`` τ after it starts.

    Fragment F−1 syncs at multiples of ``H`` as in plain local SGD; a step moves at most about 1/F of the model.
    """

    streaming = True

    def __init__(self, sync_every: int, warmup_steps: int = 0, fragments: int = 1, overlap_steps: int = 0) -> None:
        super().__init__(sync_every, warmup_steps)
        self.fragments = fragments
        self.overlap_steps = overlap_steps

    def fragment_offset(self, fragment: int) -> int:
        """The first local step at which ``fragment`` starts a sync: ``(f+1)·H/F``."""
        return (fragment + 1) * self.sync_every // self.fragments

    def _starts_at(self, t: int) -> list[int]:
        return [f for f in range(self.fragments)
                if t >= self.fragment_offset(f) and (t - self.fragment_offset(f)) % self.sync_every == 0]

    def local_step(self) -> Action:
        t = self.local_steps
        self.steps_since_sync = t % self.sync_every
        self.starting = self._starts_at(t)
        self.finishing = self._starts_at(t - self.overlap_steps) if t > self.overlap_steps else []
        return Action.STREAM if self.starting or self.finishing else Action.NONE

    def needs_final_sync(self) -> bool:
        return not self.in_warmup and self.local_steps > 0


class TimeBasedSchedule(SyncSchedule):
    """A sync at the first step end ``sync_every_seconds`` after the last one; groups weigh in by their tokens.

    The ranks of a worker group must enter the sync at the same step: :attr:`agree` (set by the controller) makes
    them agree on "time is up" (any rank's clock decides).
    """

    lockstep = False
    counts_tokens = True

    def __init__(self, sync_every_seconds: float, warmup_steps: int = 0, sync_every: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(sync_every, warmup_steps)
        self.sync_every_seconds = float(sync_every_seconds)
        self.clock = clock
        self.agree: Callable[[bool], bool] = lambda due: due
        self.interval_started = clock()

    def start(self) -> None:
        self.interval_started = self.clock()

    def local_step(self) -> Action:
        self.steps_since_sync += 1
        due = self.clock() - self.interval_started >= self.interval_seconds
        return Action.TIMED_SYNC if self.agree(due) else Action.NONE

    def communicates_next(self) -> bool:
        return self.in_warmup

    @property
    def interval_seconds(self) -> float:
        """Seconds from the start of an interval (the last sync) to the next sync."""
        return self.sync_every_seconds

    def seconds_until_due(self) -> float:
        """Seconds until this interval's sync is due (0 when it is): when the other groups, whose clocks restarted at
        the same sync, enter their next one."""
        return max(0.0, self.interval_started + self.interval_seconds - self.clock())

    def synced(self) -> None:
        super().synced()
        self.interval_started = self.clock()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tokens_since_sync": self.tokens_since_sync}


class TimeBasedStreamingSchedule(TimeBasedSchedule):
    """Time-based streaming sync: one fragment's sync every ``sync_every_seconds / fragments`` seconds, the fragments in
    turn (0, 1, …, F−1, 0, …), so each fragment syncs about every ``sync_every_seconds`` and a sync moves about 1/F of
    the model. Each group enters a fragment's sync at its first step end after that time, weighted by the tokens it
    processed since that fragment's last sync; with ``overlap_steps`` τ the sync is applied τ of the group's own steps
    later (the fast groups' communication runs behind their steps while the slow ones arrive).

    One fragment is in flight at a time, and the clock of the next one starts when it is applied: that is the moment
    every group knows all the others entered the sync, so the groups' clocks cannot drift apart over many syncs (a
    group's clock restarted at its own start would run ahead of a slower group's by up to one slow step per sync).
    The interval between two fragment syncs is therefore ``sync_every_seconds/F`` plus τ steps.

    Training ends as with time-based sync: a group that finishes (or is asked to stop) sends a stop flag with the next
    fragment's sync, and every group then syncs each fragment once more with its own weight, so all end on one model.
    """

    streaming = True

    def __init__(self, sync_every_seconds: float, warmup_steps: int = 0, fragments: int = 1, overlap_steps: int = 0,
                 sync_every: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(sync_every_seconds, warmup_steps, sync_every, clock)
        self.fragments = fragments
        self.overlap_steps = overlap_steps
        self.next_fragment = 0
        """The fragment whose sync starts next."""
        self.in_flight: Optional[int] = None
        """The fragment whose sync started and is not applied yet (overlap)."""
        self.steps_in_flight = 0
        self._fragments = [FragmentTokens() for _ in range(fragments)]
        """Each fragment's tokens and in-flight weight (the engine's fragments once bound: :meth:`bind_fragments`)."""

    def bind_fragments(self, fragments: Sequence[FragmentTokens]) -> None:
        if len(fragments) != self.fragments:
            raise ValueError(f"bind_fragments: the schedule has {self.fragments} fragments, the engine "
                             f"{len(fragments)}.")
        for mine, theirs in zip(self._fragments, fragments):
            theirs.tokens, theirs.weight_in_flight = mine.tokens, mine.weight_in_flight
        self._fragments = list(fragments)

    @property
    def fragment_tokens(self) -> list[int]:
        """Tokens this group processed since each fragment's last sync started."""
        return [f.tokens for f in self._fragments]

    @property
    def interval_seconds(self) -> float:
        """Seconds between one fragment's sync being applied and the next fragment's sync."""
        return self.sync_every_seconds / self.fragments

    def record_tokens(self, tokens: int) -> None:
        super().record_tokens(tokens)
        for f in self._fragments:
            f.tokens += tokens

    def local_step(self) -> Action:
        self.steps_since_sync += 1
        self.starting, self.finishing = [], []
        if self.in_flight is not None:  # the fragment in flight is applied after τ of this group's steps
            self.steps_in_flight += 1
            if self.steps_in_flight >= self.overlap_steps:
                self.finishing = [self.in_flight]
                self.in_flight = None
            return Action.STREAM if self.finishing else Action.NONE
        if self.agree(self.clock() - self.interval_started >= self.interval_seconds):
            self.starting = [self.start_next()]
            if self.overlap_steps == 0:
                self.finishing = list(self.starting)
            else:
                self.in_flight, self.steps_in_flight = self.starting[0], 0
            return Action.STREAM
        return Action.NONE

    def start_next(self) -> int:
        """The next fragment's sync starts now: return it (its weight: :meth:`fragment_weight`)."""
        f = self.next_fragment
        self.next_fragment = (f + 1) % self.fragments
        for other in self._fragments:
            other.weight_in_flight = None
        started = self._fragments[f]
        started.weight_in_flight, started.tokens = float(started.tokens), 0
        return f

    def fragment_weight(self, fragment: int) -> Optional[float]:
        f = self._fragments[fragment]
        return f.weight_in_flight if f.weight_in_flight is not None else float(f.tokens)

    def fragment_applied(self, fragment: Optional[int], applied: bool = True) -> None:
        self.interval_started = self.clock()  # every group has entered this sync: the next fragment's clock starts
        self.steps_since_sync = self.tokens_since_sync = 0
        if fragment is None:
            return
        f = self._fragments[fragment]
        weight, f.weight_in_flight = f.weight_in_flight or 0.0, None
        if not applied:  # a dropped sync: its tokens count at the fragment's next one
            f.tokens += int(weight)

    def final_fragments(self) -> list[int]:
        """At the end of training, once every group knows it ends: each fragment once more, in order, with the tokens
        since its last sync (the fragments' local progress since then, so that every group ends on one model)."""
        self.in_flight = None
        for f in self._fragments:
            f.weight_in_flight = None
        return list(range(self.fragments))

    def synced(self) -> None:
        super().synced()
        for f in self._fragments:
            f.tokens = 0

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "next_fragment": self.next_fragment, "in_flight": self.in_flight,
                "steps_in_flight": self.steps_in_flight, "fragment_tokens": self.fragment_tokens,
                "in_flight_weights": {i: f.weight_in_flight for i, f in enumerate(self._fragments)
                                      if f.weight_in_flight is not None}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.next_fragment = int(state.get("next_fragment", 0))
        self.in_flight = state.get("in_flight")
        self.steps_in_flight = int(state.get("steps_in_flight", 0))
        weights = {int(f): float(w) for f, w in state.get("in_flight_weights", {}).items()}
        for i, (f, tokens) in enumerate(zip(self._fragments, state.get("fragment_tokens", [0] * self.fragments))):
            f.tokens, f.weight_in_flight = int(tokens), weights.get(i)


ScheduleFactory = Callable[[Any], SyncSchedule]
"""``config -> SyncSchedule``: builds a schedule from the strategy's arguments (a ``LocalSGDConfig``)."""

_SCHEDULES: dict[str, ScheduleFactory] = {
    "periodic": lambda c: PeriodicSchedule(c.sync_every, c.warmup_steps),
    "two_stage": lambda c: TwoStageSchedule(c.sync_every, c.warmup_steps, c.cluster_sync_every),
    "streaming": lambda c: StreamingSchedule(c.sync_every, c.warmup_steps, c.fragments, c.overlap_steps),
    "time_based": lambda c: TimeBasedSchedule(c.sync_every_seconds, c.warmup_steps, c.sync_every),
    "time_based_streaming": lambda c: TimeBasedStreamingSchedule(c.sync_every_seconds, c.warmup_steps, c.fragments,
                                                                 c.overlap_steps, c.sync_every),
}


def register_schedule(name: str, factory: ScheduleFactory, override: bool = False) -> None:
    """Make ``sync_schedule=name`` build the schedule with ``factory(config)`` (config: the strategy's arguments).

    Raises:
        ValueError: the name is taken (pass ``override=True``) or the factory is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_schedule: the name must be a non-empty string, got {name!r}.")
    if not callable(factory):
        raise ValueError(f"register_schedule({name!r}): the factory must be a callable `config -> SyncSchedule`.")
    if name in _SCHEDULES and not override:
        raise ValueError(f"register_schedule: a schedule named {name!r} exists already; pass override=True.")
    _SCHEDULES[name] = factory


def schedule_names() -> tuple[str, ...]:
    return tuple(_SCHEDULES)


def build_schedule(name: str, config: Any) -> SyncSchedule:
    """The schedule registered as ``name``, built from ``config``."""
    if name not in _SCHEDULES:
        raise ValueError(f"sync_schedule={name!r} is not a known schedule. Use one of {schedule_names()} or None (chosen "
                         "from the arguments); add one with lightning_localsgd.register_schedule.")
    schedule = _SCHEDULES[name](config)
    if not isinstance(schedule, SyncSchedule):
        raise ValueError(f"sync_schedule={name!r}: its factory returned {type(schedule).__name__}, not a SyncSchedule.")
    return schedule
