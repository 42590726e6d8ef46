"""When to sync: warm-up, then every ``sync_every`` training steps.

Steps are *training steps that ran at least one optimizer step*: gradient accumulation does not change ``H`` and a
training step that steps two optimizers counts once.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class Action(Enum):
    NONE = "none"
    END_WARMUP = "end_warmup"
    SYNC = "sync"


class SyncSchedule:
    """Counts steps and says when to end the warm-up and when to sync.

    Args:
        sync_every: ``H``, inner steps between two syncs.
        warmup_steps: fully synchronous steps before local SGD starts.
    """

    def __init__(self, sync_every: int, warmup_steps: int = 0) -> None:
        self.sync_every = sync_every
        self.warmup_steps = warmup_steps
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
            return Action.SYNC
        return Action.NONE

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "steps_since_sync": self.steps_since_sync}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])
        self.steps_since_sync = int(state["steps_since_sync"])
