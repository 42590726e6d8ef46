"""A small analytic cost model of DDP vs local SGD across clusters joined by a slow link.

One *cluster* is one worker group (the GPUs of a data centre, or here one CPU process). Per optimizer step:

    compute   t_c  = 6 · N · tokens_per_step_per_cluster / (peak FLOP/s · MFU)
    all-reduce t_ar(M) = 2(G−1)/G · M · 8 / (η · B) + 2·⌈log2 G⌉ · λ + c0
                (Rabenseifner: reduce-scatter + all-gather, bandwidth-optimal and latency-logarithmic; M bytes per
                cluster, B bit/s link per cluster, λ one-way latency, η achieved fraction of B, c0 fixed cost)
    DDP        t    = t_c + max(0, t_ar(M) − φ · t_c)      (φ: part of the compute the all-reduce can hide behind,
                                                            ≈ 2/3 = the backward pass, with bucketed overlap)
    local SGD  t    = t_c + (t_ar(M) + t_outer) / H         (the sync blocks; nothing is overlapped)
    utilization     = t_c / t

Inside a cluster the gradient reduction is assumed free (fast links, overlapped); only the cross-cluster all-reduce of
one copy of the model (M = bytes_per_value · N; fp32 = 4 bytes, as this library's snapshot and DDP's fp32 gradients
under bf16-mixed) is charged. The model ignores stragglers, failures, pipeline/tensor parallelism and the extra
steps local SGD may need to reach the same loss (take that from equal_compute / multi_cluster).

A compressed sync (``compression="bf16"/"int8"/"int4"`` in :class:`~lightning_localsgd.outer.OuterSync`) is a
compressed all-reduce in two collectives: an all-to-all of encoded chunks (each cluster sends chunk j of its
pseudo-gradient to cluster j, which averages it) and an all-gather of the re-encoded mean chunks. With P the bytes of
one compressed copy (G chunks of the codec's payload), each cluster sends and receives ``2(G−1)/G · P`` bytes, like a
bandwidth-optimal all-reduce of P bytes. Assumed: the latency terms are those of the all-reduce (``2⌈log2 G⌉ · λ``,
as if the all-to-all were a latency-logarithmic reduce-scatter; one done as G−1 pairwise exchanges pays up to
(G−1)·λ for it, which matters only for many groups on a high-latency link), and each of the two collectives pays its
own fixed cost: ``t_car(P) = 2(G−1)/G · P · 8 / (η · B) + 2⌈log2 G⌉ · λ + 2·c0``
(:func:`compressed_allreduce_seconds`). Fewer bytes than the fp32 all-reduce at every G (P < M against fp32); only
the extra c0 can make it slower, for a model so small that the bytes saved take less than c0 to send.

Codecs exchanged otherwise, and the codec's CPU time. A codec says how its payloads are exchanged with its
``exchange`` attribute (read with :func:`codec_exchange`; ``"two_phase"``, the above, when it does not say);
``"all_gather"`` (the sparse codecs: a top-k payload is not closed under averaging) is one all-gather of every group's
payload, each group summing the G decoded copies: ``(G−1) · P`` bytes sent and received per group, G × the
payload held (:func:`exchange_wire_bytes`, :func:`exchange_seconds`). Encoding and decoding take CPU time that the
link's bytes do not show: :class:`CodecCPU` holds a codec's seconds per value encoded and decoded,
:data:`CODEC_CPU_TABLE` the built-in codecs' (measured by ``benchmarks/codec_cost/codec_cost.py``), and
:func:`codec_cpu_seconds` charges one sync with it (the values each exchange encodes and decodes,
:func:`codec_coded_values`): ``sync = exchange_seconds + codec_cpu_seconds``, added (the pipelined reducer overlaps
part of the coding with the transfer, so this is an upper bound).

Pure Python and numpy. Used by :mod:`lightning_localsgd.planner` (``lightning-localsgd plan``) and by
``benchmarks/projection/projection.py`` (through the re-export ``benchmarks/projection/costmodel.py``), so both use
the same formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

__all__ = [
    "CODEC_CPU_TABLE",
    "EXCHANGES",
    "Calibration",
    "Cluster",
    "CodecCPU",
    "Link",
    "StepCost",
    "allgather_seconds",
    "allreduce_seconds",
    "calibrate",
    "codec_coded_values",
    "codec_cpu_seconds",
    "codec_exchange",
    "collective_hops",
    "compressed_allreduce_seconds",
    "compute_seconds",
    "cpu_cluster_from",
    "ddp_cost",
    "ddp_step",
    "exchange_seconds",
    "exchange_wire_bytes",
    "hops",
    "local_sgd_cost",
    "local_sgd_step",
    "training_seconds",
    "wire_bytes",
]


@dataclass(frozen=True)
class Cluster:
    """One worker group: its sustained compute."""

    name: str
    peak_flops: float
    """Peak FLOP/s of the whole cluster."""
    mfu: float = 0.4
    """Achieved fraction of the peak (model FLOPs utilization)."""

    @property
    def flops(self) -> float:
        return self.peak_flops * self.mfu


@dataclass(frozen=True)
class Link:
    """The link each cluster has to the others (full duplex)."""

    name: str
    bandwidth_bit_s: float
    latency_s: float
    """One-way latency."""


@dataclass(frozen=True)
class Calibration:
    """Implementation constants, fitted on measured points (see :func:`calibrate`)."""

    efficiency: float = 0.9
    """η: achieved fraction of the nominal link bandwidth in a collective."""
    fixed_s: float = 0.0
    """c0: fixed cost per collective (software, framing)."""
    overlap: float = 2 / 3
    """φ: fraction of the compute DDP's all-reduce can hide behind."""
    outer_s_per_byte: float = 0.0
    """Local work of a sync per byte of model (pseudo-gradient, outer step, write-back)."""


