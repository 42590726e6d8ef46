"""A healing job of several DDP ranks ends up one replica even when its ranks healed from different live jobs.

torchft assigns each rank of a healing job its own source (rank ``k`` from up-to-date job ``(i + k) mod n``), so with
two live jobs rank 0 and rank 1 of the healing job load different jobs' states. With time-based syncs the live jobs
are at different global steps at a sync, so those states differ in Lightning's step counters, the LR schedulers, the
inner LR and the local-SGD schedule, not only in tensors (``ReplicaState.agree_after_healing``).
"""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("torchft")
from test_federated import killed_on_exit, launch, load, wait_all

LR, GAMMA = 0.1, 0.97  # the tiny module's inner SGD LR; the worker's --lr-decay (ExponentialLR per step)


def healing_sync_step(dump: dict) -> int:
    """The step of a live job's first committed sync with g2 after syncs without it (the one g2 healed in)."""
    attempts = [a for a in dump["attempts"] if a["committed"]]
    without = next(i for i, a in enumerate(attempts) if a["participants"] == 2)
    return next(a["step"] for a in attempts[without:] if a["participants"] == 3)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])  # (ZeRO refuses time-based syncs: its jobs sync at one step)
def test_the_ranks_of_a_job_healing_from_two_live_jobs_at_different_steps_agree_on_its_first_ranks_source(
        tmp_path, strategy):
    """Three jobs of two ranks (DDP or FSDP2 inside each), time-based syncs (0.4 s), an LR scheduler; g1 is 3× slower
    per step than g0, so at every sync they are at different global steps. g2 stalls before its step 4 (g0 and g1 sync
    without it, the lighthouse waiting 1 s for it each time), then trains step 4 and meets them at their next sync: it
    is behind and heals, rank 0 and rank 1 from different jobs (checked: they loaded states of different steps). Then
    both ranks of g2 start their next step at the step of rank 0's source, with LR ``0.1 · 0.97^step`` (by hand), that
    step's LR scheduler state and schedule count and the same local-SGD counters, and every rank of every job ends on
    one model (the stopping sync). With DDP the inner optimizer state is the first rank's too; sharded, each rank
    keeps its own shard's. Fails without the agreement of counters, LR and schedule: the ranks of g2 continue from
    their own sources' steps, with different LRs, until the first to reach max_steps ends and the other times out in
    a collective (g2 exits 1)."""
    from torchft._torchft import LighthouseServer

    server = LighthouseServer(bind="127.0.0.1:0", min_replicas=2, join_timeout_ms=1000, quorum_tick_ms=50,
                              heartbeat_timeout_ms=1000)
    try:
        address = "127.0.0.1:" + server.address().rsplit(":", 1)[-1]
        common = dict(devices=2, sync_every_seconds=0.4, max_steps=40, outer="average", lr_decay=GAMMA, barrier=3,
                      sync_timeout=30, strategy=strategy)
        procs = [launch(tmp_path, address, 0, step_sleep=0.05, mark_at_step=16, **common),
                 launch(tmp_path, address, 1, step_sleep=0.15, **common),
                 launch(tmp_path, address, 2, step_sleep=0.05, wait_for="go", wait_at_step=3, **common)]
        with killed_on_exit(procs):
            deadline = time.monotonic() + 120
            while not (tmp_path / "at_g0").exists():  # g0 and g1 synced without g2 for a while
                assert time.monotonic() < deadline and procs[0].poll() is None, \
                    (tmp_path / "g0.log").read_text()[-3000:]
                time.sleep(0.05)
            (tmp_path / "ready_go").touch()  # g2 trains step 4 and meets g0 and g1 at their next sync
            codes = wait_all(procs, tmp_path, timeout=150)
        assert codes == [0, 0, 0], "\n".join((tmp_path / f"g{g}.log").read_text()[-3000:] for g in range(3))
    finally:
        server.shutdown()
    dumps = {(j, r): load(tmp_path, f"g{j}" + (f"_r{r}" if r else "")) for j in range(3) for r in range(2)}
    first, second = dumps[2, 0], dumps[2, 1]
    assert first["healed"] == second["healed"] == 1, (first["attempts"], second["attempts"])
    (source_step,), (other_step,) = first["healed_steps"], second["healed_steps"]
    # the case under test: the two ranks loaded two live jobs' states, of different steps
    assert source_step != other_step, (source_step, other_step)
    joined = {j: healing_sync_step(dumps[j, 0]) for j in (0, 1)}  # each live job's step at g2's heal
    assert sorted(joined.values()) == sorted([source_step, other_step]), joined
    for d in (first, second):  # every rank of g2 continues as rank 0's source does
        after = d["after_heal"]
        assert after["step"] == source_step, (d["rank"], after["step"], source_step)
        assert after["lrs"] == pytest.approx([LR * GAMMA**source_step], rel=1e-6), d["rank"]
        assert after["schedulers"][0]["last_epoch"] == source_step, after["schedulers"]
        assert after["counters"]["schedule"]["steps_done"] == source_step, after["counters"]
    assert first["after_heal"]["schedulers"] == second["after_heal"]["schedulers"]
    assert first["after_heal"]["counters"] == second["after_heal"]["counters"]
    print("healed from steps", source_step, other_step, "; counters after the heal:", first["after_heal"]["counters"])
    for d in dumps.values():  # one model at the end (the stopping sync), one LR and step per job's ranks
        assert all(torch.equal(d["final"][k], dumps[0, 0]["final"][k]) for k in d["final"]), (d["group_id"], d["rank"])
    for j in range(3):
        assert dumps[j, 0]["global_step"] == dumps[j, 1]["global_step"] and dumps[j, 0]["lrs"] == dumps[j, 1]["lrs"]
