"""The sync engine on CUDA tensors (snapshot and outer state on the GPU, or on the host with
``state_device="cpu"``), against the same hand references as the CPU tests in tests/engine. Ranks share ``cuda:0`` over
gloo."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.distributed as dist

from lightning_localsgd.engine import NonFinitePseudoGradientError, OuterSync, resolve_outer_optimizer
from lightning_localsgd.engine.codecs import CODECS, decode, encode, payload_bytes
from lightning_localsgd.engine.outer import squared_norm
from test_compression import assert_round_trip_bounds, compressed_reference, quantization_step
from _gpu import DEVICE as CUDA, use_device
from test_outer import _close, check_nonfinite_policy, initial, local_tensors, reference, spawn
from reference import gathered_compressed_sync
from workers.tiny import TOPK_TEST


def _cpu(tensors):
    return [t.detach().cpu().clone() for t in tensors]


def scenario_two_syncs(rank, world, outer, state_device, compression=None):
    use_device()
    params = [t.to(CUDA) for t in initial()]
    engine = OuterSync(params, outer_optimizer=resolve_outer_optimizer(outer) if compression is None else None,
                       state_device=state_device, compression=compression)
    out = []
    for sync in range(2):
        for p, t in zip(params, local_tensors(rank, sync)):
            p.copy_(t.to(CUDA))
        res = engine.sync()
        out.append((_cpu(params), res.bytes_sent, res.pseudo_grad_norm))
    state = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in engine.state_dict().items()}
    return {"after": out, "state": state, "snapshot_device": str(engine.snapshot[0].device),
            "param_device": str(params[0].device)}


def scenario_sharded(rank, world):
    """2 groups x 2 replicas: the ranks of a group hold identical tensors and each syncs one slice."""
    use_device()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    cross = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    g, k = rank // 2, rank % 2
    params = [t.to(CUDA) for t in initial()]
    engine = OuterSync(params, outer_optimizer=resolve_outer_optimizer("diloco"), cross_group=cross[k],
                       slice_group=groups[g], state_device="cpu")
    out = []
    for sync in range(2):
        for p, t in zip(params, local_tensors(g, sync)):
            p.copy_(t.to(CUDA))
        engine.sync()
        out.append(_cpu(params))
    return {"after": out}


def scenario_nonfinite(rank, world, mode, state_device):
    use_device()
    params = [t.to(CUDA) for t in initial()]
    engine = OuterSync(params, outer_optimizer=resolve_outer_optimizer("diloco"), on_nonfinite=mode,
                       state_device=state_device)
    for p, t in zip(params, local_tensors(rank, 0)):
        p.copy_(t.to(CUDA))
    if rank == 1:
        params[1][3] = float("inf")
    error, skipped = None, None
    try:
        skipped = engine.sync().skipped
    except NonFinitePseudoGradientError as err:
        error = str(err)
    return {"error": error, "skipped": skipped, "snapshot": _cpu(engine.snapshot), "params": _cpu(params),
            "num_syncs": engine.num_syncs}


@pytest.mark.parametrize("state_device", [None, "cpu"], ids=["snapshot_on_gpu", "snapshot_on_host"])
@pytest.mark.parametrize("outer", ["average", "diloco"])
def test_outer_steps_on_cuda_match_hand_reference(tmp_path, outer, state_device):
    got = spawn(functools.partial(scenario_two_syncs, outer=outer, state_device=state_device), 2, tmp_path)
    want = reference(2, outer)
    for rank in got:
        assert rank["param_device"] == CUDA
        assert rank["snapshot_device"] == (CUDA if state_device is None else "cpu")
        for (params, sent, _), (ref, _) in zip(rank["after"], want):
            assert _close(params, ref)
            assert sent == 22 * 4
    mean0 = [sum(local_tensors(i, 0)[j] for i in range(2)) / 2 for j in range(2)]
    norm = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(initial(), mean0)))
    assert abs(got[0]["after"][0][2] - float(norm)) < 1e-5


@pytest.mark.parametrize("state_device", [None, "cpu"], ids=["snapshot_on_gpu", "snapshot_on_host"])
@pytest.mark.parametrize("codec", ["bf16", "int8", "int4"])
def test_compressed_sync_on_cuda_matches_hand_reference(tmp_path, codec, state_device):
    world = 2
    got = spawn(functools.partial(scenario_two_syncs, outer="average", state_device=state_device,
                                  compression=codec), world, tmp_path)
    thetas, errors, mean_errors = compressed_reference(codec, world)
    chunk = math.ceil(thetas[0].numel() / world)
    for sync, theta in enumerate(thetas):
        for rank in got:
            params, sent, _ = rank["after"][sync]
            assert torch.allclose(torch.cat([p.reshape(-1) for p in params]), theta, atol=1e-6)
            assert sent == world * payload_bytes(codec, chunk)
    for r, rank in enumerate(got):
        assert torch.allclose(rank["state"]["compression_error"], errors[r], atol=1e-6)
        assert torch.allclose(rank["state"]["compression_mean_error"][None], mean_errors[r], atol=1e-6)


@pytest.mark.parametrize("state_device", [None, "cpu"], ids=["snapshot_on_gpu", "snapshot_on_host"])
def test_sparse_all_gather_on_cuda_matches_hand_reference(tmp_path, state_device):
    """topk's all-gather exchange on CUDA tensors: every rank's payload gathered, decoded and summed on the GPU,
    against the CPU hand reference (topk's codec is bit-identical on CUDA:
    test_codecs_on_cuda_keep_the_cpu_bounds)."""
    world = 2
    got = spawn(functools.partial(scenario_two_syncs, outer="average", state_device=state_device,
                                  compression=TOPK_TEST), world, tmp_path)
    theta = torch.cat([t.reshape(-1) for t in initial()])
    errors = [torch.zeros_like(theta) for _ in range(world)]
    for sync in range(2):
        locals_ = [torch.cat([t.reshape(-1) for t in local_tensors(r, sync)]) for r in range(world)]
        theta, errors = gathered_compressed_sync(theta, locals_, [1.0] * world, errors, TOPK_TEST)
        for rank in got:
            params, sent, _ = rank["after"][sync]
            assert torch.allclose(torch.cat([p.reshape(-1) for p in params]), theta, atol=1e-6)
            assert sent == payload_bytes(TOPK_TEST, theta.numel())
    for r, rank in enumerate(got):
        assert torch.allclose(rank["state"]["compression_error"], errors[r], atol=1e-6)
        assert rank["state"]["compression_mean_error"] == {}


def test_sharded_replicas_on_cuda_with_host_state(tmp_path):
    got = spawn(scenario_sharded, 4, tmp_path)
    want = reference(4, "diloco", groups=2)
    for rank in got:
        for params, (ref, _) in zip(rank["after"], want):
            assert _close(params, ref)


@pytest.mark.parametrize("state_device", [None, "cpu"], ids=["snapshot_on_gpu", "snapshot_on_host"])
@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_on_cuda_leaves_snapshot(tmp_path, mode, state_device):
    got = spawn(functools.partial(scenario_nonfinite, mode=mode, state_device=state_device), 2, tmp_path)
    for rank in got:
        check_nonfinite_policy(rank, mode, rank["skipped"])


@pytest.mark.parametrize("n", [1, 255, 256, 1000, 3_000_001])
def test_codecs_on_cuda_keep_the_cpu_bounds(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 1, n)
    for codec in CODECS:
        payload = encode(x.to(CUDA), codec)
        assert payload.device == torch.device(CUDA) and payload.dtype == torch.uint8
        assert payload.numel() == payload_bytes(codec, n)
        y = decode(payload, codec, n)
        assert y.device == torch.device(CUDA)
        y = y.cpu()
        assert_round_trip_bounds(x, y, codec)
        if codec.startswith("topk"):  # the same selection (ties to the lower index), the same fp32 levels and values
            assert torch.equal(decode(encode(x, codec), codec, n), y)
        elif codec != "bf16":
            # the same input decodes to the same values on the GPU as on the CPU, up to one step where rounding ties
            cpu = decode(encode(x, codec), codec, n)
            assert torch.all((cpu - y).abs() <= quantization_step(x, codec) + 1e-7 * x.abs().max())


def test_squared_norm_on_cuda_matches_float64():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(10_000_003, generator=g)
    b = torch.randn(10_000_003, generator=g)
    want = float(((a.double() - b.double()) ** 2).sum())
    got = squared_norm(a.to(CUDA), b.to(CUDA))
    assert abs(got - want) / want < 1e-5
    assert abs(squared_norm(a.to(CUDA)) - float((a.double() ** 2).sum())) / want < 1e-5
    a[123] = float("nan")
    assert math.isnan(squared_norm(a.to(CUDA), b.to(CUDA)))
    a[123] = 3e38
    b[123] = -3e38  # a − b overflows fp32: non-finite on the GPU exactly as on the CPU (the documented contract)
    assert not math.isfinite(squared_norm(a.to(CUDA), b.to(CUDA)))
    assert not math.isfinite(squared_norm(a, b))
    a[123] = 3e19  # (a − b)² overflows fp32 but not float64: the chunk is redone in float64, a finite result
    b[123] = 0.0
    want = float(((a.double() - b.double()) ** 2).sum())
    assert abs(squared_norm(a.to(CUDA), b.to(CUDA)) - want) / want < 1e-5


def test_codec_calibration_on_cuda_times_the_gpu():
    """``plan --calibrate-codecs cuda``: each codec's seconds per value with the values on the GPU, synchronized."""
    from lightning_localsgd.planner import calibrate_codec_cpu, plan

    use_device()
    costs = calibrate_codec_cpu(["fp32", *CODECS], numel=1 << 20, repeats=2, device=CUDA)
    assert costs["fp32"].encode_s_per_value == 0
    for name in CODECS:
        assert 0 < costs[name].encode_s_per_value < 1e-6 and 0 < costs[name].decode_s_per_value < 1e-6, name
    p = plan(params=1e9, step_time=0.4, bandwidth="1Gbit", latency="20ms", groups=2, codec_cpu=costs)
    assert all(c.cpu_source == "measured" for c in p.codecs if c.codec != "fp32")
