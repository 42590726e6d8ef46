"""A federated job that leaves for good (``data_rebalance_after``): the jobs left split its unread data, a job coming
back gets a fresh share, every epoch is still read once; the end-of-fit summary of samples contributed and read again.

The references are written out here by hand: epoch ``e``'s order is the permutation of seed ``e``
(``DistributedSampler``'s with ``seed_everything(0)``); job ``j`` of ``J`` (one rank each) owns the positions ``p`` of it
with ``p % J == j`` (its stripe), read in batches of 2. A departed job's unread positions (its stripe from its last
committed position, then its whole stripe of later epochs) are cut in halves, the first for job 0, the second for job 1,
and read after their own stripe in their first epoch not begun at the decision. The live rewinds run with jobs of
two ranks too (DDP inside each): ``2 × SAMPLES`` samples, rank ``r`` of job ``j`` is replica ``2j + r`` of
``2J`` (``stripe``'s ``rank`` / ``ranks``), and each rank reads every other one of its job's extras.
"""

from __future__ import annotations

import io
import time
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

pytest.importorskip("torchft")
from reference import Alone
from test_federated import killed_on_exit, launch, lighthouse, load, wait_all  # noqa: F401

from lightning_localsgd import LocalSGDController, OuterSync
from lightning_localsgd.config import LocalSGDConfig
from lightning_localsgd.data import ResumableSampler, continue_at, data_position, make_resumable
from lightning_localsgd.data_shares import DataShares
from lightning_localsgd.federation import Federation

SAMPLES, JOBS = 24, 3  # 8 samples of each job per epoch: 4 steps of batch 2


@pytest.fixture(autouse=True)
def seed_zero(monkeypatch):
    """The references are seed 0's orders: a shuffled plain DataLoader takes Lightning's seed (``PL_GLOBAL_SEED``),
    which a test that ran ``seed_everything`` in this process may have left set."""
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")


def order(epoch: int, size: int = SAMPLES) -> list[int]:
    return torch.randperm(size, generator=torch.Generator().manual_seed(epoch)).tolist()


