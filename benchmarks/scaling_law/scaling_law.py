"""Scaling law of the final loss in model size: DDP vs local SGD (averaging) vs DiLoCo at H = 16 and 64.

The question of He, Zhuang & Wu (2024) and Charles et al. (2025) in their regime: at equal parameters, tokens and
steps, every model trained to at least 20 tokens per non-embedding parameter, does local SGD follow DDP's law?

* **Sizes**: a width ladder of the example GPT (``LADDERS``), non-embedding parameters N from 25K to 0.39M on CPU.
* **Tokens**: ``tokens_per_param`` × N per run (≥ 20), in whole multiples of 64 steps; the batch grows with N so that
  every size runs ~1,000 steps (the same number of syncs at a given H).
* **Hyper-parameters tuned for DDP only**: per size, a small sweep of the AdamW learning rate (factors of 2,
  extended until the best value is bracketed, starting at the previous size's best); the batch is set by the rule
  above, not swept. The best DDP learning rate is then used **unchanged** for local SGD and DiLoCo: nothing is tuned
  for them.
* **Local SGD and DiLoCo**: the library's default recipe, the strategy's presets (``"average"``; ``"diloco"`` = outer
  Nesterov SGD lr 0.7, momentum 0.9) with the first 1/8 of the steps fully synchronous (``warmup_steps``, the
  README's suggested warm-up, rounded to a multiple of 64), at H = 16 and 64, 2 workers.
* **Seeds**: the smallest two sizes again at a second seed (DDP and all four local runs, same learning rate) for the
  seed-to-seed spread of the loss and of the ratio.

The final validation loss on the fixed held-out windows is fitted per strategy as

    L(N) = A · N^α          (least squares on log L vs log N)
    L(N) = E + A · N^α      (non-linear least squares, E = irreducible loss)

with 95% intervals from a paired bootstrap over the held-out windows (the same resampled windows for every model;
evaluation noise, not seed noise: the seed runs show that). The local-SGD / DDP loss ratio is reported per size, and
its trend in N as the slope of log(ratio) vs log(N) (bootstrap interval as well). Exponents of Charles et al. (2025,
"Scaling Laws for DiLoCo", arXiv:2503.09799; 35M-2.4B parameters, C4) are listed beside: compare signs and rough
magnitudes only.

    python benchmarks/scaling_law/scaling_law.py   # CPU preset in the paper's regime: 4 sizes, ~20 tokens/param
    python benchmarks/scaling_law/scaling_law.py --smoke  # 6-minute pipeline check at 0.5 tokens/param (not the law)
    python benchmarks/scaling_law/scaling_law.py --gpu  # one large GPU, bf16, 10M-150M parameters, <= 8 min
    python benchmarks/scaling_law/scaling_law.py --full  # 8 GPUs: tiny ... large (0.8M -> 38M) at 20 tokens/param
    python benchmarks/scaling_law/scaling_law.py --replot  # redraw the PNG from the CSVs

Every finished run is cached (``--cache-dir``, keyed by its configuration), so an interrupted invocation resumes
where it stopped and a rerun of the same command only redoes the analysis.

Writes benchmarks/scaling_law/results/scaling_law.csv (runs), scaling_law_sweep.csv (the DDP learning-rate sweep),
scaling_law_fits.csv (exponents), scaling_law_trend.csv (ratio vs N), scaling_law.png and scaling_law.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
import harness as h  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

#: Width ladders of the example GPT: name -> (n_layer, n_head, n_embd, per-process batch of block_size tokens).
LADDERS = {
    # CPU: 2 layers, width 32 -> 128. The batch doubles with the width so that every size runs ~1,000 steps.
    "cpu": {"25K": (2, 2, 32, 2), "99K": (2, 4, 64, 8), "0.22M": (2, 4, 96, 16), "0.39M": (2, 4, 128, 32)},
    # the previous smoke ladder (GPT_SIZES nano ... small)
    "smoke": {"nano": (2, 2, 32, 1), "micro": (2, 4, 64, 2), "tiny": (4, 4, 128, 8), "small": (6, 6, 192, 16)},
    # one large GPU (bf16): 0.39M (the CPU ladder's top, for a cross-check) -> 2.2M, about what the paper's regime
    # (>= 20 tokens/param; the DDP sweep, 4 local series, a second seed) allows in 8 minutes (estimate_seconds)
    "gpu": {"0.39M": (2, 4, 128, 16), "0.8M": (4, 4, 128, 32), "1.5M": (5, 5, 160, 64), "2.2M": (5, 6, 192, 80)},
    # 8 GPUs: GPT_SIZES tiny ... large (0.8M -> 38M), ~1,000 steps each
    "full": {"tiny": (4, 4, 128, 8), "small": (6, 6, 192, 32), "medium": (8, 8, 256, 64), "large": (12, 8, 512, 256)},
}
#: local-SGD series of every preset: (mode, H)
SERIES = [("average", 16), ("average", 64), ("diloco", 16), ("diloco", 64)]
PRESETS = {
    # the builtin corpus' default 8M tokens (7.6M for training): the 0.39M runs (8.4M tokens) see 10% of it twice
    "cpu": dict(ladder="cpu", tokens_per_param=20.0, block_size=128, devices=2, val_windows=512, lr_start=1.6e-2,
                sweep=True, seed_sizes=2, seeds=[1234, 1], accelerator="cpu", precision=None,
                corpus_tokens=8_000_000),
    "smoke": dict(ladder="smoke", tokens_per_param=0.5, block_size=128, devices=2, val_windows=256, lr_start=3e-3,
                  sweep=False, seed_sizes=0, seeds=[1234], accelerator="cpu", precision=None, series=[("average", 16)]),
    # 2 ranks per run on one GPU (gloo), 6 runs at a time
    "gpu": dict(ladder="gpu", tokens_per_param=20.0, block_size=256, devices=2, val_windows=1024, lr_start=4e-3,
                sweep=True, seed_sizes=1, seeds=[1234, 1], accelerator="gpu", precision="bf16-mixed",
                share_gpu=True, jobs=6),
    "full": dict(ladder="full", tokens_per_param=20.0, block_size=256, devices=8, val_windows=1024, lr_start=3e-3,
                 sweep=True, seed_sizes=2, seeds=[1234, 1], accelerator="gpu", precision="bf16-mixed"),
}
#: assumptions of estimate_seconds: sustained TFLOP/s of all runs together (one H200-class GPU in bf16 with small
#: models and two ranks over gloo: far below peak; 2 CPU cores: measured 0.03-0.05) and seconds to start a run
GPU_TFLOPS, CPU_TFLOPS, STARTUP_S = 25.0, 0.05, 20.0
#: step counts are whole multiples of this (a multiple of every H, so that each run ends right after a sync)
STEP_QUANTUM = 64
#: learning-rate sweep: factor between neighbours, and the most runs per size
LR_FACTOR, SWEEP_MAX = 2.0, 5
PAPER = [  # Charles et al. 2025 (arXiv:2503.09799), L(N) = A·N^α
    dict(source="Charles et al. 2025", mode="data-parallel", form="A·N^α", alpha=-0.095),
    dict(source="Charles et al. 2025", mode="DiLoCo M=1", form="A·N^α", alpha=-0.096),
    dict(source="Charles et al. 2025", mode="DiLoCo M=8", form="A·N^α", alpha=-0.102),
]


def non_embedding_params(n_layer: int, n_embd: int) -> int:
    from lightning_localsgd.examples.gpt import count_non_embedding_params

    return count_non_embedding_params(n_layer, n_embd)


def plan_size(n_layer: int, n_embd: int, batch: int, cfg: dict) -> dict:
    """Steps (a multiple of STEP_QUANTUM, at least tokens_per_param × N tokens), the inner lr warm-up (10%) and the
    synchronous start of local SGD (1/8 of the steps, rounded down to a multiple of STEP_QUANTUM)."""
    N = non_embedding_params(n_layer, n_embd)
    tokens_per_step = batch * cfg["block_size"] * cfg["devices"]
    steps = max(STEP_QUANTUM, math.ceil(cfg["tokens_per_param"] * N / tokens_per_step / STEP_QUANTUM) * STEP_QUANTUM)
    return dict(N=N, steps=steps, tokens=steps * tokens_per_step, warmup=max(2, steps // 10),
                local_warmup=steps // 8 // STEP_QUANTUM * STEP_QUANTUM)


def sweep_lr(run: Callable[[float], float], start: float, factor: float = LR_FACTOR, max_runs: int = SWEEP_MAX
             ) -> tuple[float, dict[float, float]]:
    """The learning rate of least loss on a ×``factor`` grid, bracketed: ``start``, then ``start·factor``, then
    further up while it improves, else down from ``start/factor`` while it improves. Returns (best, {lr: loss})."""
    losses: dict[float, float] = {}

    def at(lr: float) -> float:
        lr = float(f"{lr:.3g}")
        if lr not in losses:
            losses[lr] = run(lr)
        return losses[lr]

    best = float(f"{start:.3g}")
    at(best)
    for direction in (factor, 1 / factor):
        moved = False
        while len(losses) < max_runs and at(best * direction) < losses[best]:
            best, moved = float(f"{best * direction:.3g}"), True
        if moved or len(losses) >= max_runs:
            break
    return best, losses


def fit_power(N: np.ndarray, L: np.ndarray) -> tuple[float, float]:
    """``L = A·N^α`` by least squares in log-log space: returns (A, α)."""
    alpha, logA = np.polyfit(np.log(N), np.log(L), 1)
    return float(np.exp(logA)), float(alpha)


def fit_offset(N: np.ndarray, L: np.ndarray) -> tuple[float, float, float]:
    """``L = E + A·N^α`` by non-linear least squares (0 <= E < min L, α < 0): returns (E, A, α), NaNs on failure."""
    from scipy.optimize import curve_fit

    x = np.log(N / N[0])  # parametrize as E + B·exp(α·x) with B = A·N0^α: well conditioned

    def f(x, E, B, alpha):
        return E + B * np.exp(alpha * x)

    try:
        A0, a0 = fit_power(N, L)
        p0 = (0.5 * L.min(), L[0] - 0.5 * L.min(), min(a0 * 2, -0.01))
        (E, B, alpha), _ = curve_fit(f, x, L, p0=p0, bounds=([0.0, 0.0, -5.0], [L.min() * 0.999, np.inf, 0.0]),
                                     maxfev=20000)
        return float(E), float(B / N[0] ** alpha), float(alpha)
    except (RuntimeError, ValueError):  # no convergence (counted as a failed fit), not a missing scipy
        return float("nan"), float("nan"), float("nan")


def ratio_slope(N: np.ndarray, ratio: np.ndarray) -> float:
    """Trend of the loss ratio in model size: the slope of log(ratio) vs log(N) (0 = constant, > 0 = growing)."""
    return float(np.polyfit(np.log(N), np.log(ratio), 1)[0])


def bootstrap(N: np.ndarray, per_window: np.ndarray, ref_window: Optional[np.ndarray] = None, reps: int = 1000,
              seed: int = 0) -> dict:
    """Paired bootstrap over held-out windows (``per_window``: sizes × windows; ``ref_window``: DDP's, for the ratio
    trend): 95% intervals of α (both fits) and of the ratio's slope."""
    rng = np.random.default_rng(seed)
    n = per_window.shape[1]
    a_pow, a_off, slope = [], [], []
    for _ in range(reps):
        idx = rng.integers(0, n, n)
        L = per_window[:, idx].mean(1)
        a_pow.append(fit_power(N, L)[1])
        a_off.append(fit_offset(N, L)[2])
        if ref_window is not None:
            slope.append(ratio_slope(N, L / ref_window[:, idx].mean(1)))
    a_pow, a_off = np.array(a_pow), np.array(a_off)
    ok = np.isfinite(a_off)

    def ci(a: np.ndarray) -> tuple[float, float]:
        return (float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5))) if len(a) else (math.nan, math.nan)

    out = dict(pow=ci(a_pow), off=ci(a_off[ok]), off_failed=int((~ok).sum()), reps=reps)
    if ref_window is not None:
        out["slope"] = ci(np.array(slope))
    return out


