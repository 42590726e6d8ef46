"""How the syncs of the outermost level run, and the membership around them: the one object the controller talks
to about the transport (:class:`Syncs`), whichever carries it. :class:`DirectSyncs` in one world, a federation's across
jobs (:class:`~lightning_localsgd.federation.Federation`); :func:`make_syncs` picks it from the arguments.
:class:`HostFacts`: what a transport across jobs needs of the rank that runs the controller."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Protocol

from .config import LocalSGDConfig
from .engine import OuterSync, SyncResult
from .engine.comm import Communicator
from .engine.schedules import SyncSchedule
from .background import BackgroundFederation
from .federation import Federation

if TYPE_CHECKING:
    from .state import TrainingState

__all__ = ["DirectSyncs", "HostFacts", "Syncs", "make_syncs"]


@dataclass(frozen=True)
class HostFacts:
    """What a transport across jobs needs of the rank that runs the controller (its strategy and trainer), handed to
    :meth:`Syncs.start` explicitly, so that the transport holds no strategy."""

    rank: int
    """This rank's global rank in its job's own world."""
    world_size: int
    """The ranks of that world."""
    training_state: Callable[[], "TrainingState"]
    """This rank's exact training state (what healing sends to a joining peer, and loads from a live one)."""
    global_step: Callable[[], int] = lambda: 0
    """The trainer's optimizer steps (where training starts from, for the log)."""
    checkpoint_path: Callable[[], Optional[str]] = lambda: None
    """The checkpoint ``fit`` resumed from, if any (for the log)."""
    data_position: Callable[[], Optional[tuple[int, int]]] = lambda: None
    """Where the training loader is: ``(epoch, samples)`` of its epoch's order (:func:`~lightning_localsgd.data.
    data_position`), ``None`` without a resumable loader."""
    continue_data_at: Callable[[int, int], bool] = lambda epoch, samples: False
    """Make the training continue its data at ``(epoch, samples)`` (healing: the job's last committed position);
    False where it cannot (no resumable loader, or its epoch already iterating)."""


class Syncs(Protocol):
    """How the syncs of the outermost level run, and the membership around them: the one object the controller talks
    to about the transport, whichever carries it. A feature (compression, streaming, ...) is written once, against it.

    :class:`DirectSyncs` runs them over a fixed set of groups (one world: every attempt goes through, a failure is an
    error, the membership calls do nothing); :class:`~lightning_localsgd.federation.Federation` over torchft's quorums
    of jobs (each attempt one quorum and one commit vote, a failed attempt redone or dropped; a job joins, heals and
    leaves)."""

    across_jobs: bool
    """Whether the groups are separate jobs that meet at syncs (then :meth:`join` runs before the first step)."""

    def start(self, schedule: SyncSchedule, config: LocalSGDConfig, host: Optional[HostFacts]) -> Optional[Communicator]:
        """Before the engines are built: connect. Returns the communicator the outermost level crosses jobs over
        (``None``: the topology's own process groups)."""
        ...

    def join(self, engine: OuterSync) -> None:
        """Training starts: meet the running groups over ``engine`` (the outermost level), healing from one when they
        are ahead."""
        ...

    def start_round(self) -> None:
        """A warm-up step starts (across jobs: its quorum, which heals a joining group before its forward)."""
        ...

    def end_round(self, committed: bool) -> None:
        """The vote on a warm-up step's gradient mean was taken."""
        ...

    def inner_step(self) -> None:
        """This group took an inner step (it weighs in at its next sync)."""
        ...

    def start_sync(self, engine: OuterSync, fragment: Optional[int] = None, weight: Optional[float] = None,
                   stop: Optional[bool] = None) -> None:
        """Launch the sync of ``fragment`` (``None``: every parameter)."""
        ...

    def finish_sync(self, engine: OuterSync, fragment: Optional[int] = None, mix: float = 0.0) -> Optional[SyncResult]:
        """Apply it; ``None`` when the transport dropped it (θ_g and the parameters untouched)."""
        ...

    def sync(self, engine: OuterSync, weight: Optional[float] = None, stop: Optional[bool] = None) -> SyncResult:
        """A sync of every parameter, started and applied now."""
        ...

    def shutdown(self) -> None:
        """Training is over for good (the strategy's teardown): leave."""
        ...

    background: bool
    """Whether whole-model syncs run beside training (``async_sync``): the controller then starts them with
    :meth:`launch` and applies them with :meth:`poll` / :meth:`settle` instead of :meth:`sync`."""

    def launch(self, engine: OuterSync, weight: Optional[float] = None, stop: Optional[bool] = None) -> bool:
        """Start a sync of every parameter beside training; False when one is still in flight (nothing started)."""
        ...

    def poll(self, engine: OuterSync) -> Optional[SyncResult]:
        """At a step end: apply the sync that finished beside training, if one did (never waits)."""
        ...

    def settle(self, engine: OuterSync) -> Optional[SyncResult]:
        """Wait (bounded by ``sync_timeout``) for the sync in flight, if any, and apply it (checkpoints, the end)."""
        ...


class DirectSyncs:
    """:class:`Syncs` over a fixed set of groups (one world): every attempt goes through, a failure is an error, and
    there is no membership to manage."""

    across_jobs = False

    def start(self, schedule: SyncSchedule, config: LocalSGDConfig, host: Optional[HostFacts]) -> Optional[Communicator]:
        return None

    def join(self, engine: OuterSync) -> None:
        pass

    def start_round(self) -> None:
        pass

    def end_round(self, committed: bool) -> None:
        pass

    def inner_step(self) -> None:
        pass

    def start_sync(self, engine: OuterSync, fragment: Optional[int] = None, weight: Optional[float] = None,
                   stop: Optional[bool] = None) -> None:
        engine.start_sync(fragment, weight=weight, stop=stop)

    def finish_sync(self, engine: OuterSync, fragment: Optional[int] = None, mix: float = 0.0) -> Optional[SyncResult]:
        return engine.finish_sync(fragment, mix=mix)

    def sync(self, engine: OuterSync, weight: Optional[float] = None, stop: Optional[bool] = None) -> SyncResult:
        return engine.sync(weight=weight, stop=stop)

    def shutdown(self) -> None:
        pass

    background = False

    def launch(self, engine: OuterSync, weight: Optional[float] = None, stop: Optional[bool] = None) -> bool:
        raise NotImplementedError("DirectSyncs runs every sync on the training thread (async_sync is federated only)")

    def poll(self, engine: OuterSync) -> Optional[SyncResult]:
        return None

    def settle(self, engine: OuterSync) -> Optional[SyncResult]:
        return None


def make_syncs(config: LocalSGDConfig) -> Syncs:
    """The :class:`Syncs` the arguments ask for: with ``lighthouse`` a federation of jobs (torchft; with
    ``async_sync`` one whose syncs run beside training), else :class:`DirectSyncs`."""
    if config.lighthouse is None:
        return DirectSyncs()
    kind = BackgroundFederation if config.async_sync else Federation
    return kind(config.lighthouse, config.group_id, config.min_groups, config.sync_timeout, config.run_secret_file)