def stripe(job: int, epoch: int, start: int = 0, rank: int | None = None, ranks: int = 1) -> list[int]:
    """Job ``job``'s samples of ``epoch`` from position ``start`` (every job's reading together). Jobs of ``ranks``
    ranks (DDP inside each) read ``SAMPLES × ranks`` samples (so an epoch is still 4 steps), ``JOBS × ranks``
    replicas: rank ``rank``'s share is replica ``job × ranks + rank``'s; ``None``: the whole job's stripe in the
    order's order (what a departed job's unread data is cut from)."""
    size, replicas = SAMPLES * ranks, JOBS * ranks
    return [order(epoch, size)[p] for p in range(start, size)
            if p % replicas // ranks == job and (rank is None or p % ranks == rank)]


def halves(samples: list[int]) -> tuple[list[int], list[int]]:
    return samples[:len(samples) // 2], samples[len(samples) // 2:]


def batches(samples: list[int]) -> list[list[int]]:
    return [samples[i:i + 2] for i in range(0, len(samples), 2)]


# ---------------------------------------------------------------------------------------------------- in one process
class Jobs:
    """Three jobs' loaders and records driven by hand, as the federation drives them: each step every live job reads
    a batch, each sync the live jobs' positions are committed in every job's record."""

    def __init__(self, rebalance_after: int | None = 2) -> None:
        data = TensorDataset(torch.arange(SAMPLES))
        self.shares = [DataShares(JOBS, rebalance_after) for _ in range(JOBS)]
        self.loaders = [make_resumable(DataLoader(data, batch_size=2, shuffle=True), (j, JOBS), self.shares[j])
                        for j in range(JOBS)]
        self.iterators = {j: iter(self.loaders[j]) for j in range(JOBS)}
        self.read: dict[int, list[tuple[int, list[int]]]] = {j: [] for j in range(JOBS)}
        self.events: list[str] = []

    def step(self, jobs) -> None:
        for j in jobs:
            batch = next(self.iterators[j], None)
            if batch is None:  # the epoch ended: the next one (Lightning sets the sampler's epoch)
                sampler = self.loaders[j].sampler
                sampler.set_epoch(sampler.epoch + 1)
                self.iterators[j] = iter(self.loaders[j])
                batch = next(self.iterators[j])
            self.read[j].append((self.loaders[j].sampler.epoch, batch[0].tolist()))

    def sync(self, weigh, present=()) -> None:
        rows = [(j, *data_position(self.loaders[j]), True, 0) for j in weigh]
        rows += [(j, *data_position(self.loaders[j]), False, 0) for j in present]
        for shares in self.shares:
            self.events += shares.commit(rows)


def test_a_departed_jobs_unread_data_goes_to_the_others_each_epoch_read_once():
    """Job 2 reads 2 steps (committed), then leaves: two syncs later jobs 0 and 1 split its unread samples of epoch 0
    (from position 12), and its stripes of epochs 1 and 2, reading them after their own stripe of epoch 2."""
    jobs = Jobs()
    jobs.sync([], present=[0, 1, 2])  # the join
    jobs.step([0, 1, 2]), jobs.step([0, 1, 2])
    jobs.sync([0, 1, 2])
    jobs.step([2])  # read, never committed: the job dies
    for _ in range(2):
        jobs.step([0, 1]), jobs.step([0, 1])
        jobs.sync([0, 1])
    assert len(jobs.events) == JOBS and "data job 2" in jobs.events[0] and "4 samples" in jobs.events[0]
    assert all(s.state_dict() == jobs.shares[0].state_dict() for s in jobs.shares)
    for _ in range(11):  # to the end of epoch 2 (own 4 + 5 extra batches)
        jobs.step([0, 1])
    unread0 = halves(stripe(2, 0, start=12))
    for j in (0, 1):
        expected = stripe(j, 0) + stripe(j, 1) + stripe(j, 2) + unread0[j] + halves(stripe(2, 1))[j] \
            + halves(stripe(2, 2))[j]
        assert [i for _, b in jobs.read[j] for i in b] == expected
        assert len(jobs.loaders[j]) == 9 and data_position(jobs.loaders[j]) == (2, SAMPLES + 10)
    committed = [i for j in (0, 1) for _, b in jobs.read[j] for i in b] + [i for _, b in jobs.read[2][:2] for i in b]
    assert Counter(committed) == {i: 3 for i in range(SAMPLES)}  # epochs 0, 1 and 2: each sample once per epoch
    jobs.sync([0, 1])
    assert jobs.shares[0].summary() == {0: {"contributed": 34, "reread": 0}, 1: {"contributed": 34, "reread": 0},
                                        2: {"contributed": 4, "reread": 0}}


def test_without_rebalancing_the_departed_jobs_data_is_never_read():
    jobs = Jobs(rebalance_after=None)
    jobs.sync([], present=[0, 1, 2])
    jobs.step([0, 1, 2])
    for _ in range(10):
        jobs.step([0, 1]), jobs.sync([0, 1])
    assert not jobs.events and len(jobs.loaders[0]) == 4


def departed() -> Jobs:
    """Job 2 read 2 committed steps (position 12 of epoch 0) and left; jobs 0 and 1 split its data at the sync of
    step 6 (the second without it)."""
    jobs = Jobs()
    jobs.sync([], present=[0, 1, 2])
    jobs.step([0, 1, 2]), jobs.step([0, 1, 2])
    jobs.sync([0, 1, 2])
    for _ in range(2):
        jobs.step([0, 1]), jobs.step([0, 1])
        jobs.sync([0, 1])
    return jobs


def test_a_job_coming_back_gets_a_fresh_share_from_the_first_epoch_no_job_began():
    """Job 2 leaves at position 12 of epoch 0; it comes back while jobs 0 and 1 are inside epoch 2 (whose extras
    stay theirs): it continues at epoch 3's start, reading its own stripe; jobs 0 and 1 read no extras there."""
    jobs = departed()
    for _ in range(4):  # steps 7-10: the end of epoch 1, two batches into epoch 2
        jobs.step([0, 1])
    fresh = DataLoader(TensorDataset(torch.arange(SAMPLES)), batch_size=2, shuffle=True)
    jobs.loaders[2] = make_resumable(fresh, (2, JOBS), jobs.shares[2])  # restarted: it heals, takes the record
    jobs.shares[2].load_state_dict(jobs.shares[0].state_dict())
    assert jobs.shares[2].away(2) is not None
    jobs.sync([0, 1], present=[2])
    assert "data job 2 is back" in jobs.events[-1] and jobs.shares[2].positions[2] == (3, 0)
    assert continue_at(jobs.loaders[2], 3, 0) == (3, 0)
    jobs.iterators[2] = iter(jobs.loaders[2])
    for _ in range(4):
        jobs.step([2])
    assert [b for _, b in jobs.read[2][2:]] == batches(stripe(2, 3))
    for _ in range(7 + 4):  # jobs 0 and 1: the rest of epoch 2 (9 batches), then epoch 3 (4: no extras)
        jobs.step([0, 1])
    assert [b for e, b in jobs.read[0] if e == 3] == batches(stripe(0, 3)) and len(jobs.loaders[0]) == 4
    read = [i for j in range(JOBS) for e, b in jobs.read[j][:None if j < 2 else 2] for i in b if e <= 3]
    assert Counter(read + [i for _, b in jobs.read[2][2:] for i in b]) == {i: 4 for i in range(SAMPLES)}


def test_a_federated_jobs_rewind_into_its_extras_reads_them_again_from_there():
    """Job 0 of three, job 2 departed (test_data_departure's Jobs): in epoch 2, after its own stripe and two batches
    of its extras, it moves back to the position between them: it reads again what it read from there."""
    jobs = departed()
    for _ in range(2 + 3):  # the rest of epoch 1 (2), epoch 2's first 3 batches
        jobs.step([0])
    assert jobs.loaders[0].sampler.epoch == 2 and len(jobs.loaders[0]) == 9
    jobs.step([0])  # epoch 2's 4th batch: its own stripe read
    position = data_position(jobs.loaders[0])
    assert position == (2, SAMPLES)
    jobs.step([0]), jobs.step([0])  # two batches of its extras
    straight = [b for _, b in jobs.read[0][-2:]]
    assert continue_at(jobs.loaders[0], *position, live=True) == (2, 4)
    assert [batch[0].tolist() for batch in jobs.iterators[0]][:2] == straight


def _saved(state):
    """``state`` through ``torch.save`` (as a checkpoint file holds it)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def _controller() -> tuple[LocalSGDController, DataShares]:
    federation = Federation("127.0.0.1:1", "g0", 1, None)
    federation.data_shares = DataShares(JOBS, 2)  # as Federation.start makes it with data_jobs
    controller = LocalSGDController(LocalSGDConfig(sync_every=2), syncs=federation)
    controller.outer_sync = OuterSync([torch.zeros(3)], cross_group=Alone())
    return controller, federation.data_shares


def test_the_record_goes_into_a_checkpoint_and_comes_back_and_a_legacy_checkpoint_keeps_an_empty_one():
    """The record is part of the local-SGD counters (``meta``) every checkpoint holds and healing sends: a job
    resumed from its checkpoint alone still knows who took over a departed job's data."""
    jobs = Jobs()
    jobs.sync([], present=[0, 1, 2])
    jobs.step([0, 1, 2]), jobs.sync([0, 1, 2])
    for _ in range(2):
        jobs.step([0, 1]), jobs.sync([0, 1])
    written, shares = _controller()
    shares.load_state_dict(jobs.shares[0].state_dict())
    meta = torch.load(_saved(written.meta(world_size=1)), weights_only=False)
    resumed, restored = _controller()
    resumed.restore(meta, None)
    assert restored.state_dict() == jobs.shares[0].state_dict() and restored.away(2) is not None
    del meta["data_shares"]  # a checkpoint written before the record was kept
    legacy, empty = _controller()
    legacy.restore(meta, None)
    assert empty.state_dict() == DataShares(JOBS, 2).state_dict()


def test_a_sampler_partitioned_over_the_jobs_is_kept_for_the_same_jobs_and_refused_for_others():
    data = TensorDataset(torch.arange(SAMPLES))
    once = make_resumable(DataLoader(data, batch_size=2, shuffle=True), (1, 3))
    again = make_resumable(once, (1, 3))  # e.g. the loader handed to fit again: kept, not a share of a share
    assert isinstance(again.sampler, ResumableSampler)
    assert (again.sampler.num_replicas, again.sampler.rank, again.sampler.jobs) == (3, 1, (1, 3))
    user = DataLoader(data, batch_size=2, sampler=once.sampler)  # the user's loader around a partitioned sampler
    assert make_resumable(user, (1, 3)).sampler is once.sampler
    with pytest.raises(ValueError, match=r"partitioned over the federated jobs already \(job 1 of data_jobs=3\).*"
                                         r"data_jobs=2 / data_job_index=0 would partition it again"):
        make_resumable(once, (0, 2))
    # a plain DistributedSampler of the job's own ranks is partitioned over the jobs as before
    ranks = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=1, seed=0))
    assert make_resumable(ranks, (1, 3)).sampler.num_replicas == 6


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_data_rebalance_after_is_checked(value):
    with pytest.raises(ValueError, match="data_rebalance_after must be an integer >= 1"):
        LocalSGDConfig(lighthouse="h:1", data_jobs=2, data_job_index=0, data_rebalance_after=value)
    LocalSGDConfig(lighthouse="h:1", data_jobs=2, data_job_index=0, data_rebalance_after=None)
    with pytest.raises(ValueError, match="data_rebalance_after=3 only applies to jobs sharing one dataset"):
        LocalSGDConfig(lighthouse="h:1", data_rebalance_after=3)
    with pytest.raises(ValueError, match="data_rebalance_after=3 only applies to federated worker groups"):
        LocalSGDConfig(data_rebalance_after=3)


