"""Time-based sync of uneven workers (``sync_every_seconds``): token-weighted averages against a hand reference.

One rank is slowed down (it sleeps at every step), so the groups run different numbers of steps between syncs. Every
rank records, at each sync, its parameters going in, the weight it sent and the parameters coming out; the expected
result is computed here by hand: ``Σ_i w_i θ_i / Σ_i w_i`` with ``w_i`` = tokens group ``i`` processed since the
last sync (the tiny model's batch is 2 × 4 values, so 8 per step).
"""

from __future__ import annotations

import pytest
import torch

from _launch import run_tiny
from reference import weighted_compressed_sync

TOKENS_PER_STEP = 2 * 4  # batch 2 of 4 features: the elements of the batch's first tensor
ATOL = 1e-6


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())


def check_weighted_syncs(ranks: list[dict], group_size: int) -> None:
    groups = len(ranks) // group_size
    leaders = [ranks[g * group_size] for g in range(groups)]
    counts = {len(d["syncs"]) for d in ranks}
    assert len(counts) == 1, f"ranks took part in different numbers of syncs: {counts}"
    assert counts.pop() >= 1
    previous_step = [0] * len(ranks)
    for k in range(len(ranks[0]["syncs"])):
        for r, d in enumerate(ranks):
            s = d["syncs"][k]
            # the weight is the tokens this rank processed since the previous sync
            assert s["weight"] == TOKENS_PER_STEP * (s["step"] - previous_step[r]), (r, k, s["weight"], s["step"])
            previous_step[r] = s["step"]
        weights = [leaders[g]["syncs"][k]["weight"] for g in range(groups)]
        befores = [leaders[g]["syncs"][k]["before"] for g in range(groups)]
        total = sum(weights)
        if total == 0:
            expected = ranks[0]["syncs"][k]["after"]  # nothing new anywhere: θ_g unchanged
        else:
            expected = {name: sum(w * b[name] for w, b in zip(weights, befores)) / total for name in befores[0]}
        for r, d in enumerate(ranks):
            assert _max_diff(expected, d["syncs"][k]["after"]) <= ATOL, (r, k)
    # every rank ends with the same model, after the last (stopping) sync
    for d in ranks[1:]:
        assert _max_diff(ranks[0]["final"], d["final"]) == 0.0


def test_slow_worker_token_weighted_average(tmp_path):
    ranks = run_tiny(tmp_path, devices=2, sync_every_seconds=0.6, steps=150, slow_rank=1, slow_seconds=0.06,
                     seed_by_rank=True, inner="adamw", batches_per_epoch=200)
    check_weighted_syncs(ranks, group_size=1)
    fast, slow = ranks[0]["info"], ranks[1]["info"]
    # the fast worker ran more steps than the slow one, and the slow one did not hold it back to its own pace
    assert fast["global_step"] > 1.5 * slow["global_step"], (fast["global_step"], slow["global_step"])
    # at least one sync mixed unequal weights (otherwise the weighting is not tested)
    assert any(a["weight"] != b["weight"] and b["weight"] > 0
               for a, b in zip(ranks[0]["syncs"], ranks[1]["syncs"]))
    # the last sync is the stop signal of the group that finished first, and every rank learned it
    assert all(d["syncs"][-1]["stop_requested"] for d in ranks)
    # a slow group stalls the fast one for at most about one of its steps per sync, never a whole run
    assert max(s["seconds"] for s in ranks[0]["syncs"]) < 0.6 + 5.0


def _flat(params: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in params.values()])


