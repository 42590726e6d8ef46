"""The robust screen through the Lightning strategy (3 gloo ranks = 3 worker groups): group 1's loss, and with SGD
its pseudo-gradient, is scaled x100 at every step; every sync leaves it out, and every rank ends on the mean of the
two honest groups, as the single-process reference computes it by hand."""

from __future__ import annotations

import csv

import pytest

from _launch import max_diff, run_tiny
from reference import simulate


@pytest.mark.slow
@pytest.mark.parametrize("compression", [None, "int8"])
def test_a_broken_group_is_left_out_of_every_sync(tmp_path, compression):
    opts = dict(sync_every=2, steps=6, loss_scale=100.0, screen_factor=10.0, compression=compression)
    ranks = run_tiny(tmp_path, devices=3, csv_dir=tmp_path / "csv", **opts)
    _, final, _ = simulate(3, 1, sync_every=2, outer="average", steps=6, loss_scales={1: 100.0}, left_out=[1],
                           compression=compression)
    for r in ranks:
        assert max_diff(r["final"], final[0]) < 1e-5
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    screened = {int(row["step"]): float(row["local_sgd/screened_out"]) for row in rows
                if row.get("local_sgd/screened_out")}
    assert screened == {2: 1.0, 4: 1.0, 6: 1.0}, screened
    # the same run with every group in the mean is far from it: the screen is what made the difference
    _, unscreened, _ = simulate(3, 1, sync_every=2, outer="average", steps=6, loss_scales={1: 100.0},
                                compression=compression)
    assert max_diff(unscreened[0], final[0]) > 1e-2


@pytest.mark.slow
def test_fsdp_groups_of_two_one_broken_group_is_left_out(tmp_path):
    # 6 ranks, FSDP over groups of 2: the norm of each group adds both shards' squares; group 1 (ranks 2, 3) x100
    ranks = run_tiny(tmp_path, devices=6, strategy="fsdp", group_size=2, sync_every=2, steps=6, loss_scale=100.0,
                     screen_factor=10.0, csv_dir=tmp_path / "csv")
    _, final, _ = simulate(6, 2, sync_every=2, outer="average", steps=6, loss_scales={1: 100.0}, left_out=[1])
    for r in ranks:
        assert max_diff(r["final"], final[0]) < 1e-5
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert [float(row["local_sgd/screened_out"]) for row in rows if row.get("local_sgd/screened_out")] == [1.0] * 3


@pytest.mark.slow
def test_no_broken_group_trains_exactly_as_without_the_screen(tmp_path):
    screened = run_tiny(tmp_path / "a", devices=3, sync_every=2, steps=6, screen_factor=10.0, outer="diloco",
                        inner="adamw", seed_by_rank=True)
    plain = run_tiny(tmp_path / "b", devices=3, sync_every=2, steps=6, outer="diloco", inner="adamw",
                     seed_by_rank=True)
    for a, b in zip(screened, plain):
        assert max_diff(a["final"], b["final"]) == 0.0
