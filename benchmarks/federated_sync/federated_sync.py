"""Compressed syncs across federated jobs: bytes per sync against the codec's payload, and sync time against the link.

Two jobs (one process each, no Lightning: an ``OuterSync`` over the library's ``TorchftCommunicator``, as the strategy
builds it in federated mode) meet through an in-process torchft lighthouse inside a network namespace whose loopback
is shaped to 2 × the link rate (``tc tbf``, as the other link benchmarks). Each syncs 10M fp32 parameters (a
perturbed copy each time) with every codec: fp32 (the all-reduce), bf16, int8, int4 (the two-phase compressed
all-reduce with error feedback), weighted as federated syncs are. Reported per codec, median over the syncs:

* bytes per sync counted by the engine (``SyncResult.bytes_sent``) against the codec's payload computed from its
  format (``G · payload_bytes(codec, ⌈n/G⌉)`` + 4 bytes of weight per chunk; fp32: ``4n`` + the weight);
* sync seconds (quorum excluded: the quorum is formed before the clock starts) against the link's limit, the bytes a
  rank must send on the wire (``2(G−1)/G`` of its payload, as a ring all-reduce) over the rate;
* where the rest goes: the CPU time of the sync on the job's main thread (encoding, decoding, the outer step; what
  the bucket pipeline of the compressed reduce overlaps with the transfer, but what a loaded CPU slows down), and the
  codec's encode + decode time of the same data on this CPU, measured alone. The load average before and after the
  run is written beside the numbers: the two jobs share the machine's cores with whatever else runs.

    python benchmarks/federated_sync/federated_sync.py  # 10M parameters, 100 Mbit/s, 4 syncs per codec (~1 min)

Writes benchmarks/federated_sync/results/federated_sync.csv, federated_sync.md and federated_sync.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]  # the shared harness is here
sys.path.insert(0, str(BENCHMARKS))

RESULTS = Path(__file__).resolve().parent / "results"

CODECS = ["none", "bf16", "int8", "int4"]


def job(cfg: dict) -> None:
    """One federated job: a Manager on its own store, the communicator, one engine per codec, ``syncs`` syncs each."""
    import torch
    from torch.distributed import TCPStore
    from torchft import Manager, ProcessGroupGloo

    from lightning_localsgd.engine import OuterSync
    from lightning_localsgd.federation import TorchftCommunicator, lighthouse_url

    torch.set_num_threads(1)
    timeout = __import__("datetime").timedelta(seconds=120)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    manager = Manager(pg=ProcessGroupGloo(timeout=timeout), load_state_dict=lambda s: None, state_dict=lambda: {},
                      min_replica_size=2, use_async_quorum=False, timeout=timeout, quorum_timeout=timeout,
                      rank=0, world_size=1, store_addr="127.0.0.1", store_port=store.port,
                      lighthouse_addr=lighthouse_url(cfg["lighthouse"]), replica_id=f"job{cfg['job']}",
                      init_sync=False)
    comm = TorchftCommunicator(manager, timeout)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(cfg["numel"], generator=g)
    out = []
    for codec in CODECS:
        param = torch.nn.Parameter(base.clone())
        engine = OuterSync([param], cross_group=comm, compression=None if codec == "none" else codec)
        for k in range(cfg["syncs"]):
            param.data.copy_(engine.snapshot[0].detach())
            param.data.add_(torch.randn(cfg["numel"], generator=torch.Generator().manual_seed(k + 97 * cfg["job"])),
                            alpha=1e-3)
            manager.start_quorum(timeout=timeout)
            t0, cpu0 = time.perf_counter(), time.thread_time()
            result = engine.sync(weight=1.0)
            out.append(dict(codec=codec, sync=k, seconds=time.perf_counter() - t0, bytes_sent=result.bytes_sent,
                            participants=comm.size, cpu_seconds=time.thread_time() - cpu0))
    Path(cfg["out"]).write_text(json.dumps(out))
    manager.shutdown(wait=False)


def codec_cpu_seconds(codec: str, numel: int, groups: int) -> float:
    """Encode + decode of one rank's share of a sync on this CPU (phase 1: G chunks; phase 2: one mean chunk)."""
    import torch

    from lightning_localsgd.engine.codecs import decode, encode

    if codec == "none":
        return 0.0
    torch.set_num_threads(1)
    x = torch.randn(numel)
    chunk = math.ceil(numel / groups)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        qs = [encode(x[j * chunk : (j + 1) * chunk], codec) for j in range(groups)]
        for q in qs:
            decode(q, codec, chunk)  # own error feedback (phase 1) and the received chunks
        m = encode(x[:chunk], codec)  # phase 2: the mean chunk
        for _ in range(groups):
            decode(m, codec, chunk)  # its error feedback and the gathered means
        best = min(best, time.perf_counter() - t0)
    return best


def expected_bytes(codec: str, numel: int, groups: int) -> int:
    from lightning_localsgd.engine.codecs import payload_bytes

    if codec == "none":
        return 4 * numel + 4  # the fp32 values and the weight
    chunk = math.ceil(numel / groups)
    return groups * (payload_bytes(codec, chunk) + 4)  # every chunk carries the sender's weight


