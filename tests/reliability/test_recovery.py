"""Faults found by the probe of issue 16, each with the behaviour it must have now:

* a frozen rank 0 (SIGSTOP: the host of the rendezvous store) does not hang the others: they stop within a small
  multiple of ``sync_timeout``, naming rank 0;
* ``on_nonfinite="skip"`` recovers from a NaN loss with AdamW (the NaN group's optimizer state is reset), checked
  against the same run simulated by hand, and N consecutive skips raise;
* a NaN in a floating-point buffer is caught like one in a parameter;
* a damaged or truncated checkpoint is refused before use, with one clear message;
* a changed outer learning rate on resume is used (with a warning), another outer optimizer class is refused;
* a changed ``fragments`` on resume is refused before training; a bug inside a sync is not reported as a network
  failure.
"""

from __future__ import annotations

import copy
import functools
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import _forkserver
from _launch import WORKER, max_diff, run_tiny
from reference import Alone, initial_net, rank_batches

from lightning_localsgd import AtomicCheckpointIO, LocalSGDConfig, LocalSGDController, OuterSync
from lightning_localsgd.checkpoint import check_exact_resume
from lightning_localsgd.checkpoint_io import atomic_save
from lightning_localsgd.integrity import CorruptCheckpointError, checksum_path, verify
from lightning_localsgd.reliability import SyncGuard

from _forkserver import free_port
from _launch import worker_flags
from test_failures import _env


