"""Core strategy overhead and bytes, measured side by side in one run.

1. Inner step time: the local-SGD strategy (2 processes, 1 thread each) vs. the same step in a single process with
   no strategy (1 thread; two such processes run at once so the machine is equally loaded), median over the steps
   that do not sync. Target: ratio <= 1.02.
2. Bytes across groups per optimizer step: counted on the wire of the Python collectives (local SGD) and through a
   counting DDP communication hook (DDP), not estimated. Target: local SGD's = DDP's / H.

    python benchmarks/core_overhead.py            # small default, ~2 minutes on 2 CPU cores
    python benchmarks/core_overhead.py --steps 400 --sync-every 50

Writes benchmarks/results/core_overhead.csv and core_overhead.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def worker(args: argparse.Namespace) -> None:
    """One training run (re-run by Lightning's launcher per rank); rank 0 writes a JSON line to args.out."""
    import torch
    import torch.distributed as dist
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    import lightning_localsgd  # noqa: F401
    from lightning_localsgd import LocalSGDStrategy
    from lightning_localsgd.examples.data import TextDataModule
    from lightning_localsgd.examples.gpt import GPT

    torch.set_num_threads(1)
    counted = {"cross_bytes": 0, "ddp_bytes": 0}

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.times: list[tuple[float, bool]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # runs after the strategy's own step-end hook, so a sync is inside this step's time
            s = trainer.strategy
            synced = isinstance(s, LocalSGDStrategy) and s.schedule.steps_since_sync == 0
            self.times.append((time.perf_counter() - self.t0, synced))

        def on_fit_start(self, trainer, pl_module):
            model = trainer.strategy.model
            if isinstance(model, torch.nn.parallel.DistributedDataParallel):
                def hook(state, bucket):
                    tensor = bucket.buffer()
                    counted["ddp_bytes"] += tensor.numel() * tensor.element_size()
                    fut = dist.all_reduce(tensor.div_(dist.get_world_size()), async_op=True).get_future()
                    return fut.then(lambda f: f.value()[0])
                model.register_comm_hook(None, hook)

    if args.mode == "local_sgd":
        original = dist.all_reduce

        def counting(tensor, *a, **k):
            # one rank per worker group: every all-reduce crosses groups
            counted["cross_bytes"] += tensor.numel() * tensor.element_size()
            return original(tensor, *a, **k)

        dist.all_reduce = counting

    L.seed_everything(0, verbose=False)
    model = GPT(n_layer=2, n_head=4, n_embd=128, block_size=128, warmup_steps=10, max_steps=args.steps)
    data = TextDataModule(block_size=128, batch_size=8, max_tokens=2_000_000)
    if args.mode == "single":
        strategy, devices = "auto", 1
    elif args.mode == "ddp":
        strategy, devices = L.pytorch.strategies.DDPStrategy(process_group_backend="gloo"), 2
    else:
        strategy, devices = LocalSGDStrategy(sync_every=args.sync_every, process_group_backend="gloo"), 2
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[timer])
    trainer.fit(model, data)
    warm = timer.times[5:]  # first steps include allocator and autograd warm-up
    inner = [t for t, synced in warm if not synced]
    result = {
        "mode": args.mode, "steps": trainer.global_step, "sync_every": args.sync_every if args.mode == "local_sgd" else "",
        "median_inner_step_s": statistics.median(inner),
        "mean_step_s": statistics.mean(t for t, _ in warm),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if args.mode == "local_sgd":
        s = trainer.strategy
        # the train-end sync is not a training step: count only the syncs inside the measured steps
        result.update(cross_bytes_counted=counted["cross_bytes"], engine_bytes=s.outer_sync.bytes_sent,
                      syncs=s.outer_sync.num_syncs, state_bytes=s.outer_sync.state_bytes)
    if args.mode == "ddp":
        result.update(ddp_bytes_counted=counted["ddp_bytes"])
    if trainer.global_rank == 0:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


def run(mode: str, args: argparse.Namespace, out: Path, copies: int = 1) -> None:
    """Run `copies` independent runs of `mode` at the same time (each writes its own line)."""
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--steps", str(args.steps),
           "--sync-every", str(args.sync_every), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(copies)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"{mode} run failed:\n{err.decode()[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--sync-every", type=int, default=20)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="local_sgd", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.steps % args.sync_every:
        p.error("--steps must be a multiple of --sync-every so that no sync happens at train end")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "core_overhead.jsonl"
    out.unlink(missing_ok=True)
    # The baseline runs as two independent single processes at once, one thread each: the machine carries the same
    # load as the 2-process runs, so the ratio isolates the strategy's own cost from core and memory contention.
    for mode, copies in (("single", 2), ("local_sgd", 1), ("ddp", 1)):
        t0 = time.time()
        run(mode, args, out, copies)
        print(f"{mode}: {time.time() - t0:.0f} s", flush=True)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    out.unlink()
    rows = {r["mode"]: r for r in lines}
    singles = [r for r in lines if r["mode"] == "single"]
    single = {**singles[0], "median_inner_step_s": statistics.mean(r["median_inner_step_s"] for r in singles)}
    local, ddp = rows["local_sgd"], rows["ddp"]
    step_ratio = local["median_inner_step_s"] / single["median_inner_step_s"]
    local_per_step = local["cross_bytes_counted"] / local["steps"]
    ddp_per_step = ddp["ddp_bytes_counted"] / ddp["steps"]
    bytes_ratio = local_per_step / ddp_per_step
    with open(RESULTS / "core_overhead.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["metric", "single", "local_sgd", "ddp", "ratio", "target"])
        w.writerow(["median_inner_step_s", f"{single['median_inner_step_s']:.5f}", f"{local['median_inner_step_s']:.5f}",
                    f"{ddp['median_inner_step_s']:.5f}", f"{step_ratio:.4f}", "<= 1.02 (local_sgd / single)"])
        w.writerow(["bytes_per_step", "", f"{local_per_step:.1f}", f"{ddp_per_step:.1f}", f"{bytes_ratio:.6f}",
                    f"= 1/H = {1 / args.sync_every:.6f}"])
        w.writerow(["outer_state_bytes", "", local["state_bytes"], "", "", "snapshot (averaging: no optimizer state)"])
    print(f"params: {single['params']:,}   steps: {args.steps}   H: {args.sync_every}")
    print(f"inner step: single {single['median_inner_step_s'] * 1e3:.2f} ms, local SGD "
          f"{local['median_inner_step_s'] * 1e3:.2f} ms, DDP {ddp['median_inner_step_s'] * 1e3:.2f} ms; "
          f"local SGD / single = {step_ratio:.4f} (target <= 1.02)")
    print(f"bytes/step: local SGD {local_per_step:,.1f}, DDP {ddp_per_step:,.1f}; ratio {bytes_ratio:.6f} "
          f"(1/H = {1 / args.sync_every:.6f})")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
        a.bar(["single", "local SGD", "DDP"], [1e3 * r["median_inner_step_s"] for r in (single, local, ddp)])
        a.set_ylabel("median inner step (ms)")
        b.bar(["local SGD", "DDP"], [local_per_step, ddp_per_step])
        b.set_yscale("log")
        b.set_ylabel("cross-group bytes / step")
        fig.suptitle(f"GPT {single['params']:,} params, 2 CPU procs, H={args.sync_every}")
        fig.tight_layout()
        fig.savefig(RESULTS / "core_overhead.png", dpi=100)
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")


if __name__ == "__main__":
    main()