def collective_hops(op: str, G: int, algorithm: str = "log") -> int:
    """Message latencies λ one collective over G ranks waits for, one after the other: the one latency model.

    ``algorithm="log"`` (the planner's, :func:`hops`): the latency-logarithmic schedules a tuned library picks for
    small and latency-bound messages (recursive halving/doubling, Rabenseifner; trees): an all-reduce is a
    reduce-scatter plus an all-gather of ``⌈log2 G⌉`` rounds each, ``2⌈log2 G⌉``. This is the right count for the
    projection: it prices what a well-tuned cross-cluster all-reduce can reach, and NCCL's tree / MPI's
    Rabenseifner come close to it.

    ``algorithm="ring"``: what gloo actually runs on CPU (``ProcessGroupGloo``'s all-reduce is gloo's ring, all-gather
    a ring, all-to-all G − 1 pairwise exchanges): ``2(G−1)`` for an all-reduce (G − 1 reduce-scatter + G − 1
    all-gather steps), ``G − 1`` for an all-gather, reduce-scatter or all-to-all. The benchmarks' network emulation
    (``benchmarks/harness``) must use this one: it adds latency to collectives gloo runs for real, so it has to
    charge the round trips that gloo's schedule makes, not an ideal one.

    The two agree at G ≤ 2 (2 latencies per all-reduce, 1 per all-gather), where every emulated benchmark runs;
    from G = 3 on the ring pays more (G = 8: 14 vs 6). Broadcast, reduce, barrier and gather are trees in both:
    ``⌈log2 G⌉``.
    """
    if algorithm not in ("log", "ring"):
        raise ValueError(f"unknown algorithm {algorithm!r}: 'log' or 'ring'")
    if G <= 1:
        return 0
    rounds = math.ceil(math.log2(G)) if algorithm == "log" else G - 1
    if op == "all_reduce":
        return 2 * rounds
    if op in ("all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_object",
              "all_to_all_single"):
        return rounds
    return math.ceil(math.log2(G))  # broadcast, reduce, barrier, gather: a tree


def hops(G: int) -> int:
    """Latency terms of a latency-logarithmic all-reduce over G clusters (2 for G = 2); see :func:`collective_hops`."""
    return collective_hops("all_reduce", G, "log")


def wire_bytes(op: str, nbytes: float, G: int) -> float:
    """Bytes one rank sends in a bandwidth-optimal (ring) collective over ``G`` ranks.

    ``nbytes``: the tensor of an all-reduce / broadcast, the *input* of an all-gather (one rank's part), of a
    reduce-scatter or of an all-to-all (the whole tensor: one chunk per rank). The same for both algorithms of
    :func:`collective_hops` (both are bandwidth-optimal); used by :func:`allreduce_seconds` and by the benchmarks'
    network emulation.
    """
    if G <= 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (G - 1) / G * nbytes
    if op in ("all_gather", "all_gather_into_tensor"):
        return (G - 1) * nbytes
    if op in ("reduce_scatter_tensor", "all_to_all_single"):
        return (G - 1) / G * nbytes
    return float(nbytes)


