"""The robust screen through the Lightning strategy (3 gloo ranks = 3 worker groups): group 1's loss, and with SGD
its pseudo-gradient, is scaled x100 (or negated, for the direction test) at every step; every sync leaves it out, and
every rank ends on the mean of the two honest groups, as the single-process reference computes it by hand."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

from _launch import assert_resume_exact, max_diff, run_tiny
from lightning_localsgd.checkpoint import read_checkpoint
from reference import simulate
from tiny import TinyNet, make_dataset, make_inner_optimizer


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
def test_direction_test_against_chance_leaves_out_a_sign_flipped_group(tmp_path):
    # every group reads the whole dataset in the same order, so the honest groups (0, 2) agree exactly; group 1's loss
    # is negated (with SGD its pseudo-gradient about sign-flipped, of an honest norm: the norm screen keeps it).
    # Hidden 64 (385 parameters): with the tiny default of 8 (49) an interval's pseudo-gradient fills about 7
    # effective sketch buckets, and even identical groups agree at most 2.5-3.3 null spreads above chance: below 3
    opts = dict(devices=3, sync_every=2, steps=6, loss_scale=-1.0, screen_factor=10.0, same_data=True, hidden=64)
    ranks = run_tiny(tmp_path / "chance", screen_min_cosine="chance", csv_dir=tmp_path / "csv", **opts)
    # by hand: the mean of two equal honest groups is one honest group: plain SGD on the batches in order
    torch.manual_seed(0)
    net = TinyNet(hidden=64)
    inner = make_inner_optimizer("sgd", net.parameters())
    x, y = make_dataset().tensors
    for step in range(6):
        inner.zero_grad()
        F.mse_loss(net(x[2 * step : 2 * step + 2]), y[2 * step : 2 * step + 2]).backward()
        inner.step()
    want = {k: v.detach() for k, v in net.named_parameters()}
    for r in ranks:
        assert max_diff(r["final"], want) < 1e-6
        # group 1 was the one left out, at each of the 3 syncs; the honest groups never
        assert r["outer_state"]["screen"]["offences"] == {0: [False] * 3, 1: [True] * 3, 2: [False] * 3}
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert {int(row["step"]): float(row["local_sgd/screened_out"]) for row in rows
            if row.get("local_sgd/screened_out")} == {2: 1.0, 4: 1.0, 6: 1.0}
    # the norm screen alone lets the flipped group in, and its mean is far from the honest one
    norm_only = run_tiny(tmp_path / "norm", **opts)
    assert norm_only[0]["outer_state"]["screen"]["excluded_total"] == 0
    assert max_diff(norm_only[0]["final"], want) > 1e-2


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


@pytest.mark.slow
def test_resume_keeps_the_screens_history_and_ends_as_the_uninterrupted_run(tmp_path):
    # two groups: each is held to its own history (3 kept norms needed). Group 1 breaks (x100) in the last interval,
    # after the resume at step 6: the uninterrupted run leaves it out of the sync at step 12 (5 kept norms); a resume
    # that lost the history (2 norms since) would let it in. The checkpoint is at an epoch's end (3 batches each):
    # Lightning restarts a loader from its first batch on resume, so both runs read the same data.
    opts = dict(devices=2, sync_every=2, steps=12, outer="diloco", inner="momentum", seed_by_rank=True,
                batches_per_epoch=3, screen_factor=10.0, loss_scale=100.0, loss_scale_from=10)
    straight = run_tiny(tmp_path / "a", ckpt_every=6, **opts)
    screen = straight[0]["outer_state"]["screen"]
    assert screen["excluded_total"] == 1 and len(screen["history"]) == 2  # the screen did act, once, at step 12
    assert read_checkpoint(tmp_path / "a" / "ckpt" / "step=6.ckpt")["local_sgd"]["ranks"][0]["screen"][
        "history"]  # the checkpoint holds the history the resume needs
    resumed = run_tiny(tmp_path / "b", resume=tmp_path / "a" / "ckpt" / "step=6.ckpt", **opts)
    assert_resume_exact(straight, resumed)
    for a, b in zip(straight, resumed):
        assert a["outer_state"]["screen"] == b["outer_state"]["screen"]
