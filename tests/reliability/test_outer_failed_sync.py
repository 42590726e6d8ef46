"""A sync that fails leaves the global state of the last good sync: OuterSync reduces before it writes anything.

On bare torch.distributed (gloo, 2 processes): the all-reduce of a sync fails (injected at the first or the second
bucket, or for real because the peer process died), and the snapshot θ_g, the outer optimizer's momentum, the counters
and the live parameters are exactly what they were before the sync; retrying gives exactly an uninterrupted run.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _forkserver
from lightning_localsgd.engine import OuterSync, resolve_outer_optimizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _initial() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]


def _local(rank: int, sync: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * sync + rank)
    return [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]


def _state(engine: OuterSync, params: list[torch.Tensor]) -> dict:
    st = engine.state_dict()
    return {"snapshot": st["snapshot"], "momentum": [s["momentum_buffer"].clone() for s in
                                                     st["outer_optimizer"]["state"].values()],
            "num_syncs": st["num_syncs"], "bytes_sent": st["bytes_sent"], "params": [p.clone() for p in params]}


def _engine(params):
    # 16-element buckets: the 22 elements go in 2 all-reduces
    return OuterSync(params, outer_optimizer=resolve_outer_optimizer("diloco"), bucket_bytes=64)


def _scenario(rank: int, fail: str) -> dict:
    params = [t.clone() for t in _initial()]
    engine = _engine(params)
    for p, t in zip(params, _local(rank, 0)):
        p.copy_(t)
    engine.sync()  # one good sync: θ_g and the momentum are non-trivial
    for p, t in zip(params, _local(rank, 1)):
        p.copy_(t)
    result: dict = {"before": _state(engine, params)}

    if fail == "peer_dies":
        dist.barrier()
        if rank == 1:
            os._exit(0)  # dies just before the sync
        try:
            engine.sync()
        except RuntimeError as err:
            result["error"] = str(err)
        result["after"] = _state(engine, params)
        return result

    original, calls = dist.all_reduce, []

    def failing(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        if len(calls) == int(fail[-1]):
            raise RuntimeError("injected: a peer was lost during the all-reduce")
        return original(tensor, *args, **kwargs)

    dist.all_reduce = failing
    try:
        engine.sync()
    except RuntimeError as err:
        result["error"] = str(err)
    finally:
        dist.all_reduce = original
    result["after"] = _state(engine, params)
    # retry: the same sync again gives exactly what an engine that never failed gives
    engine.sync()
    reference_params = [t.clone() for t in _initial()]
    reference = _engine(reference_params)
    for sync in range(2):
        for p, t in zip(reference_params, _local(rank, sync)):
            p.copy_(t)
        reference.sync()
    result["retried"] = _state(engine, params)
    result["reference"] = _state(reference, reference_params)
    return result


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = {}
    for fail in SCENARIOS:  # peer_dies last: it breaks the process group
        results[fail] = _scenario(rank, fail)
        torch.save(results, os.path.join(out, f"{rank}.pt"))
    os._exit(0)  # the process group is broken: skip its teardown


def _equal(a: dict, b: dict) -> bool:
    return (a["num_syncs"] == b["num_syncs"] and a["bytes_sent"] == b["bytes_sent"]
            and all(torch.equal(x, y) for k in ("snapshot", "momentum", "params") for x, y in zip(a[k], b[k])))


SCENARIOS = ("bucket1", "bucket2", "peer_dies")


def test_failed_sync_leaves_the_previous_global_state(tmp_path):
    args = (2, _free_port(), str(tmp_path))
    if _forkserver.enabled():  # forked by the tests' fork server, as start_method="spawn" would start them
        procs = _forkserver.spawn_processes(_worker, args=args, nprocs=2)
        try:
            for p in procs:
                p.wait(120)
                assert p.returncode == 0
        finally:
            for p in procs:
                p.kill()
    else:
        ctx = mp.start_processes(_worker, args=args, nprocs=2, join=False, start_method="spawn")
        for p in ctx.processes:
            p.join(120)
            assert p.exitcode == 0
    for r in (0, 1):
        results = torch.load(tmp_path / f"{r}.pt", weights_only=False)
        for fail in SCENARIOS:
            if fail == "peer_dies" and r == 1:
                continue  # rank 1 is the one that died
            res = results[fail]
            assert "error" in res, f"{fail}: the sync did not fail"
            assert _equal(res["before"], res["after"]), f"{fail}: a failed sync changed the state"
            if "retried" in res:
                assert _equal(res["retried"], res["reference"]), f"{fail}: the retry differs from a clean run"