def allreduce_seconds(nbytes: float, G: int, link: Link, cal: Calibration = Calibration()) -> float:
    """One all-reduce of ``nbytes`` per cluster over G clusters: ``2(G−1)/G · 8·nbytes/(η·B) + hops(G)·λ + c0``."""
    if G <= 1:
        return 0.0
    return (wire_bytes("all_reduce", nbytes, G) * 8 / (cal.efficiency * link.bandwidth_bit_s)
            + hops(G) * link.latency_s + cal.fixed_s)


def allgather_seconds(nbytes: float, G: int, link: Link, cal: Calibration = Calibration()) -> float:
    """One all-gather of ``nbytes`` per cluster over G clusters: ``(G−1) · 8·nbytes/(η·B) + ⌈log2 G⌉·λ + c0``.

    Bandwidth-optimal (ring or recursive doubling): each cluster receives the G − 1 other payloads; half the latency
    terms of :func:`allreduce_seconds` (an all-reduce is a reduce-scatter plus an all-gather). Not what a compressed
    sync costs any more (see :func:`compressed_allreduce_seconds`); kept for the benchmarks' re-export.
    """
    if G <= 1:
        return 0.0
    return (wire_bytes("all_gather", nbytes, G) * 8 / (cal.efficiency * link.bandwidth_bit_s)
            + collective_hops("all_gather", G, "log") * link.latency_s + cal.fixed_s)


def compressed_allreduce_seconds(nbytes: float, G: int, link: Link, cal: Calibration = Calibration()) -> float:
    """One compressed sync over G clusters, ``nbytes`` = P, the bytes of one compressed copy per cluster:
    ``2(G−1)/G · 8·P/(η·B) + 2⌈log2 G⌉·λ + 2·c0``.

    The two-phase compressed all-reduce of :class:`~lightning_localsgd.outer.OuterSync`: an all-to-all of encoded
    chunks (reduce-scatter-like: each cluster sends (G−1)/G of P) and an all-gather of the encoded mean chunks
    ((G−1)/G of P again). Assumed: the latency of the pair is the all-reduce's (:func:`hops`), and each of the two
    collectives pays the fixed cost c0. Equals :func:`allreduce_seconds` of P plus one c0.
    """
    if G <= 1:
        return 0.0
    return allreduce_seconds(nbytes, G, link, cal) + cal.fixed_s


#: How a compressed sync exchanges the codec's payloads (a codec's ``exchange`` attribute, :func:`codec_exchange`).
EXCHANGES = ("two_phase", "all_gather")


def codec_exchange(codec: object) -> str:
    """The exchange a codec's payloads go through: its ``exchange`` attribute, ``"two_phase"`` when it has none.

    ``"two_phase"``: the compressed all-reduce (all-to-all of encoded chunks, all-gather of the re-encoded means),
    for codecs whose decoded mean can be re-encoded (bf16, int8, int4). ``"all_gather"``: one all-gather of every
    group's payload and a local sum of the G decoded copies, for sparse codecs (a mean of top-k payloads is not
    top-k).
    """
    exchange = getattr(codec, "exchange", "two_phase")
    if exchange not in EXCHANGES:
        raise ValueError(f"{type(codec).__name__}.exchange must be one of {EXCHANGES}, got {exchange!r}.")
    return exchange


def exchange_wire_bytes(exchange: str, payload_bytes: float, G: int) -> float:
    """Bytes one group sends (and as many it receives) per sync, ``payload_bytes`` = P, one compressed copy.

    ``"two_phase"``: ``2(G−1)/G · P``, like a bandwidth-optimal all-reduce of P (whatever G, under 2P).
    ``"all_gather"``: ``(G−1) · P``: every group receives every other group's payload (it then holds G · P), so the
    bytes grow with the number of groups; under the two-phase exchange's at G = 2 (equal), above it from G = 3.
    """
    if exchange == "two_phase":
        return wire_bytes("all_reduce", payload_bytes, G)
    if exchange == "all_gather":
        return wire_bytes("all_gather", payload_bytes, G)
    raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}.")


def exchange_seconds(exchange: str, payload_bytes: float, G: int, link: Link,
                     cal: Calibration = Calibration()) -> float:
    """Link time of one compressed sync over G groups (no codec CPU time, see :func:`codec_cpu_seconds`).

    ``"two_phase"``: :func:`compressed_allreduce_seconds`, ``2(G−1)/G · 8P/(η·B) + 2⌈log2 G⌉·λ + 2·c0``.
    ``"all_gather"``: :func:`allgather_seconds`, ``(G−1) · 8P/(η·B) + ⌈log2 G⌉·λ + c0`` (one collective).
    """
    if exchange == "two_phase":
        return compressed_allreduce_seconds(payload_bytes, G, link, cal)
    if exchange == "all_gather":
        return allgather_seconds(payload_bytes, G, link, cal)
    raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}.")


