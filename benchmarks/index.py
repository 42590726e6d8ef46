"""The benchmarks' index: one row per benchmark (its question, command, latest headline figure, target and whether it
is met), each headline read from that benchmark's results files, so the table follows the results.

    python benchmarks/index.py               # print the table
    python benchmarks/index.py --write       # rewrite it in benchmarks/README.md (between its markers)
    python benchmarks/index.py --quick       # smoke-run every benchmark at its quick size, one at a time
    python benchmarks/index.py --quick peers chaos --timeout 600

``--quick`` runs each benchmark's quick command in a scratch copy of ``benchmarks/`` (the recorded results stay as
they are; ``--keep DIR`` keeps the copy and its outputs) and reports each one's exit status and minutes.
``tests/benchmarks/test_index.py`` keeps the README's table, the folders and this registry in step.
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BENCHMARKS = Path(__file__).resolve().parent
README = BENCHMARKS / "README.md"
START, END = "<!-- index:start -->\n", "\n<!-- index:end -->"

#: What a headline extraction returns: (figure, met), met one of "met", "missed", "partly", "not shown", "—".
Headline = tuple[str, str]


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: ``benchmarks/<name>/<name>.py``, its README and ``results/``."""

    name: str
    question: str
    args: str  # the default command's arguments
    quick: str  # the smoke run's arguments (small size)
    target: str
    headline: Callable[[Path], Headline]  # read from the benchmark's results folder

    @property
    def command(self) -> str:
        return " ".join(["python", f"benchmarks/{self.name}/{self.name}.py", self.args]).strip()


def rows(results: Path, name: str) -> list[dict]:
    with open(results / name, newline="") as f:
        return list(csv.DictReader(f))


def f(x: str) -> float:
    return float(x)


def met(ok: bool) -> str:
    return "met" if ok else "missed"


# ---------------------------------------------------------------------------------------------------- headlines
def equal_compute(r: Path) -> Headline:
    s = {(x["mode"], x["H"]): x for x in rows(r, "equal_compute_seeds.csv")}
    a, d = s[("average", "16")], s[("diloco", "16")]
    return (f"loss / DDP at H=16, mean of {a['n']} seeds: local SGD {f(a['mean_ratio']):.3f}, DiLoCo "
            f"{f(d['mean_ratio']):.3f} (H=64: {f(s[('average', '64')]['mean_ratio']):.3f} / "
            f"{f(s[('diloco', '64')]['mean_ratio']):.3f}) [equal_compute_seeds.csv]",
            met(max(f(a["max_ratio"]), f(d["max_ratio"])) <= 1.02))


def sync_sweep(r: Path) -> Headline:
    runs = [x for x in rows(r, "sync_sweep.csv") if x["mode"] != "ddp"]
    dev = max(abs(f(x["bytes_ratio_to_ddp"]) / f(x["expected_bytes_ratio"]) - 1) for x in runs)
    g2 = [f(x["loss_ratio_to_ddp"]) for x in runs if x["G"] == "2" and x["H"] != "1"]
    exact = "exactly" if dev == 0 else f"within {dev:.1e}"
    return (f"bytes / DDP = 1/H {exact} ({len(runs)} runs); loss / DDP {min(g2):.3f}-{max(g2):.3f} for "
            "2 groups at H = 4-256 [sync_sweep.csv]", met(dev == 0))


def scaling_law(r: Path) -> Headline:
    t = {x["mode"]: x for x in rows(r, "scaling_law_trend.csv")}
    a, d = t["local SGD H=16"], t["DiLoCo H=16"]
    worst = max(f(x[k]) for x in (a, d) for k in ("ratio_0.22M", "ratio_0.39M"))
    return (f"loss / DDP at H=16, 0.22M / 0.39M: local SGD {f(a['ratio_0.22M']):.3f} / {f(a['ratio_0.39M']):.3f}, "
            f"DiLoCo {f(d['ratio_0.22M']):.3f} / {f(d['ratio_0.39M']):.3f} [scaling_law_trend.csv]", met(worst <= 1.02))


def multi_cluster(r: Path) -> Headline:
    s = {(x["bandwidth_mbit_s"], x["mode"] == "DDP"): x for x in rows(r, "multi_cluster.csv")}
    speed = {bw: f(s[(bw, False)]["speedup_vs_ddp"]) for bw in ("1000", "100", "10")}
    return (f"local SGD reaches DDP's final loss {speed['100']:.2f}× sooner at 100 Mbit/s "
            f"({speed['1000']:.2f}× at 1 Gbit/s, {speed['10']:.1f}× at 10 Mbit/s) [multi_cluster.csv]",
            met(speed["100"] >= 5))


