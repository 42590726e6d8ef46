"""Chaos: federated worker groups (``lighthouse=``) with a group SIGKILLed every k syncs and restarted (it heals).

Three jobs (one process each: a "cluster"), each one federated worker group of the example GPT with DiLoCo (AdamW
inside, the library's Nesterov preset outside), meet at syncs through torchft's lighthouse (in this process). A
seeded schedule kills one group every ``k`` syncs (``--kill-every``), the victims taking turns in a seeded order,
either *mid-interval* (at a seeded step inside the interval after that sync) or *inside the sync* (in its cross-group
all-reduce, after the quorum of the attempt formed, so the survivors' attempt fails and they redo it); a killed job
self-kills at that step, so the run is reproducible. The driver restarts a killed job at once with the same
``group_id`` (from a warm spare process that has already imported torch, Lightning and torchft, ~10-25 s on 2 loaded
cores, so that the restart measures healing, not Python start-up): it heals from a live peer at the survivors' next
sync and trains on. Compared with the same run without
failures (same seeds, data orders, schedule), it reports:

* **final validation loss ratio** (chaos / uninterrupted), on the same held-out windows;
* **goodput** = useful group-steps / group-steps paid for. Paid = G × max_steps (every group's slot for the whole run,
  dead or alive); useful = the steps whose work entered a committed sync with weight 1 (from the jobs' own sync
  records). The difference is the work lost since a victim's last sync plus the steps a group skipped while it was
  down (it heals to the survivors' step);
* **stall per failure on the survivors**: how much longer the affected sync step took on the survivors than the same
  step of the uninterrupted run (from every job's per-step wall clock), against the bound *heartbeat timeout + one
  sync*; and the stall of the sync at which the restarted job heals (the survivors send it their state);
* **bytes moved by healing**: the tensors of the state a restarted job receives (inner model, AdamW state, LR
  scheduler, θ_g, outer momentum, counters), against one model copy + the outer state;
* **samples read twice and never read** (a per-sample ledger: each job records the windows of every step; a step's
  windows are *contributed* when its work entered a committed sync with weight 1): contributed more than once, and
  windows the uninterrupted run contributed that this run never did. With the data cursor (``data_jobs``: the library
  partitions one order over the jobs, a restarted job continues its share at its last committed position) against
  today's way without it, each job's shard picked by hand (a ``DistributedSampler`` of ``G`` replicas per job, so a
  restarted job starts its shard again): a third run, the same kills, hand-picked shards.

    python benchmarks/chaos/chaos.py                 # small default: micro GPT, 3 groups, H=16, 512 steps, a kill
                                                     # every 8 syncs
    python benchmarks/chaos/chaos.py --quick         # smoke run: 128 steps, a kill every 2 syncs (~1-2 min)
    python benchmarks/chaos/chaos.py --inner fsdp    # the same with FSDP2 inside each job (2 ranks per job): healing
                                                     # sends each rank its own shard; heal bytes per rank vs shard
    python benchmarks/chaos/chaos.py --link 100Mbit  # the same inside a network namespace whose loopback is shaped
                                                     # to G × 100 Mbit/s (unshare -n + tc tbf; needs root); latency
                                                     # not emulated. Where namespaces / tc are not usable it says so.

Traffic stays on 127.0.0.1. Writes benchmarks/chaos/results/chaos.csv (one row per run), chaos_events.csv (one row per
failure), chaos_curves.csv (validation loss after syncs), chaos.png and chaos.md (``--out-name`` changes the prefix).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]  # the shared harness is here
sys.path.insert(0, str(BENCHMARKS))

RESULTS = Path(__file__).resolve().parent / "results"

PRESETS = {
    "default": dict(size="micro", groups=3, steps=512, sync_every=16, kill_every=8, batch_size=8, block_size=64,
                    learning_rate=2e-3, warmup=32, max_tokens=1_000_000, val_windows=128, eval_every=128,
                    heartbeat_ms=1000, join_ms=10000, sync_timeout=120.0),
    "quick": dict(steps=128, kill_every=2),  # over the default: 8 syncs, kills at syncs 2, 4 and 6
}
LINKS = {"100Mbit": 100e6}


# ---------------------------------------------------------------------------------------------------- schedule
def kill_schedule(cfg: dict, seed: int) -> list[dict]:
    """A kill every ``kill_every`` syncs, while at least ``kill_every`` syncs remain for the restart to rejoin."""
    rng = random.Random(seed)
    H, G = cfg["sync_every"], cfg["groups"]
    total = cfg["steps"] // H
    order = list(range(G))
    rng.shuffle(order)
    kills = []
    for j, n in enumerate(range(cfg["kill_every"], total - cfg["kill_every"] + 1, cfg["kill_every"])):
        kind = rng.choice(["interval", "sync"])
        step = n * H if kind == "sync" else n * H + rng.randint(1, H - 1)
        kills.append(dict(group=order[j % G], kind=kind, step=step, sync=n))
    return kills


# ---------------------------------------------------------------------------------------------------- one job
def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested state: what healing moved (the library's own count)."""
    from lightning_localsgd.tensors import tensor_bytes

    return tensor_bytes(obj)


