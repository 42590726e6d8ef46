"""The H planner (``lightning-localsgd plan`` and :func:`lightning_localsgd.planner.plan`): the recommendation against
a hand computation, monotonicity, unit parsing, input errors, and the command line (table and ``--json``).

The hand computations below use the cost model's formula written out again (default calibration: η = 0.9, c0 = 0,
φ = 2/3), not the library's helpers, so that a wrong helper cannot make its own test pass.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

from lightning_localsgd import costmodel
from lightning_localsgd.cli import main as cli_main
from lightning_localsgd.planner import (
    DEFAULT_CANDIDATES,
    compressed_bytes_per_value,
    parse_bandwidth,
    parse_count,
    parse_duration,
    plan,
)

ETA = 0.9  # Calibration() defaults
PHI = 2 / 3
EXAMPLE = dict(params=1.3e9, step_time=0.4, bandwidth="1Gbit", latency="20ms", groups=8)


def hand_sync_seconds(params: float, G: int, bandwidth: float, latency: float, bytes_per_value: float = 4.0) -> float:
    """2(G−1)/G · 8M/(η·B) + 2⌈log2 G⌉·λ + c0 (c0 = 0)."""
    M = bytes_per_value * params
    return 2 * (G - 1) / G * 8 * M / (ETA * bandwidth) + 2 * math.ceil(math.log2(G)) * latency


def hand_coding_seconds(codec: str, params: float, G: int, exchange: str = "two_phase") -> float:
    """One group's encoding and decoding in a sync, from the codec's measured seconds per value: two-phase: encode
    N(1 + 1/G) (its G chunks, then its mean chunk), decode N(3 + 1/G) (error feedback of its chunks, the G received
    pieces, error feedback of its mean chunk, the G gathered means); all-gather: encode N, decode N(G + 1)."""
    cost = costmodel.CODEC_CPU_TABLE[codec]
    encoded, decoded = ((params * (1 + 1 / G), params * (3 + 1 / G)) if exchange == "two_phase"
                        else (params, params * (G + 1)))
    return encoded * cost.encode_s_per_value + decoded * cost.decode_s_per_value


def hand_utilization(tc: float, sync: float, H: int) -> float:
    return tc / (tc + sync / H)


# ------------------------------------------------------------------------------------------- hand computation
def test_example_matches_hand_computation():
    p = plan(**EXAMPLE)
    sync = hand_sync_seconds(1.3e9, 8, 1e9, 0.02)
    assert sync == pytest.approx(81.00889, rel=1e-6)  # 1.75 · 4.16e10 / 9e8 + 6 · 0.02
    # H = 2048 misses 95%, H = 4096 reaches it: the smallest power of two that does.
    assert hand_utilization(0.4, sync, 2048) < 0.95 <= hand_utilization(0.4, sync, 4096)
    assert p.recommended_h == 4096
    for H in (1, 64, 2048, 4096):
        row = p.row(H)
        assert row.utilization == pytest.approx(hand_utilization(0.4, sync, H), rel=1e-12)
        assert row.sync_seconds == pytest.approx(sync, rel=1e-12)
        assert row.bytes_per_step == pytest.approx(4 * 1.3e9 / H, rel=1e-12)
        assert row.comm_fraction == pytest.approx(1 - row.utilization, rel=1e-9)
        assert row.seconds_per_step == pytest.approx(0.4 + sync / H, rel=1e-12)
    # Exact bound: H ≥ s·T / (t_c·(1 − T)) = 3847.9
    assert p.min_h == math.ceil(sync * 0.95 / (0.4 * 0.05)) == 3848
    # DDP: the all-reduce every step, 2/3 of the compute hides part of it.
    assert p.ddp.h is None
    assert p.ddp.seconds_per_step == pytest.approx(0.4 + sync - PHI * 0.4, rel=1e-12)
    assert p.ddp.bytes_per_step == pytest.approx(4 * 1.3e9)


def test_second_setup_recommends_the_smallest_passing_power_of_two():
    # 100M parameters, 0.1 s per step, 10 Gbit/s, 5 ms, 4 groups: sync = 1.5 · 3.2e9 / 9e9 + 4 · 5 ms = 0.5533 s
    p = plan(params="100M", step_time="100ms", bandwidth="10 Gbit/s", latency=0.005, groups=4)
    sync = hand_sync_seconds(1e8, 4, 1e10, 0.005)
    passing = [H for H in DEFAULT_CANDIDATES if hand_utilization(0.1, sync, H) >= 0.95]
    assert passing[0] == 128 and p.recommended_h == 128
    assert p.min_h == 106  # ceil(0.5533 · 0.95 / 0.005) = ceil(105.13)
    assert hand_utilization(0.1, sync, 105) < 0.95 <= hand_utilization(0.1, sync, 106)
    # a lower target lowers the recommendation; candidates need not be powers of two
    assert plan(params=1e8, step_time=0.1, bandwidth=1e10, latency=0.005, groups=4, target_utilization=0.5,
                candidates=[3, 5, 7]).recommended_h == 7  # 0.1 / (0.1 + 0.5533/7) = 55.9%; H = 5: 47.5%


def test_compressed_sync_is_a_compressed_all_reduce_of_the_codec_payload():
    # int8: 1 byte per value + one fp32 scale per block of 256 values (comm.encode)
    assert compressed_bytes_per_value("int8", 1.3e9) == pytest.approx(1 + 4 / 256, rel=1e-6)
    assert compressed_bytes_per_value("int4", 1.3e9) == pytest.approx(0.5 + 4 / 256, rel=1e-6)
    assert compressed_bytes_per_value("bf16", 1.3e9) == 2
    # one copy = G chunks of ceil(N/G) values, each encoded on its own: 8 chunks of 162.5M values, 634766 blocks each
    assert compressed_bytes_per_value("int8", 1.3e9, 8) * 1.3e9 == pytest.approx(8 * (162_500_000 + 4 * 634_766))
    # 1000 int4 values in 3 chunks of 334: ceil(334/2) = 167 code bytes + 2 blocks' scales (8 bytes) per chunk
    assert compressed_bytes_per_value("int4", 1000, 3) * 1000 == pytest.approx(3 * (167 + 8))
    p = plan(**EXAMPLE, compression="int8")
    P = 8 * (162_500_000 + 4 * 634_766)
    # all-to-all of encoded chunks + all-gather of the encoded means: 2(G−1)/G·8P/(η·B) + 2⌈log2 G⌉·λ + 2·c0 (c0 = 0)
    link = 1.75 * 8 * P / (ETA * 1e9) + 6 * 0.02
    assert link == pytest.approx(20.657, rel=1e-4)  # vs 81.0 s for fp32: ~4x fewer bytes at any G
    # plus the codec's encoding and decoding on one CPU thread (the table's seconds per value)
    coding = hand_coding_seconds("int8", 1.3e9, 8)
    assert 1 < coding < 20
    sync = link + coding
    assert p.row(256).sync_seconds == pytest.approx(sync, rel=1e-12)
    assert p.row(256).bytes_per_step == pytest.approx(P / 256, rel=1e-12)  # one compressed copy, as bytes_sent counts
    assert p.row(256).link_bytes_per_step == pytest.approx(1.75 * P / 256, rel=1e-12)
    assert p.ddp.bytes_per_step == pytest.approx(4 * 1.3e9)  # DDP's gradients are not compressed
    assert p.min_h == math.ceil(sync * 0.95 / (0.4 * 0.05)) == 1229 and p.recommended_h == 2048
    assert not p.notes  # compression pays at G = 8 too
    p2 = plan(**{**EXAMPLE, "groups": 2}, compression="int4")
    assert not p2.notes
    assert p2.row(1).sync_seconds == pytest.approx(8 * (0.5 + 4 / 256) * 1.3e9 / (ETA * 1e9) + 2 * 0.02
                                                   + hand_coding_seconds("int4", 1.3e9, 2), rel=1e-6)
    # each of the two collectives pays c0: with c0 = 10 ms, a sync costs c0 more than the all-reduce of P bytes
    cal = costmodel.Calibration(fixed_s=0.01)
    p3 = plan(**EXAMPLE, compression="int8", calibration=cal)
    assert p3.row(1).sync_seconds == pytest.approx(sync + 0.02, rel=1e-12)
    assert plan(**EXAMPLE, calibration=cal).row(1).sync_seconds == pytest.approx(81.00889 + 0.01, rel=1e-6)
    assert not p3.notes


def test_compression_note_when_the_extra_fixed_cost_outweighs_the_bytes_saved():
    # 1000 parameters on 1 Gbit/s: int8 saves ~3 kB (~27 µs at G = 2), less than the second collective's c0 = 1 ms
    p = plan(params=1000, step_time=0.1, bandwidth="1Gbit", latency="1ms", groups=2, compression="int8",
             calibration=costmodel.Calibration(fixed_s=0.001))
    assert any("no faster than the uncompressed all-reduce" in n and "two collectives" in n for n in p.notes)
    # c0 = 0: compression is never slower (the DDP note stays: DDP is fast enough for so small a model)
    notes = plan(params=1000, step_time=0.1, bandwidth="1Gbit", latency="1ms", groups=2, compression="int8").notes
    assert notes and not any("no faster" in n for n in notes)


def test_benchmarks_costmodel_reexports_the_library():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "projection" / "costmodel.py"
    spec = importlib.util.spec_from_file_location("_bench_costmodel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in costmodel.__all__:
        assert getattr(module, name) is getattr(costmodel, name), name


# ------------------------------------------------------------------------------------------------ monotonicity
def test_monotone_in_h_and_in_the_link():
    p = plan(**EXAMPLE)
    util = [r.utilization for r in p.rows]
    assert [r.h for r in p.rows] == list(DEFAULT_CANDIDATES)
    assert all(a < b for a, b in zip(util, util[1:]))
    assert all(a.bytes_per_step > b.bytes_per_step for a, b in zip(p.rows, p.rows[1:]))
    assert all(a.comm_fraction > b.comm_fraction for a, b in zip(p.rows, p.rows[1:]))
    recs = [plan(**{**EXAMPLE, "bandwidth": bw}).recommended_h for bw in ("10Gbit", "100Gbit", "400Gbit")]
    assert recs == sorted(recs, reverse=True) and recs[-1] < 4096  # faster link: smaller H
    slow = plan(**{**EXAMPLE, "latency": "500ms"}).row(64).utilization
    assert slow < p.row(64).utilization  # more latency: lower utilization
    assert plan(**{**EXAMPLE, "step_time": 4.0}).row(64).utilization > p.row(64).utilization  # more compute


def test_no_candidate_passes_gives_none_and_a_reason():
    p = plan(**{**EXAMPLE, "bandwidth": "100Mbit"}, candidates=[16, 64, 256])
    assert p.recommended_h is None
    assert "no candidate reaches 95%" in p.reason and f"H >= {p.min_h}" in p.reason
    assert plan(**{**EXAMPLE, "bandwidth": "100Mbit"}, candidates=[p.min_h]).recommended_h == p.min_h
    assert plan(**{**EXAMPLE, "bandwidth": "100Mbit"}, candidates=[p.min_h - 1]).recommended_h is None


def test_fast_link_notes_that_ddp_suffices():
    p = plan(params=1e8, step_time=1.0, bandwidth="400Gbit", latency="1ms", groups=2)
    assert p.ddp.utilization >= 0.95 and any("DDP already" in n for n in p.notes)
    assert p.recommended_h == 1


# --------------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, bits", [
    ("1Gbit", 1e9), ("100Mbit", 1e8), ("10 Gbit/s", 1e10), ("1e9", 1e9), ("400Gb", 4e11), ("1Gbps", 1e9),
    ("100mbit", 1e8), ("2.5 Gbit/s", 2.5e9), ("1GB/s", 8e9), ("1 GByte/s", 8e9), ("1Gibit", 2**30), ("1G", 1e9),
    ("500kbit", 5e5), (1e9, 1e9), (100_000_000, 1e8),
])
def test_parse_bandwidth(text, bits):
    assert parse_bandwidth(text) == pytest.approx(bits)


@pytest.mark.parametrize("text, seconds", [
    ("20ms", 0.02), ("0.02", 0.02), ("50us", 5e-5), ("50µs", 5e-5), ("1s", 1.0), ("20 ms", 0.02), ("1.5e-3", 1.5e-3),
    ("100ns", 1e-7), ("2min", 120.0), ("0", 0.0), (0.02, 0.02),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text, allow_zero=True) == pytest.approx(seconds)


@pytest.mark.parametrize("text, count", [("1.3e9", 1.3e9), ("1.3B", 1.3e9), ("350M", 3.5e8), ("7b", 7e9),
                                         ("125k", 1.25e5), (1.3e9, 1.3e9), (1000, 1000.0)])
def test_parse_count(text, count):
    assert parse_count(text) == pytest.approx(count)


# ----------------------------------------------------------------------------------------------- input errors
@pytest.mark.parametrize("override, name", [
    ({"params": 0}, "params"), ({"params": -1e9}, "params"), ({"params": "lots"}, "params"),
    ({"params": float("nan")}, "params"), ({"params": True}, "params"),
    ({"step_time": 0}, "step_time"), ({"step_time": "-1s"}, "step_time"), ({"step_time": "fast"}, "step_time"),
    ({"bandwidth": 0}, "bandwidth"), ({"bandwidth": "-1Gbit"}, "bandwidth"), ({"bandwidth": "1 Gfoo"}, "bandwidth"),
    ({"bandwidth": float("inf")}, "bandwidth"), ({"bandwidth": None}, "bandwidth"),
    ({"latency": "-5ms"}, "latency"), ({"latency": "20 parsecs"}, "latency"),
    ({"groups": 1}, "groups"), ({"groups": 0}, "groups"), ({"groups": 2.5}, "groups"), ({"groups": "8"}, "groups"),
    ({"candidates": []}, "candidates"), ({"candidates": [0, 4]}, "candidates"), ({"candidates": [2.5]}, "candidates"),
    ({"candidates": "16,64"}, "candidates"),
    ({"target_utilization": 1.0}, "target_utilization"), ({"target_utilization": 0}, "target_utilization"),
    ({"target_utilization": 95}, "target_utilization"), ({"target_utilization": "0.95"}, "target_utilization"),
    ({"bytes_per_value": 0}, "bytes_per_value"), ({"compression": "zip"}, "compression"),
    ({"calibration": costmodel.Calibration(efficiency=0)}, "calibration.efficiency"),
    ({"calibration": costmodel.Calibration(efficiency=1.5)}, "calibration.efficiency"),
    ({"calibration": costmodel.Calibration(fixed_s=-1)}, "calibration.fixed_s"),
    ({"calibration": costmodel.Calibration(overlap=2)}, "calibration.overlap"),
    ({"calibration": {"efficiency": 0.9}}, "calibration"),
])
def test_bad_input_names_the_parameter(override, name):
    with pytest.raises(ValueError) as info:
        plan(**{**EXAMPLE, **override})
    assert str(info.value).startswith(name), str(info.value)


# ------------------------------------------------------------------------------------------------ command line
ARGS = ["plan", "--params", "1.3e9", "--step-time", "0.4", "--bandwidth", "1Gbit", "--latency", "20ms",
        "--groups", "8"]


def test_cli_prints_table_and_recommendation(capsys):
    cli_main(ARGS)
    out = capsys.readouterr().out
    for header in ("H", "bytes/step", "comm fraction", "utilization", "DDP"):
        assert header in out
    assert "4096 *" in out and "95.3%" in out and "5.2 GB" in out
    assert "recommended: H=4096 (the smallest candidate" in out


def test_cli_json(capsys):
    cli_main(ARGS + ["--json", "--candidates", "1024,4096", "--compression", "int4"])
    data = json.loads(capsys.readouterr().out)
    assert [r["h"] for r in data["rows"]] == [1024, 4096]
    assert data["compression"] == "int4" and data["groups"] == 8 and data["ddp"]["h"] is None
    # int4 at G = 8 puts 1.75 · 0.516 = 0.9 bytes per parameter on the link instead of fp32's 1.75 · 4 = 7, and codes
    assert data["min_h"] == math.ceil(0.95 / (0.4 * 0.05) * (1.75 * 8 * (0.5 + 4 / 256) * 1.3e9 / (ETA * 1e9) + 0.12
                                                             + hand_coding_seconds("int4", 1.3e9, 8)))
    assert data["min_h"] == 818 and data["recommended_h"] == 1024
    assert data["rows"][0]["link_bytes_per_step"] == pytest.approx(1.75 * data["rows"][0]["bytes_per_step"])
    assert data["rows"][0]["utilization"] == pytest.approx(plan(**EXAMPLE, compression="int4").row(1024).utilization)


def test_cli_reports_no_recommendation(capsys):
    cli_main(ARGS[:6] + ["100Mbit"] + ARGS[7:] + ["--candidates", "8,16"])
    assert "recommended: none (no candidate reaches 95%" in capsys.readouterr().out


@pytest.mark.parametrize("extra, flag", [(["--latency=-20ms"], "--latency"), (["--groups", "1"], "--groups"),
                                         (["--target", "1.5"], "--target"), (["--candidates", "a,b"], "--candidates"),
                                         (["--efficiency", "0"], "--efficiency"), (["--bandwidth", "fast"],
                                                                                    "--bandwidth")])
def test_cli_errors_name_the_flag(capsys, extra, flag):
    with pytest.raises(SystemExit) as info:
        cli_main(ARGS + extra)
    assert info.value.code == 2
    assert f"error: {flag}" in capsys.readouterr().err


def test_cli_help_describes_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["plan", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--params", "--step-time", "--bandwidth", "--latency", "--groups", "--candidates", "--target",
                 "--bytes-per-value", "--compression", "--efficiency", "--fixed-cost", "--overlap", "--json",
                 "--federated", "--sync-every", "--step-time-spread", "--pause", "--inner-state", "--outer-state",
                 "--heartbeat-timeout", "--margin"):
        assert flag in out


# ------------------------------------------------------------------------------------------- federated timeouts
def test_federated_timeouts_match_hand_computation():
    """sync_timeout and the lighthouse's timeouts from H × step time (docs/multi_cluster.md), written out by hand."""
    from lightning_localsgd.planner import federated_timeouts

    p = plan(**EXAMPLE)
    t = federated_timeouts(p)  # the recommended H = 4096; σ = 0.1, no pause, AdamW inside, DiLoCo outside
    sync = hand_sync_seconds(1.3e9, 8, 1e9, 0.02)
    interval = 4096 * 0.4  # 27.3 min of compute per interval
    spread = 0.1 * interval
    heal_bytes = 1.3e9 * (4 + 4 * 2 + 4 + 4)  # model, AdamW's two moments, θ_g, DiLoCo's momentum: 26 GB
    heal = 8 * heal_bytes / (ETA * 1e9) + 0.02
    assert t.h == 4096 and t.interval_s == pytest.approx(interval) and t.arrival_spread_s == pytest.approx(spread)
    assert t.sync_s == pytest.approx(sync, rel=1e-12)
    assert t.heal_bytes == pytest.approx(26e9) and t.heal_s == pytest.approx(heal, rel=1e-12)
    assert t.sync_timeout_s == math.ceil(2 * (interval + spread + 5 + heal + sync)) == 4239
    assert t.join_timeout_s == math.ceil(2 * spread) == 328
    assert t.stall_per_failure_s == pytest.approx(5 + sync)
    # an H that is not a candidate, plain SGD inside and averaging outside, a 30 s checkpoint pause, a 1 s heartbeat:
    # the join timeout keeps torchft's 10 s floor when the spread is small
    t = federated_timeouts(p, h=100, step_time_spread=0.05, pause="30s", inner_state_copies=0, outer_state_copies=0,
                           heartbeat_timeout="1s", margin=1.5)
    heal = 8 * 1.3e9 * 8 / (ETA * 1e9) + 0.02  # model + θ_g
    assert t.heal_bytes == pytest.approx(1.3e9 * 8) and t.sync_s == pytest.approx(sync, rel=1e-12)
    assert t.sync_timeout_s == math.ceil(1.5 * (40 + (2 + 30) + 1 + heal + sync))
    assert t.join_timeout_s == math.ceil(1.5 * 32) == 48
    assert federated_timeouts(p, h=10, step_time_spread=0.0).join_timeout_s == 10  # the 10 s floor
    with pytest.raises(ValueError, match="margin must be in"):
        federated_timeouts(p, margin=0.5)
    with pytest.raises(ValueError, match="sync_every must be an integer >= 1"):
        federated_timeouts(p, h=0)


