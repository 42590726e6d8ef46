"""Core strategy overhead and bytes, measured side by side in one run.

1. Inner step time: the local-SGD strategy (2 processes, 1 thread each) vs. the same step in a single process with
   no strategy (1 thread; two such processes run at once so the machine is equally loaded), median over the steps
   that do not sync. The three configurations (single, local SGD, DDP) run in ``--repeats`` interleaved rounds
   (``harness.timing``: order reversed every other round); reported: the median over rounds of each round's ratio
   local SGD / single, its 95% bootstrap interval and min / max, and the load seen. Target: ratio <= 1.02, reported
   as "shown" only when the interval's upper end is <= 1.02, else "not shown".
2. Bytes across groups per optimizer step: counted on the wire of the Python collectives (local SGD) and through a
   counting DDP communication hook (DDP), not estimated. Target: local SGD's = DDP's / H.

    python benchmarks/core_overhead/core_overhead.py  # small default: 5 rounds, ~5 minutes on 2 CPU cores
    python benchmarks/core_overhead/core_overhead.py --steps 400 --sync-every 50 --repeats 7

Writes benchmarks/core_overhead/results/core_overhead.csv, core_overhead_rounds.csv (every run), core_overhead.md and
.png.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
import harness as h  # noqa: E402
from lightning_localsgd import LocalSGDStrategy
from lightning_localsgd.examples.data import TextDataModule
from lightning_localsgd.examples.gpt import GPT

RESULTS = Path(__file__).resolve().parent / "results"

MODES = ("single", "local_sgd", "ddp")
STEP_KEYS = ("median_inner_step_s", "median_inner_step_cpu_s")
LIBRARY = str(Path(sys.modules["lightning_localsgd"].__file__).parent)
TARGET = 1.02


class StepTimer(Callback):
    """Wall-clock and CPU seconds of every training step, and whether the step ended in a sync."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float, bool]] = []
        self._t0 = self._c0 = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # runs after the strategy's own step-end hook, so a sync is inside this step's time
        schedule = getattr(trainer.strategy, "schedule", None)
        synced = schedule is not None and schedule.steps_since_sync == 0
        self.times.append((time.perf_counter() - self._t0, time.process_time() - self._c0, synced))

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        from harness.measure import install_ddp_hook

        if isinstance(trainer.strategy.model, torch.nn.parallel.DistributedDataParallel):
            install_ddp_hook(trainer.strategy.model, COUNTED["ddp"], None, dist.all_reduce)


COUNTED = {"cross_bytes": 0, "ddp": {"bytes": 0, "calls": 0, "comm_seconds": 0.0}}


