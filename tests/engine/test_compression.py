"""Compressed pseudo-gradients: codec bounds, error feedback, and a compressed sync against a hand reference."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from lightning_localsgd.engine.codecs import CODECS, decode, encode, payload_bytes
from lightning_localsgd.engine import OuterSync
from test_outer import initial, local_tensors, spawn


def quantization_step(x, codec):
    """Per element, one quantization step of int8 / int4: the block's largest magnitude over the levels."""
    levels = 127 if codec == "int8" else 7
    blocks = torch.nn.functional.pad(x, (0, (-x.numel()) % 256)).view(-1, 256)
    return (blocks.abs().amax(1) / levels).repeat_interleave(256)[: x.numel()]


def assert_round_trip_bounds(x, y, codec):
    """bf16: relative error <= 2^-8; int8 / int4: at most half a step of the element's block of 256."""
    if codec == "bf16":
        assert torch.all((x - y).abs() <= x.abs() * 2.0**-8)
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
    Returns θ after each sync, the ranks' error feedback and the mean-chunk error feedback."""
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
            errors[r] = (d - torch.cat(q))[:n]
            decoded.append(q)
        mean_delta = []
        for j in range(world):
            m = sum(decoded[r][j] for r in range(world)) / world + mean_errors[j]
            sent_mean = decode(encode(m, codec), codec, chunk)
            mean_errors[j] = m - sent_mean
            mean_delta.append(sent_mean)
        theta = theta - torch.cat(mean_delta)[:n]
        thetas.append(theta)
    return thetas, errors, mean_errors


@pytest.mark.parametrize("codec,world", [("bf16", 2), ("int8", 2), ("int4", 2), ("int8", 3)])
def test_compressed_average_matches_hand_reference(tmp_path, codec, world):
    got = spawn(functools.partial(scenario_compressed, codec=codec), world, tmp_path)
    thetas, errors, mean_errors = compressed_reference(codec, world)
    chunk = math.ceil(thetas[0].numel() / world)
    for sync, theta in enumerate(thetas):
        for rank in got:
            params, sent = rank["after"][sync]
            assert torch.allclose(torch.cat([p.reshape(-1) for p in params]), theta, atol=1e-6)
            assert sent == world * payload_bytes(codec, chunk)  # one compressed copy of the rank's values
    for r, rank in enumerate(got):
        assert torch.allclose(rank["state"]["compression_error"], errors[r], atol=1e-6)
        assert torch.allclose(rank["state"]["compression_mean_error"][None], mean_errors[r], atol=1e-6)
