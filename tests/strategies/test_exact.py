"""The multi-process strategy against the single-process reference of tests/reference.py (CPU, gloo)."""

from __future__ import annotations

import pytest

from _launch import max_diff, run_tiny
from reference import ATOL, check_against_reference, simulate

@pytest.mark.parametrize(
    "outer,inner,warmup",
    [("average", "sgd", 0), ("diloco", "adamw", 2)],
)
def test_two_workers_match_reference(tmp_path, outer, inner, warmup):
    ranks = run_tiny(tmp_path, devices=2, sync_every=3, outer=outer, inner=inner, warmup=warmup, steps=10,
                     seed_by_rank=True)
    check_against_reference(ranks, 2, 1, sync_every=3, outer=outer, steps=10, warmup=warmup, inner=inner, seed=1000)
    syncs = (10 - warmup) // 3 + (1 if (10 - warmup) % 3 else 0)  # + the sync at train end
    assert all(d["info"]["num_syncs"] == syncs for d in ranks)
    # between syncs the two workers differ (they train on different data), at syncs they agree
    diffs = [max_diff(a, b) for a, b in zip(ranks[0]["steps"], ranks[1]["steps"])]
    assert diffs[warmup + 2] == 0.0 and diffs[warmup] > 1e-4


def test_diloco_nesterov_with_buffers_and_cpu_state(tmp_path):
    ranks = run_tiny(tmp_path, devices=2, sync_every=2, outer="diloco", inner="momentum", steps=6, buffer=True,
                     state_device="cpu", clip=0.5)
    history, final, bufs = simulate(2, 1, sync_every=2, outer="diloco", steps=6, inner="momentum", buffer=True,
                                    clip=0.5)
    for r, dump in enumerate(ranks):
        assert max_diff(dump["final"], final[r]) <= ATOL
        # float buffers are averaged at each sync; the integer counter is left alone
        assert float((dump["final"]["model.running_mean"] - bufs[r]["running_mean"]).abs().max()) <= ATOL
        assert int(dump["final"]["model.num_batches"]) == 6
        assert dump["info"]["snapshot_device"] == "cpu"


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    ranks = run_tiny(tmp_path, devices=2, sync_every=2, accumulate=2, steps=4)
    check_against_reference(ranks, 2, 1, sync_every=2, outer="average", steps=4, accumulate=2)
    assert [d["info"]["num_syncs"] for d in ranks] == [2, 2]
    assert ranks[0]["info"]["steps_done"] == 4


def test_two_optimizers_manual_optimization_count_once_per_step(tmp_path):
    # max_steps counts Lightning's global_step, which advances once per optimizer: 6 = 3 training steps
    ranks = run_tiny(tmp_path, devices=2, sync_every=2, manual=True, steps=6, outer="diloco")
    assert ranks[0]["info"]["global_step"] == 6
    assert ranks[0]["info"]["steps_done"] == 3
    check_against_reference(ranks, 2, 1, sync_every=2, outer="diloco", steps=3, two_optimizers=True)


def test_sync_every_one_averaging_equals_ddp(tmp_path):
    local = run_tiny(tmp_path / "local", devices=2, sync_every=1, steps=6)
    ddp = run_tiny(tmp_path / "ddp", devices=2, strategy="ddp", steps=6)
    for a, b in zip(local, ddp):
        for x, y in zip(a["steps"], b["steps"]):
            assert max_diff(x, y) <= ATOL


def test_bf16_mixed_precision_and_sync_metrics_reach_the_logger(tmp_path):
    import csv

    ranks = run_tiny(tmp_path, devices=2, sync_every=2, steps=4, precision="bf16-mixed", csv_dir=tmp_path / "logs",
                     outer="diloco")
    assert max_diff(ranks[0]["steps"][1], ranks[1]["steps"][1]) == 0.0  # synced after step 2
    assert max_diff(ranks[0]["steps"][2], ranks[1]["steps"][2]) > 0.0  # then apart again
    rows = list(csv.DictReader(open(tmp_path / "logs" / "metrics.csv")))
    syncs = [r for r in rows if r.get("local_sgd/syncs")]
    assert [float(r["local_sgd/syncs"]) for r in syncs] == [1.0, 2.0]
    assert [int(r["step"]) for r in syncs] == [2, 4]
    numel = sum(v.numel() for v in ranks[0]["final"].values() if v.is_floating_point())
    assert [float(r["local_sgd/bytes_sent"]) for r in syncs] == [numel * 4, 2 * numel * 4]
    assert all(float(r["local_sgd/pseudo_grad_norm"]) > 0 and float(r["local_sgd/sync_seconds"]) > 0 for r in syncs)


def test_user_on_train_end_hooks_see_the_synced_model(tmp_path):
    # 7 steps with H=3: training ends one step into an interval; the train-end sync must run before the user's
    # on_train_end hooks (here a callback's), so they see the model every rank ends with
    ranks = run_tiny(tmp_path, devices=2, sync_every=3, steps=7, seed_by_rank=True)
    assert max_diff(ranks[0]["steps"][-1], ranks[1]["steps"][-1]) > 1e-4  # apart before the train-end sync
    for d in ranks:
        assert max_diff(d["train_end"], d["final"]) == 0.0
    assert max_diff(ranks[0]["train_end"], ranks[1]["train_end"]) == 0.0
