"""The rank side of ``peers.py``: the job kinds a 2-process job runs (``sync``, ``train``, ``features``, ``agree``,
``profile``), each through the peers' one interface (:mod:`adapters`)."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import harness as h
from adapters import SYNC_IMPLS, SyncImpl, peer_family, peer_of
from adapters.common import (COUNT, WORLD, flat_params, init_default_group, install_counters, make_model, optimizers,
                             peak_rss_reset, rss_mb, vm_hwm_mb)
from adapters.accelerate_local_sgd import accelerator
from adapters.ours import train_lightning
from adapters.torchft_local_sgd import torchft_manager


def build_sync_impl(name: str, job: dict, size: str, acc: object, manager: object) -> SyncImpl:
    """Implementation ``name``'s sync on a fresh, seeded model of ``size``."""
    return peer_of(name).sync_impl(name, make_model(job, size), acc, manager)


def timed_sync(impl: SyncImpl, rank: int, r: int) -> dict:
    """Perturb this rank's copy (untimed), barrier, time one sync; its bytes and calls."""
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for p in impl.model.parameters():
            p.add_(1e-3 * (rank + 1) * (1 if r % 2 else -1))
    dist.barrier()
    q0 = impl.manager.quorum_seconds if impl.manager is not None else 0.0
    peak_rss_reset()
    before = rss_mb()
    COUNT.update(on=True, bytes=0, calls=0)
    t0 = time.perf_counter()
    impl.run()
    seconds = time.perf_counter() - t0
    COUNT["on"] = False
    peak = vm_hwm_mb() - before
    quorum = (impl.manager.quorum_seconds - q0) if impl.manager is not None else 0.0
    return dict(seconds=seconds, bytes=COUNT["bytes"], calls=COUNT["calls"], quorum_seconds=quorum,
                peak_rss_over_start_mb=peak)


def sync_job(job: dict, rank: int) -> dict:
    """Every implementation's sync at every size, interleaved rounds (rank 0's times are reported)."""
    import torch
    torch.set_num_threads(1)
    acc = accelerator(job)  # initializes the default (gloo) process group from the environment
    install_counters()
    manager = torchft_manager(job, rank)
    out: dict = {"sizes": {}}
    impls_all = [n for mode in job["modes"] for n in SYNC_IMPLS[mode]]
    for size in job["sizes"]:
        impls = {n: build_sync_impl(n, job, size, acc, manager) for n in impls_all}
        params = sum(p.numel() for p in impls[impls_all[0]].model.parameters())
        for i, impl in enumerate(impls.values()):  # warm-up: first quorum, PG connections, allocations
            timed_sync(impl, rank, i)
        measured = h.run_interleaved({n: (lambda impl=impl, c=[0]: (c.__setitem__(0, c[0] + 1),
                                                                  timed_sync(impl, rank, c[0]))[1])
                                      for n, impl in impls.items()}, job["rounds"], log=None)
        engines = {n: impl.engine for n, impl in impls.items() if hasattr(impl, "engine")}
        out["sizes"][size] = dict(
            params=params, model_bytes=params * 4,
            engine_bytes_per_sync={n: e.bytes_sent / max(1, e.num_syncs) for n, e in engines.items()},
            runs=[dict(impl=run.name, round=run.round, load=run.load_before, **run.result) for run in measured.runs],
            state={n: impl.state() for n, impl in impls.items()}, where={n: impl.where for n, impl in impls.items()},
        )
        del impls
    manager.shutdown(wait=False)
    return out


def train_loop(job: dict, rank: int, batches: list) -> dict:
    """A plain training loop with the peer's sync; the same steps for every peer."""
    import torch
    import torch.distributed as dist

    model = make_model(job)
    opt, sched = optimizers(model)
    loop = peer_of(job["peer"]).loop(job["peer"], job, rank, model, opt)
    forward, opt, manager = loop.forward, loop.opt, loop.manager
    q0 = manager.quorum_seconds if manager is not None else 0.0
    if not dist.is_initialized():
        init_default_group()
    losses: list[float] = []
    dist.barrier()
    COUNT.update(on=True, bytes=0, calls=0)
    t0 = time.perf_counter()
    if loop.ctx is not None:
        loop.ctx.__enter__()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        _, loss = forward(x, y)
        loss.backward()
        opt.step()
        sched.step()
        loop.step_hook()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    COUNT["on"] = False
    if loop.ctx is not None and loop.exit_ctx:
        loop.ctx.__exit__(None, None, None)
    if rank == 0:
        torch.save(flat_params(model), job["params_out"])
    out = dict(train_seconds=seconds, losses=losses, bytes=COUNT["bytes"], calls=COUNT["calls"],
               state_bytes=loop.state())
    if manager is not None:
        out["quorum_seconds"] = manager.quorum_seconds - q0
        if "_manager" not in job:
            manager.shutdown(wait=False)
    return out


