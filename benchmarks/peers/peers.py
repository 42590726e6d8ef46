"""The library beside its peers: torchft, accelerate and torch's model averagers, doing the same work.

Peers (each used the way its own documentation uses it, on CPU with gloo, 2 processes):

* **ours (Lightning)**: ``Trainer(strategy=LocalSGDStrategy(sync_every=H, outer_optimizer="average" | "diloco"))``.
* **ours (engine)**: :class:`lightning_localsgd.engine.outer.OuterSync` on bare ``torch.distributed`` (a plain loop).
* **torch averager**: ``PostLocalSGDOptimizer(AdamW, PeriodicModelAverager(period=H, warmup_steps=H - 1))`` on a
  plain loop (``torch.distributed.algorithms.model_averaging``). Its averager counts from 0 and averages when
  ``(step - warmup_steps) % period == 0``: with the default ``warmup_steps=0`` it averages after optimizer steps
  1, H+1, 2H+1, …; ``warmup_steps = H - 1`` puts the averages after steps H, 2H, … as everyone else does (no DDP
  inside the loop, so its "warm-up" steps are plain local steps).
* **accelerate**: ``accelerate.local_sgd.LocalSGD(accelerator, model, local_sgd_steps=H)`` with
  ``Accelerator(cpu=True)`` (the model and optimizer go through ``accelerator.prepare``: DDP on gloo, whose
  gradient all-reduce ``LocalSGD`` turns off with ``no_sync``).
* **torchft LocalSGD / DiLoCo**: ``torchft.local_sgd.LocalSGD`` / ``DiLoCo`` with a ``torchft.Manager`` per process
  (its own replica group of one rank, ``ProcessGroupGloo``) and torchft's lighthouse
  (``torchft._torchft.LighthouseServer``, in the launcher process, ``quorum_tick_ms`` as ``--quorum-tick-ms``).

Same work for everyone: the example GPT (``lightning_localsgd.examples.gpt``) at one seed, its AdamW + warm-up/cosine
schedule, the same batches on every rank (a ``DistributedSampler`` over the builtin corpus, materialised once per
rank and fed to every peer in the same order), the same steps and H. DiLoCo = outer SGD lr 0.7, Nesterov momentum 0.9.

Parts (``--parts``, all by default):

1. ``sync``: the sync alone at each model size of the ladder, every implementation in the same 2-process job,
   interleaved rounds (``harness.timing``; the order reversed every other round), a barrier before every timed sync.
   Reported: seconds per sync (median over rounds), the ratio ours / each peer per round (median, bootstrap interval,
   min / max), counted cross-group bytes and collective calls per sync, outer-state bytes per rank.
2. ``train``: one training run per peer and mode (its own 2-process job), ``--train-rounds`` interleaved rounds:
   tokens/s of the training loop, peak RSS per rank, bytes, final loss; and **correctness**: the max absolute
   difference of the final parameters (and of the final loss) between implementations of the same math.
3. ``link``: the sync at ``--link-size`` inside a network namespace whose loopback is shaped with ``tc tbf`` to
   G × rate (as ``multi_cluster.py``), rounds interleaved; the limit = wire bytes of the ring all-reduce / rate
   (``costmodel.wire_bytes``). The namespace has no ``netem``: latency is not emulated here, so the limit holds the
   bandwidth term only. Where namespaces / tc cannot run, the part is reported as not measured.
4. ``features``: each feature tried by code on each peer (small runs with a time bound): DiLoCo outer step, exact
   resume mid-interval, synchronous warm-up, compressed sync on CPU, streaming (fragments), token-weighted mean
   (uneven workers), dead-peer handling. A try that would cost too much is reported as "not tried".

    python benchmarks/peers/peers.py            # small default: 2 CPU processes, ~10 minutes on 2 loaded cores
    python benchmarks/peers/peers.py --full     # longer runs, sizes up to 85M, 1 Gbit/s and 100 Mbit/s links
    python benchmarks/peers/peers.py --parts sync train
    python benchmarks/peers/peers.py --profile 10M  # cProfile of one sync of ours (engine) at 10M, beside torch's

Writes benchmarks/peers/results/peers_sync.csv, peers_train.csv, peers_link.csv, peers_features.csv, peers_rounds.csv,
peers.png and peers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness as h

RESULTS = Path(__file__).resolve().parent / "results"

HERE = Path(__file__).resolve()

#: The size ladder: name -> GPT arguments (total parameters with the byte-level embeddings, block 64).
SIZES: dict[str, dict] = {
    "0.1M": dict(size="micro"),
    "0.8M": dict(size="tiny"),
    "2.8M": dict(size="small"),
    "10M": dict(n_layer=6, n_head=6, n_embd=384),
    "38M": dict(size="large"),
    "85M": dict(size="gpt2"),
}
PRESETS = {
    "default": dict(sizes=["0.1M", "0.8M", "10M"], sync_rounds=5, train_size="0.1M", steps=64, sync_every=8,
                    batch_size=8, block_size=64, train_rounds=3, link_size="10M", link_rates=[100e6], link_rounds=2),
    "full": dict(sizes=["0.1M", "0.8M", "2.8M", "10M", "38M", "85M"], sync_rounds=9, train_size="0.8M", steps=512,
                 sync_every=32, batch_size=16, block_size=128, train_rounds=3, link_size="10M",
                 link_rates=[100e6, 1e9], link_rounds=3),
}
#: Implementations of the sync, by mode; the first of each list is ours.
SYNC_IMPLS = {"average": ["ours_engine", "torch_averager", "accelerate", "torchft_localsgd"],
              "diloco": ["ours_engine_diloco", "torchft_diloco"], "compressed": ["ours_engine_int8", "ours_engine_int4"]}
TRAIN_RUNS = [("ours_lightning", "average"), ("ours_engine", "average"), ("torch_averager", "average"),
              ("accelerate", "average"), ("torchft_localsgd", "average"),
              ("ours_lightning", "diloco"), ("ours_engine", "diloco"), ("torchft_diloco", "diloco")]
LABELS = {"ours_lightning": "ours (Lightning)", "ours_engine": "ours (engine)", "ours_engine_diloco": "ours (engine)",
          "ours_engine_int8": "ours (engine, int8)", "ours_engine_int4": "ours (engine, int4)",
          "torch_averager": "torch PeriodicModelAverager", "accelerate": "accelerate LocalSGD",
          "torchft_localsgd": "torchft LocalSGD", "torchft_diloco": "torchft DiLoCo"}
DILOCO = dict(lr=0.7, momentum=0.9, nesterov=True)
SEED = 1234
WORLD = 2


# ====================================================================================================== launching
def launch_job(job: dict, prefix: list[str] | None = None, timeout: float = 600) -> list[dict]:
    """Run ``job`` on WORLD ranks (through ``--launch`` in one process, optionally inside ``prefix``, e.g. a network
    namespace); the ranks' results, by rank."""
    with tempfile.TemporaryDirectory(prefix="lsgd_peers_") as tmp:
        path = Path(tmp) / "job.json"
        path.write_text(json.dumps({**job, "tmp": tmp}))
        cmd = list(prefix or []) + [sys.executable, str(HERE), "--launch", str(path)]
        try:
            proc = subprocess.run(cmd, env=h.worker_env(), cwd=str(h.ROOT), stdout=subprocess.PIPE, check=False,
                                  stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"job {job['kind']}/{job.get('peer')} timed out after {timeout} s") from err
        outs = [Path(tmp) / f"rank{r}.json" for r in range(WORLD)]
        if proc.returncode or not outs[0].exists():
            tail = proc.stdout.decode(errors="replace")[-4000:]
            raise RuntimeError(f"job {job['kind']}/{job.get('peer')} failed (exit {proc.returncode}):\n{tail}")
        return [json.loads(p.read_text()) if p.exists() else {} for p in outs]