def test_cli_prints_federated_timeouts(capsys):
    cli_main(ARGS + ["--federated"])
    out = capsys.readouterr().out
    assert "sync_timeout=4239" in out
    assert "lightning-localsgd lighthouse --join-timeout-ms 328000 --heartbeat-timeout-ms 5000" in out
    cli_main(ARGS + ["--federated", "--json", "--sync-every", "100", "--inner-state", "0", "--outer-state", "0"])
    data = json.loads(capsys.readouterr().out)
    assert data["federated"]["h"] == 100 and data["federated"]["heal_bytes"] == pytest.approx(1.3e9 * 8)
    with pytest.raises(SystemExit):
        cli_main(ARGS + ["--federated", "--step-time-spread=-1"])
    assert "error: --step-time-spread" in capsys.readouterr().err


def test_time_based_federated_timeouts_wait_one_slowest_step(capsys):
    """sync_every_seconds: the groups arrive within one step of the slowest group, (1 + σ) · t_c, of each other; the
    join timeout is the margin times that (no 10 s floor), and the CLI prints it."""
    from lightning_localsgd.planner import federated_timeouts

    p = plan(**EXAMPLE)
    t = federated_timeouts(p, step_time_spread=3.0, sync_every_seconds="30s", heartbeat_timeout="1s")
    sync = hand_sync_seconds(1.3e9, 8, 1e9, 0.02)
    heal = 8 * 1.3e9 * 20 / (ETA * 1e9) + 0.02  # model, AdamW's two moments, θ_g, DiLoCo's momentum
    slowest = 4 * 0.4  # a 4× slower group: 1.6 s per step
    assert t.sync_every_seconds == 30 and t.slowest_step_s == pytest.approx(slowest)
    assert t.interval_s == pytest.approx(30 + slowest) and t.arrival_spread_s == pytest.approx(slowest)
    assert t.join_timeout_s == pytest.approx(3.2)  # 2 × 1.6 s, below torchft's 10 s default
    assert t.sync_timeout_s == math.ceil(2 * (30 + slowest + slowest + 1 + heal + sync))
    cli_main(ARGS + ["--federated", "--sync-every-seconds", "30", "--step-time-spread", "3"])
    out = capsys.readouterr().out
    assert "--join-timeout-ms 3200 " in out and "at most one of its steps (1.6 s)" in out
    with pytest.raises(SystemExit):
        cli_main(ARGS + ["--federated", "--sync-every-seconds=-3"])
    assert "error: --sync-every-seconds" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ codecs: cost and choice