def count_all_reduce() -> None:
    """Count the bytes of every all-reduce (one rank per worker group: every one crosses groups)."""
    original = dist.all_reduce

    def counting(tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
        COUNTED["cross_bytes"] += tensor.numel() * tensor.element_size()
        return original(tensor, *a, **k)

    dist.all_reduce = counting


def strategy_for(args: argparse.Namespace) -> tuple[Any, int]:
    """The strategy and number of processes of ``args.mode``."""
    if args.mode == "single":
        return "auto", 1
    if args.mode == "ddp":
        return L.pytorch.strategies.DDPStrategy(process_group_backend="gloo"), 2
    return LocalSGDStrategy(sync_every=args.sync_every, process_group_backend="gloo"), 2


def fit(args: argparse.Namespace, trainer: L.Trainer, model: Any, data: Any) -> None:
    """``trainer.fit``, under cProfile (CPU time) on rank 0 with ``--profile-out``."""
    if not args.profile_out:
        return trainer.fit(model, data)
    import cProfile

    prof = cProfile.Profile(time.process_time)
    prof.runcall(trainer.fit, model, data)
    if trainer.global_rank == 0:
        prof.dump_stats(f"{args.profile_out}.{os.getpid()}")  # one file per copy


def step_result(args: argparse.Namespace, trainer: L.Trainer, model: Any, timer: StepTimer) -> dict:
    """Median wall / CPU seconds of the steps that do not sync (after 5 warm-up steps), bytes and state."""
    warm = timer.times[5:]  # first steps include allocator and autograd warm-up
    inner = [(t, c) for t, c, synced in warm if not synced]
    result = {
        "mode": args.mode, "steps": trainer.global_step,
        "sync_every": args.sync_every if args.mode == "local_sgd" else "",
        "median_inner_step_s": statistics.median(t for t, _ in inner),
        "median_inner_step_cpu_s": statistics.median(c for _, c in inner),
        "mean_step_s": statistics.mean(t for t, _, _ in warm),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if args.mode == "local_sgd":
        s = trainer.strategy
        # the train-end sync is not a training step: count only the syncs inside the measured steps
        result.update(cross_bytes_counted=COUNTED["cross_bytes"], engine_bytes=s.outer_sync.bytes_sent,
                      syncs=s.outer_sync.num_syncs, state_bytes=s.outer_sync.state_bytes)
    if args.mode == "ddp":
        result.update(ddp_bytes_counted=COUNTED["ddp"]["bytes"])
    return result


def worker(args: argparse.Namespace) -> None:
    """One training run (re-run by Lightning's launcher per rank); rank 0 writes a JSON line to args.out."""
    torch.set_num_threads(1)
    if args.mode == "local_sgd":
        count_all_reduce()
    L.seed_everything(0, verbose=False)
    model = GPT(n_layer=2, n_head=4, n_embd=128, block_size=128, warmup_steps=10, max_steps=args.steps)
    data = TextDataModule(block_size=128, batch_size=8, max_tokens=2_000_000)
    strategy, devices = strategy_for(args)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[timer])
    fit(args, trainer, model, data)
    result = step_result(args, trainer, model, timer)
    if trainer.global_rank == 0:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


def run(mode: str, args: argparse.Namespace, copies: int = 1, profile_out: str = "") -> dict:
    """Run ``copies`` independent runs of ``mode`` at the same time; their result (singles: mean step times)."""
    with tempfile.TemporaryDirectory(prefix="lsgd_overhead_") as tmp:
        out = Path(tmp) / "result.jsonl"
        cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--steps", str(args.steps),
               "--sync-every", str(args.sync_every), "--out", str(out), "--profile-out", profile_out]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for _ in range(copies)]
        for proc in procs:
            _, err = proc.communicate()
            if proc.returncode:
                raise RuntimeError(f"{mode} run failed:\n{err.decode()[-3000:]}")
        lines = [json.loads(line) for line in out.read_text().splitlines()]
    means = {k: statistics.mean(r[k] for r in lines) for k in STEP_KEYS}
    return {**lines[0], **means, "copies": [r["median_inner_step_s"] for r in lines]}


def step_s(result: dict) -> float:
    """The run's median inner step in seconds."""
    return result["median_inner_step_s"]


def summarize(measured: h.Interleaved, args: argparse.Namespace) -> dict:
    """Median step times, the step-time ratios with intervals, and the (deterministic) bytes per step."""
    local, ddp = measured.results("local_sgd")[0], measured.results("ddp")[0]
    local_per_step = local["cross_bytes_counted"] / local["steps"]
    ddp_per_step = ddp["ddp_bytes_counted"] / ddp["steps"]
    return dict(
        step={name: statistics.median(step_s(r) for r in measured.results(name)) for name in MODES},
        local_ratio=h.ratio(measured, "local_sgd", "single", step_s),
        ddp_ratio=h.ratio(measured, "ddp", "single", step_s),
        cpu_ratio=h.ratio(measured, "local_sgd", "single", lambda r: r["median_inner_step_cpu_s"]),
        local_per_step=local_per_step, ddp_per_step=ddp_per_step, bytes_ratio=local_per_step / ddp_per_step,
        state_bytes=local["state_bytes"], params=local["params"], load=measured.load_text(),
        bytes_equal=len({r["cross_bytes_counted"] for r in measured.results("local_sgd")}) == 1,
    )


