"""DDP vs local SGD (model averaging) vs DiLoCo at equal parameters, tokens and steps.

He, Zhuang & Wu (2024) ask whether local SGD matches DDP when both get the same model, the same number of tokens and
the same number of optimizer steps. Every run here trains the example GPT with the same seed, data order, batch size,
learning-rate schedule (AdamW inner optimizer, warm-up + cosine) and number of steps; only the strategy differs:

* ``ddp``:     Lightning's DDPStrategy, gradients all-reduced at every step;
* ``average``: LocalSGDStrategy, outer_optimizer="average" (plain model averaging every H steps);
* ``diloco``:  LocalSGDStrategy, outer_optimizer="diloco" (outer Nesterov SGD, lr 0.7, momentum 0.9, every H steps).

Local SGD and DiLoCo start with ``--local-warmup`` fully synchronous steps (the strategy's ``warmup_steps``:
gradients all-reduced across the workers, post-local SGD; default 64 of 512 = 1/8, the README's suggested warm-up),
then sync every H steps. The default runs this recipe, unchanged, at 3 seeds and H = 16 and 64, and reports the
spread over seeds of each loss ratio to DDP (DDP at the same seed): what a user should expect, not the best setting.
With several ``--outer-lr`` values, DiLoCo runs at each (DDP and averaging once per seed).

The validation loss is measured periodically on the same fixed held-out windows (the end of TextDataModule's token
stream), and plotted against tokens and against training wall clock (evaluation time excluded).

    python benchmarks/equal_compute/equal_compute.py    # the default recipe: GPT micro, 3 seeds, H = 16 and 64, ~15 min
    python benchmarks/equal_compute/equal_compute.py --seeds 1234 --sync-every 16 \
        --out-name equal_compute_one  # one run each
    python benchmarks/equal_compute/equal_compute.py --seeds 1234 --modes ddp diloco --outer-lr 0.4 0.6 0.8 1.0 1.2 \
        --sync-every 16 64 --out-name equal_compute_outer_lr   # DiLoCo's outer lr sweep at the default setting
    python benchmarks/equal_compute/equal_compute.py --local-warmup 0 \
        --out-name equal_compute_nowarmup  # no synchronous start
    python benchmarks/equal_compute/equal_compute.py --learning-rate 1e-3 6e-3 --modes ddp average \
        --out-name equal_compute_lr
    python benchmarks/equal_compute/equal_compute.py --gpu  # one large GPU, <= 8 min: GPT large (38M), bf16, 3 seeds
    python benchmarks/equal_compute/equal_compute.py --full  # 8 GPUs: GPT medium, 8192 steps, H = 16, 64, 256

Writes benchmarks/equal_compute/results/equal_compute.csv (one row per run), equal_compute_curves.csv (every
evaluation),
equal_compute.png and equal_compute.md (the table for its README).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
import harness as h  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

#: The library's "diloco" preset (outer Nesterov SGD): runs with other outer settings pass them explicitly.
DILOCO_PRESET = dict(lr=0.7, momentum=0.9, nesterov=True)
# warmup: the inner lr warm-up (AdamW); local_warmup: the strategy's fully synchronous steps (post-local SGD).
PRESETS = {
    # Small default (see its README for why this setting): 512 steps of batch 8 per process at
    # lr 2e-3, H = 16 and 64, 3 seeds, the first 64 steps (1/8) fully synchronous. The previous default (1024 steps, batch 16,
    # lr 3e-3, no synchronous start) is `--steps 1024 --batch-size 16 --learning-rate 3e-3 --warmup 50 --local-warmup 0`.
    "default": dict(size="micro", steps=512, batch_size=8, block_size=128, sync_every=[16, 64], eval_every=64,
                    learning_rate=2e-3, warmup=30, devices=2, val_windows=256, local_warmup=64, outer_lr=[0.7],
                    outer_momentum=0.9, seeds=[1234, 1, 2]),
    # one large GPU, <= 8 min: GPT large (38M non-embedding), 2 ranks per run sharing the GPU over gloo, bf16, 5 runs
    # at a time; 2M tokens per run (what 15 runs of 38M parameters allow in 8 min: far from converged)
    "gpu": dict(size="large", steps=512, batch_size=8, block_size=256, sync_every=[16, 64], eval_every=64,
                learning_rate=1e-3, warmup=50, devices=2, val_windows=1024, local_warmup=64, outer_lr=[0.7],
                outer_momentum=0.9, seeds=[1234, 1, 2], precision="bf16-mixed", share_gpu=True, jobs=5),
    "full": dict(size="medium", steps=8192, batch_size=32, block_size=256, sync_every=[16, 64, 256], eval_every=256,
                 learning_rate=1e-3, warmup=400, devices=8, val_windows=1024, local_warmup=0, outer_lr=[0.7],
                 outer_momentum=0.9, seeds=[1234]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--full", action="store_true", help="the 8-GPU preset (see PRESETS)")
    preset.add_argument("--gpu", action="store_true", help="the one-GPU preset, <= 8 min (see PRESETS)")
    p.add_argument("--jobs", type=int, help="runs at a time (default: the preset's; 1 on CPU)")
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
    p.add_argument("--outer-lr", type=float, nargs="+",
                   help="DiLoCo's outer Nesterov-SGD learning rate (library preset: 0.7); several: DiLoCo at each")
    p.add_argument("--outer-momentum", type=float, help="DiLoCo's outer momentum (library preset: 0.9)")
    p.add_argument("--seeds", type=int, nargs="+", help="model init and data order; every run at each seed "
                   "(default 1234 1 2; 1234 is the harness default)")
    p.add_argument("--modes", nargs="+", default=["ddp", "average", "diloco"])
    p.add_argument("--out-name", default="equal_compute", help="file names under benchmarks/equal_compute/results/")
    args = p.parse_args()
    cfg = dict(PRESETS["full" if args.full else "gpu" if args.gpu else "default"])
    cfg["learning_rate"] = [cfg["learning_rate"]]
    for key in ("size", "steps", "batch_size", "block_size", "sync_every", "eval_every", "learning_rate", "devices",
                "warmup", "local_warmup", "outer_lr", "outer_momentum", "seeds"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    accelerator = args.accelerator or ("gpu" if args.full or args.gpu else "cpu")
    for H in cfg["sync_every"]:
        if cfg["eval_every"] % H or cfg["steps"] % H:
            p.error(f"--eval-every and --steps must be multiples of every H (H={H}): local-SGD workers hold the same "
                    "model only right after a sync")
        if cfg["local_warmup"] % H:
            p.error(f"--local-warmup must be a multiple of every H (H={H}): evaluations run right after a sync")
        if H < 16 and "diloco" in args.modes:
            print(f"note: DiLoCo's outer lr 0.7 / momentum 0.9 is meant for H >= 16 (got H={H})")

    started = time.time()
    lrs, outer_lrs, seeds = cfg["learning_rate"], cfg["outer_lr"], cfg["seeds"]
    todo = []  # (name, meta, config) of every run, launched `jobs` at a time
    for seed in seeds:
        for lr in lrs:
            model = dict(size=cfg["size"], learning_rate=lr, warmup_steps=cfg["warmup"], max_steps=cfg["steps"])
            common = dict(steps=cfg["steps"], model=model, batch_size=cfg["batch_size"], block_size=cfg["block_size"],
                          devices=cfg["devices"], eval_every=cfg["eval_every"], val_windows=cfg["val_windows"],
                          accelerator=accelerator, seed=seed,
                          **{k: cfg[k] for k in ("precision", "share_gpu") if cfg.get(k)})
            for mode in args.modes:
                for H in ([1] if mode == "ddp" else cfg["sync_every"]):
                    for outer_lr in (outer_lrs if mode == "diloco" else [None]):
                        name = run_name(mode, H, lr if len(lrs) > 1 else None,
                                        outer_lr if len(outer_lrs) > 1 else None, seed if len(seeds) > 1 else None)
                        local = dict(local_warmup_steps=cfg["local_warmup"]) if mode != "ddp" else {}
                        outer = dict(lr=outer_lr, momentum=cfg["outer_momentum"], nesterov=True)
                        if mode == "diloco" and outer != DILOCO_PRESET:
                            local["outer"] = outer
                        meta = dict(lr=lr, seed=seed, outer_lr=outer_lr if mode == "diloco" else "")
                        todo.append((name, meta, h.run_config(name, mode, sync_every=H, **common, **local)))

    def one(item: tuple) -> dict:
        name, meta, config = item
        t0 = time.time()
        r = dict(h.launch(config), **meta)
        print(f"{name}: final val loss {r['final_val_loss']:.4f}, train {r['train_seconds']:.1f} s "
              f"(process {time.time() - t0:.0f} s)", flush=True)
        return r

    with ThreadPoolExecutor(max_workers=args.jobs or cfg.get("jobs", 1)) as pool:
        runs = list(pool.map(one, todo))

    rows, curves = [], []
    for r in runs:
        ddp = next((d for d in runs if d["mode"] == "ddp" and d["lr"] == r["lr"] and d["seed"] == r["seed"]), None)
        # cross-group bytes per step, the warm-up's gradient all-reduces included
        bytes_per_step = (r["bytes_sent"] + r.get("warmup_bytes", 0)) / r["steps"]
        row = dict(run=r["name"], mode=r["mode"], H=r["sync_every"], lr=r["lr"], outer_lr=r["outer_lr"],
                   seed=r["seed"], steps=r["steps"], tokens=r["tokens"], params=r["params"],
                   non_embedding_params=r["non_embedding_params"], final_val_loss=r["final_val_loss"],
                   train_seconds=r["train_seconds"], bytes_per_step=bytes_per_step, syncs=r["num_syncs"],
                   outer_state_bytes=r["state_bytes"])
        if ddp is not None:
            row.update(loss_ratio_to_ddp=r["final_val_loss"] / ddp["final_val_loss"],
                       time_ratio_to_ddp=r["train_seconds"] / ddp["train_seconds"],
                       bytes_ratio_to_ddp=bytes_per_step / (ddp["bytes_sent"] / ddp["steps"]))
        rows.append(row)
        curves += [dict(run=r["name"], **c) for c in r["curve"]]
    spread = seed_spread(rows)
    h.write_csv(RESULTS / f"{args.out_name}.csv", rows)
    if len(seeds) > 1:
        h.write_csv(RESULTS / f"{args.out_name}_seeds.csv", spread)
    h.write_csv(RESULTS / f"{args.out_name}_curves.csv", curves)
    plot([r for r in runs if r["seed"] == seeds[0]], args.out_name)

    table = h.md_table(rows, [("run", "run"), ("final_val_loss", "final val loss"),
                              ("loss_ratio_to_ddp", "loss / DDP"), ("train_seconds", "train s"),
                              ("time_ratio_to_ddp", "time / DDP"), ("bytes_per_step", "bytes/step/rank"),
                              ("bytes_ratio_to_ddp", "bytes / DDP"), ("syncs", "syncs"),
                              ("outer_state_bytes", "outer state bytes/rank")])
    if len(seeds) > 1:
        table = h.md_table(spread, [("mode", "mode"), ("H", "H"), ("lr", "lr"), ("outer_lr", "outer lr"),
                                    ("ratios", "loss / DDP per seed"), ("mean_s", "mean"),
                                    ("min_s", "min"), ("max_s", "max")]) + "\n\n" + table
    first = runs[0]
    lr_text = ", ".join(f"{x:g}" for x in lrs)
    outer_text = ", ".join(f"{x:g}" for x in outer_lrs)
    text = (f"GPT `{cfg['size']}` ({first['non_embedding_params']:,} non-embedding / {first['params']:,} parameters), "
            f"{cfg['devices']} processes × batch {cfg['batch_size']} × {cfg['block_size']} tokens, {cfg['steps']} "
            f"steps = {first['tokens']:,} tokens per run, AdamW lr {lr_text} (warm-up {cfg['warmup']}, cosine), "
            f"validation on the same {cfg['val_windows']} held-out windows; seeds {', '.join(map(str, seeds))}. "
            "Local SGD / DiLoCo: "
            + (f"the first {cfg['local_warmup']} steps fully synchronous (post-local SGD warm-up; their gradient "
               "all-reduces are counted in bytes/step)" if cfg["local_warmup"] else "no synchronous warm-up")
            + f"; DiLoCo outer Nesterov SGD lr {outer_text}, momentum {cfg['outer_momentum']:g}"
            + (" (the library's preset)" if outer_lrs == [DILOCO_PRESET["lr"]]
               and cfg["outer_momentum"] == DILOCO_PRESET["momentum"] else "") + f".\n\n{table}\n")
    command = " ".join(["python benchmarks/equal_compute/equal_compute.py", *sys.argv[1:]])
    print(text)
    h.write_summary(RESULTS / f"{args.out_name}.md", text, started, command)


def run_name(mode: str, H: int, lr: Optional[float] = None, outer_lr: Optional[float] = None,
             seed: Optional[int] = None) -> str:
    """``DDP``, ``local SGD H=16``, ``DiLoCo H=64, outer lr 1``, with the lr and seed where several are run."""
    name = h.run_label(mode, H)
    if outer_lr is not None:
        name += f", outer lr {outer_lr:g}"
    if lr is not None:
        name += f", lr {lr:g}"
    if seed is not None:
        name += f", seed {seed}"
    return name


def seed_spread(rows: list[dict]) -> list[dict]:
    """Per (mode, H, lr, outer lr): every seed's loss ratio to DDP at the same seed, their mean, min and max."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["mode"] != "ddp" and "loss_ratio_to_ddp" in r:
            groups.setdefault((r["mode"], r["H"], r["lr"], r["outer_lr"]), []).append(r)
    out = []
    for (mode, H, lr, outer_lr), rs in groups.items():
        ratios = [r["loss_ratio_to_ddp"] for r in rs]
        out.append(dict(mode=mode, H=H, lr=lr, outer_lr=outer_lr, seeds=" ".join(str(r["seed"]) for r in rs),
                        ratios=" / ".join(f"{x:.4f}" for x in ratios), mean_ratio=sum(ratios) / len(ratios),
                        min_ratio=min(ratios), max_ratio=max(ratios), n=len(ratios)))
        out[-1].update({f"{k}_s": f"{out[-1][f'{k}_ratio']:.4f}" for k in ("mean", "min", "max")})
    return out


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
    fig.savefig(RESULTS / f"{out_name}.png", dpi=100)


if __name__ == "__main__":
    main()
