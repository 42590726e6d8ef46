"""Scaling law of the final loss in model size, DDP vs local SGD, at a fixed number of tokens per parameter.

Each size of the example GPT ladder is trained with DDP and with local SGD (model averaging every H steps) to the same
number of tokens per non-embedding parameter (larger models get proportionally more tokens, and a larger batch, as in
compute-optimal scaling studies). The final validation loss on the fixed held-out windows is fitted as

    L(N) = A · N^α          (least squares on log L vs log N)
    L(N) = E + A · N^α      (non-linear least squares, E = irreducible loss)

in non-embedding parameters N. The 95% intervals of α come from a paired bootstrap over the held-out windows (the same
resampled windows for every model; 1000 resamples): they capture evaluation-sample noise, not seed-to-seed training
noise. The table puts the exponents of Charles et al. (2025, "Scaling Laws for DiLoCo", arXiv:2503.09799) beside:
α ≈ −0.095 for data-parallel training and −0.096 … −0.102 for DiLoCo with M = 1 … 8 replicas (their models:
35M-2.4B parameters, C4, their own parameter count) — compare signs and rough magnitudes only.

    python benchmarks/scaling_law.py            # smoke-scale default: nano, micro, tiny, small at 0.5 tokens/param
    python benchmarks/scaling_law.py --full     # real hardware: nano ... large at 20 tokens/param

The default finishes in about 6 minutes on 2 CPU cores, which only allows half a token per parameter: the models are
far from converged, so its exponents are a smoke test of the pipeline (fits, bootstrap, plot), not a measurement of
the paper's law. Use --full (or --tokens-per-param 20 with more time) for that.

Writes benchmarks/results/scaling_law.csv (runs), scaling_law_fits.csv (exponents), scaling_law.png, scaling_law.md.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import harness as h

#: per-process batch (sequences of block_size tokens) per model size: larger models take larger batches
BATCH = {"nano": 1, "micro": 2, "tiny": 8, "small": 16, "medium": 32, "large": 64, "gpt2": 64, "gpt2-medium": 128}
LR = {"nano": 3e-3, "micro": 3e-3, "tiny": 2e-3, "small": 2e-3, "medium": 1.5e-3, "large": 1e-3, "gpt2": 6e-4,
      "gpt2-medium": 3e-4}
PRESETS = {
    "default": dict(sizes=["nano", "micro", "tiny", "small"], tokens_per_param=0.5, sync_every=16, block_size=128,
                    devices=2, val_windows=256, batch_scale=1),
    "full": dict(sizes=["nano", "micro", "tiny", "small", "medium", "large"], tokens_per_param=20.0, sync_every=64,
                 block_size=256, devices=8, val_windows=1024, batch_scale=1),
}
PAPER = [  # Charles et al. 2025 (arXiv:2503.09799), L(N) = A·N^α
    dict(source="Charles et al. 2025", mode="data-parallel", form="A·N^α", alpha=-0.095),
    dict(source="Charles et al. 2025", mode="DiLoCo M=1", form="A·N^α", alpha=-0.096),
    dict(source="Charles et al. 2025", mode="DiLoCo M=8", form="A·N^α", alpha=-0.102),
]


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
    except Exception:  # noqa: BLE001
        return float("nan"), float("nan"), float("nan")


def bootstrap(N: np.ndarray, per_window: np.ndarray, reps: int = 1000, seed: int = 0) -> dict:
    """Paired bootstrap over held-out windows: per_window has shape (sizes, windows)."""
    rng = np.random.default_rng(seed)
    n = per_window.shape[1]
    a_pow, a_off = [], []
    for _ in range(reps):
        idx = rng.integers(0, n, n)
        L = per_window[:, idx].mean(1)
        a_pow.append(fit_power(N, L)[1])
        a_off.append(fit_offset(N, L)[2])
    a_pow, a_off = np.array(a_pow), np.array(a_off)
    ok = np.isfinite(a_off)
    return dict(pow_lo=float(np.percentile(a_pow, 2.5)), pow_hi=float(np.percentile(a_pow, 97.5)),
                off_lo=float(np.percentile(a_off[ok], 2.5)) if ok.any() else float("nan"),
                off_hi=float(np.percentile(a_off[ok], 97.5)) if ok.any() else float("nan"),
                off_failed=int((~ok).sum()), reps=reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true")
    p.add_argument("--sizes", nargs="+")
    p.add_argument("--tokens-per-param", type=float)
    p.add_argument("--sync-every", type=int)
    p.add_argument("--batch-scale", type=int, help="multiply every size's batch")
    p.add_argument("--devices", type=int)
    p.add_argument("--accelerator", default=None)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--replot", action="store_true", help="redraw the PNG from the CSVs of the last run")
    args = p.parse_args()
    if args.replot:
        return replot()
    cfg = dict(PRESETS["full" if args.full else "default"])
    for key in ("sizes", "tokens_per_param", "sync_every", "batch_scale", "devices"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if len(cfg["sizes"]) < 3:
        p.error("at least 3 sizes are needed for the fit with an offset")
    accelerator = args.accelerator or ("gpu" if args.full else "cpu")
    from lightning_localsgd.examples.gpt import GPT_SIZES, count_non_embedding_params

    started = time.time()
    H = cfg["sync_every"]
    runs: dict[str, list[dict]] = {"ddp": [], "average": []}
    for size in cfg["sizes"]:
        s = GPT_SIZES[size]
        N = count_non_embedding_params(s["n_layer"], s["n_embd"])
        bs = BATCH[size] * cfg["batch_scale"]
        tokens_per_step = bs * cfg["block_size"] * cfg["devices"]
        steps = max(H, round(cfg["tokens_per_param"] * N / tokens_per_step / H) * H)  # whole sync intervals
        model = dict(size=size, learning_rate=LR[size], warmup_steps=max(2, steps // 10), max_steps=steps)
        for mode in runs:
            name = f"{'DDP' if mode == 'ddp' else f'local SGD H={H}'} {size}"
            r = h.launch(h.run_config(name, mode, steps=steps, model=model, batch_size=bs,
                                      block_size=cfg["block_size"], devices=cfg["devices"], sync_every=H,
                                      eval_every=0, val_windows=cfg["val_windows"], accelerator=accelerator))
            r["size"] = size
            runs[mode].append(r)
            print(f"{name}: N={N:,}, {steps} steps, {r['tokens']:,} tokens ({r['tokens'] / N:.2f}/param), "
                  f"loss {r['final_val_loss']:.4f}, train {r['train_seconds']:.0f} s", flush=True)

    rows = []
    for mode, rs in runs.items():
        for r in rs:
            rows.append(dict(mode=mode, size=r["size"], non_embedding_params=r["non_embedding_params"],
                             params=r["params"], steps=r["steps"], tokens=r["tokens"],
                             tokens_per_param=r["tokens"] / r["non_embedding_params"],
                             final_val_loss=r["final_val_loss"], train_seconds=r["train_seconds"],
                             syncs=r["num_syncs"], outer_state_bytes=r["state_bytes"]))
    for r_ddp, r_loc in zip(runs["ddp"], runs["average"]):
        next(x for x in rows if x["mode"] == "average" and x["size"] == r_loc["size"])["loss_ratio_to_ddp"] = \
            r_loc["final_val_loss"] / r_ddp["final_val_loss"]
    h.write_csv(h.RESULTS / "scaling_law.csv", rows)

    fits = []
    for mode, rs in runs.items():
        N = np.array([r["non_embedding_params"] for r in rs], dtype=float)
        W = np.array([r["per_window"] for r in rs])
        L = W.mean(1)
        A, alpha = fit_power(N, L)
        E, A2, alpha2 = fit_offset(N, L)
        ci = bootstrap(N, W, reps=args.bootstrap)
        label = "DDP" if mode == "ddp" else f"local SGD H={H}"
        fits.append(dict(source="this run", mode=label, form="A·N^α", A=A, E="", alpha=alpha,
                         ci_lo=ci["pow_lo"], ci_hi=ci["pow_hi"]))
        fits.append(dict(source="this run", mode=label, form="E + A·N^α", A=A2, E=E, alpha=alpha2,
                         ci_lo=ci["off_lo"], ci_hi=ci["off_hi"], bootstrap_failed=ci["off_failed"]))
    fits += PAPER
    h.write_csv(h.RESULTS / "scaling_law_fits.csv", fits,
                ["source", "mode", "form", "alpha", "ci_lo", "ci_hi", "A", "E", "bootstrap_failed"])
    plot(runs, fits, H)

    for f in fits:
        f["ci"] = f"[{f['ci_lo']:.3f}, {f['ci_hi']:.3f}]" if "ci_lo" in f else ""
        f["alpha_s"] = f"{f['alpha']:.3f}" if f["alpha"] == f["alpha"] else "fit failed"
        f["E_s"] = f"{f['E']:.3f}" if isinstance(f.get("E"), float) else ""
    t_runs = h.md_table(rows, [("mode", "mode"), ("size", "size"), ("non_embedding_params", "N (non-emb.)"),
                               ("steps", "steps"), ("tokens", "tokens"), ("tokens_per_param", "tokens/N"),
                               ("final_val_loss", "final val loss"), ("loss_ratio_to_ddp", "loss / DDP"),
                               ("outer_state_bytes", "outer state bytes/rank")])
    t_fits = h.md_table(fits, [("source", "source"), ("mode", "mode"), ("form", "fit"), ("alpha_s", "α"),
                               ("ci", "95% bootstrap CI"), ("E_s", "E")])
    text = (f"Sizes {', '.join(cfg['sizes'])}; {cfg['tokens_per_param']} tokens per non-embedding parameter; "
            f"{cfg['devices']} processes; local SGD: model averaging every H={H} steps; AdamW, warm-up 10% + cosine."
            f"\n\n{t_runs}\n\n{t_fits}\n")
    print(text)
    command = "python benchmarks/scaling_law.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    h.write_summary("scaling_law", text, started, command)


def replot() -> None:
    rows = h.read_csv(h.RESULTS / "scaling_law.csv")
    runs = {m: [dict(non_embedding_params=float(r["non_embedding_params"]), final_val_loss=float(r["final_val_loss"]))
                for r in rows if r["mode"] == m] for m in ("ddp", "average")}
    fits = [dict(r, A=float(r["A"] or "nan"), E=float(r["E"] or "nan"), alpha=float(r["alpha"]))
            for r in h.read_csv(h.RESULTS / "scaling_law_fits.csv") if r["source"] == "this run"]
    H = int(next(f["mode"] for f in fits if "H=" in f["mode"]).split("H=")[1])
    plot(runs, fits, H)


def plot(runs: dict, fits: list[dict], H: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (mode, rs) in enumerate(runs.items()):
        color = f"C{i}"
        label = "DDP" if mode == "ddp" else f"local SGD H={H}"
        N = np.array([r["non_embedding_params"] for r in rs], dtype=float)
        L = np.array([r["final_val_loss"] for r in rs])
        ax.plot(N, L, "o", color=color, label=f"{label} (measured)")
        grid = np.geomspace(N.min() / 1.5, N.max() * 1.5, 100)
        f1 = next(f for f in fits if f["mode"] == label and f["form"] == "A·N^α")
        f2 = next(f for f in fits if f["mode"] == label and f["form"] == "E + A·N^α")
        ax.plot(grid, f1["A"] * grid ** f1["alpha"], "-", color=color, lw=1,
                label=f"{label}: A·N^α, α={f1['alpha']:.3f}")
        if f2["alpha"] == f2["alpha"]:
            ax.plot(grid, f2["E"] + f2["A"] * grid ** f2["alpha"], "--", color=color, lw=1,
                    label=f"{label}: E + A·N^α, α={f2['alpha']:.3f}, E={f2['E']:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("loss vs model size at equal tokens per parameter")
    fig.tight_layout()
    fig.savefig(h.RESULTS / "scaling_law.png", dpi=100)


if __name__ == "__main__":
    main()
