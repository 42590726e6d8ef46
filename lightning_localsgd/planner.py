"""Choose the sync interval H for a link: ``lightning-localsgd plan`` and :func:`plan`.

Given the model size, the measured compute seconds of one optimizer step, the link between worker groups and the
number of groups, the planner prices one sync with the library's cost model (:mod:`lightning_localsgd.costmodel`, the
model ``benchmarks/projection/projection.py`` uses and calibrates) and, for each candidate H, reports the bytes per
step, the fraction of the wall clock spent communicating and the utilization (compute / wall clock). It recommends the
smallest candidate H whose utilization reaches the target (95% by default)::

    lightning-localsgd plan --params 1.3e9 --step-time 0.4 --bandwidth 1Gbit --latency 20ms --groups 8

    from lightning_localsgd.planner import plan
    p = plan(params=1.3e9, step_time=0.4, bandwidth="1Gbit", latency="20ms", groups=8)
    p.recommended_h, p.row(p.recommended_h).utilization

Per optimizer step of one group, with compute t_c (``step_time``), N parameters, M = bytes_per_value · N bytes:

    sync        s    = 2(G−1)/G · 8M / (η·B) + 2⌈log2 G⌉ · λ + c0     (fp32 all-reduce of the model)
                s    = 2(G−1)/G · 8P / (η·B) + 2⌈log2 G⌉ · λ + 2·c0   (compressed all-reduce: all-to-all of
                                                                        encoded chunks + all-gather of the encoded
                                                                        means; P bytes = one compressed copy)
    local SGD   t(H) = t_c + s / H                                      (the sync blocks)
    DDP         t    = t_c + max(0, s_ar − φ · t_c)                     (gradient all-reduce hidden behind φ of t_c)
    utilization = t_c / t,   comm fraction = (t − t_c) / t = 1 − utilization

Utilization ≥ T holds exactly when ``H ≥ s · T / (t_c · (1 − T))``; :attr:`Plan.min_h` is that bound rounded up.
See ``docs/planner.md`` for the assumptions.

A compressed sync also pays its codec's coding: ``s += e · (values encoded) + d · (values decoded)``, with ``e`` and
``d`` the codec's CPU seconds per value (:data:`~lightning_localsgd.costmodel.CODEC_CPU_TABLE`, or
:func:`calibrate_codec_cpu` on this machine), and a codec exchanged by all-gather (``exchange = "all_gather"``) puts
``(G−1) · P`` on the link instead of ``2(G−1)/G · P`` (:mod:`lightning_localsgd.costmodel`). The plan then compares
every way to sync at one H (``sync_every``, else the recommended H): each codec's utilization ``u`` divided by its
step factor ``m`` (how many times fp32's steps it needs to reach fp32's loss, :data:`CODEC_STEP_FACTORS`, measured by
``benchmarks/compression``) is the share of the wall clock doing fp32-equivalent training, and
:attr:`Plan.recommended_codec` is the codec with the largest, explained in :attr:`Plan.codec_reason`. topk beats fp32
exactly when ``m · (t_c + s_topk / H) < t_c + s_fp32 / H``.

Federated worker groups (``lighthouse=``, ``plan --federated``): :func:`federated_timeouts` derives ``sync_timeout``
and the lighthouse's timeouts from the schedule (H × step time), the sync and one healing transfer; see
``docs/multi_cluster.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from .costmodel import (
    CODEC_CPU_TABLE,
    Calibration,
    CodecCPU,
    Link,
    allreduce_seconds,
    codec_cpu_seconds,
    codec_exchange,
    ddp_cost,
    exchange_seconds,
    exchange_wire_bytes,
    local_sgd_cost,
)
from .engine.codecs import check_codec, codec_names, get_codec, payload_bytes

__all__ = [
    "CODEC_STEP_FACTORS",
    "RECIPE_OUTER",
    "CodecRow",
    "DEFAULT_CANDIDATES",
    "FederatedTimeouts",
    "Plan",
    "PlanRow",
    "calibrate_codec_cpu",
    "codec_cpu_cost",
    "compressed_bytes_per_value",
    "federated_timeouts",
    "main",
    "parse_bandwidth",
    "parse_count",
    "parse_duration",
    "plan",
    "print_plan",
]

#: Candidate sync intervals when none are given: powers of two from 1 (a blocking sync every step) to 4096.
DEFAULT_CANDIDATES: tuple[int, ...] = tuple(2**k for k in range(13))

Number = Union[int, float]

# ----------------------------------------------------------------------------------------------------- parsing
_NUMBER = r"(?P<num>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
_SI = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
_BINARY = {"ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40}
_BANDWIDTH_RE = re.compile(
    rf"^\s*{_NUMBER}\s*(?P<prefix>[kKmMgGtTpP]i?)?(?P<unit>[bB]its?|[bB]ytes?|b|B)?\s*(?P<per>/\s*s(?:ec)?|ps)?\s*$"
)
_DURATION_RE = re.compile(rf"^\s*{_NUMBER}\s*(?P<unit>s|sec|secs|seconds?|ms|us|µs|μs|ns|min)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0, "ms": 1e-3,
                   "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9, "min": 60.0}
_COUNT_RE = re.compile(rf"^\s*{_NUMBER}\s*(?P<suffix>[kKmMbBgGtT])?\s*$")
_COUNT_SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def _as_number(value: object, name: str, what: str, pattern: re.Pattern, scale, examples: str) -> float:
    """A finite float from a number or a string matched by ``pattern``; ``scale(match)`` gives the unit factor."""
    if isinstance(value, bool):  # bool is an int subclass: True would silently mean 1
        raise ValueError(f"{name} must be {what}, got the boolean {value!r}; give e.g. {examples}.")
    if isinstance(value, numbers.Real):
        result = float(value)
    elif isinstance(value, str):
        m = pattern.match(value)
        if m is None:
            raise ValueError(f"{name}: cannot read {value!r} as {what}; give e.g. {examples}.")
        result = float(m.group("num")) * scale(m)
    else:
        raise ValueError(f"{name} must be a number or a string, got {type(value).__name__}; give e.g. {examples}.")
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {value!r}; give e.g. {examples}.")
    return result


def _bandwidth_scale(m: re.Match) -> float:
    prefix = (m.group("prefix") or "").lower()
    factor = _BINARY[prefix] if prefix.endswith("i") else _SI[prefix]
    unit = m.group("unit") or ""
    # b / bit = bit, B / byte = byte (8 bits); a bare number or prefix is bit/s, the unit of link rates.
    is_byte = unit == "B" or unit.lower().startswith("byte")
    return factor * (8.0 if is_byte else 1.0)


def parse_bandwidth(value: Union[Number, str], name: str = "bandwidth") -> float:
    """Link rate in bit/s, from a number (bit/s) or a string with a unit.

    ``b``/``bit`` are bits and ``B``/``byte`` bytes; prefixes k, M, G, T (powers of 1000, case-insensitive) or Ki, Mi,
    Gi, Ti (powers of 1024); an optional ``/s`` or ``ps``. ``"1Gbit"``, ``"10 Gbit/s"``, ``"400Gb"``, ``"1Gbps"`` and
    ``1e9`` are 1e9, 1e10, 4e11, 1e9, 1e9 bit/s; ``"1GB/s"`` is 8e9 bit/s.

    Raises:
        ValueError: unreadable, not finite, or not positive (the message names ``name``).
    """
    bits = _as_number(value, name, "a link rate", _BANDWIDTH_RE, _bandwidth_scale,
                      "'1Gbit', '100Mbit', '10 Gbit/s', '400Gb' or 1e9 (bit/s; B = byte)")
    if bits <= 0:
        raise ValueError(f"{name} must be > 0 bit/s, got {value!r}; give the link rate per worker group, e.g. '1Gbit'.")
    return bits


def parse_duration(value: Union[Number, str], name: str = "latency", allow_zero: bool = False) -> float:
    """Seconds, from a number (seconds) or a string with a unit: s, ms, us (or µs), ns, min.

    ``"20ms"``, ``"0.02"``, ``"50us"`` and ``"1s"`` are 0.02, 0.02, 5e-5 and 1.0 seconds.

    Raises:
        ValueError: unreadable, not finite, negative, or zero unless ``allow_zero`` (the message names ``name``).
    """
    seconds = _as_number(value, name, "a duration", _DURATION_RE,
                         lambda m: _DURATION_UNITS[(m.group("unit") or "").lower()],
                         "'20ms', '0.02' (seconds), '50us' or '1s'")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound} seconds, got {value!r}; give e.g. '20ms' or 0.02.")
    return seconds


def parse_count(value: Union[Number, str], name: str = "params") -> float:
    """A positive count, from a number or a string with a suffix k, M, B (= G), T: ``"1.3B"`` = ``1.3e9``.

    Raises:
        ValueError: unreadable, not finite, or not positive (the message names ``name``).
    """
    count = _as_number(value, name, "a count", _COUNT_RE,
                       lambda m: _COUNT_SUFFIXES[(m.group("suffix") or "").lower()], "1.3e9, '1.3B' or '350M'")
    if count <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}; give the number of model parameters, e.g. 1.3e9.")
    return count


def compressed_bytes_per_value(compression: str, params: float, groups: int = 1) -> float:
    """Bytes per parameter of one compressed copy, from the codec's own size (:func:`.engine.codecs.payload_bytes`).

    A compressed sync over ``groups`` groups encodes G chunks of ``ceil(N/G)`` values each (the last zero-padded), so
    one copy is ``G · payload_bytes(codec, ceil(N/G))`` bytes, what ``OuterSync.bytes_sent`` counts per sync (exact
    for one rank per group; with R ranks each rank chunks its own slice, a few bytes of padding and scales apart).
    bf16: 2. int8 / int4: 1 / 0.5 plus one fp32 scale per block of 256 values (4/256 = 0.015625 bytes per value).
    topk: 116 bytes per chunk of 4096 values (0.0283 bytes per value).
    """
    numel = max(1, round(params))
    G = max(1, int(groups))
    return G * payload_bytes(compression, math.ceil(numel / G)) / numel


# ----------------------------------------------------------------------------------------------------- codec CPU
def calibrate_codec_cpu(names: Optional[Iterable[str]] = None, numel: int = 1 << 22, repeats: int = 5,
                        threads: int = 1, device: str = "cpu") -> dict[str, CodecCPU]:
    """Measure each codec's encode and decode seconds per value on this machine.

    Times ``encode`` and ``decode`` of a representative pseudo-gradient (``numel`` normal fp32 values of scale 1e-3)
    with ``threads`` torch threads (1: a conservative figure, as the compression benchmark), best of ``repeats``.
    ``names``: registered codec names (default: every one, :func:`.engine.codecs.codec_names`); ``"fp32"`` (no
    codec) is 0. ``device``: where the values live (``"cuda"``: the codec's time on a GPU, which codes the
    pseudo-gradient where it lives; synchronized around each timing). The result goes to ``plan(codec_cpu=...)``;
    ``benchmarks/codec_cost/codec_cost.py`` writes it as the CSV behind
    :data:`~lightning_localsgd.costmodel.CODEC_CPU_TABLE`.
    """
    import time

    import torch

    chosen = list(codec_names()) if names is None else list(names)
    for name in chosen:
        check_codec(None if name == "fp32" else name)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: cannot read {device!r} as a torch device; give 'cpu' or 'cuda'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r}, but torch sees no CUDA GPU here; calibrate on 'cpu', or on the GPU "
                         "machine.")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict[str, CodecCPU] = {}
    try:
        x = (torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 1e-3).to(dev)
        for name in chosen:
            if name == "fp32":
                out[name] = CodecCPU(0.0, 0.0, "measured")
                continue
            codec = get_codec(name)
            enc = dec = math.inf
            for _ in range(repeats + (dev.type == "cuda")):  # on a GPU, one more: the first launches warm up
                sync()
                t0 = time.perf_counter()
                payload = codec.encode(x)
                sync()
                t1 = time.perf_counter()
                codec.decode(payload, numel)
                sync()
                t2 = time.perf_counter()
                enc, dec = min(enc, t1 - t0), min(dec, t2 - t1)
            out[name] = CodecCPU(enc / numel, dec / numel, "measured")
    finally:
        torch.set_num_threads(previous)
    return out


_MEASURED_CPU: dict[str, CodecCPU] = {}


def codec_cpu_cost(name: str, table: Optional[Mapping[str, CodecCPU]] = None) -> CodecCPU:
    """The CPU cost of codec ``name``: its entry in ``table`` (default
    :data:`~lightning_localsgd.costmodel.CODEC_CPU_TABLE`), or, for a codec the table lacks (one registered with
    :func:`~lightning_localsgd.register_codec`), measured once on this machine by :func:`calibrate_codec_cpu` at 1M
    values and cached (``source="measured"``)."""
    table = CODEC_CPU_TABLE if table is None else table
    if name in table:
        return table[name]
    check_codec(None if name == "fp32" else name)
    if name not in _MEASURED_CPU:
        _MEASURED_CPU.update(calibrate_codec_cpu([name], numel=1 << 20, repeats=3))
    return _MEASURED_CPU[name]


# ----------------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class PlanRow:
    """One candidate H (or DDP, ``h is None``): what one worker group sees per optimizer step."""

    h: Optional[int]
    """Sync interval in optimizer steps; ``None`` for the DDP row."""
    bytes_per_step: float
    """Payload bytes a group contributes per step: model (or compressed payload) bytes / H. This is what
    ``OuterSync.bytes_sent`` / ``local_sgd/bytes_sent`` counts (per rank: divide by the ranks of a group)."""
    link_bytes_per_step: float
    """Bytes a group sends (and receives) on the link per step: 2(G−1)/G × the payload for the fp32 all-reduce and a
    two-phase compressed sync (all-to-all of encoded chunks + all-gather of the encoded means), (G−1) × the payload
    for a codec exchanged by all-gather (:func:`~lightning_localsgd.costmodel.exchange_wire_bytes`)."""
    sync_seconds: float
    """One sync (DDP: one gradient all-reduce): communication, the codec's encoding and decoding, and local work."""
    seconds_per_step: float
    """Wall clock of one optimizer step, the sync amortized over H steps."""
    comm_fraction: float
    """Share of the wall clock spent waiting on communication: (step − compute) / step."""
    utilization: float
    """Compute / wall clock (= 1 − comm_fraction)."""

    @property
    def label(self) -> str:
        return "DDP" if self.h is None else str(self.h)