def write_results(s: dict, measured: h.Interleaved, args: argparse.Namespace) -> None:
    """core_overhead.csv (the summary), core_overhead_rounds.csv (every run) and core_overhead.md."""
    r, r_cpu = s["local_ratio"], s["cpu_ratio"]
    rows = [
        dict(metric="median_inner_step_s", single=s["step"]["single"], local_sgd=s["step"]["local_sgd"],
             ddp=s["step"]["ddp"], ratio=r.median, **r.row("interval"), target=f"<= {TARGET} (local_sgd / single)",
             verdict=r.verdict(TARGET), load=s["load"]),
        dict(metric="inner_step_cpu_ratio", ratio=r_cpu.median, **r_cpu.row("interval"),
             target="(CPU seconds, not a target)", load=s["load"]),
        dict(metric="bytes_per_step", local_sgd=s["local_per_step"], ddp=s["ddp_per_step"], ratio=s["bytes_ratio"],
             target=f"= 1/H = {1 / args.sync_every:.6f}"),
        dict(metric="outer_state_bytes", local_sgd=s["state_bytes"], target="snapshot (averaging: no optimizer state)"),
    ]
    h.write_csv(RESULTS / "core_overhead.csv", rows)
    h.write_csv(RESULTS / "core_overhead_rounds.csv", [
        dict(round=run.round + 1, config=run.name, order=i + 1, median_inner_step_s=step_s(run.result),
             median_inner_step_cpu_s=run.result["median_inner_step_cpu_s"],
             load_before=run.load_before, run_seconds=run.seconds) for i, run in enumerate(measured.runs)])
    text = summary_text(s, args)
    h.write_summary(RESULTS / "core_overhead.md", text, args.started,
                    " ".join(["python benchmarks/core_overhead/core_overhead.py", *args.argv]))


def summary_text(s: dict, args: argparse.Namespace) -> str:
    """The markdown of core_overhead/results/core_overhead.md (after its header)."""
    r, H = s["local_ratio"], args.sync_every
    table = h.md_table([dict(m="median inner step (ms)", single=1e3 * s["step"]["single"],
                             local=1e3 * s["step"]["local_sgd"], ddp=1e3 * s["step"]["ddp"],
                             ratio=r.text(4), target=f"≤ {TARGET}: **{r.verdict(TARGET)}**")],
                       [("m", "metric"), ("single", "single"), ("local", "local SGD"), ("ddp", "DDP"),
                        ("ratio", "local SGD / single: median [95% bootstrap] (min, max)"), ("target", "target")])
    return (f"{s['params']:,} parameters, {args.steps} steps, H = {H}, {args.repeats} interleaved rounds "
            f"(single, local SGD, DDP; order reversed every other round); {s['load']}.\n\n{table}\n\n"
            f"DDP / single: {s['ddp_ratio'].text(4)}. CPU seconds per inner step (`time.process_time`, less "
            f"sensitive to other jobs than the wall clock), local SGD / single: {s['cpu_ratio'].text(4)}. "
            f"Bytes per step: local SGD {s['local_per_step']:,.1f}, DDP {s['ddp_per_step']:,.1f}, ratio "
            f"{s['bytes_ratio']:.6f} (1/H = {1 / H:.6f}; identical in every round: {s['bytes_equal']}).\n")


def report(s: dict, args: argparse.Namespace) -> None:
    """Print the summary."""
    r = s["local_ratio"]
    print(f"params: {s['params']:,}   steps: {args.steps}   H: {args.sync_every}   rounds: {args.repeats}   "
          f"{s['load']}")
    print(f"inner step (median over rounds): single {s['step']['single'] * 1e3:.2f} ms, local SGD "
          f"{s['step']['local_sgd'] * 1e3:.2f} ms, DDP {s['step']['ddp'] * 1e3:.2f} ms")
    print(f"local SGD / single = {r.text(4)}: <= {TARGET} {r.verdict(TARGET)}")
    print(f"DDP / single = {s['ddp_ratio'].text(4)}")
    print(f"CPU time per inner step, local SGD / single = {s['cpu_ratio'].text(4)}")
    print(f"bytes/step: local SGD {s['local_per_step']:,.1f}, DDP {s['ddp_per_step']:,.1f}; ratio "
          f"{s['bytes_ratio']:.6f} (1/H = {1 / args.sync_every:.6f})")


