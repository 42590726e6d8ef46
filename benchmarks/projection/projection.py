"""Project DDP vs local SGD wall clock and utilization to 2-64 clusters, 0.1B-70B parameters and realistic links.

1. Calibrate ``benchmarks/projection/costmodel.py`` on the points measured by ``multi_cluster.py`` (read from
   ``multi_cluster/results/multi_cluster.csv`` when present): the achieved fraction η of the link bandwidth and a fixed
   cost per collective (least squares over DDP's measured gradient all-reduces), the local work of a sync (per byte), and the
   CPU's sustained FLOP/s (local SGD's measured compute per step). The calibrated model is checked against every
   measured step time and speed-up. ``sync_sweep/results/sync_sweep.csv`` (when present) checks the model's traffic
   assumption: local SGD sends DDP's bytes × syncs / steps.
2. Project, with that η and c0, for clusters of 8 × H100 (989 dense bf16 TFLOP/s each, 40% MFU) each taking
   0.5M tokens per step (weak scaling), fp32 gradients / pseudo-gradients, training on 20 tokens per parameter:
   step time, utilization (compute / step time) and total wall clock of DDP and local SGD (H = 32, 128, 512).

    python benchmarks/projection/projection.py  # seconds; run multi_cluster.py / sync_sweep.py first for calibration

Writes benchmarks/projection/results/projection.csv (the grid), projection_calibration.csv, projection.png,
projection.md.
Assumptions: see costmodel.py's docstring and this benchmark's README.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import costmodel as cm
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
import harness as h  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

H100_NODE = cm.Cluster("8 × H100 (bf16 dense 989 TFLOP/s each), MFU 40%", 8 * 989e12, 0.40)
LINKS = [
    cm.Link("400 Gbit/s, 1 ms (same region)", 400e9, 0.001),
    cm.Link("100 Gbit/s, 10 ms (metro)", 100e9, 0.010),
    cm.Link("10 Gbit/s, 30 ms (cross-country)", 10e9, 0.030),
    cm.Link("1 Gbit/s, 50 ms (internet)", 1e9, 0.050),
    cm.Link("100 Mbit/s, 50 ms (internet)", 100e6, 0.050),
]
SIZES = [0.1e9, 1e9, 7e9, 13e9, 70e9]
CLUSTERS = [2, 4, 8, 16, 32, 64]
H_VALUES = [32, 128, 512]
TOKENS_PER_STEP = 0.5e6  # per cluster
TOKENS_PER_PARAM = 20


def calibration_points() -> tuple[list[dict], list[dict]]:
    """(collective points, rows of multi_cluster.csv) from the measured results, if present."""
    path = h.results_dir("multi_cluster") / "multi_cluster.csv"
    if not path.exists():
        return [], []
    rows = h.read_csv(path)
    points = []
    for r in rows:
        points.append(dict(kind="allreduce" if r["mode"] == "DDP" else "sync",
                           seconds=float(r["seconds_per_collective"]), bytes=float(r["model_bytes"]),
                           bandwidth_bit_s=float(r["bandwidth_mbit_s"]) * 1e6, latency_s=float(r["latency_ms"]) / 1e3))
    return points, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mfu", type=float, default=H100_NODE.mfu)
    p.add_argument("--tokens-per-step", type=float, default=TOKENS_PER_STEP, help="per cluster")
    p.add_argument("--bytes-per-value", type=float, default=4.0, help="4 = fp32, 2 = bf16 all-reduces")
    p.add_argument("--efficiency", type=float, default=None,
                   help="achieved fraction of the link bandwidth for the projection (default: the calibrated one)")
    args = p.parse_args()
    started = time.time()
    cluster = cm.Cluster(H100_NODE.name.replace("40%", f"{args.mfu:.0%}"), H100_NODE.peak_flops, args.mfu)
    notes = []

    # ---------------------------------------------------------------- 1. calibration on measured points
    points, mc_rows = calibration_points()
    cal, diag = cm.calibrate(points) if points else (cm.Calibration(), {"note": "no measured points"})
    cal_rows = []
    if mc_rows:
        G = 2
        comp_pts = []
        for r in mc_rows:
            if r["mode"] != "DDP":
                comp_pts.append(dict(params=float(r["params"]), tokens_per_step=float(r["tokens_per_step"]),
                                     compute_s=float(r["compute_seconds_per_step"])))
        cpu = cm.cpu_cluster_from(comp_pts)
        measured_cal = cm.Calibration(cal.efficiency, cal.fixed_s, 0.0, cal.outer_s_per_byte)  # one bucket: no overlap
        for r in mc_rows:
            link = cm.Link(r["link"], float(r["bandwidth_mbit_s"]) * 1e6, float(r["latency_ms"]) / 1e3)
            n, tps = float(r["params"]), float(r["tokens_per_step"])
            if r["mode"] == "DDP":
                step = cm.ddp_step(n, tps, G, cpu, link, measured_cal)
            else:
                H = int(r["mode"].split("H=")[1])
                step = cm.local_sgd_step(n, tps, G, H, cpu, link, measured_cal)
            measured = float(r["seconds_per_step"])
            cal_rows.append(dict(link=r["link"], run=r["mode"], measured_s_per_step=measured,
                                 predicted_s_per_step=step.step_s, rel_error=step.step_s / measured - 1,
                                 measured_s_per_collective=float(r["seconds_per_collective"]),
                                 predicted_s_per_collective=(step.comm_s if r["mode"] == "DDP"
                                                             else step.comm_s * int(r["mode"].split("H=")[1]))))
        for link_name in dict.fromkeys(r["link"] for r in mc_rows):
            d = next(x for x in cal_rows if x["link"] == link_name and x["run"] == "DDP")
            l = next(x for x in cal_rows if x["link"] == link_name and x["run"] != "DDP")
            m = next(x for x in mc_rows if x["link"] == link_name and x["mode"] != "DDP")
            l["measured_speedup_per_step"] = d["measured_s_per_step"] / l["measured_s_per_step"]
            l["predicted_speedup_per_step"] = d["predicted_s_per_step"] / l["predicted_s_per_step"]
            l["measured_speedup_to_target"] = float(m["speedup_vs_ddp"]) if m["speedup_vs_ddp"] else float("nan")
        h.write_csv(RESULTS / "projection_calibration.csv", cal_rows)
        notes.append(f"Calibrated on {len(points)} measured collectives from multi_cluster/results/multi_cluster.csv: "
                     f"η = {cal.efficiency:.3f} of the nominal bandwidth (raw fit {diag['efficiency_raw']:.3f}, "
                     f"capped at 1), c0 = {cal.fixed_s * 1e3:.2f} ms per "
                     f"collective, sync work {cal.outer_s_per_byte * 1e9:.2f} ns/byte; this CPU sustains "
                     f"{cpu.flops / 1e9:.1f} GFLOP/s per process. Largest all-reduce fit error "
                     f"{diag.get('max_rel_error_allreduce', float('nan')):.1%}.")
    else:
        notes.append("multi_cluster/results/multi_cluster.csv not found: default calibration (η = 0.9, c0 = 0). Run "
                     "`python benchmarks/multi_cluster/multi_cluster.py` first to calibrate.")
    sweep = h.results_dir("sync_sweep") / "sync_sweep.csv"
    if sweep.exists():
        dev = [abs(float(r["bytes_ratio_to_ddp"]) / float(r["expected_bytes_ratio"]) - 1)
               for r in h.read_csv(sweep) if r["mode"] != "ddp"]
        notes.append(f"Traffic check (sync_sweep.csv, {len(dev)} runs): local SGD's counted bytes per step "
                     f"= DDP's × syncs/steps within {max(dev):.2e} (relative); the model charges one all-reduce of "
                     "the model per sync.")

    # ---------------------------------------------------------------- 2. projection grid
    eff = args.efficiency if args.efficiency is not None else cal.efficiency
    proj_cal = cm.Calibration(efficiency=eff, fixed_s=cal.fixed_s, overlap=2 / 3, outer_s_per_byte=0.0)
    if args.efficiency is not None:
        notes.append(f"Projection with η = {eff:.2f} (--efficiency) instead of the calibrated {cal.efficiency:.3f}.")
    grid = []
    for N in SIZES:
        for G in CLUSTERS:
            for link in LINKS:
                ddp = cm.ddp_step(N, args.tokens_per_step, G, cluster, link, proj_cal, args.bytes_per_value)
                total = TOKENS_PER_PARAM * N
                row = dict(params=N, clusters=G, link=link.name, bandwidth_bit_s=link.bandwidth_bit_s,
                           latency_ms=link.latency_s * 1e3, compute_s_per_step=ddp.compute_s,
                           allreduce_s=ddp.comm_s, ddp_s_per_step=ddp.step_s, ddp_utilization=ddp.utilization,
                           ddp_days=cm.training_seconds(ddp, total, args.tokens_per_step, G) / 86400)
                for H in H_VALUES:
                    loc = cm.local_sgd_step(N, args.tokens_per_step, G, H, cluster, link, proj_cal,
                                            args.bytes_per_value)
                    row[f"local_H{H}_utilization"] = loc.utilization
                    row[f"local_H{H}_days"] = cm.training_seconds(loc, total, args.tokens_per_step, G) / 86400
                grid.append(row)
    h.write_csv(RESULTS / "projection.csv", grid)
    plot(cluster, proj_cal, args)

    # ---------------------------------------------------------------- summary
    def fmt_util(x: float) -> str:
        return f"{x:.0%}" if x >= 0.01 else f"{x:.1%}"

    sel = [r for r in grid if r["clusters"] == 8]
    table_rows = []
    for r in sel:
        table_rows.append(dict(N=f"{r['params'] / 1e9:g}B", link=r["link"], compute=f"{r['compute_s_per_step']:.2f}",
                               ar=f"{r['allreduce_s']:.2f}", ddp=fmt_util(r["ddp_utilization"]),
                               l32=fmt_util(r["local_H32_utilization"]), l128=fmt_util(r["local_H128_utilization"]),
                               l512=fmt_util(r["local_H512_utilization"]), ddp_days=f"{r['ddp_days']:.3g}",
                               l128_days=f"{r['local_H128_days']:.3g}"))
    t_grid = h.md_table(table_rows, [("N", "params"), ("link", "link per cluster"), ("compute", "compute s/step"),
                                     ("ar", "all-reduce s"), ("ddp", "DDP util."), ("l32", "local H=32"),
                                     ("l128", "local H=128"), ("l512", "local H=512"), ("ddp_days", "DDP days"),
                                     ("l128_days", "local H=128 days")])
    vsG = [r for r in grid if r["params"] == 7e9 and r["link"] == LINKS[2].name]
    t_G = h.md_table([dict(G=r["clusters"], ddp=fmt_util(r["ddp_utilization"]),
                           l128=fmt_util(r["local_H128_utilization"]), ddp_days=f"{r['ddp_days']:.3g}",
                           l128_days=f"{r['local_H128_days']:.3g}") for r in vsG],
                     [("G", "clusters"), ("ddp", "DDP util."), ("l128", "local H=128 util."),
                      ("ddp_days", "DDP days"), ("l128_days", "local H=128 days")])
    text = ""
    if cal_rows:
        t_cal = h.md_table(cal_rows, [("link", "link"), ("run", "run"), ("measured_s_per_step", "measured s/step"),
                                      ("predicted_s_per_step", "model s/step"), ("rel_error", "error"),
                                      ("measured_speedup_per_step", "measured speed-up/step"),
                                      ("predicted_speedup_per_step", "model speed-up/step"),
                                      ("measured_speedup_to_target", "measured speed-up to target")])
        text += f"Calibration check (CPU, 2 processes, emulated links; DDP without overlap: one bucket):\n\n{t_cal}\n\n"
    text += (f"Projection: {cluster.name}, {args.tokens_per_step / 1e6:g}M tokens per cluster per step, "
             f"η = {eff:.2f}, "
             f"{args.bytes_per_value:g}-byte values, DDP hides its all-reduce behind 2/3 of the compute, local SGD's "
             f"sync is not overlapped; {TOKENS_PER_PARAM} tokens per parameter for the wall clock. 8 clusters:\n\n"
             f"{t_grid}\n\n7B parameters over 10 Gbit/s, 30 ms, vs number of clusters:\n\n{t_G}\n\n"
             + "\n".join(f"- {n}" for n in notes) + "\n")
    print(text)
    command = "python benchmarks/projection/projection.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    h.write_summary(RESULTS / "projection.md", text, started, command)


def plot(cluster: cm.Cluster, cal: cm.Calibration, args) -> None:
    plt = h.pyplot()
    if plt is None:
        return
    tps, bpv = args.tokens_per_step, args.bytes_per_value
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4.2))
    # (a) utilization vs bandwidth. With a fixed batch per cluster compute and bytes both grow with N, so the curves
    # are the same for every N >= 1B (latency is negligible there): one panel, 7B.
    N, G, lat = 7e9, 8, 0.030
    bws = np.geomspace(10e6, 1e12, 200)
    a.plot(bws / 1e9, [cm.ddp_step(N, tps, G, cluster, cm.Link("", x, lat), cal, bpv).utilization for x in bws],
           "k-", lw=2, label="DDP")
    for i, H in enumerate(H_VALUES):
        a.plot(bws / 1e9, [cm.local_sgd_step(N, tps, G, H, cluster, cm.Link("", x, lat), cal, bpv).utilization
                           for x in bws], "--", color=f"C{i}", label=f"local SGD H={H}")
    for link in LINKS:
        a.axvline(link.bandwidth_bit_s / 1e9, color="grey", lw=0.6, ls=":")
    a.set_xscale("log")
    a.set_ylim(0, 1.02)
    a.set_xlabel("link bandwidth per cluster (Gbit/s), 30 ms latency")
    a.set_ylabel("utilization (compute / step time)")
    a.set_title(f"{G} clusters, 7B params (same curves for 1B-70B)", fontsize=10)
    a.grid(alpha=0.3, which="both")
    a.legend(fontsize=8)
    # (b) utilization vs number of clusters, 10 Gbit/s
    link = LINKS[2]
    b.plot(CLUSTERS, [cm.ddp_step(N, tps, g, cluster, link, cal, bpv).utilization for g in CLUSTERS], "ko-", lw=2,
           label="DDP")
    for i, H in enumerate(H_VALUES):
        b.plot(CLUSTERS, [cm.local_sgd_step(N, tps, g, H, cluster, link, cal, bpv).utilization for g in CLUSTERS],
               "s--", color=f"C{i}", label=f"local SGD H={H}")
    b.set_xscale("log", base=2)
    b.set_ylim(0, 1.02)
    b.set_xlabel("clusters")
    b.set_ylabel("utilization")
    b.set_title(f"7B params, {link.name}", fontsize=10)
    b.grid(alpha=0.3)
    b.legend(fontsize=8)
    # (c) wall clock to 20 tokens/param vs size, 8 clusters
    sizes = np.geomspace(0.1e9, 70e9, 30)
    for i, link in enumerate((LINKS[1], LINKS[2], LINKS[3])):
        d = [cm.training_seconds(cm.ddp_step(n, tps, G, cluster, link, cal, bpv), TOKENS_PER_PARAM * n, tps, G)
             / 86400 for n in sizes]
        l = [cm.training_seconds(cm.local_sgd_step(n, tps, G, 128, cluster, link, cal, bpv), TOKENS_PER_PARAM * n,
                                 tps, G) / 86400 for n in sizes]
        c.plot(sizes / 1e9, d, "-", color=f"C{i}", label=f"DDP, {link.name.split(' (')[0]}")
        c.plot(sizes / 1e9, l, "--", color=f"C{i}", label=f"local H=128, {link.name.split(' (')[0]}")
    c.set_xscale("log")
    c.set_yscale("log")
    c.set_xlabel("parameters (billions)")
    c.set_ylabel(f"days to {TOKENS_PER_PARAM} tokens/param")
    c.set_title(f"{G} clusters: training wall clock", fontsize=10)
    c.grid(alpha=0.3, which="both")
    c.legend(fontsize=7)
    fig.suptitle(f"cost model: clusters of {cluster.name}, {tps / 1e6:g}M tokens/cluster/step, "
                 f"η={cal.efficiency:.2f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "projection.png", dpi=100)


if __name__ == "__main__":
    main()