#: Quality cost of each codec: how many times fp32's optimizer steps it needs to reach the loss fp32 reaches, per
#: outer optimizer (``"average"``: local SGD, the strategies' default; ``"diloco"``). Measured by
#: ``benchmarks/compression`` (``results/compression.csv`` and ``compression_curves.csv``, its default command: GPT
#: micro, 123,200 parameters, 2 groups, H = 16, 768 steps, one seed): the step at which the fp32 run's validation curve
#: (linearly interpolated between evaluations) reaches the codec's final loss, 768 / that step, at least 1 (int8 and
#: bf16 with local SGD ended within 0.3% *below* fp32, within the noise: 1). topk (all-gathered) ended at 1.101× fp32's
#: loss with local SGD and 1.227× with DiLoCo, which fp32 reached at step 345 and 157 of 768: 2.23× and 4.90× the
#: steps. ``topk_ef`` decodes to the values of ``topk``: the same factor. ``topk_recipe`` runs with its own outer step
#: (:data:`RECIPE_OUTER`): its loss, 1.0095× DiLoCo fp32's, was reached by the fp32 run of each outer optimizer at step
#: 588 (local SGD) and 708 (DiLoCo). A small model, few steps and one seed: an estimate, not a law; measure on your
#: model and pass ``step_factors`` (``--step-factor``). A codec absent here (one you registered) is priced but not
#: recommended until you give its factor.
CODEC_STEP_FACTORS: dict[str, dict[str, float]] = {
    "average": {"fp32": 1.0, "bf16": 1.0, "int8": 1.0, "int4": 1.02068, "topk": 2.22663, "topk_ef": 2.22663,
                "topk_recipe": 1.30653},
    "diloco": {"fp32": 1.0, "bf16": 1.05008, "int8": 1.25568, "int4": 1.26509, "topk": 4.89640, "topk_ef": 4.89640,
               "topk_recipe": 1.08476},
}

