"""DDP vs local SGD (model averaging) vs DiLoCo at equal parameters, tokens and steps.

He, Zhuang & Wu (2024) ask whether local SGD matches DDP when both get the same model, the same number of tokens and
the same number of optimizer steps. Every run here trains the example GPT with the same seed, data order, batch size,
learning-rate schedule (AdamW inner optimizer, warm-up + cosine) and number of steps; only the strategy differs:

* ``ddp``:     Lightning's DDPStrategy, gradients all-reduced at every step;
* ``average``: LocalSGDStrategy, outer_optimizer="average" (plain model averaging every H steps);
* ``diloco``:  LocalSGDStrategy, outer_optimizer="diloco" (outer Nesterov SGD, lr 0.7, momentum 0.9, every H steps).

Local SGD and DiLoCo start with ``--local-warmup`` fully synchronous steps (the strategy's ``warmup_steps``:
gradients all-reduced across the workers, post-local SGD; default 64 of 512), then sync every H steps.

The validation loss is measured periodically on the same fixed held-out windows (the end of TextDataModule's token
stream), and plotted against tokens and against training wall clock (evaluation time excluded).

    python benchmarks/equal_compute.py                  # small default: GPT micro, 2 CPU processes, ~1.5 min
    python benchmarks/equal_compute.py --sync-every 16 64
    python benchmarks/equal_compute.py --local-warmup 0 --out-name equal_compute_nowarmup   # no synchronous start
    python benchmarks/equal_compute.py --learning-rate 1e-3 6e-3 --modes ddp average --out-name equal_compute_lr
    python benchmarks/equal_compute.py --full           # real hardware: GPT medium, 8000 steps, H = 16, 64, 256

Writes benchmarks/results/equal_compute.csv (one row per run), equal_compute_curves.csv (every evaluation),
equal_compute.png and equal_compute.md (the table for benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import sys
import time

import harness as h

#: The library's "diloco" preset (outer Nesterov SGD): runs with other outer settings pass them explicitly.
DILOCO_PRESET = dict(lr=0.7, momentum=0.9, nesterov=True)
# warmup: the inner lr warm-up (AdamW); local_warmup: the strategy's fully synchronous steps (post-local SGD).
PRESETS = {
    # Small default (see benchmarks/README.md, section 1, for why this setting): 512 steps of batch 8 per process at
    # lr 2e-3, H = 16, the first 64 steps (12.5%) fully synchronous. The previous default (1024 steps, batch 16,
    # lr 3e-3, no synchronous start) is `--steps 1024 --batch-size 16 --learning-rate 3e-3 --warmup 50 --local-warmup 0`.
    "default": dict(size="micro", steps=512, batch_size=8, block_size=128, sync_every=[16], eval_every=64,
                    learning_rate=2e-3, warmup=30, devices=2, val_windows=256, local_warmup=64, outer_lr=0.7,
                    outer_momentum=0.9),
    "full": dict(size="medium", steps=8192, batch_size=32, block_size=256, sync_every=[16, 64, 256], eval_every=256,
                 learning_rate=1e-3, warmup=400, devices=8, val_windows=1024, local_warmup=0, outer_lr=0.7,
                 outer_momentum=0.9),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the real-hardware preset (see PRESETS)")
    p.add_argument("--size", help="GPT size from GPT_SIZES")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--block-size", type=int)
    p.add_argument("--sync-every", type=int, nargs="+", help="H values (local SGD and DiLoCo run at each)")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (a multiple of every H)")
    p.add_argument("--learning-rate", type=float, nargs="+", help="peak AdamW lr; several: every mode at each")
    p.add_argument("--devices", type=int)
    p.add_argument("--accelerator", default=None, help="cpu (default) or gpu (NCCL)")
    p.add_argument("--warmup", type=int, help="inner AdamW learning-rate warm-up steps (then cosine)")
    p.add_argument("--local-warmup", type=int, help="fully synchronous steps before local SGD / DiLoCo start "
                   "(the strategy's warmup_steps, post-local SGD; a multiple of every H); 0 = none")
    p.add_argument("--outer-lr", type=float, help="DiLoCo's outer Nesterov-SGD learning rate (library preset: 0.7)")
    p.add_argument("--outer-momentum", type=float, help="DiLoCo's outer momentum (library preset: 0.9)")
    p.add_argument("--seed", type=int, default=1234, help="model init and data order (the harness default 1234)")
    p.add_argument("--modes", nargs="+", default=["ddp", "average", "diloco"])
    p.add_argument("--out-name", default="equal_compute", help="file names under benchmarks/results/")
    args = p.parse_args()
    cfg = dict(PRESETS["full" if args.full else "default"])
    cfg["learning_rate"] = [cfg["learning_rate"]]
    for key in ("size", "steps", "batch_size", "block_size", "sync_every", "eval_every", "learning_rate", "devices",
                "warmup", "local_warmup", "outer_lr", "outer_momentum"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    accelerator = args.accelerator or ("gpu" if args.full else "cpu")
    for H in cfg["sync_every"]:
        if cfg["eval_every"] % H or cfg["steps"] % H:
            p.error(f"--eval-every and --steps must be multiples of every H (H={H}): local-SGD workers hold the same "
                    "model only right after a sync")
        if cfg["local_warmup"] % H:
            p.error(f"--local-warmup must be a multiple of every H (H={H}): evaluations run right after a sync")
        if H < 16 and "diloco" in args.modes:
            print(f"note: DiLoCo's outer lr 0.7 / momentum 0.9 is meant for H >= 16 (got H={H})")

    diloco_outer = dict(lr=cfg["outer_lr"], momentum=cfg["outer_momentum"], nesterov=True)
    preset_outer = diloco_outer == DILOCO_PRESET
    started = time.time()
    lrs = cfg["learning_rate"]
    runs = []
    for lr in lrs:
        model = dict(size=cfg["size"], learning_rate=lr, warmup_steps=cfg["warmup"], max_steps=cfg["steps"])
        common = dict(steps=cfg["steps"], model=model, batch_size=cfg["batch_size"], block_size=cfg["block_size"],
                      devices=cfg["devices"], eval_every=cfg["eval_every"], val_windows=cfg["val_windows"],
                      accelerator=accelerator, seed=args.seed)
        for mode in args.modes:
            for H in ([1] if mode == "ddp" else cfg["sync_every"]):
                name = "DDP" if mode == "ddp" else f"{'local SGD' if mode == 'average' else 'DiLoCo'} H={H}"
                if len(lrs) > 1:
                    name += f", lr {lr:g}"
                t0 = time.time()
                local = dict(local_warmup_steps=cfg["local_warmup"]) if mode != "ddp" else {}
                if mode == "diloco" and not preset_outer:
                    local["outer"] = diloco_outer
                r = h.launch(h.run_config(name, mode, sync_every=H, **common, **local))
                r["lr"] = lr
                print(f"{name}: final val loss {r['final_val_loss']:.4f}, train {r['train_seconds']:.1f} s "
                      f"(process {time.time() - t0:.0f} s)", flush=True)
                runs.append(r)

    rows, curves = [], []
    for r in runs:
        ddp = next((d for d in runs if d["mode"] == "ddp" and d["lr"] == r["lr"]), None)
        # cross-group bytes per step, the warm-up's gradient all-reduces included
        bytes_per_step = (r["bytes_sent"] + r.get("warmup_bytes", 0)) / r["steps"]
        row = dict(run=r["name"], mode=r["mode"], H=r["sync_every"], lr=r["lr"], steps=r["steps"], tokens=r["tokens"],
                   params=r["params"], non_embedding_params=r["non_embedding_params"],
                   final_val_loss=r["final_val_loss"], train_seconds=r["train_seconds"],
                   bytes_per_step=bytes_per_step, syncs=r["num_syncs"], outer_state_bytes=r["state_bytes"])
        if ddp is not None:
            row.update(loss_ratio_to_ddp=r["final_val_loss"] / ddp["final_val_loss"],
                       time_ratio_to_ddp=r["train_seconds"] / ddp["train_seconds"],
                       bytes_ratio_to_ddp=bytes_per_step / (ddp["bytes_sent"] / ddp["steps"]))
        rows.append(row)
        curves += [dict(run=r["name"], **c) for c in r["curve"]]
    h.write_csv(h.RESULTS / f"{args.out_name}.csv", rows)
    h.write_csv(h.RESULTS / f"{args.out_name}_curves.csv", curves)
    plot(runs, args.out_name)

    table = h.md_table(rows, [("run", "run"), ("final_val_loss", "final val loss"),
                              ("loss_ratio_to_ddp", "loss / DDP"), ("train_seconds", "train s"),
                              ("time_ratio_to_ddp", "time / DDP"), ("bytes_per_step", "bytes/step/rank"),
                              ("bytes_ratio_to_ddp", "bytes / DDP"), ("syncs", "syncs"),
                              ("outer_state_bytes", "outer state bytes/rank")])
    first = runs[0]
    lr_text = ", ".join(f"{x:g}" for x in lrs)
    text = (f"GPT `{cfg['size']}` ({first['non_embedding_params']:,} non-embedding / {first['params']:,} parameters), "
            f"{cfg['devices']} processes × batch {cfg['batch_size']} × {cfg['block_size']} tokens, {cfg['steps']} "
            f"steps = {first['tokens']:,} tokens per run, AdamW lr {lr_text} (warm-up {cfg['warmup']}, cosine), "
            f"validation on the same {cfg['val_windows']} held-out windows. Local SGD / DiLoCo: "
            + (f"the first {cfg['local_warmup']} steps fully synchronous (post-local SGD warm-up; their gradient "
               "all-reduces are counted in bytes/step)" if cfg["local_warmup"] else "no synchronous warm-up")
            + f"; DiLoCo outer Nesterov SGD lr {cfg['outer_lr']:g}, momentum {cfg['outer_momentum']:g}"
            + (" (the library's preset)" if preset_outer else "") + f".\n\n{table}\n")
    command = "python benchmarks/equal_compute.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    print(text)
    h.write_summary(args.out_name, text, started, command)


def plot(runs: list[dict], out_name: str) -> None:
    plt = h.pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    lows = []
    for r in runs:
        c = r["curve"]
        style = dict(lw=1.6, ls="-" if r["mode"] == "ddp" else "--" if r["mode"] == "average" else ":")
        if len({x["lr"] for x in runs}) > 1:
            style["color"] = f"C{sorted({x['lr'] for x in runs}).index(r['lr'])}"
        a.plot([p["tokens"] / 1e6 for p in c], [p["val_loss"] for p in c], label=r["name"], **style)
        b.plot([p["train_seconds"] for p in c], [p["val_loss"] for p in c], label=r["name"], **style)
        lows.append(min(p["val_loss"] for p in c))
    lo = min(lows)
    hi = max(max(p["val_loss"] for p in r["curve"] if p["step"] >= r["steps"] * 0.1) for r in runs)
    for ax in (a, b):
        ax.set_ylim(lo - 0.03 * (hi - lo), hi + 0.05 * (hi - lo))
        ax.set_ylabel("validation loss (fixed held-out windows)")
        ax.grid(alpha=0.3)
        ax.legend()
    a.set_xlabel("tokens (millions, all workers)")
    b.set_xlabel("training wall clock (s, evaluation excluded)")
    fig.suptitle(f"equal compute: {runs[0]['non_embedding_params']:,} non-embedding params, {runs[0]['steps']} steps, "
                 f"{runs[0]['devices']} processes")
    fig.tight_layout()
    fig.savefig(h.RESULTS / f"{out_name}.png", dpi=100)


if __name__ == "__main__":
    main()
