"""Sync interval sweep: final loss and cross-group bytes vs H, for 2 and 4 worker groups.

For each number of worker groups G (one process per group) the sweep trains the example GPT with DDP (the baseline)
and with local SGD at every H, all at the same steps, tokens and seed, and reports

* the final validation loss on the fixed held-out windows, and its ratio to DDP's at the same G;
* the bytes each rank sent across groups per optimizer step (counted: DDP through a communication hook, local SGD by
  the strategy), their ratio to DDP's, and the expected ratio (syncs / steps; 1/H when H divides the steps);
* the outer state each rank holds (``outer_sync.state_bytes``: the snapshot, plus the momentum for DiLoCo).

    python benchmarks/sync_sweep/sync_sweep.py        # small default: GPT micro, 512 steps, ~6 min on 2 CPU cores
    python benchmarks/sync_sweep/sync_sweep.py --outer diloco  # the same sweep with DiLoCo's outer Nesterov step
    python benchmarks/sync_sweep/sync_sweep.py --full  # real hardware: GPT small, 8192 steps, G = 2, 4, 8

With G = 4 on a 2-core machine four processes share two cores: the loss is unaffected, the wall clock is not
meaningful (and is not reported as a result). When H > steps the only sync is the one at the end of training.

Writes benchmarks/sync_sweep/results/sync_sweep.csv, sync_sweep.png and sync_sweep.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
import harness as h  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

PRESETS = {
    "default": dict(size="micro", steps=512, batch_size=8, block_size=128, sync_every=[1, 4, 16, 64, 256],
                    groups=[2, 4], learning_rate=3e-3, warmup=30, val_windows=256),
    "full": dict(size="small", steps=8192, batch_size=32, block_size=256, sync_every=[1, 4, 16, 64, 256, 1024],
                 groups=[2, 4, 8], learning_rate=1.5e-3, warmup=400, val_windows=1024),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true")
    p.add_argument("--size")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--sync-every", type=int, nargs="+")
    p.add_argument("--groups", type=int, nargs="+", help="worker-group counts (one process per group)")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--outer", default="average", choices=["average", "diloco"])
    p.add_argument("--accelerator", default=None)
    args = p.parse_args()
    cfg = dict(PRESETS["full" if args.full else "default"])
    for key in ("size", "steps", "batch_size", "block_size", "sync_every", "groups", "learning_rate"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    accelerator = args.accelerator or ("gpu" if args.full else "cpu")
    started = time.time()
    model = dict(size=cfg["size"], learning_rate=cfg["learning_rate"], warmup_steps=cfg["warmup"],
                 max_steps=cfg["steps"])
    notes = []
    for H in cfg["sync_every"]:
        if H > cfg["steps"]:
            notes.append(f"H={H} > {cfg['steps']} steps: the only sync is the one at the end of training "
                         "(one-shot averaging).")
        elif cfg["steps"] % H:
            notes.append(f"H={H} does not divide {cfg['steps']} steps: a last sync at the end of training closes the "
                         "partial interval.")
    eval_every = math.lcm(*[H for H in cfg["sync_every"] if H <= cfg["steps"]]) if cfg["sync_every"] else 0
    eval_every = eval_every if eval_every <= cfg["steps"] else 0

    rows = []
    for G in cfg["groups"]:
        common = dict(steps=cfg["steps"], model=model, batch_size=cfg["batch_size"], block_size=cfg["block_size"],
                      devices=G, val_windows=cfg["val_windows"], accelerator=accelerator, eval_every=eval_every)
        ddp = h.launch(h.run_config(f"DDP G={G}", "ddp", **common))
        ddp_bytes = ddp["bytes_sent"] / ddp["steps"]
        print(f"G={G} DDP: loss {ddp['final_val_loss']:.4f}, {ddp_bytes:,.0f} bytes/step/rank", flush=True)
        rows.append(dict(G=G, H="DDP", mode="ddp", steps=ddp["steps"], tokens=ddp["tokens"],
                         final_val_loss=ddp["final_val_loss"], loss_ratio_to_ddp=1.0, bytes_per_step=ddp_bytes,
                         bytes_ratio_to_ddp=1.0, expected_bytes_ratio=1.0, syncs=0, outer_state_bytes=0,
                         train_seconds=ddp["train_seconds"], params=ddp["params"]))
        for H in cfg["sync_every"]:
            r = h.launch(h.run_config(f"{args.outer} G={G} H={H}", args.outer, sync_every=H, **common))
            per_step = r["bytes_sent"] / r["steps"]
            expected = r["num_syncs"] / r["steps"]
            rows.append(dict(G=G, H=H, mode=args.outer, steps=r["steps"], tokens=r["tokens"],
                             final_val_loss=r["final_val_loss"],
                             loss_ratio_to_ddp=r["final_val_loss"] / ddp["final_val_loss"], bytes_per_step=per_step,
                             bytes_ratio_to_ddp=per_step / ddp_bytes, expected_bytes_ratio=expected,
                             syncs=r["num_syncs"], outer_state_bytes=r["state_bytes"],
                             wire_bytes_per_step=r["cross_bytes"] / r["steps"],
                             train_seconds=r["train_seconds"], params=r["params"]))
            print(f"G={G} H={H}: loss {r['final_val_loss']:.4f} ({rows[-1]['loss_ratio_to_ddp']:.4f} × DDP), "
                  f"bytes/step {per_step:,.1f} ({rows[-1]['bytes_ratio_to_ddp']:.6f} × DDP, expected "
                  f"{expected:.6f}), {r['num_syncs']} syncs", flush=True)
    h.write_csv(RESULTS / "sync_sweep.csv", rows)
    plot(rows, args.outer)

    table = h.md_table(rows, [("G", "groups G"), ("H", "H"), ("final_val_loss", "final val loss"),
                              ("loss_ratio_to_ddp", "loss / DDP"), ("bytes_per_step", "bytes/step/rank"),
                              ("bytes_ratio_to_ddp", "bytes / DDP"), ("expected_bytes_ratio", "syncs/steps"),
                              ("syncs", "syncs"), ("outer_state_bytes", "outer state bytes/rank")])
    text = (f"GPT `{cfg['size']}` ({rows[0]['params']:,} parameters), outer optimizer `{args.outer}`, "
            f"{cfg['steps']} steps, batch {cfg['batch_size']} × {cfg['block_size']} tokens per process (one process "
            f"per group), AdamW lr {cfg['learning_rate']}, same seed and data order for every run.\n\n{table}\n")
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    print(text)
    command = "python benchmarks/sync_sweep/sync_sweep.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    h.write_summary(RESULTS / "sync_sweep.md", text, started, command)


def plot(rows: list[dict], outer: str) -> None:
    plt = h.pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, G in enumerate(sorted({r["G"] for r in rows})):
        color = f"C{i}"
        local = [r for r in rows if r["G"] == G and r["mode"] != "ddp"]
        ddp = next(r for r in rows if r["G"] == G and r["mode"] == "ddp")
        Hs = [r["H"] for r in local]
        a.plot(Hs, [r["final_val_loss"] for r in local], "o-", color=color, label=f"{outer}, G={G}")
        a.axhline(ddp["final_val_loss"], color=color, ls=":", label=f"DDP, G={G}")
        b.plot(Hs, [r["bytes_per_step"] for r in local], "o-", color=color, label=f"{outer}, G={G} (counted)")
        b.plot(Hs, [ddp["bytes_per_step"] * r["expected_bytes_ratio"] for r in local], "x", color="k", ms=8,
               label="DDP × syncs/steps" if i == 0 else None)
        b.axhline(ddp["bytes_per_step"], color=color, ls=":", label=f"DDP, G={G}")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("H (steps between syncs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a.set_ylabel("final validation loss")
    b.set_yscale("log")
    b.set_ylabel("bytes sent across groups per step, per rank")
    fig.suptitle(f"sync sweep: {rows[0]['params']:,} params, {rows[0]['steps']} steps")
    fig.tight_layout()
    fig.savefig(RESULTS / "sync_sweep.png", dpi=100)


if __name__ == "__main__":
    main()