ROOT = Path(__file__).resolve().parents[2]


def hand_exchange(codec: str) -> str:
    """The codec's exchange as the engine declares it (the sparse codecs may say "all_gather")."""
    from lightning_localsgd.engine.codecs import get_codec

    return getattr(get_codec(codec), "exchange", "two_phase")


def hand_topk_sync_parts(params: float, G: int, latency: float) -> tuple[float, float]:
    """topk's sync as (a, b) in s = a / B + b: its bytes over the link and the rest, for N a multiple of 4096·G.

    One copy: N/4096 chunks of 116 bytes (64 2-bit values, 64 12-bit indices, an fp32 scale). Two-phase: 2(G−1)/G of
    it on the link, 2⌈log2 G⌉ latencies; all-gather: (G−1) of it, ⌈log2 G⌉ latencies. Plus the coding.
    """
    P = params / 4096 * 116
    exchange = hand_exchange("topk")
    rounds = math.ceil(math.log2(G))
    share, hops = (2 * (G - 1) / G, 2 * rounds) if exchange == "two_phase" else (G - 1, rounds)
    return share * 8 * P / ETA, hops * latency + hand_coding_seconds("topk", params, G, exchange)


def test_codec_cpu_table_covers_every_registered_codec_and_matches_its_benchmark():
    from lightning_localsgd.engine.codecs import CODECS, codec_names

    table = costmodel.CODEC_CPU_TABLE
    # every built-in codec; a codec registered later (the tests' topk_test) is measured on first use, tested below
    assert set(table) == {"fp32", *CODECS} and set(CODECS) <= set(codec_names()), (
        "a built-in codec has no CPU cost entry: run `python benchmarks/codec_cost/codec_cost.py` and copy its "
        "entries into costmodel.CODEC_CPU_TABLE")
    assert table["fp32"].encode_s_per_value == table["fp32"].decode_s_per_value == 0
    with open(ROOT / "benchmarks" / "codec_cost" / "results" / "codec_cost.csv", newline="") as f:
        measured = {r["codec"]: r for r in csv.DictReader(f)}
    assert set(measured) == set(table)
    for name, cost in table.items():
        assert cost.encode_s_per_value == pytest.approx(float(measured[name]["encode_s_per_value"]), rel=1e-5), name
        assert cost.decode_s_per_value == pytest.approx(float(measured[name]["decode_s_per_value"]), rel=1e-5), name
        if name != "fp32":
            assert 0 < cost.encode_s_per_value < 1e-6 and 0 < cost.decode_s_per_value < 1e-6, name
    # top-k selects per chunk: its encoding costs more per value than int4's rounding
    assert table["topk"].encode_s_per_value > table["int4"].encode_s_per_value