@dataclass(frozen=True)
class CodecCPU:
    """A codec's coding cost: seconds per value encoded and per value decoded (on one CPU thread for the table; on a
    GPU when measured there, ``calibrate_codec_cpu(device="cuda")``)."""

    encode_s_per_value: float
    decode_s_per_value: float
    source: str = "table"
    """Where the numbers come from: ``"table"`` (:data:`CODEC_CPU_TABLE`) or ``"measured"`` (on this machine)."""


#: The built-in codecs' CPU cost, seconds per value, one thread, measured by
#: ``python benchmarks/codec_cost/codec_cost.py`` (``benchmarks/codec_cost/results/codec_cost.csv``) on the project's
#: CI machine: 2 Intel Xeon cores (2026-12-07; an earlier run on 2 AMD EPYC cores coded bf16 2× and topk's decode
#: 1.7× faster), torch 2.13 (CPU), 4M fp32 values, best of 5. A GPU codes a pseudo-gradient one or
#: two orders of magnitude faster: there the table overstates the codec's time. Recalibrate on your machine with
#: ``lightning-localsgd plan ... --calibrate-codecs`` (or :func:`lightning_localsgd.planner.calibrate_codec_cpu`, whose
#: result ``plan(codec_cpu=...)`` takes), or rerun the script and copy its CSV here. ``fp32`` (no codec) costs 0.
CODEC_CPU_TABLE: dict[str, CodecCPU] = {
    "fp32": CodecCPU(0.0, 0.0),
    "bf16": CodecCPU(5.31595e-10, 5.43622e-10),
    "int8": CodecCPU(1.58262e-09, 7.13058e-10),
    "int4": CodecCPU(2.16127e-09, 8.63202e-10),
    "topk": CodecCPU(1.26463e-08, 1.68898e-09),
    "topk_ef": CodecCPU(1.21675e-08, 1.55207e-09),
    "topk_recipe": CodecCPU(1.58088e-08, 2.35151e-09),
}


def codec_coded_values(exchange: str, numel: float, G: int) -> tuple[float, float]:
    """Values one group encodes and decodes in one sync of ``numel`` values over G groups (one rank per group).

    ``"two_phase"`` (:class:`~lightning_localsgd.engine.reducers.CompressedReducer`): encodes its N values (G chunks)
    and decodes them (its error feedback), decodes the G received pieces of its chunk (N values), encodes their mean
    (N/G) and decodes it (error feedback), then decodes the G gathered means (N): encode ``N·(1 + 1/G)``, decode
    ``N·(3 + 1/G)``. ``"all_gather"``: encodes its N values once and decodes them (error feedback), then decodes the
    G gathered payloads: encode ``N``, decode ``N·(G + 1)``. With R ranks per group each rank codes 1/R of it.
    """
    if G <= 1:
        return 0.0, 0.0
    if exchange == "two_phase":
        return numel * (1 + 1 / G), numel * (3 + 1 / G)
    if exchange == "all_gather":
        return float(numel), numel * (G + 1)
    raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}.")


def codec_cpu_seconds(cost: CodecCPU, exchange: str, numel: float, G: int) -> float:
    """CPU seconds of one sync's encoding and decoding: :func:`codec_coded_values` times the codec's per-value cost."""
    encoded, decoded = codec_coded_values(exchange, numel, G)
    return encoded * cost.encode_s_per_value + decoded * cost.decode_s_per_value


def compute_seconds(params: float, tokens_per_step: float, cluster: Cluster) -> float:
    """Forward + backward of one step on one cluster: 6 · N · tokens FLOPs."""
    return 6.0 * params * tokens_per_step / cluster.flops


@dataclass
class StepCost:
    """Seconds of one optimizer step on one cluster."""

    compute_s: float
    comm_s: float
    """Communication charged to the step: DDP's whole all-reduce (partly hidden), or local SGD's sync / H."""
    step_s: float

    @property
    def utilization(self) -> float:
        return self.compute_s / self.step_s


def ddp_cost(compute_s: float, nbytes: float, G: int, link: Link, cal: Calibration = Calibration()) -> StepCost:
    """DDP step given its compute seconds: one all-reduce of ``nbytes`` per step, hidden behind φ of the compute."""
    comm = allreduce_seconds(nbytes, G, link, cal)
    return StepCost(compute_s, comm, compute_s + max(0.0, comm - cal.overlap * compute_s))


