"""Edge: devices of unequal speed on slow links, federated — time-based token-weighted syncs vs fixed H vs DDP.

The paper's edge question (He, Zhuang & Wu 2024, section on edge devices), asked of federated mode: four devices (one
process each) train the example GPT; their speeds are 1×, 1×, ½× and ¼× (each step is padded to ``step_seconds /
speed`` by a sleep after the backward pass, so the speeds hold on any machine whose real step is shorter); every
link is 10 Mbit/s with 50 ms one-way latency. Side by side, in one invocation:

* **DDP**: one synchronous world of the four devices over the same links (every step waits for the slowest device
  and for the gradient all-reduce);
* **federated fixed-H**: four federated jobs (``lighthouse=``), DiLoCo every ``H`` steps: the fast devices wait for
  the slow ones at every sync;
* **federated time-based + int4 + streaming**: the same jobs with ``sync_every_seconds=T`` in ``fragments`` F
  fragments (one fragment's sync every T/F seconds, in turn; each job enters it at its first step end after that
  time; the mean is weighted by the tokens each job processed since that fragment's last sync), applied
  ``overlap_steps`` of the job's own steps later, with int4 compression and error feedback;
* **federated time-based + int4**, whole-model syncs every T seconds (what streaming is compared with);
* **time-based + streaming with churn**: the streaming run, with the ½× device leaving (SIGKILL, mid-interval) every
  ``churn_every`` of its whole rounds of F fragment syncs and rejoining at once (it heals from a live peer);
* **async_sync + churn**: the whole-model ``async_sync`` run with the same device leaving (SIGKILL, mid-interval)
  every ``churn_every`` of its applied syncs and rejoining at once (it heals from a live peer), against the
  ``async_sync`` run without churn;
* **straggler, with and without async_sync**: the whole-model time-based run with ``straggler_speeds`` (three devices
  at 1×, one at ½×: chaos.py's question "goodput with a straggler", asked here because chaos.py's runs and accounting
  count syncs in steps, ``sync_every``, which ``async_sync`` refuses), synchronous and with ``async_sync``;
* on request only (``--only topk``, a partial run: its curve is printed), the whole-model time-based run with ``topk``
  (sparse, 141× fewer bytes than fp32) instead of int4.

The federated runs stop at ``seconds`` of wall clock (device 0's clock; its last sync carries the stop to the others).

Reported per run: validation loss at equal wall clock and at equal tokens, wall clock to DDP's final loss (and the
speed-up), idle fraction of the fast devices (1 − steps × nominal step time / wall clock), bytes each device put into
collectives, goodput (tokens that entered a committed sync / tokens the devices could have processed at their nominal
speeds in the run's wall clock: chaos.py's useful group-steps / paid group-steps, with each device's slot counted at
its own speed), and, for churn, the final loss against the run without it.

Links: everything runs inside one network namespace (``unshare -n``) whose loopback is shaped with a token bucket to
G × 10 Mbit/s (``tc tbf``, as ``multi_cluster.py``); ``netem`` is not available, so the workers add the latency to
each collective that spans devices (``hops × 50 ms``, ring schedule: the library's cost model), in DDP's
communication hook and in the federated communicator's collectives: a blocking collective waits for it before it is
issued, an asynchronous one completes no earlier than its real completion + the latency (the harness's
``NetworkModel``). The lighthouse's quorum RPCs are not delayed. Where namespaces / tc are not usable the benchmark
says so and falls back to sleeping ``bytes / rate`` too.

    python benchmarks/edge/edge.py            # default: GPT micro, ~9 min on 2 CPU cores
    python benchmarks/edge/edge.py --emulation sleep
    python benchmarks/edge/edge.py --only async --only async_churn --out-name edge_async   # some legs, written

Writes benchmarks/edge/results/edge.csv (one row per run), edge_curves.csv, edge_devices.csv, edge.png and edge.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]  # the shared harness is here
sys.path.insert(0, str(BENCHMARKS))

RESULTS = Path(__file__).resolve().parent / "results"

PRESETS = {
    "default": dict(size="micro", block_size=64, batch_size=8, learning_rate=2e-3, warmup=16,
                    speeds=[1.0, 1.0, 0.5, 0.25], step_seconds=0.08, rate_bit_s=10e6, latency_s=0.05,
                    ddp_steps=160, ddp_eval_every=16, fixed_sync_every=16, fixed_steps=160, sync_every_seconds=2.0,
                    seconds=75.0, compression="int4", fragments=2, overlap_steps=1, churn_every=8, churn_device=2,
                    val_windows=128, max_tokens=2_000_000, join_ms=2000, heartbeat_ms=1000, sync_timeout=120.0,
                    async_churn_every=8, straggler_speeds=[1.0, 1.0, 1.0, 0.5]),
}
# a smoke run of every leg (tests/benchmarks/test_edge.py): a few syncs each, the same code paths
PRESETS["quick"] = dict(PRESETS["default"], ddp_steps=8, ddp_eval_every=4, fixed_sync_every=4, fixed_steps=8,
                        sync_every_seconds=1.0, seconds=6.0, churn_every=2, async_churn_every=2,
                        val_windows=16)


# ---------------------------------------------------------------------------------------------------- one job
def _imports() -> None:
    """What a job imports before it trains: a warm spare does it before it is needed."""
    import lightning  # noqa: F401
    import torchft  # noqa: F401
    from lightning_localsgd.examples.gpt import GPT  # noqa: F401

    import lightning_localsgd  # noqa: F401


def _delay_torchft_collectives(latency_s: float, sleep_bytes_rate: float | None) -> None:
    """Add the emulated link's latency (and, in the software model, its transfer time) to each collective of the
    federated communicator, as the harness's ``NetworkModel`` does for torch.distributed's: a blocking collective
    waits for it before it is issued; an asynchronous one (the compressed reduce's pipelined all-to-alls and
    all-gathers, a streaming fragment's reduce) completes no earlier than its real completion + the latency, so the
    steps between its launch and its ``wait()`` hide it as they would on a real link."""
    from harness.netmodel import DelayedWork, NetworkModel
    from lightning_localsgd.federation import TorchftCommunicator

    model = NetworkModel(latency_s, sleep_bytes_rate)

    def delayed_async(work, op: str, nbytes: int, n: int, issued: float):
        delayed = DelayedWork(work, model, model.delay_for(op, nbytes, n), issued, real_bandwidth=False)
        try:  # netns: the latency runs from the real completion (the inner torchft work's future)
            work.work.get_future().then(lambda _: setattr(delayed, "_done_at", time.perf_counter()))
        except Exception:  # noqa: BLE001 (no future: completion = the time of wait())
            pass
        return delayed

    def wrap(method: str, op: str, always_async: bool = False) -> None:
        original = getattr(TorchftCommunicator, method)

        def delayed(comm, output, *args, **kwargs):
            n = comm.size
            if n <= 1:
                return original(comm, output, *args, **kwargs)
            sent = args[0] if op == "all_gather_into_tensor" else output  # an all-gather's input, as the harness counts
            nbytes = sent.numel() * sent.element_size()
            if always_async or kwargs.get("async_op"):
                issued = time.perf_counter()
                return delayed_async(original(comm, output, *args, **kwargs), op, nbytes, n, issued)
            model.delay(op, nbytes, n)
            return original(comm, output, *args, **kwargs)

        setattr(TorchftCommunicator, method, delayed)

    wrap("all_reduce", "all_reduce")
    wrap("all_to_all", "all_to_all_single")
    wrap("all_gather_async", "all_gather_into_tensor", always_async=True)  # all_gather waits on it


def worker(cfg: dict) -> None:
    """One device (federated: one job) or the DDP world (Lightning's launcher re-runs this for each rank)."""
    import lightning as L
    import torch
    import torch.distributed as dist
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy
    from lightning_localsgd.examples.data import TextDataModule
    from lightning_localsgd.examples.gpt import GPT

    from lightning_localsgd import LocalSGDStrategy

    torch.set_num_threads(1)
    ddp = cfg["mode"] == "ddp"
    emulate_bw = cfg["rate_bit_s"] if cfg["emulation"] == "sleep" else None
    if not ddp:
        _delay_torchft_collectives(cfg["latency_s"], emulate_bw)
    tokens_per_step = cfg["batch_size"] * cfg["block_size"]
    t0 = cfg["t0"]
    rec: dict = dict(name=cfg["name"], device=cfg.get("device", 0), steps=[], snapshots=[], killed=None,
                     heals=0, attempts=[], bytes_sent=0, start_t=None)
    state: dict = {}
    snap_dir = Path(cfg["snap_dir"])

    def federation(strategy):
        """The controller's transport across jobs (``None``: DDP, no local SGD)."""
        controller = getattr(strategy, "local_sgd", None)
        return controller.syncs if controller is not None and controller.syncs.across_jobs else None

    def write() -> None:
        strategy = state["trainer"].strategy
        fed = federation(strategy)
        if fed is not None:
            rec["attempts"] = [{k: v for k, v in a.items() if k != "error"} for a in fed.attempts]
            rec["heals"] = fed.healed_from_peer
        rec["bytes_sent"] = int(state["ddp"]["bytes"] if ddp else strategy.local_sgd.bytes_sent)
        Path(cfg["out"]).write_text(json.dumps(rec))

    def save_snapshot(trainer, pl_module) -> None:
        """θ_g (the engine's snapshot, what every device holds after a sync) or DDP's model, for offline evaluation."""
        if ddp:
            named = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        else:
            sync = trainer.strategy.local_sgd.outer_sync
            params = dict(pl_module.named_parameters())
            named = {state["names"][piece.index]:
                     snap.detach().clone().view_as(params[state["names"][piece.index]])
                     for piece, snap in zip(sync.layout.pieces, sync.snapshot)}
        path = snap_dir / f"{cfg['name']}_{len(rec['snapshots'])}.pt"
        torch.save(named, path)
        rec["snapshots"].append(dict(t=time.time() - t0, step=trainer.global_step, path=str(path)))

    class Edge(Callback):
        def on_fit_start(self, trainer, pl_module):
            state["trainer"] = trainer
            if not ddp and cfg["incarnation"] == 0:  # the first incarnations start together (one first quorum)
                ready = Path(cfg["snap_dir"]) / f"ready_{cfg['name']}"
                ready.touch()
                deadline = time.monotonic() + 600
                while sum(f.startswith("ready_") for f in os.listdir(cfg["snap_dir"])) < len(cfg["speeds"]):
                    assert time.monotonic() < deadline, "the other jobs did not start"
                    time.sleep(0.05)
            state["speed"] = cfg["speeds"][trainer.global_rank] if ddp else cfg["speed"]
            if ddp:
                from harness.measure import install_ddp_hook
                from harness.netmodel import NetworkModel

                state["ddp"] = {"bytes": 0, "calls": 0, "comm_seconds": 0.0}
                install_ddp_hook(trainer.strategy.model, state["ddp"], NetworkModel(cfg["latency_s"], emulate_bw),
                                 dist.all_reduce)
                # one collective per step, as in the other link benchmarks (no per-batch SIGTERM broadcast)
                trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if rec["start_t"] is None:  # after the join (and healing) of on_train_start
                rec["start_t"] = time.time() - t0
                rec["start_step"] = trainer.global_step
                fed = federation(trainer.strategy)
                if cfg.get("incarnation", 0) > 0 and fed is not None and fed.alone_at_start:
                    rec["too_late"] = True  # the others finished while it restarted: nobody to rejoin
                    write()
                    os._exit(0)
                if not ddp:  # the engine's tensors are the live parameters here (nothing in flight yet)
                    names = {id(p): n for n, p in pl_module.named_parameters()}
                    state["names"] = [names[id(t)] for t in trainer.strategy.local_sgd.outer_sync.tensors]
                if trainer.global_step == 0 and (cfg.get("snapshots") or (ddp and trainer.global_rank == 0)):
                    save_snapshot(trainer, pl_module)  # the initial model
            state["step_start"] = time.perf_counter()

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            # the device's speed: its step takes step_seconds / speed (the sync and the all-reduce come on top)
            left = state["step_start"] + cfg["step_seconds"] / state["speed"] - time.perf_counter()
            if left > 0:
                time.sleep(left)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            now = time.time() - t0
            rec["steps"].append((now, step))
            if ddp:
                if trainer.global_rank == 0 and (step % cfg["ddp_eval_every"] == 0 or step == cfg["max_steps"]):
                    save_snapshot(trainer, pl_module)
                return
            syncs = trainer.strategy.local_sgd.outer_sync.num_syncs
            if syncs != state.setdefault("syncs", syncs):  # a sync (or a fragment's) was applied at this step
                state["syncs"] = syncs
                state["syncs_here"] = state.get("syncs_here", 0) + 1
                if cfg.get("snapshots"):
                    save_snapshot(trainer, pl_module)
                if cfg.get("churn_every") and state["syncs_here"] == cfg["churn_every"] * cfg["fragments_here"]:
                    state["kill_at"] = step + 2  # mid-interval: its work since this sync is lost
            if state.get("kill_at") == step:
                rec["killed"] = dict(t=now, step=step)
                write()
                os.kill(os.getpid(), signal.SIGKILL)
            if cfg.get("stop_after") and now - rec["start_t"] >= cfg["stop_after"] and not state.get("stop"):
                state["stop"] = True
                trainer.should_stop = True  # its last sync carries the stop to the others

    data = TextDataModule(block_size=cfg["block_size"], batch_size=cfg["batch_size"], max_tokens=cfg["max_tokens"],
                          val_fraction=0.05, seed=cfg.get("device", 0))
    L.seed_everything(1234, verbose=False)  # every device of a fresh run builds the same initial model
    model = GPT(size=cfg["size"], block_size=cfg["block_size"], learning_rate=cfg["learning_rate"],
                warmup_steps=cfg["warmup"], max_steps=cfg["lr_steps"])
    if ddp:
        strategy = DDPStrategy(process_group_backend="gloo")
        devices = len(cfg["speeds"])
    else:
        timed = cfg.get("sync_every_seconds") is not None
        strategy = LocalSGDStrategy(
            sync_every=cfg["sync_every"] if not timed else 64, sync_every_seconds=cfg.get("sync_every_seconds"),
            outer_optimizer=cfg.get("outer_optimizer", "diloco"), compression=cfg.get("compression") if timed else None,
            fragments=cfg["fragments_here"], overlap_steps=cfg["overlap_here"],
            lighthouse=cfg["lighthouse"], group_id=f"device{cfg['device']}", min_groups=1,
            sync_timeout=cfg["sync_timeout"], process_group_backend="gloo", async_sync=cfg.get("async_sync", False))
        devices = 1
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, max_steps=cfg["max_steps"], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        use_distributed_sampler=ddp, callbacks=[Edge()], strategy=strategy)
    state["trainer"] = trainer
    trainer.fit(model, data)
    rec["end_t"] = time.time() - t0
    rec["global_step"] = trainer.global_step
    rec["tokens_per_step"] = tokens_per_step
    if not ddp and cfg.get("snapshots") and (not rec["snapshots"] or rec["snapshots"][-1]["step"] != trainer.global_step):
        save_snapshot(trainer, model)  # after the train-end sync
    if ddp and trainer.global_rank != 0:
        return
    write()


# ---------------------------------------------------------------------------------------------------- runs
def run_ddp(cfg: dict, run_dir: Path) -> dict:
    """The synchronous world of the four devices (Lightning's launcher starts ranks 1..3 from rank 0)."""
    import harness as h
    from harness.federated import job_env

    run_dir.mkdir(parents=True)
    job = dict(cfg, mode="ddp", name="ddp", max_steps=cfg["ddp_steps"], lr_steps=cfg["ddp_steps"], t0=time.time(),
               out=str(run_dir / "ddp.json"), snap_dir=str(run_dir))
    cfg_path = run_dir / "ddp.cfg.json"
    cfg_path.write_text(json.dumps(job))
    env = {**job_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(h.free_port())}
    proc = subprocess.run([sys.executable, __file__, "--worker", str(cfg_path)], env=env, cwd=str(BENCHMARKS.parent),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=1800)
    if proc.returncode or not Path(job["out"]).exists():
        raise RuntimeError(f"DDP failed (exit {proc.returncode}):\n{proc.stdout.decode(errors='replace')[-4000:]}")
    return dict(run="DDP", records=[json.loads(Path(job["out"]).read_text())], restarts=[], t0=job["t0"])


def run_federated(cfg: dict, run_dir: Path, label: str, timed: bool, churn: bool, streaming: bool = False,
                  async_sync: bool = False) -> dict:
    """Four federated jobs against an in-process lighthouse (at ``cfg["speeds"]``); with ``churn`` one of them leaves
    and rejoins; with ``streaming`` the syncs go fragment by fragment (``fragments``, ``overlap_steps``); with
    ``async_sync`` each sync runs beside training."""
    from harness.federated import run_jobs

    jobs = []
    for d, speed in enumerate(cfg["speeds"]):
        expected = int(cfg["seconds"] * speed / cfg["step_seconds"]) if timed else cfg["fixed_steps"]
        jobs.append(dict(
            cfg, mode="federated", name=f"device{d}_0", slot=f"device{d}", device=d, speed=speed, incarnation=0,
            sync_every=cfg["fixed_sync_every"], sync_every_seconds=cfg["sync_every_seconds"] if timed else None,
            max_steps=100 * expected if timed else cfg["fixed_steps"], lr_steps=expected, snapshots=d == 0,
            stop_after=cfg["seconds"] if timed and d == 0 else None, snap_dir=str(run_dir),
            churn_every=cfg["churn_every"] if churn and d == cfg["churn_device"] else None,
            fragments_here=cfg["fragments"] if streaming else 1, overlap_here=cfg["overlap_steps"] if streaming else 0,
            async_sync=async_sync))
    run_dir.mkdir(parents=True)

    def restart(job: dict, record: dict) -> dict | None:
        if any((run_dir / f"device{d}_0.json").exists() for d in range(len(cfg["speeds"])) if d != job["device"]):
            return None  # another device finished (they stop together): the run is over, nobody to rejoin
        n = job["incarnation"] + 1
        return dict(job, name=f"device{job['device']}_{n}", incarnation=n)

    # fixed H: the lighthouse must wait for the slowest device's whole interval, or the fast ones sync without it
    # (it then misses every sync and only heals); time-based: one slow step (the planner's derivation)
    slowest_interval_ms = 1000 * cfg["fixed_sync_every"] * cfg["step_seconds"] / min(cfg["speeds"])
    join_ms = cfg["join_ms"] if timed else max(cfg["join_ms"], int(1.5 * slowest_interval_ms))
    out = run_jobs(Path(__file__), jobs, run_dir, join_ms=join_ms, heartbeat_ms=cfg["heartbeat_ms"],
                   timeout=max(900.0, 6 * cfg["seconds"]), restart=restart,
                   wants_spare=lambda job: bool(job.get("churn_every")))
    return dict(run=label, speeds=list(cfg["speeds"]), **out)


# ---------------------------------------------------------------------------------------------------- metrics
def evaluate_snapshots(cfg: dict, runs: list[dict]) -> None:
    """Validation loss of every saved θ_g on the same held-out windows (offline: no run pays for evaluation)."""
    import torch
    from harness.measure import window_losses
    from lightning_localsgd.examples.data import TextDataModule
    from lightning_localsgd.examples.gpt import GPT

    data = TextDataModule(block_size=cfg["block_size"], batch_size=cfg["batch_size"], max_tokens=cfg["max_tokens"],
                          val_fraction=0.05, seed=0)
    data.setup("fit")
    ds = data.val_dataset
    xs, ys = zip(*(ds[i] for i in range(min(cfg["val_windows"], len(ds)))))
    x, y = torch.stack(xs), torch.stack(ys)
    model = GPT(size=cfg["size"], block_size=cfg["block_size"])
    model.configure_model()
    for run in runs:
        for rec in run["records"]:
            for snap in rec["snapshots"]:
                saved = torch.load(snap["path"])
                missing = {n for n, _ in model.named_parameters()} - set(saved)
                if missing or set(saved) - set(model.state_dict()):
                    raise RuntimeError(f"{snap['path']}: not the model's parameters (missing {sorted(missing)[:3]})")
                model.load_state_dict(saved, strict=False)  # buffers (the causal mask) are not saved
                per_window = window_losses(model, x, y)
                snap["val_loss"] = sum(per_window) / len(per_window)


def tokens_at(run: dict, cfg: dict, t: float) -> float:
    """Tokens every device has trained on by time ``t`` (each incarnation's own steps; DDP: the world's)."""
    tps = cfg["batch_size"] * cfg["block_size"]
    if run["run"] == "DDP":
        steps = max((s for tt, s in run["records"][0]["steps"] if tt <= t), default=0)
        return steps * tps * len(cfg["speeds"])
    total = 0
    for rec in run["records"]:
        done = [s for tt, s in rec["steps"] if tt <= t]
        if done:
            total += (len(done)) * tps  # steps this incarnation took (a healed one starts at the peers' step)
    return total


def curve(run: dict, cfg: dict) -> list[dict]:
    """(seconds since the run's first step, tokens, validation loss) of every evaluated θ_g, in time order."""
    first = min(rec["steps"][0][0] for rec in run["records"] if rec["steps"])
    snaps = sorted((s for rec in run["records"] for s in rec["snapshots"] if "val_loss" in s), key=lambda s: s["t"])
    return [dict(run=run["run"], seconds=max(0.0, s["t"] - first), tokens=tokens_at(run, cfg, s["t"]),
                 step=s["step"], val_loss=s["val_loss"]) for s in snaps]


def at(points: list[dict], key: str, value: float) -> float:
    """Validation loss at ``key`` = ``value`` (linear interpolation; NaN outside the curve)."""
    for a, b in zip(points, points[1:]):
        if a[key] <= value <= b[key]:
            w = 0.0 if b[key] == a[key] else (value - a[key]) / (b[key] - a[key])
            return a["val_loss"] + w * (b["val_loss"] - a["val_loss"])
    return float("nan")


def time_to(points: list[dict], target: float) -> float:
    """Seconds at which the loss first reaches ``target`` (interpolated; NaN if never)."""
    for a, b in zip(points, points[1:]):
        if b["val_loss"] <= target < a["val_loss"]:
            return a["seconds"] + (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"]) * (b["seconds"] - a["seconds"])
    return 0.0 if points and points[0]["val_loss"] <= target else float("nan")


def device_rows(run: dict, cfg: dict) -> list[dict]:
    """Per device: steps, wall clock, idle fraction (1 − steps × nominal step time / wall), bytes sent."""
    tps = cfg["batch_size"] * cfg["block_size"]
    first = min(rec["steps"][0][0] for rec in run["records"] if rec["steps"])
    last = max(rec["steps"][-1][0] for rec in run["records"] if rec["steps"])
    wall = last - first
    rows = []
    speeds = run.get("speeds", cfg["speeds"])  # the straggler legs run at their own speeds
    if run["run"] == "DDP":
        steps = run["records"][0]["global_step"]
        grad_bytes = run["records"][0]["bytes_sent"]  # rank 0's; every rank sends the same
        for d, speed in enumerate(cfg["speeds"]):
            nominal = steps * cfg["step_seconds"] / speed
            rows.append(dict(run=run["run"], device=d, speed=speed, steps=steps, wall_s=wall,
                             idle_fraction=1 - nominal / wall, bytes_sent=grad_bytes, useful_tokens=steps * tps,
                             heals=0))
        return rows
    for d, speed in enumerate(speeds):
        recs = [r for r in run["records"] if r["device"] == d]
        steps = sum(len(r["steps"]) for r in recs)
        useful = 0
        for r in recs:
            boundary = r.get("start_step") or 0
            for a in r["attempts"]:
                if a["committed"]:
                    if a["weight"] > 0:
                        useful += (a["step"] - boundary) * tps
                    boundary = a["step"]
        nominal = steps * cfg["step_seconds"] / speed
        rows.append(dict(run=run["run"], device=d, speed=speed, steps=steps, wall_s=wall,
                         idle_fraction=1 - nominal / wall, bytes_sent=sum(r["bytes_sent"] for r in recs),
                         useful_tokens=useful, heals=sum(r["heals"] for r in recs),
                         incarnations=len(recs)))
    return rows


def summarize(cfg: dict, runs: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    tps = cfg["batch_size"] * cfg["block_size"]
    curves = {r["run"]: curve(r, cfg) for r in runs}
    devices = [row for r in runs for row in device_rows(r, cfg)]
    ddp = curves.get("DDP")  # a partial run without DDP: no speed-up
    target = ddp[-1]["val_loss"] if ddp else float("nan")
    t_ddp = time_to(ddp, target) if ddp else float("nan")
    equal_t = min(c[-1]["seconds"] for c in curves.values())
    equal_tokens = min(c[-1]["tokens"] for c in curves.values())
    rows = []
    for r in runs:
        c, mine = curves[r["run"]], [d for d in devices if d["run"] == r["run"]]
        wall = mine[0]["wall_s"]
        could = sum(wall / (cfg["step_seconds"] / d["speed"]) * tps for d in mine)
        t_target = time_to(c, target)
        rows.append(dict(
            run=r["run"], wall_s=wall, final_val_loss=c[-1]["val_loss"], tokens=c[-1]["tokens"],
            loss_at_equal_seconds=at(c, "seconds", equal_t), loss_at_equal_tokens=at(c, "tokens", equal_tokens),
            seconds_to_ddp_final_loss=t_target, speedup_vs_ddp=t_ddp / t_target if t_target == t_target else float("nan"),
            fast_idle_fraction=sum(d["idle_fraction"] for d in mine if d["speed"] == 1.0)
            / max(1, sum(d["speed"] == 1.0 for d in mine)),
            bytes_per_device=sum(d["bytes_sent"] for d in mine) / len(mine),
            goodput=sum(d["useful_tokens"] for d in mine) / could, restarts=len(r["restarts"]),
            heals=sum(d.get("heals", 0) for d in mine)))
    flat = [p for c in curves.values() for p in c]
    return rows, devices, flat


def plot(rows: list[dict], curves: list[dict], devices: list[dict], out_name: str) -> None:
    """Loss over wall clock and over tokens (one legend for both, above them) and every device's idle fraction per run
    (horizontal bars: the run names are the y labels)."""
    import harness as h

    plt = h.pyplot()
    if plt is None:
        return
    names = [r["run"] for r in rows]
    fig = plt.figure(figsize=(13, 9), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.15, 0.85])
    for i, key in enumerate(("seconds", "tokens")):
        ax = top.add_subplot(1, 2, i + 1)
        for name in names:
            c = [p for p in curves if p["run"] == name]
            ax.plot([float(p[key]) for p in c], [float(p["val_loss"]) for p in c], marker=".", label=name)
        ax.set_xlabel("wall clock (s)" if key == "seconds" else "tokens (all devices)")
        ax.set_ylabel("validation loss")
        ax.set_title(f"validation loss over {'wall clock' if key == 'seconds' else 'tokens'}", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    top.legend(handles, labels, loc="outside upper center", ncol=2, fontsize=9, frameon=False)
    ax = bottom.add_subplot(1, 1, 1)
    ids = sorted({int(x["device"]) for x in devices})
    width = 0.8 / len(ids)
    for j, d in enumerate(ids):
        idle = [next(float(x["idle_fraction"]) for x in devices if x["run"] == n and int(x["device"]) == d)
                for n in names]
        speeds = dict.fromkeys(f"{float(x['speed']):g}" for x in devices if int(x["device"]) == d)  # per run
        ax.barh([i - 0.4 + width * (j + 0.5) for i in range(len(names))], idle, height=width,
                label=f"device {d} (speed {' / '.join(speeds)})")
    ax.set_yticks(range(len(names)), names, fontsize=9)
    ax.invert_yaxis()  # the runs in the legend's order, top to bottom
    ax.set_xlabel("idle fraction (1 − steps × nominal step time / wall clock)")
    ax.set_xlim(0, 1)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(RESULTS / f"{out_name}.png", dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--standby", help=argparse.SUPPRESS)
    p.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--emulation", choices=("auto", "netns", "sleep"), default="auto",
                   help="netns: a shaped loopback (needs root, unshare, tc); sleep: a software model; auto: netns "
                        "where usable")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="quick: a smoke run of every leg")
    p.add_argument("--only", choices=("ddp", "fixed", "timed", "whole", "async", "churn", "async_churn", "straggler",
                                       "straggler_async", "topk", "topk_recipe"), action="append",
                   help="run only these legs (repeatable; topk and topk_recipe run only when named); a partial run "
                        "prints its curves and writes results only under an explicit --out-name")
    p.add_argument("--seconds", type=float, help="wall clock of each time-based run (default 75)")
    p.add_argument("--keep", help="keep the jobs' logs, records and snapshots in this folder")
    p.add_argument("--out-name", help="file names under benchmarks/edge/results/ (default: edge, for a full run)")
    p.add_argument("--plot-only", action="store_true", help="redraw <out-name>.png from its CSVs; runs nothing")
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(Path(args.worker).read_text()))
    if args.plot_only:
        import harness as h

        name = args.out_name or "edge"
        return plot(*(h.read_csv(RESULTS / f"{name}{part}.csv") for part in ("", "_curves", "_devices")), name)
    if args.standby:
        from harness.federated import standby

        return standby(Path(args.standby), _imports, worker)
    import harness as h

    cfg = dict(PRESETS[args.preset])
    if args.seconds is not None:
        cfg["seconds"] = args.seconds
    if not args.in_netns:
        emulation = h.choose_emulation(args.emulation, p)
        if emulation == "netns":
            cmd = h.netns_prefix(len(cfg["speeds"]) * cfg["rate_bit_s"]) + [
                sys.executable, __file__, *sys.argv[1:], "--in-netns"]
            sys.exit(subprocess.run(cmd, timeout=3600, check=False).returncode)
    cfg["emulation"] = "netns" if args.in_netns else "sleep"
    started = time.time()
    whole = f"federated time-based T={cfg['sync_every_seconds']:g}s {cfg['compression']}"
    timed = whole + f" + streaming F={cfg['fragments']} τ={cfg['overlap_steps']}"
    churn = timed + f" + churn every {cfg['churn_every']} rounds"
    async_churn = whole + f" async_sync + churn every {cfg['async_churn_every']} syncs"
    straggler = whole + " straggler " + "/".join(f"{x:g}" for x in cfg["straggler_speeds"])
    labels = {"timed": timed, "whole": whole, "churn": churn, "async": whole + " async_sync",
              "async_churn": async_churn, "straggler": straggler, "straggler_async": straggler + " async_sync"}
    legs = {"ddp": lambda w: run_ddp(cfg, w / "ddp"),
            "fixed": lambda w: run_federated(cfg, w / "fixed", f"federated fixed H={cfg['fixed_sync_every']}",
                                             False, False),
            "timed": lambda w: run_federated(cfg, w / "timed", timed, True, False, streaming=True),
            "whole": lambda w: run_federated(cfg, w / "whole", whole, True, False),
            "async": lambda w: run_federated(cfg, w / "async", whole + " async_sync", True, False, async_sync=True),
            "churn": lambda w: run_federated(cfg, w / "churn", churn, True, True, streaming=True),
            "async_churn": lambda w: run_federated(dict(cfg, churn_every=cfg["async_churn_every"]), w / "async_churn",
                                                   async_churn, True, True, async_sync=True),
            "straggler": lambda w: run_federated(dict(cfg, speeds=cfg["straggler_speeds"]), w / "straggler",
                                                 straggler, True, False),
            "straggler_async": lambda w: run_federated(dict(cfg, speeds=cfg["straggler_speeds"]),
                                                       w / "straggler_async", straggler + " async_sync", True, False,
                                                       async_sync=True)}
    extra = {"topk": lambda w: run_federated(dict(cfg, compression="topk"), w / "topk", whole.replace(
        cfg["compression"], "topk"), True, False),
             "topk_recipe": lambda w: run_federated(  # the sparse recipe: its codec and its own outer step
                 dict(cfg, compression="topk_recipe", outer_optimizer="topk_recipe"), w / "topk_recipe",
                 whole.replace(cfg["compression"], "topk_recipe"), True, False)}
    chosen = args.only or list(legs)
    with tempfile.TemporaryDirectory(prefix="lsgd_edge_") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        runs = []
        for leg in chosen:
            runs.append({**legs, **extra}[leg](work))
            print(f"{runs[-1]['run']}: done ({time.time() - started:.0f} s since the start)", flush=True)
        evaluate_snapshots(cfg, runs)
    partial = set(chosen) != set(legs)
    if partial:  # the curves; written only under an explicit --out-name
        for run in runs:
            print(run["run"], [(round(p["seconds"], 1), p["tokens"], round(p["val_loss"], 4)) for p in curve(run, cfg)])
        if args.out_name is None:
            return
    rows, devices, curves = summarize(cfg, runs)
    relative_losses(rows, labels)
    by_name = {r["run"]: r for r in rows}
    name = args.out_name or "edge"
    h.write_csv(RESULTS / f"{name}.csv", rows)
    h.write_csv(RESULTS / f"{name}_devices.csv", devices)
    h.write_csv(RESULTS / f"{name}_curves.csv", curves)
    plot(rows, curves, devices, name)
    link = ("inside a network namespace whose loopback is shaped to 4 × 10 Mbit/s (tc tbf), 50 ms slept per hop"
            if cfg["emulation"] == "netns" else "software model: bytes / 10 Mbit/s + 50 ms per hop slept per collective")
    text = (("Partial run (legs: " + ", ".join(chosen) + "). " if partial else "")
            + f"GPT `{cfg['size']}`, 4 devices of speed {cfg['speeds']} (a 1× step padded to "
            f"{cfg['step_seconds']} s), "
            f"batch {cfg['batch_size']} × {cfg['block_size']} tokens per device and step, AdamW lr "
            f"{cfg['learning_rate']:g}; {link}. DDP: {cfg['ddp_steps']} steps. Federated: DiLoCo (Nesterov lr 0.7, "
            f"momentum 0.9), lighthouse in-process (join {cfg['join_ms']} ms for time-based, 1.5 × the slowest device's "
            f"interval for fixed H, heartbeat {cfg['heartbeat_ms']} ms); "
            f"fixed H={cfg['fixed_sync_every']} for {cfg['fixed_steps']} steps; time-based T="
            f"{cfg['sync_every_seconds']:g} s for {cfg['seconds']:g} s, {cfg['compression']} with error feedback, "
            f"streaming: {cfg['fragments']} fragments in turn (one every {cfg['sync_every_seconds'] / cfg['fragments']:g} "
            f"s), applied {cfg['overlap_steps']} step(s) later, and without streaming (whole model), the latter also "
            "with async_sync=True (each sync beside training, applied by the one-step-delayed rule); churn (streaming "
            f"run): device {cfg['churn_device']} leaves every {cfg['churn_every']} of its rounds of fragment syncs and "
            f"rejoins at once; async churn: the same device leaves the async_sync run every {cfg['async_churn_every']} "
            f"of its syncs; straggler: the whole-model run at speeds {cfg['straggler_speeds']}, without and with "
            "async_sync.\n\n"
            + h.md_table(rows, [("run", "run"), ("wall_s", "wall s"), ("final_val_loss", "final val loss"),
                                ("loss_at_equal_seconds", "loss at equal wall clock"),
                                ("loss_at_equal_tokens", "loss at equal tokens"),
                                ("seconds_to_ddp_final_loss", "s to DDP's final loss"),
                                ("speedup_vs_ddp", "speed-up vs DDP"), ("fast_idle_fraction", "fast devices idle"),
                                ("bytes_per_device", "bytes / device"), ("goodput", "goodput"),
                                ("restarts", "restarts"), ("final_loss_vs_twin", "loss / twin run")])
            + "\n\nTargets: " + " ".join(targets(by_name, labels))
            + "\n\nPer device:\n\n"
            + h.md_table(devices, [("run", "run"), ("device", "device"), ("speed", "speed"), ("steps", "steps"),
                                   ("idle_fraction", "idle"), ("bytes_sent", "bytes sent"),
                                   ("useful_tokens", "useful tokens"), ("heals", "heals")])
            + "\n")
    print(text)
    shown = [a for a in sys.argv[1:] if a != "--in-netns"]
    if args.keep:
        shown = [a for a in shown if a not in ("--keep", args.keep)]
    h.write_summary(RESULTS / f"{name}.md", text, started,
                    "python benchmarks/edge/edge.py" + (" " + " ".join(shown) if shown else ""))


def relative_losses(rows: list[dict], labels: dict[str, str]) -> None:
    """Each row's final loss against the streaming run (``final_loss_vs_time_based``), the synchronous whole-model run
    (``..._whole``) and its twin (``final_loss_vs_twin``: a churn run against the same run without churn, the async
    straggler run against the synchronous one); NaN where that run did not run."""
    by_name = {r["run"]: r for r in rows}
    twins = {labels["churn"]: labels["timed"], labels["async_churn"]: labels["async"],
             labels["straggler_async"]: labels["straggler"]}
    for r in rows:
        for key, base in (("final_loss_vs_time_based", labels["timed"]),
                          ("final_loss_vs_time_based_whole", labels["whole"]),
                          ("final_loss_vs_twin", twins.get(r["run"]))):
            r[key] = r["final_val_loss"] / by_name[base]["final_val_loss"] if base in by_name else float("nan")


def met(ok: bool) -> str:
    return "met" if ok else "missed"


def targets(by_name: dict[str, dict], labels: dict[str, str]) -> list[str]:
    """One sentence per target whose runs ran (issue 33's targets; the rows by run name, ``labels`` by leg)."""
    row = {leg: by_name.get(label) for leg, label in labels.items()}
    out = []
    if row["timed"] is not None:
        r = row["timed"]
        out.append(f"Streaming (synchronous): DDP's final loss {r['speedup_vs_ddp']:.2f}× sooner "
                   f"(≥ 5×: {met(r['speedup_vs_ddp'] >= 5)}), fast devices idle {r['fast_idle_fraction']:.1%} "
                   f"(≤ 10%: {met(r['fast_idle_fraction'] <= 0.10)}).")
    if row["whole"] is not None:
        r = row["whole"]
        out.append(f"Whole model, synchronous: {r['speedup_vs_ddp']:.2f}×, {r['fast_idle_fraction']:.1%} idle.")
    churn_cost = "{} costs {:+.1%} final loss against the same run without it (≤ 2%: {})."
    if row["churn"] is not None:
        r = row["churn"]
        out.append(churn_cost.format("Churn (streaming, synchronous)", r["final_loss_vs_twin"] - 1,
                                     met(r["final_loss_vs_twin"] <= 1.02)))
    if row["async"] is not None:
        r = row["async"]
        ratio = r["final_loss_vs_time_based_whole"]
        out.append("async_sync (whole model): "
                   + ("" if math.isnan(r["speedup_vs_ddp"]) else
                      f"{r['speedup_vs_ddp']:.2f}× sooner than DDP ({met(r['speedup_vs_ddp'] >= 5)}), ")
                   + f"fast devices idle {r['fast_idle_fraction']:.1%} ({met(r['fast_idle_fraction'] <= 0.10)})"
                   + ("" if math.isnan(ratio) else f", final loss {ratio - 1:+.1%} against the synchronous "
                      f"whole-model run (at most +2%: {met(ratio <= 1.02)})") + ".")
    if row["async_churn"] is not None:
        r = row["async_churn"]
        out.append(churn_cost.format("async_sync with churn", r["final_loss_vs_twin"] - 1,
                                     met(r["final_loss_vs_twin"] <= 1.02))[:-1] + f"; goodput {r['goodput']:.3f}.")
    if row["straggler_async"] is not None:
        r, sync = row["straggler_async"], row["straggler"]
        out.append(f"Straggler (one ½× device) with async_sync: goodput {r['goodput']:.3f} (≥ 0.95: "
                   f"{met(r['goodput'] >= 0.95)}), fast devices idle {r['fast_idle_fraction']:.1%}"
                   + ("" if sync is None else f"; synchronous: goodput {sync['goodput']:.3f}, fast devices idle "
                      f"{sync['fast_idle_fraction']:.1%}; final loss async / synchronous {r['final_loss_vs_twin']:.4f}")
                   + ".")
    if "DDP" in by_name:
        out.append(f"DDP's final loss {by_name['DDP']['final_val_loss']:.4f}.")
    return out


if __name__ == "__main__":
    main()
