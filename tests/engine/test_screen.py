"""The robust screen of a sync (lightning_localsgd.engine.screen): the rule by hand, then OuterSync on gloo ranks where
one worker group's pseudo-gradient is broken, against the mean of the other groups written out by hand."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.distributed as dist

from lightning_localsgd import LocalSGDConfig
from lightning_localsgd.engine import OuterSync
from lightning_localsgd.engine.screen import (CHANCE_Z, SKETCH_SIZE, PseudoGradientScreen, count_sketch,
                                              direction_scores)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from reference import weighted_compressed_sync  # noqa: E402
from test_outer import initial, spawn  # noqa: E402


# ---------------------------------------------------------------- the rule, by hand
def test_median_rule_leaves_out_the_outlier_only():
    screen = PseudoGradientScreen(10.0)
    # lower median of [1, 2, 3, 40] is 2: 40 > 10 x 2 is out, 3 is not
    verdict = screen.decide([1.0, 2.0, 3.0, 40.0], [0, 1, 2, 3])
    assert verdict.rule == "median" and list(verdict.excluded) == [3]
    assert "40 > 10 x the median 2 of 4 groups" in verdict.excluded[3]
    # exactly 10 x the median stays in (the bound is strict)
    assert not PseudoGradientScreen(10.0).decide([1.0, 2.0, 3.0, 20.0], [0, 1, 2, 3]).excluded
    # the lower median of an even count: two wild groups of four cannot raise it (the median would be 25.5)
    assert sorted(PseudoGradientScreen(10.0).decide([1.0, 1.0, 50.0, 60.0], [0, 1, 2, 3]).excluded) == [2, 3]


def test_weights_clean_verdict_and_nonfinite():
    screen = PseudoGradientScreen(4.0)
    # NaN: takes no part (weight 0); inf: left to the non-finite policy. Judged: [1, 1.5, 9]: 9 > 4 x 1.5
    verdict = screen.decide([1.0, math.nan, 1.5, math.inf, 9.0], [0, 1, 2, 3, 4])
    assert list(verdict.excluded) == [4]
    assert verdict.weight(4, None) == 0.0 and verdict.weight(0, None) == 1.0 and verdict.weight(2, 7.0) == 7.0
    clean = screen.decide([1.0, 1.1, 1.2], [0, 1, 2])
    assert not clean.excluded and clean.weight(0, None) is None and clean.weight(1, 3.0) == 3.0  # nothing changes


def test_two_groups_use_their_own_history():
    screen = PseudoGradientScreen(10.0, history=4)
    for norms in ([1.0, 2.0], [3.0, 4.0]):  # fewer than 3 kept norms: no bound yet, even for a jump
        assert screen.decide(norms, [7, 9]).excluded == {}
    verdict = screen.decide([2.0, 100.0], [7, 9])  # group 9 had 2 kept norms (under MIN_HISTORY): no bound yet
    assert verdict.rule == "history" and verdict.excluded == {}
    assert list(screen.history[9]) == [2.0, 4.0, 100.0]
    # group 9's kept norms [2, 4, 100]: lower median 4; 41 > 40 is out, group 7 (median 2 of [1, 3, 2]) at 19 stays
    verdict = screen.decide([19.0, 41.0], [7, 9])
    assert list(verdict.excluded) == [1] and "its own median 4 of its last 3 syncs" in verdict.excluded[1]
    assert list(screen.history[9]) == [2.0, 4.0, 100.0]  # an excluded norm does not enter the history
    assert list(screen.history[7]) == [1.0, 3.0, 2.0, 19.0]


def test_repeated_offender_is_banned_for_ban_syncs():
    screen = PseudoGradientScreen(10.0, history=8, ban_syncs=2)
    ids = [0, 1, 2, 3]
    assert list(screen.decide([1.0, 1.0, 1.0, 50.0], ids).excluded) == [3]
    assert not screen.banned  # one offence: judged afresh next time
    assert list(screen.decide([1.0, 1.0, 1.0, 1.0], ids).excluded) == []
    assert list(screen.decide([1.0, 1.0, 1.0, 50.0], ids).excluded) == [3]  # the second within 8 syncs: banned
    assert screen.banned == {3: 2}
    for left in (1, 0):  # honest norms, still left out twice
        verdict = screen.decide([1.0, 1.0, 1.0, 1.0], ids)
        assert list(verdict.excluded) == [3] and f"({left} more after this one)" in verdict.excluded[3]
    assert screen.decide([1.0, 1.0, 1.0, 1.0], ids).excluded == {}
    assert screen.excluded_total == 4


def test_state_round_trip_decides_as_the_uninterrupted_screen_and_legacy_starts_afresh(tmp_path):
    ids = [7, 9]
    straight = PseudoGradientScreen(10.0, history=4, ban_syncs=2)
    for norms in ([1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [1.0, 50.0], [1.0, 2.0], [1.0, 60.0]):
        straight.decide(norms, ids)
    assert straight.banned == {9: 2} and straight.excluded_total == 2
    torch.save(straight.state_dict(), tmp_path / "screen.pt")  # as a checkpoint holds it (weights_only loads it)
    resumed = PseudoGradientScreen(10.0, history=4, ban_syncs=2)
    resumed.load_state_dict(torch.load(tmp_path / "screen.pt", weights_only=True))
    assert resumed.state_dict() == straight.state_dict()
    for norms in ([1.0, 2.0], [1.0, 2.0], [1.0, 30.0]):  # banned twice, then judged by its history again
        assert resumed.decide(norms, ids).excluded.keys() == straight.decide(norms, ids).excluded.keys()
    assert resumed.state_dict() == straight.state_dict() and resumed.excluded_total == 5
    # a history shorter than the saved one keeps each member's newest norms
    shorter = PseudoGradientScreen(10.0, history=3)
    shorter.load_state_dict(straight.state_dict())
    assert list(shorter.history[7]) == list(straight.history[7])[-3:]
    # a checkpoint from before the screen's state was saved (no "screen": None): a fresh screen
    legacy = PseudoGradientScreen(10.0, history=4, ban_syncs=2)
    legacy.load_state_dict(straight.state_dict())
    legacy.load_state_dict(None)
    assert legacy.state_dict() == PseudoGradientScreen(10.0).state_dict()


def _cosine_with_the_others_by_hand(vectors, i):
    """Group ``i``'s score, written out: the upper median of its cosines with each other group."""
    units = [[x / math.hypot(*v) for x in v] for v in vectors]
    cosines = sorted(units[i][0] * u[0] + units[i][1] * u[1] for j, u in enumerate(units) if j != i)
    return cosines[len(cosines) // 2]


def test_direction_rule_leaves_out_the_group_against_the_others():
    # sketches by hand (two buckets): groups 0-2 point alike, group 3 against them; norms all honest
    sketches = [[1.0, 0.0], [1.0, 0.2], [0.8, -0.1], [-1.0, 0.0]]
    verdict = PseudoGradientScreen(10.0, min_cosine=0.0).decide([1.0, 1.0, 1.0, 1.0], [0, 1, 2, 3], sketches)
    assert list(verdict.excluded) == [3]
    for i in range(4):
        assert verdict.cosines[i] == pytest.approx(_cosine_with_the_others_by_hand(sketches, i))
    assert ("cosine -0.992 with the other 3 groups' pseudo-gradients (their upper median) < screen_min_cosine 0"
            in verdict.excluded[3])
    # without the direction test the same figures screen nobody
    assert not PseudoGradientScreen(10.0).decide([1.0] * 4, [0, 1, 2, 3], sketches).excluded
    # groups 1 and 2: cosine 0.949 each (by hand), group 0: 0.981; above a threshold of 0.95 only group 0: the upper
    # median (0.949) is not above it, so nobody is screened (a threshold the honest groups fail); at 0.9, group 3 only
    assert verdict.cosines[1] == pytest.approx(0.9486833) and verdict.cosines[2] == pytest.approx(0.9486833)
    assert not PseudoGradientScreen(10.0, min_cosine=0.95).decide([1.0] * 4, [0, 1, 2, 3], sketches).excluded
    assert sorted(PseudoGradientScreen(10.0, min_cosine=0.9).decide([1.0] * 4, [0, 1, 2, 3], sketches).excluded) == [3]
    # a large group within the norm bound (x9) counts as one vote among the others: groups 0-2 keep their scores,
    # group 3 is left out
    verdict = PseudoGradientScreen(10.0, min_cosine=0.0).decide([1.0, 1.0, 1.0, 9.0], [0, 1, 2, 3],
                                                                sketches[:3] + [[-9.0, 0.0]])
    assert list(verdict.excluded) == [3] and verdict.cosines[1] == pytest.approx(0.9486833)
    # a norm outlier is judged by the norm and left out of the others' reference: group 3 (x100) would otherwise
    # turn groups 0-2's cosines negative
    verdict = PseudoGradientScreen(10.0, min_cosine=0.0).decide(
        [1.0, 1.0, 1.0, 100.0], [0, 1, 2, 3], [[1.0, 0.0], [1.0, 0.2], [0.8, -0.1], [-100.0, 0.0]])
    assert list(verdict.excluded) == [3] and verdict.excluded[3].startswith("norm 100")
    # the upper median not above the threshold (the groups all disagree): nobody is screened
    spread = [[1.0, 0.0], [-1.0, 0.1], [0.0, 1.0], [0.1, -1.0]]
    verdict = PseudoGradientScreen(10.0, min_cosine=0.0).decide([1.0] * 4, [0, 1, 2, 3], spread)
    assert max(verdict.cosines) <= 0 and not verdict.excluded
    # two groups: each is the other's only reference, no verdict on direction
    assert not PseudoGradientScreen(10.0, min_cosine=0.0).decide([1.0, 1.0], [0, 1], [[1.0, 0.0], [-1.0, 0.0]]).excluded


def test_count_sketch_adds_up_and_keeps_inner_products():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(200_000, generator=g)
    b = 0.5 * a + torch.randn(200_000, generator=g)
    whole = count_sketch([(a, 0)])
    assert whole.shape == (SKETCH_SIZE,) and whole.dtype == torch.float64
    # pieces of disjoint index ranges (a sharded group's ranks) add up to the whole's sketch; the same indices go alike
    assert torch.allclose(count_sketch([(a[:70_000], 0), (a[70_000:], 70_000)]), whole, atol=1e-9, rtol=0)
    assert torch.allclose(count_sketch([(a[70_000:], 70_000)]) + count_sketch([(a[:70_000], 0)]), whole,
                          atol=1e-9, rtol=0)
    assert torch.equal(count_sketch([(-a, 0)]), -whole)
    # the cosine of the sketches is near the vectors' (0.447): off by about 1/sqrt(SKETCH_SIZE)
    exact = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    sketched = float(torch.nn.functional.cosine_similarity(whole, count_sketch([(b, 0)]), dim=0))
    assert abs(sketched - exact) < 0.1 and abs(exact - 0.447) < 0.01
    # a shift of the indices hashes elsewhere: the sketch is of (value, index) pairs, not of values alone
    assert not torch.allclose(count_sketch([(a, 1)]), whole)


def _scores_by_hand(sketches, i):
    """Group ``i``'s score and significance, written out: the upper medians over the others of the cosine c and of
    c / sqrt(sum_b u_b^2 a_b^2) (u, a: the two unit sketches)."""
    units = [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in sketches]
    pairs = [(sum(x * y for x, y in zip(units[i], u)), math.sqrt(sum((x * y) ** 2 for x, y in zip(units[i], u))))
             for j, u in enumerate(units) if j != i]
    middle = len(pairs) // 2
    return sorted(c for c, _ in pairs)[middle], sorted(c / s for c, s in pairs)[middle]


def test_null_spread_of_the_sketched_cosine_is_one_over_root_buckets():
    # a flat vector's sketch in every bucket: the null spread sqrt(sum_b u_b^2 a_b^2) of two such is 1/sqrt(buckets),
    # so CHANCE_Z = 3 asks a cosine of 3/32 = 0.09375 of a model of more than 1024 parameters
    cosines, significance = direction_scores([[0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    assert cosines[1] == pytest.approx(0.5) and significance[1] == pytest.approx(0.5 / 0.5)  # s = 1/sqrt(4)
    assert CHANCE_Z == 3.0 and CHANCE_Z / math.sqrt(SKETCH_SIZE) == 0.09375
    # numerically: noise against a fixed honest vector, sketched as the screen does. The cosine's spread is
    # 1/sqrt(min(n, buckets)) (n = 100: only 100 buckets filled), the significance's 1 whatever n
    g = torch.Generator().manual_seed(11)
    for n in (100, 5000):
        honest = count_sketch([(torch.randn(n, generator=g) * torch.linspace(0.2, 2.0, n), 0)])
        # [draw, (cosines, significance), group]: the noise group's (group 1's) figures
        figures = torch.tensor([direction_scores([honest, count_sketch([(torch.randn(n, generator=g), 0)])])
                                for _ in range(400)])
        cos, z = figures[:, 0, 1], figures[:, 1, 1]
        assert cos.std() == pytest.approx(1 / math.sqrt(min(n, SKETCH_SIZE)), rel=0.12), n
        assert z.std() == pytest.approx(1.0, rel=0.12) and abs(float(z.mean())) < 0.15, n
        # noise rarely counts as agreeing: 0.13% expected (Gaussian), 1.1% at most (Hoeffding); not the 19% a fixed
        # 3/sqrt(1024) gives at n = 100, nor the half a threshold of 0 gives
        assert int((z >= CHANCE_Z).sum()) <= 8 and int((cos > 0).sum()) > 150, n


def test_chance_rule_leaves_out_noise_and_keeps_agreeing_groups():
    # 6000 elements (more than the buckets): three honest pseudo-gradients, a common direction and their own noise,
    # and group 3 pure noise of an honest norm, sketched as each group sends them
    g = torch.Generator().manual_seed(5)
    common = torch.randn(6000, generator=g)
    vectors = [common + 2.0 * torch.randn(6000, generator=g) for _ in range(3)] + [2.2 * torch.randn(6000, generator=g)]
    sketches = [count_sketch([(v, 0)]).tolist() for v in vectors]
    norms = [float(v.norm()) for v in vectors]
    verdict = PseudoGradientScreen(10.0, min_cosine="chance").decide(norms, [0, 1, 2, 3], sketches)
    for i in range(4):
        assert (verdict.cosines[i], verdict.significance[i]) == pytest.approx(_scores_by_hand(sketches, i), rel=1e-9)
    # the honest groups: cosine 0.2 with each other (1 / (1 + 4)) exactly, 0.15-0.18 sketched: 4.7-5.6 spreads
    assert all(verdict.significance[i] > CHANCE_Z for i in range(3))
    # the noise: a positive cosine (0.027, 0.87 null spreads) that a threshold of 0 lets through
    assert 0 < verdict.cosines[3] < CHANCE_Z / math.sqrt(SKETCH_SIZE) and verdict.significance[3] < CHANCE_Z
    assert list(verdict.excluded) == [3]
    assert verdict.excluded[3].startswith(f"significance {verdict.significance[3]:.2f} (cosine "
                                          f"{verdict.cosines[3]:.3f}) with the other 3 groups' pseudo-gradients")
    assert "< 3 (screen_min_cosine 'chance'" in verdict.excluded[3]
    assert not PseudoGradientScreen(10.0, min_cosine=0.0).decide(norms, [0, 1, 2, 3], sketches).excluded
    # a sign flip is left out too
    flipped = sketches[:3] + [[-x for x in sketches[0]]]
    assert list(PseudoGradientScreen(10.0, min_cosine="chance").decide(norms, [0, 1, 2, 3], flipped).excluded) == [3]
    # honest groups that do not agree significantly (independent noise each): nobody is screened
    assert not PseudoGradientScreen(10.0, min_cosine="chance").decide(norms, [0, 1, 2, 3], [
        count_sketch([(torch.randn(6000, generator=g), 0)]).tolist() for _ in range(4)]).excluded


def test_chance_rule_counts_the_filled_buckets():
    # 100 elements fill 100 of the 1024 buckets (one each): the null spread is 1/sqrt(100) = 0.1, not 1/32. A group of
    # cosine 0.2 with the others (60 of 100 signs agree) is 2 spreads above chance and left out, although 0.2 is above
    # 3/sqrt(1024); one of cosine 0.4 (70 agree) is 4 spreads above and kept
    ones = torch.ones(100)
    flips = lambda k: torch.cat([-torch.ones(k), torch.ones(100 - k)])  # noqa: E731
    for k, significance, out in ((40, 2.0, [3]), (30, 4.0, [])):
        sketches = [count_sketch([(ones, 0)]).tolist()] * 3 + [count_sketch([(flips(k), 0)]).tolist()]
        verdict = PseudoGradientScreen(10.0, min_cosine="chance").decide([10.0] * 4, [0, 1, 2, 3], sketches)
        assert verdict.significance[3] == pytest.approx(significance) and list(verdict.excluded) == out
        assert verdict.cosines[3] == pytest.approx(significance / 10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(screen_factor=1.0), "screen_factor must be a number above 1"),
    (dict(screen_factor=float("inf")), "screen_factor must be a number above 1"),
    (dict(screen_factor=True), "screen_factor must be a number above 1"),
    (dict(screen_factor=10.0, screen_history=2), "screen_history must be an integer >= 3"),
    (dict(screen_factor=10.0, screen_ban_syncs=-1), "screen_ban_syncs must be an integer >= 0"),
    (dict(screen_ban_syncs=3), "screen_ban_syncs=3 only acts with the robust screen: set screen_factor"),
    (dict(screen_history=5), "screen_history=5 only acts with the robust screen"),
    (dict(screen_factor=10.0, screen_min_cosine=1.0), "screen_min_cosine must be a number strictly between -1 and 1"),
    (dict(screen_factor=10.0, screen_min_cosine=float("nan")), "screen_min_cosine must be a number strictly between"),
    (dict(screen_factor=10.0, screen_min_cosine=True), "screen_min_cosine must be a number strictly between"),
    (dict(screen_min_cosine=0.0), "screen_min_cosine=0.0 only acts with the robust screen"),
    (dict(screen_factor=10.0, screen_min_cosine="Chance"), "screen_min_cosine must be .*'chance' .*got 'Chance'"),
    (dict(screen_factor=10.0, screen_min_cosine="0.1"), "screen_min_cosine must be .*'chance' .*got '0.1'"),
    (dict(screen_min_cosine="chance"), "screen_min_cosine='chance' only acts with the robust screen"),
])
def test_config_refuses_bad_screen_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalSGDConfig(**kwargs)


def test_config_builds_one_screen_per_engine():
    config = LocalSGDConfig(screen_factor=5, screen_history=6, screen_ban_syncs=1, screen_min_cosine=0)
    a, b = config.build_screen(), config.build_screen()
    assert a is not b and (a.factor, a.history_len, a.ban_syncs, a.min_cosine) == (5.0, 6, 1, 0.0)
    assert LocalSGDConfig(screen_factor=5).build_screen().min_cosine is None
    assert LocalSGDConfig(screen_factor=5, screen_min_cosine="chance").build_screen().min_cosine == "chance"
    assert LocalSGDConfig().build_screen() is None


# ---------------------------------------------------------------- OuterSync on gloo ranks, against the hand mean
def honest(group: int, sync: int, theta: list[torch.Tensor]) -> list[torch.Tensor]:
    """Group ``group``'s parameters after the inner steps before sync ``sync``: θ_g minus a small step."""
    g = torch.Generator().manual_seed(1000 * sync + group)
    return [t - 0.1 * torch.randn(t.shape, generator=g) for t in theta]


def broken(how: str, group: int, sync: int, theta: list[torch.Tensor]) -> list[torch.Tensor]:
    """The broken group's parameters: its pseudo-gradient scaled x100, sign-flipped, replaced by noise, or a bit flip
    in one parameter (the top exponent bit of an element below 1 in magnitude: ~1e38, finite)."""
    mine = honest(group, sync, theta)
    if how == "scaled":
        return [t - 100 * (t - m) for t, m in zip(theta, mine)]
    if how == "sign":
        return [t + (t - m) for t, m in zip(theta, mine)]
    if how == "noise":
        g = torch.Generator().manual_seed(77 + sync)
        return [t + 5.0 * torch.randn(t.shape, generator=g) for t in theta]
    assert how == "bitflip"
    flat = mine[0].view(-1)
    k = int(torch.nonzero(flat.abs() < 1)[0])
    flat.view(torch.int32)[k] ^= 1 << 30
    return mine


def aligned(group: int, sync: int, theta: list[torch.Tensor], flip: bool = False) -> list[torch.Tensor]:
    """Group ``group``'s parameters before sync ``sync`` when the groups' steps point alike (a step shared by all plus
    a smaller one of its own, as groups training one model do); ``flip``: its pseudo-gradient sign-flipped."""
    shared, own = torch.Generator().manual_seed(500 + sync), torch.Generator().manual_seed(1000 * sync + group)
    steps = [0.1 * torch.randn(t.shape, generator=shared) + 0.05 * torch.randn(t.shape, generator=own) for t in theta]
    return [t + d if flip else t - d for t, d in zip(theta, steps)]


def run_syncs(rank, params, engine, cases, syncs, weight=None, fragments=False, honest=honest, broken=broken):
    """Set every rank's parameters for each sync (``cases[sync]``: the broken group's way, or None) and sync
    (``fragments``: fragment 0 then fragment 1, each started and finished on its own, as streaming does)."""
    out = []
    for sync in range(syncs):
        theta = [s.detach().clone().view_as(p) for s, p in zip(engine.snapshot, params)]
        mine = broken(cases[sync], rank, sync, theta) if cases[sync] and rank == 3 else honest(rank, sync, theta)
        for p, t in zip(params, mine):
            p.copy_(t)
        if fragments:
            screened_out = []
            for f in range(engine.num_fragments):
                engine.start_sync(f)
                res = engine.finish_sync(f)
                screened_out.append(res.screened_out)
        else:
            res = engine.sync(weight=weight)
            screened_out = res.screened_out
        out.append(([p.clone() for p in params], screened_out, res.skipped))
    return out


def scenario_four_groups(rank, world):
    cases = {"clean": [None] * 3, "scaled": ["scaled"] * 3, "noise": ["noise"] * 3, "bitflip": ["bitflip"] * 3,
             "sign": ["sign"] * 3}
    results = {}
    for name, per_sync in cases.items():
        for screened in (True, False) if name == "clean" else (True,):
            params = [t.clone() for t in initial()]
            engine = OuterSync(params, screen=PseudoGradientScreen(10.0) if screened else None)
            results[(name, screened)] = run_syncs(rank, params, engine, per_sync, 3)
    # compressed (int8) with error feedback: the broken group sends with weight 0, its residual stays its own
    params = [t.clone() for t in initial()]
    engine = OuterSync(params, compression="int8", screen=PseudoGradientScreen(10.0))
    results[("int8", True)] = run_syncs(rank, params, engine, ["scaled"] * 3, 3)
    # token-weighted (time-based) syncs: each group's norm per token is screened, the weighted mean of the others
    params = [t.clone() for t in initial()]
    engine = OuterSync(params, screen=PseudoGradientScreen(10.0))
    results[("weighted", True)] = run_syncs(rank, params, engine, ["scaled"] * 3, 3, weight=TOKENS[rank])
    # streaming: two fragments (one tensor each), each screened at its own start
    params = [t.clone() for t in initial()]
    engine = OuterSync(params, fragments=2, screen=PseudoGradientScreen(10.0))
    results[("fragments", True)] = run_syncs(rank, params, engine, ["scaled"] * 3, 3, fragments=True)
    # the direction test (screen_min_cosine=0): groups whose steps point alike, group 3 sign-flipped or not;
    # uncompressed and int8
    flipped = lambda how, group, sync, theta: aligned(group, sync, theta, flip=True)  # noqa: E731
    for name, per_sync, compression in (("direction-clean", [None] * 3, None), ("direction-sign", ["sign"] * 3, None),
                                        ("direction-int8", ["sign"] * 3, "int8")):
        params = [t.clone() for t in initial()]
        engine = OuterSync(params, compression=compression, screen=PseudoGradientScreen(10.0, min_cosine=0.0))
        results[(name, True)] = run_syncs(rank, params, engine, per_sync, 3, honest=aligned, broken=flipped)
    params = [t.clone() for t in initial()]
    results[("direction-clean", False)] = run_syncs(rank, params, OuterSync(params), [None] * 3, 3, honest=aligned)
    return results


TOKENS = [3.0, 1.0, 2.0, 5.0]


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.mark.slow
def test_four_groups_one_broken_is_left_out_of_every_sync(tmp_path):
    got = spawn(scenario_four_groups, 4, tmp_path)

    def before(case, sync):  # θ_g the ranks started the sync from (the previous sync's result, on rank 0)
        return initial() if sync == 0 else got[0][case][sync - 1][0]

    for how in ("scaled", "noise", "bitflip"):
        for sync in range(3):
            theta = before((how, True), sync)
            want = sum(_flat(honest(g, sync, theta)) for g in range(3)) / 3
            for rank in got:
                params, screened_out, skipped = rank[(how, True)][sync]
                assert screened_out == [3] and not skipped, (how, sync, screened_out)
                assert torch.allclose(_flat(params), want, atol=1e-6, rtol=0), how
            if sync == 0:  # the hand mean of the three honest groups, not the mean of all four
                assert not torch.allclose(want, sum(_flat(honest(g, 0, theta)) for g in range(3)) / 4
                                          + _flat(broken(how, 3, 0, theta)) / 4, atol=1e-3)
        assert all(torch.equal(_flat(r[(how, True)][-1][0]), _flat(got[0][(how, True)][-1][0])) for r in got)
    # no group broken: the screened syncs equal the unscreened ones bit for bit
    for sync in range(3):
        for rank in got:
            assert rank[("clean", True)][sync][1] == []
            assert torch.equal(_flat(rank[("clean", True)][sync][0]), _flat(rank[("clean", False)][sync][0]))
    # a sign flip keeps an honest norm: the norm screen lets it through (its harm is bounded by its weight)
    assert all(r[("sign", True)][s][1] == [] for r in got for s in range(3))
    # int8: the weighted compressed mean with weight 0 for group 3, written out
    errors, mean_errors = [torch.zeros(sum(t.numel() for t in initial()))] * 4, [None] * 4
    for sync in range(3):
        theta = before(("int8", True), sync)
        locals_ = [_flat(honest(g, sync, theta)) for g in range(3)] + [_flat(broken("scaled", 3, sync, theta))]
        want, errors, mean_errors = weighted_compressed_sync(_flat(theta), locals_, [1.0, 1.0, 1.0, 0.0], errors,
                                                             mean_errors, "int8")
        for rank in got:
            params, screened_out, _ = rank[("int8", True)][sync]
            assert screened_out == [3]
            assert torch.allclose(_flat(params), want, atol=1e-6, rtol=0)
    # token-weighted: the weighted mean of groups 0-2; streaming: each fragment left out of group 3's values alone
    for sync in range(3):
        theta = before(("weighted", True), sync)
        want = sum(TOKENS[g] * _flat(honest(g, sync, theta)) for g in range(3)) / sum(TOKENS[:3])
        theta = before(("fragments", True), sync)
        want_fragments = sum(_flat(honest(g, sync, theta)) for g in range(3)) / 3
        for rank in got:
            params, screened_out, _ = rank[("weighted", True)][sync]
            assert screened_out == [3] and torch.allclose(_flat(params), want, atol=1e-6, rtol=0)
            params, screened_out, _ = rank[("fragments", True)][sync]
            assert screened_out == [[3], [3]] and torch.allclose(_flat(params), want_fragments, atol=1e-6, rtol=0)
    check_direction_test(got)


def _cosines_with_the_others(locals_, theta):
    deltas = [_flat(theta) - _flat(m) for m in locals_]
    return [float(torch.nn.functional.cosine_similarity(d, sum(deltas) - d, dim=0)) for d in deltas]


def check_direction_test(got):
    """The direction test's cases of :func:`scenario_four_groups` (run by the test of the norm screen's cases: one
    launch)."""
    # clean: nobody is screened, bit for bit the run without the screen; the honest cosines are clearly positive
    for sync in range(3):
        theta = initial() if sync == 0 else got[0][("direction-clean", False)][sync - 1][0]
        assert min(_cosines_with_the_others([aligned(g, sync, theta) for g in range(4)], theta)) > 0.5
        for rank in got:
            params, screened_out, _ = rank[("direction-clean", True)][sync]
            assert screened_out == [] and torch.equal(_flat(params), _flat(rank[("direction-clean", False)][sync][0]))
    # group 3 sign-flipped: left out of every sync (its norm is honest: the norm screen let the same flip through
    # above), θ_g the hand mean of groups 0-2
    for sync in range(3):
        theta = initial() if sync == 0 else got[0][("direction-sign", True)][sync - 1][0]
        locals_ = [aligned(g, sync, theta) for g in range(3)] + [aligned(3, sync, theta, flip=True)]
        cosines = _cosines_with_the_others(locals_, theta)
        assert cosines[3] < -0.5 < 0.2 < min(cosines[:3])  # far from the threshold, whatever the sketch's error
        want = sum(_flat(m) for m in locals_[:3]) / 3
        assert not torch.allclose(want, sum(_flat(m) for m in locals_) / 4, atol=1e-3)
        for rank in got:
            params, screened_out, skipped = rank[("direction-sign", True)][sync]
            assert screened_out == [3] and not skipped
            assert torch.allclose(_flat(params), want, atol=1e-6, rtol=0)
    # int8 with error feedback: the weighted compressed mean with weight 0 for the flipped group, written out
    errors, mean_errors = [torch.zeros(sum(t.numel() for t in initial()))] * 4, [None] * 4
    for sync in range(3):
        theta = initial() if sync == 0 else got[0][("direction-int8", True)][sync - 1][0]
        locals_ = [_flat(aligned(g, sync, theta)) for g in range(3)] + [_flat(aligned(3, sync, theta, flip=True))]
        want, errors, mean_errors = weighted_compressed_sync(_flat(theta), locals_, [1.0, 1.0, 1.0, 0.0], errors,
                                                             mean_errors, "int8")
        for rank in got:
            params, screened_out, _ = rank[("direction-int8", True)][sync]
            assert screened_out == [3] and torch.allclose(_flat(params), want, atol=1e-6, rtol=0)


def scenario_two_groups(rank, world):
    """2 groups of 2 ranks (each rank syncs a slice of its group's replica): group 1 scaled x100 at sync 3."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    cross = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    g, k = rank // 2, rank % 2
    params = [t.clone() for t in initial()]
    screen = PseudoGradientScreen(10.0)
    engine = OuterSync(params, cross_group=cross[k], slice_group=groups[g], screen=screen)
    out = []
    for sync in range(4):
        theta = [p.clone() for p in params]  # every group holds θ_g after a sync
        mine = broken("scaled", g, sync, theta) if sync == 3 and g == 1 else honest(g, sync, theta)
        for p, t in zip(params, mine):
            p.copy_(t)
        res = engine.sync()
        out.append(([p.clone() for p in params], res.screened_out))
    return {"after": out, "history": {i: list(h) for i, h in screen.history.items()}}


@pytest.mark.slow
def test_two_groups_fall_back_to_their_own_history(tmp_path):
    got = spawn(scenario_two_groups, 4, tmp_path)
    theta, norms = initial(), {0: [], 1: []}
    for sync in range(4):
        locals_ = {g: honest(g, sync, theta) for g in (0, 1)}
        if sync == 3:
            locals_[1] = broken("scaled", 1, sync, theta)
        for g in (0, 1):
            norms[g].append(float(_flat([t - m for t, m in zip(theta, locals_[g])]).norm()))
        kept = [0] if sync == 3 else [0, 1]
        theta = [sum(locals_[g][j] for g in kept) / len(kept) for j in range(len(theta))]
        for rank in got:
            params, screened_out = rank["after"][sync]
            assert screened_out == ([1] if sync == 3 else [])
            assert torch.allclose(_flat(params), _flat(theta), atol=1e-6, rtol=0)
    for rank in got:  # the norms are the whole replica's (both slices' squares added), per group
        assert rank["history"][0] == pytest.approx(norms[0], rel=1e-5)
        assert rank["history"][1] == pytest.approx(norms[1][:3], rel=1e-5)
