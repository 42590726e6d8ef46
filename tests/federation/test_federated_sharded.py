"""Sharded inner strategies inside federated jobs: FSDP2 and DeepSpeed ZeRO in each job, rank k of every job syncing
shard k through torchft (CPU, gloo).

Jobs are launched as in ``test_federated.py`` (``tests/workers/train_federated.py --strategy fsdp|deepspeed``, two
ranks each); each rank dumps the job's *full* parameters after every step (FSDP2 shards gathered inside the job), which
are compared with the same hand reference: each job's inner step is the mean gradient of its two ranks' batches (what
FSDP's reduce-scatter and ZeRO's gradient partitioning compute), and each sync is the mean over the jobs that weighed in
followed by the outer step.
"""

from __future__ import annotations

import signal
import time

import pytest
import torch

pytest.importorskip("torchft")
from test_federated import (H, HEARTBEAT_S, STEPS, assert_matches, committed, launch, lighthouse, load,  # noqa: F401
                            params_at, reference, wait_all)


def run_jobs(tmp_path, address, jobs: int, **options) -> dict[str, dict]:
    procs = [launch(tmp_path, address, g, barrier=jobs, devices=2, **options) for g in range(jobs)]
    try:
        codes = wait_all(procs, tmp_path, timeout=240)
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
    assert codes == [0] * jobs, "\n".join((tmp_path / f"g{g}.log").read_text()[-3000:] for g in range(jobs))
    return {f"g{g}{r}": load(tmp_path, f"g{g}{r}") for g in range(jobs) for r in ("", "_r1")}


def check_sharded_syncs(dumps: dict[str, dict], strategy: str, full_numel: int, padded: bool = False) -> None:
    """Every sync of every rank equals the hand reference; all ranks end identical; each rank reduced its shard."""
    assert all(d["strategy"] == strategy for d in dumps.values())
    jobs = {name: d for name, d in dumps.items() if not name.endswith("_r1")}
    ref = reference(jobs, "diloco", ranks=2)
    final = dumps["g0"]["final"]
    for name, d in dumps.items():
        assert d["global_step"] == STEPS
        assert all(committed(d, s)["participants"] == 2 and committed(d, s)["weight"] == 1.0
                   for s in range(H, STEPS + 1, H)), d["attempts"]
        assert_matches(d, ref, range(H, STEPS + 1, H))
        assert all(torch.equal(d["final"][k], final[k]) for k in final), name
    for g in jobs:  # rank k of the job synced shard k only: the two shards make one copy of the model
        sizes = [sum(t.numel() for t in dumps[n]["snapshot"]) for n in (g, g + "_r1")]
        assert min(sizes) > 0 and (sum(sizes) >= full_numel if padded else sum(sizes) == full_numel), sizes
    # the jobs really drift apart between syncs (a wrong mean would show)
    assert max(float((params_at(dumps["g0"], 2)[k] - params_at(dumps["g1"], 2)[k]).abs().max())
               for k in ref[H]) > 1e-4


@pytest.mark.slow
def test_two_jobs_of_two_ranks_fsdp_inside_each_match_the_hand_reference(tmp_path, lighthouse):
    """2 jobs × 2 ranks, FSDP2 inside each job: every sync equals the hand reference on the gathered parameters."""
    dumps = run_jobs(tmp_path, lighthouse(2), 2, outer="diloco", strategy="fsdp")
    check_sharded_syncs(dumps, "LocalSGDFSDPStrategy", sum(v.numel() for v in dumps["g0"]["final"].values()))


@pytest.mark.slow
def test_two_jobs_of_two_ranks_zero2_inside_each_match_the_hand_reference(tmp_path, lighthouse, monkeypatch):
    """2 jobs × 2 ranks, DeepSpeed ZeRO stage 2 inside each job: rank k syncs its fp32 master partition k."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    dumps = run_jobs(tmp_path, lighthouse(2), 2, outer="diloco", strategy="deepspeed", stage=2)
    check_sharded_syncs(dumps, "LocalSGDDeepSpeedStrategy", sum(v.numel() for v in dumps["g0"]["final"].values()),
                        padded=True)
