"""When to sync: warm-up, then every ``sync_every`` training steps.

Steps are *training steps that ran at least one optimizer step*: gradient accumulation does not change ``H`` and a
training step that steps two optimizers counts once.

Streaming sync (``fragments`` F, ``overlap_steps`` τ): after the warm-up, at local step ``t`` (1, 2, ...) fragment
``f`` starts its sync when ``t ≡ (f+1)·H/F (mod H)`` and that sync is applied at step ``t + τ``. Fragment F−1 syncs
at multiples of ``H`` as in plain local SGD; the others are staggered by ``H/F`` steps, so a step moves at most about
1/F of the model across groups. Time-based sync (``sync_every_seconds``) is decided by the strategy from the clock.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Optional


class Action(Enum):
    NONE = "none"
    END_WARMUP = "end_warmup"
    SYNC = "sync"
    SYNC_ALL = "sync_all"
    """Two-stage sync: the level-1 sync inside each cluster, then the level-2 sync across clusters."""
    STREAM = "stream"
    """Streaming sync: start the syncs of :attr:`SyncSchedule.starting`, apply those of :attr:`SyncSchedule.finishing`."""


class SyncSchedule:
    """Counts steps and says when to end the warm-up and when to sync.

    Args:
        sync_every: ``H``, inner steps between two syncs (``H1``, inside a cluster, with two-stage sync).
        warmup_steps: fully synchronous steps before local SGD starts.
        cluster_sync_every: ``H2``, steps between two syncs across clusters (a multiple of ``sync_every``), or
            ``None`` for one level.
        fragments: streaming sync: the number of fragments (``sync_every`` must be a multiple of it).
        overlap_steps: streaming sync: ``τ``, steps between the start of a fragment's sync and its application.
        time_based: the strategy decides when to sync (``sync_every_seconds``); :meth:`step` never says SYNC.
    """

    def __init__(self, sync_every: int, warmup_steps: int = 0, cluster_sync_every: Optional[int] = None,
                 fragments: int = 1, overlap_steps: int = 0, time_based: bool = False) -> None:
        self.sync_every = sync_every
        self.time_based = time_based
        """Time-based sync: the strategy syncs by the clock; after the warm-up this schedule only counts steps."""
        self.fragments = fragments
        self.overlap_steps = overlap_steps
        self.streaming = fragments > 1 or overlap_steps > 0
        self.starting: list[int] = []
        """Streaming: fragments whose sync starts at the step just recorded."""
        self.finishing: list[int] = []
        """Streaming: fragments whose sync is applied at the step just recorded."""
        self.warmup_steps = warmup_steps
        self.cluster_sync_every = cluster_sync_every
        self.syncs_since_cluster_sync = 0
        """Level-1 syncs since the last sync across clusters."""
        self.steps_done = 0
        """Training steps completed since the start of training (warm-up included)."""
        self.steps_since_sync = 0
        """Local steps since the last sync (or the end of the warm-up): the position inside the interval."""

    @property
    def in_warmup(self) -> bool:
        """True while the *next* step is a fully synchronous warm-up step."""
        return self.steps_done < self.warmup_steps

    @property
    def local_steps(self) -> int:
        """Steps since the end of the warm-up."""
        return max(0, self.steps_done - self.warmup_steps)

    def fragment_offset(self, fragment: int) -> int:
        """The first local step at which ``fragment`` starts a sync: ``(f+1)·H/F``."""
        return (fragment + 1) * self.sync_every // self.fragments

    def _starts_at(self, t: int) -> list[int]:
        return [f for f in range(self.fragments)
                if t >= self.fragment_offset(f) and (t - self.fragment_offset(f)) % self.sync_every == 0]

    def step(self) -> Action:
        """Record one completed training step and return what to do now."""
        warm = self.in_warmup
        self.steps_done += 1
        if warm:
            return Action.END_WARMUP if self.steps_done == self.warmup_steps else Action.NONE
        if self.time_based:
            self.steps_since_sync += 1
            return Action.NONE
        if self.streaming:
            t = self.local_steps
            self.steps_since_sync = t % self.sync_every
            self.starting = self._starts_at(t)
            self.finishing = self._starts_at(t - self.overlap_steps) if t > self.overlap_steps else []
            return Action.STREAM if self.starting or self.finishing else Action.NONE
        self.steps_since_sync += 1
        if self.steps_since_sync >= self.sync_every:
            self.steps_since_sync = 0
            if self.cluster_sync_every is not None:
                self.syncs_since_cluster_sync += 1
                if self.syncs_since_cluster_sync * self.sync_every >= self.cluster_sync_every:
                    self.syncs_since_cluster_sync = 0
                    return Action.SYNC_ALL
            return Action.SYNC
        return Action.NONE

    def state_dict(self) -> dict[str, Any]:
        state = {"steps_done": self.steps_done, "steps_since_sync": self.steps_since_sync}
        if self.cluster_sync_every is not None:
            state["syncs_since_cluster_sync"] = self.syncs_since_cluster_sync
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])
        self.steps_since_sync = int(state["steps_since_sync"])
        self.syncs_since_cluster_sync = int(state.get("syncs_since_cluster_sync", 0))
