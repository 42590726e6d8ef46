"""The library beside its peers: torchft, accelerate and torch's model averagers, doing the same work.

Peers (each used the way its own documentation uses it, on CPU with gloo, 2 processes), one adapter each behind one
interface (``adapters/``: ``interface.py`` is the interface, ``common.py`` what they share on the rank side):

* **ours** (``adapters/ours.py``): ``Trainer(strategy=LocalSGDStrategy(sync_every=H, outer_optimizer="average" |
  "diloco"))``, and :class:`lightning_localsgd.engine.outer.OuterSync` on bare ``torch.distributed`` (a plain loop).
* **torch averager** (``adapters/torch_averager.py``): ``PostLocalSGDOptimizer(AdamW, PeriodicModelAverager(period=H,
  warmup_steps=H - 1))`` on a plain loop (``warmup_steps = H - 1`` puts its averages after steps H, 2H, …).
* **accelerate** (``adapters/accelerate_local_sgd.py``): ``accelerate.local_sgd.LocalSGD(accelerator, model,
  local_sgd_steps=H)`` with ``Accelerator(cpu=True)``.
* **torchft LocalSGD / DiLoCo** (``adapters/torchft_local_sgd.py``): ``torchft.local_sgd.LocalSGD`` / ``DiLoCo`` with a
  ``torchft.Manager`` per process and torchft's lighthouse in the launcher process.

The rank side of every part (``jobs.py``) sees only the interface; this file launches the jobs and writes the report.

Same work for everyone: the example GPT (``lightning_localsgd.examples.gpt``) at one seed, its AdamW + warm-up/cosine
schedule, the same batches on every rank (a ``DistributedSampler`` over the builtin corpus, materialised once per
rank and fed to every peer in the same order), the same steps and H. DiLoCo = outer SGD lr 0.7, Nesterov momentum 0.9.

Parts (``--parts``, all by default):

1. ``sync``: the sync alone at each model size of the ladder, every implementation in the same 2-process job,
   interleaved rounds (``harness.timing``; the order reversed every other round), a barrier before every timed sync.
   Reported: seconds per sync (median over rounds), the ratio ours / each peer per round (median, bootstrap interval,
   min / max), counted cross-group bytes and collective calls per sync, outer-state bytes per rank.
2. ``train``: one training run per peer and mode (its own 2-process job), ``--train-rounds`` interleaved rounds:
   tokens/s of the training loop, peak RSS per rank, bytes, final loss; and **correctness**: the max absolute
   difference of the final parameters (and of the final loss) between implementations of the same math.
3. ``link``: the sync at ``--link-size`` inside a network namespace whose loopback is shaped with ``tc tbf`` to
   G × rate (as ``multi_cluster.py``), rounds interleaved; the limit = wire bytes of the ring all-reduce / rate
   (``costmodel.wire_bytes``). The namespace has no ``netem``: latency is not emulated here, so the limit holds the
   bandwidth term only. Where namespaces / tc cannot run, the part is reported as not measured.
4. ``features``: each feature tried by code on each peer (small runs with a time bound): DiLoCo outer step, exact
   resume mid-interval, synchronous warm-up, compressed sync on CPU, streaming (fragments), token-weighted mean
   (uneven workers), dead-peer handling. A try that would cost too much is reported as "not tried".

    python benchmarks/peers/peers.py            # small default: 2 CPU processes, ~10 minutes on 2 loaded cores
    python benchmarks/peers/peers.py --full     # longer runs, sizes up to 85M, 1 Gbit/s and 100 Mbit/s links
    python benchmarks/peers/peers.py --parts sync train
    python benchmarks/peers/peers.py --quick    # smoke run: 0.1M and 0.8M, one round, 16 steps, no link (~3 min)
    python benchmarks/peers/peers.py --profile 10M  # cProfile of one sync of ours (engine) at 10M, beside torch's

Writes benchmarks/peers/results/peers_sync.csv, peers_train.csv, peers_link.csv, peers_features.csv, peers_rounds.csv,
peers.png and peers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
import harness as h  # noqa: E402
from adapters import FEATURES, LABELS, PEERS, SYNC_IMPLS, TRAIN_RUNS  # noqa: E402
from adapters.common import SEED, SIZES, WORLD, make_batches  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HERE = Path(__file__).resolve()

PRESETS = {
    "default": dict(sizes=["0.1M", "0.8M", "10M"], sync_rounds=5, train_size="0.1M", steps=64, sync_every=8,
                    batch_size=8, block_size=64, train_rounds=3, link_size="10M", link_rates=[100e6], link_rounds=2),
    "full": dict(sizes=["0.1M", "0.8M", "2.8M", "10M", "38M", "85M"], sync_rounds=9, train_size="0.8M", steps=512,
                 sync_every=32, batch_size=16, block_size=128, train_rounds=3, link_size="10M",
                 link_rates=[100e6, 1e9], link_rounds=3),
    # a smoke run of every part but the link (~3 min on 2 loaded cores): two sizes, one round, 16 steps
    "quick": dict(sizes=["0.1M", "0.8M"], sync_rounds=2, train_size="0.1M", steps=16, sync_every=8, batch_size=8,
                  block_size=64, train_rounds=1, link_size="0.8M", link_rates=[100e6], link_rounds=1),
}


# ====================================================================================================== launching
def launch_job(job: dict, prefix: list[str] | None = None, timeout: float = 600) -> list[dict]:
    """Run ``job`` on WORLD ranks (through ``--launch`` in one process, optionally inside ``prefix``, e.g. a network
    namespace); the ranks' results, by rank."""
    with tempfile.TemporaryDirectory(prefix="lsgd_peers_") as tmp:
        path = Path(tmp) / "job.json"
        path.write_text(json.dumps({**job, "tmp": tmp}))
        cmd = list(prefix or []) + [sys.executable, str(HERE), "--launch", str(path)]
        try:
            proc = subprocess.run(cmd, env=h.worker_env(), cwd=str(h.ROOT), stdout=subprocess.PIPE, check=False,
                                  stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"job {job['kind']}/{job.get('peer')} timed out after {timeout} s") from err
        outs = [Path(tmp) / f"rank{r}.json" for r in range(WORLD)]
        if proc.returncode or not outs[0].exists():
            tail = proc.stdout.decode(errors="replace")[-4000:]
            raise RuntimeError(f"job {job['kind']}/{job.get('peer')} failed (exit {proc.returncode}):\n{tail}")
        return [json.loads(p.read_text()) if p.exists() else {} for p in outs]