# ---------------------------------------------------------------------------------------------------- across jobs
# Three one-rank jobs sync every 2 steps (the join, then steps 2, 4, ...); g2 is SIGKILLed after step 3 (its sync of
# step 2 committed its first 2 batches: position 12 of epoch 0); g0 and g1 commit the syncs of steps 4 and 6 without
# it, and at that of step 6 (data_rebalance_after=2) split its data; they are then at position 12 of epoch 1, so they
# read its halves after their own stripe of epoch 2 (4 + 5 batches).
MP = dict(ledger_size=SAMPLES, data_jobs=JOBS, sync_every=2, data_rebalance_after=2)
LEFT = "it left for good"


def recipients_ledger(job: int, epochs: int = 3, rank: int = 0, ranks: int = 1) -> list[list[int]]:
    """Job 0's or 1's batches of epochs 0 .. ``epochs`` - 1 with g2's data split from the sync of step 6 on (g2 at
    position 12 × ``ranks``: its first 2 steps); with ``ranks`` > 1, its rank ``rank``'s: its stripe, then every
    ``ranks``-th of the job's extras."""
    extras = [i for e, start in ((0, 12 * ranks), (1, 0), (2, 0))
              for i in halves(stripe(2, e, start, ranks=ranks))[job]]
    return [b for e in range(epochs)
            for b in batches(stripe(job, e, rank=rank, ranks=ranks) + (extras[rank::ranks] if e == 2 else []))]


