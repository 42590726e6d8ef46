"""Compressed pseudo-gradients: codec bounds, error feedback, and a compressed sync against a hand reference."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from lightning_localsgd.engine.codecs import (CODECS, TopKCodec, codec_names, decode, encode, get_codec,
                                              payload_bytes, register_codec)
from lightning_localsgd.engine import OuterSync
from test_outer import initial, local_tensors, spawn
from reference import gathered_compressed_sync
from workers.tiny import TOPK_TEST, TOPK_TWO_PHASE


def quantization_step(x, codec):
    """Per element, one quantization step of int8 / int4: the block's largest magnitude over the levels."""
    levels = 127 if codec == "int8" else 7
    blocks = torch.nn.functional.pad(x, (0, (-x.numel()) % 256)).view(-1, 256)
    return (blocks.abs().amax(1) / levels).repeat_interleave(256)[: x.numel()]


def assert_round_trip_bounds(x, y, codec):
    """bf16: relative error <= 2^-8; int8 / int4: at most half a step of the element's block of 256; topk: a sent
    value off by at most s/2^value_bits (s: its chunk's largest magnitude), an unsent one (0) at most the chunk's
    k-th largest magnitude."""
    if codec == "bf16":
        assert torch.all((x - y).abs() <= x.abs() * 2.0**-8)
    elif codec.startswith("topk"):
        c = get_codec(codec)
        for lo in range(0, x.numel(), c.chunk):
            a, b = x[lo : lo + c.chunk], y[lo : lo + c.chunk]
            k = min(c.k, a.numel())
            s, kth = float(a.abs().max()), float(a.abs().topk(k).values[-1])
            sent = b != 0
            assert int(sent.sum()) <= k
            assert torch.all((a - b)[sent].abs() <= s / 2**c.value_bits)
            assert torch.all(a[~sent].abs() <= kth)
    else:
        assert torch.all((x - y).abs() <= quantization_step(x, codec) / 2 + 1e-7 * x.abs().max())


@pytest.mark.parametrize("n", [1, 255, 256, 1000])
def test_codec_round_trip_bounds(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 1, n)
    for codec in CODECS:
        payload = encode(x, codec)
        assert payload.dtype == torch.uint8 and payload.numel() == payload_bytes(codec, n)
        assert_round_trip_bounds(x, decode(payload, codec, n), codec)
    assert payload_bytes("int8", 1024) == 1024 + 4 * 4 and payload_bytes("int4", 1024) == 512 + 4 * 4
    # topk: per chunk of 4096, 64 2-bit values + 64 12-bit indices + one fp32 scale; a shorter last chunk alike
    assert payload_bytes("topk", 4096) == 16 + 96 + 4 and payload_bytes("topk", 3 * 4096 + 1) == 3 * 116 + 1 + 2 + 4
    assert 4 * 4096 / payload_bytes("topk", 4096) > 141
    # topk_ef: the same 64 indices in 6 low bits each + 128 bits of unary high parts
    assert payload_bytes("topk_ef", 4096) == 16 + 48 + 16 + 4 and 4 * 4096 / payload_bytes("topk_ef", 4096) > 195


def topk_reference(x, chunk, k, value_bits):
    """Top-k + sign/magnitude quantization, written out with Python numbers: per chunk, the k entries of largest
    magnitude (ties: the lower index), none that is 0; each decoded to ±s·(2j+1)/2^value_bits, s the chunk's largest
    magnitude and j the largest integer below L = 2^(value_bits−1) with fl32(s·j)/L <= |v|."""
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731 (round to fp32)
    values = [float(v) for v in x]
    out = [0.0] * len(values)
    levels = 2 ** (value_bits - 1)
    for lo in range(0, len(values), chunk):
        block = values[lo : lo + chunk]
        chosen = sorted(range(len(block)), key=lambda i: (-abs(block[i]), i))[:k]
        s = max(abs(v) for v in block)
        for i in chosen:
            v = block[i]
            if v == 0:
                continue
            j = max(j for j in range(levels) if f32(s * j) / levels <= abs(v))
            out[lo + i] = math.copysign(f32(s * (2 * j + 1)) / 2**value_bits, v)
    return torch.tensor(out, dtype=torch.float32)