def plot(s: dict, args: argparse.Namespace) -> None:
    """core_overhead.png: median step times with the ratio's interval, and bytes per step."""
    plt = h.pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(["single", "local SGD", "DDP"], [1e3 * s["step"][m] for m in MODES])
    a.set_ylabel("median inner step (ms)")
    a.set_title(f"local SGD / single = {s['local_ratio'].text(3).split(' (')[0]}", fontsize=9)
    b.bar(["local SGD", "DDP"], [s["local_per_step"], s["ddp_per_step"]])
    b.set_yscale("log")
    b.set_ylabel("cross-group bytes / step")
    fig.suptitle(f"GPT {s['params']:,} params, 2 CPU procs, H={args.sync_every}, {args.repeats} rounds")
    fig.tight_layout()
    fig.savefig(RESULTS / "core_overhead.png", dpi=100)


def per_step_functions(stats_path: Path, steps: int) -> dict:
    """``(file, function) -> (calls, own CPU s, cumulative CPU s)`` per training step, for functions called at least
    once per step (setup and syncs fall out)."""
    import pstats

    table: dict = {}
    for (file, _, func), (_, calls, own, cum, _) in pstats.Stats(str(stats_path)).stats.items():
        if calls >= steps:
            key = (file, func)
            c, o, u = table.get(key, (0, 0.0, 0.0))
            table[key] = (c + calls / steps, o + own / steps, u + cum / steps)
    return table


def short(key: tuple[str, str]) -> str:
    """``package/file.py:function`` of a profile key."""
    path = Path(key[0])
    return f"{path.parent.name}/{path.name}:{key[1]}"


def profile(args: argparse.Namespace, top: int = 25) -> None:
    """Where local SGD's step costs more CPU than the single process's: own time per step, largest differences."""
    with tempfile.TemporaryDirectory(prefix="lsgd_profile_") as tmp:
        tables = {}
        for mode, copies in (("single", 2), ("local_sgd", 1)):  # two singles at once: the same load as local SGD
            out = Path(tmp) / f"{mode}.prof"
            run(mode, args, copies, str(out))
            tables[mode] = per_step_functions(sorted(Path(tmp).glob(f"{mode}.prof.*"))[0], args.steps)
    single, local = tables["single"], tables["local_sgd"]
    total = {m: sum(v[1] for v in t.values()) for m, t in tables.items()}
    print(f"own CPU per step in per-step functions: single {total['single'] * 1e3:.2f} ms, "
          f"local SGD {total['local_sgd'] * 1e3:.2f} ms")
    diff = sorted(local, key=lambda k: local[k][1] - single.get(k, (0, 0.0, 0.0))[1], reverse=True)
    print("largest differences, own CPU µs per step (local SGD − single), calls per step, cumulative µs:")
    for key in diff[:top]:
        c, own, cum = local[key]
        extra = own - single.get(key, (0, 0.0, 0.0))[1]
        print(f"  {extra * 1e6:9.1f}  {c:6.1f}  {cum * 1e6:9.1f}  {short(key)}")
    ours = sorted((k for k in local if k[0].startswith(LIBRARY)), key=lambda k: local[k][2], reverse=True)
    print("the library's per-step functions, cumulative CPU µs per step:")
    for key in ours[:top]:
        print(f"  {local[key][2] * 1e6:9.1f}  {local[key][0]:6.1f}  {short(key)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--sync-every", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (one run of each configuration each)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="local_sgd", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--profile-out", default="", help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true",
                   help="instead: profile one single and one local-SGD run (CPU time, rank 0) and print where the "
                        "per-step time differs")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.steps % args.sync_every:
        p.error("--steps must be a multiple of --sync-every so that no sync happens at train end")
    if args.profile:
        return profile(args)
    args.started, args.argv = time.time(), sys.argv[1:]
    # The baseline runs as two independent single processes at once, one thread each: the machine carries the same
    # load as the 2-process runs, so the ratio isolates the strategy's own cost from core and memory contention.
    copies = {"single": 2, "local_sgd": 1, "ddp": 1}
    measured = h.run_interleaved({m: functools.partial(run, m, args, copies[m]) for m in MODES}, args.repeats)
    s = summarize(measured, args)
    write_results(s, measured, args)
    report(s, args)
    plot(s, args)


if __name__ == "__main__":
    main()
