"""Streaming sync (Streaming DiLoCo: ``fragments``, ``overlap_steps``, ``overlap_mix``) against the hand-written
reference ``simulate_streaming`` of tests/reference.py (CPU, gloo)."""

from __future__ import annotations

import pytest
import torch

from _launch import max_diff, run_tiny, strip
from lightning_localsgd.checkpoint import read_checkpoint
from lightning_localsgd.config import LocalSGDConfig
from lightning_localsgd.engine import split_fragments
from lightning_localsgd.engine.schedules import Action, StreamingSchedule
from reference import initial_net, reference_fragments, simulate, simulate_streaming

ATOL = 1e-6
# TinyNet: net1.weight 32, net1.bias 8, net2.weight 8, net2.bias 1
SIZES = [p.numel() for p in initial_net().parameters()]
TOTAL = sum(SIZES)


def check_against_reference(ranks, group_size, sim, atol=ATOL):
    history, final, _, _ = sim
    for r, dump in enumerate(ranks):
        g = r // group_size
        assert len(dump["steps"]) == len(history)
        for b, (got, want) in enumerate(zip(dump["steps"], history)):
            assert max_diff(got, want[g]) <= atol, f"rank {r} batch {b}: {max_diff(got, want[g])}"
        assert max_diff(dump["final"], final[g]) <= atol, f"rank {r} final: {max_diff(dump['final'], final[g])}"


def cross_all_reduces(dump):
    """(batch, numel) of the outer all-reduces during training (one rank per group: over the whole world), without
    the one-element exchange of the ranks' SIGTERM flags before a step that communicates (preemption.py)."""
    return [(c["batch"], c["numel"]) for c in dump["collectives"]
            if c["batch"] >= 0 and c["op"] == "all_reduce" and c["ranks"] == [0, 1] and c["numel"] != 1]


def test_fragments_of_tiny_net_and_reference_split():
    assert split_fragments(SIZES, 2) == [0, 1, 4]  # [net1.weight], [net1.bias, net2.weight, net2.bias]
    names = ["net1.weight", "net1.bias", "net2.weight", "net2.bias"]
    for f in (1, 2, 3, 4):
        bounds = split_fragments(SIZES, f)
        assert reference_fragments(names, SIZES, f) == [names[bounds[i] : bounds[i + 1]] for i in range(f)]


