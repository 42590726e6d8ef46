"""FSDP inside worker groups: cross-group bytes per sync and outer-state memory per rank, for 1, 2 and 4 shards.

Runs the example GPT on 4 CPU processes with ``LocalSGDFSDPStrategy(group_size=S)`` for S = 1, 2, 4 and with
``LocalSGDStrategy(group_size=2)`` (DDP inside the groups) for comparison. Counted per rank by the sync engine:
bytes put into the cross-group all-reduce per sync, and bytes of snapshot + outer optimizer state (DiLoCo: snapshot
and Nesterov momentum).

    python benchmarks/fsdp_shards/fsdp_shards.py  # ~2 minutes on 2 CPU cores

Writes benchmarks/fsdp_shards/results/fsdp_shards.csv and fsdp_shards.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def worker(args: argparse.Namespace) -> None:
    import torch
    import lightning as L

    from lightning_localsgd import LocalSGDFSDPStrategy, LocalSGDStrategy
    from lightning_localsgd.examples.data import TextDataModule
    from lightning_localsgd.examples.gpt import GPT

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    model = GPT(n_layer=2, n_head=4, n_embd=64, block_size=64)
    data = TextDataModule(block_size=64, batch_size=4, max_tokens=300_000)
    common = dict(sync_every=args.sync_every, outer_optimizer="diloco", group_size=args.group_size,
                  process_group_backend="gloo")
    strategy = LocalSGDFSDPStrategy(**common) if args.kind == "fsdp" else LocalSGDStrategy(**common)
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy=strategy, max_steps=args.steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(model, data)
    s = trainer.strategy
    row = {
        "kind": args.kind, "group_size": args.group_size, "groups": 4 // args.group_size,
        "rank": trainer.global_rank, "syncs": s.outer_sync.num_syncs,
        "bytes_per_sync": s.outer_sync.bytes_sent // max(1, s.outer_sync.num_syncs),
        "outer_state_bytes": s.outer_sync.state_bytes,
        "model_bytes": sum(p.numel() * 4 for p in model.parameters()),
    }
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--sync-every", type=int, default=4)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kind", default="fsdp", help=argparse.SUPPRESS)
    p.add_argument("--group-size", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "fsdp_shards.jsonl"
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for kind, s in (("fsdp", 1), ("fsdp", 2), ("fsdp", 4), ("ddp", 2)):
        subprocess.run([sys.executable, __file__, "--worker", "--kind", kind, "--group-size", str(s), "--steps",
                        str(args.steps), "--sync-every", str(args.sync_every), "--out", str(out)],
                       check=True, env=env, capture_output=True)
        print(f"{kind} group_size={s}: done", flush=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    out.unlink()
    rows.sort(key=lambda r: (r["kind"], r["group_size"], r["rank"]))
    with open(RESULTS / "fsdp_shards.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["cross_bytes_per_sync_all_ranks"])
        w.writeheader()
        for r in rows:
            same = [x for x in rows if x["kind"] == r["kind"] and x["group_size"] == r["group_size"]]
            w.writerow({**r, "cross_bytes_per_sync_all_ranks": sum(x["bytes_per_sync"] for x in same)})
    model_bytes = rows[0]["model_bytes"]
    print(f"model: {model_bytes:,} bytes fp32; DiLoCo outer state per rank = snapshot + momentum")
    print(f"{'variant':<22}{'bytes/sync/rank (max)':>24}{'all ranks':>12}{'outer state/rank (max)':>25}"
          f"{'÷ model':>10}")
    summary = []
    for kind, s in (("fsdp", 1), ("fsdp", 2), ("fsdp", 4), ("ddp", 2)):
        same = [x for x in rows if x["kind"] == kind and x["group_size"] == s]
        per_rank = max(x["bytes_per_sync"] for x in same)
        total = sum(x["bytes_per_sync"] for x in same)
        state = max(x["outer_state_bytes"] for x in same)
        summary.append((f"{kind} S={s}", state))
        print(f"{kind + ' group_size=' + str(s):<22}{per_rank:>24,}{total:>12,}{state:>25,}{state / model_bytes:>10.3f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([n for n, _ in summary], [v / model_bytes for _, v in summary])
        ax.set_ylabel("outer state per rank ÷ model bytes")
        ax.set_title("DiLoCo outer state per rank (snapshot + momentum)")
        fig.tight_layout()
        fig.savefig(RESULTS / "fsdp_shards.png", dpi=100)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