def committed_samples(ledger: list[list[int]], epochs: list[int] | None = None, upto: int = 99) -> list[int]:
    return [i for n, b in enumerate(ledger) if epochs is None or epochs[n] <= upto for i in b]


@pytest.mark.slow
def test_a_job_that_never_returns_every_sample_contributes_once(tmp_path, lighthouse):
    """g2 never returns: g0 and g1 read its unread share of epoch 0 and its stripes of epochs 1 and 2 after their own
    of epoch 2 (the hand-computed split); the committed contributions (g0's and g1's 17 steps, g2's first 2) hold
    every sample of epochs 0-2 exactly once, as an uninterrupted run's do. Logged once per job; the summary counts
    what the ledgers hold; the departure is in every member's record."""
    address = lighthouse(2)
    procs = [launch(tmp_path, address, g, barrier=JOBS, data_job_index=g, die_at_step=3 if g == 2 else -1,
                    max_steps=17, **MP) for g in range(JOBS)]
    with killed_on_exit(procs):
        codes = wait_all(procs[:2], tmp_path)
    assert codes == [0, 0], "\n".join((tmp_path / f"g{g}.log").read_text()[-3000:] for g in range(2))
    g0, g1, g2 = (load(tmp_path, f"g{g}") for g in range(JOBS))
    assert g2["killed"] and g2["ledger"] == batches(stripe(2, 0))[:3]
    for job, dump in ((0, g0), (1, g1)):
        assert dump["ledger"] == recipients_ledger(job) and dump["epochs"] == [0] * 4 + [1] * 4 + [2] * 9
        assert (tmp_path / f"g{job}.log").read_text().count(LEFT) == 1
        assert [(d["job"], d["position"], d["recipients"]) for d in dump["data_departures"]] == [(2, [0, 12], [0, 1])]
    every = committed_samples(g0["ledger"]) + committed_samples(g1["ledger"]) + committed_samples(g2["ledger"][:2])
    uninterrupted = [i for e in range(3) for j in range(JOBS) for i in stripe(j, e)]
    assert Counter(every) == Counter(uninterrupted) == {i: 3 for i in range(SAMPLES)}
    # the summary: what each job's committed contributions hold (g2's third batch was lost with it, not counted)
    counts = {0: len(committed_samples(g0["ledger"])), 1: len(committed_samples(g1["ledger"])), 2: 4}
    for job, dump in ((0, g0), (1, g1)):
        assert dump["data_summary"] == {j: {"contributed": counts[j], "reread": 0} for j in range(JOBS)}
        assert (f"data summary at the end of fit (samples of each data job): job 0: {counts[0]} contributed, 0 read "
                "again after a failure; job 1:") in (tmp_path / f"g{job}.log").read_text()


