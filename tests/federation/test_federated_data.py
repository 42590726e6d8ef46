"""Federated jobs sharing one dataset (``data_jobs``): every epoch's order partitioned over the jobs, each job's
committed data position carried with the syncs, and a job that heals from a peer continuing its share where its last
committed sync ended. Checked with a per-sample ledger (``tests/workers/train_federated.py --ledger-size``: each job
records the indices it trained on, per step) against the shares written out here by hand: epoch ``e``'s order is the
permutation of seed ``0 + e`` (``DistributedSampler``'s), job ``j`` of ``J`` (one rank each) reads every ``J``-th
sample of it from position ``j``, in batches of 2.
"""

from __future__ import annotations

import signal

import pytest
import torch
from torch.utils.data import DataLoader, Sampler

pytest.importorskip("torchft")
from test_federated import H, STEPS, killed_on_exit, launch, lighthouse, load, run_jobs, wait_all  # noqa: F401
from workers.train_ledger import IndexedDataset

from lightning_localsgd import LocalSGDStrategy
from lightning_localsgd.config import LocalSGDConfig
from lightning_localsgd.data import ResumableSampler, data_position, make_resumable

SAMPLES = 24  # 2 jobs × batch 2: 6 steps per epoch, so the 12 steps of a run read two epochs
JOBS = 2


def epoch_order(epoch: int) -> list[int]:
    return torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(epoch)).tolist()


def share(job: int, steps: int, epoch: int = 0, position: int = 0, rank: int = 0, ranks: int = 1) -> list[list[int]]:
    """Job ``job``'s batches (its rank ``rank``'s of ``ranks``) for ``steps`` steps from ``position`` (samples of
    every job's reading) of ``epoch``: replica ``job × ranks + rank`` of ``JOBS × ranks``."""
    batches: list[list[int]] = []
    while len(batches) < steps:
        mine = epoch_order(epoch)[position + job * ranks + rank::JOBS * ranks]
        batches += [mine[i:i + 2] for i in range(0, len(mine), 2)]
        epoch, position = epoch + 1, 0
    return batches[:steps]


def by_epoch(ledger: list[list[int]], epochs: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for batch, epoch in zip(ledger, epochs):
        out.setdefault(epoch, []).extend(batch)
    return out


# ---------------------------------------------------------------------------------------------------- the arguments
def test_data_jobs_partitions_the_jobs_sampler_and_refuses_what_it_cannot_partition():
    data = IndexedDataset(SAMPLES)
    for index in range(3):  # one rank per job: the job's sampler is one replica of 3
        sampler = make_resumable(DataLoader(data, batch_size=2, shuffle=True), (index, 3)).sampler
        assert isinstance(sampler, ResumableSampler) and (sampler.num_replicas, sampler.rank) == (3, index)
    from torch.utils.data.distributed import DistributedSampler  # two ranks per job: job 1's rank 1 is replica 3 of 6

    two = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=1, seed=5))
    sampler = make_resumable(two, (1, 3)).sampler
    assert (sampler.num_replicas, sampler.rank, sampler.seed) == (6, 3, 5)

    class Mine(Sampler):
        def __iter__(self):
            return iter(range(SAMPLES))

        def __len__(self):
            return SAMPLES

    with pytest.raises(ValueError, match="data_jobs=3 .* cannot be partitioned"):
        make_resumable(DataLoader(data, batch_size=2, sampler=Mine()), (0, 3))
    loader = make_resumable(DataLoader(data, batch_size=2, shuffle=True), (1, 2))
    assert data_position(loader) == (0, 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(data_jobs=2, data_job_index=0), "data_jobs=2 .* federated jobs .* lighthouse"),
    (dict(lighthouse="h:1", data_jobs=2, data_job_index=2), "data_job_index must be .* 0 .. data_jobs - 1 = 1"),
    (dict(lighthouse="h:1", data_jobs=2), "data_job_index must be"),
    (dict(lighthouse="h:1", data_job_index=0), "data_jobs must be an integer >= 1"),
    (dict(lighthouse="h:1", data_jobs=2, data_job_index=0, fragments=2, sync_every=4), "data_jobs=2 .* streaming"),
    (dict(lighthouse="h:1", data_jobs=2, data_job_index=0, warmup_steps=2), "data_jobs=2 .* warmup_steps=2"),
])
def test_data_jobs_arguments_are_checked_before_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalSGDConfig(**kwargs)
    with pytest.raises(ValueError, match=match):
        LocalSGDStrategy(**kwargs)


# ---------------------------------------------------------------------------------------------------- across jobs
@pytest.mark.slow
@pytest.mark.parametrize("ranks,strategy", [(1, "ddp"), (2, "ddp"), (2, "fsdp")],
                         ids=["one-rank-jobs", "ddp-jobs-of-two-ranks", "fsdp-jobs-of-two-ranks"])