def local_sgd_cost(compute_s: float, nbytes: float, G: int, H: int, link: Link, cal: Calibration = Calibration(),
                   payload_bytes: Optional[float] = None) -> StepCost:
    """Local-SGD step given its compute seconds: a blocking sync of the model (``nbytes``) every H steps.

    ``payload_bytes``: ``None`` for the fp32 all-reduce of ``nbytes``; for a compressed sync, P, the bytes of one
    compressed copy of the model (a two-phase compressed all-reduce, :func:`compressed_allreduce_seconds`). The
    local work of a sync is charged per model byte.
    """
    comm = (allreduce_seconds(nbytes, G, link, cal) if payload_bytes is None
            else compressed_allreduce_seconds(payload_bytes, G, link, cal))
    sync = comm + cal.outer_s_per_byte * nbytes
    return StepCost(compute_s, sync / H, compute_s + sync / H)


def ddp_step(params: float, tokens_per_step: float, G: int, cluster: Cluster, link: Link,
             cal: Calibration = Calibration(), bytes_per_value: float = 4.0) -> StepCost:
    """DDP step with the compute derived from FLOPs (:func:`compute_seconds`)."""
    return ddp_cost(compute_seconds(params, tokens_per_step, cluster), bytes_per_value * params, G, link, cal)


def local_sgd_step(params: float, tokens_per_step: float, G: int, H: int, cluster: Cluster, link: Link,
                   cal: Calibration = Calibration(), bytes_per_value: float = 4.0) -> StepCost:
    """Local-SGD step (fp32 all-reduce sync every H steps) with the compute derived from FLOPs."""
    return local_sgd_cost(compute_seconds(params, tokens_per_step, cluster), bytes_per_value * params, G, H, link, cal)


def training_seconds(step: StepCost, total_tokens: float, tokens_per_step: float, G: int) -> float:
    """Wall clock to train on ``total_tokens`` when each of G clusters takes ``tokens_per_step`` per step."""
    return total_tokens / (tokens_per_step * G) * step.step_s


# ------------------------------------------------------------------------------------------------ calibration
def calibrate(points: list[dict], base: Calibration = Calibration(), G: int = 2) -> tuple[Calibration, dict]:
    """Fit η and c0 on measured all-reduces, and the per-byte outer cost on measured syncs.

    ``points``: dicts with ``kind`` ("allreduce" for one DDP gradient all-reduce, "sync" for one local-SGD sync),
    ``seconds`` (measured, per collective), ``bytes`` (model bytes M), ``bandwidth_bit_s`` and ``latency_s``.
    Model: seconds − hops·λ = (2(G−1)/G · 8M/B) · (1/η) + c0 — a straight line, fitted by least squares.
    Returns the calibration and a dict of fit diagnostics.
    """
    ar = [p for p in points if p["kind"] == "allreduce"]
    if len(ar) < 2:
        return base, {"note": "fewer than 2 measured all-reduces: default calibration"}
    x = np.array([2 * (G - 1) / G * p["bytes"] * 8 / p["bandwidth_bit_s"] for p in ar])
    y = np.array([p["seconds"] - hops(G) * p["latency_s"] for p in ar])
    slope, intercept = np.polyfit(x, y, 1)
    eff = float(1 / slope) if slope > 0 else base.efficiency
    fixed = float(max(0.0, intercept))
    cal = replace(base, efficiency=min(eff, 1.0), fixed_s=fixed)
    sy = [p for p in points if p["kind"] == "sync"]
    if sy:
        extra = [(p["seconds"] - allreduce_seconds(p["bytes"], G, Link("", p["bandwidth_bit_s"], p["latency_s"]), cal))
                 / p["bytes"] for p in sy]
        cal = replace(cal, outer_s_per_byte=float(max(0.0, np.median(extra))))
    pred = [allreduce_seconds(p["bytes"], G, Link("", p["bandwidth_bit_s"], p["latency_s"]), cal) for p in ar]
    diag = {"efficiency_raw": eff, "fixed_s": fixed,
            "max_rel_error_allreduce": float(max(abs(a - p["seconds"]) / p["seconds"] for a, p in zip(pred, ar)))}
    return cal, diag


def cpu_cluster_from(points: list[dict]) -> Optional[Cluster]:
    """The measured CPU "cluster": FLOP/s = 6·N·tokens / measured compute seconds per step (median)."""
    rates = [6 * p["params"] * p["tokens_per_step"] / p["compute_s"] for p in points if p.get("compute_s")]
    if not rates:
        return None
    return Cluster("this CPU process (measured)", float(np.median(rates)), 1.0)