def plot(rows: list[dict], args: argparse.Namespace) -> None:
    """Sync time over the link's limit per codec, against the 1.2× target."""
    import harness as h

    plt = h.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    names = ["fp32" if r["codec"] == "none" else r["codec"] for r in rows]
    ax.bar(names, [r["over_limit"] for r in rows], color="tab:blue", label="sync time / link limit")
    ax.axhline(1.2, color="tab:red", linestyle="--", label="target 1.2×")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_ylabel("sync time / link limit")
    ax.set_ylim(0, 1.5)
    ax.set_title(f"{args.numel / 1e6:g}M parameters, 2 federated jobs, {args.rate_mbit:g} Mbit/s", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / "federated_sync.png", dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--numel", type=int, default=10_000_000)
    p.add_argument("--rate-mbit", type=float, default=100.0)
    p.add_argument("--syncs", type=int, default=4)
    args = p.parse_args()
    if args.job:
        return job(json.loads(Path(args.job).read_text()))
    import harness as h

    if not args.in_netns:
        ok, why = h.netns_available()
        if not ok:
            print(f"network namespaces / tc are not usable here ({why}): nothing was run")
            sys.exit(2)
        cmd = h.netns_prefix(2 * args.rate_mbit * 1e6) + [sys.executable, __file__, *sys.argv[1:], "--in-netns"]
        sys.exit(subprocess.run(cmd, timeout=3600, check=False).returncode)
    from harness.federated import job_env
    from torchft.coordination import LighthouseServer

    started, load_before = time.time(), h.loadavg()
    server = LighthouseServer(bind="[::]:0", min_replicas=2, join_timeout_ms=60000, quorum_tick_ms=50,
                              heartbeat_timeout_ms=5000)
    address = "127.0.0.1:" + server.address().rsplit(":", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="lsgd_fedsync_") as tmp:
        procs, outs = [], []
        for j in range(2):
            cfg = dict(job=j, lighthouse=address, numel=args.numel, syncs=args.syncs, out=f"{tmp}/job{j}.json")
            Path(f"{tmp}/job{j}.cfg").write_text(json.dumps(cfg))
            outs.append(cfg["out"])
            procs.append(subprocess.Popen([sys.executable, __file__, "--job", f"{tmp}/job{j}.cfg"], env=job_env()))
        codes = [proc.wait(timeout=1800) for proc in procs]
        server.shutdown()
        if any(codes):
            raise RuntimeError(f"the jobs failed: {codes}")
        records = [r for o in outs for r in json.loads(Path(o).read_text())]
    rate = args.rate_mbit * 1e6
    rows = []
    for codec in CODECS:
        mine = [r for r in records if r["codec"] == codec and r["sync"] > 0]  # the first sync warms up
        groups = mine[0]["participants"]
        sent = statistics.median(r["bytes_sent"] for r in mine)
        expected = expected_bytes(codec, args.numel, groups)
        seconds = statistics.median(r["seconds"] for r in mine)
        sync_cpu = statistics.median(r["cpu_seconds"] for r in mine)
        limit = 2 * (groups - 1) / groups * expected * 8 / rate
        cpu = codec_cpu_seconds(codec, args.numel, groups)
        rows.append(dict(codec=codec, parameters=args.numel, jobs=groups, bytes_per_sync=sent,
                         codec_payload_bytes=expected, bytes_exact=sent == expected, sync_seconds=seconds,
                         link_limit_seconds=limit, over_limit=seconds / limit, sync_cpu_seconds=sync_cpu,
                         codec_cpu_seconds=cpu, limit_plus_codec_seconds=limit + cpu))
    h.write_csv(RESULTS / "federated_sync.csv", rows)
    text = (f"{args.numel:,} fp32 parameters, 2 federated jobs (one process each, torchft lighthouse in-process), "
            f"links of {args.rate_mbit:g} Mbit/s per job (tc tbf on a network namespace's loopback at 2 × that; no "
            f"latency), weighted syncs as in federated mode, median of {args.syncs - 1} syncs per codec after one "
            f"warm-up sync; the quorum is formed before the clock starts. Load average (1, 5, 15 min) before the "
            f"run {load_before}, after it {h.loadavg()}.\n\n"
            + h.md_table(rows, [("codec", "codec"), ("bytes_per_sync", "bytes / sync (engine)"),
                                ("codec_payload_bytes", "codec payload"), ("bytes_exact", "exact"),
                                ("sync_seconds", "sync s"), ("link_limit_seconds", "link limit s"),
                                ("over_limit", "/ limit"), ("sync_cpu_seconds", "sync CPU s (main thread)"),
                                ("codec_cpu_seconds", "codec CPU s (alone)"),
                                ("limit_plus_codec_seconds", "limit + codec s")]) + "\n")
    print(text)
    plot(rows, args)
    h.write_summary(RESULTS / "federated_sync.md", text, started, "python benchmarks/federated_sync/federated_sync.py")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