def test_step_factors_are_the_compression_benchmarks_steps_to_equal_loss():
    """CODEC_STEP_FACTORS against benchmarks/compression's curves: 768 / the step at which the fp32 run (same outer)
    reaches the codec's final loss, linearly interpolated between evaluations, at least 1."""
    from lightning_localsgd.planner import CODEC_STEP_FACTORS, RECIPE_OUTER

    curves: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with open(ROOT / "benchmarks" / "compression" / "results" / "compression_curves.csv", newline="") as f:
        for r in csv.DictReader(f):
            curves.setdefault((r["outer"], r["codec"]), []).append((float(r["step"]), float(r["val_loss"])))
    with open(ROOT / "benchmarks" / "compression" / "results" / "compression.csv", newline="") as f:
        final = {(r["outer"], r["codec"]): float(r["final_val_loss"]) for r in csv.DictReader(f)}
    checked = 0
    for (run_outer, codec), curve in curves.items():
        if codec == "none":
            continue
        loss = final[(run_outer, codec)]
        assert curve[-1][1] == pytest.approx(loss, rel=1e-5)
        # a recipe with its own outer step (RECIPE_OUTER) is priced against fp32 under each outer of the plan
        assert (run_outer == RECIPE_OUTER[codec]) if codec in RECIPE_OUTER else run_outer in ("average", "diloco")
        for outer in (("average", "diloco") if codec in RECIPE_OUTER else (run_outer,)):
            reference = curves[(outer, "none")]
            step = next((s0 + (l0 - loss) / (l0 - l1) * (s1 - s0)
                         for (s0, l0), (s1, l1) in zip(reference, reference[1:]) if l1 <= loss), curve[-1][0])
            assert CODEC_STEP_FACTORS[outer][codec] == pytest.approx(max(1.0, curve[-1][0] / step), rel=1e-5), \
                (outer, codec)
            checked += 1
    assert checked == 12  # bf16, int8, int4, topk, topk_ef under both outers, and topk_recipe against both
    for outer in ("average", "diloco"):
        assert CODEC_STEP_FACTORS[outer]["topk_ef"] == CODEC_STEP_FACTORS[outer]["topk"]  # the same decoded values
        assert CODEC_STEP_FACTORS[outer]["fp32"] == 1  # bf16 is measured now (in the checked loop above)
    assert CODEC_STEP_FACTORS["average"]["topk"] == pytest.approx(2.2266, rel=1e-3)  # fp32 reached topk's loss at 345


