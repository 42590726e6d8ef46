"""Streaming sync (Streaming DiLoCo) over an emulated slow link: peak bytes per step, final loss and wall clock.

``LocalSGDStrategy(fragments=F, overlap_steps=τ, overlap_mix=α)`` splits the parameters into F fragments (runs of
whole parameter tensors; ``outer.split_fragments`` picks the contiguous split with the smallest largest fragment)
that sync on a staggered schedule — fragment f at local steps ≡ (f+1)·H/F (mod H) — so a step moves at most one
fragment across groups instead of the whole model every H steps. Each fragment's all-reduce is started
asynchronously and applied τ inner steps later (θ_local ← α·θ_local + (1−α)·θ_global), so the communication can run
behind τ steps of compute.

Runs, all on the same model, seed, data order, batch, learning-rate schedule and steps (``multi_cluster.py``'s
default setting: GPT micro, 2 worker groups of one process, batch 8 × 128 tokens, lr 2e-3, H = 32, 256 steps), over
the same emulated link (default 100 Mbit/s, 20 ms; ``multi_cluster.py``'s emulation: ``unshare -n`` + ``tc tbf`` on
the namespace's loopback when available, else the software sleep model):

* DDP (reference; ``--no-ddp`` to skip),
* plain local SGD (model averaging, F = 1, τ = 0),
* streaming, F fragments, τ = 0 (staggered syncs, each blocking),
* streaming, F fragments, τ = ``--overlap-steps`` (default H/F/2 = 4), α = ``--overlap-mix`` (default 0.5).

The emulated latency of an *asynchronous* collective is applied when the training loop waits for it, counted from
the collective's completion (netns) or issue (sleep model) — ``net["async_overlap"]`` in ``harness/netmodel.py``
— so that compute between the start and the application of a sync hides it, as on a real link; blocking
collectives sleep before they are issued, as in ``multi_cluster.py``. For blocking syncs the two are the same.

Reported per run: final validation loss (after the train-end sync) and its ratio to plain local SGD with a 95% paired
bootstrap interval over the held-out windows; the largest number of cross-group bytes in any single training step
(counted on the Python collectives, Lightning's 8-byte SIGTERM broadcast included) and its ratio to plain local SGD's
(ideal: the largest fragment's share of the model, ≈ 1/F); total bytes during the training steps, and separately the
train-end sync's (streaming always ends with one full sync: the staggered fragments have drifted since their last
sync); training wall clock (median of ``--repeats`` interleaved runs, ``harness.timing``: order reversed every other
round; time / plain = the median of per-round ratios with its bootstrap interval) and the seconds the training loop
spent blocked in syncs. Losses and bytes are deterministic; only the clock varies between repeats.

    python benchmarks/streaming/streaming.py        # small default: GPT micro, 256 steps, 2 repeats, ~4-7 min on 2 cores
    python benchmarks/streaming/streaming.py --emulation sleep
    python benchmarks/streaming/streaming.py --overlap-steps 2 4 --repeats 3
    python benchmarks/streaming/streaming.py --full  # GPT tiny, 2048 steps, H = 64 (still CPU + gloo: the link is emulated)

Writes benchmarks/streaming/results/streaming.csv (one row per configuration), streaming_runs.csv (one row per run),
streaming_steps.csv (cross-group bytes of every training step), streaming.png and streaming.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
import harness as h  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

PRESETS = {
    "default": dict(size="micro", steps=256, batch_size=8, block_size=128, sync_every=32, learning_rate=2e-3,
                    warmup=20, val_windows=256, groups=2, fragments=4, overlap_steps=[4], overlap_mix=0.5,
                    repeats=2, bandwidth_mbit=100.0, latency_ms=20.0),
    "full": dict(size="tiny", steps=2048, batch_size=8, block_size=128, sync_every=64, learning_rate=2e-3,
                 warmup=100, val_windows=512, groups=2, fragments=4, overlap_steps=[8], overlap_mix=0.5,
                 repeats=3, bandwidth_mbit=100.0, latency_ms=20.0),
}


def time_vs_plain(measured: h.Interleaved, name: str, is_ddp: bool, secs: list, plain: list) -> dict:
    """Training time / plain local SGD's: the median of per-round ratios with its bootstrap interval and min / max
    (``harness.timing``); DDP runs once, before the rounds, so its ratio is a single-pair figure (no interval)."""
    if is_ddp:
        return dict(time_vs_plain=statistics.median(secs) / statistics.median(x["train_seconds"] for x in plain))
    est = h.ratio(measured, name, "plain local SGD", lambda r: r["train_seconds"])
    return dict(time_vs_plain=est.median, time_vs_plain_lo=est.low, time_vs_plain_hi=est.high,
                time_vs_plain_min=est.min, time_vs_plain_max=est.max)


def main() -> None:  # noqa: C901  (one linear script)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the larger preset (see PRESETS)")
    p.add_argument("--emulation", default="auto", choices=["auto", "netns", "sleep"])
    p.add_argument("--size")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--sync-every", type=int, help="H")
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--fragments", type=int, help="F of the streaming runs")
    p.add_argument("--overlap-steps", type=int, nargs="+", help="τ of the overlapped streaming runs (several: one "
                   "run each); 0 alone = no overlapped run")
    p.add_argument("--overlap-mix", type=float, help="α of the overlapped runs")
    p.add_argument("--repeats", type=int, help="runs of each local-SGD configuration (interleaved), for the clock")
    p.add_argument("--bandwidth-mbit", type=float, help="link rate per cluster, Mbit/s")
    p.add_argument("--latency-ms", type=float, help="one-way latency, ms")
    p.add_argument("--no-ddp", action="store_true", help="skip the DDP reference run")
    p.add_argument("--replot", action="store_true", help="redraw the PNG from the CSVs of the last run")
    args = p.parse_args()
    if args.replot:
        return replot()
    cfg = dict(PRESETS["full" if args.full else "default"])
    for key in ("size", "steps", "batch_size", "sync_every", "learning_rate", "fragments", "overlap_steps",
                "overlap_mix", "repeats", "bandwidth_mbit", "latency_ms"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    H, F, G = cfg["sync_every"], cfg["fragments"], cfg["groups"]
    if H % F:
        p.error(f"--sync-every ({H}) must be a multiple of --fragments ({F})")
    if cfg["steps"] % H:
        p.error(f"--steps must be a multiple of --sync-every (H={H}): plain local SGD then ends right after a sync")
    taus = [t for t in cfg["overlap_steps"] if t > 0]
    if any(t >= H for t in taus):
        p.error(f"--overlap-steps must be < H = {H}")

    emulation = h.choose_emulation(args.emulation, p)
    rate, latency = cfg["bandwidth_mbit"] * 1e6, cfg["latency_ms"] / 1e3
    link = f"{cfg['bandwidth_mbit']:g} Mbit/s, {cfg['latency_ms']:g} ms"
    print(f"emulation: {emulation}; link {link}", flush=True)
    net = dict(bandwidth_bit_s=rate, latency_s=latency, emulation=emulation, async_overlap=True)
    prefix = h.netns_prefix(G * rate) if emulation == "netns" else None

    started = time.time()
    model = dict(size=cfg["size"], learning_rate=cfg["learning_rate"], warmup_steps=cfg["warmup"],
                 max_steps=cfg["steps"])
    common = dict(model=model, batch_size=cfg["batch_size"], block_size=cfg["block_size"], devices=G, eval_every=0,
                  val_windows=cfg["val_windows"], steps=cfg["steps"], net=net, step_bytes=True)
    variants = [("plain local SGD", dict()), (f"streaming F={F}", dict(fragments=F))]
    variants += [(f"streaming F={F}, τ={t}, α={cfg['overlap_mix']:g}",
                  dict(fragments=F, overlap_steps=t, overlap_mix=cfg["overlap_mix"])) for t in taus]

    runs: dict[str, list[dict]] = {}
    if not args.no_ddp:
        t0 = time.time()
        r = h.launch(h.run_config("DDP", "ddp", **common), prefix=prefix)
        runs["DDP"] = [r]
        print(f"DDP: loss {r['final_val_loss']:.4f}, train {r['train_seconds']:.1f} s "
              f"(process {time.time() - t0:.0f} s)", flush=True)
    def launch_variant(name: str, kw: dict) -> dict:
        r = h.launch(h.run_config(name, "average", sync_every=H, **common, **kw), prefix=prefix)
        print(f"{name}: loss {r['final_val_loss']:.4f}, train {r['train_seconds']:.2f} s, blocked in "
              f"syncs {r['sync_seconds']:.2f} s, peak {r['peak_step_cross_bytes']:,} B/step "
              f"(process {r['process_seconds']:.0f} s)", flush=True)
        return r

    # the harness's timing method: rounds of one run per variant, the order reversed every other round
    measured = h.run_interleaved({name: functools.partial(launch_variant, name, kw) for name, kw in variants},
                                 cfg["repeats"])
    for rep, rnd in enumerate(measured.rounds):
        for name, _ in variants:
            runs.setdefault(name, []).append({**rnd[name].result, "repeat": rep})

    plain = runs["plain local SGD"][0]
    model_bytes = plain["ddp_bytes_per_step"]
    rows, run_rows, step_rows = [], [], []
    for name, rs in runs.items():
        r = rs[0]
        is_ddp = r["mode"] == "ddp"
        losses = [x["final_val_loss"] for x in rs]
        if max(losses) != min(losses):
            print(f"warning: {name}: the final loss differs between repeats: {losses}")
        lo, hi = h.paired_ratio_ci(r["per_window"], plain["per_window"])
        secs = [x["train_seconds"] for x in rs]
        blocked = [x["sync_seconds"] for x in rs]
        train_bytes = sum(r["step_cross_bytes"])
        rows.append(dict(
            run=name, mode="DDP" if is_ddp else "local SGD", link=link, emulation=emulation,
            fragments=r.get("fragments", 1) if not is_ddp else "", overlap_steps=r.get("overlap_steps", 0) if not
            is_ddp else "", overlap_mix=r.get("overlap_mix", 0.0) if not is_ddp else "", H=H if not is_ddp else 1,
            steps=r["steps"], final_val_loss=r["final_val_loss"],
            loss_vs_plain=r["final_val_loss"] / plain["final_val_loss"], loss_ci_lo=lo, loss_ci_hi=hi,
            peak_step_bytes=r["peak_step_cross_bytes"],
            peak_vs_plain=r["peak_step_cross_bytes"] / plain["peak_step_cross_bytes"],
            peak_vs_model=r["peak_step_cross_bytes"] / model_bytes,
            steps_with_traffic=sum(1 for b in r["step_cross_bytes"] if b),
            train_bytes=train_bytes, train_bytes_vs_plain=train_bytes / sum(plain["step_cross_bytes"]),
            train_end_bytes=r["train_end_cross_bytes"], total_bytes=train_bytes + r["train_end_cross_bytes"],
            total_vs_plain=(train_bytes + r["train_end_cross_bytes"]) / (sum(plain["step_cross_bytes"])
                                                                        + plain["train_end_cross_bytes"]),
            repeats=len(rs), train_seconds=statistics.median(secs),
            train_seconds_each=";".join(f"{s:.3f}" for s in secs),
            **time_vs_plain(measured, name, is_ddp, secs, runs["plain local SGD"]),
            seconds_per_step=statistics.median(secs) / r["steps"],
            blocked_sync_seconds=statistics.median(blocked),
            blocked_sync_seconds_each=";".join(f"{s:.3f}" for s in blocked),
            emulated_wait_seconds=statistics.median(x["emulated_sleep_seconds"] for x in rs),
            fragment_numel=";".join(str(n) for n in r.get("fragment_numel", [])) if not is_ddp else "",
            model_bytes=model_bytes, params=r["params"]))
        for x in rs:
            run_rows.append(dict(run=name, repeat=x.get("repeat", 0), final_val_loss=x["final_val_loss"],
                                 train_seconds=x["train_seconds"], blocked_sync_seconds=x["sync_seconds"],
                                 emulated_wait_seconds=x["emulated_sleep_seconds"],
                                 peak_step_bytes=x["peak_step_cross_bytes"], train_end_bytes=x["train_end_cross_bytes"],
                                 process_seconds=x["process_seconds"]))
        step_rows += [dict(run=name, step=i + 1, cross_bytes=b) for i, b in enumerate(r["step_cross_bytes"])]
    h.write_csv(RESULTS / "streaming.csv", rows)
    h.write_csv(RESULTS / "streaming_runs.csv", run_rows)
    h.write_csv(RESULTS / "streaming_steps.csv", step_rows)
    plot(rows, step_rows, F)

    sizes = [int(n) for n in rows[[x["run"] for x in rows].index(f"streaming F={F}")]["fragment_numel"].split(";")]
    # the CI column: formatted here (md_table prints what it is given)
    for r in rows:
        r["loss_ci"] = f"[{r['loss_ci_lo']:.4f}, {r['loss_ci_hi']:.4f}]"
    table = h.md_table([{**r, "final_val_loss": round(r["final_val_loss"], 4),
                         "loss_vs_plain": round(r["loss_vs_plain"], 4), "peak_vs_plain": round(r["peak_vs_plain"], 4),
                         "peak_step_bytes": f"{r['peak_step_bytes']:,}", "train_bytes": f"{r['train_bytes']:,}",
                         "train_end_bytes": f"{r['train_end_bytes']:,}",
                         "train_seconds": f"{r['train_seconds']:.2f} ({r['train_seconds_each'].replace(';', ', ')})",
                         "time_vs_plain": (f"{r['time_vs_plain']:.3f} [{r['time_vs_plain_lo']:.3f}, "
                                           f"{r['time_vs_plain_hi']:.3f}]" if "time_vs_plain_lo" in r
                                           else round(r["time_vs_plain"], 3)),
                         "blocked_sync_seconds": round(r["blocked_sync_seconds"], 3)} for r in rows],
                       [("run", "run"), ("final_val_loss", "final val loss"), ("loss_vs_plain", "loss / plain"),
                        ("loss_ci", "95% CI"), ("peak_step_bytes", "peak bytes in one step"),
                        ("peak_vs_plain", "peak / plain"), ("steps_with_traffic", "steps with traffic"),
                        ("train_bytes", "bytes in training steps"), ("train_end_bytes", "train-end sync bytes"),
                        ("train_seconds", "train s, median (each)"), ("time_vs_plain", "time / plain, median of rounds [95% bootstrap]"),
                        ("blocked_sync_seconds", "s blocked in syncs")])
    stream = [r for r in rows if r["run"].startswith("streaming")]
    worst_loss = max(abs(r["loss_vs_plain"] - 1) for r in stream)
    worst_peak = max(r["peak_vs_plain"] for r in stream)
    ideal = max(sizes) / sum(sizes)
    verdict = (f"**Acceptance** (streaming lowers peak bytes per step by ≈ F× at equal final loss, ±1%): peak / plain "
               f"= {worst_peak:.4f} = 1/{1 / worst_peak:.2f} (F = {F}: 1/F = {1 / F:.4f}; the largest fragment is "
               f"{ideal:.4f} of the model, so {ideal:.4f} is the best this split allows); final loss within "
               f"{worst_loss * 100:.2f}% of plain local SGD ({'yes' if worst_loss <= 0.01 else 'no'}, ±1%).")
    text = (f"GPT `{cfg['size']}` ({plain['params']:,} parameters, {model_bytes:,} bytes fp32), {G} worker groups of "
            f"1 process, batch {cfg['batch_size']} × {cfg['block_size']} tokens per process, lr "
            f"{cfg['learning_rate']:g} (warm-up {cfg['warmup']}, cosine), {cfg['steps']} steps, H = {H}; link {link} "
            f"(emulation `{emulation}`"
            + (": unshare -n + tc tbf on lo at G × rate, latency slept per collective; async collectives wait at "
               "`wait()` until completion + latency)" if emulation == "netns" else
               ": software model, sleep = bytes / rate + hops × latency; async collectives wait at `wait()` until "
               "issue + that delay)")
            + f". Fragments of F = {F} (parameter elements): {', '.join(f'{n:,}' for n in sizes)} "
            f"(largest / mean = {max(sizes) / (sum(sizes) / len(sizes)):.3f}). {cfg['repeats']} interleaved repeats of "
            f"every local-SGD run (losses and bytes identical in every repeat; the clock varies). Loss CI: 95% paired "
            f"bootstrap of the ratio over the {len(plain['per_window'])} held-out windows (evaluation noise only).\n\n"
            f"{table}\n\n{verdict}\n")
    print(text)
    command = "python benchmarks/streaming/streaming.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    h.write_summary(RESULTS / "streaming.md", text, started, command)


def replot() -> None:
    rows = h.read_csv(RESULTS / "streaming.csv")
    for r in rows:
        for k in ("loss_vs_plain", "loss_ci_lo", "loss_ci_hi", "peak_vs_plain", "train_seconds",
                  "blocked_sync_seconds", "model_bytes"):
            r[k] = float(r[k])
    steps = [dict(run=s["run"], step=int(s["step"]), cross_bytes=int(s["cross_bytes"]))
             for s in h.read_csv(RESULTS / "streaming_steps.csv")]
    F = max(int(r["fragments"]) for r in rows if r["fragments"])
    plot(rows, steps, F)


def plot(rows: list[dict], step_rows: list[dict], F: int) -> None:
    plt = h.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    ax = axes[0]
    model_bytes = float(rows[0]["model_bytes"])
    shown = [r["run"] for r in rows if r["run"] in ("DDP", "plain local SGD") or r["run"] == f"streaming F={F}"]
    for name, style in zip(shown, ("-", "-", "-")):
        s = [x for x in step_rows if x["run"] == name]
        ax.step([x["step"] for x in s], [x["cross_bytes"] / model_bytes for x in s], where="mid", lw=1, label=name)
    ax.axhline(1 / F, color="k", ls=":", lw=0.8, label=f"1/F = {1 / F:g}")
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-group bytes in the step / model bytes")
    ax.set_title("bytes per step (τ > 0: same bytes, same steps)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    local = [r for r in rows if r["mode"] != "DDP"]
    labels = [r["run"].replace("streaming ", "stream\n").replace(", τ", "\nτ").replace("plain local SGD",
                                                                                        "plain\nlocal SGD")
              for r in local]
    x = list(range(len(local)))
    ax = axes[1]
    vals = [r["loss_vs_plain"] for r in local]
    err = [[v - r["loss_ci_lo"] for v, r in zip(vals, local)], [r["loss_ci_hi"] - v for v, r in zip(vals, local)]]
    ax.bar(x, vals, yerr=err, capsize=4, color="tab:blue")
    ax.axhspan(0.99, 1.01, color="tab:green", alpha=0.15, label="±1%")
    ddp = [r for r in rows if r["mode"] == "DDP"]
    if ddp:
        ax.axhline(ddp[0]["loss_vs_plain"], color="k", ls="--", lw=0.8, label="DDP")
    ax.set_ylim(min(vals + [r["loss_vs_plain"] for r in ddp] + [0.99]) - 0.01, max(vals + [1.01]) + 0.01)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("final val loss / plain local SGD")
    ax.set_title("final loss (95% bootstrap CI)")
    ax.legend(fontsize=8)
    ax = axes[2]
    vals = [r["peak_vs_plain"] for r in local]
    ax.bar(x, vals, color="tab:orange")
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom")
    ax.axhline(1 / F, color="k", ls=":", lw=0.8, label=f"1/F = {1 / F:g}")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("peak bytes in one step / plain local SGD")
    ax.set_title("peak cross-group bytes per step")
    ax.legend(fontsize=8)
    ax = axes[3]
    secs = [r["train_seconds"] for r in local]
    blocked = [r["blocked_sync_seconds"] for r in local]
    ax.bar(x, secs, color="tab:gray", label="training wall clock (median)")
    ax.bar(x, blocked, color="tab:red", label="of which blocked in syncs")
    for i, r in enumerate(local):
        each = [float(s) for s in str(r["train_seconds_each"]).split(";") if s]
        ax.plot([i] * len(each), each, "k.", ms=4)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title(f"training time ({rows[0]['link']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "streaming.png", dpi=100)


if __name__ == "__main__":
    main()
