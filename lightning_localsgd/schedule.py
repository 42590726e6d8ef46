"""When to sync: warm-up, then every ``sync_every`` training steps.

Steps are *training steps that ran at least one optimizer step*: gradient accumulation does not change ``H`` and a
training step that steps two optimizers counts once.
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


class SyncSchedule:
    """Counts steps and says when to end the warm-up and when to sync.

    Args:
        sync_every: ``H``, inner steps between two syncs (``H1``, inside a cluster, with two-stage sync).
        warmup_steps: fully synchronous steps before local SGD starts.
        cluster_sync_every: ``H2``, steps between two syncs across clusters (a multiple of ``sync_every``), or
            ``None`` for one level.
    """

    def __init__(self, sync_every: int, warmup_steps: int = 0, cluster_sync_every: Optional[int] = None) -> None:
        self.sync_every = sync_every
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

    def step(self) -> Action:
        """Record one completed training step and return what to do now."""
        warm = self.in_warmup
        self.steps_done += 1
        if warm:
            return Action.END_WARMUP if self.steps_done == self.warmup_steps else Action.NONE
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
