"""Two-stage (multi-cluster) sync: 4 processes = 2 clusters × 2 worker groups, against a reference by hand.

(Its bad arguments are rows of the tables in reliability/test_inputs.py.)"""

from __future__ import annotations

import pytest

from lightning_localsgd import LocalSGDStrategy
from _launch import max_diff, run_tiny
from reference import simulate_two_stage

ATOL = 1e-6


def test_two_stage_matches_reference(tmp_path):
    opts = dict(devices=4, sync_every=2, cluster_size=2, cluster_sync_every=4, outer="average", cluster_outer="diloco",
                steps=9, seed_by_rank=True, count_collectives=True)
    ranks = run_tiny(tmp_path, **opts)
    history, final = simulate_two_stage(4, 2, 2, 4, "average", "diloco", steps=9, seed=1000)
    for r, dump in enumerate(ranks):
        for b, (got, want) in enumerate(zip(dump["steps"], history)):
            assert max_diff(got, want[r]) <= ATOL, (r, b, max_diff(got, want[r]))
        assert max_diff(dump["final"], final[r]) <= ATOL
        # 4 level-1 syncs + the one at train end; 2 level-2 syncs + the one at train end
        assert (dump["info"]["num_syncs"], dump["info"]["cluster_syncs"]) == (5, 3)
        # level-1 reduces stay inside the cluster, level-2 reduces pair the clusters
        reduces = [sorted(c["ranks"]) for c in dump["collectives"] if c["op"] == "all_reduce" and c["numel"] == 49]
        cluster = [0, 1] if r < 2 else [2, 3]
        across = [r % 2, r % 2 + 2]
        assert reduces == [cluster, cluster, across, cluster, cluster, across, cluster, across]


@pytest.mark.slow
def test_two_stage_mid_interval_resume_is_exact(tmp_path):
    # checkpoint at step 6: after a level-1 sync, between two level-2 syncs (H1=2, H2=4); epochs of 3 batches so
    # that Lightning's dataloader restart feeds both runs the same data
    opts = dict(devices=4, sync_every=2, cluster_size=2, cluster_sync_every=4, outer="diloco", steps=9,
                batches_per_epoch=3, inner="adamw")
    straight = run_tiny(tmp_path / "a", ckpt_every=6, **opts)
    resumed = run_tiny(tmp_path / "b", resume=tmp_path / "a" / "ckpt" / "step=6.ckpt", **opts)
    for a, b in zip(straight, resumed):
        assert max_diff(a["final"], b["final"]) == 0.0
        assert (a["info"]["num_syncs"], a["info"]["cluster_syncs"]) == (b["info"]["num_syncs"], b["info"]["cluster_syncs"])