@pytest.mark.slow
def test_a_job_coming_back_after_its_data_was_split_gets_a_fresh_share(tmp_path, lighthouse):
    """g2 is killed after step 3 and restarted (no checkpoint) once g0 logged its departure; g0 and g1 wait at step 8
    for it, so it joins (healing from a peer) at the sync of step 10, when they are inside epoch 2 (whose extras stay
    theirs): it reads its own stripe from epoch 3's start, not its old position; g0 and g1 read theirs only there.
    Every sample of epochs 0-3 contributes exactly once."""
    address = lighthouse(2)
    procs = [launch(tmp_path, address, g, barrier=JOBS, data_job_index=g, max_steps=21,
                    **(dict(die_at_step=3) if g == 2 else dict(wait_for="g2r", wait_at_step=8)), **MP)
             for g in range(JOBS)]
    with killed_on_exit(procs):
        deadline = time.monotonic() + 120
        while LEFT not in (tmp_path / "g0.log").read_text():
            assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "g0.log").read_text()[-3000:]
            time.sleep(0.1)
        procs.append(launch(tmp_path, address, 2, name="g2r", data_job_index=2, max_steps=21, **MP))
        codes = wait_all([procs[0], procs[1], procs[3]], tmp_path)
    assert codes == [0, 0, 0], "\n".join((tmp_path / f"{n}.log").read_text()[-3000:] for n in ("g0", "g1", "g2r"))
    g0, g1, g2, back = (load(tmp_path, n) for n in ("g0", "g1", "g2", "g2r"))
    assert back["healed"] == 1 and back["start_step"] == 10
    assert back["ledger"][:4] == batches(stripe(2, 3)) and back["epochs"][:4] == [3] * 4
    assert "data job 2 is back" in (tmp_path / "g0.log").read_text()
    for job, dump in ((0, g0), (1, g1)):
        assert dump["ledger"] == recipients_ledger(job) + batches(stripe(job, 3))  # no extras in epoch 3
    every = (committed_samples(g0["ledger"]) + committed_samples(g1["ledger"]) + committed_samples(g2["ledger"][:2])
             + committed_samples(back["ledger"], back["epochs"], upto=3))
    assert Counter(every) == {i: 4 for i in range(SAMPLES)}
    assert back["data_positions"] == g0["data_positions"] and back["data_departures"] == g0["data_departures"]