def test_two_jobs_partition_one_dataset_each_epoch_read_once(tmp_path, lighthouse, ranks, strategy):
    """Two jobs, one seed: each rank of each job reads its share of every epoch (the hand-computed one); per epoch
    the ledgers are disjoint and together the whole dataset (epochs 0 and 1: 12 steps of one-rank jobs, 6 of
    two-rank ones); every member records both jobs' position at the last sync."""
    steps = STEPS // ranks
    dumps = run_jobs(tmp_path, lighthouse(2), JOBS, ranks=ranks, ledger_size=SAMPLES, data_jobs=JOBS,
                     max_steps=steps, strategy=strategy, g0={"data_job_index": 0}, g1={"data_job_index": 1})
    names = {(job, rank): f"g{job}" + (f"_r{rank}" if rank else "") for job in range(JOBS) for rank in range(ranks)}
    for (job, rank), name in names.items():
        assert dumps[name]["ledger"] == share(job, steps, rank=rank, ranks=ranks)
    read = {name: by_epoch(dumps[name]["ledger"], dumps[name]["epochs"]) for name in names.values()}
    for epoch in (0, 1):
        samples = [i for name in names.values() for i in read[name][epoch]]
        assert sorted(samples) == list(range(SAMPLES))  # each sample once: disjoint, and all of them
    for d in dumps.values():  # the sync of step 12: both jobs read epoch 1 to its end
        assert d["data_positions"] == {0: (1, SAMPLES), 1: (1, SAMPLES)}


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", [False, True], ids=["no-checkpoint", "own-checkpoint-of-step-5"])
def test_job_killed_and_restarted_continues_its_share_from_its_last_committed_sync(tmp_path, lighthouse, checkpoint):
    """g1 is SIGKILLed at step 6 (the sync of step 4 committed its first 4 batches; steps 5-6 are lost with its
    parameters); g0 waits at the sync of step 8 (min_groups=2) for g1, restarted with no checkpoint (or from its own
    checkpoint of step 5, whose position is 5 batches in), which heals from g0 and takes its own committed position
    from g0's record: it reads again what it read at steps 5-6, then goes on into epoch 1. Every epoch-0 sample is in
    exactly one committed contribution; nothing is skipped."""
    address = lighthouse(2)
    common = dict(ledger_size=SAMPLES, data_jobs=JOBS)
    saves = dict(ckpt_dir=tmp_path / "ckpt_g1", ckpt_every=H + 1) if checkpoint else {}
    procs = [launch(tmp_path, address, g, barrier=JOBS, data_job_index=g, die_at_step=H + 2 if g == 1 else -1,
                    **common, **(saves if g == 1 else {})) for g in range(JOBS)]
    with killed_on_exit(procs):
        assert procs[1].wait(timeout=150) == -signal.SIGKILL, (tmp_path / "g1.log").read_text()[-3000:]
        resume = dict(resume=tmp_path / "ckpt_g1" / f"step={H + 1}.ckpt") if checkpoint else {}
        procs.append(launch(tmp_path, address, 1, name="g1r", data_job_index=1, **common, **resume))
        codes = wait_all([procs[0], procs[2]], tmp_path)
    assert codes == [0, 0], "\n".join((tmp_path / f"{n}.log").read_text()[-3000:] for n in ("g0", "g1r"))
    g0, killed, restarted = (load(tmp_path, n) for n in ("g0", "g1", "g1r"))

    assert killed["killed"] and killed["ledger"] == share(1, H + 2)
    assert restarted["healed"] == 1 and restarted["start_step"] == 2 * H and restarted["global_step"] == STEPS
    # from its committed position: epoch 0, 4 steps × 2 jobs × 2 samples read; the lost steps 5-6 read again
    assert restarted["ledger"] == share(1, STEPS - 2 * H, epoch=0, position=H * JOBS * 2)
    assert restarted["ledger"][:2] == killed["ledger"][H:H + 2]
    assert restarted["epochs"] == [0, 0, 1, 1]
    assert g0["healed"] == 0 and g0["ledger"] == share(0, STEPS)
    # the committed contributions: g0's 12 steps, g1's first 4 (sync of step 4), the restarted g1's 4 (step 12)
    committed = [(g0["ledger"], g0["epochs"]), (killed["ledger"][:H], killed["epochs"][:H]),
                 (restarted["ledger"], restarted["epochs"])]
    epoch0 = [i for ledger, epochs in committed for i in by_epoch(ledger, epochs).get(0, [])]
    assert sorted(epoch0) == list(range(SAMPLES))
    # every member's record: g0 read epoch 1 to its end, g1 its first 2 batches of epoch 1
    for d in (g0, restarted):
        assert d["data_positions"] == {0: (1, SAMPLES), 1: (1, 2 * JOBS * 2)}
    # the end-of-fit summary against the ledgers: the committed contributions' samples; g1 read again the batch
    # between its last committed sync and its checkpoint (what the killed run read after the checkpoint is unknown)
    contributed = {0: len(sum(g0["ledger"], [])), 1: len(sum(killed["ledger"][:H] + restarted["ledger"], []))}
    for d in (g0, restarted):
        assert d["data_summary"] == {0: {"contributed": contributed[0], "reread": 0},
                                     1: {"contributed": contributed[1], "reread": 2 if checkpoint else 0}}
