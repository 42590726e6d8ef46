"""Exact data position through resumes (lightning_localsgd.data): a user's plain DataLoader continues mid-epoch.

The sampler and loader are checked against Lightning's DistributedSampler; the multi-process tests keep a per-sample
ledger (tests/workers/train_ledger.py: every rank records the sample indices of each step) and compare a run resumed
from a mid-epoch checkpoint with the uninterrupted run, rank by rank."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, Sampler, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from _launch import run_tiny
from lightning_localsgd.data import (LOADERS_KEY, ResumableDataLoader, ResumableSampler, drop_strategy_loader_states,
                                     loader_states, make_resumable, restore_loader_states)

LEDGER = Path(__file__).resolve().parents[1] / "workers" / "train_ledger.py"


def _data(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n))


def _shares(n: int, replicas: int, start: int = 0, epoch: int = 0, **kwargs) -> list[list[int]]:
    out = []
    for rank in range(replicas):
        sampler = ResumableSampler(_data(n), num_replicas=replicas, rank=rank, **kwargs)
        sampler.set_epoch(epoch)
        sampler.start = start
        out.append(list(sampler))
    return out


# ---------------------------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize("n", [12, 13, 17])
@pytest.mark.parametrize("replicas", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle, drop_last", [(True, False), (False, False), (True, True)])
def test_a_whole_epoch_is_the_distributed_samplers(n, replicas, shuffle, drop_last):
    for epoch in (0, 3):
        for rank, share in enumerate(_shares(n, replicas, epoch=epoch, shuffle=shuffle, seed=7, drop_last=drop_last)):
            want = DistributedSampler(_data(n), num_replicas=replicas, rank=rank, shuffle=shuffle, seed=7,
                                      drop_last=drop_last)
            want.set_epoch(epoch)
            assert share == list(want)
            assert len(ResumableSampler(_data(n), num_replicas=replicas, rank=rank, drop_last=drop_last)) == len(want)


@pytest.mark.parametrize("n", [24, 25])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_a_resumed_epoch_continues_every_share(n, replicas):
    whole = _shares(n, replicas, epoch=2, seed=5)
    for done in range(len(whole[0]) + 1):  # samples each replica read before the checkpoint
        resumed = _shares(n, replicas, start=min(n, done * replicas), epoch=2, seed=5)
        for rank in range(replicas):
            assert resumed[rank] == whole[rank][done:], (done, rank)


@pytest.mark.parametrize("old, new", [(4, 2), (2, 4), (4, 3), (3, 1)])
@pytest.mark.parametrize("n", [40, 43])
def test_another_number_of_replicas_reads_the_unread_samples_once(old, new, n):
    """Elastic resume: the position counts the samples of the epoch's order read by all replicas together; the
    remaining samples are split over the new replicas, each read once (plus DistributedSampler's padding, repeats of
    the epoch's first samples, when they do not divide evenly)."""
    order = ResumableSampler(_data(n), seed=3).epoch_order()
    for done in (0, 1, 3, 5):
        read = [s for share in _shares(n, old, epoch=0, seed=3) for s in share[:done]]
        start = ResumableSampler(_data(n), num_replicas=old, seed=3).position(done)
        assert sorted(read) == sorted(order[:start])  # the position is a prefix of the order
        rest = [s for share in _shares(n, new, start=start, epoch=0, seed=3) for s in share]
        padding = -(n - start) % new
        assert Counter(rest) == Counter(order[start:]) + Counter(order[:padding])


def test_another_epoch_starts_at_its_beginning():
    sampler = ResumableSampler(_data(10), num_replicas=2, rank=1, seed=1)
    sampler.set_epoch(4)
    sampler.start = 6
    sampler.set_epoch(4)  # Lightning sets the epoch the position was restored for: kept
    assert len(list(sampler)) == 2
    sampler.set_epoch(5)
    assert sampler.start == 0 and len(list(sampler)) == 5


# ---------------------------------------------------------------------------------------------- the loader
class _UserLoader(DataLoader):
    def __init__(self, dataset, tag: str, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.tag = tag


class _EveryOther(Sampler):
    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(range(self.epoch % 2, self.n, 2))

    def __len__(self) -> int:
        return self.n // 2


class _Stream(IterableDataset):
    def __iter__(self):
        return iter(range(5))


def test_make_resumable_keeps_the_users_loader_and_lightnings_shares():
    plain = DataLoader(_data(20), batch_size=3, sampler=DistributedSampler(_data(20), num_replicas=4, rank=2,
                                                                            shuffle=True, seed=9, drop_last=True))
    out = make_resumable(plain)
    assert type(out) is ResumableDataLoader and out.batch_size == 3
    s = out.sampler
    assert isinstance(s, ResumableSampler) and (s.num_replicas, s.rank, s.shuffle, s.seed, s.drop_last) == (
        4, 2, True, 9, True)
    assert list(out.sampler) == list(plain.sampler)

    user = make_resumable(_UserLoader(_data(20), tag="mine", batch_size=2, shuffle=True))
    assert isinstance(user, _UserLoader) and isinstance(user, ResumableDataLoader) and user.tag == "mine"
    assert isinstance(user.sampler, ResumableSampler) and user.sampler.shuffle
    assert not make_resumable(DataLoader(_data(20), batch_size=2)).sampler.shuffle  # the dataset's order kept

    custom = make_resumable(DataLoader(_data(20), batch_size=2, sampler=_EveryOther(20)))
    assert type(custom) is ResumableDataLoader and isinstance(custom.sampler, _EveryOther)  # a batch position
    assert make_resumable(out) is out  # already resumable
    for untouched in (DataLoader(_Stream(), batch_size=2),  # an iterable dataset: needs a stateful loader
                      DataLoader(_data(20), batch_sampler=BatchSampler(RandomSampler(_data(20)), 2, False)),
                      "not a loader"):
        assert make_resumable(untouched) is untouched


def _batches(loader, count=None) -> list[list[int]]:
    out = []
    for batch in loader:
        out.append(batch[0].tolist())
        if count is not None and len(out) == count:
            break
    return out


@pytest.mark.parametrize("sampler", ["resumable", "custom"])
def test_a_loaders_state_continues_its_epoch(sampler):
    def make():
        s = ResumableSampler(_data(22), num_replicas=2, rank=1, seed=4) if sampler == "resumable" else _EveryOther(22)
        return ResumableDataLoader(_data(22), batch_size=3, sampler=s)

    first = make()
    first.sampler.set_epoch(1)
    whole = _batches(first)
    first.sampler.set_epoch(1)
    assert _batches(first, 2) == whole[:2]
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # as Lightning does, after the loader's state
    assert _batches(resumed) == whole[2:]
    resumed.sampler.set_epoch(2)
    assert len(_batches(resumed)) == len(resumed)  # the next epoch is whole


def test_a_position_of_another_kind_of_sampler_fails_with_the_fix():
    custom = ResumableDataLoader(_data(10), batch_size=2, sampler=_EveryOther(10))
    with pytest.raises(ValueError, match="same kind of sampler"):
        custom.load_state_dict({"epoch": 0, "samples": 4, "num_replicas": 1})
    with pytest.raises(ValueError, match="StatefulDataLoader"):
        ResumableDataLoader(_Stream(), batch_size=2)


def test_each_rank_keeps_its_own_loader_state_in_the_checkpoint():
    checkpoint = {"loops": {"fit_loop": {"state_dict": {"combined_loader": [{"rank": 1}]}}}}
    saved = loader_states(checkpoint)
    assert saved == {LOADERS_KEY: [{"rank": 1}]}
    meta = {"loops": {"fit_loop": {"state_dict": {"combined_loader": [{"rank": 0}]}}}}  # rank 0's, in meta.pt
    restore_loader_states(meta, {"outer": None, **saved})
    assert meta["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"rank": 1}]
    assert loader_states({"loops": {"fit_loop": {"state_dict": {}}}}) == loader_states({"loops": None}) == {}


def test_a_converted_checkpoint_leaves_out_the_positions_of_loaders_the_strategy_made():
    made = make_resumable(DataLoader(_data(8), batch_size=2, shuffle=True))
    own = ResumableDataLoader(_data(8), batch_size=2, sampler=_EveryOther(8))  # the user's own: its position kept
    assert made.made_by_strategy and not own.made_by_strategy
    checkpoint = {"loops": {"fit_loop": {"state_dict": {"combined_loader": [made.state_dict(), own.state_dict()]}}}}
    drop_strategy_loader_states(checkpoint)
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [own.state_dict()]
    checkpoint = {"loops": {"fit_loop": {"state_dict": {"combined_loader": [made.state_dict()]}}}}
    drop_strategy_loader_states(checkpoint)
    assert "combined_loader" not in checkpoint["loops"]["fit_loop"]["state_dict"]


# ---------------------------------------------------------------------------------------------- ledgers, N ranks
def _ledgers(tmp_path: Path, devices: int, steps: int, ckpt: int, **options) -> tuple[list[dict], list[dict]]:
    straight = run_tiny(tmp_path / "a", devices=devices, worker=LEDGER, steps=steps, ckpt_every=ckpt, **options)
    resumed = run_tiny(tmp_path / "b", devices=devices, worker=LEDGER, steps=steps,
                       resume=tmp_path / "a" / "ckpt" / f"step={ckpt}.ckpt", **options)
    return straight, resumed


def _check_epoch_once(ranks: list[dict], n: int, batches: int) -> None:
    """The first epoch of the uninterrupted run covers the dataset once, split over the ranks."""
    seen = [i for r in ranks for step in r["ledger"][:batches] for i in step]
    assert sorted(seen) == list(range(n))


@pytest.mark.slow
@pytest.mark.parametrize("devices, group_size, strategy, loader, val_every, ckpt", [
    (2, 1, "local_sgd", "plain", 0, 3),  # DDP groups of one rank
    (4, 2, "local_sgd", "plain", 0, 3),  # DDP groups of two: the group's ranks read different samples
    (2, 1, "local_sgd", "subclass", 2, 3),  # the user's own DataLoader subclass; validation every 2 batches
    (2, 1, "local_sgd", "sequential", 0, 3),  # shuffle=False (Lightning's DistributedSampler shuffles in training)
    (2, 1, "local_sgd", "workers", 0, 3),  # two worker processes each, persistent
    (2, 1, "local_sgd", "workers", 0, 10),  # ... saved at the epoch's last batch: the next epoch is whole
    (2, 1, "local_sgd", "stateful", 0, 3),  # a loader with its own (per-rank) state: left to Lightning, per rank
    (2, 1, "fsdp", "plain", 0, 3),
    pytest.param(2, 1, "deepspeed", "plain", 0, 3, marks=pytest.mark.skipif(
        __import__("importlib").util.find_spec("deepspeed") is None, reason="needs deepspeed")),
])
def test_resume_mid_epoch_reads_what_the_uninterrupted_run_reads(tmp_path, devices, group_size, strategy, loader,
                                                                 val_every, ckpt):
    # 40 samples, batches of 2: an epoch is 20 / devices batches per rank; the checkpoint at step 3 is mid-epoch and
    # the run goes on into the next epoch (reshuffled)
    n, steps = 40, 14 if devices == 2 else 8
    straight, resumed = _ledgers(tmp_path, devices, steps, ckpt, group_size=group_size, strategy=strategy,
                                 loader=loader, dataset_size=n, val_every=val_every)
    per_epoch = n // 2 // devices
    _check_epoch_once(straight, n, per_epoch)
    for rank, (a, b) in enumerate(zip(straight, resumed)):
        assert len(a["ledger"]) == steps and a["epochs"][per_epoch] == 1, rank
        assert b["ledger"] == a["ledger"][ckpt:], rank
        want = "CountingLoader" if loader == "stateful" else "ResumableUserLoader" if loader == "subclass" else \
            "ResumableDataLoader"
        assert a["loader"] == want and a["val_loader"] == ("DataLoader" if val_every else None)  # training only
    assert straight[0]["ledger"][per_epoch:2 * per_epoch] != straight[0]["ledger"][:per_epoch]  # reshuffled


@pytest.mark.slow
def test_elastic_resume_reads_the_unread_samples_of_the_epoch_once(tmp_path):
    """4 worker groups checkpoint mid-epoch, 2 resume: "continues" means the samples of the epoch the 4 groups had
    not read when the checkpoint was taken are read once, split over the 2 groups, and the next epoch is whole."""
    n, ckpt = 40, 3  # an epoch is 5 batches of 2 per rank on 4 ranks; 3 of them (24 samples) before the checkpoint
    options = dict(strategy="local_sgd", group_size=1, sync_every=3, dataset_size=n)
    before = run_tiny(tmp_path / "a", devices=4, worker=LEDGER, steps=ckpt, ckpt_every=ckpt, **options)
    resumed = run_tiny(tmp_path / "b", devices=2, worker=LEDGER, steps=ckpt + 4 + 10,
                       resume=tmp_path / "a" / "ckpt" / f"step={ckpt}.ckpt", **options)
    read = [i for r in before for step in r["ledger"] for i in step]
    for epoch, already in ((0, read), (1, [])):
        rest = [i for r in resumed for step, e in zip(r["ledger"], r["epochs"]) if e == epoch for i in step]
        assert sorted(already + rest) == list(range(n)), epoch
    for r in resumed:
        assert r["epochs"] == [0] * 4 + [1] * 10 and r["global_step"] == ckpt + 4 + 10