def test_jobs_of_two_ranks_split_their_extras_between_their_ranks():
    """Two ranks per job (6 replicas): job 2 leaves at position 12 of epoch 0; job 0's two ranks read its own stripe
    of epoch 1, then each every other one of its extras (the first half of job 2's unread positions of epoch 0 and of
    its stripe of epoch 1), as many batches each; the position counts the extras past the dataset's length, and a
    job continued there (healing) reads the rest of its extras."""
    data = TensorDataset(torch.arange(SAMPLES))
    shares = DataShares(JOBS, 1)
    ranks = [make_resumable(DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=r,
                                                                                       seed=0)), (0, JOBS), shares)
             for r in range(2)]
    assert [(loader.sampler.num_replicas, loader.sampler.rank) for loader in ranks] == [(6, 0), (6, 1)]
    shares.commit([(j, 0, 0, False, 0) for j in range(JOBS)])
    shares.commit([(j, 0, 12, True, 0) for j in range(JOBS)])
    shares.commit([(j, 0, 24, True, 0) for j in (0, 1)])  # job 2 missing: it leaves (data_rebalance_after=1)
    assert shares.away(2) is not None and shares.departures[0].first_epochs == {0: 1, 1: 1}
    # job 2's stripe is positions 4, 5 mod 6: unread of epoch 0 from 12: 16, 17, 22, 23; of epoch 1: 4, 5, ..., 23
    mine = [order(0)[p] for p in (16, 17)] + [order(1)[p] for p in (4, 5, 10, 11)]  # job 0's halves
    read = []
    for loader in ranks:
        loader.sampler.set_epoch(1)
        batches_read = [b[0].tolist() for b in loader]
        assert len(batches_read) == len(loader) == 4  # 4 own samples and 3 extra per rank, in batches of 2
        read.append([i for b in batches_read for i in b])
    own = [order(1)[p] for p in range(SAMPLES) if p % 6 in (0, 1)]
    assert sorted(read[0] + read[1]) == sorted(own + mine)
    assert read[0][4:] == mine[0::2] and read[1][4:] == mine[1::2]
    assert ranks[0].sampler.position(7) == ranks[0].sampler.epoch_end(1) == SAMPLES + 6
    assert ranks[0].sampler.position(5) == SAMPLES + 2  # 4 own, then 1 extra per rank
    for r, loader in enumerate(ranks):  # after 3 batches: 4 own and 2 extra samples per rank
        assert continue_at(loader, 1, SAMPLES + 4) == (1, 3)
        assert [i for b in loader for i in b[0].tolist()] == [mine[4 + r]]