def _imports() -> None:
    """What a job imports (~10-25 s on 2 loaded cores): a standby process does it before it is needed."""
    import lightning  # noqa: F401
    import torch  # noqa: F401
    import torchft  # noqa: F401
    from harness.measure import window_losses  # noqa: F401
    from lightning_localsgd.examples.data import TextDataModule  # noqa: F401
    from lightning_localsgd.examples.gpt import GPT  # noqa: F401

    from lightning_localsgd.federation import Federation  # noqa: F401


def worker(cfg: dict) -> None:
    """One job = one federated worker group; writes ``cfg["out"]`` at the end or right before its self-kill."""
    import lightning as L
    import torch
    from harness.measure import window_losses
    from lightning.pytorch.callbacks import Callback
    from lightning_localsgd.examples.data import TextDataModule
    from lightning_localsgd.examples.gpt import GPT

    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from lightning_localsgd import LocalSGDFSDPStrategy, LocalSGDStrategy
    from lightning_localsgd.federation import Federation, TorchftCommunicator

    torch.set_num_threads(1)
    rank = int(os.environ.get("LOCAL_RANK", 0))  # --inner fsdp: rank 1 of the job is started by Lightning
    t0, H = cfg["t0"], cfg["sync_every"]
    rec: dict = dict(group=cfg["group"], incarnation=cfg["incarnation"], rank=rank, start_step=None, killed=None,
                     steps=[], evals=[], heals=[], attempts=[], final_loss=None, params=0, shard_params=0, ledger=[])
    kills = [k for k in cfg["kills"] if k["group"] == cfg["group"]]
    state: dict = {}

    def write() -> None:
        fed = state["trainer"].strategy.local_sgd.syncs  # the federation
        rec["attempts"] = fed.attempts
        out = cfg["out"] if rank == 0 else cfg["out"].replace(".json", f".r{rank}.json")
        Path(out).write_text(json.dumps(rec))

    def die(kill: dict) -> None:
        rec["killed"] = kill
        write()
        os.kill(os.getpid(), signal.SIGKILL)

    def due(kind: str, step: int) -> dict | None:
        start = rec["start_step"] if rec["start_step"] is not None else 0
        return next((k for k in kills if k["kind"] == kind and k["step"] == step and step > start), None)

    all_reduce = TorchftCommunicator.all_reduce

    def chaos_all_reduce(comm, tensor, op="sum", async_op=False):
        strategy = state["trainer"].strategy
        step = strategy.local_sgd.schedule.steps_done
        if strategy.local_sgd.syncs.trained and (kill := due("sync", step)) is not None:
            die(kill)  # inside the sync: the quorum of this attempt holds us, our data never goes out
        return all_reduce(comm, tensor, op, async_op)

    TorchftCommunicator.all_reduce = chaos_all_reduce
    load_state_dict = Federation.load_state_dict

    def counted_load_state_dict(fed, peer_state):
        training = peer_state["training"]  # the peer's TrainingState (state.py), its layout beside it
        sharded = training["kind"] == "sharded"  # FSDP2: model and optimizer shards are in the rank state
        holder = training["rank"] if sharded else training["group"]
        rec["heals"].append(dict(bytes=_tensor_bytes(peer_state), step=int(training["counters"]["global_step"]),
                                 t=time.time() - t0,
                                 inner_optimizer_bytes=_tensor_bytes(holder["optimizers" if sharded
                                                                            else "optimizer_states"]),
                                 module_bytes=_tensor_bytes(holder["params" if sharded else "state_dict"])))
        return load_state_dict(fed, peer_state)

    Federation.load_state_dict = counted_load_state_dict

    data = TextDataModule(block_size=cfg["block_size"], batch_size=cfg["batch_size"], max_tokens=cfg["max_tokens"],
                          val_fraction=0.05, seed=cfg["group"])

    def evaluate(model) -> float:
        if "windows" not in state:
            ds = data.val_dataset
            xs, ys = zip(*(ds[i] for i in range(min(cfg["val_windows"], len(ds)))))
            state["windows"] = torch.stack(xs), torch.stack(ys)
        per_window = window_losses(model, *state["windows"])
        model.train()
        return sum(per_window) / len(per_window)

    class Chaos(Callback):
        def on_fit_start(self, trainer, pl_module):
            state["trainer"] = trainer
            ready = Path(cfg["dir"]) / f"ready_{cfg['name']}"
            ready.touch()
            if cfg["barrier"]:  # the first incarnations start together: the first quorum holds every group
                deadline = time.monotonic() + 300
                while sum(f.startswith("ready_") for f in os.listdir(cfg["dir"])) < cfg["groups"]:
                    assert time.monotonic() < deadline, "the other jobs did not start"
                    time.sleep(0.05)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if rec["start_step"] is None:  # after the join (healing) of on_train_start
                rec["start_step"] = trainer.global_step
                rec["start_t"] = time.time() - t0
                rec["params"] = sum(p.numel() for p in pl_module.parameters())  # full sizes (DTensor too)
                rec["shard_params"] = sum((p.to_local() if hasattr(p, "to_local") else p).numel()
                                          for p in pl_module.parameters())
                if cfg["incarnation"] > 0 and not rec["heals"]:  # the others finished before it rejoined: it
                    rec["too_late"] = True                         # would train alone from its initial weights
                    write()
                    os._exit(3)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            rec["steps"].append((time.time() - t0, step))
            rec["ledger"].append((step, batch[2].tolist()))  # the windows this step trained on
            if step % cfg["eval_every"] == 0 and step % H == 0:  # right after a sync: every group holds θ_g
                rec["evals"].append((step, evaluate(pl_module)))
            if (kill := due("interval", step)) is not None:
                die(kill)

    class IndexedGPT(GPT):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch[:2], batch_idx)

    L.seed_everything(cfg["seed"], verbose=False)  # every group of a fresh run builds the same initial model
    model = IndexedGPT(size=cfg["size"], block_size=cfg["block_size"], learning_rate=cfg["learning_rate"],
                       warmup_steps=cfg["warmup"], max_steps=cfg["steps"])
    federated = dict(sync_every=H, outer_optimizer="diloco", lighthouse=cfg["lighthouse"], group_id=f"g{cfg['group']}",
                     min_groups=1, sync_timeout=cfg["sync_timeout"], process_group_backend="gloo")
    fsdp = cfg.get("inner", "ddp") == "fsdp"
    data.setup("fit")
    windows = IndexedWindows(data.train_dataset)
    if cfg["data"] == "cursor":  # the library partitions one order (seed_everything's) over the jobs
        loader = DataLoader(windows, batch_size=cfg["batch_size"], shuffle=True)
        federated.update(data_jobs=cfg["groups"], data_job_index=cfg["group"])
    else:  # today's way without it: each job's shard picked by hand (its ranks' replicas of G × devices)
        devices = cfg.get("devices", 1)
        loader = DataLoader(windows, batch_size=cfg["batch_size"], sampler=DistributedSampler(
            windows, num_replicas=cfg["groups"] * devices, rank=cfg["group"] * devices + rank, seed=cfg["seed"]))
    trainer = L.Trainer(
        accelerator="cpu", devices=cfg.get("devices", 1), max_steps=cfg["steps"], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, use_distributed_sampler=fsdp, callbacks=[Chaos()],
        strategy=LocalSGDFSDPStrategy(**federated) if fsdp else LocalSGDStrategy(**federated),
    )
    state["trainer"] = trainer
    trainer.fit(model, train_dataloaders=loader)
    rec["final_loss"] = evaluate(model)
    rec["end_t"] = time.time() - t0
    rec["global_step"] = trainer.global_step
    write()


