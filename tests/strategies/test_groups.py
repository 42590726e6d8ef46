"""Worker groups of 2 ranks on 4 processes: exact results and where the bytes go (CPU, gloo)."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest

from lightning_localsgd import LocalSGDFSDPStrategy, LocalSGDStrategy
from _launch import max_diff, run_tiny
from reference import simulate

ATOL = 1e-6


def test_group_size_two_collectives_and_reference(tmp_path):
    H, steps = 3, 6
    ranks = run_tiny(tmp_path, devices=4, group_size=2, sync_every=H, steps=steps, count_collectives=True,
                     seed_by_rank=True)
    history, final, _ = simulate(4, 2, sync_every=H, outer="average", steps=steps, seed=1000)
    total = sum(v.numel() for v in ranks[0]["final"].values())
    slice_numel = math.ceil(total / 2)
    sync_batches = {b for b in range(steps) if (b + 1) % H == 0}
    for r, dump in enumerate(ranks):
        g = r // 2
        owned = slice_numel if r % 2 == 0 else total - slice_numel  # the last slice is the remainder
        own_group = {2 * g, 2 * g + 1}
        for b, (got, want) in enumerate(zip(dump["steps"], history)):
            assert max_diff(got, want[g]) <= ATOL, (r, b)
        in_training = [c for c in dump["collectives"] if c["batch"] >= 0]
        cross = [c for c in in_training if c["ranks"] is None or not set(c["ranks"]) <= own_group]
        # The ranks agree on a SIGTERM (a one-element all-reduce of their flags, where Lightning broadcasts one before
        # every batch) before the batch's first hook, so it is logged under the previous batch; the strategy runs it
        # only before a batch that ends in a sync, over every rank.
        sigterm = [c for c in cross if c["op"] == "all_reduce" and c["numel"] == 1]
        assert all(c["ranks"] in (None, [0, 1, 2, 3]) for c in sigterm), sigterm
        assert {c["batch"] + 1 for c in sigterm} == sync_batches
        cross = [c for c in cross if c not in sigterm]
        # between syncs nothing leaves the worker group
        assert {c["batch"] for c in cross} == sync_batches, cross
        for b in sync_batches:
            here = [c for c in cross if c["batch"] == b]
            # one outer all-reduce per sync (one bucket for this model), over the cross group, of this rank's slice
            assert [(c["op"], sorted(c["ranks"]), c["numel"]) for c in here] == [
                ("all_reduce", [r % 2, r % 2 + 2], owned)
            ]
        # inside the group: DDP's gradient all-reduce every step (through the counting comm hook)
        inner_grad = [c for c in in_training if c["op"] == "all_reduce" and c["ranks"] == sorted(own_group)
                      and c["numel"] == total]
        assert len(inner_grad) == steps
        assert dump["info"]["bytes_sent"] == len(sync_batches) * owned * 4
        # the snapshot holds only this rank's slice
        assert dump["outer_state"]["owned_numel"] == owned


def test_group_size_two_diloco_warmup_matches_reference(tmp_path):
    ranks = run_tiny(tmp_path, devices=4, group_size=2, sync_every=2, steps=7, warmup=2, outer="diloco",
                     inner="adamw")
    history, final, _ = simulate(4, 2, sync_every=2, outer="diloco", steps=7, warmup=2, inner="adamw")
    for r, dump in enumerate(ranks):
        for b, (got, want) in enumerate(zip(dump["steps"], history)):
            assert max_diff(got, want[r // 2]) <= ATOL, (r, b, max_diff(got, want[r // 2]))
        assert max_diff(dump["final"], final[r // 2]) <= ATOL
    # warm-up steps are fully synchronous: every rank holds the same parameters
    for b in range(2):
        assert all(max_diff(d["steps"][b], ranks[0]["steps"][b]) == 0.0 for d in ranks)


@pytest.mark.parametrize("strategy", ["local_sgd_fsdp", "diloco_fsdp", "group_size_2"])
def test_one_worker_group_warns_naming_group_size(strategy):
    # FSDP's registered names default group_size to the devices per node: on one machine, one group, no local SGD
    strategy = LocalSGDStrategy(group_size=2) if strategy == "group_size_2" else strategy
    with pytest.warns(UserWarning, match=r"group_size=2 puts all 2 ranks into one worker group, so there is no other "
                                         r"group to synchronize with.*Pass group_size=1 \(2 worker groups\)"):
        L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        L.Trainer(accelerator="cpu", devices=2, strategy=LocalSGDFSDPStrategy(group_size=1), logger=False)
    assert not [w for w in caught if "one worker group" in str(w.message)]