#: process seconds of every distinct run this invocation used (cached ones with their original time)
PROCESS_SECONDS: dict[str, float] = {}


def cached_launch(config: dict, cache_dir: Path) -> dict:
    """:func:`harness.launch`, reusing the result of an identical configuration (its name aside) finished earlier."""
    key = hashlib.sha256(json.dumps({**config, "name": ""}, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir / f"{key}.json"
    if path.exists():
        result = json.loads(path.read_text())
    else:
        result = h.launch(config, timeout=7200)
        cache_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    PROCESS_SECONDS[key] = result["process_seconds"]
    return dict(result, name=config["name"])


def estimate_seconds(cfg: dict, tflops: float, startup_s: float) -> float:
    """Rough wall clock of a preset: 6·N_total·tokens FLOPs per run (plus attention) at ``tflops`` sustained in all,
    plus ``startup_s`` per run, ``cfg["jobs"]`` runs at a time; the DDP sweep counts as 3 runs per size."""
    total, count = 0.0, 0
    series = cfg.get("series", SERIES)
    for i, (n_layer, n_head, n_embd, batch) in enumerate(LADDERS[cfg["ladder"]].values()):
        p = plan_size(n_layer, n_embd, batch, cfg)
        n_total = p["N"] + 256 * n_embd  # the tied embedding / head matmul
        flops = 6 * p["tokens"] * (n_total + n_layer * cfg["block_size"] * n_embd)  # + attention scores
        runs = (3 if cfg["sweep"] else 1) + len(series)
        runs += (1 + len(series)) * (len(cfg["seeds"]) - 1) * (i < cfg["seed_sizes"])
        total += runs * flops / (tflops * 1e12)
        count += runs
    return total + startup_s * math.ceil(count / cfg.get("jobs", 1))


def corpus_tokens(cfg: dict) -> int:
    """The corpus cap of every run of a preset: one cap for all sizes, because the held-out windows are the start of
    the corpus' last 5% and must be the same for every model. ``cfg["corpus_tokens"]``, else the least cap with
    which no run of the ladder sees a token twice."""
    if cfg.get("corpus_tokens"):
        return int(cfg["corpus_tokens"])
    need = max(plan_size(n_layer, n_embd, batch, cfg)["tokens"] for n_layer, _, n_embd, batch in
               LADDERS[cfg["ladder"]].values())
    return max(h.DEFAULT_DATA["max_tokens"], math.ceil(need / (1 - h.DEFAULT_DATA["val_fraction"])) + 1)


def run_config(name: str, mode: str, H: int, size: str, lr: float, seed: int, cfg: dict) -> dict:
    """One run of the ladder: size ``size`` at learning rate ``lr``, the size's planned steps and batch."""
    n_layer, n_head, n_embd, batch = LADDERS[cfg["ladder"]][size]
    p = plan_size(n_layer, n_embd, batch, cfg)
    model = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, learning_rate=lr, warmup_steps=p["warmup"],
                 max_steps=p["steps"])
    local = dict(local_warmup_steps=p["local_warmup"]) if mode != "ddp" else {}
    extra = {k: cfg[k] for k in ("precision", "share_gpu") if cfg.get(k)}
    data = dict(max_tokens=corpus_tokens(cfg))
    return h.run_config(name, mode, steps=p["steps"], model=model, batch_size=batch, block_size=cfg["block_size"],
                        devices=cfg["devices"], sync_every=H, eval_every=0, val_windows=cfg["val_windows"],
                        seed=seed, accelerator=cfg["accelerator"], data=data, **local, **extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_mutually_exclusive_group()
    for name in ("smoke", "gpu", "full"):
        group.add_argument(f"--{name}", action="store_true", help=f"the {name!r} preset (see PRESETS)")
    p.add_argument("--sizes", nargs="+", help="names from the preset's ladder (LADDERS)")
    p.add_argument("--tokens-per-param", type=float)
    p.add_argument("--devices", type=int)
    p.add_argument("--jobs", type=int, help="runs at a time (default: the preset's; 1 on CPU): several small runs "
                   "share one GPU")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "lightning_localsgd" / "scaling_law",
                   help="finished runs, keyed by configuration (resume; rerun the analysis without training)")
    p.add_argument("--out-name", default="scaling_law", help="file names under benchmarks/scaling_law/results/")
    p.add_argument("--local-lr-factors", type=float, nargs="+", metavar="F",
                   help="instead of the report: local SGD / DiLoCo at H=16 with the DDP-tuned lr × each F "
                   "(writes scaling_law_local_lr.*; the default runs come from the cache)")
    p.add_argument("--estimate", action="store_true", help="print the preset's estimated runtime and stop")
    p.add_argument("--replot", action="store_true", help="redraw the PNG from the CSVs of the last run")
    args = p.parse_args()
    if args.replot:
        return replot(args.out_name)
    preset = next((n for n in ("smoke", "gpu", "full") if getattr(args, n)), "cpu")
    cfg = dict(PRESETS[preset])
    for key in ("tokens_per_param", "devices"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    ladder = LADDERS[cfg["ladder"]]
    sizes = args.sizes or list(ladder)
    unknown = [s for s in sizes if s not in ladder]
    if unknown:
        p.error(f"--sizes {' '.join(unknown)}: not in the {preset!r} ladder; choose from {' '.join(ladder)}")
    if len(sizes) < 3 and not args.local_lr_factors:
        p.error("--sizes: at least 3 sizes are needed for the fit with an offset")
    if args.estimate:
        tflops = GPU_TFLOPS if cfg["accelerator"] == "gpu" else CPU_TFLOPS
        minutes = estimate_seconds(cfg, tflops, STARTUP_S) / 60
        print(f"preset {preset!r}: ~{minutes:.1f} min ({tflops:g} TFLOP/s sustained, {STARTUP_S:g} s start-up per run)")
        return
    series = cfg.get("series", SERIES)
    started = time.time()
    jobs = args.jobs or cfg.get("jobs", 1)
    slots = threading.Semaphore(jobs)

    def launch(name: str, mode: str, H: int, size: str, lr: float, seed: int) -> dict:
        with slots:
            return cached_launch(run_config(name, mode, H, size, lr, seed, cfg), args.cache_dir)

    sweep_rows: list[dict] = []

    def train_size(i: int, size: str, lr: float) -> tuple[float, list[dict]]:
        """The size's DDP sweep (from ``lr``), then DDP and every local series at the best lr and each seed."""
        plan = plan_size(ladder[size][0], ladder[size][2], ladder[size][3], cfg)

        def ddp_loss(lr_: float) -> float:
            r = launch(f"DDP {size} lr {lr_:g}", "ddp", 1, size, lr_, cfg["seeds"][0])
            sweep_rows.append(dict(size=size, non_embedding_params=r["non_embedding_params"], lr=lr_,
                                   final_val_loss=r["final_val_loss"], train_seconds=r["train_seconds"]))
            print(f"  sweep {size} lr {lr_:g}: {r['final_val_loss']:.4f} ({r['train_seconds']:.0f} s)", flush=True)
            return r["final_val_loss"]

        if cfg["sweep"]:
            lr, _ = sweep_lr(ddp_loss, lr)
        print(f"{size}: N={plan['N']:,}, {plan['steps']} steps, {plan['tokens']:,} tokens "
              f"({plan['tokens'] / plan['N']:.1f}/param), lr {lr:g}", flush=True)
        todo = [(seed, mode, H) for seed in (cfg["seeds"] if i < cfg["seed_sizes"] else cfg["seeds"][:1])
                for mode, H in [("ddp", 1)] + series]

        def one(seed: int, mode: str, H: int) -> dict:
            name = f"{h.run_label(mode, H)} {size} seed {seed}"
            r = launch(name, mode, H, size, lr, seed)
            r.update(size=size, lr=lr, seed=seed, H=H, local_warmup=plan["local_warmup"] if mode != "ddp" else 0)
            print(f"  {name}: loss {r['final_val_loss']:.4f}, train {r['train_seconds']:.0f} s", flush=True)
            return r

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            return lr, list(pool.map(lambda t: one(*t), todo))

    runs: list[dict] = []
    if jobs == 1:  # one run at a time: each size's sweep starts at the previous size's best learning rate
        lr = cfg["lr_start"]
        for i, size in enumerate(sizes):
            lr, rs = train_size(i, size, lr)
            runs += rs
    else:  # concurrent runs (one GPU shared by several small runs): every size's sweep starts at lr_start
        with ThreadPoolExecutor(max_workers=len(sizes)) as pool:
            for _, rs in pool.map(lambda t: train_size(t[0], t[1], cfg["lr_start"]), enumerate(sizes)):
                runs += rs
        sweep_rows.sort(key=lambda r: (sizes.index(r["size"]), r["lr"]))
    if args.local_lr_factors:
        return local_lr_table(runs, args.local_lr_factors, launch, cfg, started)
    report(runs, sweep_rows, series, sizes, cfg, preset, args, started)


def local_lr_table(runs: list[dict], factors: list[float], launch: Callable, cfg: dict, started: float) -> None:
    """Where the gap comes from (not part of the default, nothing here feeds the targets): local SGD and DiLoCo at
    H = 16 with the DDP-tuned learning rate scaled by each factor, against DDP at its tuned rate."""
    base, rows = cfg["seeds"][0], []
    for ddp in [r for r in runs if r["mode"] == "ddp" and r["seed"] == base]:
        for mode in ("average", "diloco"):
            tuned = next(r for r in runs if r["mode"] == mode and r["H"] == 16 and r["size"] == ddp["size"]
                         and r["seed"] == base)
            for f in sorted({1.0, *factors}, reverse=True):
                lr = float(f"{ddp['lr'] * f:.3g}")
                r = tuned if f == 1.0 else launch(f"{h.run_label(mode, 16)} {ddp['size']} lr {lr:g}", mode, 16,
                                                  ddp["size"], lr, base)
                rows.append(dict(size=ddp["size"], non_embedding_params=ddp["non_embedding_params"], mode=mode,
                                 H=16, lr_factor=f, lr=lr, final_val_loss=r["final_val_loss"],
                                 loss_ratio_to_ddp=r["final_val_loss"] / ddp["final_val_loss"]))
                print(f"  {h.run_label(mode, 16)} {ddp['size']} lr {lr:g} (×{f:g}): "
                      f"{rows[-1]['loss_ratio_to_ddp']:.4f} of DDP", flush=True)
    h.write_csv(RESULTS / "scaling_law_local_lr.csv", rows)
    text = ("Local SGD and DiLoCo (H = 16, the same recipe otherwise) at the DDP-tuned learning rate × factor, seed "
            f"{base}; DDP at its tuned rate. Not tuned for the targets: this shows how much of the gap is the "
            "learning rate.\n\n" + h.md_table(rows, [("size", "size"), ("mode", "mode"), ("lr_factor", "lr factor"),
                                                  ("lr", "lr"), ("final_val_loss", "final val loss"),
                                                  ("loss_ratio_to_ddp", "loss / DDP (tuned)")]) + "\n")
    print(text)
    command = "python benchmarks/scaling_law/scaling_law.py " + " ".join(sys.argv[1:])
    h.write_summary(RESULTS / "scaling_law_local_lr.md", text, started, command)


def report(runs: list[dict], sweep_rows: list[dict], series: list, sizes: list[str], cfg: dict, preset: str,
           args: argparse.Namespace, started: float) -> None:
    """CSVs, fits with bootstrap intervals, the ratio trend, the targets, the plot and the markdown summary."""
    base = cfg["seeds"][0]

    def find(mode: str, H: int, size: str, seed: int) -> Optional[dict]:
        return next((r for r in runs if r["mode"] == mode and r["H"] == H and r["size"] == size
                     and r["seed"] == seed), None)

    rows = []
    for r in runs:
        ddp = find("ddp", 1, r["size"], r["seed"])
        rows.append(dict(mode=r["mode"], H=r["H"] if r["mode"] != "ddp" else "", size=r["size"], seed=r["seed"],
                         non_embedding_params=r["non_embedding_params"], params=r["params"], steps=r["steps"],
                         tokens=r["tokens"], tokens_per_param=r["tokens"] / r["non_embedding_params"], lr=r["lr"],
                         local_warmup=r["local_warmup"], final_val_loss=r["final_val_loss"],
                         loss_ratio_to_ddp=r["final_val_loss"] / ddp["final_val_loss"] if r["mode"] != "ddp" else "",
                         train_seconds=r["train_seconds"], syncs=r["num_syncs"], outer_state_bytes=r["state_bytes"]))
    h.write_csv(RESULTS / f"{args.out_name}.csv", rows)
    h.write_csv(RESULTS / f"{args.out_name}_sweep.csv", sweep_rows)

    N = np.array([find("ddp", 1, s, base)["non_embedding_params"] for s in sizes], dtype=float)
    W_ddp = np.array([find("ddp", 1, s, base)["per_window"] for s in sizes])
    fits, trend = [], []
    for mode, H in [("ddp", 1)] + series:
        W = np.array([find(mode, H, s, base)["per_window"] for s in sizes])
        L = W.mean(1)
        A, alpha = fit_power(N, L)
        E, A2, alpha2 = fit_offset(N, L)
        ci = bootstrap(N, W, None if mode == "ddp" else W_ddp, reps=args.bootstrap)
        label = h.run_label(mode, H)
        fits.append(dict(source="this run", mode=label, form="A·N^α", A=A, E="", alpha=alpha, ci_lo=ci["pow"][0],
                         ci_hi=ci["pow"][1]))
        fits.append(dict(source="this run", mode=label, form="E + A·N^α", A=A2, E=E, alpha=alpha2,
                         ci_lo=ci["off"][0], ci_hi=ci["off"][1], bootstrap_failed=ci["off_failed"]))
        if mode != "ddp":
            ratio = L / W_ddp.mean(1)
            trend.append(dict(mode=label, slope=ratio_slope(N, ratio), ci_lo=ci["slope"][0], ci_hi=ci["slope"][1],
                              **{f"ratio_{s}": float(x) for s, x in zip(sizes, ratio)}))
    h.write_csv(RESULTS / f"{args.out_name}_fits.csv", fits + PAPER,
                ["source", "mode", "form", "alpha", "ci_lo", "ci_hi", "A", "E", "bootstrap_failed"])
    h.write_csv(RESULTS / f"{args.out_name}_trend.csv", trend)
    for t in trend:
        t["ci"] = f"[{t['ci_lo']:.3f}, {t['ci_hi']:.3f}]"
    targets = check_targets(rows, fits, trend, sizes, base)
    plot(rows, fits, series, sizes, base, args.out_name)

    seed_rows = seed_spread(rows, cfg["seeds"])
    lrs = ", ".join(f"{s} {next(r['lr'] for r in rows if r['size'] == s):g}" for s in sizes)
    fits = fits + [dict(f) for f in PAPER]
    for f in fits:
        f["ci"] = f"[{f['ci_lo']:.3f}, {f['ci_hi']:.3f}]" if "ci_lo" in f else ""
        f["alpha_s"] = f"{f['alpha']:.3f}" if f["alpha"] == f["alpha"] else "fit failed"
        f["E_s"] = f"{f['E']:.3f}" if isinstance(f.get("E"), float) else ""
    base_rows = [r for r in rows if r["seed"] == base]
    process_minutes = sum(PROCESS_SECONDS.values() or [r["process_seconds"] for r in runs]) / 60
    text = (f"Preset `{preset}`: sizes {', '.join(sizes)}; ≥ {cfg['tokens_per_param']:g} tokens per non-embedding "
            f"parameter; {cfg['devices']} workers; AdamW (warm-up 10%, cosine to 0.1×); learning rate per size from "
            f"the DDP sweep ({lrs}), used unchanged for local SGD and DiLoCo; local SGD / DiLoCo: the strategy's "
            f"presets, the first 1/8 of the steps synchronous; seeds {', '.join(map(str, cfg['seeds']))}. "
            f"The runs' process time in total: {process_minutes:.1f} min "
            f"({len(PROCESS_SECONDS) or len(runs)} distinct runs; the DDP run at the chosen lr is the sweep's)."
            "\n\n**Targets**\n\n" + h.md_table(targets, [("target", "target"), ("result", "result"),
                                                         ("holds", "holds")])
            + "\n\n**Runs** (seed " + str(base) + ")\n\n"
            + h.md_table(base_rows, [("mode", "mode"), ("H", "H"), ("size", "size"),
                                     ("non_embedding_params", "N (non-emb.)"), ("steps", "steps"),
                                     ("tokens_per_param", "tokens/N"), ("lr", "lr"),
                                     ("final_val_loss", "final val loss"), ("loss_ratio_to_ddp", "loss / DDP"),
                                     ("train_seconds", "train s")])
            + "\n\n**Fits**\n\n" + h.md_table(fits, [("source", "source"), ("mode", "mode"), ("form", "fit"),
                                                             ("alpha_s", "α"), ("ci", "95% bootstrap CI"),
                                                             ("E_s", "E")])
            + "\n\n**Ratio to DDP vs N** (slope of log ratio in log N; > 0: the gap grows with N)\n\n"
            + h.md_table(trend, [("mode", "mode")] + [(f"ratio_{s}", s) for s in sizes]
                         + [("slope", "slope"), ("ci", "95% bootstrap CI")])
            + ("\n\n**Seeds**\n\n" + h.md_table(seed_rows, [("size", "size"), ("mode", "mode"), ("H", "H"),
                                                            ("losses", "final loss per seed"),
                                                            ("ratios", "loss / DDP per seed")])
               if seed_rows else "")
            + "\n\n**DDP learning-rate sweep**\n\n"
            + h.md_table(sweep_rows, [("size", "size"), ("lr", "lr"), ("final_val_loss", "final val loss")]) + "\n")
    print(text)
    command = "python benchmarks/scaling_law/scaling_law.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    h.write_summary(RESULTS / f"{args.out_name}.md", text, started, command)


def seed_spread(rows: list[dict], seeds: list[int]) -> list[dict]:
    """Per size with several seeds and per strategy: the final loss and the ratio to DDP at every seed."""
    out = []
    for size in dict.fromkeys(r["size"] for r in rows):
        for key in dict.fromkeys((r["mode"], r["H"]) for r in rows):
            rs = [r for r in rows if r["size"] == size and (r["mode"], r["H"]) == key]
            if len(rs) > 1:
                out.append(dict(size=size, mode=key[0], H=key[1],
                                losses=" / ".join(f"{r['final_val_loss']:.4f}" for r in rs),
                                ratios=" / ".join(f"{r['loss_ratio_to_ddp']:.4f}" for r in rs
                                                  if r["loss_ratio_to_ddp"] != "")))
    return out


def check_targets(rows: list[dict], fits: list[dict], trend: list[dict], sizes: list[str], base: int) -> list[dict]:
    """The issue's targets: ratio ≤ 1.02 at H = 16 for every size ≥ 0.1M; the ratio not growing with N; α within 10%
    of DDP's (A·N^α fit)."""
    out = []
    big = [r for r in rows if r["seed"] == base and r["non_embedding_params"] >= 1e5 and r["H"] == 16]
    for mode in ("average", "diloco"):
        rs = [r for r in big if r["mode"] == mode]
        worst = max((r["loss_ratio_to_ddp"] for r in rs), default=math.nan)
        out.append(dict(target=f"{h.run_label(mode, 16)} / DDP ≤ 1.02 at every size ≥ 0.1M",
                        result=", ".join(f"{r['size']} {r['loss_ratio_to_ddp']:.4f}" for r in rs) or "no size ≥ 0.1M",
                        holds="yes" if worst <= 1.02 else "no"))
    for t in trend:
        out.append(dict(target=f"{t['mode']}: ratio not growing with N", result=f"slope {t['slope']:+.4f} {t['ci']}"
                        if "ci" in t else f"slope {t['slope']:+.4f}",
                        holds="yes" if t["slope"] <= 1e-9 else "within noise (interval includes 0)"
                        if t["ci_lo"] <= 0 else "no"))
    a_ddp = next(f["alpha"] for f in fits if f["mode"] == "DDP" and f["form"] == "A·N^α")
    for f in fits:
        if f["form"] == "A·N^α" and f["mode"] != "DDP":
            rel = f["alpha"] / a_ddp - 1
            out.append(dict(target=f"{f['mode']}: α within 10% of DDP's", result=f"α {f['alpha']:.4f} vs "
                            f"{a_ddp:.4f} ({rel:+.1%})", holds="yes" if abs(rel) <= 0.10 else "no"))
    return out


def replot(out_name: str) -> None:
    rows = h.read_csv(RESULTS / f"{out_name}.csv")
    for r in rows:
        r.update(non_embedding_params=float(r["non_embedding_params"]), final_val_loss=float(r["final_val_loss"]),
                 seed=int(r["seed"]), H=int(r["H"]) if r["H"] else "",
                 loss_ratio_to_ddp=float(r["loss_ratio_to_ddp"]) if r["loss_ratio_to_ddp"] else "")
    fits = [dict(r, A=float(r["A"] or "nan"), E=float(r["E"] or "nan"), alpha=float(r["alpha"]))
            for r in h.read_csv(RESULTS / f"{out_name}_fits.csv") if r["source"] == "this run"]
    series = list(dict.fromkeys((r["mode"], r["H"]) for r in rows if r["mode"] != "ddp"))
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    plot(rows, fits, series, sizes, rows[0]["seed"], out_name)


def plot(rows: list[dict], fits: list[dict], series: list, sizes: list[str], base: int, out_name: str) -> None:
    plt = h.pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (mode, H) in enumerate([("ddp", "")] + list(series)):
        color, label = f"C{i}", h.run_label(mode, H or 1)
        rs = [r for r in rows if r["mode"] == mode and (r["H"] == H) and r["seed"] == base]
        N = np.array([r["non_embedding_params"] for r in rs], dtype=float)
        a.plot(N, [r["final_val_loss"] for r in rs], "o", color=color)
        grid = np.geomspace(N.min() / 1.3, N.max() * 1.3, 100)
        f1 = next(f for f in fits if f["mode"] == label and f["form"] == "A·N^α")
        a.plot(grid, f1["A"] * grid ** f1["alpha"], "-", color=color, lw=1, label=f"{label}: α={f1['alpha']:.3f}")
        if mode != "ddp":
            for seed, marker in zip(sorted({r["seed"] for r in rows}, key=lambda s: s != base), "os^"):
                rs = [r for r in rows if r["mode"] == mode and r["H"] == H and r["seed"] == seed]
                b.plot([r["non_embedding_params"] for r in rs], [r["loss_ratio_to_ddp"] for r in rs],
                       marker + ("-" if seed == base else ""), color=color, lw=1,
                       label=label if seed == base else None, fillstyle="full" if seed == base else "none")
    b.axhline(1.02, color="k", ls=":", lw=1, label="target 1.02 (H=16)")
    b.axhline(1.0, color="k", lw=0.5)
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xlabel("non-embedding parameters N")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    a.set_yscale("log")
    a.set_ylabel("final validation loss")
    a.set_title("final loss vs N at equal tokens per parameter (fits A·N^α)")
    b.set_ylabel("final loss / DDP's (filled: seed %d, open: other seeds)" % base)
    b.set_title("gap to DDP vs N (DDP-tuned lr, unchanged)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out_name}.png", dpi=100)


if __name__ == "__main__":
    main()