@pytest.mark.parametrize("group_size,warmup", [(1, 0), (2, 2)])
def test_reference_without_streaming_is_plain_local_sgd(group_size, warmup):
    # the hand reference itself: F=1, τ=0 is the schedule of plain local SGD (`simulate`), ends included
    for steps in (8, 10):
        plain_hist, plain_final, _ = simulate(4, group_size, sync_every=4, outer="diloco", steps=steps, inner="adamw",
                                              seed=1000, warmup=warmup)
        hist, final, _, _ = simulate_streaming(4, 4, 1, 0, 0.0, "diloco", steps, inner="adamw", seed=1000,
                                               group_size=group_size, warmup=warmup)
        for a, b in zip(plain_hist + [plain_final], hist + [final]):
            assert all(max_diff(a[g], b[g]) == 0.0 for g in range(4 // group_size))


@pytest.fixture(scope="module")
def streaming_run(tmp_path_factory):
    """F=2, τ=1, α=0.5, DiLoCo over AdamW, H=4, 10 steps: fragment 0 starts at steps 2, 6, 10, fragment 1 at 4, 8;
    each is applied one step later; fragment 0's sync started at step 10 is still in flight when training ends."""
    return run_tiny(tmp_path_factory.mktemp("stream"), devices=2, sync_every=4, fragments=2, overlap_steps=1,
                    overlap_mix=0.5, outer="diloco", inner="adamw", steps=10, seed_by_rank=True,
                    count_collectives=True)


def test_streaming_diloco_matches_reference(streaming_run):
    sim = simulate_streaming(2, 4, 2, 1, 0.5, "diloco", 10, inner="adamw", seed=1000)
    check_against_reference(streaming_run, 1, sim)
    _, final, theta_g, momentum = sim
    names = ["net1.weight", "net1.bias", "net2.weight", "net2.bias"]
    for dump in streaming_run:
        # θ_g and the outer Nesterov momentum, per parameter (momenta only move when their fragment syncs)
        outer = dump["outer_state"]
        assert not outer["pending"]
        for k, snap in zip(names, outer["snapshot"]):
            assert float((snap - theta_g[k].reshape(-1)).abs().max()) <= ATOL, k
        buffers = [outer["outer_optimizer"]["state"][i]["momentum_buffer"] for i in range(len(names))]
        for k, buf in zip(names, buffers):
            assert float((buf.reshape(-1) - momentum[k].reshape(-1)).abs().max()) <= ATOL, k
        # the last fragment finished at steps 5 and 9, then the full sync at train end
        assert dump["info"]["num_syncs"] == 3
    # groups differ between syncs, agree at the end
    assert max_diff(streaming_run[0]["steps"][7], streaming_run[1]["steps"][7]) > 1e-4
    assert max_diff(streaming_run[0]["final"], streaming_run[1]["final"]) == 0.0


@pytest.fixture(scope="module")
def one_fragment_run(tmp_path_factory):
    """F=1, τ=2, α=0: the whole model syncs every H=4 steps, applied 2 steps late, the local progress of those 2
    steps dropped; DiLoCo over momentum SGD."""
    return run_tiny(tmp_path_factory.mktemp("one"), devices=2, sync_every=4, fragments=1, overlap_steps=2,
                    outer="diloco", inner="momentum", steps=10, seed_by_rank=True, count_collectives=True)


def test_one_fragment_with_overlap_matches_reference(one_fragment_run):
    check_against_reference(one_fragment_run, 1,
                            simulate_streaming(2, 4, 1, 2, 0.0, "diloco", 10, inner="momentum", seed=1000))


def test_mix_without_overlap_is_accepted_and_streams_one_fragment():
    # α with τ=0 (torchft allows it): what a group sent differs from the new θ_g, so α still acts; the sync then
    # streams (one fragment), which ends training with a sync of every parameter
    config = LocalSGDConfig(sync_every=4, overlap_mix=0.5)
    schedule = config.build_schedule()
    assert config.streaming and isinstance(schedule, StreamingSchedule) and schedule.fragments == 1
    assert [schedule.step() for _ in range(4)][-1] is Action.STREAM
    assert (schedule.starting, schedule.finishing) == ([0], [0])  # started and applied at the same step
    assert schedule.needs_final_sync()


def test_mix_without_overlap_matches_reference(tmp_path):
    # F=1, τ=0, α=0.5, DiLoCo over AdamW, H=4, 8 steps: at steps 4 and 8 each group continues from
    # α·(what it sent) + (1−α)·θ_g; then the train-end sync of every parameter (α 0) puts both on one model
    ranks = run_tiny(tmp_path, devices=2, sync_every=4, overlap_mix=0.5, outer="diloco", inner="adamw", steps=8,
                     seed_by_rank=True)
    mixed = simulate_streaming(2, 4, 1, 0, 0.5, "diloco", 8, inner="adamw", seed=1000)
    check_against_reference(ranks, 1, mixed)
    # α acted: without it every group would hold θ_g after the sync of step 4
    unmixed, _, _, _ = simulate_streaming(2, 4, 1, 0, 0.0, "diloco", 8, inner="adamw", seed=1000)
    assert max_diff(ranks[0]["steps"][3], unmixed[3][0]) > 1e-4
    assert max_diff(ranks[0]["steps"][3], ranks[1]["steps"][3]) > 1e-4  # the groups differ after a mixed sync
    assert max_diff(ranks[0]["final"], ranks[1]["final"]) == 0.0


def test_fragments_without_overlap_after_warmup_match_reference(tmp_path):
    # staggered fragments applied at once (τ=0), plain averaging, after 2 synchronous warm-up steps (the schedule
    # counts local steps from the end of the warm-up); 9 steps end mid-interval
    ranks = run_tiny(tmp_path, devices=2, sync_every=4, fragments=2, outer="average", steps=9, warmup=2,
                     seed_by_rank=True)
    check_against_reference(ranks, 1, simulate_streaming(2, 4, 2, 0, 0.0, "average", 9, seed=1000, warmup=2))
    # fragment 0 syncs after local steps 2 and 6 (steps 4 and 8), fragment 1 after local step 4 (step 6)
    diff = [max_diff(a, b) for a, b in zip(ranks[0]["steps"], ranks[1]["steps"])]
    assert diff[0] == diff[1] == 0.0 and diff[2] > 0.0
    w0 = [float((strip(a)["net1.weight"] - strip(b)["net1.weight"]).abs().max())
          for a, b in zip(ranks[0]["steps"], ranks[1]["steps"])]
    assert [i for i in range(2, 9) if w0[i] == 0.0] == [3, 7]


def test_each_sync_sends_only_its_fragment(streaming_run, one_fragment_run):
    bounds = split_fragments(SIZES, 2)
    frag = [sum(SIZES[bounds[f] : bounds[f + 1]]) for f in range(2)]
    assert frag == [32, 17]
    for dump in streaming_run:
        # one all-reduce per sync start (batch = step − 1), of that fragment's elements only; the finishes τ=1 steps
        # later send nothing; at train end the in-flight fragment 0 is applied, then one full sync (49)
        assert cross_all_reduces(dump) == [(1, 32), (3, 17), (5, 32), (7, 17), (9, 32), (9, TOTAL)]
        assert dump["info"]["bytes_sent"] == 4 * (3 * 32 + 2 * 17 + TOTAL)
    # with one fragment the whole model moves at each sync (steps 4 and 8, then the train-end sync)
    for dump in one_fragment_run:
        assert cross_all_reduces(dump) == [(3, TOTAL), (7, TOTAL), (9, TOTAL)]
        assert dump["info"]["bytes_sent"] == 4 * 3 * TOTAL

    def peak(dump):  # elements sent in one training step, at most (the train-end sync of the last batch left out)
        per_batch = {}
        for b, n in cross_all_reduces(dump)[:-1]:
            per_batch[b] = per_batch.get(b, 0) + n
        return max(per_batch.values())

    assert peak(one_fragment_run[0]) == TOTAL
    assert peak(streaming_run[0]) == max(frag) < TOTAL  # ≈ model / F, at the granularity of whole tensors


def test_resume_with_a_fragment_in_flight_is_exact(tmp_path):
    # H=4, F=2, τ=2: fragment 0 starts at 2, 6, 10 and is applied at 4, 8, 12 (train end); fragment 1 starts at 4, 8
    # and is applied at 6, 10. The checkpoint after step 6 holds fragment 0's sync in flight. Epochs of 3 batches so
    # Lightning's dataloader restart feeds both runs the same data.
    opts = dict(devices=2, sync_every=4, fragments=2, overlap_steps=2, overlap_mix=0.5, steps=10, outer="diloco",
                inner="adamw", seed_by_rank=True, batches_per_epoch=3)
    straight = run_tiny(tmp_path / "a", ckpt_every=6, **opts)
    ckpt = tmp_path / "a" / "ckpt" / "step=6.ckpt"
    state = read_checkpoint(ckpt)["local_sgd"]
    assert state["schedule"]["steps_done"] == 6
    for rank_state in state["ranks"]:
        assert [p["fragment"] for p in rank_state["pending"]] == [0]
        assert rank_state["pending"][0]["numel"] == 32

    resumed = run_tiny(tmp_path / "b", resume=ckpt, **opts)
    for a, b in zip(straight, resumed):
        assert len(b["steps"]) == 4
        for x, y in zip(a["steps"][6:], b["steps"]):
            assert max_diff(x, y) == 0.0
        assert max_diff(a["final"], b["final"]) == 0.0
        for oa, ob in zip(a["optimizers"], b["optimizers"]):
            for sa, sb in zip(oa["state"].values(), ob["state"].values()):
                assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))
        sa, sb = a["outer_state"], b["outer_state"]
        assert all(torch.equal(x, y) for x, y in zip(sa["snapshot"], sb["snapshot"]))
        mom_a = [s["momentum_buffer"] for s in sa["outer_optimizer"]["state"].values()]
        mom_b = [s["momentum_buffer"] for s in sb["outer_optimizer"]["state"].values()]
        assert len(mom_a) == 4 and all(torch.equal(x, y) for x, y in zip(mom_a, mom_b))
        assert (sa["num_syncs"], sa["bytes_sent"]) == (sb["num_syncs"], sb["bytes_sent"])
        assert not sa["pending"] and not sb["pending"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_streaming_with_worker_groups_of_two(tmp_path, strategy):
    # 4 processes = 2 worker groups × 2 ranks. DDP: each rank of a group syncs a slice of the flat parameters, so a
    # fragment is cut across the slices; FSDP: each rank syncs its shards of the fragment's parameters.
    opts = dict(strategy="fsdp") if strategy == "fsdp" else {}
    ranks = run_tiny(tmp_path, devices=4, group_size=2, sync_every=4, fragments=2, overlap_steps=1, overlap_mix=0.5,
                     outer="diloco", inner="adamw", steps=10, seed_by_rank=True, count_collectives=True, **opts)
    sim = simulate_streaming(4, 4, 2, 1, 0.5, "diloco", 10, inner="adamw", seed=1000, group_size=2)
    check_against_reference(ranks, 2, sim, atol=1e-5)
    for r, dump in enumerate(ranks):
        cross = [(c["batch"], c["numel"]) for c in dump["collectives"]
                 if c["batch"] >= 0 and c["op"] == "all_reduce" and c["ranks"] == [r % 2, r % 2 + 2]]
        # a rank holding none of a fragment (a DDP slice) skips that fragment's collective, as does its peer
        assert all(n > 0 for _, n in cross)
        assert {b for b, _ in cross} <= {1, 3, 5, 7, 9}
        # what the two ranks of a group send for one fragment adds up to the fragment
        if r % 2 == 0:
            mate = ranks[r + 1]
            theirs = [(c["batch"], c["numel"]) for c in mate["collectives"]
                      if c["batch"] >= 0 and c["op"] == "all_reduce" and c["ranks"] == [r % 2 + 1, r % 2 + 3]]
            sent: dict[int, list[int]] = {}
            for b, n in cross + theirs:
                sent.setdefault(b, []).append(n)
            # batches 1, 3, 5, 7: one fragment each; batch 9: fragment 0, then the train-end sync of everything
            assert {b: sum(v) for b, v in sent.items()} == {1: 32, 3: 17, 5: 32, 7: 17, 9: 32 + TOTAL}