def launcher(job_path: str) -> None:
    """Start the lighthouse (torchft jobs) and the ranks; wait for them within the job's time bound."""
    job = json.loads(Path(job_path).read_text())
    job["master_port"] = h.free_port()
    server = None
    if job.get("torchft"):
        from torchft._torchft import LighthouseServer

        server = LighthouseServer(bind="[::]:0", min_replicas=job.get("min_replicas", WORLD),
                                  join_timeout_ms=job.get("join_timeout_ms", 10000),
                                  quorum_tick_ms=job.get("quorum_tick_ms", 10),
                                  heartbeat_timeout_ms=job.get("heartbeat_timeout_ms", 1000))
        job["lighthouse"] = f"http://127.0.0.1:{server.address().rsplit(':', 1)[-1]}"
    Path(job_path).write_text(json.dumps(job))
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "NODE_RANK": "0",
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(job["master_port"])}
        procs.append(subprocess.Popen([sys.executable, str(HERE), "--rank-worker", job_path], env=env))
    deadline = time.time() + job.get("timeout", 500)
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    if server is not None:
        server.shutdown()
    sys.exit(codes[0])


# ====================================================================================================== rank side
COUNT = {"on": False, "bytes": 0, "calls": 0}


def _count(nbytes: int) -> None:
    if COUNT["on"]:
        COUNT["bytes"] += nbytes
        COUNT["calls"] += 1


def install_counters() -> None:
    """Count every torch.distributed collective's payload (bytes of the tensor handed in) while COUNT['on']."""
    import torch.distributed as dist

    def wrap(name: str, size: Callable[..., int]) -> None:
        original = getattr(dist, name)

        def counted(*a: Any, **k: Any) -> Any:
            _count(size(*a, **k))
            return original(*a, **k)

        setattr(dist, name, counted)

    nbytes = lambda t, *a, **k: t.numel() * t.element_size()
    wrap("all_reduce", nbytes)
    wrap("broadcast", nbytes)
    wrap("barrier", lambda *a, **k: 0)
    wrap("all_to_all_single", lambda out, inp, *a, **k: inp.numel() * inp.element_size())
    wrap("all_gather_into_tensor", lambda out, inp, *a, **k: inp.numel() * inp.element_size())


def count_manager(manager: Any) -> None:
    """Count torchft's managed all-reduces, and time its quorums (``manager.quorum_seconds``)."""
    allreduce, start_quorum = manager.allreduce, manager.start_quorum
    manager.quorum_seconds = 0.0

    def counted(tensor: Any, *a: Any, **k: Any) -> Any:
        _count(tensor.numel() * tensor.element_size())
        return allreduce(tensor, *a, **k)

    def timed_quorum(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return start_quorum(*a, **k)
        finally:
            manager.quorum_seconds += time.perf_counter() - t0

    manager.allreduce, manager.start_quorum = counted, timed_quorum


def rss_mb() -> float:
    """Current resident set size (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensor_bytes(tensors: Any) -> int:
    import torch

    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def make_model(job: dict, size: str | None = None) -> Any:
    """The example GPT, seeded, its modules built (same initial weights on every rank and for every peer)."""
    import torch
    from lightning_localsgd.examples.gpt import GPT

    torch.manual_seed(job["seed"])
    model = GPT(block_size=job["block_size"], learning_rate=job.get("learning_rate", 2e-3),
                warmup_steps=job.get("warmup", 8), max_steps=job["steps"], **SIZES[size or job["size"]])
    model.configure_model()
    return model


def make_batches(job: dict, rank: int, steps: int) -> list:
    """This rank's ``steps`` batches in order: a DistributedSampler (seeded) over the builtin corpus's windows."""
    import torch
    from lightning_localsgd.examples.data import TextDataModule
    from torch.utils.data import DistributedSampler

    need = steps * job["batch_size"] * WORLD * job["block_size"]  # one epoch must hold every rank's batches
    dm = TextDataModule(block_size=job["block_size"], batch_size=job["batch_size"],
                        max_tokens=max(1_000_000, int(1.2 * need)), seed=job["seed"])
    dm.setup("fit")
    ds = dm.train_dataset
    sampler = DistributedSampler(ds, num_replicas=WORLD, rank=rank, shuffle=True, seed=job["seed"])
    idx = list(iter(sampler))
    b = job["batch_size"]
    out = []
    for s in range(steps):
        items = [ds[i] for i in idx[s * b:(s + 1) * b]]
        out.append((torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])))
    return out


def optimizers(model: Any) -> tuple[Any, Any]:
    """The GPT's own AdamW and warm-up + cosine LambdaLR (its ``configure_optimizers``)."""
    cfg = model.configure_optimizers()
    return cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]


def flat_params(model: Any) -> Any:
    import torch

    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def torchft_manager(job: dict, rank: int, min_replicas: int | None = None, state: Any = None) -> Any:
    """A torchft Manager for this process (its own replica group of one rank), as federation.py starts it."""
    from datetime import timedelta

    import torch.distributed as dist
    from torchft import Manager, ProcessGroupGloo

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    timeout = timedelta(seconds=job.get("torchft_timeout", 60))
    get, put = state or (dict, lambda sd: None)
    manager = Manager(pg=ProcessGroupGloo(timeout=timeout), load_state_dict=put, state_dict=get,
                      min_replica_size=min_replicas or WORLD, use_async_quorum=False, timeout=timeout,
                      quorum_timeout=timeout, connect_timeout=timeout, rank=0, world_size=1,
                      store_addr="127.0.0.1", store_port=store.port, lighthouse_addr=job["lighthouse"],
                      replica_id=f"peer{rank}_{job.get('tag', '')}", hostname="127.0.0.1", init_sync=False)
    manager._bench_store = store  # keep the store alive
    count_manager(manager)
    return manager


def forget_diloco(manager: Any) -> None:
    """Unregister a previous DiLoCo's state functions from ``manager``: torchft allows one DiLoCo per Manager (its
    ``register_state_dict_fn`` asserts the key is new), and the benchmark builds several in one process."""
    for d in (manager._load_state_dict_fns, manager._user_state_dicts):
        for key in [k for k in d if k.startswith("StreamingDiLoCoFragment_")]:
            del d[key]


def init_default_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=WORLD)


# ------------------------------------------------------------------------------------------------------ part 1: sync
class SyncImpl:
    """One implementation's sync on its own copy of the model: ``run()`` syncs once; bytes / state counted."""

    def __init__(self, name: str, model: Any, run: Callable[[], Any], state: Callable[[], int], where: str,
                 manager: Any = None) -> None:
        self.name, self.model, self.run, self.state, self.where, self.manager = name, model, run, state, where, manager


def build_sync_impl(name: str, job: dict, size: str, acc: Any, manager: Any) -> SyncImpl:
    import torch

    from lightning_localsgd.engine.outer import OuterSync
    from lightning_localsgd.engine.presets import resolve_outer_optimizer

    model = make_model(job, size)
    params = list(model.parameters())
    if name.startswith("ours_engine"):
        outer = resolve_outer_optimizer("diloco") if name == "ours_engine_diloco" else None
        codec = name.rsplit("_", 1)[1] if name[-4:] in ("int8", "int4") else None
        engine = OuterSync(params, outer_optimizer=outer, compression=codec)
        impl = SyncImpl(name, model, engine.sync, lambda: engine.state_bytes, "parameters' device (cpu)")
        impl.engine = engine
        return impl
    if name == "torch_averager":
        from torch.distributed.algorithms.model_averaging.averagers import (
            PeriodicModelAverager,
        )

        averager = PeriodicModelAverager(period=1, warmup_steps=0)
        for p in params:  # it averages only the parameters that have a .grad (as after a backward)
            p.grad = torch.zeros_like(p)
        return SyncImpl(name, model, lambda: averager.average_parameters(model.parameters()), lambda: 0, "none")
    if name == "accelerate":
        from accelerate.local_sgd import LocalSGD

        wrapped = acc.prepare(model)
        local = LocalSGD(accelerator=acc, model=wrapped, local_sgd_steps=1)
        return SyncImpl(name, model, local.step, lambda: 0, "none")
    if name == "torchft_localsgd":
        from torchft.local_sgd import LocalSGD

        local = LocalSGD(manager, model, torch.optim.SGD(params, lr=0.0), sync_every=1)
        return SyncImpl(name, model, local.sync, lambda: 0, "none", manager)
    if name == "torchft_diloco":
        from torchft.local_sgd import DiLoCo

        inner = torch.optim.SGD(params, lr=0.0)
        outer = torch.optim.SGD(params, **DILOCO)
        forget_diloco(manager)
        diloco = DiLoCo(manager, [model], inner, outer, sync_every=1)

        def run() -> None:
            with diloco:  # its own path: the inner optimizer's step hook syncs every sync_every steps
                inner.step()

        def state() -> int:
            frags = diloco._fragments
            backup = sum(tensor_bytes(f.original_parameters.values()) for f in frags)
            return backup + sum(tensor_bytes(st.values()) for st in outer.state.values())

        return SyncImpl(name, model, run, state, "backup: cpu; momentum: parameters' device", manager)
    raise ValueError(name)


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
    from accelerate import Accelerator

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)  # initializes the default (gloo) process group from the environment
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