def train_job(job: dict, rank: int) -> dict:
    """Every training run (peer, mode) in the same two processes, ``rounds`` interleaved rounds; per run: tokens/s,
    losses, peak RSS above the RSS before it (VmHWM reset before each run), bytes; rank 0 saves the parameters."""
    import gc

    import torch

    torch.set_num_threads(1)
    steps = job["steps"]
    batches = torch.load(job["batches"])[rank][:steps]
    install_counters()
    init_default_group()
    job["_manager"] = torchft_manager(job, rank)
    job["_acc_cache"] = {}
    counts: dict = {}

    def runner(peer: str, mode: str) -> Callable[[], dict]:
        def run() -> dict:
            r = counts[(peer, mode)] = counts.get((peer, mode), -1) + 1
            params_out = str(Path(job["params_dir"], f"{peer}:{mode}.r{r}.pt"))
            sub = {**job, "peer": peer, "mode": mode, "params_out": params_out}
            gc.collect()
            peak_rss_reset()
            before = rss_mb()
            res = (train_lightning if peer == "ours_lightning" else train_loop)(sub, rank, batches)
            res.update(rank=rank, peak_rss_over_start_mb=vm_hwm_mb() - before, rss_before_mb=before,
                       tokens=steps * job["batch_size"] * job["block_size"] * WORLD, syncs=steps // job["sync_every"])
            res["tokens_per_s"] = res["tokens"] / res["train_seconds"]
            return res

        return run

    # warm-up: every configuration once for H steps (lazy imports, first kernels, Lightning's first fit), not kept
    for p, m in job["runs"]:
        warm = {**job, "peer": p, "mode": m, "steps": job["sync_every"], "params_out": os.devnull}
        (train_lightning if p == "ours_lightning" else train_loop)(warm, rank, batches[:job["sync_every"]])
    measured = h.run_interleaved({f"{p}:{m}": runner(p, m) for p, m in job["runs"]}, job["rounds"], log=None)
    job["_manager"].shutdown(wait=False)
    return dict(runs=[dict(name=run.name, round=run.round, result=run.result, started=run.started,
                           seconds=run.seconds, load=run.load_before) for run in measured.runs])


def agree_job(job: dict, rank: int) -> dict:
    """The same training with several peers in the same two processes; rank 0: max |Δθ| of each vs the first."""
    import torch

    torch.set_num_threads(1)
    batches = torch.load(job["batches"])[rank][:job["steps"]]
    install_counters()
    paths = {}
    for peer in job["peers"]:
        paths[peer] = str(Path(job["tmp"], f"{peer}.pt"))
        train_loop({**job, "peer": peer, "params_out": paths[peer]}, rank, batches)
    if rank != 0:
        return {}
    ref = torch.load(paths[job["peers"][0]])
    return {peer: float((torch.load(path) - ref).abs().max()) for peer, path in paths.items()}


def profile_job(job: dict, rank: int) -> dict:
    """cProfile of one ``OuterSync.sync()`` (averaging) at ``job['size']`` on rank 0, after one warm-up sync; the
    torch averager's sync timed beside it. Rank 0 returns the top functions by own time."""
    import cProfile
    import io
    import pstats

    import torch
    import torch.distributed as dist

    from lightning_localsgd.engine.outer import OuterSync

    torch.set_num_threads(1)
    init_default_group()
    ours = build_sync_impl("ours_engine", job, job["size"], None, None)
    theirs = build_sync_impl("torch_averager", job, job["size"], None, None)
    times = {}
    for name, impl in (("ours_engine", ours), ("torch_averager", theirs)):
        times[name] = [timed_sync(impl, rank, i)["seconds"] for i in range(3)]
    assert isinstance(ours.engine, OuterSync)
    dist.barrier()
    prof = cProfile.Profile()
    prof.enable()
    ours.run()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    return dict(times=times, profile=out.getvalue())


def features_job(job: dict, rank: int) -> dict:
    """Try every feature on one peer family; rank 0 writes the rows (the dead-peer try comes last: rank 1 exits)."""
    import torch

    torch.set_num_threads(1)
    peer = job["peer"]
    batches = torch.load(job["batches"])[rank]
    rows: list[dict] = []

    def add(feature: str, impl: str, fn: Callable[[], tuple[str, str]]) -> None:
        t0 = time.perf_counter()
        try:
            result, detail = fn()
        except Exception as err:  # noqa: BLE001
            msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            last = traceback.extract_tb(err.__traceback__)[-1]
            where = f"{Path(last.filename).parent.name}/{Path(last.filename).name}:{last.lineno} `{last.line}`"
            result, detail = "no", f"fails: {type(err).__name__} {msg} at {where}"
        rows.append(dict(peer=peer, impl=impl, feature=feature, result=result, detail=detail,
                         seconds=round(time.perf_counter() - t0, 2)))
        if rank == 0:  # keep what is known so far (a hanging try must not lose the others)
            Path(job["tmp"], "rank0.json").write_text(json.dumps(rows))

    peer_family(peer).features(job, rank, batches, add)
    return rows


def rank_worker(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    rank = int(os.environ["RANK"])
    kind = job["kind"]
    try:
        result = {"sync": sync_job, "train": train_job, "features": features_job,
                  "agree": agree_job, "profile": profile_job}[kind](job, rank)
    except Exception:  # noqa: BLE001  (any failure: print it and exit non-zero)
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    Path(job["tmp"], f"rank{rank}.json").write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (torchft / gloo threads)