def run_with_a_late_job(out, release_at: int, ranks: int = 1, **options) -> tuple[dict, dict, dict]:
    """Three jobs of ``ranks`` ranks (DDP inside each) over a lighthouse that forms a quorum of 2 after waiting 2 s
    for the third; g2 (every rank of it) stalls before its step 4 until g0 has trained step ``release_at`` (g0 and g1
    sync without it meanwhile), then trains step 4 and waits at its sync; g0 and g1 wait before their step
    ``release_at`` + 1 until then, so g2 meets them (and heals) at their next sync. Returns the three jobs' rank-0
    dumps (rank ``r``'s: ``load(out, f"g{j}_r{r}")``)."""
    from torchft._torchft import LighthouseServer

    server = LighthouseServer(bind="127.0.0.1:0", min_replicas=2, join_timeout_ms=2000, quorum_tick_ms=50,
                              heartbeat_timeout_ms=1000)
    try:
        address = "127.0.0.1:" + server.address().rsplit(":", 1)[-1]
        common = {"ledger_size": SAMPLES, "data_jobs": JOBS, "barrier": JOBS, **options}
        if ranks > 1:
            common["devices"] = ranks
        late = dict(wait_for="go", wait_at_step=3)
        procs = [launch(out, address, g, data_job_index=g, **common,
                        **(late if g == 2 else dict(wait_for="g2late", wait_at_step=release_at,
                                                    mark_at_step=release_at)))
                 for g in range(JOBS)]
        with killed_on_exit(procs):
            deadline = time.monotonic() + 120
            while not (out / "at_g0").exists():  # g0 and g1 committed their syncs without g2
                assert time.monotonic() < deadline and procs[0].poll() is None, (out / "g0.log").read_text()[-3000:]
                time.sleep(0.05)
            (out / "ready_go").touch()  # g2 trains step 4 and waits at its sync of step 4
            time.sleep(1.0)
            (out / "ready_g2late").touch()  # g0 and g1 go on to their next sync
            codes = wait_all(procs, out)
        assert codes == [0, 0, 0], "\n".join((out / f"g{g}.log").read_text()[-3000:] for g in range(JOBS))
    finally:
        server.shutdown()
    return tuple(load(out, f"g{g}") for g in range(JOBS))  # type: ignore[return-value]


RANKS = pytest.mark.parametrize("ranks", [1, 2], ids=["one-rank-jobs", "ddp-jobs-of-two-ranks"])


def rank_dumps(out, ranks: int) -> dict[tuple[int, int], dict]:
    """Every rank's dump by ``(job, rank)``."""
    return {(j, r): load(out, f"g{j}" + (f"_r{r}" if r else "")) for j in range(JOBS) for r in range(ranks)}


@pytest.mark.slow
@RANKS
def test_a_live_job_that_missed_a_sync_rereads_exactly_what_it_read_since_its_last_commit(tmp_path, ranks):
    """A live rewind. Three jobs sync every 2 steps, a lighthouse that forms a quorum of 2 after waiting 2 s for the
    third. g2 stalls before its step 4 (its sync of step 2 committed its first 2 batches: position 12 × ``ranks`` of
    epoch 0), so g0 and g1 commit the sync of step 4 without it; g2 then trains step 4 and meets them at their sync
    of step 6 (they wait for it before step 6): it is behind, heals from a peer, its steps 3-4 are dropped
    (dropped_weight 1) and its data moves back to its committed position inside the running epoch: the next batches
    it trains on are its steps 3-4's again, then its stripe of epoch 1. Jobs of two ranks (DDP inside each): both
    ranks of g2 stall, heal in the same quorum (each from rank k of a live job) and move back to the job's position,
    each rank reading its own steps 3-4's batches again. The committed contributions of every rank hold every sample
    of epochs 0 and 1 exactly once, as an uninterrupted run's do; the summary's reread is the dropped batches'
    samples. Fails without the rewind (g2 goes on into epoch 1; reread 0); with two ranks also when only one of them
    rewinds (its epoch ends at another step than its peer rank's: the job hangs)."""
    size = SAMPLES * ranks
    run_with_a_late_job(tmp_path, release_at=5, ranks=ranks, ledger_size=size, max_steps=12, sync_every=2)
    dumps = rank_dumps(tmp_path, ranks)
    assert [a["participants"] for a in dumps[0, 0]["attempts"] if a["committed"] and a["step"] == 4] == [2]
    for r in range(ranks):  # every rank of g2: healed at the sync of step 6, back to the job's committed position
        g2 = dumps[2, r]
        healed = [a["step"] for a in g2["attempts"] if a["healed"] and a["committed"]]
        assert g2["healed"] == 1 and healed == [6] and g2["dropped"] == 1.0, g2["attempts"]
        own = batches(stripe(2, 0, rank=r, ranks=ranks)) + batches(stripe(2, 1, rank=r, ranks=ranks))
        assert g2["ledger"] == own[:4] + own[2:8] and g2["epochs"] == [0] * 6 + [1] * 4, r
        assert g2["ledger"][4:6] == g2["ledger"][2:4]  # read again: exactly what it read since its last commit
    for (job, r), dump in dumps.items():
        if job < 2:
            assert dump["healed"] == 0, [(a["step"], a["participants"]) for a in dump["attempts"]]
            assert dump["ledger"] == batches([i for e in range(3) for i in stripe(job, e, rank=r, ranks=ranks)])
    committed2 = [b for r in range(ranks) for b in dumps[2, r]["ledger"][:2] + dumps[2, r]["ledger"][4:]]
    every = [i for (job, _), d in dumps.items() if job < 2 for i in committed_samples(d["ledger"], d["epochs"], upto=1)]
    every += [i for b in committed2 for i in b]
    uninterrupted = [i for e in range(2) for j in range(JOBS) for i in stripe(j, e, ranks=ranks)]
    assert Counter(every) == Counter(uninterrupted) == {i: 2 for i in range(size)}
    reread = sum(len(b) for r in range(ranks) for b in dumps[2, r]["ledger"][2:4])
    summary = {0: {"contributed": size, "reread": 0}, 1: {"contributed": size, "reread": 0},
               2: {"contributed": sum(len(b) for b in committed2), "reread": reread}}
    for dump in dumps.values():
        assert dump["data_summary"] == summary
        assert dump["data_positions"] == {0: (2, size), 1: (2, size), 2: (1, size)}