def test_codec_rows_price_bytes_coding_and_quality_by_hand():
    p = plan(params=2**30, step_time=0.4, bandwidth="100Mbit", latency="20ms", groups=2, sync_every=64)
    from lightning_localsgd.engine.codecs import codec_names

    # every registered codec, the built-ins first (a test module may have registered topk_test after them)
    assert p.codec_h == 64 and [c.codec for c in p.codecs] == ["fp32", *codec_names()]
    assert codec_names()[:5] == ("bf16", "int8", "int4", "topk", "topk_ef")
    fp32 = p.codec("fp32")
    assert fp32.sync_seconds == pytest.approx(hand_sync_seconds(2**30, 2, 1e8, 0.02), rel=1e-12)
    assert fp32.cpu_seconds == 0 and fp32.step_factor == 1
    int4 = p.codec("int4")  # 2**29 values a chunk: 2**28 code bytes + 2**21 scales of 4 bytes, 2 chunks
    P = 2 * (2**28 + 4 * 2**21)
    assert int4.payload_bytes == P and int4.link_bytes == P  # 2(G−1)/G = 1 at G = 2
    assert int4.sync_seconds == pytest.approx(8 * P / (ETA * 1e8) + 2 * 0.02
                                              + hand_coding_seconds("int4", 2**30, 2), rel=1e-12)
    topk = p.codec("topk")
    a, b = hand_topk_sync_parts(2**30, 2, 0.02)
    assert topk.sync_seconds == pytest.approx(a / 1e8 + b, rel=1e-12)
    assert topk.payload_bytes == 2**30 / 4096 * 116
    m = 2.22663  # CODEC_STEP_FACTORS["average"]["topk"]
    assert topk.step_factor == pytest.approx(m, rel=1e-5)
    assert topk.utilization == pytest.approx(hand_utilization(0.4, a / 1e8 + b, 64), rel=1e-12)
    assert topk.effective_utilization == pytest.approx(topk.utilization / m, rel=1e-5)
    assert topk.min_h == math.ceil((a / 1e8 + b) * 0.95 / (0.4 * 0.05))
    # a codec without a measured step factor (one a test registered) is priced, not ranked
    best = max((c for c in p.codecs if c.effective_utilization is not None), key=lambda c: c.effective_utilization)
    assert p.recommended_codec == best.codec
    # DiLoCo's factors price topk's quality at 4.9× the steps
    assert plan(params=2**30, step_time=0.4, bandwidth="100Mbit", latency="20ms", groups=2, sync_every=64,
                outer="diloco").codec("topk").step_factor == pytest.approx(4.89640, rel=1e-5)