def launcher(job_path: str) -> None:
    """Start the lighthouse (torchft jobs) and the ranks; wait for them within the job's time bound."""
    job = json.loads(Path(job_path).read_text())
    job["master_port"] = h.free_port()
    server = None
    if job.get("torchft"):
        from torchft._torchft import LighthouseServer

        server = LighthouseServer(bind="[::]:0", min_replicas=job.get("min_replicas", WORLD),
                                  join_timeout_ms=job.get("join_timeout_ms", 10000),
                                  quorum_tick_ms=job.get("quorum_tick_ms", 10),
                                  heartbeat_timeout_ms=job.get("heartbeat_timeout_ms", 1000))
        job["lighthouse"] = f"http://127.0.0.1:{server.address().rsplit(':', 1)[-1]}"
    Path(job_path).write_text(json.dumps(job))
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "NODE_RANK": "0",
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(job["master_port"])}
        procs.append(subprocess.Popen([sys.executable, str(HERE), "--rank-worker", job_path], env=env))
    deadline = time.time() + job.get("timeout", 500)
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    if server is not None:
        server.shutdown()
    sys.exit(codes[0])


# ====================================================================================================== driver
def build_batches(cfg: dict, path: Path) -> None:
    """Every rank's batches, once (the same for every peer and job)."""
    import torch

    job = dict(block_size=cfg["block_size"], batch_size=cfg["batch_size"], seed=SEED)
    torch.save({r: make_batches(job, r, max(cfg["steps"], 16)) for r in range(WORLD)}, path)


