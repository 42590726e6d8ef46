"""The one-world features on the sharded strategies, each fit against its own single-process hand reference:
FSDP2 with warm-up, int8 and topk compression, a registered schedule and two levels; DeepSpeed ZeRO with int8 and topk
compression, a registered schedule and two levels. (DeepSpeed refuses warm-up: support.py.)

One launch per strategy runs its fits one after another in the same 4 processes (workers/train_tiny_runs.py), so the
start-up is paid once. Worker groups of 2 ranks (2 groups) hold shards; the two-level fits use 4 groups of 1 rank in
2 clusters, the layout of features/test_two_stage.py."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from lightning_localsgd.engine.codecs import get_codec, payload_bytes
from _launch import max_diff, run_tiny
from reference import fsdp_partitions, simulate, simulate_two_stage, zero_partitions
from workers.tiny import TOPK_TEST

RUNS = Path(__file__).parent.parent / "workers" / "train_tiny_runs.py"
ATOL = 1e-5
SHAPES = [(8, 4), (8,), (1, 8), (1,)]  # TinyNet's parameters: net1.weight, net1.bias, net2.weight, net2.bias
NUMEL = sum(math.prod(s) for s in SHAPES)
SEED = 1000  # rank 0's seed (seed_by_rank): the strategies start every rank from rank 0's weights
GROUPS_OF_TWO = dict(group_size=2, seed_by_rank=True)
TWO_LEVELS = dict(group_size=1, cluster_size=2, sync_every=2, cluster_sync_every=4, outer="average",
                  cluster_outer="diloco", steps=6, seed_by_rank=True)
SCHEDULE = dict(sync_schedule="growing_test", sync_every=2, steps=7, outer="diloco")  # syncs after 2, 5 (+ end at 7)
INT8 = dict(compression="int8", sync_every=2, steps=6, outer="average")


def launch(tmp_path: Path, strategy: str, runs: dict[str, dict], **common) -> dict[str, list[dict]]:
    """Run the fits ``runs`` (name -> train_tiny.py options) in one launch of 4 ranks; return each run's rank dumps."""
    ranks = run_tiny(tmp_path, devices=4, worker=RUNS, timeout=300,
                     runs=json.dumps({name: {"strategy": strategy, **common, **opts} for name, opts in runs.items()}))
    return {name: [r["runs"][name] for r in ranks] for name in runs}