def projection(r: Path) -> Headline:
    x = next(x for x in rows(r, "projection.csv") if f(x["params"]) == 7e9 and x["clusters"] == "8"
             and x["link"].startswith("10 Gbit/s"))
    return (f"7B, 8 clusters over 10 Gbit/s: utilization DDP {f(x['ddp_utilization']):.0%}, local SGD H=128 "
            f"{f(x['local_H128_utilization']):.0%} [projection.csv]", "—")


def core_overhead(r: Path) -> Headline:
    s = {x["metric"]: x for x in rows(r, "core_overhead.csv")}
    step = s["median_inner_step_s"]
    return (f"inner step local SGD / plain {f(step['ratio']):.3f} [{f(step['interval_low']):.3f}, "
            f"{f(step['interval_high']):.3f}] ({step['interval_rounds']} rounds) [core_overhead.csv]",
            "met" if step["verdict"] == "shown" else "not shown")


def fsdp_shards(r: Path) -> Headline:
    s = {x["group_size"]: x for x in rows(r, "fsdp_shards.csv") if x["kind"] == "fsdp" and x["rank"] == "0"}
    model = f(next(iter(s.values()))["model_bytes"])
    ok = all(f(x["bytes_per_sync"]) == (model / int(g) if x["groups"] != "1" else 0) for g, x in s.items())
    per = " / ".join(f"{int(f(s[g]['bytes_per_sync'])):,}" for g in sorted(s, key=int))
    return f"bytes per sync per rank at S = {' / '.join(sorted(s, key=int))}: {per} [fsdp_shards.csv]", met(ok)