def common_job(cfg: dict, tmp: str) -> dict:
    return dict(seed=SEED, block_size=cfg["block_size"], batch_size=cfg["batch_size"], steps=cfg["steps"],
                sync_every=cfg["sync_every"], size=cfg["train_size"], batches=str(Path(tmp, "batches.pt")),
                quorum_tick_ms=cfg["quorum_tick_ms"], timeout=cfg["job_timeout"])


def by_impl(runs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in sorted(runs, key=lambda r: r["round"]):
        out.setdefault(r["impl"], []).append(r)
    return out


def sync_rows(result: dict, modes: list[str], part: str, rate: float | None = None) -> list[dict]:
    """Per size and implementation: median seconds per sync, ratio ours / it, bytes, calls, state, limit."""
    from lightning_localsgd import costmodel

    rows = []
    for size, r in result["sizes"].items():
        runs = by_impl(r["runs"])
        for mode in modes:
            names = SYNC_IMPLS[mode]
            ours = names[0] if mode != "compressed" else None
            for name in names:
                secs = [x["seconds"] for x in runs[name]]
                row = dict(part=part, size=size, params=r["params"], mode=mode, impl=name, label=LABELS[name],
                           rounds=len(secs), seconds_median=statistics.median(secs), seconds_min=min(secs),
                           seconds_max=max(secs), bytes_per_sync=runs[name][0]["bytes"],
                           calls_per_sync=runs[name][0]["calls"],
                           quorum_seconds_median=statistics.median(x["quorum_seconds"] for x in runs[name]),
                           sync_peak_rss_mb_median=statistics.median(x["peak_rss_over_start_mb"] for x in runs[name]),
                           outer_state_bytes=r["state"][name], outer_state_where=r["where"][name])
                base = ours
                if base is not None and name != base:
                    est = h.ratio_of([x["seconds"] for x in runs[base]], secs)
                    row.update(ratio_label=f"{LABELS[base]} / this", **est.row("ours_over_this"))
                if rate is not None:
                    G = WORLD
                    if name in r.get("engine_bytes_per_sync", {}) and mode == "compressed":
                        wire = 2 * (G - 1) / G * r["engine_bytes_per_sync"][name]
                    else:
                        wire = costmodel.wire_bytes("all_reduce", r["model_bytes"], G)
                    row.update(rate_mbit_s=rate / 1e6, wire_bytes=wire, limit_seconds=wire * 8 / rate)
                    row["over_limit"] = row["seconds_median"] / row["limit_seconds"]
                    row["over_limit_min"] = row["seconds_min"] / row["limit_seconds"]
                    row["over_limit_max"] = row["seconds_max"] / row["limit_seconds"]
                rows.append(row)
    return rows


def train_rows(measured: h.Interleaved, params_dir: str) -> tuple[list[dict], list[dict]]:
    """Tokens/s (ratios ours (Lightning) / each peer per round), memory, bytes; correctness vs ours (Lightning)."""
    import torch

    rows, checks = [], []
    for name in measured.rounds[0]:
        peer, mode = name.split(":")
        res = measured.results(name)
        r0 = [x[0] for x in res]
        tps = [x["tokens_per_s"] for x in r0]
        row = dict(part="train", impl=peer, mode=mode, label=LABELS[peer], rounds=len(res),
                   tokens_per_s_median=statistics.median(tps), tokens_per_s_min=min(tps), tokens_per_s_max=max(tps),
                   train_seconds_median=statistics.median(x["train_seconds"] for x in r0),
                   final_loss_rank0=r0[0]["losses"][-1], syncs=r0[0]["syncs"],
                   bytes_per_sync=r0[0]["bytes"] // max(1, r0[0]["syncs"]), calls=r0[0]["calls"],
                   outer_state_bytes=r0[0]["state_bytes"],
                   peak_rss_over_start_mb_max=max(x["peak_rss_over_start_mb"] for rnd in res for x in rnd),
                   quorum_seconds=r0[0].get("quorum_seconds", 0.0))
        ours = f"ours_lightning:{mode}"
        if name != ours:
            est = h.ratio_of([x[0]["tokens_per_s"] for x in measured.results(ours)], tps)
            row.update(ratio_label="ours (Lightning) / this", **est.row("ours_over_this"))
        rows.append(row)
    for mode in ("average", "diloco"):
        names = [n for n in measured.rounds[0] if n.endswith(":" + mode)]
        ref = f"ours_lightning:{mode}"
        a = torch.load(Path(params_dir, f"{ref}.r0.pt"))
        la = measured.results(ref)[0][0]["losses"]
        for n in names:
            for rnd in range(len(measured.rounds)):
                if n == ref and rnd == 0:
                    continue
                b = torch.load(Path(params_dir, f"{n}.r{rnd}.pt"))
                lb = measured.results(n)[rnd][0]["losses"]
                checks.append(dict(part="correctness", mode=mode, impl=n.split(":")[0], label=LABELS[n.split(":")[0]],
                                   round=rnd + 1, vs=LABELS["ours_lightning"],
                                   max_abs_param_diff=float((a - b).abs().max()),
                                   max_abs_loss_diff=max(abs(x - y) for x, y in zip(la, lb)),
                                   params=a.numel()))
    return rows, checks


def run_train(cfg: dict, tmp: str) -> tuple[list[dict], list[dict], list[dict]]:
    """Every training run in one 2-process job (imports once), rounds interleaved inside it."""
    job = {**common_job(cfg, tmp), "kind": "train", "torchft": True, "runs": TRAIN_RUNS, "rounds": cfg["train_rounds"],
           "tag": "train", "params_dir": tmp, "timeout": cfg["job_timeout"] * 3}
    t0, load = time.time(), os.getloadavg()[0]
    ranks = launch_job(job, timeout=job["timeout"] + 60)
    print(f"train: {time.time() - t0:.0f} s (load {load:.2f})", flush=True)
    measured = h.Interleaved()
    for run0, run1 in zip(ranks[0]["runs"], ranks[1]["runs"]):
        while len(measured.rounds) <= run0["round"]:
            measured.rounds.append({})
        measured.rounds[run0["round"]][run0["name"]] = h.timing.Run(
            run0["name"], run0["round"], [run0["result"], run1["result"]], run0["started"], run0["seconds"],
            run0["load"])
    rows, checks = train_rows(measured, tmp)
    rounds = [dict(part="train", round=run.round + 1, config=run.name, order=i + 1,
                   tokens_per_s=run.result[0]["tokens_per_s"], train_seconds=run.result[0]["train_seconds"],
                   load_before=run.load_before, run_seconds=run.seconds) for i, run in enumerate(measured.runs)]
    return rows, checks, rounds + [dict(part="train", load=measured.load_text())]


def run_sync(cfg: dict, tmp: str, sizes: list[str], modes: list[str], rounds: int,
             prefix: list[str] | None = None, part: str = "sync", rate: float | None = None) -> list[dict]:
    job = {**common_job(cfg, tmp), "kind": "sync", "torchft": True, "sizes": sizes, "modes": modes,
           "rounds": rounds, "tag": part}
    t0, load = time.time(), os.getloadavg()[0]
    res = launch_job(job, prefix=prefix, timeout=cfg["job_timeout"] * 3)
    print(f"{part}: {time.time() - t0:.0f} s (load {load:.2f})", flush=True)
    return sync_rows(res[0], modes, part, rate)


def run_features(cfg: dict, tmp: str) -> list[dict]:
    rows = []
    for adapter in PEERS:
        peer = adapter.family
        job = {**common_job(cfg, tmp), "kind": "features", "peer": peer, "torchft": adapter.needs_lighthouse,
               "min_replicas": 1, "steps": 8, "resume_at": 6, "sync_every": 4, "size": "0.1M", "mode": "diloco",
               "dead_timeout": 5.0, "dead_limit": 30.0, "tag": f"feat_{peer}", "timeout": cfg["job_timeout"] * 2}
        t0 = time.time()
        try:
            out = launch_job(job, timeout=job["timeout"] + 60)[0]
        except RuntimeError as err:
            # the dead-peer try ends the job; rank 0 wrote every row it had before
            out = []
            print(f"features {peer}: {str(err).splitlines()[0]}")
        if isinstance(out, list):
            rows += out
        print(f"features {peer}: {time.time() - t0:.0f} s", flush=True)
    return rows


def feature_matrix(rows: list[dict]) -> list[dict]:
    """One row per feature, one column per peer family: result (impl): detail."""
    cols = {peer.family: peer.column for peer in PEERS}
    out = []
    for feature in FEATURES:
        row = {"feature": feature}
        for peer, col in cols.items():
            cells = [f"**{r['result']}** ({r['impl']}): {r['detail']}" for r in rows
                     if r["peer"] == peer and r["feature"] == feature]
            row[col] = "<br>".join(cells) if cells else "not tried (the try did not report)"
        out.append(row)
    return out


def verdict(est_high: float, est_median: float, target: float = 1.0) -> str:
    if est_high <= target:
        return "shown"
    return "median only" if est_median <= target else "no"


def summarize(sync: list[dict], train: list[dict], link: list[dict]) -> list[dict]:
    """The targets: ours vs the fastest peer at each size (sync), in the loop (tokens/s), and vs the link limit."""
    out = []
    for mode in ("average", "diloco"):
        for size in dict.fromkeys(r["size"] for r in sync):
            rows = [r for r in sync if r["size"] == size and r["mode"] == mode]
            peers = [r for r in rows if "ours_over_this_median" in r]
            if not peers:
                continue
            fastest = min(peers, key=lambda r: r["seconds_median"])
            out.append(dict(target=f"sync time ours ≤ 1.0× the fastest peer ({mode}, {size})",
                            fastest_peer=fastest["label"], ratio=fastest["ours_over_this_median"],
                            low=fastest["ours_over_this_low"], high=fastest["ours_over_this_high"],
                            holds=verdict(fastest["ours_over_this_high"], fastest["ours_over_this_median"])))
        peers = [r for r in train if r["mode"] == mode and "ours_over_this_median" in r
                 and not r["impl"].startswith("ours")]
        if peers:
            fastest = max(peers, key=lambda r: r["tokens_per_s_median"])
            # tokens/s: ours / peer ≥ 1 is the target; "shown" when the interval's lower end is ≥ 1
            lo, med = fastest["ours_over_this_low"], fastest["ours_over_this_median"]
            out.append(dict(target=f"end-to-end tokens/s ours (Lightning) ≥ 1.0× the fastest peer's loop ({mode})",
                            fastest_peer=fastest["label"], ratio=med, low=lo, high=fastest["ours_over_this_high"],
                            holds="shown" if lo >= 1 else ("median only" if med >= 1 else "no")))
    for r in link:
        if r["impl"] == "ours_engine":
            # shown: every round within 1.2× (the limit is a constant: the rounds' min / max is the interval)
            lo, med, hi = r["over_limit_min"], r["over_limit"], r["over_limit_max"]
            out.append(dict(target=f"ours within 1.2× of the link limit ({r['size']}, {r['rate_mbit_s']:g} Mbit/s; "
                                   f"min, max over {r['rounds']} rounds)",
                            fastest_peer="", ratio=med, low=lo, high=hi,
                            holds="shown" if hi <= 1.2 else ("median only" if med <= 1.2 else "no")))
    return out


def write_outputs(cfg: dict, args: argparse.Namespace, parts: dict) -> None:
    name = args.out_name
    sync, train, checks = parts.get("sync", []), parts.get("train", []), parts.get("correctness", [])
    link, feats = parts.get("link", []), parts.get("features", [])
    targets = summarize(sync, train, link)
    for key, rows in (("sync", sync), ("train", train + checks), ("link", link or parts.get("link_note", [])),
                      ("features", feats), ("rounds", parts.get("rounds", [])), ("targets", targets)):
        if rows:
            h.write_csv(RESULTS / f"{name}_{key}.csv", rows)
    text = summary_text(cfg, args, parts, targets)
    h.write_summary(RESULTS / f"{name}.md", text, args.started,
                    " ".join(["python benchmarks/peers/peers.py", *args.argv]))
    plot(cfg, args, sync, train, link)


def fmt_ratio(r: dict, key: str = "ours_over_this") -> str:
    if f"{key}_median" not in r:
        return ""
    return (f"{r[f'{key}_median']:.3f} [{r[f'{key}_low']:.3f}, {r[f'{key}_high']:.3f}] "
            f"(min {r[f'{key}_min']:.3f}, max {r[f'{key}_max']:.3f})")


def summary_text(cfg: dict, args: argparse.Namespace, parts: dict, targets: list[dict]) -> str:
    sync, train, checks = parts.get("sync", []), parts.get("train", []), parts.get("correctness", [])
    link, feats = parts.get("link", []), parts.get("features", [])
    out = [(f"2 processes × 1 thread, gloo on 127.0.0.1; GPT, seed {SEED}, block {cfg['block_size']}, batch "
           f"{cfg['batch_size']} per rank; torchft lighthouse quorum_tick_ms {cfg['quorum_tick_ms']}. Ratios: median "
           "over interleaved rounds of the per-round ratio, [95% bootstrap interval] (min, max).\n")]
    if targets:
        out += ["## Targets\n", h.md_table([{**t, "ratio_text": (f"{t['ratio']:.3f}" + (
            f" [{t['low']:.3f}, {t['high']:.3f}]" if t["low"] != "" else ""))} for t in targets],
            [("target", "target"), ("fastest_peer", "fastest peer"), ("ratio_text", "ratio"), ("holds", "holds")]),
            ""]
    if sync:
        out += [f"## 1. Sync time per sync ({parts.get('sync_load', '')})\n",
                h.md_table([{**r, "ms": 1e3 * r["seconds_median"], "q": 1e3 * r["quorum_seconds_median"],
                             "ratio": fmt_ratio(r)} for r in sync],
                           [("size", "size"), ("params", "params"), ("mode", "mode"), ("label", "implementation"),
                            ("ms", "ms / sync (median)"), ("ratio", "ours / this"), ("bytes_per_sync", "bytes / sync"),
                            ("calls_per_sync", "collective calls"), ("q", "of which quorum ms"),
                            ("outer_state_bytes", "outer-state bytes / rank"), ("outer_state_where", "where"),
                            ("sync_peak_rss_mb_median", "peak RSS during the sync above its start, MiB")]), ""]
    if train:
        out += [(f"## 2. End-to-end training ({cfg['steps']} steps, H = {cfg['sync_every']}, size "
                f"{cfg['train_size']}; {parts.get('train_load', '')})\n"),
                h.md_table([{**r, "ratio": fmt_ratio(r)} for r in train],
                           [("mode", "mode"), ("label", "implementation"), ("tokens_per_s_median", "tokens/s"),
                            ("ratio", "ours (Lightning) / this"), ("final_loss_rank0", "last loss (rank 0)"),
                            ("bytes_per_sync", "counted bytes / sync"), ("calls", "collective calls"),
                            ("outer_state_bytes", "outer-state bytes / rank"),
                            ("peak_rss_over_start_mb_max", "peak RSS above the run's start, MiB (max rank, round)")]),
                "",
                "### Correctness: final parameters vs ours (Lightning), same mode\n",
                h.md_table(checks, [("mode", "mode"), ("label", "implementation"), ("round", "round"),
                                    ("max_abs_param_diff", "max |Δθ|"), ("max_abs_loss_diff", ("max |Δ loss| (rank 0, "
                                                                                              "every step)"))]), ""]
    if link:
        out += [f"## 3. Over the emulated link ({parts.get('link_load', '')})\n",
                h.md_table([{**r, "ms": 1e3 * r["seconds_median"], "lim": 1e3 * r["limit_seconds"],
                             "ol": f"{r['over_limit']:.3f} ({r['over_limit_min']:.3f}-{r['over_limit_max']:.3f})",
                             "wire_bytes": int(r["wire_bytes"]), "ratio": fmt_ratio(r)} for r in link],
                           [("rate_mbit_s", "Mbit/s"), ("size", "size"), ("mode", "mode"), ("label", "implementation"),
                            ("ms", "ms / sync"), ("wire_bytes", "wire bytes / rank"), ("lim", "limit ms"),
                            ("ol", "sync / limit (min-max)"), ("ratio", "ours / this")]), ""]
    elif parts.get("link_note"):
        out += ["## 3. Over the emulated link\n", parts["link_note"][0]["note"], ""]
    if feats:
        out += ["## 4. Features, tried\n", h.md_table(feature_matrix(feats), [
            ("feature", "feature"), ("ours", "ours"), ("torch averager", "torch averager"),
            ("accelerate", "accelerate"), ("torchft", "torchft")]), ""]
    return "\n".join(out)


def plot(cfg: dict, args: argparse.Namespace, sync: list[dict], train: list[dict], link: list[dict]) -> None:
    plt = h.pyplot()
    if plt is None or not sync:
        return
    fig, axes = plt.subplots(1, 3 if train else 1, figsize=(14 if train else 6, 4))
    axes = list(axes) if train else [axes]
    a = axes[0]
    for name in [n for m in ("average", "diloco") for n in SYNC_IMPLS[m]]:
        rows = [r for r in sync if r["impl"] == name]
        if rows:
            a.plot([r["params"] for r in rows], [1e3 * r["seconds_median"] for r in rows], "o-",
                   label=f"{LABELS[name]}{' (DiLoCo)' if 'diloco' in name else ''}")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("parameters")
    a.set_ylabel("ms per sync (median)")
    a.legend(fontsize=7)
    a.set_title("sync time, 2 ranks, gloo", fontsize=9)
    if train:
        b, c = axes[1], axes[2]
        labels = [f"{r['label']}\n{r['mode']}" for r in train]
        b.barh(labels, [r["tokens_per_s_median"] for r in train])
        b.set_xlabel("tokens/s (median over rounds)")
        b.tick_params(axis="y", labelsize=6)
        c.barh(labels, [r["peak_rss_over_start_mb_max"] for r in train])
        c.set_xlabel("peak RSS above the run's start, per rank (MiB)")
        c.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.out_name}.png", dpi=100)