#: Codecs measured with an outer optimizer of their own (their step factor above is against fp32 with the plan's):
#: the recommendation names it beside ``compression=``.
RECIPE_OUTER: dict[str, str] = {"topk_recipe": "topk_recipe"}


@dataclass(frozen=True)
class CodecRow:
    """One way to sync (``"fp32"``: no codec, or a registered codec) priced at the plan's :attr:`Plan.codec_h`."""

    codec: str
    """``"fp32"`` (``compression=None``, ``bytes_per_value`` bytes a value) or a registered codec's name."""
    exchange: str
    """How its payloads travel: ``"all_reduce"`` (fp32), ``"two_phase"`` or ``"all_gather"`` (the codec's
    ``exchange``, :func:`~lightning_localsgd.costmodel.codec_exchange`)."""
    payload_bytes: float
    """One copy of the model in this format (what ``local_sgd/bytes_sent`` counts per sync and group)."""
    link_bytes: float
    """Bytes a group sends (and receives) on the link per sync."""
    link_seconds: float
    """The collectives of one sync: bytes over the link, latency terms and fixed costs."""
    cpu_seconds: float
    """Encoding and decoding of one sync (:func:`~lightning_localsgd.costmodel.codec_cpu_seconds`)."""
    cpu_source: str
    """Where the codec's CPU cost comes from: ``"table"``, ``"measured"`` (on this machine) or ``"given"``."""
    sync_seconds: float
    """link + CPU + the sync's local work."""
    utilization: float
    """Compute / wall clock at :attr:`Plan.codec_h`."""
    step_factor: Optional[float]
    """Steps it needs per fp32 step to reach the same loss (:data:`CODEC_STEP_FACTORS`); ``None``: not measured."""
    effective_utilization: Optional[float]
    """utilization / step_factor: the share of the wall clock doing fp32-equivalent training (what the
    recommendation maximises); ``None`` without a step factor."""
    min_h: int
    """Smallest H at which this sync reaches the target utilization."""