def soak(r: Path) -> Headline:
    data = [x for x in rows(r, "soak.csv") if x["rank"] == "0"]
    k = max(1, len(data) // 10)
    first = statistics.median(f(x["rss_mb"]) for x in data[:k])
    last = statistics.median(f(x["rss_mb"]) for x in data[-k:])
    fds = {x["open_fds"] for x in data}
    return (f"{len(data)} syncs: rank 0 RSS {first:.0f} → {last:.0f} MiB (first vs last decile), open fds "
            f"{'constant' if len(fds) == 1 else 'varying'} [soak.csv]", "—")


def streaming(r: Path) -> Headline:
    s = {x["run"]: x for x in rows(r, "streaming.csv")}
    x = s["streaming F=4"]
    lo = max(abs(f(y["loss_vs_plain"]) - 1) for k, y in s.items() if k.startswith("streaming"))
    return (f"F=4: peak bytes per step {f(x['peak_vs_plain']):.4f}× plain ({1 / f(x['peak_vs_plain']):.2f}× lower), "
            f"loss within {lo:.2%} of plain [streaming.csv]", "partly" if lo <= 0.01 else "missed")


def compression(r: Path) -> Headline:
    s = {x["run"]: x for x in rows(r, "compression.csv")}
    x = s["local SGD, int8"]
    ok = abs(f(x["loss_ratio"]) - 1) <= 0.01 and f(x["bytes_ratio"]) <= 0.26
    # topk: the default run's (all-gathered, beside the others), else the earlier separate two-phase run's
    source = "compression.csv" if "local SGD, topk" in s else "compression_topk.csv"
    t = s.get("local SGD, topk") or {x["run"]: x for x in rows(r, "compression_topk.csv")}["local SGD, topk"]
    fewer = 1 / f(t["bytes_ratio"])
    loss = f(t["loss_ratio_diloco"]) if t.get("loss_ratio_diloco") else f(t["loss_ratio"])
    headline = (f"int8 (local SGD): loss {f(x['loss_ratio']):.4f}× fp32 at {f(x['bytes_ratio']):.4f}× the bytes; "
                f"DiLoCo int8 {f(s['DiLoCo, int8']['loss_ratio']):.4f}× [compression.csv]; topk (local SGD): "
                f"{fewer:.1f}× fewer bytes, loss {loss:.3f}× "
                f"{'DiLoCo fp32' if t.get('loss_ratio_diloco') else 'fp32'} [{source}]")
    recipe = s.get("sparse recipe, topk_recipe")  # the sparse target's best entry, when the run has it
    if recipe is not None:
        fewer, loss = 1 / f(recipe["bytes_ratio"]), f(recipe["loss_ratio_diloco"])
        headline += f"; topk_recipe: {fewer:.1f}× fewer bytes, loss {loss:.4f}× DiLoCo fp32 [compression.csv]"
    topk_ok = [fewer >= 100, loss <= 1.02]
    return headline, met(ok) if all(topk_ok) == ok else "partly"


def screen(r: Path) -> Headline:
    text = (r / "screen_broken.md").read_text()
    alone = float(re.search(r"healthy groups alone.*?: [\d.]+ \(([\d.]+)x\)", text).group(1))
    ratio = r"(?:[\d.]+ \(([\d.]+)x\)|diverged)"  # a cell: "loss (ratio to the clean run)[, out k/n]"
    screened = rf"{ratio}(?:, out \d+/\d+)?"
    # per way of breaking: without the screen, the norm screen, norm and direction (screen_min_cosine='chance')
    cells = {k: [float(x) if x else float("inf") for x in v]
             for k, *v in re.findall(rf"^\| (\w+) \| {ratio} \| {screened} \| {screened} \|$", text, re.M)}
    caught = [k for k, (_, _, on) in cells.items() if on <= alone * 1.01]
    other = ", ".join(f"{k} {on:.3f}×" for k, (_, _, on) in cells.items() if k not in caught)
    norm_only = ", ".join(f"{k} {norm:.3f}×" for k, (_, norm, _) in cells.items() if norm > alone * 1.01)
    worst = max(off for off, _, _ in cells.values())
    ok = all(on <= 1.01 for _, _, on in cells.values())
    shown = (f"{' / '.join(caught)} {max(cells[k][2] for k in caught):.3f}× the clean run of 4 healthy groups "
             f"({'met' if ok else 'missed'}), the 3 healthy groups alone's {alone:.3f}× (met); " if caught else "")
    # the clean run with norm and direction: the syncs that left out an (honest) group
    clean = re.search(r"out (\d+)/(\d+) with norm and direction", text)
    honest_out = (f"; clean run: an honest group left out at {clean.group(1)} of {clean.group(2)} syncs"
                  if clean and clean.group(1) != "0" else "")
    return (f"one of 4 groups broken, with the screen (norm + direction, screen_min_cosine='chance'): {shown}{other}"
            f"{'; ' if other else ''}norm screen alone: {norm_only or 'all caught'}; without it up to {worst:.0f}×"
            f"{honest_out} [screen_broken.md]", met(ok))


def chaos(r: Path) -> Headline:
    run = rows(r, "chaos.csv")[1]
    ev = rows(r, "chaos_events.csv")
    within = sum(e["within_bound"] == "True" for e in ev)
    heal = max(f(e["heal_over_model_plus_outer"]) for e in ev)
    ok = abs(f(run["loss_ratio"]) - 1) <= 0.01
    data = ""
    if "samples_read_twice" in run:  # the data cursor against hand-picked shards (the third run), same kills
        shards = rows(r, "chaos.csv")[2]
        data = (f"; windows contributed twice / never read: {run['samples_read_twice']} / "
                f"{run['samples_never_read']} with the data cursor, {shards['samples_read_twice']} / "
                f"{shards['samples_never_read']} with hand-picked shards")
    return (f"a kill every 8 syncs: loss {f(run['loss_ratio']):.4f}×, goodput {f(run['goodput']):.3f}; stalls "
            f"within heartbeat + sync {within} of {len(ev)}; a heal moves {heal:.2f}× model + outer state{data} "
            "[chaos.csv, chaos_events.csv]",
            "partly" if ok and (within < len(ev) or heal > 1) else met(ok))


def peers(r: Path) -> Headline:
    t = rows(r, "peers_targets.csv")
    sync = [f(x["ratio"]) for x in t if x["target"].startswith("sync time") and "(average" in x["target"]]
    shown = sum(x["holds"] == "shown" for x in t)
    ratios = " / ".join(f"{v:.2f}" for v in sync)
    return (f"sync time ours / fastest peer (averaging): {ratios} across sizes; "
            f"{shown} of {len(t)} targets shown [peers_targets.csv]",
            "met" if shown == len(t) else "partly" if shown else "missed")


def gpu(r: Path) -> Headline:
    ratios = [f(x["ratio"]) for x in rows(r, "gpu_inner_step.csv")]
    codec = min(f(x["encode_GBps"]) for x in rows(r, "gpu_codecs.csv"))
    return (f"one H200: inner step / plain Lightning {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-"
            f"{max(ratios):.3f}); codecs ≥ {codec:.0f} GB/s [gpu_inner_step.csv, gpu_codecs.csv]",
            "met" if max(ratios) <= 1.02 else "not shown")


def async_save(r: Path) -> Headline:
    s = {x["mode"]: x for x in rows(r, "async_save.csv")}
    a, y = s["async"], s["sync"]
    stall, copy = f(a["median_stall_seconds"]), f(a["median_host_copy_seconds"])
    return (f"median stall per save {stall:.2f} s async vs {f(y['median_stall_seconds']):.2f} s synchronous "
            f"(host copy {copy:.2f} s) [async_save.csv]", "partly" if stall > copy else "met")


def edge(r: Path) -> Headline:
    s = {x["run"]: x for x in rows(r, "edge.csv")}
    plain = {k: x for k, x in s.items() if "straggler" not in k}  # the straggler legs run at other speeds
    whole = next(x for k, x in plain.items() if "time-based" in k and "streaming" not in k and "async_sync" not in k)
    stream = next(x for k, x in s.items() if "streaming" in k and "churn" not in k)
    churn = next(x for k, x in s.items() if "churn" in k and "async_sync" not in k)
    beside = next((x for k, x in plain.items() if "async_sync" in k and "churn" not in k), None)
    best = beside if beside is not None else whole
    fast = f(best["speedup_vs_ddp"]) >= 5
    idle = f(best["fast_idle_fraction"]) <= 0.10
    loss = beside is None or f(beside["final_val_loss"]) <= 1.02 * f(whole["final_val_loss"])
    lead = "" if beside is None else (
        f"async_sync + int4: DDP's loss {f(beside['speedup_vs_ddp']):.2f}× sooner, fast devices idle "
        f"{f(beside['fast_idle_fraction']):.1%}, final loss "
        f"{f(beside['final_val_loss']) / f(whole['final_val_loss']) - 1:+.1%} vs synchronous; ")
    async_churn = next((x for k, x in s.items() if "async_sync" in k and "churn" in k), None)
    straggler = next((x for k, x in s.items() if "straggler" in k and "async_sync" in k), None)
    tail = "" if async_churn is None else (
        f"; async_sync churn {f(async_churn['final_loss_vs_twin']) - 1:+.1%}")
    tail += "" if straggler is None else (
        f"; straggler (one ½×) with async_sync: goodput {f(straggler['goodput']):.3f}, fast devices idle "
        f"{f(straggler['fast_idle_fraction']):.1%}")
    rest = ((async_churn is None or f(async_churn["final_loss_vs_twin"]) <= 1.02)
            and (straggler is None or f(straggler["goodput"]) >= 0.95))
    return (lead + f"synchronous time-based + int4: {f(whole['speedup_vs_ddp']):.2f}×, "
            f"{f(whole['fast_idle_fraction']):.1%}; with streaming {f(stream['speedup_vs_ddp']):.2f}×, "
            f"{f(stream['fast_idle_fraction']):.1%}; churn {f(churn['final_loss_vs_time_based']) - 1:+.1%}{tail} "
            "[edge.csv]",
            "met" if fast and idle and loss and rest else "partly" if fast or idle else "missed")


def federated_sync(r: Path) -> Headline:
    s = rows(r, "federated_sync.csv")
    worst = max(f(x["over_limit"]) for x in s)
    exact = all(x["bytes_exact"] == "True" for x in s)
    ratios = " / ".join(f"{f(x['over_limit']):.2f}" for x in s)
    codecs = " / ".join(x["codec"] for x in s)
    return (f"sync time / link limit {ratios} ({codecs}); bytes = codec payload: {'yes' if exact else 'no'} "
            "[federated_sync.csv]", met(worst <= 1.2 and exact))


def faults(r: Path) -> Headline:
    s = rows(r, "faults.csv")
    ok = sum(x["as_expected"] == "True" for x in s)
    return f"{ok} of {len(s)} fault runs as expected (named, no hang, newest checkpoint verifies) [faults.csv]", \
        met(ok == len(s))


def codec_cost(r: Path) -> Headline:
    s = {x["codec"]: x for x in rows(r, "codec_cost.csv")}
    cells = ", ".join(f"{c} {f(x['encode_ns_per_value']):.2g} / {f(x['decode_ns_per_value']):.2g}"
                      for c, x in s.items() if c != "fp32")
    return f"encode / decode ns per value, one thread: {cells} [codec_cost.csv]", "—"


def checkpoint_memory(r: Path) -> Headline:
    s = {x["strategy"]: x for x in rows(r, "checkpoint_memory.csv")
         if x["rank"] == "0" and x["rank0_over_others"] and (x["strategy"] == "ddp" or " 4 groups" in x["label"])}
    return (f"4 groups: rank 0 peak RSS {f(s['local_sgd']['rank0_over_others']):.3f}× the largest other rank (DDP "
            f"{f(s['ddp']['rank0_over_others']):.2f}) [checkpoint_memory.csv]", "—")


BENCHMARKS_ALL: list[Benchmark] = [
    Benchmark("equal_compute", "DDP vs local SGD vs DiLoCo at equal parameters, tokens and steps", "",
              "--seeds 1234 --sync-every 16 --steps 64 --eval-every 32 --local-warmup 16",
              "within 2% of DDP at H=16", equal_compute),
    Benchmark("sync_sweep", "final loss and bytes vs H (1 … 256) for 2 and 4 worker groups", "",
              "--steps 32 --sync-every 1 16 --groups 2", "bytes / step = DDP's / H exactly", sync_sweep),
    Benchmark("scaling_law", "the paper's regime (≥ 20 tokens/param): L(N) fits, loss ratio per size and its trend",
              "", "--smoke --sizes nano micro tiny --tokens-per-param 0.1 --cache-dir quick_cache",
              "loss / DDP ≤ 1.02 at H=16 for every size ≥ 0.1M", scaling_law),
    Benchmark("multi_cluster", "wall clock to DDP's loss over emulated 1 Gbit/s … 10 Mbit/s links", "",
              "--links 1 --steps 64 --eval-every 32",
              "≥ 5× sooner at 100 Mbit/s", multi_cluster),
    Benchmark("projection", "the cost model calibrated on the measured links, projected to 2-64 clusters, 0.1B-70B",
              "", "", "(a projection: no target)", projection),
    Benchmark("core_overhead", "strategy overhead per inner step vs a plain process; bytes per step vs DDP", "",
              "--steps 40 --sync-every 20 --repeats 1", "≤ 1.02× plain (interval's upper end)", core_overhead),
    Benchmark("fsdp_shards", "FSDP inside worker groups: bytes per sync and outer state per shard count", "",
              "--steps 8 --sync-every 4", "bytes per sync per rank = its shard", fsdp_shards),
    Benchmark("soak", "2,000 steps / 125 syncs: memory, descriptors and sync time over time", "",
              "--steps 64 --sync-every 16 --ckpt-every 32", "(no numeric target: flat memory and descriptors)", soak),
    Benchmark("streaming", "streaming sync (F fragments, overlap τ): peak bytes per step, loss, wall clock", "",
              "--steps 64 --repeats 1 --no-ddp", "peak bytes ≈ F× lower at equal loss (±1%)", streaming),
    Benchmark("compression", "compressed syncs (bf16 / int8 / int4 / top-k, error feedback): final loss vs bytes",
              "", "--steps 64 --eval-every 32 --codecs none int8 --outer average",
              "int8 within 1% of fp32's loss at ¼ of the bytes; topk ≥ 100× fewer bytes within 2% of DiLoCo fp32",
              compression),
    Benchmark("chaos", "federated groups SIGKILLed every 8 syncs and restarted (healing) vs no failures; samples read "
              "twice / never read with the data cursor vs hand-picked shards", "",
              "--quick", "loss within 1%; stall ≤ heartbeat + one sync; heal ≤ model + outer state; nothing read twice "
              "with the data cursor", chaos),
    Benchmark("peers", "ours vs torchft, accelerate and torch's averagers: same math, sync time, tokens/s, features",
              "", "--quick", "ours ≤ 1.0× the fastest peer (sync, loop); ≤ 1.2× the link limit", peers),
    Benchmark("gpu", "the CUDA path on one GPU: sync work vs the byte limit, inner-step overhead, codecs", "",
              "--dry-run --repeats 2 --rounds 2 --steps 4",
              "inner step ≤ 1.02× plain Lightning", gpu),
    Benchmark("async_save", "training stall per checkpoint: async vs synchronous writes", "",
              "--skip-runs --repeats 1", "async stall ≤ the device-to-host copy", async_save),
    Benchmark("edge", "devices of unequal speed on slow links, federated: time-based syncs vs fixed H vs DDP", "",
              "--preset quick", "≥ 5× sooner than DDP; fast devices idle ≤ 10%; async_sync final loss ≤ +2% of the "
              "synchronous run; async_sync churn ≤ +2%; straggler goodput ≥ 0.95 with async_sync", edge),
    Benchmark("federated_sync", "compressed syncs across federated jobs: bytes vs the codec, time vs the link", "",
              "--numel 1000000 --syncs 2", "bytes = the codec's payload; ≤ 1.2× the link limit", federated_sync),
    Benchmark("faults", "a rank killed / interrupted at each moment: named, no hang, checkpoint intact", "",
              "--worlds 2 --signals SIGKILL --moments interval", "every run as expected", faults),
    Benchmark("screen", "the robust screen: one of four groups broken (×100, sign flip, noise, bit flip, ...): final "
              "loss without it, with the norm screen and with its direction test; its cost per sync", "", "--quick",
              "with the screen within 1% of the clean run (issue 37)", screen),
    Benchmark("checkpoint_memory", "peak memory and bytes written per rank at a checkpoint save", "",
              "--steps 8 --every 4 --n-layer 1 --n-embd 64 --csv=", "(a measurement: no target)",
              checkpoint_memory),
    Benchmark("codec_cost", "each codec's CPU seconds per value encoded and decoded: the planner's coding time", "",
              "--numel 262144 --repeats 1", "(a measurement: no target)", codec_cost),
]


def ran_on(name: str) -> str:
    """The date of the benchmark's latest summary (``Command: … — ran YYYY-MM-DD``), or ``—``."""
    dates = []
    for md in (BENCHMARKS / name / "results").glob("*.md"):
        m = re.search(r"ran (\d{4}-\d{2}-\d{2})", md.read_text().split("\n", 1)[0])
        if m and md.stem == name:
            dates.append(m.group(1))
    return max(dates) if dates else "—"


def table() -> str:
    """The index table, from every benchmark's results."""
    out = ["| benchmark | question | command | latest headline [results file] | target | met |",
           "|---|---|---|---|---|---|"]
    for b in BENCHMARKS_ALL:
        figure, verdict = b.headline(BENCHMARKS / b.name / "results")
        ran = ran_on(b.name)
        when = f" (ran {ran})" if ran != "—" else ""
        out.append(f"| [{b.name}]({b.name}/README.md) | {b.question} | `{b.command}` | {figure}{when} | {b.target} "
                   f"| {verdict} |")
    return "\n".join(out)


def write_readme() -> None:
    text = README.read_text()
    head, rest = text.split(START, 1)
    README.write_text(head + START + table() + END + rest.split(END, 1)[1])


def run_quick(names: list[str], timeout: float, keep: str | None) -> int:
    """Every chosen benchmark's quick command, one at a time, in a scratch copy of ``benchmarks/``."""
    chosen = [b for b in BENCHMARKS_ALL if not names or b.name in names]
    scratch = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="lsgd_quick_"))
    shutil.copytree(BENCHMARKS, scratch / "benchmarks", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    failed = 0
    try:
        for b in chosen:
            if not b.quick:
                print(f"{b.name}: no quick size (it runs in seconds: the default is the quick size)", flush=True)
            cmd = [sys.executable, f"benchmarks/{b.name}/{b.name}.py", *b.quick.split()]
            t0 = time.time()
            try:
                code = subprocess.run(cmd, cwd=scratch, timeout=timeout, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
            failed += code != 0
            print(f"{b.name}: exit {code} after {(time.time() - t0) / 60:.1f} min", flush=True)
    finally:
        if keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"outputs under {scratch}/benchmarks/*/results/")
    return failed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="rewrite the table in benchmarks/README.md")
    p.add_argument("--quick", nargs="*", metavar="NAME", help="smoke-run these benchmarks (none named: all)")
    p.add_argument("--timeout", type=float, default=900, help="seconds each quick run may take (default 900)")
    p.add_argument("--keep", help="with --quick: run in this folder and keep it")
    args = p.parse_args()
    if args.quick is not None:
        sys.exit(1 if run_quick(args.quick, args.timeout, args.keep) else 0)
    if args.write:
        write_readme()
    else:
        print(table())


if __name__ == "__main__":
    main()