def assert_groups_follow(dumps: list[dict], history: list, group_size: int, name: str) -> None:
    """Every rank's parameters after every step equal its group's in the hand reference."""
    for r, dump in enumerate(dumps):
        assert len(dump["steps"]) == len(history), (name, r)
        for b, (got, want) in enumerate(zip(dump["steps"], history)):
            assert max_diff(got, want[r // group_size]) <= ATOL, (name, r, b, max_diff(got, want[r // group_size]))


def assert_two_levels(dumps: list[dict], inner: str) -> None:
    history, final = simulate_two_stage(4, 2, 2, 4, "average", "diloco", steps=6, inner=inner, seed=SEED)
    assert_groups_follow(dumps, history, 1, "two levels")
    for r, dump in enumerate(dumps):
        assert max_diff(dump["final"], final[r]) <= ATOL
        # level 1 after steps 2, 4, 6 and at the end; level 2 after step 4 and at the end (step 6 is mid-interval)
        assert (dump["info"]["num_syncs"], dump["info"]["cluster_syncs"]) == (4, 2)
    # the clusters differ between level-2 syncs: level 1 alone does not make every group equal
    assert max_diff(history[1][0], history[1][2]) > 1e-3


def assert_int8(dumps: list[dict], partitions: list[list[int]], inner: str, codec: str = "int8") -> None:
    """The int8 run (or the same run with another ``codec``) against the compressed hand reference."""
    history, _, _ = simulate(4, 2, sync_every=2, outer="average", steps=6, seed=SEED, inner=inner, compression=codec,
                             partitions=partitions)
    assert [tuple(t.shape) for t in history[0][0].values()] == SHAPES  # the partitions' layout is this model's
    assert_groups_follow(dumps, history, 2, codec)
    for r, dump in enumerate(dumps):
        owned = len(partitions[r % 2])
        assert dump["outer_state"]["owned_numel"] == owned  # the sync ran on this rank's shard / partition
        # 3 syncs, each one compressed copy of the shard: in 2 chunks (int8: a quarter of fp32), or one payload of
        # the whole shard that the groups all-gather (topk)
        per_sync = payload_bytes(codec, owned) if get_codec(codec).exchange == "all_gather" \
            else 2 * payload_bytes(codec, math.ceil(owned / 2))
        assert dump["info"]["bytes_sent"] == 3 * per_sync
        assert dump["outer_state"]["compression_error"].abs().max() > 0  # error feedback kept for the next sync
    # the test tells compression (and the shards' chunking) apart: the uncompressed reference is farther than ATOL
    plain, _, _ = simulate(4, 2, sync_every=2, outer="average", steps=6, seed=SEED, inner=inner)
    assert max(max_diff(p[g], h[g]) for p, h in zip(plain, history) for g in range(2)) > 5 * ATOL


def assert_schedule(dumps: list[dict], inner: str) -> None:
    history, _, _ = simulate(4, 2, sync_every=2, outer="diloco", steps=7, seed=SEED, inner=inner, sync_steps=[2, 5])
    assert_groups_follow(dumps, history, 2, "schedule")
    for dump in dumps:
        assert dump["info"]["num_syncs"] == 3  # after steps 2 and 5, and at the end of training (step 7)


@pytest.mark.slow
def test_fsdp_warmup_int8_schedule_and_two_levels_match_references(tmp_path):
    inner = "adamw"
    runs = launch(tmp_path, "fsdp", {
        "warmup": dict(warmup=2, sync_every=2, steps=6, outer="diloco", **GROUPS_OF_TWO),
        "int8": dict(**INT8, **GROUPS_OF_TWO),
        "topk": dict(INT8, compression=TOPK_TEST, **GROUPS_OF_TWO),
        "schedule": dict(**SCHEDULE, **GROUPS_OF_TWO),
        "two_levels": TWO_LEVELS,
    }, inner=inner)
    # warm-up: 2 fully synchronous steps (the groups' gradients averaged), then local SGD with syncs after steps 4, 6
    history, _, _ = simulate(4, 2, sync_every=2, outer="diloco", steps=6, warmup=2, seed=SEED, inner=inner)
    assert_groups_follow(runs["warmup"], history, 2, "warmup")
    assert all(d["info"]["num_syncs"] == 2 for d in runs["warmup"])
    assert max_diff(runs["warmup"][0]["steps"][1], runs["warmup"][2]["steps"][1]) == 0.0  # equal after warm-up
    assert_int8(runs["int8"], fsdp_partitions(SHAPES, 2), inner)
    assert_int8(runs["topk"], fsdp_partitions(SHAPES, 2), inner, TOPK_TEST)
    assert_schedule(runs["schedule"], inner)
    assert_two_levels(runs["two_levels"], inner)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_int8_schedule_and_two_levels_match_references(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, in the workers too
    inner = "adamw"
    runs = launch(tmp_path, "deepspeed", {
        "int8": dict(stage=2, **INT8, **GROUPS_OF_TWO),
        "topk": dict(INT8, stage=2, compression=TOPK_TEST, **GROUPS_OF_TWO),
        # ZeRO-3 with persistent (small) and partitioned parameters, as in test_deepspeed.py
        "schedule": dict(stage=3, ds_persist_threshold=10, **SCHEDULE, **GROUPS_OF_TWO),
        "two_levels": dict(stage=1, **TWO_LEVELS),
    }, inner=inner)
    assert_int8(runs["int8"], zero_partitions(NUMEL, 2), inner)
    assert_int8(runs["topk"], zero_partitions(NUMEL, 2), inner, TOPK_TEST)
    assert_schedule(runs["schedule"], inner)
    assert_two_levels(runs["two_levels"], inner)