def test_recommendation_switches_to_topk_below_the_hand_computed_bandwidth():
    """fp32 against topk at H = 64, 2 groups, 2**30 parameters: topk trains faster per fp32-equivalent step when
    m·(t_c + s_topk/H) < t_c + s_fp32/H. With s_fp32 = a_f/B + 2λ and s_topk = a_t/B + b_t that is
    B < B* = (a_f − m·a_t) / ((m − 1)·t_c·H + m·b_t − 2λ)."""
    N, G, H, tc, lat, m = 2**30, 2, 64, 0.4, 0.02, 2.22663
    a_f = 2 * (G - 1) / G * 8 * 4 * N / ETA
    a_t, b_t = hand_topk_sync_parts(N, G, lat)
    crossover = (a_f - m * a_t) / ((m - 1) * tc * H + m * b_t - 2 * lat)
    assert 1e7 < crossover < 1e9  # between 10 Mbit/s and 1 Gbit/s

    def choice(bandwidth: float) -> str:
        return plan(params=N, step_time=tc, bandwidth=bandwidth, latency=lat, groups=G, sync_every=H,
                    codecs=["fp32", "topk"]).recommended_codec

    assert choice(0.97 * crossover) == "topk"
    assert choice(1.03 * crossover) == "fp32"
    assert choice(crossover / 10) == "topk" and choice(crossover * 10) == "fp32"
    # the same crossover in the model size at a fixed link: N* = ((m − 1)·t_c·H + m·b_0 − 2λ) / (f − m·t) per value
    B = 1e8
    f_per_value = a_f / N / B
    t_per_value = (a_t / N) / B + hand_coding_seconds("topk", N, G, hand_exchange("topk")) / N
    n_star = ((m - 1) * tc * H + m * (b_t - hand_coding_seconds("topk", N, G, hand_exchange("topk"))) - 2 * lat) \
        / (f_per_value - m * t_per_value)
    small, large = (round(n_star * x / 8192) * 8192 for x in (0.97, 1.03))  # whole 4096-value chunks per group
    for n, expected in ((small, "fp32"), (large, "topk")):
        assert plan(params=n, step_time=tc, bandwidth=B, latency=lat, groups=G, sync_every=H,
                    codecs=["fp32", "topk"]).recommended_codec == expected, n