def test_slow_worker_token_weighted_int8_syncs_match_the_weighted_compressed_reference(tmp_path):
    # time-based + int8: every sync is the weighted two-phase compressed mean, error feedback carried between syncs
    # the fast rank ends the run (its stop reaches the slow one): 1,200 of its steps outlast several 0.3 s intervals
    ranks = run_tiny(tmp_path, devices=2, sync_every_seconds=0.3, steps=1200, slow_rank=1, slow_seconds=0.03,
                     seed_by_rank=True, inner="adamw", batches_per_epoch=1400, compression="int8")
    syncs = [d["syncs"] for d in ranks]
    assert len({len(s) for s in syncs}) == 1 and len(syncs[0]) >= 2
    theta = syncs[0][0]["theta_g"]  # the common start (every group holds it: one group of one rank each)
    errors, mean_errors = [torch.zeros_like(theta) for _ in ranks], [None, None]
    for k in range(len(syncs[0])):
        assert all(float((s[k]["theta_g"] - theta).abs().max()) <= 1e-5 for s in syncs), k  # θ_g carried over
        weights = [s[k]["weight"] for s in syncs]
        if sum(weights) > 0:  # all zero: nothing new anywhere, θ_g unchanged
            theta, errors, mean_errors = weighted_compressed_sync(theta, [_flat(s[k]["before"]) for s in syncs],
                                                                  weights, errors, mean_errors, codec="int8")
        for r, s in enumerate(syncs):
            assert float((_flat(s[k]["after"]) - theta).abs().max()) <= 1e-5, (r, k)
    assert any(a["weight"] != b["weight"] and b["weight"] > 0 for a, b in zip(*syncs))  # unequal weights mixed
    assert all(s[-1]["stop_requested"] for s in syncs)


@pytest.mark.parametrize("strategy", ["local_sgd", "fsdp"])
@pytest.mark.slow
def test_groups_of_two_agree_on_the_sync_step(tmp_path, strategy):
    # 4 processes, 2 groups of 2 (DDP or FSDP inside); rank 3 (group 1) is slow, so all of group 1 is slow
    ranks = run_tiny(tmp_path, devices=4, group_size=2, sync_every_seconds=0.6, steps=80, slow_rank=3,
                     slow_seconds=0.05, batches_per_epoch=60, timeout=300, strategy=strategy)
    check_weighted_syncs(ranks, group_size=2)
    assert ranks[0]["info"]["global_step"] == ranks[1]["info"]["global_step"]
    assert ranks[2]["info"]["global_step"] == ranks[3]["info"]["global_step"]
    assert ranks[0]["info"]["global_step"] > ranks[2]["info"]["global_step"]


@pytest.mark.parametrize("extra,needle", [
    ({"ckpt_every": 2}, "checkpoint callbacks"),
    ({"validate_every": 2}, "validation during fit"),  # two groups stepping apart in one world: refused
])
def test_collectives_between_syncs_are_refused_before_training(tmp_path, extra, needle):
    out = run_tiny(tmp_path, devices=2, sync_every_seconds=1.0, steps=4, expect_fail=True, **extra)
    text = out[0]["stderr"] + out[0]["stdout"]
    assert "sync_every_seconds" in text and needle in text