def driver() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: 0.1M and 0.8M, one round, 16 steps, no link part; "
                   "writes peers_quick_* unless --out-name is given")
    p.add_argument("--parts", nargs="+", default=["sync", "train", "link", "features"],
                   choices=["sync", "train", "link", "features"])
    p.add_argument("--sizes", nargs="+", choices=list(SIZES))
    p.add_argument("--sync-rounds", type=int)
    p.add_argument("--train-rounds", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--emulation", default="auto", choices=["auto", "netns", "off"],
                   help="the link part: netns + tc where possible (auto), required (netns), or not measured (off)")
    p.add_argument("--quorum-tick-ms", type=int, default=10, help="torchft lighthouse quorum tick (default 10)")
    p.add_argument("--job-timeout", type=float, default=240, help="seconds one job may take (default 240)")
    p.add_argument("--out-name")
    p.add_argument("--profile", choices=list(SIZES), help="instead: cProfile one sync of ours (engine, averaging) at "
                   "this size on rank 0, and time it beside the torch averager's (3 syncs each); prints only")
    args = p.parse_args()
    if args.profile:
        cfg = PRESETS["default"]
        res = launch_job(dict(kind="profile", size=args.profile, seed=SEED, block_size=cfg["block_size"],
                              steps=cfg["steps"], timeout=args.job_timeout), timeout=args.job_timeout + 60)[0]
        for name, ts in res["times"].items():
            print(f"{LABELS[name]}: " + ", ".join(f"{1e3 * t:.1f}" for t in ts) + " ms per sync")
        print(res["profile"])
        return
    args.started, args.argv = time.time(), sys.argv[1:]
    if args.quick:
        args.emulation = "off"
        args.out_name = args.out_name or "peers_quick"
    args.out_name = args.out_name or "peers"
    preset = "full" if args.full else "quick" if args.quick else "default"
    cfg = dict(PRESETS[preset], quorum_tick_ms=args.quorum_tick_ms, job_timeout=args.job_timeout)
    for key in ("sizes", "sync_rounds", "train_rounds", "steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if cfg["steps"] % cfg["sync_every"]:
        p.error("--steps must be a multiple of H so that no peer syncs at train end")
    parts: dict = {}
    with tempfile.TemporaryDirectory(prefix="lsgd_peers_drv_") as tmp:
        build_batches(cfg, Path(tmp, "batches.pt"))
        if "sync" in args.parts:
            load0 = os.getloadavg()[0]
            parts["sync"] = run_sync(cfg, tmp, cfg["sizes"], ["average", "diloco"], cfg["sync_rounds"])
            parts["sync_load"] = f"load {load0:.1f} → {os.getloadavg()[0]:.1f}"
        if "train" in args.parts:
            parts["train"], parts["correctness"], rounds = run_train(cfg, tmp)
            parts["train_load"] = rounds.pop()["load"]
            parts["rounds"] = rounds
        if "link" in args.parts:
            ok, why = h.netns_available() if args.emulation != "off" else (False, "--emulation off")
            if args.emulation == "netns" and not ok:
                p.error(f"network namespaces / tc are not usable here ({why})")
            if ok:
                link, loads = [], []
                for rate in cfg["link_rates"]:
                    loads.append(os.getloadavg()[0])
                    link += run_sync(cfg, tmp, [cfg["link_size"]], ["average", "diloco", "compressed"],
                                     cfg["link_rounds"], prefix=h.netns_prefix(WORLD * rate), part="link", rate=rate)
                parts["link"] = link
                parts["link_load"] = (f"unshare -n + tc tbf on lo at {WORLD} × rate; latency not emulated (no netem); "
                                      f"load {min(loads):.1f}-{max(loads):.1f}")
            else:
                note = (f"NOT MEASURED: network namespaces / tc are not usable here ({why}); no link-limit figure "
                        "is computed.")
                print(note)
                parts["link_note"] = [dict(part="link", note=note)]
        if "features" in args.parts:
            parts["features"] = run_features(cfg, tmp)
    write_outputs(cfg, args, parts)
    print((RESULTS / f"{args.out_name}.md").read_text())


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--launch":
        return launcher(sys.argv[2])
    if len(sys.argv) == 3 and sys.argv[1] == "--rank-worker":
        from jobs import rank_worker

        return rank_worker(sys.argv[2])
    driver()


if __name__ == "__main__":
    main()