def test_fast_link_and_small_model_keep_fp32_or_int4_and_say_why():
    # 100M parameters on 10 Gbit/s: the bytes saved take less time than the coding, fp32 stays
    p = plan(params="100M", step_time="100ms", bandwidth="10 Gbit/s", latency=0.005, groups=4,
             codecs=["fp32", "int8", "int4", "topk"])
    assert p.recommended_codec == "fp32" and p.codec_h == p.recommended_h == 128
    assert p.codec("int8").link_seconds < p.codec("fp32").link_seconds < p.codec("int8").sync_seconds
    assert "keep compression=None" in p.codec_reason and "coding" in p.codec_reason
    assert "Fewest bytes, topk" in p.codec_reason  # and why not the sparse codec: its effective utilization
    # 1.3B on 10 Mbit/s at H = 4096: int4's 7.8× fewer bytes win at 1.016× the steps; topk's 2.23× the steps do not
    p = plan(params=1.3e9, step_time=0.4, bandwidth="10Mbit", latency="50ms", groups=2,
             codecs=["fp32", "bf16", "int8", "int4", "topk", "topk_ef"])
    assert p.recommended_h is None and p.codec_h == 4096  # no candidate reaches 95%: compared at the largest
    assert p.recommended_codec == "int4"
    assert p.codec("topk").utilization > p.codec("int4").utilization  # fewer bytes, faster sync, ...
    assert p.codec("topk").effective_utilization < p.codec("int4").effective_utilization  # ... but 2.23× the steps
    assert "compression='int4'" in p.codec_reason
    # the sparse recipe: topk's bytes at 1.31× the steps (its own outer step, named in the reason) beats int4 there
    recipe = plan(params=1.3e9, step_time=0.4, bandwidth="10Mbit", latency="50ms", groups=2)
    assert recipe.recommended_codec == "topk_recipe" and recipe.codec("topk_recipe").step_factor == 1.30653
    assert recipe.codec("topk_recipe").effective_utilization > recipe.codec("int4").effective_utilization
    assert "compression='topk_recipe', outer_optimizer='topk_recipe'" in recipe.codec_reason
    # at a short interval the same link makes topk pay
    p = plan(params=1.3e9, step_time=0.4, bandwidth="10Mbit", latency="50ms", groups=2, sync_every=64,
             codecs=["fp32", "bf16", "int8", "int4", "topk", "topk_ef"])
    assert p.recommended_codec in ("topk", "topk_ef") and "outweighs its quality cost" in p.codec_reason
    assert "Quality caveat" in p.codec_reason
    # your own step factor overrides the measured one: a topk as good as fp32 wins on the 1 Gbit/s example too
    assert plan(**EXAMPLE, codecs=["fp32", "topk"], step_factors={"topk": 1.0}).recommended_codec == "topk"
    assert plan(**EXAMPLE, codecs=["fp32", "topk"]).recommended_codec == "fp32"


def test_all_gather_exchange_is_priced_by_the_codecs_attribute(monkeypatch):
    """A codec with ``exchange = "all_gather"`` (the sparse codecs' all-gather of every group's payload): (G−1)·P
    bytes a group, one collective's latency, its own payload encoded once and G + 1 payloads decoded."""
    from lightning_localsgd.engine import codecs
    from lightning_localsgd.engine.codecs import TopKCodec

    class GatheredTopK(TopKCodec):
        exchange = "all_gather"

    monkeypatch.setitem(codecs._REGISTRY, "topk_gathered", GatheredTopK())
    assert costmodel.codec_exchange(GatheredTopK()) == "all_gather"
    assert costmodel.codec_exchange(object()) == "two_phase"  # a codec that does not say
    assert costmodel.exchange_wire_bytes("all_gather", 1000.0, 8) == 7000.0
    assert costmodel.exchange_wire_bytes("two_phase", 1000.0, 8) == 1750.0
    with pytest.raises(ValueError, match="exchange must be one of"):
        costmodel.exchange_wire_bytes("broadcast", 1000.0, 8)
    cost = costmodel.CODEC_CPU_TABLE["topk"]
    N, G = 2**30, 8
    p = plan(params=N, step_time=0.4, bandwidth="1Gbit", latency="20ms", groups=G, sync_every=64,
             codecs=["fp32", "topk_gathered"], codec_cpu={"topk_gathered": cost})
    row = p.codec("topk_gathered")
    P = N / 4096 * 116
    assert row.exchange == "all_gather" and row.payload_bytes == P and row.link_bytes == 7 * P
    assert row.link_seconds == pytest.approx(7 * 8 * P / (ETA * 1e9) + 3 * 0.02, rel=1e-12)
    coding = N * cost.encode_s_per_value + N * (G + 1) * cost.decode_s_per_value
    assert row.cpu_seconds == pytest.approx(coding, rel=1e-12) and row.cpu_source == "given"
    assert row.step_factor is None and row.effective_utilization is None  # not measured: priced, not recommended
    assert p.recommended_codec == "fp32" and "topk_gathered" in p.codec_reason and "--step-factor" in p.codec_reason
    # the rows of a plan with that compression use the same exchange
    q = plan(params=N, step_time=0.4, bandwidth="1Gbit", latency="20ms", groups=G, compression="topk_gathered",
             codec_cpu={"topk_gathered": cost})
    assert q.row(64).link_bytes_per_step == pytest.approx(7 * P / 64)
    assert q.row(64).sync_seconds == pytest.approx(row.sync_seconds, rel=1e-12)


