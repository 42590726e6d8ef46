"""Soak run: many inner steps and syncs in one long run, watching memory and sync time for drift.

4 CPU processes (gloo), a small MLP, ``--steps`` inner steps with a sync every ``--sync-every`` (default 2,000 steps,
125 syncs) with everything the reliability code adds switched on: ``sync_timeout`` (the per-sync marker in the
rendezvous store and the timeout switch on the process groups) and an atomic checkpoint every ``--ckpt-every`` steps
(the gather of every group's state, temp file, fsync, rename, the old file removed). At every sync each rank records
its resident memory (RSS), its open file descriptors, the sync's wall time and the mean inner-step time since the last
sync. A leak shows as RSS or descriptors growing from the first to the last decile of the syncs; a slowdown as the
sync or step time growing.

    python benchmarks/soak/soak.py                  # ~2,000 steps on 4 processes, a few minutes on 2 CPU cores
    python benchmarks/soak/soak.py --steps 400 --devices 2

Writes benchmarks/soak/results/soak.csv (one row per rank and sync) and soak.png, and prints the first-vs-last-decile
table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def train(args: argparse.Namespace) -> None:
    """The run; Lightning's launcher re-runs this script once per rank."""
    import torch
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from torch.utils.data import DataLoader, Dataset

    import lightning_localsgd  # noqa: F401
    from lightning_localsgd import LocalSGDStrategy

    torch.set_num_threads(1)

    class Regression(Dataset):
        """Endless-enough random regression data, generated per index (no big tensor held)."""

        def __len__(self) -> int:
            return 10_000_000

        def __getitem__(self, i: int):
            g = torch.Generator().manual_seed(i)
            x = torch.randn(32, generator=g)
            return x, torch.sin(x[:8].sum()).reshape(1)

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256),
                                           torch.nn.Tanh(), torch.nn.Linear(256, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Monitor(Callback):
        """One row per sync: runs after the strategy's own step-end hook, which is first in the callback list."""

        def __init__(self) -> None:
            self.rows: list[dict] = []
            self.last_syncs = 0
            self.step_times: list[float] = []

        def on_train_start(self, trainer, pl_module):
            self.t_start = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            s = trainer.strategy
            syncs = s.outer_sync.num_syncs
            if syncs == self.last_syncs:
                self.step_times.append(time.perf_counter() - self.t0)
                return
            self.last_syncs = syncs
            self.rows.append({
                "rank": trainer.global_rank,
                "sync": syncs,
                "step": trainer.global_step,
                "elapsed_s": round(time.perf_counter() - self.t_start, 3),
                "rss_mb": round(rss_mb(), 2),
                "open_fds": open_fds(),
                "sync_ms": round(s.last_sync.seconds * 1000, 3),
                "step_ms": round(1000 * statistics.mean(self.step_times), 3) if self.step_times else float("nan"),
            })
            self.step_times = []

    out = Path(args.work)
    monitor = Monitor()
    strategy = LocalSGDStrategy(sync_every=args.sync_every, process_group_backend="gloo",
                                sync_timeout=args.sync_timeout)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
        callbacks=[monitor, ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=args.ckpt_every, save_top_k=1,
                                            monitor="step", mode="max", filename="soak")],
    )
    L.seed_everything(0, verbose=False)
    trainer.fit(MLP(), DataLoader(Regression(), batch_size=16, num_workers=0))
    with open(out / f"rows{trainer.global_rank}.json", "w") as f:
        json.dump(monitor.rows, f)
    trainer.strategy.barrier("soak rows written")
    if trainer.global_rank == 0:
        report(args, out)


def report(args: argparse.Namespace, work: Path) -> None:
    results = Path(args.results)
    rows = []
    for r in range(args.devices):
        rows += json.loads((work / f"rows{r}.json").read_text())
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "soak.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    num_syncs = max(r["sync"] for r in rows)
    decile = max(1, num_syncs // 10)
    print(f"\nsoak: {args.devices} processes, {args.steps} steps, {num_syncs} syncs (every {args.sync_every} steps), "
          f"sync_timeout={args.sync_timeout} s, atomic checkpoint every {args.ckpt_every} steps; "
          f"first vs last decile = syncs 1-{decile} vs {num_syncs - decile + 1}-{num_syncs}")
    print(f"{'rank':>4} {'RSS MB first':>13} {'last':>8} {'growth':>7} {'fds first':>9} {'last':>5} "
          f"{'sync ms first':>13} {'last':>7} {'step ms first':>13} {'last':>7}")
    summary = []
    for r in range(args.devices):
        mine = sorted((x for x in rows if x["rank"] == r), key=lambda x: x["sync"])
        first, last = mine[:decile], mine[-decile:]

        def mean(part, key):
            return statistics.mean(x[key] for x in part)

        line = {"rank": r, "rss_first": mean(first, "rss_mb"), "rss_last": mean(last, "rss_mb"),
                "fds_first": mean(first, "open_fds"), "fds_last": mean(last, "open_fds"),
                "sync_first": statistics.median(x["sync_ms"] for x in first),
                "sync_last": statistics.median(x["sync_ms"] for x in last),
                "step_first": mean(first, "step_ms"), "step_last": mean(last, "step_ms")}
        summary.append(line)
        print(f"{r:>4} {line['rss_first']:>13.1f} {line['rss_last']:>8.1f} "
              f"{line['rss_last'] - line['rss_first']:>+7.1f} {line['fds_first']:>9.0f} {line['fds_last']:>5.0f} "
              f"{line['sync_first']:>13.2f} {line['sync_last']:>7.2f} {line['step_first']:>13.2f} "
              f"{line['step_last']:>7.2f}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no soak.png")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in range(args.devices):
        mine = sorted((x for x in rows if x["rank"] == r), key=lambda x: x["sync"])
        steps = [x["step"] for x in mine]
        axes[0].plot(steps, [x["rss_mb"] for x in mine], label=f"rank {r}")
        axes[1].plot(steps, [x["sync_ms"] for x in mine], label=f"rank {r}", lw=0.8)
        axes[2].plot(steps, [x["step_ms"] for x in mine], label=f"rank {r}", lw=0.8)
    axes[0].set(title="resident memory (RSS)", xlabel="step", ylabel="MB")
    axes[1].set(title="sync wall time", xlabel="step", ylabel="ms", yscale="log")
    axes[2].set(title="mean inner step since last sync", xlabel="step", ylabel="ms")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"soak: {args.devices} CPU processes, {args.steps} steps, {num_syncs} syncs, checkpoint every "
                 f"{args.ckpt_every} steps")
    fig.tight_layout()
    fig.savefig(results / "soak.png", dpi=110)
    print(f"wrote {results / 'soak.csv'} and {results / 'soak.png'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--sync-every", type=int, default=16)
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--sync-timeout", type=float, default=300.0)
    p.add_argument("--work", default=None, help="scratch folder (default: a new temp folder)")
    p.add_argument("--results", default=str(RESULTS), help="where soak.csv and soak.png go")
    args = p.parse_args()
    if args.work is None:  # rank 0 picks it; Lightning's launcher passes it on to the other ranks through argv
        import tempfile

        args.work = tempfile.mkdtemp(prefix="lsgd_soak_")
        sys.argv += ["--work", args.work]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    train(args)


if __name__ == "__main__":
    main()