class IndexedWindows:
    """The training windows with their index: ``(x, y, i)``, so that each step's windows go into the ledger."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, y, i


# ---------------------------------------------------------------------------------------------------- one run
def run_federated(cfg: dict, kills: list[dict], tag: str, workdir: Path, timeout: float = 1500,
                  data: str = "cursor") -> dict:
    """Run the G jobs against an in-process lighthouse (the harness's :func:`~harness.federated.run_jobs`),
    restarting every job that SIGKILLs itself at once with the same group_id, from a warm spare."""
    from harness.federated import run_jobs

    run_dir = workdir / tag.replace(" ", "_").replace(",", "")
    cfg = dict(cfg, data=data)
    remaining = list(kills)  # a kill happens once: a restarted job gets only the kills still to come

    def job(group: int, incarnation: int) -> dict:
        return dict(cfg, group=group, incarnation=incarnation, name=f"g{group}_{incarnation}", slot=f"g{group}",
                    ranks=cfg["devices"], kills=list(remaining), dir=str(run_dir), barrier=incarnation == 0,
                    seed=1234)

    def restart(killed: dict, record: dict) -> dict:
        remaining.remove(record["killed"])
        return job(killed["group"], killed["incarnation"] + 1)

    # exit status 3: restarted after the others had finished (nothing to heal from); a job killed when the others
    # are done is not restarted (restart_alone=False)
    out = run_jobs(Path(__file__), [job(g, 0) for g in range(cfg["groups"])], run_dir, join_ms=cfg["join_ms"],
                   heartbeat_ms=cfg["heartbeat_ms"], timeout=timeout, restart=restart,
                   wants_spare=lambda job: any(k["group"] == job["group"] for k in job["kills"]), done_codes=(0, 3),
                   restart_alone=False)
    records = [json.loads(p.read_text()) for p in sorted(run_dir.glob("g*_*.json")) if not p.name.endswith(".cfg.json")]
    jobs = [r for r in records if r["rank"] == 0]  # the job's record; other ranks' only for their healing
    for job in jobs:
        job["rank_heals"] = sorted(((r["rank"], h["bytes"], r["shard_params"]) for r in records
                                    if (r["group"], r["incarnation"]) == (job["group"], job["incarnation"])
                                    for h in r["heals"]))
    first = min(j["steps"][0][0] for j in jobs if j["steps"])
    last = max(j["end_t"] for j in jobs if j.get("end_t") is not None)
    return dict(tag=tag, jobs=jobs, restarts=out["restarts"], wall_s=last - first,  # first step to the last job's end
                data=data)


# ---------------------------------------------------------------------------------------------------- metrics
def useful_and_lost(job: dict) -> tuple[int, int]:
    """Steps of this incarnation that entered a committed sync with weight 1, and the steps it lost when killed."""
    boundary, useful = job["start_step"] or 0, 0
    for a in job["attempts"]:
        if a["committed"]:
            if a["weight"] == 1.0:
                useful += a["step"] - boundary
            boundary = a["step"]
    last = job["steps"][-1][1] if job["steps"] else boundary
    if job["killed"] and job["killed"]["kind"] == "sync":
        last = job["killed"]["step"]  # killed inside that step's sync, after its optimizer step (not yet recorded)
    return useful, (last - boundary) if job["killed"] else 0


def contributed_windows(job: dict) -> list[int]:
    """The windows of this incarnation's steps whose work entered a committed sync with weight 1 (its ledger)."""
    out: list[int] = []
    boundary = job["start_step"] or 0
    for a in job["attempts"]:
        if a["committed"]:
            if a["weight"] == 1.0:
                out += [i for step, windows in job["ledger"] if boundary < step <= a["step"] for i in windows]
            boundary = a["step"]
    return out


def data_counts(run: dict, reference: set[int]) -> dict:
    """Windows contributed, contributed more than once, read but never contributed (lost with a killed job's work),
    and those of ``reference`` (the uninterrupted run's) this run never contributed."""
    contributed = [i for j in run["jobs"] for i in contributed_windows(j)]
    read = sum(len(w) for j in run["jobs"] for _, w in j["ledger"])
    return dict(samples_contributed=len(contributed), samples_read_twice=len(contributed) - len(set(contributed)),
                samples_never_read=len(reference - set(contributed)), samples_read_lost=read - len(contributed))


def step_durations(job: dict) -> dict[int, float]:
    """Wall seconds of each step of a job (end of step s − end of step s−1), its first step excluded."""
    out, prev = {}, None
    for t, s in job["steps"]:
        if prev is not None and s == prev[1] + 1:
            out[s] = t - prev[0]
        prev = (t, s)
    return out


def analyse(cfg: dict, base: dict, chaos: dict, shards: dict) -> tuple[list[dict], list[dict], list[dict]]:
    G, H = cfg["groups"], cfg["sync_every"]
    paid = G * cfg["steps"]
    rows, events = [], []
    base_dur = {j["group"]: step_durations(j) for j in base["jobs"]}
    sync_steps = [s for s in range(H, cfg["steps"] + 1, H)]
    base_sync = statistics.median(d[s] - statistics.median(d[x] for x in d if x % H) for d in base_dur.values()
                                  for s in sync_steps if s in d)
    base_final = next(j["final_loss"] for j in base["jobs"] if j["final_loss"] is not None)
    reference = {i for j in base["jobs"] for i in contributed_windows(j)}
    for run in (base, chaos, shards):
        finals = [j["final_loss"] for j in run["jobs"] if j["final_loss"] is not None]
        useful = lost = 0
        for j in run["jobs"]:
            u, lo = useful_and_lost(j)
            useful, lost = useful + u, lost + lo
        kills = [j for j in run["jobs"] if j["killed"]]
        heals = [h for j in run["jobs"] for h in j["heals"]]
        rows.append(dict(run=run["tag"], data="cursor (data_jobs)" if run["data"] == "cursor" else
                         "hand-picked shards", kills=len(kills), restarts=len(run["restarts"]), healings=len(heals),
                         rejoined_too_late=sum(bool(j.get("too_late")) for j in run["jobs"]),
                         final_val_loss=finals[0], final_loss_spread=max(finals) - min(finals),
                         loss_ratio=finals[0] / base_final, useful_group_steps=useful, lost_group_steps=lost,
                         skipped_group_steps=paid - useful - lost, paid_group_steps=paid, goodput=useful / paid,
                         wall_s=run["wall_s"], wall_ratio=run["wall_s"] / base["wall_s"],
                         heal_bytes=statistics.mean(h["bytes"] for h in heals) if heals else 0,
                         **data_counts(run, reference)))
    params = chaos["jobs"][0]["params"] or base["jobs"][0]["params"]
    model_bytes = 4 * params
    for j in sorted((j for j in chaos["jobs"] if j["killed"]), key=lambda j: j["killed"]["step"]):
        k = j["killed"]
        affected = k["step"] if k["kind"] == "sync" else math.ceil(k["step"] / H) * H
        survivors = [x for x in chaos["jobs"] if x["group"] != k["group"] and affected in step_durations(x)]
        stall = max(step_durations(x)[affected] for x in survivors) - statistics.median(
            d[affected] for d in base_dur.values() if affected in d)
        tries = [[a for a in x["attempts"] if a["step"] == affected] for x in survivors]
        failed_s = max(sum(a["seconds"] for a in t if not a["committed"]) for t in tries)
        redo_s = max(sum(a["seconds"] for a in t if a["committed"]) for t in tries)
        restarted = next((x for x in chaos["jobs"] if x["group"] == k["group"]
                          and x["incarnation"] == j["incarnation"] + 1), None)
        heal = restarted["heals"][0] if restarted and restarted["heals"] else None
        heal_stall = float("nan")
        if heal is not None:
            others = [x for x in chaos["jobs"] if x["group"] != k["group"] and heal["step"] in step_durations(x)]
            if others:
                heal_stall = max(step_durations(x)[heal["step"]] for x in others) - statistics.median(
                    d[heal["step"]] for d in base_dur.values() if heal["step"] in d)
        events.append(dict(
            group=f"g{k['group']}", kind=k["kind"], kill_step=k["step"], affected_sync_step=affected,
            survivors=len(survivors), lost_steps=useful_and_lost(j)[1], survivor_stall_s=stall,
            failed_attempt_s=failed_s, committed_attempt_s=redo_s,
            stall_bound_s=cfg["heartbeat_ms"] / 1000 + base_sync, within_bound=stall < cfg["heartbeat_ms"] / 1000
            + base_sync, healed_at_step=heal["step"] if heal else "", rejoin_s=(heal["t"] - j["steps"][-1][0])
            if heal else float("nan"), heal_sync_stall_s=heal_stall, heal_bytes=heal["bytes"] if heal else 0,
            heal_module_bytes=heal["module_bytes"] if heal else 0,
            heal_inner_optimizer_bytes=heal["inner_optimizer_bytes"] if heal else 0,
            model_bytes=model_bytes, outer_state_bytes=2 * model_bytes,
            heal_over_model_plus_outer=(heal["bytes"] / (3 * model_bytes)) if heal else float("nan"),
            # per rank of the restarted job: what healing sent it, against its shard (FSDP) or replica (DDP) in fp32
            heal_bytes_per_rank=" / ".join(str(b) for _, b, _ in restarted["rank_heals"]) if restarted else "",
            shard_bytes_per_rank=" / ".join(str(4 * n) for _, _, n in restarted["rank_heals"]) if restarted else "",
            heal_over_shard=max(b / (4 * n) for _, b, n in restarted["rank_heals"])
            if restarted and restarted["rank_heals"] else float("nan")))
    curves = [dict(run=r["tag"], step=s, val_loss=v) for r in (base, chaos, shards)
              for s, v in sorted({s: v for j in r["jobs"] for s, v in j["evals"]}.items())]
    return rows, events, curves


# ---------------------------------------------------------------------------------------------------- output
def plot(cfg: dict, base: dict, chaos: dict, events: list[dict], curves: list[dict], out_name: str,
         rows: list[dict]) -> None:
    import harness as h

    plt = h.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    ax = axes[0]
    for tag, style in ((base["tag"], "-"), (chaos["tag"], "--"), (rows[2]["run"], ":")):
        c = [x for x in curves if x["run"] == tag]
        ax.plot([x["step"] for x in c], [x["val_loss"] for x in c], style, marker=".", label=tag)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (after a sync)")
    ax.set_title("validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    colors = ["C0", "C1", "C2", "C3", "C4"]
    for run, style in ((base, ":"), (chaos, "-")):
        first = min(j["steps"][0][0] for j in run["jobs"] if j["steps"])  # each run's clock from its first step
        for j in run["jobs"]:
            ax.plot([t - first for t, _ in j["steps"]], [s for _, s in j["steps"]], style,
                    color=colors[j["group"] % 5], lw=0.8 if run is base else 1.5,
                    label=f"g{j['group']}" if run is chaos and j["incarnation"] == 0 else None)
            if j["killed"]:
                ax.plot(j["steps"][-1][0] - first, j["steps"][-1][1], "kx", ms=8)
    ax.set_xlabel("wall clock from the first step (s)")
    ax.set_ylabel("step")
    ax.set_title("steps per group (dotted: uninterrupted; x: kill)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[2]
    labels = [f"{e['group']} {e['kind']}\nstep {e['kill_step']}" for e in events]
    ax.bar(range(len(events)), [e["survivor_stall_s"] for e in events], label="survivors' stall")
    if events:
        ax.axhline(events[0]["stall_bound_s"], color="k", ls=":", label="heartbeat timeout + one sync")
    ax.set_xticks(range(len(events)), labels, fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title("stall per failure")
    ax.legend(fontsize=8)
    ax = axes[3]
    names = ["uninterrupted\ncursor", "kills\ncursor", "kills\nhand shards"]
    for k, (key, label) in enumerate((("samples_read_twice", "contributed twice"),
                                      ("samples_never_read", "never read (vs uninterrupted)"))):
        ax.bar([x + 0.4 * k for x in range(len(rows))], [r[key] for r in rows], width=0.4, label=label)
    ax.set_xticks([x + 0.2 for x in range(len(rows))], names[:len(rows)], fontsize=8)
    ax.set_ylabel("windows")
    ax.set_title("data read twice / never read")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out_name}.png", dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--standby", help=argparse.SUPPRESS)
    p.add_argument("--keep", help="keep the jobs' logs and records in this folder")
    p.add_argument("--quick", action="store_true", help="smoke run: 128 steps, a kill every 2 syncs (~1-2 min); "
                   "writes chaos_quick* unless --out-name is given")
    p.add_argument("--steps", type=int)
    p.add_argument("--sync-every", type=int)
    p.add_argument("--kill-every", type=int, help="syncs between two kills (default 8)")
    p.add_argument("--size")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill schedule (victims, kinds, steps)")
    p.add_argument("--link", choices=sorted(LINKS), help="run inside a network namespace shaped to G × this rate")
    p.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out-name", default=None,
                   help="file names under benchmarks/chaos/results/ (default chaos[_fsdp][_100M])")
    p.add_argument("--inner", choices=["ddp", "fsdp"], default="ddp",
                   help="inside each job: one process (ddp, the default) or FSDP2 over 2 ranks (fsdp)")
    args = p.parse_args()
    if args.worker:
        return worker(json.loads(Path(args.worker).read_text()))
    if args.standby:
        from harness.federated import standby

        return standby(Path(args.standby), _imports, worker)
    import harness as h

    cfg = dict(PRESETS["default"], **(PRESETS["quick"] if args.quick else {}))
    for key in ("steps", "sync_every", "kill_every", "size"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg.update(inner=args.inner, devices=2 if args.inner == "fsdp" else 1)
    if cfg["steps"] % cfg["sync_every"] or cfg["steps"] % cfg["eval_every"]:
        p.error("--steps must be a multiple of --sync-every and of the evaluation interval (128)")
    out_name = args.out_name or ("chaos" + ("_quick" if args.quick else "")
                                 + ("_fsdp" if args.inner == "fsdp" else "")
                                 + ("" if args.link is None else f"_{args.link.removesuffix('bit')}"))
    if args.link is not None and not args.in_netns:
        ok, why = h.netns_available()
        if not ok:
            print(f"--link {args.link}: network namespaces / tc are not usable here ({why}); this emulation needs "
                  "root, `unshare`, `ip` and `tc`. Nothing was run; the default (no --link) runs on the plain "
                  "loopback.")
            sys.exit(2)
        cmd = h.netns_prefix(cfg["groups"] * LINKS[args.link]) + [sys.executable, __file__, *sys.argv[1:],
                                                                  "--in-netns", "--out-name", out_name]
        sys.exit(subprocess.run(cmd, timeout=3600, check=False).returncode)
    started = time.time()
    kills = kill_schedule(cfg, args.seed)
    print(f"kill schedule (seed {args.seed}):", kills, flush=True)
    with tempfile.TemporaryDirectory(prefix="lsgd_chaos_") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        base = run_federated(cfg, [], "uninterrupted", work)
        print(f"uninterrupted: {base['wall_s']:.1f} s", flush=True)
        chaos = run_federated(cfg, kills, f"kill every {cfg['kill_every']} syncs", work)
        print(f"chaos: {chaos['wall_s']:.1f} s, {len(chaos['restarts'])} restarts", flush=True)
        shards = run_federated(cfg, kills, f"kill every {cfg['kill_every']} syncs, hand-picked shards", work,
                               data="shards")
        print(f"chaos without the data cursor: {shards['wall_s']:.1f} s", flush=True)
    rows, events, curves = analyse(cfg, base, chaos, shards)
    h.write_csv(RESULTS / f"{out_name}.csv", rows)
    h.write_csv(RESULTS / f"{out_name}_events.csv", events)
    h.write_csv(RESULTS / f"{out_name}_curves.csv", curves)
    plot(cfg, base, chaos, events, curves, out_name, rows)
    params = base["jobs"][0]["params"]
    link = (f"inside a network namespace whose loopback is shaped to {cfg['groups']} × {args.link} (tc tbf; "
            "latency not emulated)" if args.link else "on the plain loopback (no link emulation)")
    inside = ("1 process (one worker group each)" if args.inner == "ddp" else
              f"{cfg['devices']} ranks with FSDP2 inside (one worker group each; rank k of every job syncs and heals "
              "shard k)")
    text = (f"GPT `{cfg['size']}` ({params:,} parameters, {4 * params:,} bytes fp32), {cfg['groups']} federated "
            f"jobs of {inside}, DiLoCo (AdamW lr {cfg['learning_rate']:g} inside, Nesterov "
            f"lr 0.7 momentum 0.9 outside), H={cfg['sync_every']}, {cfg['steps']} steps, batch {cfg['batch_size']} × "
            f"{cfg['block_size']} tokens per rank, lighthouse in-process (heartbeat timeout {cfg['heartbeat_ms']} "
            f"ms, join timeout {cfg['join_ms']} ms), sync_timeout {cfg['sync_timeout']:g} s, {link}. Kill schedule "
            f"(seed {args.seed}): a kill every {cfg['kill_every']} syncs: "
            + ", ".join(f"g{k['group']} {k['kind']} at step {k['step']}" for k in kills)
            + "; the driver restarts a killed job at once with the same group_id. Data: the cursor (data_jobs="
            f"{cfg['groups']}: one order partitioned over the jobs, a restarted job continues its share at its last "
            "committed position) in the first two runs; today's way without it, each job's shard picked by hand "
            "(DistributedSampler), in the third. Windows: the ledger's (contributed = its step's work entered a "
            "committed sync with weight 1; never read = contributed by the uninterrupted run, not by this one).\n\n"
            + h.md_table(rows, [("run", "run"), ("data", "data"), ("kills", "kills"), ("healings", "healings"),
                                ("final_val_loss", "final val loss"), ("loss_ratio", "loss / uninterrupted"),
                                ("goodput", "goodput"), ("lost_group_steps", "group-steps lost"),
                                ("skipped_group_steps", "group-steps skipped (down)"), ("wall_s", "wall s"),
                                ("samples_contributed", "windows contributed"),
                                ("samples_read_twice", "contributed twice"),
                                ("samples_never_read", "never read"), ("samples_read_lost", "read, work lost")])
            + "\n\nPer failure:\n\n"
            + h.md_table(events, [("group", "group"), ("kind", "kill"), ("kill_step", "step"),
                                  ("affected_sync_step", "sync affected"), ("survivor_stall_s", "survivors' stall s"),
                                  ("failed_attempt_s", "failed attempt s"), ("committed_attempt_s", "redo / sync s"),
                                  ("stall_bound_s", "bound s (heartbeat + sync)"), ("within_bound", "within"),
                                  ("rejoin_s", "kill → healed s"), ("healed_at_step", "healed at step"),
                                  ("heal_sync_stall_s", "stall at the heal sync s"), ("heal_bytes", "heal bytes"),
                                  ("heal_over_model_plus_outer", "heal / (model + outer state)"),
                                  ("heal_bytes_per_rank", "heal bytes per rank"),
                                  ("shard_bytes_per_rank", "shard bytes per rank (fp32)"),
                                  ("heal_over_shard", "heal / shard (max over ranks)")])
            + "\n")
    print(text)
    shown = [a for a in sys.argv[1:] if a != "--in-netns"]
    if args.keep:
        shown = [a for a in shown if a not in ("--keep", args.keep)]
    if args.in_netns and shown[-2:] == ["--out-name", out_name]:
        shown = shown[:-2]  # added by the re-run inside the namespace
    command = "python benchmarks/chaos/chaos.py" + (" " + " ".join(shown) if shown else "")
    h.write_summary(RESULTS / f"{out_name}.md", text, started, command)


if __name__ == "__main__":
    main()