def topk_inputs(n, seed):
    """Smooth values, values with many ties (multiples of 1/4, some of them 0) and a chunk of zeros."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.randn(n, generator=g) * torch.logspace(-3, 1, n)
    ties = torch.randint(-3, 4, (n,), generator=g).float() / 4
    zeros = ties.clone()
    zeros[: min(n, 200)] = 0
    return [smooth, ties, zeros]


@pytest.mark.parametrize("codec,n", [(TopKCodec(), 1), (TopKCodec(), 9000),
                                     (TopKCodec(chunk=64, k=4), 150), (TopKCodec(chunk=64, k=4, value_bits=1), 130),
                                     (TopKCodec(chunk=50, k=7, value_bits=4), 149),
                                     (TopKCodec(chunk=64, k=64, value_bits=8), 100),
                                     (TopKCodec(indices="elias-fano"), 9000),
                                     (TopKCodec(chunk=64, k=4, indices="elias-fano"), 150),
                                     (TopKCodec(chunk=8, k=5, value_bits=4, indices="elias-fano"), 21)])
def test_topk_decodes_as_the_hand_reference_bit_for_bit(codec, n):
    for x in topk_inputs(n, n):
        payload = codec.encode(x)
        assert payload.dtype == torch.uint8 and payload.numel() == codec.payload_bytes(n)
        y = codec.decode(payload, n)
        assert torch.equal(y, topk_reference(x, codec.chunk, codec.k, codec.value_bits))


def test_topk_round_trip_bounds_and_zeros():
    x = topk_inputs(9000, 1)[0]
    assert_round_trip_bounds(x, decode(encode(x, "topk"), "topk", 9000), "topk")
    # 2 bits: a sent value is ±s/4 or ±3s/4, the sign exact; zeros are never sent, not even to fill k slots
    x = torch.zeros(5000)
    x[[3, 10, 4100]] = torch.tensor([0.2, -1.0, 0.5])
    y = decode(encode(x, "topk"), "topk", 5000)
    assert y.nonzero().flatten().tolist() == [3, 10, 4100]
    assert y[[3, 10, 4100]].tolist() == [0.25, -0.75, 0.375]
    assert torch.equal(decode(encode(torch.zeros(4096), "topk"), "topk", 4096), torch.zeros(4096))


@pytest.mark.parametrize("name", ["topk", "topk_ef"])
def test_topk_chunks_are_independent(name):
    """Cut anywhere at a multiple of the chunk: the pieces' payloads decode to the values of the whole payload and
    their sizes add up (what lets the compressed reduce send it in buckets). topk_ef decodes as topk."""
    codec = get_codec(name)
    assert codec.block_numel == 4096
    for x in topk_inputs(3 * 4096 + 999, 2):
        whole = codec.decode(codec.encode(x), x.numel())
        assert torch.equal(whole, decode(encode(x, "topk"), "topk", x.numel()))
        cuts = [0, 4096, 2 * 4096, x.numel()]
        pieces = [codec.encode(x[a:b]) for a, b in zip(cuts, cuts[1:])]
        assert sum(p.numel() for p in pieces) == codec.payload_bytes(x.numel())
        assert torch.equal(torch.cat([codec.decode(p, b - a) for p, a, b in zip(pieces, cuts, cuts[1:])]), whole)


@pytest.mark.parametrize("options", [dict(chunk=0), dict(k=0), dict(chunk=8, k=9), dict(value_bits=3),
                                     dict(feedback_decay=0.0), dict(feedback_decay=1.5), dict(indices="zip"),
                                     dict(exchange="ring"), dict(aggregate="sum"),
                                     dict(exchange="two_phase", aggregate="senders")])
def test_topk_options_are_checked(options):
    with pytest.raises(ValueError, match="TopKCodec: " + list(options)[-1]):
        TopKCodec(**options)


def test_register_codec_checks_the_exchange():
    """A codec asking for an exchange the engine does not have is refused at registration, naming the choices."""
    codec = TopKCodec()
    codec.exchange = "ring"
    with pytest.raises(ValueError, match=r"exchange must be one of \('two_phase', 'all_gather'\), got 'ring'"):
        register_codec("topk_ring", codec)
    assert "topk_ring" not in codec_names()
    assert get_codec("topk").exchange == get_codec("topk_ef").exchange == "all_gather"
    assert {get_codec(c).exchange for c in ("bf16", "int8", "int4")} == {"two_phase"}


def test_register_codec_checks_the_aggregate():
    """Only the all-gather exchange combines payloads per sender: another aggregate, or "senders" on a two-phase
    codec, is refused at registration."""
    for exchange, aggregate in [("all_gather", "sum"), ("two_phase", "senders")]:
        codec = TopKCodec(exchange=exchange)
        codec.aggregate = aggregate
        with pytest.raises(ValueError, match=rf"aggregate must be one of \('mean', 'senders'\).*got '{aggregate}'"):
            register_codec("topk_bad_aggregate", codec)
    assert "topk_bad_aggregate" not in codec_names()
    assert get_codec("topk").aggregate == get_codec("topk_ef").aggregate == get_codec("int8").aggregate == "mean"


def test_int4_packing_keeps_signs_and_odd_lengths():
    x = torch.tensor([-7.0, 7.0, -3.0, 0.0, 5.0])
    assert torch.equal(decode(encode(x, "int4"), "int4", 5), x)


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_error_feedback_keeps_the_accumulated_error_bounded(codec):
    """Sum over T syncs of what was sent equals the sum of the true values up to the last residual."""
    g = torch.Generator().manual_seed(0)
    error = torch.zeros(512)
    sent, true = torch.zeros(512), torch.zeros(512)
    worst = 0.0
    for _ in range(200):
        d = torch.randn(512, generator=g) * 1e-3 + 1e-4  # small biased signal: plain rounding would drift
        q = decode(encode(d + error, codec), codec, 512)
        error = d + error - q
        sent += q
        true += d
        worst = max(worst, float((true - sent).abs().max()))
    levels = 127 if codec == "int8" else 7
    assert torch.allclose(true - sent, error, atol=1e-6)
    # bounded by about one quantization step of a single sync, not growing with the number of syncs
    assert worst <= 2 * (5e-3 / levels)


def scenario_compressed(rank, world, codec):
    params = [t.clone() for t in initial()]
    engine = OuterSync(params, compression=codec)
    out = []
    for sync in range(2):
        for p, t in zip(params, local_tensors(rank, sync)):
            p.copy_(t)
        res = engine.sync()
        out.append(([p.clone() for p in params], res.bytes_sent))
    return {"after": out, "state": engine.state_dict()}


def compressed_reference(codec, world, syncs=2):
    """The two-phase compressed all-reduce, written out: chunk j of every rank's encoded pseudo-gradient is averaged
    by rank j, which encodes the mean (with its own error feedback); every rank decodes all the mean chunks.
    The residuals kept are the codec's ``feedback_decay`` β times what it lost (topk: e ← β·e + Δ).
    Returns θ after each sync, the ranks' error feedback and the mean-chunk error feedback."""
    decay = get_codec(codec).feedback_decay
    theta = torch.cat([t.reshape(-1) for t in initial()])
    n = theta.numel()
    chunk = math.ceil(n / world)
    errors = [torch.zeros_like(theta) for _ in range(world)]
    mean_errors = [torch.zeros(chunk) for _ in range(world)]
    thetas = []
    for sync in range(syncs):
        decoded = []  # decoded[r][j]: rank r's chunk j as rank j decodes it
        for r in range(world):
            local = torch.cat([t.reshape(-1) for t in local_tensors(r, sync)])
            d = torch.nn.functional.pad(theta - local + errors[r], (0, chunk * world - n))
            q = [decode(encode(d[j * chunk : (j + 1) * chunk], codec), codec, chunk) for j in range(world)]
            errors[r] = decay * (d - torch.cat(q))[:n]
            decoded.append(q)
        mean_delta = []
        for j in range(world):
            m = sum(decoded[r][j] for r in range(world)) / world + mean_errors[j]
            sent_mean = decode(encode(m, codec), codec, chunk)
            mean_errors[j] = decay * (m - sent_mean)
            mean_delta.append(sent_mean)
        theta = theta - torch.cat(mean_delta)[:n]
        thetas.append(theta)
    return thetas, errors, mean_errors