# ------------------------------------------------------------------------------------------------------ part 2: train
def peak_rss_reset() -> None:
    """Reset this process's peak RSS (VmHWM) to the current RSS (Linux ≥ 4.0: ``5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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
            sub = {**job, "peer": peer, "mode": mode, "params_out": str(Path(job["params_dir"], f"{peer}:{mode}.r{r}.pt"))}
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


def train_lightning(job: dict, rank: int, batches: list) -> dict:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, IterableDataset

    from lightning_localsgd import LocalSGDStrategy

    class Fixed(IterableDataset):
        def __init__(self, items: list) -> None:
            self.items = items

        def __iter__(self) -> Any:
            return iter(self.items)

    class Clock(Callback):
        def __init__(self) -> None:
            self.t0: float | None = None
            self.t1 = 0.0
            self.losses: list[float] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.t0 is None:
                self.t0 = time.perf_counter()
                COUNT.update(on=True, bytes=0, calls=0)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.t1 = time.perf_counter()
            self.losses.append(float(outputs["loss"]))

    model = make_model(job)
    strategy = LocalSGDStrategy(sync_every=job["sync_every"], outer_optimizer=job["mode"],
                                process_group_backend="gloo", **job.get("strategy", {}))
    clock = Clock()
    trainer = L.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, max_steps=job["steps"], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=[clock])
    trainer.fit(model, DataLoader(Fixed(batches), batch_size=None))
    COUNT["on"] = False
    if rank == 0:
        torch.save(flat_params(model), job["params_out"])
    s = trainer.strategy
    return dict(train_seconds=clock.t1 - clock.t0, losses=clock.losses, bytes=COUNT["bytes"], calls=COUNT["calls"],
                engine_bytes=s.outer_sync.bytes_sent, state_bytes=s.outer_sync.state_bytes,
                syncs_done=s.outer_sync.num_syncs)


def train_loop(job: dict, rank: int, batches: list) -> dict:
    """A plain training loop with the peer's sync; the same steps for every peer."""
    import torch

    peer, H = job["peer"], job["sync_every"]
    model = make_model(job)
    opt, sched = optimizers(model)
    forward, step_hook, state, ctx = model, (lambda: None), (lambda: 0), None
    manager = None
    if peer == "ours_engine":
        init_default_group()
        from lightning_localsgd.engine.outer import OuterSync
        from lightning_localsgd.engine.presets import resolve_outer_optimizer

        engine = OuterSync(list(model.parameters()),
                           outer_optimizer=resolve_outer_optimizer("diloco") if job["mode"] == "diloco" else None)
        counter = [0]

        def step_hook() -> None:
            counter[0] += 1
            if counter[0] % H == 0:
                engine.sync()

        state = lambda: engine.state_bytes
    elif peer == "torch_averager":
        init_default_group()
        from torch.distributed.algorithms.model_averaging.averagers import (
            PeriodicModelAverager,
        )
        from torch.distributed.optim import PostLocalSGDOptimizer

        opt = PostLocalSGDOptimizer(opt, PeriodicModelAverager(period=H, warmup_steps=H - 1))
    elif peer == "accelerate":
        from accelerate import Accelerator
        from accelerate.local_sgd import LocalSGD

        acc = job.get("_acc_cache", {}).get("acc") or Accelerator(cpu=True)
        job.get("_acc_cache", {})["acc"] = acc
        forward, opt = acc.prepare(model, opt)
        ctx = LocalSGD(accelerator=acc, model=forward, local_sgd_steps=H)
        step_hook = ctx.step
    elif peer in ("torchft_localsgd", "torchft_diloco"):
        init_default_group()  # only for the harness's barrier and the parameter file; torchft uses its own PG
        from torchft.local_sgd import DiLoCo, LocalSGD

        manager = job.get("_manager") or torchft_manager(job, rank)
        q0 = manager.quorum_seconds
        if peer == "torchft_localsgd":
            ctx = LocalSGD(manager, model, opt, sync_every=H)
        else:
            outer = torch.optim.SGD(model.parameters(), **DILOCO)
            forget_diloco(manager)
            ctx = DiLoCo(manager, [model], opt, outer, sync_every=H)

            def state() -> int:
                backup = sum(tensor_bytes(f.original_parameters.values()) for f in ctx._fragments)
                return backup + sum(tensor_bytes(st.values()) for st in outer.state.values())
    import torch.distributed as dist

    if not dist.is_initialized():
        init_default_group()
    losses: list[float] = []
    dist.barrier()
    COUNT.update(on=True, bytes=0, calls=0)
    t0 = time.perf_counter()
    if ctx is not None:
        ctx.__enter__()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        _, loss = forward(x, y)
        loss.backward()
        opt.step()
        sched.step()
        step_hook()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    COUNT["on"] = False
    if ctx is not None and peer != "accelerate":
        ctx.__exit__(None, None, None)
    # accelerate's LocalSGD averages once more in __exit__ (its context's end): outside the clock, not counted
    if rank == 0:
        torch.save(flat_params(model), job["params_out"])
    out = dict(train_seconds=seconds, losses=losses, bytes=COUNT["bytes"], calls=COUNT["calls"], state_bytes=state())
    if manager is not None:
        out["quorum_seconds"] = manager.quorum_seconds - q0
        if "_manager" not in job:
            manager.shutdown(wait=False)
    return out


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


# ====================================================================================================== entry points
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


# ------------------------------------------------------------------------------------------------------ part 4: features
FEATURES = ["DiLoCo outer step", "exact resume mid-interval", "synchronous warm-up", "compressed sync on CPU",
            "streaming (fragments)", "token-weighted mean (uneven workers)", "dead-peer handling", "FSDP groups"]
FEATURE_PEERS = ["ours", "torch_averager", "accelerate", "torchft"]


def _max_diff(a: Any, b: Any) -> float:
    return float((a - b).abs().max())


def _all_equal_across_ranks(model: Any) -> bool:
    """Whether every rank holds the same parameters (max and min of a checksum over the ranks agree)."""
    import torch
    import torch.distributed as dist

    v = flat_params(model).double().sum().reshape(1)
    lo, hi = v.clone(), v.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def _has_arg(fn: Any, *words: str) -> str | None:
    """The first parameter of ``fn`` whose name contains one of ``words`` (the peer's own API, inspected)."""
    import inspect

    for name in inspect.signature(fn).parameters:
        if any(w in name for w in words):
            return name
    return None


def _sig(fn: Any) -> str:
    import inspect

    return f"{getattr(fn, '__qualname__', fn)}{inspect.signature(fn)}".replace("self, ", "")


