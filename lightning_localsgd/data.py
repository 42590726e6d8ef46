"""Exact data position through resumes: the sampler and data loader every local-SGD strategy gives a training loader.

Lightning restores the step and batch counters from a checkpoint, but a plain ``DataLoader`` starts its epoch again
from the first batch: a fit resumed mid-epoch reads the epoch's first batches twice and never reaches its last ones.
A local-SGD strategy turns the training loader of ``fit`` into a :class:`ResumableDataLoader` (same class of loader,
same arguments; the user changes nothing) whose position Lightning itself saves and restores: Lightning keeps the
``state_dict()`` of every training loader that has one in the checkpoint's loop state and hands it back to
``load_state_dict`` before the resumed epoch's first batch.

A map-style dataset's sampler becomes a :class:`ResumableSampler`: the order of an epoch is Lightning's
``DistributedSampler`` order (a permutation drawn from ``seed + epoch``, or the dataset's order unshuffled), cut into
one share per replica, and its position is a number of samples of that order: the samples every replica together
read in the epoch so far. A resumed epoch continues at that position, on any number of replicas (elastic resume):
the samples of the epoch not yet read are read once, split over the new replicas.

Federated jobs sharing one dataset (``data_jobs``) are replicas of one such order, ``data_jobs`` × each job's ranks;
when a job leaves for good, the others read its unread samples after their own share
(:mod:`~lightning_localsgd.data_shares` says which): their epoch is that much longer, and the position goes on past
the dataset's length, counting them. A sampler partitioned over the jobs already is not partitioned again.

A federated job that heals while alive (its work since its last committed sync dropped) moves its running epoch back
to its committed position (:func:`continue_at` with ``live=True``, a *live rewind*): the sampler's iteration reads the
share from the new position at the next index it hands out, and the loader drops the batches it had asked for before
(a worker's prefetch), so its next batch is the first sample after the position.

Other samplers (a user's own, kept by Lightning in a ``DistributedSamplerWrapper``) keep their order; the loader then
saves how many batches of the epoch it handed out and a resumed epoch drops that many first (read and discarded; exact
for a sampler whose order depends on the epoch only). Iterable datasets have no sampler: use a loader that saves its
own position, e.g. torchdata's ``StatefulDataLoader`` (anything with ``state_dict`` / ``load_state_dict``), which the
strategy leaves as it is and Lightning checkpoints the same way.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Optional

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from ._compat import rebuild_dataloader
from .data_shares import DataShares

__all__ = ["ResumableDataLoader", "ResumableSampler", "continue_at", "data_position", "drop_strategy_loader_states",
           "is_stateful_loader", "loader_states", "make_resumable", "restore_loader_states"]

#: Where a rank file of a checkpoint folder keeps the rank's own training-loader states.
LOADERS_KEY = "train_loaders"
_MADE_BY_STRATEGY = "made_by_strategy"


class ResumableSampler(DistributedSampler):
    """Lightning's ``DistributedSampler`` order, continued from a position in the epoch.

    The epoch's order is that of ``DistributedSampler(dataset, num_replicas, rank, shuffle, seed, drop_last)``;
    :attr:`start` samples of it were read before this iteration (by all replicas together). The rest is cut into
    ``num_replicas`` shares as ``DistributedSampler`` cuts a whole epoch: replica ``r`` reads every
    ``num_replicas``-th sample from position ``start + r``. Without ``drop_last`` the last round is completed with the
    epoch's first samples, as ``DistributedSampler`` pads, so a resume on the same number of replicas reads exactly
    what the uninterrupted run reads. ``len()`` is the whole epoch's share (Lightning counts an epoch's batches from
    it, and continues its count on resume).

    Args:
        dataset: a map-style dataset (``len`` and ``__getitem__``).
        num_replicas: how many replicas read disjoint shares of each epoch.
        rank: this replica's index.
        shuffle: whether each epoch is a permutation drawn from ``seed + epoch`` (else the dataset's order).
        seed: the shuffle's seed (Lightning's is ``seed_everything``'s, ``PL_GLOBAL_SEED``).
        drop_last: leave out the last samples that would not fill a round of ``num_replicas`` instead of padding.
        jobs: ``(data_job_index, data_jobs)`` when the replicas are those of every federated job (``data_jobs``):
            ``num_replicas`` is ``data_jobs`` × the job's ranks.
        shares: with ``jobs``, the federation's record (:class:`~lightning_localsgd.data_shares.DataShares`): the
            departed jobs' samples this job reads after its stripe, padded to a multiple of the job's ranks. The
            position then goes on past the dataset's length, counting them.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, jobs: Optional[tuple[int, int]] = None,
                 shares: Optional[DataShares] = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0  #: samples of the current epoch read (by every replica together) before this iteration
        self.jobs = jobs
        """``(data_job_index, data_jobs)`` when the replicas are those of every federated job (``data_jobs``)."""
        self.shares = shares
        """With ``jobs``: the federation's record of who reads what (:class:`~.data_shares.DataShares`): the
        departed jobs' samples this job reads after its stripe (its *extras*)."""
        self._orders: dict[int, list[int]] = {}
        self._jump = False  # a jump() the running iteration has not taken yet
        self.pulled = 0  #: indices the running iteration yielded since it started or since the last jump()
        if jobs is not None and shares is not None:
            shares.attach(len(dataset), self.job_replicas)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before each epoch; another epoch than the one a position was restored for starts at
        its beginning."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def epoch_order(self, epoch: Optional[int] = None) -> list[int]:
        """An epoch's order of sample indices (the current one's by default), before it is cut into shares
        (``DistributedSampler``'s)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return list(range(len(self.dataset)))  # type: ignore[arg-type]
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            self._orders[epoch] = torch.randperm(len(self.dataset), generator=generator).tolist()  # type: ignore[arg-type]
        return self._orders[epoch]

    @property
    def job_replicas(self) -> int:
        """The replicas of this job (``num_replicas`` without ``jobs``)."""
        return self.num_replicas // self.jobs[1] if self.jobs is not None else self.num_replicas

    def extras(self, epoch: Optional[int] = None) -> list[int]:
        """The departed jobs' samples this job reads in an epoch after its stripe (:mod:`~.data_shares`), padded
        with repeats of its first ones to a multiple of the job's replicas (every rank reads as many batches)."""
        if self.jobs is None or self.shares is None or not self.shares.departures:
            return []
        samples = self.shares.extras(self.jobs[0], self.epoch if epoch is None else epoch)
        indices = [self.epoch_order(source)[position] for source, position in samples]
        pad = -len(indices) % self.job_replicas
        return indices + (indices * (pad // max(1, len(indices)) + 1))[:pad] if indices else []

    def _own_per_replica(self, start: int) -> int:
        rest = max(0, len(self.dataset) - start)  # type: ignore[arg-type]
        return rest // self.num_replicas if self.drop_last else -(-rest // self.num_replicas)

    def __len__(self) -> int:
        extra = self.epoch_end(self.epoch) - len(self.dataset)  # type: ignore[arg-type]
        return self.num_samples + -(-extra // self.job_replicas)  # padded to a multiple of the job's replicas

    def epoch_end(self, epoch: int) -> int:
        """The position of ``epoch``'s end: the dataset's length plus this job's extras of that epoch."""
        size = len(self.dataset)  # type: ignore[arg-type]
        if self.jobs is None or self.shares is None:
            return size
        return size + len(self.shares.extras(self.jobs[0], epoch))

    def share(self) -> list[int]:
        """This replica's indices of the current epoch from :attr:`start` (its stripe, then its extras)."""
        order = self.epoch_order()
        rest = order[self.start:]
        if self.drop_last:
            rest = rest[: len(rest) - len(rest) % self.num_replicas]
        elif rest:
            pad = -len(rest) % self.num_replicas  # repeats of the epoch's first samples, as DistributedSampler pads
            rest += (order * (pad // max(1, len(order)) + 1))[:pad]
        extras = self.extras()[max(0, self.start - len(order)):]
        return rest[self.rank :: self.num_replicas] + extras[self.rank % self.job_replicas :: self.job_replicas]

    def __iter__(self) -> Iterator[int]:
        self._jump, self.pulled = True, 0  # the share is read at the first index asked for (from start then)
        return _JumpingIterator(self)

    def jump(self, epoch: int, samples: int) -> None:
        """Move the running iteration to ``(epoch, samples)``: the next index it yields is the first of this
        replica's share from there (a live rewind; see :func:`continue_at`). The iteration's end follows."""
        self.epoch, self.start = epoch, samples
        self._jump, self.pulled = True, 0

    def position(self, samples_per_replica: int) -> int:
        """The epoch's position once each replica read ``samples_per_replica`` more samples of this iteration (at
        most the epoch's end: the padding repeats samples already counted). Beyond the dataset's length the
        position counts the extras the job's replicas read together."""
        own = self._own_per_replica(self.start)
        size = len(self.dataset)  # type: ignore[arg-type]
        if samples_per_replica <= own:
            return min(size, self.start + samples_per_replica * self.num_replicas)
        return min(self.epoch_end(self.epoch),
                   max(self.start, size) + (samples_per_replica - own) * self.job_replicas)

    def batches_before(self, samples: int, batch_size: int) -> int:
        """The batches of the epoch a replica reads before position ``samples`` (from the epoch's start)."""
        size = len(self.dataset)  # type: ignore[arg-type]
        if samples <= size:
            return samples // (self.num_replicas * batch_size)
        return (self._own_per_replica(0) + (samples - size) // self.job_replicas) // batch_size


class _JumpingIterator:
    """A :class:`ResumableSampler`'s iteration: it reads the sampler's share lazily and takes a
    :meth:`~ResumableSampler.jump` at the next index asked for. An iterator object, not a generator: after its
    share's end it yields again once a jump came (the batch sampler asks again for the next batch after a partial
    last one)."""

    def __init__(self, sampler: ResumableSampler) -> None:
        self.sampler, self.indices, self.next = sampler, [], 0

    def __iter__(self) -> "_JumpingIterator":
        return self

    def __next__(self) -> int:
        sampler = self.sampler
        if sampler._jump:
            sampler._jump, self.indices, self.next = False, sampler.share(), 0
        if self.next >= len(self.indices):
            raise StopIteration
        self.next += 1
        sampler.pulled += 1
        return self.indices[self.next - 1]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position in the epoch survives a checkpoint: ``state_dict()`` says where the trainer is,
    ``load_state_dict()`` makes the next iteration continue there. Lightning calls both for a training loader (the
    state is saved with the checkpoint's loop state). Takes every argument of ``DataLoader``.

    With a :class:`ResumableSampler` the position is a number of samples of the epoch's order (it continues on any
    number of replicas); with any other sampler it is a number of batches, dropped from the start of the resumed
    epoch. The iteration starts at the first batch, not at ``iter()`` (Lightning creates the iterator before it sets
    the epoch of a resumed fit).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if isinstance(self.dataset, IterableDataset):
            raise ValueError(f"{type(self).__name__} takes a map-style dataset (an IterableDataset has no sampler to "
                             "continue): give an iterable dataset a loader that saves its own position, e.g. "
                             "torchdata's StatefulDataLoader.")
        self._batches = 0  # batches of the current iteration handed out
        #: made by a local-SGD strategy from the user's loader (:func:`make_resumable`): a plain Lightning run, e.g.
        #: from a converted checkpoint, has the user's own loader, without a position to restore
        self.made_by_strategy = False
        self._skip: Optional[tuple[Optional[int], int]] = None  # (epoch, batches) to drop: a restored batch position
        self._iterating = False  # inside an epoch's iteration (its first batch handed out, its last not yet)
        self._received = 0  # batches of the current iteration the underlying loader delivered
        self._asked = 0  # batches of indices the iteration asked its sampler for before its last live rewind
        self._stale = 0  # the first batches delivered that were asked for before a live rewind: dropped

    def _position_sampler(self) -> Optional[ResumableSampler]:
        return self.sampler if isinstance(self.sampler, ResumableSampler) else None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        sampler = self._position_sampler()
        skip, self._skip = self._skip, None
        epoch = getattr(self.sampler, "epoch", None)
        drop = skip[1] if skip is not None and skip[0] == epoch and skip[1] < len(self) else 0
        self._batches = 0
        iterator = super().__iter__()
        for _ in range(drop):
            next(iterator, None)
        self._batches = drop
        while True:
            self._received = self._asked = self._stale = 0
            for batch in iterator:
                self._received += 1
                if self._received <= self._stale:  # its indices were asked for before a live rewind: the old position's
                    continue
                self._batches += 1
                self._iterating = True
                yield batch
            if sampler is None or not sampler._jump:
                break
            # a live rewind after the loader had asked for the epoch's last indices (its workers' prefetch): the
            # rewound share is read by a new iteration of the underlying loader
            iterator = super().__iter__()
        self._iterating = False
        if sampler is not None:
            if sampler.start and self.batch_size is not None:  # its batches counted from the start, now from 0
                end = sampler.position(self._batches * self.batch_size)
                self._batches = sampler.batches_before(end, self.batch_size)
            sampler.start = 0  # the epoch was read to its end: read again, it starts at its beginning

    def state_dict(self) -> dict[str, Any]:
        """Where the trainer is in the epoch: ``{"epoch", "samples"}`` (samples of the epoch's order read by all
        replicas) with a :class:`ResumableSampler`, else ``{"epoch", "batches"}`` (batches handed out)."""
        sampler = self._position_sampler()
        made = {_MADE_BY_STRATEGY: True} if self.made_by_strategy else {}
        if sampler is not None and self.batch_size is not None:
            return {"epoch": sampler.epoch, "samples": sampler.position(self._batches * self.batch_size),
                    "num_replicas": sampler.num_replicas, **made}
        return {"epoch": getattr(self.sampler, "epoch", None), "batches": self._batches, **made}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the next iteration where :meth:`state_dict` was taken (a resume)."""
        sampler = self._position_sampler()
        if "samples" in state and sampler is not None:
            sampler.epoch, sampler.start = int(state["epoch"]), int(state["samples"])
        elif "batches" in state and sampler is None:
            self._skip = (state.get("epoch"), int(state["batches"]))
        else:
            raise ValueError(
                f"cannot continue the training data loader from the checkpoint's position {dict(state)}: it was "
                f"saved by a loader {'with' if 'samples' in state else 'without'} a ResumableSampler, this one has "
                f"sampler {type(self.sampler).__name__}. Resume with the same kind of sampler (shuffle=True/False or "
                "the same custom sampler) as the run that wrote the checkpoint.")


def is_stateful_loader(loader: Any) -> bool:
    """Whether ``loader`` saves its own position (``state_dict`` / ``load_state_dict``, as Lightning checks)."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None))


_RESUMABLE_CLASSES: dict[type, type] = {}


def _resumable_class(cls: type) -> type:
    """``cls`` itself if resumable, else a subclass of ``cls`` and :class:`ResumableDataLoader` (a user's subclass of
    ``DataLoader`` keeps its own behaviour)."""
    if issubclass(cls, ResumableDataLoader):
        return cls
    if cls is DataLoader:
        return ResumableDataLoader
    if cls not in _RESUMABLE_CLASSES:
        _RESUMABLE_CLASSES[cls] = type(f"Resumable{cls.__name__}", (ResumableDataLoader, cls), {})
    return _RESUMABLE_CLASSES[cls]


def _resumable_sampler(loader: DataLoader, jobs: Optional[tuple[int, int]] = None,
                       shares: Optional[DataShares] = None) -> Optional[ResumableSampler]:
    """The :class:`ResumableSampler` that replaces ``loader``'s sampler, or ``None`` to keep it: Lightning's (or the
    user's) ``DistributedSampler`` with its shares and seed, a shuffle or the dataset's order on one replica. With
    ``jobs`` (``(data_job_index, data_jobs)``) the job's shares become shares of every job's: ``data_jobs`` × the
    job's replicas, this job's ranks taking those of ``data_job_index`` (one seed, so one order, for every job). A
    sampler partitioned over the jobs already is kept (the same ``jobs``) or refused (other ``jobs``): partitioned
    again, each job would read a share of its share."""
    sampler = loader.sampler
    if isinstance(sampler, ResumableSampler) and sampler.jobs is not None:
        if jobs is not None and tuple(jobs) != tuple(sampler.jobs):
            raise ValueError(
                f"the training loader's ResumableSampler is partitioned over the federated jobs already (job "
                f"{sampler.jobs[0]} of data_jobs={sampler.jobs[1]}), and data_jobs={jobs[1]} / data_job_index="
                f"{jobs[0]} would partition it again (each job reading a share of its share): give fit the loader "
                "with its plain sampler (shuffle=True/False or a DistributedSampler) and let the strategy partition "
                "it, or leave data_jobs=None.")
        if shares is not None and sampler.shares is None:
            sampler.shares = shares
            shares.attach(len(sampler.dataset), sampler.job_replicas)  # type: ignore[arg-type]
        return None
    if isinstance(sampler, ResumableSampler) and jobs is None:
        return None
    if type(sampler) in (DistributedSampler, ResumableSampler):
        replicas, rank, shuffle, seed, drop_last = (sampler.num_replicas, sampler.rank, sampler.shuffle, sampler.seed,
                                                    sampler.drop_last)
    elif (isinstance(sampler, (RandomSampler, SequentialSampler)) and len(sampler) == len(loader.dataset)
          and (getattr(sampler, "generator", None) is None or jobs is not None)):
        # Lightning's seed, as its DistributedSampler takes it; a RandomSampler's own draws would differ on resume (a
        # shuffle with the user's own generator is the user's order: kept, its position counted in batches)
        replicas, rank, shuffle, seed, drop_last = (1, 0, isinstance(sampler, RandomSampler),
                                                    int(os.getenv("PL_GLOBAL_SEED", 0)), False)
    else:
        return None
    if jobs is not None:
        index, count = jobs
        replicas, rank = replicas * count, index * replicas + rank
    return ResumableSampler(loader.dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed,
                            drop_last=drop_last, jobs=jobs, shares=shares if jobs is not None else None)


def make_resumable(loader: Any, jobs: Optional[tuple[int, int]] = None, shares: Optional[DataShares] = None) -> Any:
    """The training loader a local-SGD strategy uses in place of ``loader``: a :class:`ResumableDataLoader` (of the
    user's class) with a :class:`ResumableSampler` where the sampler is Lightning's ``DistributedSampler``, a
    ``RandomSampler`` or a ``SequentialSampler``. Returned as it is: anything not a ``DataLoader``, an iterable
    dataset's loader, a loader that saves its own position already (torchdata's ``StatefulDataLoader``), a loader
    with its own ``batch_sampler``. ``jobs``: ``(data_job_index, data_jobs)``, this federated job's share of one
    dataset partitioned over the jobs (``ValueError`` for a loader that cannot be partitioned, or one partitioned
    for other jobs already); ``shares``: the federation's record of who reads what, when jobs leave for good."""
    resumable = isinstance(loader, ResumableDataLoader)
    usable = (isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset)
              and loader.batch_size is not None and (resumable or not is_stateful_loader(loader)))
    sampler = _resumable_sampler(loader, jobs, shares) if usable else None
    partitioned = usable and isinstance(loader.sampler, ResumableSampler) and loader.sampler.jobs is not None
    if jobs is not None and sampler is None and not partitioned:
        raise ValueError(
            f"data_jobs={jobs[1]} partitions a map-style dataset's order over the federated jobs, but the training "
            f"loader ({type(loader).__name__}) cannot be partitioned: give fit a DataLoader of a map-style dataset "
            "with batch_size and shuffle=True/False (or a DistributedSampler), without its own batch_sampler or a "
            "custom sampler and not a loader that saves its own position; or leave data_jobs=None and shard by hand.")
    if not usable or (sampler is None and resumable):
        return loader
    loader = rebuild_dataloader(loader, sampler if sampler is not None else loader.sampler,
                                _resumable_class(type(loader)))
    loader.made_by_strategy = True
    return loader


def data_position(loader: Any) -> Optional[tuple[int, int]]:
    """``(epoch, samples)``: where a :class:`ResumableDataLoader` with a :class:`ResumableSampler` is in its epoch's
    order (this replica's share read up to there); else ``None``."""
    if not isinstance(loader, ResumableDataLoader) or loader._position_sampler() is None:
        return None
    state = loader.state_dict()
    return int(state["epoch"]), int(state["samples"])


def continue_at(loader: ResumableDataLoader, epoch: int, samples: int,
                live: bool = False) -> Optional[tuple[int, int]]:
    """Make ``loader``'s next batch continue at ``(epoch, samples)`` (:func:`data_position`; an epoch read to its end
    continues at the next epoch's start). Returns ``(epoch, batches of that epoch before the position)``, or ``None``
    when the loader is inside an epoch's iteration and ``live`` is False.

    ``live``: a running iteration moves too (a live rewind): its next batch is the first of this replica's share from
    the position, the iteration ends at that epoch's end. Batches whose indices the loader asked for before (a
    worker's prefetch, ``num_workers > 0``) are read and dropped: exact for a loader that delivers its batches in
    order (``in_order=True``, the default)."""
    sampler = loader._position_sampler()
    assert sampler is not None and loader.batch_size is not None
    if loader._iterating and not live:
        return None
    if samples >= sampler.epoch_end(epoch):
        epoch, samples = epoch + 1, 0
    if loader._iterating:
        loader._asked += -(-sampler.pulled // loader.batch_size)  # the index batches asked for from the old position
        loader._stale, loader._batches = loader._asked, 0
        sampler.jump(epoch, samples)
    else:
        sampler.epoch, sampler.start = epoch, samples
    return epoch, sampler.batches_before(samples, loader.batch_size)


def _fit_loop_state(checkpoint: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    return ((checkpoint.get("loops") or {}).get("fit_loop") or {}).get("state_dict")


def loader_states(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """This rank's training-loader states in a checkpoint dict Lightning built (the ``state_dict()`` of each stateful
    training loader, in the fit loop's state), as ``{LOADERS_KEY: [...]}`` for its rank file; ``{}`` without any.
    Lightning saves one rank's checkpoint dict; a loader of an iterable dataset holds each rank's own position."""
    fit_loop = _fit_loop_state(checkpoint)
    states = fit_loop.get("combined_loader") if fit_loop is not None else None
    return {LOADERS_KEY: states} if states else {}


def restore_loader_states(checkpoint: dict[str, Any], rank_state: Mapping[str, Any]) -> None:
    """Put this rank's own training-loader states (from its rank file) where Lightning restores them from."""
    fit_loop = _fit_loop_state(checkpoint)
    if rank_state.get(LOADERS_KEY) and fit_loop is not None:
        fit_loop["combined_loader"] = rank_state[LOADERS_KEY]


def drop_strategy_loader_states(checkpoint: dict[str, Any]) -> None:
    """Leave out of a checkpoint that a plain Lightning run reads (``convert_checkpoint``) the positions of the
    loaders a local-SGD strategy made resumable: that run has the user's own loader, which restarts its epoch
    (Lightning refuses a checkpoint with more loader states than stateful loaders). A user's own stateful loaders
    (``StatefulDataLoader``, a ``ResumableDataLoader`` the user made) keep theirs."""
    fit_loop = _fit_loop_state(checkpoint)
    if fit_loop is None or not fit_loop.get("combined_loader"):
        return
    kept = [state for state in fit_loop["combined_loader"] if not state.get(_MADE_BY_STRATEGY)]
    if kept:
        fit_loop["combined_loader"] = kept
    else:
        del fit_loop["combined_loader"]