@pytest.mark.parametrize("codec,world", [("bf16", 2), ("int8", 2), ("int4", 2), ("int8", 3), (TOPK_TWO_PHASE, 2),
                                         (TOPK_TWO_PHASE, 3)])
def test_compressed_average_matches_hand_reference(tmp_path, codec, world):
    got = spawn(functools.partial(scenario_compressed, codec=codec), world, tmp_path)
    thetas, errors, mean_errors = compressed_reference(codec, world)
    chunk = math.ceil(thetas[0].numel() / world)
    # topk over the two phases (its decay, its re-sparsified mean) bit for bit; the others within rounding, as before
    close = torch.equal if codec == TOPK_TWO_PHASE else functools.partial(torch.allclose, atol=1e-6)
    for sync, theta in enumerate(thetas):
        for rank in got:
            params, sent = rank["after"][sync]
            assert close(torch.cat([p.reshape(-1) for p in params]), theta)
            assert sent == world * payload_bytes(codec, chunk)  # one compressed copy of the rank's values
    for r, rank in enumerate(got):
        assert close(rank["state"]["compression_error"], errors[r])
        assert close(rank["state"]["compression_mean_error"][None], mean_errors[r])
    if codec == TOPK_TWO_PHASE:  # sparse: the mean moved fewer values than the chunks hold; the residuals kept the rest
        assert int((thetas[0] != torch.cat([t.reshape(-1) for t in initial()])).sum()) < thetas[0].numel()
        assert all(float(e.abs().max()) > 0 for e in errors + mean_errors)


