"""The codecs' CPU cost: encode and decode seconds per value of every registered codec, the table the planner prices a
sync's coding time with (``lightning_localsgd.costmodel.CODEC_CPU_TABLE``).

Each codec encodes and decodes the same representative pseudo-gradient (``--numel`` normal fp32 values of scale 1e-3)
on ``--threads`` torch threads, best of ``--repeats`` (``lightning_localsgd.planner.calibrate_codec_cpu``, the
function ``lightning-localsgd plan --calibrate-codecs`` runs). Reported per codec: ns per value encoded and decoded,
and what one sync of 1B parameters costs in coding over 2 and 8 groups (the values its exchange encodes and decodes,
``costmodel.codec_coded_values``).

    python benchmarks/codec_cost/codec_cost.py                 # every codec, 4M values, best of 5 (~1 min)
    python benchmarks/codec_cost/codec_cost.py --numel 262144 --repeats 1   # smoke run
    python benchmarks/codec_cost/codec_cost.py --device cuda --out-name codec_cost_cuda   # on a GPU

Writes benchmarks/codec_cost/results/codec_cost.csv, codec_cost.md (the table for its README) and codec_cost.png,
and prints the ``CODEC_CPU_TABLE`` entries to copy into ``lightning_localsgd/costmodel.py`` (a test checks that the
table and the CSV agree).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
import harness as h  # noqa: E402

from lightning_localsgd.costmodel import codec_cpu_seconds, codec_exchange  # noqa: E402
from lightning_localsgd.engine.codecs import codec_names, get_codec  # noqa: E402
from lightning_localsgd.planner import calibrate_codec_cpu  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ["codec", "exchange", "encode_ns_per_value", "decode_ns_per_value", "encode_s_per_value",
           "decode_s_per_value", "sync_s_1b_G2", "sync_s_1b_G8", "numel", "threads", "repeats"]


def measure(numel: int, repeats: int, threads: int, device: str) -> list[dict]:
    rows = []
    for name, cost in calibrate_codec_cpu(["fp32", *codec_names()], numel, repeats, threads, device).items():
        exchange = "two_phase" if name == "fp32" else codec_exchange(get_codec(name))
        rows.append(dict(codec=name, exchange=exchange, encode_ns_per_value=cost.encode_s_per_value * 1e9,
                         decode_ns_per_value=cost.decode_s_per_value * 1e9,
                         encode_s_per_value=cost.encode_s_per_value, decode_s_per_value=cost.decode_s_per_value,
                         sync_s_1b_G2=codec_cpu_seconds(cost, exchange, 1e9, 2),
                         sync_s_1b_G8=codec_cpu_seconds(cost, exchange, 1e9, 8),
                         numel=numel, threads=threads, repeats=repeats))
    return rows


def plot(rows: list[dict], out_name: str) -> None:
    plt = h.pyplot()
    if plt is None:
        return
    coded = [r for r in rows if r["codec"] != "fp32"]
    names = [r["codec"] for r in coded]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [r["encode_ns_per_value"] for r in coded], 0.4, label="encode")
    ax.bar([x + 0.2 for x in xs], [r["decode_ns_per_value"] for r in coded], 0.4, label="decode")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("ns per value (one thread)")
    ax.set_title("codec CPU cost per value")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out_name}.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=1 << 22, help="values coded per measurement (default 4M)")
    p.add_argument("--repeats", type=int, default=5, help="best of this many encodes / decodes (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as the planner's table)")
    p.add_argument("--device", default="cpu",
                   help="where the values live: cpu (default, the planner's table) or cuda (a GPU's coding time; "
                        "write it under another --out-name)")
    p.add_argument("--out-name", default="codec_cost", help="results file stem (default codec_cost)")
    args = p.parse_args()
    started = time.time()
    rows = measure(args.numel, args.repeats, args.threads, args.device)
    h.write_csv(RESULTS / f"{args.out_name}.csv", rows, COLUMNS)
    table = h.md_table(rows, [("codec", "codec"), ("exchange", "exchange"), ("encode_ns_per_value", "encode ns/value"),
                              ("decode_ns_per_value", "decode ns/value"), ("sync_s_1b_G2", "coding s/sync, 1B, G=2"),
                              ("sync_s_1b_G8", "coding s/sync, 1B, G=8")])
    text = (f"{args.numel:,} fp32 values (normal, scale 1e-3) on {args.device}, {args.threads} torch thread(s), "
            f"best of {args.repeats}. Coding seconds per sync: the values one group encodes and decodes in a sync of "
            f"1B parameters (costmodel.codec_coded_values of its exchange).\n\n{table}\n")
    command = "python benchmarks/codec_cost/codec_cost.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    h.write_summary(RESULTS / f"{args.out_name}.md", text, started, command)
    plot(rows, args.out_name)
    print(text)
    print("CODEC_CPU_TABLE entries (lightning_localsgd/costmodel.py):")
    for r in rows:
        print(f'    "{r["codec"]}": CodecCPU({r["encode_s_per_value"]:.6g}, {r["decode_s_per_value"]:.6g}),')


if __name__ == "__main__":
    main()
