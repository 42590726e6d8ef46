"""Who reads which part of one dataset shared by federated jobs (``data_jobs``), when jobs leave for good and return.

Framework-free: positions, shares and the replicated record only; the sampler (:mod:`lightning_localsgd.data`) turns
them into sample indices, the federation (:mod:`lightning_localsgd.federation`) feeds the record every committed
sync's positions.

**Shares.** Epoch ``e``'s order (a permutation of the ``size`` samples) is read by ``jobs × replicas`` replicas; job
``j`` owns the order's positions ``p`` with ``(p % (jobs × replicas)) // replicas == j`` (its stripe). A job's data
position is ``(epoch, samples)``: up to ``size``, samples of the epoch's order read by every replica together (the
stripes advance together); beyond ``size``, ``size`` + the *extra* samples of that epoch the job's ranks read after
their stripe (the parts of departed jobs' data granted to it, below).

**A job that leaves for good.** :class:`DataShares` counts committed syncs. A job that took part in none of the last
``rebalance_after`` committed syncs (every member decides alike: the count is in the replicated record, no clocks) has
left: its unread data is split between the jobs that weighed in at that sync (the *recipients*). Per epoch ``e`` from
the departed job's recorded epoch on, its unread part (its stripe from its recorded position in that epoch, from the
start in later epochs, then its own unread extras) is cut into contiguous chunks, one per recipient in
``data_job_index`` order; a recipient reads its chunk of epoch ``e`` as extras of its epoch ``max(e, E)``, ``E`` its
first epoch not begun at the decision (so an epoch it is inside does not change length). Every sample of every epoch is
read by exactly one job: nothing is lost with the departed job, nothing read twice.

**A job that comes back** (it takes part in a committed sync again, healed from a peer) gets a fresh share, never its
old position: its stripe is its own again from epoch ``R`` on, the first epoch no job has begun (every recipient keeps
its chunks of the epochs before ``R``), and the job continues its data at ``(R, 0)``.

**Summary.** Per job, samples contributed (read before a committed sync it weighed in at) and samples read again
after a failure (read, then dropped with the job's work when it healed, as a job that heals mid-interval reports).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["DataShares", "Departure", "next_epoch"]

Position = tuple[int, int]
#: A sample of some epoch's order: ``(epoch, position in that epoch's order)``.
Sample = tuple[int, int]


def next_epoch(position: Position) -> int:
    """The first epoch a job at ``position`` has not begun (its own epoch when it read nothing of it yet)."""
    epoch, samples = position
    return epoch if samples == 0 else epoch + 1


def _chunk(items: list[Sample], part: int, parts: int) -> list[Sample]:
    """The ``part``-th of ``parts`` contiguous chunks of ``items`` (sizes differ by at most one)."""
    n = len(items)
    return items[part * n // parts:(part + 1) * n // parts]


@dataclass
class Departure:
    """A job that left for good and where its data went (part of the replicated record)."""

    job: int
    """Its ``data_job_index``."""
    position: Position
    """Its data position at its last committed sync: what it read is contributed, the rest is granted."""
    recipients: list[int]
    """The jobs its unread data is split between, in ``data_job_index`` order."""
    first_epochs: dict[int, int]
    """Per recipient, the first epoch it had not begun at the decision: it reads the chunks of earlier epochs there."""
    at_sync: int
    """The committed sync (:attr:`DataShares.commits`) that decided it."""
    returned_at: Optional[int] = None
    """The epoch from which the job reads its stripe again, once it came back (``None``: still away)."""

    def as_dict(self) -> dict[str, Any]:
        return {"job": self.job, "position": list(self.position), "recipients": list(self.recipients),
                "first_epochs": dict(self.first_epochs), "at_sync": self.at_sync, "returned_at": self.returned_at}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Departure":
        return cls(int(d["job"]), (int(d["position"][0]), int(d["position"][1])), [int(r) for r in d["recipients"]],
                   {int(k): int(v) for k, v in d["first_epochs"].items()}, int(d["at_sync"]),
                   None if d.get("returned_at") is None else int(d["returned_at"]))


@dataclass
class DataShares:
    """The replicated record of the jobs' data (the same on every member: updated by committed syncs only, sent with
    healing state and checkpoints), and the shares it implies.

    Args:
        jobs: ``data_jobs``.
        rebalance_after: ``data_rebalance_after``: committed syncs without a job before its data is split between the
            others (``None``: never).
    """

    jobs: int
    rebalance_after: Optional[int] = None
    commits: int = 0
    """Committed syncs recorded."""
    positions: dict[int, Position] = field(default_factory=dict)
    """Each job's data position at its last committed sync."""
    seen: dict[int, int] = field(default_factory=dict)
    """Each job's last committed sync it took part in (:attr:`commits` then): a job missing from
    ``rebalance_after`` of them has left."""
    departures: list[Departure] = field(default_factory=list)
    contributed: dict[int, int] = field(default_factory=dict)
    """Samples each job read before a committed sync it weighed in at."""
    reread: dict[int, int] = field(default_factory=dict)
    """Samples each job read, lost with its work when it healed, and read again."""
    # set by the sampler (the dataset's facts, the same for every job): the shares are computed from them
    size: Optional[int] = None
    replicas: int = 1
    _cache: dict[tuple[int, int, int], list[Sample]] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ the record
    def state_dict(self) -> dict[str, Any]:
        """The replicated record (plain Python: checkpoints and healing state carry it)."""
        return {"commits": self.commits, "positions": {j: list(p) for j, p in self.positions.items()},
                "seen": dict(self.seen), "departures": [d.as_dict() for d in self.departures],
                "contributed": dict(self.contributed), "reread": dict(self.reread)}

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """Take a peer's (healing) or a checkpoint's record; ``None`` (a checkpoint written before the record was
        kept) leaves this one as it is."""
        if state is None:
            return
        self.commits = int(state.get("commits", 0))
        self.positions = {int(j): (int(p[0]), int(p[1])) for j, p in state.get("positions", {}).items()}
        self.seen = {int(j): int(c) for j, c in state.get("seen", {}).items()}
        self.departures = [Departure.from_dict(d) for d in state.get("departures", [])]
        self.contributed = {int(j): int(n) for j, n in state.get("contributed", {}).items()}
        self.reread = {int(j): int(n) for j, n in state.get("reread", {}).items()}
        self._cache.clear()

    def attach(self, size: int, replicas: int) -> None:
        """The dataset's length and the replicas of each job (the sampler's facts)."""
        if (size, replicas) != (self.size, self.replicas):
            self.size, self.replicas = size, replicas
            self._cache.clear()

    def away(self, job: int) -> Optional[Departure]:
        """The departure of ``job`` if it is away now."""
        return next((d for d in self.departures if d.job == job and d.returned_at is None), None)

    def commit(self, rows: list[tuple[int, int, int, bool, int]]) -> list[str]:
        """A sync committed; ``rows``: ``(job, epoch, samples, weighs, lost)`` of each job of its quorum (``lost``:
        samples the job read again after healing, reported once). Returns what to log: departures and returns."""
        self.commits += 1
        events: list[str] = []
        for job, epoch, samples, weighs, lost in rows:
            if lost:
                self.reread[job] = self.reread.get(job, 0) + lost
            if self.away(job) is not None or epoch < 0:
                continue
            old = self.positions.get(job)
            if weighs and old is not None and self.size is not None:
                self.contributed[job] = self.contributed.get(job, 0) + max(0, self.between(job, old, (epoch, samples)))
            if weighs or old is None:  # a job's first quorum: where its contributions start
                self.positions[job] = (epoch, samples)
            self.seen[job] = self.commits
        weighing = sorted(job for job, _, _, weighs, _ in rows if weighs)
        present = {job for job, *_ in rows}
        for job in sorted(present):
            departure = self.away(job)
            if departure is not None:
                events.append(self._come_back(departure))
        if self.rebalance_after is not None and weighing:
            for job in range(self.jobs):
                if (job not in weighing and self.away(job) is None
                        and self.commits - self.seen.get(job, 0) >= self.rebalance_after):
                    events.append(self._leave(job, weighing))
        return events

    def _leave(self, job: int, recipients: list[int]) -> str:
        position = self.positions.get(job, (0, 0))
        firsts = {r: next_epoch(self.positions[r]) for r in recipients}
        departure = Departure(job, position, list(recipients), firsts, self.commits)
        unread = len(self.unread(job, position[0], position[1], len(self.departures))) if self.size else 0
        self.departures.append(departure)
        self._cache.clear()
        n = len(recipients)
        parts = ", ".join(f"job {r}: {(i + 1) * unread // n - i * unread // n}" for i, r in enumerate(recipients))
        return (f"local SGD: data job {job} took part in none of the last {self.commits - self.seen.get(job, 0)} "
                f"committed syncs (data_rebalance_after={self.rebalance_after}): it left for good; the {unread} "
                f"samples of its share of epoch {position[0]} it had not read (from sample {position[1]}) go to "
                f"{parts}, and its share of every later epoch is split the same way")

    def _come_back(self, departure: Departure) -> str:
        others = [p for j, p in self.positions.items() if j != departure.job and self.away(j) is None]
        departure.returned_at = max([next_epoch(p) for p in others] + [next_epoch(departure.position)])
        self.positions[departure.job] = (departure.returned_at, 0)
        self.seen[departure.job] = self.commits
        self._cache.clear()
        return (f"local SGD: data job {departure.job} is back: its share was given away, so it gets a fresh one: its "
                f"stripe of epoch {departure.returned_at} on (jobs {departure.recipients} keep the parts of earlier "
                "epochs they were given)")

    # ------------------------------------------------------------------ the shares
    def _own(self, job: int, epoch: int, start: int) -> list[Sample]:
        assert self.size is not None
        total = self.jobs * self.replicas
        first = job * self.replicas
        return [(epoch, p) for p in range(start, self.size) if first <= p % total < first + self.replicas]

    def _own_count(self, job: int, below: int) -> int:
        """How many positions of ``job``'s stripe lie below ``below``."""
        total = self.jobs * self.replicas
        below = max(0, min(below, self.size or 0))
        rest = below % total - job * self.replicas
        return below // total * self.replicas + max(0, min(rest, self.replicas))

    def extras(self, job: int, epoch: int, upto: Optional[int] = None) -> list[Sample]:
        """The departed jobs' samples ``job`` reads in ``epoch`` after its stripe, in reading order (the departures
        decided before the ``upto``-th; all by default)."""
        upto = len(self.departures) if upto is None else upto
        key = (job, epoch, upto)
        if key not in self._cache:
            out: list[Sample] = []
            for i, d in enumerate(self.departures[:upto]):
                if job not in d.recipients:
                    continue
                first = d.first_epochs[job]
                sources = range(d.position[0], epoch + 1) if epoch == first else [epoch] if epoch > first else []
                for source in sources:
                    if source < d.position[0] or (d.returned_at is not None and source >= d.returned_at):
                        continue
                    start = d.position[1] if source == d.position[0] else 0
                    out += _chunk(self.unread(d.job, source, start, i), d.recipients.index(job), len(d.recipients))
            self._cache[key] = out
        return self._cache[key]

    def unread(self, job: int, epoch: int, samples: int, upto: int) -> list[Sample]:
        """What ``job`` had left of ``epoch`` from position ``samples``: its stripe, then its extras (the departures
        before the ``upto``-th)."""
        assert self.size is not None
        own = self._own(job, epoch, min(samples, self.size))
        return own + self.extras(job, epoch, upto)[max(0, samples - self.size):]

    def epoch_samples(self, job: int, epoch: int) -> int:
        """The samples ``job`` reads in ``epoch``: its stripe and its extras."""
        return self._own_count(job, self.size or 0) + len(self.extras(job, epoch))

    def read_before(self, job: int, position: Position) -> int:
        """The samples ``job`` read of its epoch before ``position``."""
        return self._own_count(job, position[1]) + max(0, position[1] - (self.size or 0))

    def between(self, job: int, start: Position, end: Position) -> int:
        """The samples ``job`` reads from ``start`` to ``end`` (negative when ``end`` comes first)."""
        if end < start:
            return -self.between(job, end, start)
        count = -self.read_before(job, start) + self.read_before(job, end)
        for epoch in range(start[0], end[0]):
            count += self.epoch_samples(job, epoch)
        return count

    def summary(self) -> dict[int, dict[str, int]]:
        """Per job: ``{"contributed", "reread"}`` samples (see the module docstring)."""
        return {job: {"contributed": self.contributed.get(job, 0), "reread": self.reread.get(job, 0)}
                for job in range(self.jobs)}