@dataclass(frozen=True)
class Plan:
    """The result of :func:`plan`: one row per candidate H, the DDP row, and the recommended H; the compared codecs
    and the recommended one."""

    params: float
    step_time_s: float
    bandwidth_bit_s: float
    latency_s: float
    groups: int
    target_utilization: float
    bytes_per_value: float
    """Bytes per value of the uncompressed model / gradients (4 = fp32)."""
    compression: Optional[str]
    payload_bytes_per_value: float
    """Bytes per value of a sync's payload (``bytes_per_value``, or the codec's)."""
    calibration: Calibration
    rows: tuple[PlanRow, ...]
    """One per candidate, ascending H."""
    ddp: PlanRow
    recommended_h: Optional[int]
    """Smallest candidate with utilization >= target; ``None`` when no candidate reaches it (see :attr:`reason`)."""
    min_h: int
    """Smallest integer H (candidate or not) with utilization >= target."""
    reason: str
    """Why this recommendation, or why none."""
    notes: tuple[str, ...] = field(default=())
    """Remarks worth reading: DDP already fast enough, compression slower than fp32 (its extra fixed cost), ..."""
    outer: str = "average"
    """The outer optimizer whose step factors price the codecs' quality (:data:`CODEC_STEP_FACTORS`)."""
    codec_h: Optional[int] = None
    """The H the codecs are compared at: ``sync_every`` if given, else the recommended H, else the largest
    candidate."""
    codecs: tuple[CodecRow, ...] = ()
    """Every compared way to sync, at :attr:`codec_h`."""
    recommended_codec: Optional[str] = None
    """The codec with the largest effective utilization at :attr:`codec_h` (``"fp32"``: ``compression=None``)."""
    codec_reason: str = ""
    """Why that codec: its sync's link and CPU time, utilization and step factor against fp32 and the runner-up."""

    def codec(self, name: str) -> CodecRow:
        """The comparison row of codec ``name``."""
        for c in self.codecs:
            if c.codec == name:
                return c
        raise KeyError(f"{name!r} was not compared (compared: {[c.codec for c in self.codecs]}).")

    def row(self, h: int) -> PlanRow:
        """The row of candidate ``h``."""
        for r in self.rows:
            if r.h == h:
                return r
        raise KeyError(f"H={h} is not a candidate of this plan (candidates: {[r.h for r in self.rows]}).")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serializable), as printed by ``lightning-localsgd plan --json``."""
        d = asdict(self)
        d["rows"] = [asdict(r) for r in self.rows]
        d["codecs"] = [asdict(c) for c in self.codecs]
        d["notes"] = list(self.notes)
        return d


def _check_fraction(value: object, name: str, low: float, high: float, open_low: bool, open_high: bool,
                    hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}; {hint}.")
    v = float(value)
    if (v < low or (open_low and v == low)) or (v > high or (open_high and v == high)):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}; {hint}.")
    return v


def _check_calibration(cal: Calibration) -> Calibration:
    if not isinstance(cal, Calibration):
        raise ValueError(f"calibration must be a lightning_localsgd.costmodel.Calibration or None, got "
                         f"{type(cal).__name__}.")
    _check_fraction(cal.efficiency, "calibration.efficiency", 0, 1, True, False,
                    "the achieved fraction of the link bandwidth, e.g. 0.9")
    _check_fraction(cal.overlap, "calibration.overlap", 0, 1, False, False,
                    "the part of DDP's compute its all-reduce hides behind, e.g. 2/3")
    for name in ("fixed_s", "outer_s_per_byte"):
        v = getattr(cal, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
            raise ValueError(f"calibration.{name} must be a finite number >= 0, got {v!r}.")
    return cal


def _check_candidates(candidates: Optional[Iterable[int]]) -> tuple[int, ...]:
    if candidates is None:
        return DEFAULT_CANDIDATES
    if isinstance(candidates, (str, bytes)):
        raise ValueError(f"candidates must be a sequence of integers >= 1, got the string {candidates!r}; "
                         f"give e.g. [16, 64, 256].")
    values = list(candidates)
    if not values:
        raise ValueError("candidates must not be empty; give e.g. [16, 64, 256], or None for powers of two 1..4096.")
    for h in values:
        if isinstance(h, bool) or not isinstance(h, numbers.Integral) or h < 1:
            raise ValueError(f"candidates must be integers >= 1 (sync every H optimizer steps), got {h!r}.")
    return tuple(sorted({int(h) for h in values}))


def _check_codec_options(codecs: Optional[Iterable[str]], sync_every: Optional[int], outer: str,
                         step_factors: Optional[Mapping[str, float]],
                         codec_cpu: Optional[Mapping[str, CodecCPU]]) -> tuple[tuple[str, ...], dict[str, float]]:
    """The codecs to compare (``"fp32"`` first) and the step factors of the chosen outer optimizer, checked."""
    known = ("fp32", *codec_names())
    if codecs is None:
        names = known
    else:
        if isinstance(codecs, (str, bytes)):
            raise ValueError(f"codecs must be a sequence of codec names, got the string {codecs!r}; give e.g. "
                             f"['fp32', 'int4', 'topk'].")
        names = tuple(dict.fromkeys(codecs))
        if not names:
            raise ValueError(f"codecs must not be empty; give some of {known}, or None for all of them.")
        for name in names:
            if name not in known:
                raise ValueError(f"codecs: unknown codec {name!r}; give some of {known} (fp32: no compression).")
    if sync_every is not None and (isinstance(sync_every, bool) or not isinstance(sync_every, numbers.Integral)
                                   or sync_every < 1):
        raise ValueError(f"sync_every must be an integer >= 1 (the H you will run), or None, got {sync_every!r}.")
    if outer not in CODEC_STEP_FACTORS:
        raise ValueError(f"outer must be one of {tuple(CODEC_STEP_FACTORS)} (the outer optimizer whose measured step "
                         f"factors price the codecs' quality), got {outer!r}.")
    factors = dict(CODEC_STEP_FACTORS[outer])
    for name, value in (step_factors or {}).items():
        if name not in known:
            raise ValueError(f"step_factors: unknown codec {name!r}; give some of {known}.")
        factors[name] = _check_fraction(value, f"step_factors: {name}", 0, math.inf, True, True,
                                        "give the steps the codec needs per fp32 step to reach fp32's loss, e.g. 1.2")
    for name, cost in (codec_cpu or {}).items():
        if not isinstance(cost, CodecCPU) or not all(
                isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0
                for v in (cost.encode_s_per_value, cost.decode_s_per_value)):
            raise ValueError(f"codec_cpu[{name!r}] must be a lightning_localsgd.costmodel.CodecCPU of finite seconds "
                             f">= 0 per value, got {cost!r}.")
    return names, factors


def plan(
    params: Union[Number, str],
    step_time: Union[Number, str],
    bandwidth: Union[Number, str],
    latency: Union[Number, str],
    groups: int,
    candidates: Optional[Sequence[int]] = None,
    target_utilization: float = 0.95,
    bytes_per_value: float = 4.0,
    compression: Optional[str] = None,
    calibration: Optional[Calibration] = None,
    codecs: Optional[Sequence[str]] = None,
    sync_every: Optional[int] = None,
    outer: str = "average",
    step_factors: Optional[Mapping[str, float]] = None,
    codec_cpu: Optional[Mapping[str, CodecCPU]] = None,
) -> Plan:
    """Price each candidate sync interval H on a link and recommend the smallest that keeps utilization >= target;
    compare the ways to sync (fp32 and every codec) and recommend the one that trains fastest.

    Args:
        params: number of model parameters N (``1.3e9`` or ``"1.3B"``).
        step_time: measured compute seconds of one optimizer step of one worker group, without cross-group
            communication (``0.4`` or ``"400ms"``).
        bandwidth: link rate per worker group, in bit/s (``1e9``) or with a unit (``"1Gbit"``, ``"10 Gbit/s"``).
        latency: one-way latency between groups, in seconds (``0.02``) or with a unit (``"20ms"``, ``"50us"``);
            0 is allowed (an ideal link).
        groups: number of worker groups G that sync over the link (>= 2).
        candidates: the H values to price (default :data:`DEFAULT_CANDIDATES`, powers of two 1..4096).
        target_utilization: the utilization (compute / wall clock) to reach, in (0, 1).
        bytes_per_value: bytes per value of the uncompressed sync and of DDP's gradients (4 = fp32, as this library
            syncs).
        compression: ``None`` or a registered codec (``"bf16"``, ``"int8"``, ``"int4"``, ``"topk"``, ...: the
            strategies' ``compression``) for the rows: the sync exchanges the codec's payload (its ``exchange``:
            a two-phase compressed all-reduce, or an all-gather for the sparse codecs) and pays its encoding and
            decoding, instead of the fp32 all-reduce of the model. DDP's row stays uncompressed.
        calibration: the cost model's constants (η, c0, φ, local work per byte; default
            :class:`~lightning_localsgd.costmodel.Calibration`: η = 0.9, c0 = 0, φ = 2/3). Fit your own with
            :func:`lightning_localsgd.costmodel.calibrate` or ``benchmarks/projection/projection.py``.
        codecs: the ways to sync to compare (``"fp32"`` and registered codec names; default: all of them).
        sync_every: the H to compare them at (the H you will run); default the recommended H, or the largest
            candidate when none reaches the target.
        outer: ``"average"`` (the strategies' default) or ``"diloco"``: whose measured step factors
            (:data:`CODEC_STEP_FACTORS`) price each codec's quality.
        step_factors: your own step factors by codec name (steps per fp32 step to reach fp32's loss), over the
            measured ones; a codec without one is priced but not recommended.
        codec_cpu: the codecs' CPU cost by name (:class:`~lightning_localsgd.costmodel.CodecCPU`; from
            :func:`calibrate_codec_cpu` for this machine), over
            :data:`~lightning_localsgd.costmodel.CODEC_CPU_TABLE`; a codec in neither is measured here once.

    Returns:
        A :class:`Plan`.

    Raises:
        ValueError: an input is unreadable or out of range; the message names the parameter and what to give.
    """
    n = parse_count(params, "params")
    tc = parse_duration(step_time, "step_time")
    bw = parse_bandwidth(bandwidth, "bandwidth")
    lat = parse_duration(latency, "latency", allow_zero=True)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise ValueError(f"groups must be an integer >= 2 (worker groups syncing over the link), got {groups!r}.")
    if groups < 2:
        raise ValueError(f"groups must be >= 2, got {groups}: with one worker group nothing crosses the link, so there "
                         f"is no sync to plan; give the number of groups (e.g. clusters or nodes) that sync.")
    G = int(groups)
    hs = _check_candidates(candidates)
    target = _check_fraction(target_utilization, "target_utilization", 0, 1, True, True,
                             "give a fraction such as 0.95 (for 95%)")
    if isinstance(bytes_per_value, bool) or not isinstance(bytes_per_value, numbers.Real) \
            or not math.isfinite(bytes_per_value) or bytes_per_value <= 0:
        raise ValueError(f"bytes_per_value must be a number > 0, got {bytes_per_value!r}; 4 = fp32, 2 = bf16.")
    check_codec(compression)
    cal = _check_calibration(Calibration() if calibration is None else calibration)
    compared, factors = _check_codec_options(codecs, sync_every, outer, step_factors, codec_cpu)

    link = Link("planned link", bw, lat)
    model_bytes = float(bytes_per_value) * n

    def price(name: str) -> _SyncPrice:
        """One sync of ``name`` ("fp32" = uncompressed): its bytes, link seconds and codec CPU seconds."""
        if name == "fp32":
            return _SyncPrice("all_reduce", model_bytes, 2 * (G - 1) / G * model_bytes,
                              allreduce_seconds(model_bytes, G, link, cal), 0.0, "table")
        exchange = codec_exchange(get_codec(name))
        payload = compressed_bytes_per_value(name, n, G) * n
        cost = (codec_cpu or {}).get(name)
        cpu = cost if cost is not None else codec_cpu_cost(name)
        return _SyncPrice(exchange, payload, exchange_wire_bytes(exchange, payload, G),
                          exchange_seconds(exchange, payload, G, link, cal),
                          codec_cpu_seconds(cpu, exchange, n, G),
                          "given" if cost is not None and cpu.source != "measured" else cpu.source)

    mine = price("fp32" if compression is None else compression)
    payload_per_value = mine.payload_bytes / n
    sync_s = mine.link_seconds + mine.cpu_seconds + cal.outer_s_per_byte * model_bytes

    def local_row(h: int) -> PlanRow:
        step = tc + sync_s / h
        return PlanRow(h, mine.payload_bytes / h, mine.link_bytes / h, sync_s, step, (step - tc) / step, tc / step)

    rows = tuple(local_row(h) for h in hs)
    ddp = ddp_cost(tc, model_bytes, G, link, cal)
    ddp_row = PlanRow(None, model_bytes, 2 * (G - 1) / G * model_bytes, ddp.comm_s, ddp.step_s,
                      (ddp.step_s - ddp.compute_s) / ddp.step_s, ddp.utilization)
    min_h = _min_h(sync_s, tc, target)

    passing = [r for r in rows if r.utilization >= target]
    recommended = passing[0].h if passing else None
    if recommended is not None:
        r = passing[0]
        reason = (f"the smallest candidate with utilization >= {target:.0%}: {r.utilization:.1%}, one "
                  f"{_fmt_seconds(r.sync_seconds)} sync per {_fmt_seconds(recommended * tc)} of compute")
        if min_h < recommended:
            reason += f"; any H >= {min_h} reaches {target:.0%}"
    else:
        last = rows[-1]
        reason = (f"no candidate reaches {target:.0%} utilization: the largest, H={last.h}, gives "
                  f"{last.utilization:.1%}. H >= {min_h} would (add it to the candidates), or make a sync cheaper: "
                  f"a faster link" + (", or compression" if compression is None else ""))

    notes = []
    if ddp_row.utilization >= target:
        notes.append(f"DDP already reaches {ddp_row.utilization:.1%} on this link: local SGD buys no throughput here.")
    if compression is not None:
        # Fewer bytes whenever P < M; the codec's CPU time, or the second collective's fixed cost c0, can still
        # outweigh the bytes saved on a small model or a fast link (or P >= M, e.g. bf16 against --bytes-per-value 2).
        fp32_sync = allreduce_seconds(model_bytes, G, link, cal)
        compressed_sync = mine.link_seconds + mine.cpu_seconds
        if compressed_sync >= fp32_sync:
            notes.append(
                f"compression={compression!r} makes a sync no faster than the uncompressed all-reduce here "
                f"({_fmt_seconds(compressed_sync)} vs {_fmt_seconds(fp32_sync)}): "
                + ("it runs two collectives (2·c0 = " f"{_fmt_seconds(2 * cal.fixed_s)} of fixed cost)"
                   if mine.exchange == "two_phase" else f"its {mine.exchange} exchange")
                + f", its encoding and decoding take {_fmt_seconds(mine.cpu_seconds)}, and it saves only "
                f"{_fmt_bytes(max(0.0, model_bytes - mine.payload_bytes))} per copy.")

    codec_h = int(sync_every) if sync_every is not None else (recommended if recommended is not None else hs[-1])
    codec_rows = []
    for name in compared:
        c = mine if name == ("fp32" if compression is None else compression) else price(name)
        sync = c.link_seconds + c.cpu_seconds + cal.outer_s_per_byte * model_bytes
        util = tc / (tc + sync / codec_h)
        factor = factors.get(name)
        codec_rows.append(CodecRow(name, c.exchange, c.payload_bytes, c.link_bytes, c.link_seconds, c.cpu_seconds,
                                   c.cpu_source, sync, util, factor, None if factor is None else util / factor,
                                   _min_h(sync, tc, target)))
    best, codec_reason = _choose_codec(codec_rows, codec_h, outer, bytes_per_value)
    return Plan(params=n, step_time_s=tc, bandwidth_bit_s=bw, latency_s=lat, groups=G, target_utilization=target,
                bytes_per_value=float(bytes_per_value), compression=compression,
                payload_bytes_per_value=payload_per_value, calibration=cal, rows=rows, ddp=ddp_row,
                recommended_h=recommended, min_h=min_h, reason=reason, notes=tuple(notes), outer=outer,
                codec_h=codec_h, codecs=tuple(codec_rows), recommended_codec=best, codec_reason=codec_reason)


@dataclass(frozen=True)
class _SyncPrice:
    exchange: str
    payload_bytes: float
    link_bytes: float
    link_seconds: float
    cpu_seconds: float
    cpu_source: str


def _min_h(sync_s: float, tc: float, target: float) -> int:
    """Smallest integer H with tc / (tc + sync/H) >= target: H >= s·T / (tc·(1 − T)), nudged by ±1 against float
    rounding so that the bound agrees with the rows' own utilization."""
    def util(h: int) -> float:
        return tc / (tc + sync_s / h)

    h = max(1, math.ceil(sync_s * target / (tc * (1 - target))))
    while h > 1 and util(h - 1) >= target:
        h -= 1
    while util(h) < target:
        h += 1
    return h


def _codec_label(name: str, bytes_per_value: float) -> str:
    if name != "fp32":
        return name
    return "fp32" if bytes_per_value == 4 else f"uncompressed ({bytes_per_value:g} B/value)"


def _choose_codec(rows: list[CodecRow], h: int, outer: str, bytes_per_value: float) -> tuple[Optional[str], str]:
    """The row with the largest effective utilization (the first of equals: fp32 before any codec), and why: its sync
    against fp32's (or, when fp32 wins, the runner-up's), its quality cost, and the leanest codec's figures."""
    ranked = sorted((r for r in rows if r.effective_utilization is not None),
                    key=lambda r: -r.effective_utilization)  # stable: ties keep the compared order
    unmeasured = [r.codec for r in rows if r.effective_utilization is None]
    tail = (f" Not recommended without a measured step factor: {', '.join(unmeasured)} (give step_factors / "
            f"--step-factor NAME=X)." if unmeasured else "")
    if not ranked:
        return None, "no compared codec has a step factor." + tail
    best = ranked[0]
    fp32 = next((r for r in rows if r.codec == "fp32"), None)
    base = fp32 if fp32 is not None and fp32 is not best else (ranked[1] if len(ranked) > 1 else None)

    def name(r: CodecRow) -> str:
        return _codec_label(r.codec, bytes_per_value)

    def sync_words(r: CodecRow) -> str:
        coding = f" + {_fmt_seconds(r.cpu_seconds)} coding" if r.cpu_seconds > 0 else ""
        return (f"{_fmt_seconds(r.sync_seconds)} ({_fmt_seconds(r.link_seconds)} on the link for "
                f"{_fmt_bytes(r.link_bytes)}{coding})")

    def setting(codec: str) -> str:
        own = RECIPE_OUTER.get(codec)
        return f"compression={codec!r}" + (f", outer_optimizer={own!r}" if own else "")

    def quality(r: CodecRow) -> str:
        if r.step_factor == 1:
            return "no quality cost" if r.codec == "fp32" else "no measured quality cost"
        return f"{r.step_factor:.3g}× fp32's steps to the same loss ({outer})"

    reason = (f"{name(best)} at H={h}: {best.effective_utilization:.1%} of the wall clock does fp32-equivalent "
              f"training (utilization {best.utilization:.1%}, {quality(best)}); a sync takes {sync_words(best)}")
    if base is not None:
        reason += (f"; {name(base)}: {base.effective_utilization:.1%} (utilization {base.utilization:.1%}, "
                   f"{quality(base)}), a sync {sync_words(base)}")
    if best.codec == "fp32":
        reason += (". No codec's bytes saved outweigh its coding time and quality cost on this link: keep "
                   "compression=None.")
    elif best.step_factor == 1:
        reason += f". Its shorter sync pays at no measured quality cost: {setting(best.codec)}."
    else:
        reason += (f". Its shorter sync outweighs its quality cost: {setting(best.codec)}. Quality caveat: the "
                   f"step factor is extrapolated from a 123k-parameter model at H=16 (benchmarks/compression: topk's "
                   f"loss at equal steps 1.101× fp32's with local SGD, 1.227× with DiLoCo; topk_recipe 1.0095× "
                   f"DiLoCo's; int4 1.002× and 1.031×); measure on your model and pass --step-factor {best.codec}=X.")
    leanest = min(ranked, key=lambda r: r.link_bytes)  # the codec that saves the most bytes: why (not) it
    if leanest is not best and leanest is not base:
        reason += (f" Fewest bytes, {leanest.codec}: {leanest.effective_utilization:.1%} (utilization "
                   f"{leanest.utilization:.1%}, {quality(leanest)}), a sync {sync_words(leanest)}.")
    return best.codec, reason + tail


# ----------------------------------------------------------------------------------------------------- federated
#: torchft's lighthouse defaults (also ``lightning-localsgd lighthouse``'s): heartbeat and join timeouts.
DEFAULT_HEARTBEAT_TIMEOUT_S = 5.0
DEFAULT_JOIN_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class FederatedTimeouts:
    """Timeouts for federated worker groups (``lighthouse=``), derived from the schedule (H × step time).

    Per sync of one group, with compute ``t_c`` per step, spread ``σ`` (the slowest group's step is ``(1 + σ) t_c``),
    pauses ``p`` (checkpoint, validation), one sync ``s`` (the plan's cost model), heartbeat timeout ``b``, margin
    ``m``::

        interval        I = H · t_c
        arrival spread  A = H · t_c · σ + p              how far apart the groups reach a sync
        healing         T = 8 · bytes / (η · B) + λ      one copy of model + inner optimizer state + θ_g + outer state
        sync_timeout      = ⌈m · (I + A + b + T + s)⌉    a joining (or restarted) group waits at its first quorum up
                                                        to one interval for the running groups, then heals and syncs
        join timeout      = max(10 s, ⌈m · A⌉)           a quorum waits that long for a late but live group
        stall / failure   = b + s                        survivors of a death (between or inside a sync)

    Time-based syncs (``sync_every_seconds`` = ``T``): every group enters the sync at its first step end after ``T``,
    so the groups arrive within one step of the slowest group, ``t_s = (1 + σ) t_c``, of each other::

        interval        I = T + t_s
        arrival spread  A = t_s + p                      a slow group is waited for at most one of its steps
        join timeout      = ⌈m · A⌉ (to 0.1 s)           no 10 s floor: a straggler beyond it misses the sync
    """

    h: int
    """The sync interval priced."""
    interval_s: float
    """``H · t_c``: compute seconds of one interval."""
    arrival_spread_s: float
    """``H · t_c · σ + p``: how far apart the groups reach a sync."""
    sync_s: float
    """One sync over the link (the plan's cost model)."""
    heal_bytes: float
    """What one healing moves: the model, the inner optimizer state, ``θ_g`` (fp32) and the outer optimizer state."""
    heal_s: float
    """One healing transfer over the link."""
    heartbeat_timeout_s: float
    """The lighthouse's heartbeat timeout (given): how long a dead group still counts as live."""
    sync_timeout_s: float
    """``sync_timeout=`` to pass to the strategy (seconds, a whole number)."""
    join_timeout_s: float
    """The lighthouse's ``--join-timeout-ms`` / 1000."""
    stall_per_failure_s: float
    """What one group's death costs the survivors: the heartbeat timeout plus one sync."""
    margin: float
    sync_every_seconds: Optional[float] = None
    """Time-based syncs: ``T`` (``None``: every ``h`` steps)."""
    slowest_step_s: float = 0.0
    """``(1 + σ) · t_c``: one step of the slowest group."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def federated_timeouts(p: Plan, h: Optional[int] = None, step_time_spread: float = 0.1,
                       pause: Union[Number, str] = 0.0, inner_state_copies: float = 2.0,
                       outer_state_copies: float = 1.0, heartbeat_timeout: Union[Number, str] =
                       DEFAULT_HEARTBEAT_TIMEOUT_S, margin: float = 2.0,
                       sync_every_seconds: Union[Number, str, None] = None) -> FederatedTimeouts:
    """Timeouts for federated worker groups from a plan's schedule: see :class:`FederatedTimeouts` for the formulas.

    Args:
        p: the :func:`plan` of the link between the jobs.
        h: the sync interval (default: the plan's recommended H, or its :attr:`Plan.min_h` when none is).
        step_time_spread: σ, how much slower the slowest group's step is than ``step_time`` (0.1 = 10%).
        pause: seconds a group may pause between two syncs besides its steps (a checkpoint write, validation).
        inner_state_copies: fp32 copies of the parameters in the inner optimizer state (AdamW 2, SGD with momentum
            1, plain SGD 0).
        outer_state_copies: fp32 copies in the outer optimizer state (DiLoCo's Nesterov momentum 1, averaging 0).
        heartbeat_timeout: the lighthouse's ``--heartbeat-timeout-ms`` (as seconds, or ``"5s"``).
        margin: safety factor on the derived bounds (>= 1).
        sync_every_seconds: time-based syncs every ``T`` seconds (or ``"30s"``) instead of every ``h`` steps: the
            groups then arrive within one of the slowest group's steps, and the join timeout is derived from it.
    """
    if h is None:
        h = p.recommended_h if p.recommended_h is not None else p.min_h
    if isinstance(h, bool) or not isinstance(h, numbers.Integral) or h < 1:
        raise ValueError(f"sync_every must be an integer >= 1 (H, optimizer steps between syncs), got {h!r}.")
    sigma = _check_fraction(step_time_spread, "step_time_spread", 0, math.inf, False, True,
                            "give how much slower the slowest group's step is, e.g. 0.1 for 10%")
    pause_s = parse_duration(pause, "pause", allow_zero=True)
    for name, value in (("inner_state_copies", inner_state_copies), ("outer_state_copies", outer_state_copies)):
        _check_fraction(value, name, 0, math.inf, False, True, "give a count of fp32 copies of the parameters, e.g. 2")
    beat = parse_duration(heartbeat_timeout, "heartbeat_timeout")
    m = _check_fraction(margin, "margin", 1, math.inf, False, True, "give a safety factor >= 1, e.g. 2")
    h = int(h)
    slowest = (1.0 + sigma) * p.step_time_s
    period = parse_duration(sync_every_seconds, "sync_every_seconds") if sync_every_seconds is not None else None
    if period is None:
        interval = h * p.step_time_s
        spread = interval * sigma + pause_s
        join = max(DEFAULT_JOIN_TIMEOUT_S, float(math.ceil(m * spread)))
    else:  # each group enters the sync at its first step end after T: the others wait for it one step at most
        interval = period + slowest
        spread = slowest + pause_s
        join = math.ceil(10 * m * spread) / 10
    sync = p.rows[0].sync_seconds  # the same for every H
    heal_bytes = p.params * (p.bytes_per_value + 4.0 * (1.0 + inner_state_copies + outer_state_copies))
    heal = heal_bytes * 8 / (p.calibration.efficiency * p.bandwidth_bit_s) + p.latency_s
    return FederatedTimeouts(
        h=h, interval_s=interval, arrival_spread_s=spread, sync_s=sync, heal_bytes=heal_bytes, heal_s=heal,
        heartbeat_timeout_s=beat, sync_timeout_s=float(math.ceil(m * (interval + spread + beat + heal + sync))),
        join_timeout_s=join, stall_per_failure_s=beat + sync, margin=m, sync_every_seconds=period,
        slowest_step_s=slowest)


def print_federated_timeouts(t: FederatedTimeouts, file=None) -> None:
    """Print the federated timeouts and where each one goes."""
    out = file if file is not None else sys.stdout
    every = f"H={t.h}" if t.sync_every_seconds is None else f"sync_every_seconds={t.sync_every_seconds:g}"
    print(f"federated worker groups (lighthouse=), {every}: one interval {_fmt_seconds(t.interval_s)}, arrival spread "
          f"{_fmt_seconds(t.arrival_spread_s)}, sync {_fmt_seconds(t.sync_s)}, one healing {_fmt_bytes(t.heal_bytes)} "
          f"in {_fmt_seconds(t.heal_s)} (margin {t.margin:g}):", file=out)
    print(f"  strategy:   sync_timeout={t.sync_timeout_s:.0f}  (a joining group waits up to one interval for the "
          "others, then heals and syncs)", file=out)
    print(f"  lighthouse: lightning-localsgd lighthouse --join-timeout-ms {t.join_timeout_s * 1000:.0f} "
          f"--heartbeat-timeout-ms {t.heartbeat_timeout_s * 1000:.0f}", file=out)
    if t.sync_every_seconds is not None:
        print(f"  time-based: a group enters each sync at its first step end after {_fmt_seconds(t.sync_every_seconds)}"
              f", so a slow group is waited for at most one of its steps ({_fmt_seconds(t.slowest_step_s)}); the "
              f"join timeout {_fmt_seconds(t.join_timeout_s)} bounds the wait for a straggler", file=out)
    print(f"  a group's death stalls the survivors ~{_fmt_seconds(t.stall_per_failure_s)} (heartbeat timeout + one "
          "sync)", file=out)


# ----------------------------------------------------------------------------------------------------- output
def _fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g} B"


def _fmt_seconds(s: float) -> str:
    if s == 0:
        return "0 s"
    if s >= 3600:
        return f"{s / 3600:.3g} h"
    if s >= 60:
        return f"{s / 60:.3g} min"
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def _fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _fmt_rate(bits: float) -> str:
    for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.3g} {unit}"
    return f"{bits:.3g} bit/s"


def _fmt_fraction(x: float) -> str:
    return f"{x:.1%}" if x >= 0.001 else f"{x:.2g}"


def print_plan(p: Plan, file=None) -> None:
    """Print a plan as a rich table, the recommendation and the notes."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file if file is not None else sys.stdout)
    codec = "fp32" if p.compression is None and p.bytes_per_value == 4 else (p.compression or
                                                                             f"{p.bytes_per_value:g}-byte values")
    table = Table(title=f"Local SGD plan: {_fmt_count(p.params)} parameters, {_fmt_seconds(p.step_time_s)} compute per "
                        f"step, {p.groups} groups, {_fmt_rate(p.bandwidth_bit_s)} / {_fmt_seconds(p.latency_s)} "
                        f"link, {codec} sync",
                  caption=f"η = {p.calibration.efficiency:g}, c0 = {_fmt_seconds(p.calibration.fixed_s)}, "
                          f"DDP overlap φ = {p.calibration.overlap:.2g}. bytes/step: payload per group "
                          f"(as local_sgd/bytes_sent counts). * recommended")
    table.add_column("H", justify="right")
    table.add_column("bytes/step", justify="right")
    table.add_column("sync", justify="right")
    table.add_column("step", justify="right")
    table.add_column("comm fraction", justify="right")
    table.add_column("utilization", justify="right")

    def cells(r: PlanRow) -> list[str]:
        # "*" marks the recommended row where colours do not show (pipes, logs)
        label = f"{r.label} *" if r.h is not None and r.h == p.recommended_h else r.label
        return [label, _fmt_bytes(r.bytes_per_step), _fmt_seconds(r.sync_seconds), _fmt_seconds(r.seconds_per_step),
                _fmt_fraction(r.comm_fraction), _fmt_fraction(r.utilization)]

    table.add_row(*cells(p.ddp), style="dim", end_section=True)
    for r in p.rows:
        table.add_row(*cells(r), style="bold green" if r.h == p.recommended_h else None)
    console.print(table)
    if p.recommended_h is not None:
        console.print(f"recommended: H={p.recommended_h} ({p.reason})", highlight=False)
    else:
        console.print(f"recommended: none ({p.reason})", highlight=False)
    for note in p.notes:
        console.print(f"note: {note}", highlight=False)
    if p.codecs:
        console.print(_codec_table(p))
        console.print(f"recommended codec: {p.codec_reason}", highlight=False)


def _codec_table(p: Plan):
    """The compared ways to sync at :attr:`Plan.codec_h`, the recommended one marked."""
    from rich.table import Table

    table = Table(title=f"Codecs at H={p.codec_h}: one sync over {p.groups} groups, its link and coding time, and "
                        f"the quality cost ({p.outer})",
                  caption="coding: encode + decode on one CPU thread of the project's CI machine (CODEC_CPU_TABLE), "
                          "unless measured here (--calibrate-codecs). effective = utilization / step factor (steps "
                          "per fp32 step to the same loss, measured by benchmarks/compression; --step-factor). "
                          "* recommended")
    for header in ("codec", "exchange", "link bytes", "link", "coding", "sync", "utilization", "step factor",
                   "effective", "min H"):
        table.add_column(header, justify="left" if header in ("codec", "exchange") else "right")
    for c in p.codecs:
        mark = " *" if c.codec == p.recommended_codec else ""
        coding = _fmt_seconds(c.cpu_seconds) + (" (measured)" if c.cpu_source == "measured" else "")
        table.add_row(_codec_label(c.codec, p.bytes_per_value) + mark, c.exchange, _fmt_bytes(c.link_bytes),
                      _fmt_seconds(c.link_seconds), coding, _fmt_seconds(c.sync_seconds), _fmt_fraction(c.utilization),
                      "?" if c.step_factor is None else f"{c.step_factor:.3g}",
                      "—" if c.effective_utilization is None else _fmt_fraction(c.effective_utilization), str(c.min_h),
                      style="bold green" if mark else None)
    return table


# ----------------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-localsgd plan",
        description="Choose the sync interval H: for each candidate H, the bytes per step, the fraction of the wall "
                    "clock spent communicating and the utilization (compute / wall clock) of local SGD, next to DDP, "
                    "from the library's cost model; recommends the smallest H with utilization >= the target. "
                    "See docs/planner.md.",
        epilog="example: lightning-localsgd plan --params 1.3e9 --step-time 0.4 --bandwidth 1Gbit --latency 20ms "
               "--groups 8",
    )
    req = parser.add_argument_group("the setup (required)")
    req.add_argument("--params", required=True, help="number of model parameters: 1.3e9, 1.3B, 350M")
    req.add_argument("--step-time", required=True,
                     help="measured compute seconds of one optimizer step of one worker group, without cross-group "
                          "communication: 0.4, 400ms")
    req.add_argument("--bandwidth", required=True,
                     help="link rate per worker group: 1Gbit, 100Mbit, '10 Gbit/s', 400Gb, 1e9 (bit/s); b = bit, "
                          "B = byte (1GB/s = 8 Gbit/s)")
    req.add_argument("--latency", required=True, help="one-way latency between groups: 20ms, 0.02 (s), 50us, 1s")
    req.add_argument("--groups", required=True, type=int, help="number of worker groups G syncing over the link (>= 2)")
    opt = parser.add_argument_group("options of the plan")
    opt.add_argument("--candidates", default=None,
                     help="comma-separated H values to price (default: powers of two 1,2,4,...,4096)")
    opt.add_argument("--target", type=float, default=0.95,
                     help="utilization to reach, in (0, 1) (default: 0.95)")
    opt.add_argument("--bytes-per-value", type=float, default=4.0,
                     help="bytes per value of the uncompressed sync and of DDP's gradients (default: 4, fp32)")
    opt.add_argument("--compression", choices=codec_names(), default=None,
                     help="compressed sync (the strategies' compression=): a compressed all-reduce of the codec's "
                          "payload (all-to-all of encoded chunks, all-gather of the encoded means)")
    opt.add_argument("--sync-every", type=int, default=None,
                     help="the H you will run: the codecs are compared at it, and --federated derives its timeouts "
                          "for it (default: the recommended H, or the largest candidate when none reaches the target)")
    opt.add_argument("--codecs", default=None,
                     help=f"comma-separated ways to sync to compare (default: all: fp32,{','.join(codec_names())}; "
                          "fp32 = no compression)")
    opt.add_argument("--outer", choices=tuple(CODEC_STEP_FACTORS), default="average",
                     help="the outer optimizer whose measured step factors price each codec's quality (default: "
                          "average, the strategies' default)")
    opt.add_argument("--step-factor", action="append", default=[], metavar="CODEC=X",
                     help="steps CODEC needs per fp32 step to reach fp32's loss, measured on your model (repeatable; "
                          "default: benchmarks/compression's, e.g. topk=2.23 with average)")
    opt.add_argument("--calibrate-codecs", nargs="?", const="cpu", default=None, metavar="DEVICE",
                     help="measure each codec's encode / decode time on this machine (one CPU thread, a few seconds; "
                          "--calibrate-codecs cuda: on the GPU) instead of the table measured on the project's CI "
                          "machine's CPU")
    cal = Calibration()
    opt.add_argument("--efficiency", type=float, default=cal.efficiency,
                     help=f"η, achieved fraction of the link bandwidth in a collective (default: {cal.efficiency:g})")
    opt.add_argument("--fixed-cost", default=str(cal.fixed_s),
                     help=f"c0, fixed cost per collective: 0.2ms, 0.0002 (default: {cal.fixed_s:g} s)")
    opt.add_argument("--overlap", type=float, default=cal.overlap,
                     help=f"φ, part of DDP's compute its all-reduce hides behind (default: {cal.overlap:.3g})")
    opt.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    fed = parser.add_argument_group("federated worker groups (lighthouse=): timeouts from H x step time")
    fed.add_argument("--federated", action="store_true",
                     help="also print sync_timeout and the lighthouse's timeouts (docs/multi_cluster.md)")
    fed.add_argument("--step-time-spread", type=float, default=0.1,
                     help="how much slower the slowest group's step is, as a fraction (default: 0.1)")
    fed.add_argument("--pause", default="0",
                     help="pauses between two syncs besides the steps: checkpoint, validation (default: 0)")
    fed.add_argument("--inner-state", type=float, default=2.0,
                     help="fp32 copies of the parameters in the inner optimizer state: AdamW 2, SGD 0 (default: 2)")
    fed.add_argument("--outer-state", type=float, default=1.0,
                     help="fp32 copies in the outer optimizer state: DiLoCo 1, averaging 0 (default: 1)")
    fed.add_argument("--heartbeat-timeout", default=str(DEFAULT_HEARTBEAT_TIMEOUT_S),
                     help=f"the lighthouse's heartbeat timeout (default: {DEFAULT_HEARTBEAT_TIMEOUT_S:g} s)")
    fed.add_argument("--margin", type=float, default=2.0, help="safety factor on the derived bounds (default: 2)")
    fed.add_argument("--sync-every-seconds", default=None,
                     help="time-based syncs every T (the strategy's sync_every_seconds): 30, 30s; the join timeout "
                          "then follows from one step of the slowest group")
    return parser


# The flag of each parameter named by plan()'s error messages, so that CLI errors name what the user typed.
_FLAGS = {"params": "--params", "step_time": "--step-time", "bandwidth": "--bandwidth", "latency": "--latency",
          "groups": "--groups", "candidates": "--candidates", "target_utilization": "--target",
          "bytes_per_value": "--bytes-per-value", "compression": "--compression", "fixed_cost": "--fixed-cost",
          "calibration.efficiency": "--efficiency", "calibration.overlap": "--overlap",
          "sync_every": "--sync-every", "codecs": "--codecs", "device": "--calibrate-codecs", "outer": "--outer",
          "step_factors": "--step-factor",
          "step_time_spread": "--step-time-spread", "pause": "--pause",
          "inner_state_copies": "--inner-state", "outer_state_copies": "--outer-state",
          "heartbeat_timeout": "--heartbeat-timeout", "margin": "--margin",
          "sync_every_seconds": "--sync-every-seconds"}


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``lightning-localsgd plan``: parse ``argv`` (default ``sys.argv[1:]``), print the plan.

    Bad input exits with status 2 and an ``error:`` line naming the flag, like argparse's own errors. A negative
    value must be attached with ``=`` (``--latency=-1ms``): argparse reads ``-1ms`` as an option.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        candidates = None
        if args.candidates is not None:
            try:
                candidates = [int(c) for c in args.candidates.split(",") if c.strip()]
            except ValueError:
                raise ValueError(f"candidates: cannot read {args.candidates!r}; give comma-separated integers, "
                                 f"e.g. 16,64,256.") from None
        calibration = Calibration(efficiency=args.efficiency,
                                  fixed_s=parse_duration(args.fixed_cost, "fixed_cost", allow_zero=True),
                                  overlap=args.overlap)
        step_factors = {}
        for item in args.step_factor:
            codec, _, value = item.partition("=")
            try:
                step_factors[codec.strip()] = float(value)
            except ValueError:
                raise ValueError(f"step_factors: cannot read {item!r}; give CODEC=X, e.g. topk=1.5.") from None
        codecs = None if args.codecs is None else [c.strip() for c in args.codecs.split(",") if c.strip()]
        result = plan(args.params, args.step_time, args.bandwidth, args.latency, args.groups, candidates=candidates,
                      target_utilization=args.target, bytes_per_value=args.bytes_per_value,
                      compression=args.compression, calibration=calibration, codecs=codecs,
                      sync_every=args.sync_every, outer=args.outer, step_factors=step_factors,
                      codec_cpu=None if args.calibrate_codecs is None
                      else calibrate_codec_cpu(codecs, device=args.calibrate_codecs))
        timeouts = federated_timeouts(result, args.sync_every, args.step_time_spread, args.pause, args.inner_state,
                                      args.outer_state, args.heartbeat_timeout, args.margin,
                                      args.sync_every_seconds) \
            if args.federated else None
    except ValueError as err:
        message = str(err)
        name = re.split(r"[ :]", message, maxsplit=1)[0]
        if name in _FLAGS:
            message = _FLAGS[name] + message[len(name):]
        parser.error(message)
    if args.json:
        out = result.to_dict()
        if timeouts is not None:
            out["federated"] = timeouts.to_dict()
        print(json.dumps(out, indent=2))
    else:
        print_plan(result)
        if timeouts is not None:
            print_federated_timeouts(timeouts)


if __name__ == "__main__":
    main()
