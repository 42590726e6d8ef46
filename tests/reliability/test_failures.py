"""Failures and restarts through the Lightning strategy (CPU, gloo, several processes).

* a rank killed (SIGKILL) mid-interval: every other rank stops at the next sync with a ``SyncFailedError`` naming the
  dead rank and the step; the last checkpoint is complete and resuming from it gives exactly the uninterrupted run;
* a rank that hangs: the others stop after ``sync_timeout``, and the hung rank is stopped too;
* resuming with another world size or another model shape fails before training, saying what changed;
* a NaN pseudo-gradient (``on_nonfinite="raise"``) stops training with a ``NonFinitePseudoGradientError`` naming the
  step and the worker group, and the checkpoint of the last good sync is intact;
* ``on_nonfinite="skip"`` drops a NaN sync on every rank, logs it, and training goes on.

The kill tests start every rank themselves with ``LOCAL_RANK`` set, as torchrun or SLURM do: with Lightning's own
launcher the process of rank 0 SIGKILLs itself and the other ranks within 5 s of any child's death
(``_ChildProcessObserver``), which would hide what the surviving ranks do.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_localsgd import NonFinitePseudoGradientError
from lightning_localsgd.checkpoint import read_checkpoint
import _forkserver
from _forkserver import free_port
from _launch import WORKER, max_diff, run_tiny, worker_flags

# The configuration of strategies/test_resume.py: a checkpoint at step 6 (end of epoch 2, mid-interval of 4).
RESUME_OPTS = dict(devices=2, sync_every=4, steps=10, outer="diloco", inner="adamw", seed_by_rank=True,
                   batches_per_epoch=3)
SYNC_TIMEOUT = 3.0


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"):
        env.pop(var, None)
    return env




def launch_each_rank(out: Path, world: int, timeout: float = 150, frozen: tuple[int, ...] = (), **options) -> list[dict]:
    """Start all ranks as separate processes (LOCAL_RANK set: no Lightning launcher); return per rank its exit code,
    its output and the time it exited (monotonic). The ranks in ``frozen`` (they SIGSTOP themselves) are not waited
    for: they are killed once the others have ended."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for r in range(world):
        env = {**_env(), "LOCAL_RANK": str(r), "NODE_RANK": "0", "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        log = open(out / f"log{r}.txt", "w")
        logs.append(log)
        cmd = [sys.executable, str(WORKER), "--devices", str(world), "--out", str(out), *worker_flags(options)]
        procs.append(_forkserver.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    ended: list[float | None] = [None] * world
    deadline = time.monotonic() + timeout
    try:
        while any(t is None for r, t in enumerate(ended) if r not in frozen) and time.monotonic() < deadline:
            for r, p in enumerate(procs):
                if ended[r] is None and p.poll() is not None:
                    ended[r] = time.monotonic()
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    assert all(t is not None for r, t in enumerate(ended) if r not in frozen), f"ranks still running after {timeout} s: a hang"
    return [{"rc": p.returncode, "log": (out / f"log{r}.txt").read_text(), "ended": ended[r]}
            for r, p in enumerate(procs)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[list[dict], Path]:
    """The uninterrupted reference run (2 ranks, 10 steps) and its checkpoint at step 6."""
    out = tmp_path_factory.mktemp("straight")
    ranks = run_tiny(out, ckpt_every=6, **RESUME_OPTS)
    return ranks, out / "ckpt" / "step=6.ckpt"


def _assert_complete_checkpoint(path: Path, world: int) -> None:
    ckpt = read_checkpoint(path)
    assert ckpt["local_sgd"]["world_size"] == world and ckpt["local_sgd"]["schedule"]["steps_done"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert not [p.name for p in path.parent.rglob("*") if p.name.endswith(".tmp")]  # no half-written leftovers


@pytest.mark.slow
def test_killed_rank_stops_the_others_naming_it_and_the_step(tmp_path):
    # 3 ranks, sync every 4 steps; rank 1 is SIGKILLed at the start of step 7 (mid-interval): ranks 0 and 2 reach
    # the sync at the end of step 8 and stop there.
    ranks = launch_each_rank(tmp_path, world=3, sync_every=4, steps=10, die_at=7, fault_rank=1, ckpt_every=6,
                             batches_per_epoch=3, sync_timeout=SYNC_TIMEOUT)
    assert ranks[1]["rc"] == -signal.SIGKILL
    for r in (0, 2):
        log = ranks[r]["log"]
        assert ranks[r]["rc"] not in (0, None), log[-3000:]
        assert "SyncFailedError" in log, log[-3000:]
        assert f"local SGD sync at step 8 failed on rank {r}: rank(s) [1] did not reach it" in log, log[-3000:]
        assert "rank 1: last sync at step 4" in log and "ckpt_path=" in log
        # stopped within sync_timeout of the death (plus process start-up/teardown slack on a busy CI machine)
        assert ranks[r]["ended"] - ranks[1]["ended"] < SYNC_TIMEOUT + 20
        assert not (tmp_path / f"rank{r}.pt").exists()  # training did not finish
    _assert_complete_checkpoint(tmp_path / "ckpt" / "step=6.ckpt", world=3)


def test_killed_rank_0_then_resume_continues_exactly(tmp_path, straight):
    straight_ranks, straight_ckpt = straight
    # rank 0 hosts the rendezvous store and writes the checkpoints; it dies at step 7, after the step-6 checkpoint.
    crash = tmp_path / "crash"
    ranks = launch_each_rank(crash, world=2, die_at=7, fault_rank=0, ckpt_every=6, sync_timeout=SYNC_TIMEOUT,
                             **{k: v for k, v in RESUME_OPTS.items() if k != "devices"})
    assert ranks[0]["rc"] == -signal.SIGKILL
    log = ranks[1]["log"]
    assert ranks[1]["rc"] not in (0, None), log[-3000:]
    assert "local SGD sync at step 8 failed on rank 1: rank(s) [0] did not reach it - global rank 0 is gone" in log, \
        log[-3000:]
    ckpt = crash / "ckpt" / "step=6.ckpt"
    _assert_complete_checkpoint(ckpt, world=2)
    # the checkpoint is the one the uninterrupted run wrote at step 6, tensor for tensor
    a, b = read_checkpoint(ckpt), read_checkpoint(straight_ckpt)
    assert max_diff(a["state_dict"], b["state_dict"]) == 0.0
    assert max_diff(a["local_sgd"]["groups"][1]["state_dict"], b["local_sgd"]["groups"][1]["state_dict"]) == 0.0

    # resuming from it ends exactly where the uninterrupted run ended (parameters, inner and outer optimizer states)
    resumed = run_tiny(tmp_path / "resumed", resume=ckpt, **RESUME_OPTS)
    for s, r in zip(straight_ranks, resumed):
        assert max_diff(s["final"], r["final"]) == 0.0
        for oa, ob in zip(s["optimizers"], r["optimizers"]):
            for sa, sb in zip(oa["state"].values(), ob["state"].values()):
                assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))
        assert all(torch.equal(x, y) for x, y in zip(s["outer_state"]["snapshot"], r["outer_state"]["snapshot"]))
        assert s["info"]["num_syncs"] == r["info"]["num_syncs"] == 3


@pytest.mark.slow
def test_hung_rank_times_out_and_every_rank_stops(tmp_path):
    # Lightning's own launcher: rank 1 (a child of rank 0) sleeps 120 s at step 5; rank 0 waits at the sync of
    # step 8 for sync_timeout, then fails naming rank 1, and stops the hung child instead of leaving it behind.
    cmd = [sys.executable, str(WORKER), "--devices", "2", "--out", str(tmp_path),
           *worker_flags(dict(sync_every=4, steps=10, stall_at=5, stall_seconds=120, fault_rank=1,
                        sync_timeout=SYNC_TIMEOUT))]
    start = time.monotonic()
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        try:
            rc = proc.wait(timeout=100)
        finally:
            if proc.poll() is None:
                proc.kill()
    elapsed = time.monotonic() - start
    text = (tmp_path / "log.txt").read_text()
    try:
        assert rc != 0, text[-3000:]
        assert elapsed < 60, f"took {elapsed:.0f} s: the hung rank was waited for"
        assert ("local SGD sync at step 8 failed on rank 0: rank(s) [1] did not reach it within sync_timeout=3 s"
                in text), text[-3000:]
        # the hung rank was stopped with rank 0 (no process of the run is left)
        for _ in range(50):
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("a rank of the run is still alive after rank 0 stopped")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the session of the run started above, in case the test failed
        except ProcessLookupError:
            pass


def test_resume_on_another_world_size_starts_every_group_from_theta_g(tmp_path, straight):
    # 2 -> 4 ranks: an elastic resume (tests/strategies/test_elastic_resume.py checks it against a hand reference);
    # FSDP, whose shards cannot be re-cut, still refuses (tests/strategies/test_fsdp.py)
    _, ckpt = straight
    ranks = run_tiny(tmp_path, resume=ckpt, **{**RESUME_OPTS, "devices": 4})
    for dump in ranks:
        assert dump["info"]["global_step"] == 10 and dump["info"]["num_syncs"] == 3
        assert max_diff(dump["final"], ranks[0]["final"]) == 0.0  # one model after the train-end sync


def test_resume_with_another_model_shape_fails_clearly(tmp_path, straight):
    _, ckpt = straight
    out = run_tiny(tmp_path, expect_fail=True, resume=ckpt, hidden=16, **RESUME_OPTS)
    err = out[0]["stderr"]
    assert "the checkpoint was written for another model" in err, err[-3000:]
    assert "model.net1.weight: checkpoint (8, 4), model (16, 4)" in err
    assert "Resume with the model configuration the checkpoint was written with" in err


def test_nonfinite_pseudo_gradient_names_step_and_group(tmp_path):
    out = run_tiny(tmp_path, devices=2, sync_every=2, steps=6, nan_at=2, ckpt_every=2, expect_fail=True)
    err = out[0]["stderr"]
    assert NonFinitePseudoGradientError.__name__ in err
    assert "local SGD sync at step 4" in err and "worker groups with NaN/inf parameters: [1]" in err
    # the checkpoint written at the last good sync is intact and finite
    ckpt = read_checkpoint(tmp_path / "ckpt" / "step=2.ckpt")
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_nonfinite_skip_drops_the_sync_on_every_rank_and_logs_it(tmp_path):
    # group 1 gets a NaN weight at step 3 (global_step 2); the sync at step 4 sees a NaN pseudo-gradient: skipped,
    # every rank restarts from the global parameters of the sync at step 2, and training goes on.
    csv_dir = tmp_path / "csv"
    ranks = run_tiny(tmp_path, devices=2, sync_every=2, steps=6, nan_at=2, on_nonfinite="skip", csv_dir=csv_dir)
    for r in ranks:
        assert max_diff(r["steps"][3], ranks[0]["steps"][1]) == 0.0  # reset to θ_g of step 2
        assert all(torch.isfinite(v).all() for v in r["final"].values())
        assert r["info"]["num_syncs"] == 2  # steps 2 and 6; the skipped one does not count
    assert max_diff(ranks[0]["final"], ranks[1]["final"]) == 0.0
    rows = list(csv.DictReader(open(csv_dir / "metrics.csv")))
    skipped = {int(row["step"]): float(row["local_sgd/skipped"]) for row in rows if row.get("local_sgd/skipped")}
    assert skipped == {2: 0.0, 4: 1.0, 6: 0.0}, skipped