class PlainPeer:
    """A peer on a plain loop, built fresh (model, AdamW, schedule, the peer's wrapper) so that it can be resumed."""

    def __init__(self, kind: str, job: dict, rank: int, ctx_state: Any = None) -> None:
        import torch

        self.kind, self.job, self.rank = kind, job, rank
        self.model = make_model(job)
        self.opt, self.sched = optimizers(self.model)
        self.forward, self.hook, self.ctx = self.model, (lambda: None), None
        H = job["sync_every"]
        if kind == "torch_averager":
            from torch.distributed.algorithms.model_averaging.averagers import (
                PeriodicModelAverager,
            )
            from torch.distributed.optim import PostLocalSGDOptimizer

            self.opt = PostLocalSGDOptimizer(self.opt, PeriodicModelAverager(period=H, warmup_steps=H - 1))
        elif kind == "accelerate":
            from accelerate.local_sgd import LocalSGD

            acc = job["_acc"]
            self.forward, self.opt = acc.prepare(self.model, self.opt)
            self.ctx = LocalSGD(accelerator=acc, model=self.forward, local_sgd_steps=H)
            self.hook = self.ctx.step
        elif kind == "torchft_localsgd":
            from torchft.local_sgd import LocalSGD

            self.ctx = LocalSGD(job["_manager"], self.model, self.opt, sync_every=H)
        elif kind == "torchft_diloco":
            from torchft.local_sgd import DiLoCo

            self.outer = torch.optim.SGD(self.model.parameters(), **DILOCO)
            forget_diloco(job["_manager"])
            self.ctx = DiLoCo(job["_manager"], [self.model], self.opt, self.outer, sync_every=H)

    def train(self, batches: list) -> None:
        if self.ctx is not None:
            self.ctx.__enter__()
        try:
            for x, y in batches:
                self.opt.zero_grad(set_to_none=True)
                _, loss = self.forward(x, y)
                loss.backward()
                self.opt.step()
                self.sched.step()
                self.hook()
        finally:
            if self.ctx is not None and self.kind != "accelerate":
                self.ctx.__exit__(None, None, None)

    def state_dict(self) -> dict:
        """What the peer lets a user save: model, optimizer (torch's includes the averager's step), schedule, and
        the peer object's own ``state_dict`` where it has one."""
        import copy

        st = dict(model=self.model.state_dict(), opt=self.opt.state_dict(), sched=self.sched.state_dict())
        if self.ctx is not None and hasattr(self.ctx, "state_dict"):
            st["peer"] = self.ctx.state_dict()
        if self.kind.startswith("torchft"):
            st["manager"] = self.job["_manager"].state_dict()
        return copy.deepcopy(st)

    def load_state_dict(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        if "peer" in st:
            self.ctx.load_state_dict(st["peer"])
        if "manager" in st:
            self.job["_manager"].load_state_dict(st["manager"])


def try_resume_plain(kind: str, job: dict, rank: int, batches: list) -> tuple[str, str]:
    """Straight S steps vs. k steps, save what the peer offers, rebuild, load, S − k more (k mid-interval)."""
    S, k = job["steps"], job["resume_at"]
    straight = PlainPeer(kind, job, rank)
    straight.train(batches[:S])
    first = PlainPeer(kind, job, rank)
    first.train(batches[:k])
    saved = first.state_dict()
    second = PlainPeer(kind, job, rank)
    second.load_state_dict(saved)
    second.train(batches[k:S])
    d = _max_diff(flat_params(straight.model), flat_params(second.model))
    what = ", ".join(sorted(saved))
    if d == 0.0:
        return "yes", f"bit-identical to the straight run (saved: {what})"
    return "no", f"max |Δθ| = {d:.3g} vs the straight run after resuming at step {k} of {S} (saved: {what})"


def try_dead_peer(run_sync: Callable[[], Any], rank: int, limit: float) -> tuple[str, str]:
    """Rank 1 exits; rank 0 runs the sync: does it go on, stop with an error, or hang (past ``limit`` s)?"""
    import torch.distributed as dist

    dist.barrier()
    if rank == 1:
        sys.stdout.flush()
        os._exit(0)
    time.sleep(0.5)
    done: dict = {}

    def target() -> None:
        t0 = time.perf_counter()
        try:
            run_sync()
            done["r"] = ("yes", f"the survivor's sync returned after {time.perf_counter() - t0:.1f} s and it goes on")
        except BaseException as err:  # noqa: BLE001
            msg = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
            done["r"] = ("stops", f"{type(err).__name__} after {time.perf_counter() - t0:.1f} s: {msg}")

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(limit)
    return done.get("r", ("no", f"hangs: the survivor's sync had not returned after {limit:g} s"))


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

    if peer == "ours":
        features_ours(job, rank, batches, add)
    elif peer == "torch_averager":
        init_default_group()
        features_torch(job, rank, batches, add)
    elif peer == "accelerate":
        from accelerate import Accelerator

        job["_acc"] = Accelerator(cpu=True)
        features_accelerate(job, rank, batches, add)
    elif peer == "torchft":
        init_default_group()
        job["_manager"] = torchft_manager(job, rank, min_replicas=1)
        features_torchft(job, rank, batches, add)
    return rows


def features_ours(job: dict, rank: int, batches: list, add: Callable) -> None:
    import lightning as L
    import torch.distributed as dist
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, IterableDataset

    from lightning_localsgd import LocalSGDStrategy
    from lightning_localsgd.engine.outer import OuterSync

    S, k, H = job["steps"], job["resume_at"], job["sync_every"]

    class Fixed(IterableDataset):
        def __init__(self, items: list) -> None:
            self.items = items

        def __iter__(self) -> Any:
            return iter(self.items)

    def fit(steps: int, items: list, ckpt: str | None = None, callbacks: tuple = (), **strategy: Any) -> Any:
        model = make_model(job)
        trainer = L.Trainer(accelerator="cpu", devices=WORLD, max_steps=steps, logger=False,
                            strategy=LocalSGDStrategy(sync_every=H, outer_optimizer=job.get("mode", "diloco"),
                                                      process_group_backend="gloo", **strategy),
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                            callbacks=list(callbacks))
        trainer.fit(model, DataLoader(Fixed(items), batch_size=None), ckpt_path=ckpt)
        return trainer, model

    add("DiLoCo outer step", "ours (Lightning)",
        lambda: ("yes", "outer_optimizer=\"diloco\" (Nesterov SGD lr 0.7, momentum 0.9), or any torch optimizer"))

    def resume() -> tuple[str, str]:
        _, straight = fit(S, batches[:S])
        trainer, _ = fit(k, batches[:k], sync_on_train_end=False)
        path = str(Path(job["tmp"], "ours.ckpt"))
        trainer.save_checkpoint(path)
        _, resumed = fit(S, batches[k:S], ckpt=path)
        d = _max_diff(flat_params(straight), flat_params(resumed))
        if d == 0.0:
            return "yes", f"DiLoCo, resumed at step {k} of {S} (H = {H}) from a Lightning checkpoint: bit-identical"
        return "no", f"max |Δθ| = {d:.3g} after resuming at step {k} of {S}"

    add("exact resume mid-interval", "ours (Lightning)", resume)

    def warmup() -> tuple[str, str]:
        COUNT.update(on=True, bytes=0, calls=0)
        trainer, _model = fit(H + 2, batches[:H + 2], warmup_steps=H, sync_on_train_end=False)
        COUNT["on"] = False
        return "yes", (f"warmup_steps={H}: gradients all-reduced over all ranks for {H} steps "
                       f"(ddp_bytes_per_step {trainer.strategy.ddp_bytes_per_step:,}), then local steps")

    add("synchronous warm-up", "ours (Lightning)", warmup)
    model = make_model(job)
    base = [p.detach().clone() for p in model.parameters()]

    def perturbed() -> list:
        out = [b.clone() for b in base]
        for t in out:
            t.add_(1e-2 * (rank + 1))
        return out

    def compressed() -> tuple[str, str]:
        res = {}
        for codec in ("int8", "int4"):
            tensors = perturbed()
            engine = OuterSync(tensors, outer_optimizer=None, compression=codec)
            res[codec] = engine.sync().bytes_sent
        fp32 = sum(b.numel() for b in base) * 4
        return "yes", ", ".join(f"{c}: {b:,} bytes per sync ({b / fp32:.3f} of fp32)" for c, b in res.items()) + \
            " on CPU, error feedback"

    add("compressed sync on CPU", "ours (engine)", compressed)

    def streaming() -> tuple[str, str]:
        tensors = perturbed()
        engine = OuterSync(tensors, outer_optimizer=None, fragments=2)
        for f in range(2):
            engine.start_sync(f)
            engine.finish_sync(f)
        return "yes", f"fragments=2: synced one fragment at a time ({engine.bytes_sent:,} bytes in all)"

    add("streaming (fragments)", "ours (engine)", streaming)

    def weighted() -> tuple[str, str]:
        tensors = perturbed()
        w = float(rank + 1)
        engine = OuterSync(tensors, outer_optimizer=None)
        engine.sync(weight=w)
        # the weighted mean by hand: (1·θ_0 + 2·θ_1) / 3 with θ_r = base + 0.01 (r + 1)
        want = [b + 1e-2 * (1 * 1 + 2 * 2) / 3 for b in base]
        d = max(_max_diff(t, e) for t, e in zip(tensors, want))
        return ("yes" if d < 1e-6 else "no"), f"sync(weight=tokens): max error vs the weighted mean by hand {d:.2g}"

    add("token-weighted mean (uneven workers)", "ours (engine)", weighted)
    add("FSDP groups", "ours", lambda: ("not tried", ("too slow for the default here; benchmarks/fsdp_shards/ runs "
                                                     "it (FSDP2 on CPU)")))

    class Die(Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_rank == 1 and batch_idx == H + 1:
                sys.stdout.flush()
                os._exit(0)

    def dead() -> tuple[str, str]:
        t0 = time.perf_counter()
        try:
            fit(2 * H, batches[:2 * H], callbacks=(Die(),), sync_timeout=job["dead_timeout"])
        except BaseException as err:  # noqa: BLE001
            msg = str(err).strip().splitlines()[0][:160]
            return "stops", f"{type(err).__name__} after {time.perf_counter() - t0:.1f} s: {msg}"
        return "yes", "training went on"

    dist.barrier() if dist.is_initialized() else None
    add("dead-peer handling", f"ours (Lightning, one world, sync_timeout={job['dead_timeout']:g})",
        lambda: _bounded_try(dead, job["dead_limit"]))


def _bounded_try(fn: Callable[[], tuple[str, str]], limit: float) -> tuple[str, str]:
    done: dict = {}
    th = threading.Thread(target=lambda: done.setdefault("r", fn()), daemon=True)
    th.start()
    th.join(limit)
    return done.get("r", ("no", f"hangs: not returned after {limit:g} s"))


def features_torch(job: dict, rank: int, batches: list, add: Callable) -> None:
    import torch
    from torch.distributed.algorithms.model_averaging.averagers import (
        PeriodicModelAverager,
    )
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    H = job["sync_every"]
    name = "torch PeriodicModelAverager"
    add("DiLoCo outer step", name, lambda: ("no", (f"no outer optimizer: {_sig(PeriodicModelAverager.__init__)} "
                                                  "averages parameters")))
    add("exact resume mid-interval", name, lambda: try_resume_plain("torch_averager", job, 0, batches))

    def warmup() -> tuple[str, str]:
        import torch.distributed as dist
        from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
            PostLocalSGDState,
            post_localSGD_hook,
        )
        from torch.distributed.optim import PostLocalSGDOptimizer

        def run(subgroup: Any) -> bool:
            model = make_model(job)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            ddp.register_comm_hook(PostLocalSGDState(process_group=None, subgroup=subgroup, start_localSGD_iter=H),
                                   post_localSGD_hook)
            opt, _ = optimizers(model)
            opt = PostLocalSGDOptimizer(opt, PeriodicModelAverager(period=H, warmup_steps=H))
            equal = False
            for i, (x, y) in enumerate(batches[:H + 2]):
                opt.zero_grad()
                ddp(x, y)[1].backward()
                opt.step()
                if i == H - 1:
                    equal = _all_equal_across_ranks(model)
            return equal

        try:  # as its docs show it: subgroup=None (the intra-node subgroup)
            equal = run(None)
            how = "subgroup=None as in its docs"
        except ValueError as err:
            import torch.distributed as dist

            subgroup, _ = dist.new_subgroups(group_size=1)  # each rank alone after the warm-up: local SGD
            equal = run(subgroup)
            how = (f"its documented subgroup=None fails on CPU ({str(err).split('.')[0]}); with "
                   "subgroup=new_subgroups(group_size=1)")
        return ("yes" if equal else "no"), (f"DDP + PostLocalSGDState(start_localSGD_iter={H}) + post_localSGD_hook "
                                            f"on CPU/gloo, {how}; ranks equal after the warm-up: {equal}")

    add("synchronous warm-up", name, warmup)
    add("compressed sync on CPU", name,
        lambda: ("no", f"no codec option: {_sig(average_parameters)} all-reduces the flat parameters in their dtype"))
    add("streaming (fragments)", name,
        lambda: ("partial", "average_parameters() takes any parameter subset; no schedule or overlap of fragments"))
    add("token-weighted mean (uneven workers)", name,
        lambda: ("no", f"no weight argument: {_sig(PeriodicModelAverager.average_parameters)}"))
    add("FSDP groups", name, lambda: ("not tried", "too slow for the default here"))
    model = make_model(job)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    add("dead-peer handling", name,
        lambda: try_dead_peer(lambda: average_parameters(iter(model.parameters()), None), rank, job["dead_limit"]))


def features_accelerate(job: dict, rank: int, batches: list, add: Callable) -> None:
    from accelerate.local_sgd import LocalSGD

    name = "accelerate LocalSGD"
    init = LocalSGD.__init__
    add("DiLoCo outer step", name, lambda: ("no", f"averaging only: {_sig(init)}"))
    add("exact resume mid-interval", name, lambda: try_resume_plain("accelerate", job, rank, batches))
    arg = _has_arg(init, "warm")
    add("synchronous warm-up", name, lambda: ("yes", arg) if arg else
        ("no", f"no warm-up argument ({_sig(init)}); enabled=False + a second LocalSGD is up to the user"))
    add("compressed sync on CPU", name, lambda: ("no", f"no codec option: {_sig(init)}"))
    add("streaming (fragments)", name, lambda: ("no", f"one sync of all parameters: {_sig(init)}"))
    add("token-weighted mean (uneven workers)", name, lambda: ("no", ("accelerator.reduce(…, reduction='mean'): "
                                                                     "uniform mean, no weights")))
    add("FSDP groups", name, lambda: ("no", ("LocalSGD refuses anything but DDP / single-device (its __init__ checks "
                                            "accelerator.distributed_type)")))
    peer = PlainPeer("accelerate", job, rank)
    local = LocalSGD(accelerator=job["_acc"], model=peer.forward, local_sgd_steps=1)
    add("dead-peer handling", name, lambda: try_dead_peer(local.step, rank, job["dead_limit"]))


def features_torchft(job: dict, rank: int, batches: list, add: Callable) -> None:
    import torch
    from torchft.local_sgd import DiLoCo, LocalSGD

    manager = job["_manager"]
    add("DiLoCo outer step", "torchft DiLoCo", lambda: ("yes", ("DiLoCo(…, outer_optimizer=SGD(lr=0.7, momentum=0.9, "
                                                               "nesterov=True))")))
    add("exact resume mid-interval", "torchft LocalSGD", lambda: try_resume_plain("torchft_localsgd", job, rank,
                                                                                  batches))
    add("exact resume mid-interval", "torchft DiLoCo", lambda: try_resume_plain("torchft_diloco", job, rank, batches))
    add("synchronous warm-up", "torchft LocalSGD / DiLoCo",
        lambda: ("no", f"no warm-up argument: {_sig(LocalSGD.__init__)}; {_sig(DiLoCo.__init__)[:60]}…"))

    def quantized() -> tuple[str, str]:
        peer = PlainPeer("torchft_diloco", job, rank)
        peer.outer = torch.optim.SGD(peer.model.parameters(), **DILOCO)
        forget_diloco(manager)
        peer.ctx = DiLoCo(manager, [peer.model], peer.opt, peer.outer, sync_every=job["sync_every"],
                          should_quantize=True)
        COUNT.update(on=True, bytes=0, calls=0)
        peer.train(batches[:job["sync_every"]])
        COUNT["on"] = False
        from torchft.manager import IS_TRITON_AVAILABLE

        if not IS_TRITON_AVAILABLE:
            return "no", ("DiLoCo(should_quantize=True) ran, but torchft quantizes only with triton (not available "
                          "on this CPU machine): the sync sent fp32")
        return "yes", f"DiLoCo(should_quantize=True) synced on CPU ({COUNT['bytes']:,} bytes handed to allreduce)"

    add("compressed sync on CPU", "torchft DiLoCo", quantized)

    def streaming() -> tuple[str, str]:
        peer = PlainPeer("torchft_diloco", job, rank)
        m = peer.model
        frags = [m.transformer.h, torch.nn.ModuleList([m.transformer.wte, m.transformer.wpe, m.transformer.ln_f])]
        peer.outer = torch.optim.SGD(m.parameters(), **DILOCO)
        forget_diloco(manager)
        peer.ctx = DiLoCo(manager, frags, peer.opt, peer.outer, sync_every=job["sync_every"], fragment_sync_delay=1)
        peer.train(batches[:2 * job["sync_every"]])
        return "yes", "Streaming DiLoCo: 2 fragments, fragment_sync_delay=1 (overlap), ran on CPU"

    add("streaming (fragments)", "torchft DiLoCo", streaming)
    add("token-weighted mean (uneven workers)", "torchft LocalSGD / DiLoCo",
        lambda: ("no", f"uniform mean over the quorum: {_sig(type(manager).allreduce)}"))
    add("FSDP groups", "torchft", lambda: ("not tried", ("too slow for the default here (torchft supports DTensor "
                                                        "parameters)")))
    peer = PlainPeer("torchft_localsgd", job, rank)
    add("dead-peer handling", "torchft LocalSGD (min_replica_size=1)",
        lambda: try_dead_peer(peer.ctx.sync, rank, job["dead_limit"]))


# ====================================================================================================== driver
def build_batches(cfg: dict, path: Path) -> None:
    """Every rank's batches, once (the same for every peer and job)."""
    import torch

    job = dict(block_size=cfg["block_size"], batch_size=cfg["batch_size"], seed=SEED)
    torch.save({r: make_batches(job, r, max(cfg["steps"], 16)) for r in range(WORLD)}, path)


def common_job(cfg: dict, tmp: str) -> dict:
    return dict(seed=SEED, block_size=cfg["block_size"], batch_size=cfg["batch_size"], steps=cfg["steps"],
                sync_every=cfg["sync_every"], size=cfg["train_size"], batches=str(Path(tmp, "batches.pt")),
                quorum_tick_ms=cfg["quorum_tick_ms"], timeout=cfg["job_timeout"])


def by_impl(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in sorted(runs, key=lambda r: r["round"]):
        out.setdefault(r["impl"], []).append(r)
    return out


def sync_rows(result: dict, modes: list[str], part: str, rate: float | None = None) -> list[dict]:
    """Per size and implementation: median seconds per sync, ratio ours / it, bytes, calls, state, limit."""
    from lightning_localsgd import costmodel

    rows = []
    for size, r in result["sizes"].items():
        runs = by_impl(r["runs"])
        for mode in modes:
            names = SYNC_IMPLS[mode]
            ours = names[0] if mode != "compressed" else None
            for name in names:
                secs = [x["seconds"] for x in runs[name]]
                row = dict(part=part, size=size, params=r["params"], mode=mode, impl=name, label=LABELS[name],
                           rounds=len(secs), seconds_median=statistics.median(secs), seconds_min=min(secs),
                           seconds_max=max(secs), bytes_per_sync=runs[name][0]["bytes"],
                           calls_per_sync=runs[name][0]["calls"],
                           quorum_seconds_median=statistics.median(x["quorum_seconds"] for x in runs[name]),
                           sync_peak_rss_mb_median=statistics.median(x["peak_rss_over_start_mb"] for x in runs[name]),
                           outer_state_bytes=r["state"][name], outer_state_where=r["where"][name])
                base = ours
                if base is not None and name != base:
                    est = h.ratio_of([x["seconds"] for x in runs[base]], secs)
                    row.update(ratio_label=f"{LABELS[base]} / this", **est.row("ours_over_this"))
                if rate is not None:
                    G = WORLD
                    if name in r.get("engine_bytes_per_sync", {}) and mode == "compressed":
                        wire = 2 * (G - 1) / G * r["engine_bytes_per_sync"][name]
                    else:
                        wire = costmodel.wire_bytes("all_reduce", r["model_bytes"], G)
                    row.update(rate_mbit_s=rate / 1e6, wire_bytes=wire, limit_seconds=wire * 8 / rate)
                    row["over_limit"] = row["seconds_median"] / row["limit_seconds"]
                    row["over_limit_min"] = row["seconds_min"] / row["limit_seconds"]
                    row["over_limit_max"] = row["seconds_max"] / row["limit_seconds"]
                rows.append(row)
    return rows


def train_rows(measured: h.Interleaved, params_dir: str) -> tuple[list[dict], list[dict]]:
    """Tokens/s (ratios ours (Lightning) / each peer per round), memory, bytes; correctness vs ours (Lightning)."""
    import torch

    rows, checks = [], []
    for name in measured.rounds[0]:
        peer, mode = name.split(":")
        res = measured.results(name)
        r0 = [x[0] for x in res]
        tps = [x["tokens_per_s"] for x in r0]
        row = dict(part="train", impl=peer, mode=mode, label=LABELS[peer], rounds=len(res),
                   tokens_per_s_median=statistics.median(tps), tokens_per_s_min=min(tps), tokens_per_s_max=max(tps),
                   train_seconds_median=statistics.median(x["train_seconds"] for x in r0),
                   final_loss_rank0=r0[0]["losses"][-1], syncs=r0[0]["syncs"],
                   bytes_per_sync=r0[0]["bytes"] // max(1, r0[0]["syncs"]), calls=r0[0]["calls"],
                   outer_state_bytes=r0[0]["state_bytes"],
                   peak_rss_over_start_mb_max=max(x["peak_rss_over_start_mb"] for rnd in res for x in rnd),
                   quorum_seconds=r0[0].get("quorum_seconds", 0.0))
        ours = f"ours_lightning:{mode}"
        if name != ours:
            est = h.ratio_of([x[0]["tokens_per_s"] for x in measured.results(ours)], tps)
            row.update(ratio_label="ours (Lightning) / this", **est.row("ours_over_this"))
        rows.append(row)
    for mode in ("average", "diloco"):
        names = [n for n in measured.rounds[0] if n.endswith(":" + mode)]
        ref = f"ours_lightning:{mode}"
        a = torch.load(Path(params_dir, f"{ref}.r0.pt"))
        la = measured.results(ref)[0][0]["losses"]
        for n in names:
            for rnd in range(len(measured.rounds)):
                if n == ref and rnd == 0:
                    continue
                b = torch.load(Path(params_dir, f"{n}.r{rnd}.pt"))
                lb = measured.results(n)[rnd][0]["losses"]
                checks.append(dict(part="correctness", mode=mode, impl=n.split(":")[0], label=LABELS[n.split(":")[0]],
                                   round=rnd + 1, vs=LABELS["ours_lightning"],
                                   max_abs_param_diff=float((a - b).abs().max()),
                                   max_abs_loss_diff=max(abs(x - y) for x, y in zip(la, lb)),
                                   params=a.numel()))
    return rows, checks


def run_train(cfg: dict, tmp: str) -> tuple[list[dict], list[dict], list[dict]]:
    """Every training run in one 2-process job (imports once), rounds interleaved inside it."""
    job = {**common_job(cfg, tmp), "kind": "train", "torchft": True, "runs": TRAIN_RUNS, "rounds": cfg["train_rounds"],
           "tag": "train", "params_dir": tmp, "timeout": cfg["job_timeout"] * 3}
    t0, load = time.time(), os.getloadavg()[0]
    ranks = launch_job(job, timeout=job["timeout"] + 60)
    print(f"train: {time.time() - t0:.0f} s (load {load:.2f})", flush=True)
    measured = h.Interleaved()
    for run0, run1 in zip(ranks[0]["runs"], ranks[1]["runs"]):
        while len(measured.rounds) <= run0["round"]:
            measured.rounds.append({})
        measured.rounds[run0["round"]][run0["name"]] = h.timing.Run(
            run0["name"], run0["round"], [run0["result"], run1["result"]], run0["started"], run0["seconds"],
            run0["load"])
    rows, checks = train_rows(measured, tmp)
    rounds = [dict(part="train", round=run.round + 1, config=run.name, order=i + 1,
                   tokens_per_s=run.result[0]["tokens_per_s"], train_seconds=run.result[0]["train_seconds"],
                   load_before=run.load_before, run_seconds=run.seconds) for i, run in enumerate(measured.runs)]
    return rows, checks, rounds + [dict(part="train", load=measured.load_text())]


def run_sync(cfg: dict, tmp: str, sizes: list[str], modes: list[str], rounds: int,
             prefix: list[str] | None = None, part: str = "sync", rate: float | None = None) -> list[dict]:
    job = {**common_job(cfg, tmp), "kind": "sync", "torchft": True, "sizes": sizes, "modes": modes,
           "rounds": rounds, "tag": part}
    t0, load = time.time(), os.getloadavg()[0]
    res = launch_job(job, prefix=prefix, timeout=cfg["job_timeout"] * 3)
    print(f"{part}: {time.time() - t0:.0f} s (load {load:.2f})", flush=True)
    return sync_rows(res[0], modes, part, rate)


def run_features(cfg: dict, tmp: str) -> list[dict]:
    rows = []
    for peer in FEATURE_PEERS:
        job = {**common_job(cfg, tmp), "kind": "features", "peer": peer, "torchft": peer == "torchft",
               "min_replicas": 1, "steps": 8, "resume_at": 6, "sync_every": 4, "size": "0.1M", "mode": "diloco",
               "dead_timeout": 5.0, "dead_limit": 30.0, "tag": f"feat_{peer}", "timeout": cfg["job_timeout"] * 2}
        t0 = time.time()
        try:
            out = launch_job(job, timeout=job["timeout"] + 60)[0]
        except RuntimeError as err:
            # the dead-peer try ends the job; rank 0 wrote every row it had before
            out = []
            print(f"features {peer}: {str(err).splitlines()[0]}")
        if isinstance(out, list):
            rows += out
        print(f"features {peer}: {time.time() - t0:.0f} s", flush=True)
    return rows


def feature_matrix(rows: list[dict]) -> list[dict]:
    """One row per feature, one column per peer family: result (impl): detail."""
    cols = {"ours": "ours", "torch_averager": "torch averager", "accelerate": "accelerate", "torchft": "torchft"}
    out = []
    for feature in FEATURES:
        row = {"feature": feature}
        for peer, col in cols.items():
            cells = [f"**{r['result']}** ({r['impl']}): {r['detail']}" for r in rows
                     if r["peer"] == peer and r["feature"] == feature]
            row[col] = "<br>".join(cells) if cells else "not tried (the try did not report)"
        out.append(row)
    return out


def verdict(est_high: float, est_median: float, target: float = 1.0) -> str:
    if est_high <= target:
        return "shown"
    return "median only" if est_median <= target else "no"


def summarize(sync: list[dict], train: list[dict], link: list[dict]) -> list[dict]:
    """The targets: ours vs the fastest peer at each size (sync), in the loop (tokens/s), and vs the link limit."""
    out = []
    for mode in ("average", "diloco"):
        for size in dict.fromkeys(r["size"] for r in sync):
            rows = [r for r in sync if r["size"] == size and r["mode"] == mode]
            peers = [r for r in rows if "ours_over_this_median" in r]
            if not peers:
                continue
            fastest = min(peers, key=lambda r: r["seconds_median"])
            out.append(dict(target=f"sync time ours ≤ 1.0× the fastest peer ({mode}, {size})",
                            fastest_peer=fastest["label"], ratio=fastest["ours_over_this_median"],
                            low=fastest["ours_over_this_low"], high=fastest["ours_over_this_high"],
                            holds=verdict(fastest["ours_over_this_high"], fastest["ours_over_this_median"])))
        peers = [r for r in train if r["mode"] == mode and "ours_over_this_median" in r
                 and not r["impl"].startswith("ours")]
        if peers:
            fastest = max(peers, key=lambda r: r["tokens_per_s_median"])
            # tokens/s: ours / peer ≥ 1 is the target; "shown" when the interval's lower end is ≥ 1
            lo, med = fastest["ours_over_this_low"], fastest["ours_over_this_median"]
            out.append(dict(target=f"end-to-end tokens/s ours (Lightning) ≥ 1.0× the fastest peer's loop ({mode})",
                            fastest_peer=fastest["label"], ratio=med, low=lo, high=fastest["ours_over_this_high"],
                            holds="shown" if lo >= 1 else ("median only" if med >= 1 else "no")))
    for r in link:
        if r["impl"] == "ours_engine":
            # shown: every round within 1.2× (the limit is a constant: the rounds' min / max is the interval)
            lo, med, hi = r["over_limit_min"], r["over_limit"], r["over_limit_max"]
            out.append(dict(target=f"ours within 1.2× of the link limit ({r['size']}, {r['rate_mbit_s']:g} Mbit/s; "
                                   f"min, max over {r['rounds']} rounds)",
                            fastest_peer="", ratio=med, low=lo, high=hi,
                            holds="shown" if hi <= 1.2 else ("median only" if med <= 1.2 else "no")))
    return out


def write_outputs(cfg: dict, args: argparse.Namespace, parts: dict) -> None:
    name = args.out_name
    sync, train, checks = parts.get("sync", []), parts.get("train", []), parts.get("correctness", [])
    link, feats = parts.get("link", []), parts.get("features", [])
    targets = summarize(sync, train, link)
    for key, rows in (("sync", sync), ("train", train + checks), ("link", link or parts.get("link_note", [])),
                      ("features", feats), ("rounds", parts.get("rounds", [])), ("targets", targets)):
        if rows:
            h.write_csv(RESULTS / f"{name}_{key}.csv", rows)
    text = summary_text(cfg, args, parts, targets)
    h.write_summary(RESULTS / f"{name}.md", text, args.started,
                    " ".join(["python benchmarks/peers/peers.py", *args.argv]))
    plot(cfg, args, sync, train, link)


def fmt_ratio(r: dict, key: str = "ours_over_this") -> str:
    if f"{key}_median" not in r:
        return ""
    return (f"{r[f'{key}_median']:.3f} [{r[f'{key}_low']:.3f}, {r[f'{key}_high']:.3f}] "
            f"(min {r[f'{key}_min']:.3f}, max {r[f'{key}_max']:.3f})")


def summary_text(cfg: dict, args: argparse.Namespace, parts: dict, targets: list[dict]) -> str:
    sync, train, checks = parts.get("sync", []), parts.get("train", []), parts.get("correctness", [])
    link, feats = parts.get("link", []), parts.get("features", [])
    out = [(f"2 processes × 1 thread, gloo on 127.0.0.1; GPT, seed {SEED}, block {cfg['block_size']}, batch "
           f"{cfg['batch_size']} per rank; torchft lighthouse quorum_tick_ms {cfg['quorum_tick_ms']}. Ratios: median "
           "over interleaved rounds of the per-round ratio, [95% bootstrap interval] (min, max).\n")]
    if targets:
        out += ["## Targets\n", h.md_table([{**t, "ratio_text": (f"{t['ratio']:.3f}" + (
            f" [{t['low']:.3f}, {t['high']:.3f}]" if t["low"] != "" else ""))} for t in targets],
            [("target", "target"), ("fastest_peer", "fastest peer"), ("ratio_text", "ratio"), ("holds", "holds")]),
            ""]
    if sync:
        out += [f"## 1. Sync time per sync ({parts.get('sync_load', '')})\n",
                h.md_table([{**r, "ms": 1e3 * r["seconds_median"], "q": 1e3 * r["quorum_seconds_median"],
                             "ratio": fmt_ratio(r)} for r in sync],
                           [("size", "size"), ("params", "params"), ("mode", "mode"), ("label", "implementation"),
                            ("ms", "ms / sync (median)"), ("ratio", "ours / this"), ("bytes_per_sync", "bytes / sync"),
                            ("calls_per_sync", "collective calls"), ("q", "of which quorum ms"),
                            ("outer_state_bytes", "outer-state bytes / rank"), ("outer_state_where", "where"),
                            ("sync_peak_rss_mb_median", "peak RSS during the sync above its start, MiB")]), ""]
    if train:
        out += [(f"## 2. End-to-end training ({cfg['steps']} steps, H = {cfg['sync_every']}, size "
                f"{cfg['train_size']}; {parts.get('train_load', '')})\n"),
                h.md_table([{**r, "ratio": fmt_ratio(r)} for r in train],
                           [("mode", "mode"), ("label", "implementation"), ("tokens_per_s_median", "tokens/s"),
                            ("ratio", "ours (Lightning) / this"), ("final_loss_rank0", "last loss (rank 0)"),
                            ("bytes_per_sync", "counted bytes / sync"), ("calls", "collective calls"),
                            ("outer_state_bytes", "outer-state bytes / rank"),
                            ("peak_rss_over_start_mb_max", "peak RSS above the run's start, MiB (max rank, round)")]),
                "",
                "### Correctness: final parameters vs ours (Lightning), same mode\n",
                h.md_table(checks, [("mode", "mode"), ("label", "implementation"), ("round", "round"),
                                    ("max_abs_param_diff", "max |Δθ|"), ("max_abs_loss_diff", ("max |Δ loss| (rank 0, "
                                                                                              "every step)"))]), ""]
    if link:
        out += [f"## 3. Over the emulated link ({parts.get('link_load', '')})\n",
                h.md_table([{**r, "ms": 1e3 * r["seconds_median"], "lim": 1e3 * r["limit_seconds"],
                             "ol": f"{r['over_limit']:.3f} ({r['over_limit_min']:.3f}-{r['over_limit_max']:.3f})",
                             "wire_bytes": int(r["wire_bytes"]), "ratio": fmt_ratio(r)} for r in link],
                           [("rate_mbit_s", "Mbit/s"), ("size", "size"), ("mode", "mode"), ("label", "implementation"),
                            ("ms", "ms / sync"), ("wire_bytes", "wire bytes / rank"), ("lim", "limit ms"),
                            ("ol", "sync / limit (min-max)"), ("ratio", "ours / this")]), ""]
    elif parts.get("link_note"):
        out += ["## 3. Over the emulated link\n", parts["link_note"][0]["note"], ""]
    if feats:
        out += ["## 4. Features, tried\n", h.md_table(feature_matrix(feats), [
            ("feature", "feature"), ("ours", "ours"), ("torch averager", "torch averager"),
            ("accelerate", "accelerate"), ("torchft", "torchft")]), ""]
    return "\n".join(out)


def plot(cfg: dict, args: argparse.Namespace, sync: list[dict], train: list[dict], link: list[dict]) -> None:
    plt = h.pyplot()
    if plt is None or not sync:
        return
    fig, axes = plt.subplots(1, 3 if train else 1, figsize=(14 if train else 6, 4))
    axes = list(axes) if train else [axes]
    a = axes[0]
    for name in [n for m in ("average", "diloco") for n in SYNC_IMPLS[m]]:
        rows = [r for r in sync if r["impl"] == name]
        if rows:
            a.plot([r["params"] for r in rows], [1e3 * r["seconds_median"] for r in rows], "o-",
                   label=f"{LABELS[name]}{' (DiLoCo)' if 'diloco' in name else ''}")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("parameters")
    a.set_ylabel("ms per sync (median)")
    a.legend(fontsize=7)
    a.set_title("sync time, 2 ranks, gloo", fontsize=9)
    if train:
        b, c = axes[1], axes[2]
        labels = [f"{r['label']}\n{r['mode']}" for r in train]
        b.barh(labels, [r["tokens_per_s_median"] for r in train])
        b.set_xlabel("tokens/s (median over rounds)")
        b.tick_params(axis="y", labelsize=6)
        c.barh(labels, [r["peak_rss_over_start_mb_max"] for r in train])
        c.set_xlabel("peak RSS above the run's start, per rank (MiB)")
        c.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.out_name}.png", dpi=100)


def driver() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true")
    p.add_argument("--parts", nargs="+", default=["sync", "train", "link", "features"],
                   choices=["sync", "train", "link", "features"])
    p.add_argument("--sizes", nargs="+", choices=list(SIZES))
    p.add_argument("--sync-rounds", type=int)
    p.add_argument("--train-rounds", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--emulation", default="auto", choices=["auto", "netns", "off"],
                   help="the link part: netns + tc where possible (auto), required (netns), or not measured (off)")
    p.add_argument("--quorum-tick-ms", type=int, default=10, help="torchft lighthouse quorum tick (default 10)")
    p.add_argument("--job-timeout", type=float, default=240, help="seconds one job may take (default 240)")
    p.add_argument("--out-name", default="peers")
    p.add_argument("--profile", choices=list(SIZES), help="instead: cProfile one sync of ours (engine, averaging) at "
                   "this size on rank 0, and time it beside the torch averager's (3 syncs each); prints only")
    args = p.parse_args()
    if args.profile:
        cfg = PRESETS["default"]
        res = launch_job(dict(kind="profile", size=args.profile, seed=SEED, block_size=cfg["block_size"],
                              steps=cfg["steps"], timeout=args.job_timeout), timeout=args.job_timeout + 60)[0]
        for name, ts in res["times"].items():
            print(f"{LABELS[name]}: " + ", ".join(f"{1e3 * t:.1f}" for t in ts) + " ms per sync")
        print(res["profile"])
        return
    args.started, args.argv = time.time(), sys.argv[1:]
    cfg = dict(PRESETS["full" if args.full else "default"], quorum_tick_ms=args.quorum_tick_ms,
               job_timeout=args.job_timeout)
    for key in ("sizes", "sync_rounds", "train_rounds", "steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["steps"] % cfg["sync_every"]:
        p.error("--steps must be a multiple of H so that no peer syncs at train end")
    parts: dict = {}
    with tempfile.TemporaryDirectory(prefix="lsgd_peers_drv_") as tmp:
        build_batches(cfg, Path(tmp, "batches.pt"))
        if "sync" in args.parts:
            load0 = os.getloadavg()[0]
            parts["sync"] = run_sync(cfg, tmp, cfg["sizes"], ["average", "diloco"], cfg["sync_rounds"])
            parts["sync_load"] = f"load {load0:.1f} → {os.getloadavg()[0]:.1f}"
        if "train" in args.parts:
            parts["train"], parts["correctness"], rounds = run_train(cfg, tmp)
            parts["train_load"] = rounds.pop()["load"]
            parts["rounds"] = rounds
        if "link" in args.parts:
            ok, why = h.netns_available() if args.emulation != "off" else (False, "--emulation off")
            if args.emulation == "netns" and not ok:
                p.error(f"network namespaces / tc are not usable here ({why})")
            if ok:
                link, loads = [], []
                for rate in cfg["link_rates"]:
                    loads.append(os.getloadavg()[0])
                    link += run_sync(cfg, tmp, [cfg["link_size"]], ["average", "diloco", "compressed"],
                                     cfg["link_rounds"], prefix=h.netns_prefix(WORLD * rate), part="link", rate=rate)
                parts["link"] = link
                parts["link_load"] = (f"unshare -n + tc tbf on lo at {WORLD} × rate; latency not emulated (no netem); "
                                      f"load {min(loads):.1f}-{max(loads):.1f}")
            else:
                note = (f"NOT MEASURED: network namespaces / tc are not usable here ({why}); no link-limit figure "
                        "is computed.")
                print(note)
                parts["link_note"] = [dict(part="link", note=note)]
        if "features" in args.parts:
            parts["features"] = run_features(cfg, tmp)
    write_outputs(cfg, args, parts)
    print((RESULTS / f"{args.out_name}.md").read_text())


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--launch":
        return launcher(sys.argv[2])
    if len(sys.argv) == 3 and sys.argv[1] == "--rank-worker":
        return rank_worker(sys.argv[2])
    driver()


if __name__ == "__main__":
    main()