# ---------------------------------------------------------------------------------------------- time-based streaming
class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_time_based_streaming_schedule_takes_fragments_in_turn_by_the_clock():
    from lightning_localsgd.engine.schedules import Action, TimeBasedStreamingSchedule

    clock = _Clock()
    s = TimeBasedStreamingSchedule(1.0, fragments=2, overlap_steps=2, clock=clock)
    s.start()
    events = []
    for step in range(1, 13):  # a step of 0.2 s: fragment syncs are 0.5 s apart, applied two steps after they start
        clock.now += 0.2
        s.record_tokens(8)
        action = s.step()
        weights = {f: s.fragment_weight(f) for f in s.starting}
        for f in s.finishing:
            s.fragment_applied(f)
        events.append((step, action, list(s.starting), list(s.finishing), weights))
    starts = [(step, st[0], w[st[0]]) for step, _, st, _, w in events if st]
    finishes = [(step, fi[0]) for step, _, _, fi, _ in events if fi]
    # due 0.5 s after the previous fragment was applied: t=0.6 (step 3), applied at step 5 (t=1.0); next due at
    # t=1.5, entered at step 8 (t=1.6), applied at step 10 (t=2.0); the next at step 13
    assert starts == [(3, 0, 24.0), (8, 1, 64.0)]
    assert finishes == [(5, 0), (10, 1)]
    assert all(a is Action.STREAM for step, a, st, fi, _ in events if st or fi)
    # fragment 0's next weight counts the tokens since its own start at step 3
    assert s.fragment_weight(0) == 8 * 9 and s.fragment_weight(1) == 8 * 4
    clock.now += 0.2
    s.record_tokens(8)
    assert s.step() is Action.STREAM and s.starting == [0] and s.fragment_weight(0) == 8 * 10
    # the state goes through a checkpoint: the fragment in flight, its steps, the next fragment, the token counts
    copy = TimeBasedStreamingSchedule(1.0, fragments=2, overlap_steps=2, clock=clock)
    copy.load_state_dict(s.state_dict())
    assert (copy.in_flight, copy.steps_in_flight, copy.next_fragment, copy.fragment_tokens) == (0, 0, 1, [0, 40])
    # a sync the transport dropped (a federated job died inside it after inner steps ran): its tokens are not lost,
    # they count at that fragment's next sync
    dropped = TimeBasedStreamingSchedule(1.0, fragments=2, overlap_steps=2, clock=clock)
    dropped.load_state_dict(s.state_dict())
    for _ in range(2):
        clock.now += 0.2
        dropped.record_tokens(8)
        dropped.step()
    assert dropped.finishing == [0]
    dropped.fragment_applied(0, applied=False)
    assert dropped.fragment_weight(0) == 8 * 10 + 8 * 2
    # at the end every fragment syncs once more with the tokens since its last sync
    assert copy.final_fragments() == [0, 1] and copy.in_flight is None
    assert [copy.fragment_weight(f) for f in (0, 1)] == [0.0, 40.0]


def test_time_based_streaming_without_overlap_applies_at_once():
    from lightning_localsgd.engine.schedules import TimeBasedStreamingSchedule

    clock = _Clock()
    s = TimeBasedStreamingSchedule(1.5, fragments=3, clock=clock)
    s.start()
    turns = []
    for _ in range(10):
        clock.now += 0.25
        s.step()
        assert s.starting == s.finishing
        for f in s.finishing:
            s.fragment_applied(f)
            turns.append(f)
    assert turns == [0, 1, 2, 0, 1]  # every other step: 0.5 s apart (1.5 s / 3)


def check_weighted_fragment_syncs(ranks: list[dict], fragments: int) -> None:
    """Every fragment sync of every rank against the hand reference: the fragment's values after it equal
    ``Σ_i w_i θ_i / Σ_i w_i`` of the values each group sent at its start (averaging, overlap_mix 0), with ``w_i`` the
    tokens group ``i`` processed since its previous sync of that fragment."""
    records = [d["fragment_syncs"] for d in ranks]
    assert len({len(r) for r in records}) == 1, [len(r) for r in records]
    order = [r["fragment"] for r in records[0]]
    assert all([r["fragment"] for r in rec] == order for rec in records), "the ranks synced different fragments"
    regular, flush = order[:-fragments], order[-fragments:]
    assert regular == [k % fragments for k in range(len(regular))] and len(regular) >= fragments
    assert flush == list(range(fragments))  # the end: each fragment once more
    previous = [[0] * fragments for _ in ranks]
    for k in range(len(order)):
        f = order[k]
        for r, rec in enumerate(records):
            assert rec[k]["weight"] == TOKENS_PER_STEP * (rec[k]["start_step"] - previous[r][f]), (r, k, rec[k])
            previous[r][f] = rec[k]["start_step"]
        a, b = records[0][k]["flat"]
        weights = [rec[k]["weight"] for rec in records]
        sent = [_flat(rec[k]["before"])[a:b] for rec in records]
        for r, rec in enumerate(records):
            got = _flat(rec[k]["after"])[a:b]
            if sum(weights) > 0:
                expected = sum(w * x for w, x in zip(weights, sent)) / sum(weights)
                assert float((got - expected).abs().max()) <= ATOL, (r, k, f)
            else:  # nothing new anywhere: every group continues from the same θ_g
                assert torch.equal(got, _flat(records[0][k]["after"])[a:b])
    for d in ranks[1:]:
        assert _max_diff(ranks[0]["final"], d["final"]) == 0.0


