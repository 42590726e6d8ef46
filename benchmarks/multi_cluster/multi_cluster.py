"""Two "clusters" joined by an emulated slow network: wall clock to a target validation loss, DDP vs local SGD.

Each worker group (one process: a "cluster") talks to the other over gloo on 127.0.0.1 inside a private network
namespace (``unshare -n``) whose loopback is shaped with a token bucket (``tc qdisc ... tbf``), for each link of

    1 Gbit/s, 5 ms      100 Mbit/s, 20 ms      10 Mbit/s, 50 ms      (bandwidth per cluster, one-way latency)

* Bandwidth: the namespace's ``lo`` carries the traffic of both directions and of every rank through one queue, so it
  is shaped to G × the link rate (the aggregate of G full-duplex links): a ring all-reduce of M bytes then takes
  ≈ 2(G−1)/G · M / rate, as on G real links. The achieved rate is reported (``effective_mbit_s``).
* Latency: ``netem`` is not available in this kernel, so latency is added in the worker: every collective that spans
  more than one rank sleeps ``hops × latency`` before it is issued (ring all-reduce: 2(G−1) hops; broadcast, barrier:
  ⌈log2 G⌉), both in the Python collectives (local SGD's sync, Lightning's broadcasts) and in a DDP communication
  hook (DDP's gradient all-reduce). TCP's own reaction to latency (slow start, window limits) is not modelled.
* Where namespaces or tc are not allowed, the benchmark says so and falls back to a pure software model: each
  collective sleeps ``wire bytes / rate + hops × latency`` and the bytes travel over the unshaped loopback.

Protocol, per link: DDP trains S steps (its final validation loss is the target); local SGD (model averaging every H
steps, same model, seed, data order, batch, peak learning rate and warm-up; its cosine decay runs over
``--local-lr-steps`` = 1.25·S by default, because local SGD is known to need more steps than DDP and with DDP's own
S-step schedule it spends them at the minimum rate — ``--local-lr-steps S`` gives the shared schedule) trains until
its validation loss, checked every ``--eval-every`` steps (right after a sync), is at or below DDP's final
loss (at most 2S steps). Both are evaluated every ``--eval-every`` steps on the same held-out windows, evaluation time
excluded from the clock. Reported: training wall clock to the target for each (linear interpolation between the two
evaluations around it), and the speed-up DDP / local SGD. Lightning's per-batch SIGTERM
broadcast is disabled for DDP (the strategy keeps it off the slow links for local SGD), so DDP pays exactly one
collective per step.

    python benchmarks/multi_cluster/multi_cluster.py  # small default: GPT micro, S = 256 steps, ~6 min on 2 CPU cores
    python benchmarks/multi_cluster/multi_cluster.py --emulation sleep
    python benchmarks/multi_cluster/multi_cluster.py --full  # longer runs of a larger model (still on CPU + gloo)

Traffic stays on 127.0.0.1 inside the namespace; nothing else is ever a target.

Writes benchmarks/multi_cluster/results/multi_cluster.csv, multi_cluster_curves.csv, multi_cluster.png and
multi_cluster.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
import harness as h  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

LINKS = [("1 Gbit/s, 5 ms", 1e9, 0.005), ("100 Mbit/s, 20 ms", 100e6, 0.020), ("10 Mbit/s, 50 ms", 10e6, 0.050)]
PRESETS = {
    "default": dict(size="micro", steps=256, batch_size=8, block_size=128, sync_every=32, eval_every=32,
                    learning_rate=2e-3, warmup=20, val_windows=256, groups=2),
    "full": dict(size="tiny", steps=2048, batch_size=8, block_size=128, sync_every=64, eval_every=64,
                 learning_rate=2e-3, warmup=100, val_windows=512, groups=2),
}


def time_to(curve: list[dict], target: float) -> tuple[float, float]:
    """Training seconds and step at which the validation loss first reaches ``target`` (NaN if never).

    Linear interpolation between the last evaluation above the target and the first one at or below it.
    """
    prev = None
    for c in curve:
        if c["step"] > 0 and c["val_loss"] <= target + 1e-9:
            if prev is None or prev["val_loss"] <= target:
                return c["train_seconds"], float(c["step"])
            f = (prev["val_loss"] - target) / (prev["val_loss"] - c["val_loss"])
            return (prev["train_seconds"] + f * (c["train_seconds"] - prev["train_seconds"]),
                    prev["step"] + f * (c["step"] - prev["step"]))
        prev = c
    return float("nan"), float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true")
    p.add_argument("--emulation", default="auto", choices=["auto", "netns", "sleep"])
    p.add_argument("--size")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--sync-every", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--local-warmup", type=int, help="fully synchronous steps before local SGD starts (post-local SGD; "
                   "a multiple of --sync-every)")
    p.add_argument("--local-lr-steps", type=int, default=None,
                   help="length of local SGD's warm-up + cosine learning-rate schedule (default: 1.25 × DDP's steps; "
                        "give DDP's --steps for one shared schedule). Local "
                        "SGD needs more steps than DDP to reach the same loss; with DDP's schedule it spends them at the "
                        "minimum rate. Both methods still use the same peak rate, warm-up, batch and data.")
    p.add_argument("--links", nargs="+", help="subset of the links, by index 0..2 (default all)")
    p.add_argument("--out-name", default="multi_cluster", help="file names under benchmarks/multi_cluster/results/")
    p.add_argument("--replot", action="store_true", help="redraw the PNG from the CSVs of the last run")
    args = p.parse_args()
    if args.replot:
        return replot()
    cfg = dict(PRESETS["full" if args.full else "default"])
    for key in ("size", "steps", "batch_size", "sync_every", "eval_every", "block_size", "learning_rate",
                "local_warmup"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg.setdefault("local_warmup", 0)
    # local SGD's schedule: 1.25 × DDP's steps unless given (it needs more steps; see --local-lr-steps)
    cfg["local_lr_steps"] = args.local_lr_steps or round(1.25 * cfg["steps"])
    if cfg["local_warmup"] % cfg["sync_every"]:
        p.error("--local-warmup must be a multiple of --sync-every")
    if cfg["eval_every"] % cfg["sync_every"] or cfg["steps"] % cfg["eval_every"]:
        p.error("--eval-every must be a multiple of --sync-every and divide --steps")
    links = [LINKS[int(i)] for i in args.links] if args.links else LINKS
    G = cfg["groups"]

    emulation = h.choose_emulation(args.emulation, p)
    print(f"emulation: {emulation}")

    started = time.time()
    model = dict(size=cfg["size"], learning_rate=cfg["learning_rate"], warmup_steps=cfg["warmup"],
                 max_steps=cfg["steps"])
    common = dict(model=model, batch_size=cfg["batch_size"], block_size=cfg["block_size"], devices=G,
                  eval_every=cfg["eval_every"], val_windows=cfg["val_windows"])
    rows, curves, runs = [], [], []
    for label, rate, latency in links:
        net = dict(bandwidth_bit_s=rate, latency_s=latency, emulation=emulation)
        prefix = h.netns_prefix(G * rate) if emulation == "netns" else None
        ddp = h.launch(h.run_config(f"DDP {label}", "ddp", steps=cfg["steps"], net=net, **common), prefix=prefix)
        target = ddp["curve"][-1]["val_loss"]  # DDP's last periodic evaluation (= its final model)
        local_common = dict(common, model=dict(model, max_steps=cfg["local_lr_steps"]))
        loc = h.launch(h.run_config(f"local SGD H={cfg['sync_every']} {label}", "average", steps=2 * cfg["steps"],
                                    sync_every=cfg["sync_every"], net=net, stop_at_loss=target,
                                    local_warmup_steps=cfg["local_warmup"], **local_common),
                       prefix=prefix)
        t_ddp, s_ddp = time_to(ddp["curve"], target)
        t_loc, s_loc = time_to(loc["curve"], target)
        speedup = t_ddp / t_loc if t_loc == t_loc else float("nan")
        model_bytes = ddp["ddp_bytes_per_step"]
        wire = 2 * (G - 1) / G * model_bytes  # bytes per rank of one ring all-reduce of the model
        for r, t, s in ((ddp, t_ddp, s_ddp), (loc, t_loc, s_loc)):
            is_ddp = r["mode"] == "ddp"
            at_s = next((c["val_loss"] for c in r["curve"] if c["step"] == cfg["steps"]), float("nan"))
            n_comm = r["steps"] if is_ddp else max(1, r["num_syncs"])
            comm_per = r["sync_seconds"] / n_comm  # one gradient all-reduce (DDP) / one sync (local SGD)
            rows.append(dict(
                link=label, bandwidth_mbit_s=rate / 1e6, latency_ms=latency * 1e3, emulation=emulation,
                mode="DDP" if is_ddp else f"local SGD H={cfg['sync_every']}", steps=r["steps"],
                target_loss=target, final_val_loss=r["final_val_loss"], loss_ratio_at_ddp_steps=at_s / target,
                reached=s == s, step_at_target=s,
                seconds_to_target=t, speedup_vs_ddp=1.0 if is_ddp else speedup, train_seconds=r["train_seconds"],
                seconds_per_step=r["train_seconds"] / r["steps"], comm_seconds=r["sync_seconds"],
                collectives=n_comm, seconds_per_collective=comm_per,
                compute_seconds_per_step=(r["train_seconds"] - r["sync_seconds"]) / r["steps"],
                effective_mbit_s=wire * 8 / max(comm_per - 2 * (G - 1) * latency, 1e-9) / 1e6,
                bytes_per_step=(r["bytes_sent"] + r.get("warmup_bytes", 0)) / r["steps"], model_bytes=model_bytes, params=r["params"],
                tokens_per_step=cfg["batch_size"] * cfg["block_size"],
                outer_state_bytes=r["state_bytes"]))
            curves += [dict(link=label, run=r["name"], **c) for c in r["curve"]]
        runs.append((label, ddp, loc, target))
        print(f"{label}: DDP {t_ddp:.1f} s to {target:.4f} ({ddp['steps']} steps, "
              f"{ddp['train_seconds'] / ddp['steps'] * 1e3:.0f} ms/step); local SGD {t_loc:.1f} s ({s_loc:.0f} steps, "
              f"{loc['train_seconds'] / loc['steps'] * 1e3:.0f} ms/step); speed-up {speedup:.2f}x", flush=True)
    h.write_csv(RESULTS / f"{args.out_name}.csv", rows)
    h.write_csv(RESULTS / f"{args.out_name}_curves.csv", curves)
    plot(runs, rows, args.out_name)

    table = h.md_table(rows, [("link", "link"), ("mode", "run"), ("seconds_to_target", "s to target"),
                              ("step_at_target", "step at target"), ("speedup_vs_ddp", "speed-up vs DDP"),
                              ("seconds_per_step", "s/step"), ("seconds_per_collective", "s per all-reduce/sync"),
                              ("effective_mbit_s", "achieved Mbit/s"), ("bytes_per_step", "bytes/step/rank"),
                              ("loss_ratio_at_ddp_steps", f"loss / DDP at step {cfg['steps']}")])
    first = runs[0][1]
    text = (f"GPT `{cfg['size']}` ({first['params']:,} parameters, {first['ddp_bytes_per_step']:,} bytes of fp32 "
            f"gradients), {G} clusters of 1 process, batch {cfg['batch_size']} × {cfg['block_size']} tokens per "
            f"process, AdamW lr {cfg['learning_rate']:g}"
            + (f", local SGD's first {cfg['local_warmup']} steps fully synchronous" if cfg["local_warmup"] else "")
            + (f", local SGD's learning-rate schedule over {cfg['local_lr_steps']} steps"
               if cfg["local_lr_steps"] != cfg["steps"] else ", one shared learning-rate schedule")
            + f", DDP {cfg['steps']} steps (target = its final validation loss), local SGD H={cfg['sync_every']} "
            f"until it reaches the target (≤ {2 * cfg['steps']} steps), evaluation every {cfg['eval_every']} steps. "
            f"Emulation: `{emulation}`"
            + (" (unshare -n + tc tbf on lo at G × rate, latency slept per collective)." if emulation == "netns"
               else " (software model: sleep = bytes / rate + hops × latency per collective).")
            + f"\n\n{table}\n")
    print(text)
    command = " ".join(["python benchmarks/multi_cluster/multi_cluster.py", *sys.argv[1:]])
    h.write_summary(RESULTS / f"{args.out_name}.md", text, started, command)


def replot() -> None:
    rows = h.read_csv(RESULTS / "multi_cluster.csv")
    for r in rows:
        r["speedup_vs_ddp"] = float(r["speedup_vs_ddp"])
    curves = h.read_csv(RESULTS / "multi_cluster_curves.csv")
    runs = []
    for link in dict.fromkeys(r["link"] for r in rows):
        pair = []
        for mode in ("DDP", "local"):
            name = next(c["run"] for c in curves if c["link"] == link and c["run"].startswith(mode))
            pair.append(dict(name=name, curve=[dict(step=int(c["step"]), train_seconds=float(c["train_seconds"]),
                                                    val_loss=float(c["val_loss"]))
                                               for c in curves if c["link"] == link and c["run"] == name]))
        target = float(next(r["target_loss"] for r in rows if r["link"] == link))
        runs.append((link, pair[0], pair[1], target))
    plot(runs, rows)


def plot(runs: list, rows: list[dict], out_name: str = "multi_cluster") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(4 * (len(runs) + 1), 3.8))
    for ax, (label, ddp, loc, target) in zip(axes, runs):
        for r, style in ((ddp, "-"), (loc, "--")):
            c = [x for x in r["curve"] if x["step"] > 0]
            ax.plot([x["train_seconds"] for x in c], [x["val_loss"] for x in c], style, marker=".",
                    label=r["name"].replace(f" {label}", ""))
        ax.axhline(target, color="k", lw=0.8, ls=":", label="target (DDP final)")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(label)
        ax.set_xlabel("training wall clock (s, log)")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax = axes[-1]
    sp = [r for r in rows if r["mode"] != "DDP"]
    ax.bar([r["link"].replace(", ", "\n") for r in sp], [r["speedup_vs_ddp"] for r in sp])
    for i, r in enumerate(sp):
        ax.text(i, r["speedup_vs_ddp"], f"{r['speedup_vs_ddp']:.1f}x", ha="center", va="bottom")
    ax.set_ylabel("speed-up to target (DDP time / local SGD time)")
    ax.set_title("time-to-target speed-up")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out_name}.png", dpi=100)


if __name__ == "__main__":
    main()