@pytest.mark.parametrize("world", [2, 3])
def test_sparse_all_gather_matches_hand_reference(tmp_path, world):
    """topk's exchange (all-gather of every group's payload, summed locally in member order) over gloo, 2 syncs, bit
    for bit against the hand reference: each rank encodes θ_g − θ_i + e once, the residual keeps β times what it did
    not send, every rank applies the mean of the G decoded payloads: the union of the groups' entries, more than one
    group's k, which a re-sparsified mean would cut to k. One payload of the rank's 22 values per sync."""
    got = spawn(functools.partial(scenario_compressed, codec=TOPK_TEST), world, tmp_path)
    codec = get_codec(TOPK_TEST)
    theta = torch.cat([t.reshape(-1) for t in initial()])
    errors = [torch.zeros_like(theta) for _ in range(world)]
    thetas = []
    for sync in range(2):
        locals_ = [torch.cat([t.reshape(-1) for t in local_tensors(r, sync)]) for r in range(world)]
        theta, errors = gathered_compressed_sync(theta, locals_, [1.0] * world, errors, TOPK_TEST)
        thetas.append(theta)
    for sync, theta in enumerate(thetas):
        for rank in got:
            params, sent = rank["after"][sync]
            assert torch.equal(torch.cat([p.reshape(-1) for p in params]), theta), (sync, world)
            assert sent == payload_bytes(TOPK_TEST, theta.numel()) == 1 + 3 + 4  # 4 × 2 bits, 4 × 6 bits, a scale
    for r, rank in enumerate(got):
        assert torch.equal(rank["state"]["compression_error"], errors[r])
        assert rank["state"]["compression_mean_error"] == {}  # one encoding, one residual
        assert float(errors[r].abs().max()) > 0
    moved = int((thetas[0] != torch.cat([t.reshape(-1) for t in initial()])).sum())
    assert codec.k < moved <= world * codec.k