# ------------------------------------------------------------------------------------------------ 1. frozen rank 0
@pytest.mark.slow
def test_frozen_rank_0_does_not_hang_the_others(tmp_path):
    world, timeout = 2, 3.0
    port = free_port()
    procs = []
    for r in range(world):
        env = {**_env(), "LOCAL_RANK": str(r), "NODE_RANK": "0", "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, str(WORKER), "--devices", str(world), "--out", str(tmp_path),
               *worker_flags(dict(sync_every=4, steps=10, freeze_at=5, fault_rank=0, sync_timeout=timeout))]
        log = open(tmp_path / f"log{r}.txt", "w")
        procs.append((_forkserver.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    try:
        frozen_since = None
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and procs[1][0].poll() is None:
            if frozen_since is None and "[fault] rank 0 freezes" in (tmp_path / "log0.txt").read_text():
                frozen_since = time.monotonic()
            time.sleep(0.1)
        rc = procs[1][0].poll()
        waited = time.monotonic() - (frozen_since or time.monotonic())
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL also ends a stopped process
                p.wait()
            log.close()
    text = (tmp_path / "log1.txt").read_text()
    print(f"rank 1 stopped {waited:.1f} s after rank 0 froze (sync_timeout={timeout:g} s)")
    assert rc is not None, "rank 1 still waits for the frozen rank 0 after 150 s: a hang\n" + text[-3000:]
    assert rc != 0, text[-3000:]
    assert frozen_since is not None
    assert waited < 12 * timeout, f"rank 1 took {waited:.0f} s after rank 0 froze (sync_timeout={timeout:g})"
    assert "rank(s) [0]" in text, text[-3000:]


# ------------------------------------------------------------------------------------------------ 2. skip recovers
def simulate_nan_loss_skip(steps: int, sync_every: int, nan_step: int) -> dict[str, torch.Tensor]:
    """2 groups, AdamW inside, averaging; group 1's loss is NaN at step ``nan_step`` (1-based): the next sync is
    skipped (both groups restart from θ_g, group 1 with a fresh AdamW), the later ones go through."""
    base = initial_net()
    nets = [copy.deepcopy(base) for _ in range(2)]
    make = lambda net: torch.optim.AdamW(net.parameters(), lr=0.01, weight_decay=0.01)  # noqa: E731
    opts = [make(n) for n in nets]
    batches = [rank_batches(2, r) for r in range(2)]
    snapshot = {k: v.detach().clone() for k, v in base.named_parameters()}
    for step in range(1, steps + 1):
        for g in range(2):
            x, y = batches[g][step - 1]
            opts[g].zero_grad()
            loss = F.mse_loss(nets[g](x), y)
            (loss * float("nan") if (g == 1 and step == nan_step) else loss).backward()
            opts[g].step()
        if step % sync_every == 0:
            params = [dict(n.named_parameters()) for n in nets]
            finite = all(torch.isfinite(p).all() for ps in params for p in ps.values())
            with torch.no_grad():
                for k in snapshot:
                    if finite:
                        snapshot[k] = torch.stack([p[k] for p in params]).mean(0)
                    for p in params:
                        p[k].copy_(snapshot[k])
            if not finite:
                opts[1] = make(nets[1])
    return snapshot


def test_skip_resets_the_nan_groups_optimizer_and_recovers(tmp_path):
    ranks = run_tiny(tmp_path, devices=2, sync_every=8, steps=40, inner="adamw", on_nonfinite="skip",
                     nan_loss_at=12)
    for r in ranks:
        assert r["info"]["num_syncs"] == 4, r["info"]  # 5 syncs, the one at step 16 skipped
        assert all(torch.isfinite(v).all() for v in r["final"].values())
    assert max_diff(ranks[0]["final"], simulate_nan_loss_skip(40, 8, 13)) < 1e-5
    assert max_diff(ranks[0]["final"], ranks[1]["final"]) == 0


def test_consecutive_skips_raise(tmp_path):
    # a NaN weight on group 1 at every step: every sync would be skipped; the second consecutive skip raises
    ranks = run_tiny(tmp_path, devices=2, sync_every=2, steps=12, on_nonfinite="skip", nan_from=1,
                     max_consecutive_skips=2, expect_fail=True)
    err = ranks[0]["stderr"] + ranks[0]["stdout"]
    assert "2 consecutive syncs were skipped" in err, err[-3000:]


# ------------------------------------------------------------------------------------------------ 3. buffers
def test_nan_buffer_raises_like_a_nan_parameter(tmp_path):
    ranks = run_tiny(tmp_path, devices=2, sync_every=4, steps=8, buffer=True, nan_buffer_at=2, expect_fail=True)
    err = ranks[0]["stderr"] + ranks[0]["stdout"]
    assert "NonFinitePseudoGradientError" in err and "buffer" in err, err[-3000:]
    assert "local SGD sync at step 4" in err


# ------------------------------------------------------------------------------------------------ 4. integrity
def _checkpoint() -> dict:
    return {"state_dict": {"w": torch.arange(4096, dtype=torch.float32)}, "epoch": 3}


def test_atomic_save_writes_a_checksum_that_load_verifies(tmp_path):
    path = tmp_path / "a.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(), path)
    assert checksum_path(path).is_file() and verify(path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], _checkpoint()["state_dict"]["w"])
    io.remove_checkpoint(path)
    assert not path.exists() and not checksum_path(path).exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_checkpoint_is_refused_with_one_clear_message(tmp_path, damage):
    path = tmp_path / "a.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(), path)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        for i in range(1000, 1064):
            data[i] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="is damaged"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_unverified_empty_checkpoint_gives_one_clear_message(tmp_path):
    path = tmp_path / "b.ckpt"
    path.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="cannot be read: it is empty, truncated"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_crash_between_sidecar_and_rename_leaves_a_verifiable_checkpoint(tmp_path):
    path = tmp_path / "c.ckpt"
    atomic_save({"v": 1}, path)
    old = path.read_bytes()
    atomic_save({"v": 2}, path)
    path.write_bytes(old)  # as if the new sidecar was in place but the rename of the new file never happened
    assert verify(path) and torch.load(path, weights_only=False) == {"v": 1}


# ------------------------------------------------------------------------------------------------ 5, 7. resume
def test_new_outer_learning_rate_wins_on_resume(caplog):
    params = [torch.zeros(3)]
    engine = OuterSync(params, outer_optimizer=functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9),
                       cross_group=Alone())
    params[0].add_(1.0)
    engine.sync()
    resumed = OuterSync([torch.zeros(3)], outer_optimizer=functools.partial(torch.optim.SGD, lr=0.3, momentum=0.9),
                        cross_group=Alone())
    with caplog.at_level("WARNING"):
        resumed.load_state_dict(engine.state_dict())
    assert resumed.outer_optimizer.param_groups[0]["lr"] == 0.3
    assert "lr: 0.7 -> 0.3" in caplog.text
    adam = OuterSync([torch.zeros(3)], outer_optimizer=torch.optim.Adam, cross_group=Alone())
    with pytest.raises(ValueError, match="outer optimizer is SGD.*this run's is Adam"):
        adam.load_state_dict(engine.state_dict())


def test_changed_fragments_on_resume_is_refused():
    written = LocalSGDController(LocalSGDConfig(sync_every=8, fragments=4))
    meta = written.meta(world_size=2)
    with pytest.raises(ValueError, match="fragments=4.*fragments=1"):
        check_exact_resume(meta, LocalSGDConfig(sync_every=8, fragments=1), world_size=2)


def test_a_bug_in_a_sync_is_not_reported_as_a_network_failure():
    guard = SyncGuard(timeout=None, groups=[], rank=0, world_size=1, store=None)
    with pytest.raises(RuntimeError, match="finish_sync") as err:
        with guard.sync(7):
            raise RuntimeError("finish_sync(0) without a started sync of that fragment.")
    assert "SyncFailedError" not in type(err.value).__name__