@pytest.mark.slow
@RANKS
def test_a_live_job_coming_back_after_its_data_was_split_moves_to_its_fresh_share(tmp_path, ranks):
    """The live version of the return above: g2 is not restarted but stalls before its step 4 while g0 and g1 sync
    without it (its data split at the sync of step 6) until they trained step 9; it heals at their sync of step 10,
    inside its epoch 0, and moves at once to its fresh share: its stripe of epoch 3 (g0 and g1 are inside epoch 2).
    Jobs of two ranks: both ranks of g2 move there, each to its own stripe; each rank of g0 and g1 reads every other
    one of its job's extras. Every sample of epochs 0-3 contributes exactly once. Fails without the rewind (g2 goes
    on with epoch 0)."""
    run_with_a_late_job(tmp_path, release_at=9, ranks=ranks, max_steps=21, **{**MP, "ledger_size": SAMPLES * ranks})
    dumps = rank_dumps(tmp_path, ranks)
    for r in range(ranks):
        g2 = dumps[2, r]
        assert g2["healed"] == 1 and g2["ledger"][:4] == batches(stripe(2, 0, rank=r, ranks=ranks))[:4]
        assert g2["ledger"][4:8] == batches(stripe(2, 3, rank=r, ranks=ranks)) and g2["epochs"][:8] == [0] * 4 + [3] * 4
    assert "data job 2 is back" in (tmp_path / "g0.log").read_text()
    for (job, r), dump in dumps.items():
        if job < 2:
            assert dump["healed"] == 0
            assert dump["ledger"] == recipients_ledger(job, rank=r, ranks=ranks) + batches(stripe(job, 3, rank=r,
                                                                                                     ranks=ranks))
    every = [i for (job, _), d in dumps.items() if job < 2 for i in committed_samples(d["ledger"])]
    every += [i for r in range(ranks) for i in committed_samples(dumps[2, r]["ledger"][:2])
              + committed_samples(dumps[2, r]["ledger"][4:], dumps[2, r]["epochs"][4:], upto=3)]
    assert Counter(every) == {i: 4 for i in range(SAMPLES * ranks)}
    for dump in dumps.values():
        assert dump["data_positions"] == dumps[0, 0]["data_positions"]
        assert dump["data_departures"] == dumps[0, 0]["data_departures"]
