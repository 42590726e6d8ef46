"""lightning_localsgd.engine (OuterSync) on bare torch.distributed (gloo), against outer steps written out by hand."""

from __future__ import annotations

import functools
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _forkserver
from lightning_localsgd.engine import NonFinitePseudoGradientError, OuterSync, resolve_outer_optimizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_tensors(rank: int, sync: int) -> list[torch.Tensor]:
    """What rank `rank` holds after the local steps before sync number `sync` (deterministic)."""
    g = torch.Generator().manual_seed(100 * sync + rank)
    return [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]


def initial() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]


def _worker(rank, world, port, scenario, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = scenario(rank, world)
        torch.save(results, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn(scenario, world, tmp_path):
    """Run ``scenario(rank, world)`` on ``world`` processes (forked by the tests' fork server; with
    LOCALSGD_TESTS_NO_FORKSERVER=1 fresh ones from ``torch.multiprocessing.spawn``) meeting over gloo."""
    if _forkserver.enabled():
        _forkserver.spawn(_worker, args=(world, _free_port(), scenario, str(tmp_path)), nprocs=world)
    else:
        mp.spawn(_worker, args=(world, _free_port(), scenario, str(tmp_path)), nprocs=world)
    return [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(world)]


# ---------------------------------------------------------------- scenarios (module level: picklable)
def scenario_two_syncs(rank, world, outer="average", bucket_bytes=1 << 20, state_device=None, weights=None):
    params = [t.clone() for t in initial()]
    engine = OuterSync(params, outer_optimizer=resolve_outer_optimizer(outer), bucket_bytes=bucket_bytes,
                       state_device=state_device)
    calls = []
    original = dist.all_reduce

    def counting(tensor, *a, **k):
        calls.append(tensor.numel())
        return original(tensor, *a, **k)

    dist.all_reduce = counting
    out = []
    for sync in range(2):
        for p, t in zip(params, local_tensors(rank, sync)):
            p.copy_(t)
        res = engine.sync(weight=None if weights is None else weights[rank])
        out.append(([p.clone() for p in params], res))
    dist.all_reduce = original
    return {"after": out, "calls": calls, "state": engine.state_dict()}


def scenario_sharded(rank, world, outer="diloco"):
    """2 groups × 2 replicas: ranks of a group hold identical tensors and each syncs one slice."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    cross = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    g, k = rank // 2, rank % 2
    params = [t.clone() for t in initial()]
    engine = OuterSync(params, outer_optimizer=resolve_outer_optimizer(outer), cross_group=cross[k],
                       slice_group=groups[g])
    out = []
    for sync in range(2):
        for p, t in zip(params, local_tensors(g, sync)):  # replicas of group g hold group g's tensors
            p.copy_(t)
        res = engine.sync()
        out.append(([p.clone() for p in params], res))
    return {"after": out, "owned": engine.owned_numel, "state_bytes": engine.state_bytes}


def scenario_nonfinite(rank, world, mode):
    params = [t.clone() for t in initial()]
    engine = OuterSync(params, outer_optimizer=resolve_outer_optimizer("diloco"), on_nonfinite=mode)
    for p, t in zip(params, local_tensors(rank, 0)):
        p.copy_(t)
    if rank == 1:
        params[1][3] = float("inf")
    error = None
    try:
        res = engine.sync()
    except NonFinitePseudoGradientError as err:
        error, res = str(err), None
    return {"error": error, "result": res, "snapshot": [s.detach().clone() for s in engine.snapshot],
            "params": [p.clone() for p in params], "num_syncs": engine.num_syncs}


# ---------------------------------------------------------------- references, by hand
def reference(world, outer, syncs=2, weights=None, groups=None):
    groups = groups or world
    theta = [t.clone() for t in initial()]
    buf = None
    states = []
    for sync in range(syncs):
        locals_ = [local_tensors(i, sync) for i in range(groups)]
        w = weights or [1.0] * groups
        mean = [sum(w[i] * locals_[i][j] for i in range(groups)) / sum(w) for j in range(len(theta))]
        if outer == "average":
            theta = mean
        else:  # Nesterov SGD, lr 0.7, momentum 0.9
            delta = [t - m for t, m in zip(theta, mean)]
            buf = [d.clone() for d in delta] if buf is None else [0.9 * b + d for b, d in zip(buf, delta)]
            theta = [t - 0.7 * (d + 0.9 * b) for t, d, b in zip(theta, delta, buf)]
        states.append(([t.clone() for t in theta], None))
    return states


def _close(a, b, atol=1e-6):
    return all(torch.allclose(x.reshape(-1), y.reshape(-1), atol=atol, rtol=0) for x, y in zip(a, b))


@pytest.mark.parametrize("outer", ["average", "diloco"])
def test_three_ranks_match_hand_computed_outer_steps(tmp_path, outer):
    got = spawn(functools.partial(scenario_two_syncs, outer=outer), 3, tmp_path)
    want = reference(3, outer)
    for rank in got:
        for (params, res), (ref, _) in zip(rank["after"], want):
            assert _close(params, ref)
        assert rank["calls"] == [15 + 7] * 2  # one all-reduce per sync, of the whole (fp32) parameters
        assert rank["after"][0][1].bytes_sent == 22 * 4
    # pseudo-gradient norm of the first sync: ||θ0 − mean||
    mean0 = [sum(local_tensors(i, 0)[j] for i in range(3)) / 3 for j in range(2)]
    norm = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(initial(), mean0)))
    assert abs(got[0]["after"][0][1].pseudo_grad_norm - float(norm)) < 1e-5
    if outer == "average":  # averaging is the mean itself, not θ − 1.0·(θ − mean)
        assert _close(got[0]["after"][0][0], mean0, 5e-7)


def test_buckets_cpu_state_and_weights(tmp_path):
    got = spawn(functools.partial(scenario_two_syncs, outer="diloco", bucket_bytes=32, state_device="cpu",
                                  weights=[1.0, 3.0]), 2, tmp_path)
    want = reference(2, "diloco", weights=[1.0, 3.0])
    for rank in got:
        for (params, _), (ref, _) in zip(rank["after"], want):
            assert _close(params, ref)
        # 22 values + 1 weight in buckets of 8 floats: 3 all-reduces per sync
        assert rank["calls"] == [8, 8, 7] * 2
        assert rank["state"]["outer_optimizer"]["state"]  # momentum buffers are saved


def test_sharded_replicas_sync_one_slice_each(tmp_path):
    got = spawn(scenario_sharded, 4, tmp_path)
    want = reference(4, "diloco", groups=2)
    for rank in got:
        for (params, _), (ref, _) in zip(rank["after"], want):
            assert _close(params, ref)
    assert [r["owned"] for r in got] == [11, 11, 11, 11]
    # snapshot + Nesterov momentum of an 11-element slice, fp32
    assert got[0]["state_bytes"] == 2 * 11 * 4


def check_nonfinite_policy(rank: dict, mode: str, skipped) -> None:
    """A sync with an inf in group 1: θ_g untouched; "raise" names the group, "skip" resets every group to θ_g."""
    assert _close(rank["snapshot"], initial(), 0)
    assert rank["num_syncs"] == 0
    if mode == "raise":
        assert "worker groups with NaN/inf parameters: [1]" in rank["error"]
    else:
        assert rank["error"] is None and skipped
        assert _close(rank["params"], initial(), 0)  # every group restarts from the last good θ_g


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_nonfinite_leaves_snapshot(tmp_path, mode):
    got = spawn(functools.partial(scenario_nonfinite, mode=mode), 2, tmp_path)
    for rank in got:
        check_nonfinite_policy(rank, mode, rank["result"] is not None and rank["result"].skipped)


def test_state_dict_round_trip_and_layout_check():
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        params = [t.clone() for t in initial()]
        engine = OuterSync(params, outer_optimizer=resolve_outer_optimizer("diloco"))
        for p in params:
            p.add_(1.0)
        engine.sync()
        other = OuterSync([t.clone() for t in initial()], outer_optimizer=resolve_outer_optimizer("diloco"))
        other.load_state_dict(engine.state_dict())
        assert _close(other.snapshot, engine.snapshot, 0) and other.num_syncs == 1
        small = OuterSync([torch.zeros(3)])
        with pytest.raises(ValueError, match="Resume with the same model"):
            small.load_state_dict(engine.state_dict())
        with pytest.raises(ValueError, match="outer optimizer does not match"):
            OuterSync([t.clone() for t in initial()]).load_state_dict(engine.state_dict())
    finally:
        dist.destroy_process_group()


def test_rebind_takes_new_tensors_of_the_same_layout_only():
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        params = [t.clone() for t in initial()]
        engine = OuterSync(params, outer_optimizer=resolve_outer_optimizer("average"))
        fresh = [t.clone() + 1.0 for t in initial()]  # e.g. partitions re-created by a checkpoint load
        engine.rebind(fresh)
        engine.sync()  # one group: θ_g becomes the new tensors' values, written back into them
        assert _close(engine.snapshot, [t + 1.0 for t in initial()], 0)
        assert _close(fresh, [t + 1.0 for t in initial()], 0) and _close(params, initial(), 0)
        with pytest.raises(ValueError, match=r"hold \[15, 6\] elements, the sync was built for \[15, 7\]"):
            engine.rebind([torch.zeros(5, 3), torch.zeros(6)])
        with pytest.raises(ValueError, match="on \\['meta'\\]"):
            engine.rebind([torch.zeros(5, 3, device="meta"), torch.zeros(7, device="meta")])
    finally:
        dist.destroy_process_group()