def test_codec_missing_from_the_cpu_table_is_measured_on_this_machine(monkeypatch):
    import time

    from lightning_localsgd import planner
    from lightning_localsgd.engine import codecs

    class SlowBF16(codecs.BF16Codec):
        def encode(self, x):
            time.sleep(0.02)
            return super().encode(x)

    monkeypatch.setitem(codecs._REGISTRY, "slow_bf16", SlowBF16())
    monkeypatch.setattr(planner, "_MEASURED_CPU", {})
    assert "slow_bf16" not in costmodel.CODEC_CPU_TABLE
    p = plan(**EXAMPLE, codecs=["fp32", "slow_bf16"], step_factors={"slow_bf16": 1.0})
    row = p.codec("slow_bf16")
    measured = planner._MEASURED_CPU["slow_bf16"]
    assert row.cpu_source == "measured" and measured.source == "measured"
    assert measured.encode_s_per_value >= 0.02 / 2**20  # the sleep, over the 1M values it was timed on
    assert row.cpu_seconds == pytest.approx(costmodel.codec_cpu_seconds(measured, "two_phase", 1.3e9, 8), rel=1e-12)
    assert row.cpu_seconds >= 1.3e9 * 1.125 * 0.02 / 2**20  # N(1 + 1/G) values encoded
    # measured once, then cached
    plan(**EXAMPLE, codecs=["slow_bf16"], step_factors={"slow_bf16": 1.0})
    assert planner._MEASURED_CPU["slow_bf16"] is measured
    # calibrate_codec_cpu measures the built-ins too
    fresh = planner.calibrate_codec_cpu(["fp32", "int4"], numel=4096, repeats=1)
    assert fresh["fp32"].encode_s_per_value == 0 and fresh["int4"].encode_s_per_value > 0


def test_cli_names_the_recommended_codec_and_the_reason(capsys):
    cli_main(ARGS[:6] + ["10Mbit"] + ARGS[7:10] + ["2", "--sync-every", "64"])
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "Codecs at H=64" in out and "step factor" in out and "coding" in out
    assert re.search(r"recommended codec: topk(_ef|_recipe)? at H=64: [\d.]+% of the wall clock does fp32-equivalent",
                     out)
    assert "Its shorter sync outweighs its quality cost: compression='topk" in out and "Quality caveat" in out
    cli_main(ARGS + ["--codecs", "fp32,int8", "--bandwidth", "100Gbit"])
    out = " ".join(capsys.readouterr().out.split())
    assert "recommended codec: fp32 at H=" in out and "keep compression=None" in out
    # at 10 Mbit/s topk's measured coding time (~25 s here) is far below fp32's sync (~2 h): the choice does not hang
    # on this machine's speed or load, as it did at 1 Gbit/s (fp32's sync ~73 s against topk's coding ×3 under load)
    cli_main(ARGS[:6] + ["10Mbit"] + ARGS[7:] + ["--json", "--codecs", "fp32,topk", "--step-factor", "topk=1",
                                                 "--outer", "diloco", "--sync-every", "16", "--calibrate-codecs"])
    data = json.loads(capsys.readouterr().out)
    assert data["recommended_codec"] == "topk" and data["codec_h"] == 16 and data["outer"] == "diloco"
    assert [c["codec"] for c in data["codecs"]] == ["fp32", "topk"]
    assert data["codecs"][1]["step_factor"] == 1 and data["codecs"][1]["cpu_source"] == "measured"  # here


@pytest.mark.parametrize("override, name", [
    ({"codecs": ["zip"]}, "codecs"), ({"codecs": []}, "codecs"), ({"codecs": "topk"}, "codecs"),
    ({"sync_every": 0}, "sync_every"), ({"sync_every": 2.5}, "sync_every"), ({"outer": "adam"}, "outer"),
    ({"step_factors": {"topk": 0}}, "step_factors"), ({"step_factors": {"zip": 1.0}}, "step_factors"),
    ({"codec_cpu": {"topk": 1e-9}}, "codec_cpu"),
    ({"codec_cpu": {"topk": costmodel.CodecCPU(-1.0, 0.0)}}, "codec_cpu"),
])
def test_bad_codec_options_name_the_parameter(override, name):
    with pytest.raises(ValueError) as info:
        plan(**{**EXAMPLE, **override})
    assert str(info.value).startswith(name), str(info.value)


@pytest.mark.parametrize("extra, flag", [(["--step-factor", "topk=fast"], "--step-factor"),
                                         (["--step-factor", "topk=0"], "--step-factor"),
                                         (["--codecs", "zip"], "--codecs"), (["--sync-every", "0"], "--sync-every"),
                                         (["--calibrate-codecs", "abacus"], "--calibrate-codecs")])
def test_cli_codec_errors_name_the_flag(capsys, extra, flag):
    with pytest.raises(SystemExit) as info:
        cli_main(ARGS + extra)
    assert info.value.code == 2
    assert f"error: {flag}" in capsys.readouterr().err
