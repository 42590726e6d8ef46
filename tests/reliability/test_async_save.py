"""Asynchronous checkpoint saves (``async_save=True``, :mod:`lightning_localsgd.async_checkpoint`).

* an async save writes the same checkpoint a synchronous one writes, from the state at the save, while training
  goes on (the save returns before its slowed-down files are written) and training is unchanged;
* every rank SIGKILLed during a background write: the new folder is not committed, ``save_top_k`` has not removed
  the previous checkpoint, and a resume from it continues exactly like the uninterrupted run;
* a background write that fails on one rank is raised on every rank (at the next save, or at the end of ``fit``) and
  its folder is never committed.
"""

from __future__ import annotations

import importlib.util
import json
import threading

import pytest
import torch

from _launch import assert_resume_exact, max_diff, run_tiny
from lightning_localsgd.async_checkpoint import AsyncCheckpointWriter, CheckpointWriteError, stage_to_host
from lightning_localsgd.checkpoint import is_checkpoint_folder, read_checkpoint

# As tests/strategies/test_resume.py: a checkpoint at step 6 (end of epoch 2, mid-interval of 4), 10 steps.
OPTS = dict(devices=2, sync_every=4, steps=10, outer="diloco", inner="adamw", seed_by_rank=True, batches_per_epoch=3)
WRITE_DELAY = 1.0  # seconds each checkpoint file write of the async run sleeps first
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed: pip install 'lightning-localsgd[deepspeed]'")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run with synchronous saves (a checkpoint at step 6)."""
    out = tmp_path_factory.mktemp("sync")
    return out, run_tiny(out, ckpt_every=6, **OPTS)