@pytest.mark.slow
def test_time_based_streaming_with_a_slow_worker_matches_the_weighted_fragment_reference(tmp_path):
    # the fast rank ends the run: 1,500 of its steps outlast several 0.3 s fragment intervals
    ranks = run_tiny(tmp_path, devices=2, sync_every_seconds=0.6, fragments=2, overlap_steps=1, steps=1500,
                     slow_rank=1, slow_seconds=0.04, seed_by_rank=True, inner="adamw", batches_per_epoch=1550)
    check_weighted_fragment_syncs(ranks, fragments=2)
    fast, slow = ranks[0], ranks[1]
    assert fast["info"]["global_step"] > 1.5 * slow["info"]["global_step"]
    # the fast worker finished first: its stop rode on a fragment's sync and every rank learned it there
    stops = [k for k, r in enumerate(slow["fragment_syncs"]) if r.get("stop_requested")]
    assert stops and all(fast["fragment_syncs"][k]["stop_requested"] for k in stops)
    # at least one sync mixed unequal, non-zero weights (otherwise the weighting is not tested)
    assert any(a["weight"] != b["weight"] and b["weight"] > 0
               for a, b in zip(fast["fragment_syncs"], slow["fragment_syncs"]))
    # overlap: a fragment of the regular syncs is applied one of the group's own steps after it starts
    assert all(r["finish_step"] == r["start_step"] + 1 for rank in ranks for r in rank["fragment_syncs"][:-3])


@pytest.mark.slow
def test_time_based_streaming_with_groups_of_two(tmp_path):
    # 4 processes, 2 groups of 2 (DDP inside: each rank syncs its slice of every fragment); rank 3 (group 1) is slow,
    # so all of group 1 is: the ranks of a group agree on each fragment's start, and the groups' means are weighted
    ranks = run_tiny(tmp_path, devices=4, group_size=2, sync_every_seconds=0.6, fragments=2, overlap_steps=1,
                     steps=400, slow_rank=3, slow_seconds=0.04, batches_per_epoch=450, timeout=300)
    check_weighted_fragment_syncs(ranks, fragments=2)
    assert ranks[0]["info"]["global_step"] == ranks[1]["info"]["global_step"]
    assert ranks[2]["info"]["global_step"] == ranks[3]["info"]["global_step"]
    assert ranks[0]["info"]["global_step"] > ranks[2]["info"]["global_step"]


@pytest.mark.slow
@pytest.mark.parametrize("fragments,overlap", [(1, 0), (2, 1)])
def test_time_based_streaming_with_overlap_mix_ends_on_one_model(tmp_path, fragments, overlap):
    # α = 0.5 keeps half of each group's own parameters after a fragment's sync, so the groups differ between syncs;
    # the last syncs (the stop, then each fragment once more) keep none of them, so every group ends on one model.
    # fragments=1, overlap_steps=0: α alone makes the time-based syncs stream (one fragment)
    ranks = run_tiny(tmp_path, devices=2, sync_every_seconds=0.3, fragments=fragments, overlap_steps=overlap,
                     overlap_mix=0.5, steps=1200, slow_rank=1, slow_seconds=0.02, seed_by_rank=True,
                     batches_per_epoch=1250)  # 1,200 fast-rank steps outlast several 0.3 s intervals under load
    fast, slow = ranks
    assert len(fast["fragment_syncs"]) >= 3 + fragments, fast["fragment_syncs"]  # regular syncs before the end
    assert _max_diff(fast["final"], slow["final"]) == 0.0