def assert_same(a, b, where="checkpoint"):
    """Nested dicts / lists of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
def test_async_save_writes_the_state_at_the_save_while_training_goes_on(tmp_path, straight):
    sync_out, sync_ranks = straight
    ranks = run_tiny(tmp_path, ckpt_every=6, async_save=True, write_delay=WRITE_DELAY, save_after_fit=True, **OPTS)
    assert_resume_exact(sync_ranks, ranks)  # writing in the background changes nothing in training
    for r in ranks:  # the save during fit returned before its files (two per rank, each WRITE_DELAY s) were written
        stall, after_fit = r["info"]["save_seconds"]
        assert stall < WRITE_DELAY, stall
        assert after_fit > WRITE_DELAY and r["info"]["after_fit_committed"]  # after fit: synchronous
    a, b = read_checkpoint(sync_out / "ckpt" / "step=6.ckpt"), read_checkpoint(tmp_path / "ckpt" / "step=6.ckpt")
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "epoch", "global_step"):
        assert_same(a[key], b[key], key)
    for key in ("schedule", "groups", "ranks", "clusters", "world_size", "group_size"):
        assert_same(a["local_sgd"][key], b["local_sgd"][key], f"local_sgd.{key}")
    # the state of step 6, though training had moved on when it was written
    assert max_diff(sync_ranks[1]["steps"][5], b["local_sgd"]["groups"][1]["state_dict"]) == 0.0
    assert max_diff(sync_ranks[1]["steps"][5], sync_ranks[1]["final"]) > 1e-4


@pytest.mark.slow
def test_killed_during_a_background_write_resumes_exactly_from_the_previous_checkpoint(tmp_path, straight):
    _, sync_ranks = straight
    crash = tmp_path / "crash"
    # saves at steps 3, 6, 9, keeping one (save_top_k=1); the step-9 save's files take 60 s each, and every rank is
    # SIGKILLed at the start of step 10 (global step 9), while they are being written
    run_tiny(crash, ckpt_every=3, save_top_k=1, async_save=True, write_delay=60.0, write_delay_from=9,
             die_during_write_at=9, expect_fail=True, **OPTS)
    for r in range(2):
        assert json.loads((crash / f"killed{r}.json").read_text()) == {"writing": True}
    ckpt = crash / "ckpt"
    assert (ckpt / "step=9.ckpt").is_dir() and not is_checkpoint_folder(ckpt / "step=9.ckpt")  # never committed
    assert is_checkpoint_folder(ckpt / "step=6.ckpt")  # save_top_k's removal of it waited for the step-9 commit
    assert not (ckpt / "step=3.ckpt").exists()  # removed once the step-6 save was committed
    resumed = run_tiny(tmp_path / "resumed", resume=ckpt / "step=6.ckpt", **OPTS)
    assert_resume_exact(sync_ranks, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", pytest.param("deepspeed", marks=needs_deepspeed)])
def test_async_save_resumes_exactly_with_sharded_strategies(tmp_path, strategy, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, in the workers too
    # FSDP: the rank files hold the parameter shards and their optimizer state; DeepSpeed writes its partitions
    # synchronously and the rank files in the background
    opts = {**OPTS, "strategy": strategy}
    straight = run_tiny(tmp_path / "a", ckpt_every=6, async_save=True, write_delay=WRITE_DELAY, **opts)
    ckpt = tmp_path / "a" / "ckpt" / "step=6.ckpt"
    assert is_checkpoint_folder(ckpt)
    resumed = run_tiny(tmp_path / "b", resume=ckpt, **opts)
    for a, b in zip(straight, resumed):
        assert max_diff(a["final"], b["final"]) == 0.0
        for got, want in zip(b["steps"], a["steps"][6:]):
            assert max_diff(got, want) == 0.0
        assert all(torch.equal(x, y) for x, y in zip(a["outer_state"]["snapshot"], b["outer_state"]["snapshot"]))
    if strategy == "fsdp":
        assert_resume_exact(straight, resumed)


@pytest.mark.slow
@pytest.mark.parametrize("fail_step, raised_in", [(3, "checkpoint_writer"), (6, "teardown")])
def test_a_failed_background_write_is_raised_on_every_rank(tmp_path, fail_step, raised_in):
    # rank 1's files of the save at `fail_step` cannot be written: raised on both ranks at the next save (step 6),
    # or at the end of fit after the last save
    out = run_tiny(tmp_path, devices=2, sync_every=4, steps=8, ckpt_every=3, async_save=True, write_fail_rank=1,
                   write_fail_step=fail_step, expect_fail=True)
    stderr = out[0]["stderr"]
    for rank in range(2):
        assert (f"[rank{rank}]: lightning_localsgd.async_checkpoint.CheckpointWriteError: the asynchronous save of "
                f"{tmp_path / 'ckpt' / f'step={fail_step}.ckpt'} failed on rank(s) [1]: rank 1: OSError: injected "
                "write failure") in stderr, stderr[-3000:]
    assert f", in {raised_in}\n" in stderr
    ckpt = tmp_path / "ckpt"
    assert not is_checkpoint_folder(ckpt / f"step={fail_step}.ckpt")  # never committed
    if fail_step == 3:  # training stopped before the step-6 save began
        assert not (ckpt / "step=6.ckpt").exists()


# ---------------------------------------------------------------------------------------------- in one process
def test_host_copy_is_taken_at_the_save_and_keeps_tied_tensors_shared():
    w = torch.ones(3)
    state = {"a": w, "tied": w.view(3), "rest": [1, ("x", torch.zeros(2))]}
    copy = stage_to_host(state)
    w.add_(1.0)  # training goes on
    assert torch.equal(copy["a"], torch.ones(3)) and copy["a"] is copy["tied"]
    assert copy["rest"][0] == 1 and copy["rest"][1][0] == "x" and torch.equal(copy["rest"][1][1], torch.zeros(2))


def test_writer_raises_a_failed_write_at_the_next_wait_and_drops_deferred_removals():
    writer, removed, committed = AsyncCheckpointWriter(), [], []
    release = threading.Event()

    def fail():
        release.wait(10)
        raise OSError("disk full")

    writer.submit(fail, lambda: committed.append(1), description="ckpt/step=3.ckpt")
    assert writer.defer_removal(lambda: removed.append("old"))  # in flight: deferred
    release.set()
    with pytest.raises(CheckpointWriteError, match=r"step=3.ckpt failed on rank\(s\) \[0\]: rank 0: OSError: "
                                                   r"disk full") as err:
        writer.wait()
    assert isinstance(err.value.__cause__, OSError)
    assert committed == [] and removed == []  # not committed, the old checkpoint kept
    writer.wait()  # raised once
    assert not writer.defer_removal(lambda: None)  # nothing in flight: the caller removes at once

    release.clear()
    writer.submit(lambda: release.wait(10), lambda: committed.append(1), description="ckpt/step=6.ckpt")
    assert writer.defer_removal(lambda: removed.append("old"))
    release.set()
    assert writer.close() is None
    assert committed == [1] and removed == ["old"]  # removed once the new checkpoint was committed
    # a removal asked for after the thread finished but before anyone waited for it: done at the wait
    writer.submit(lambda: None, lambda: committed.append(2), description="ckpt/step=9.ckpt")
    writer._thread.join()
    assert writer.defer_removal(lambda: removed.append("late"))
    writer.wait()
    assert committed == [1, 2] and removed == ["old", "late"]


def test_async_save_is_on_with_the_argument_or_lightnings_async_plugin():
    import lightning as L
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    from lightning_localsgd import LocalSGDStrategy

    assert not LocalSGDStrategy().saves_async
    assert LocalSGDStrategy(async_save=True).saves_async
    assert LocalSGDStrategy(checkpoint_io=AsyncCheckpointIO()).saves_async
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="local_sgd", plugins=[AsyncCheckpointIO()],
                        logger=False)
    assert trainer.strategy.saves_async
