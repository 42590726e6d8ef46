"""What the robust screen (``screen_factor``) costs a sync: ``OuterSync.sync()`` with and without it, side by side.

Two processes (gloo, one thread each) = two worker groups hold ``--numel`` fp32 parameters; each round runs
``--syncs`` syncs without the screen and ``--syncs`` with it (the order reversed every other round), every group's
parameters moved by a small step before each sync. Reported per configuration (fp32 all-reduce, int8): the median
sync time without and with the screen, the median over rounds of each round's ratio, and the screen's own time
(the pass over the parameters and the two small collectives, timed alone).

    python benchmarks/screen/screen.py --only cost         # ~1 minute on 2 CPU cores (or screen_cost.py)
    python benchmarks/screen/screen.py --only cost --numel 10000000 --rounds 5
    python benchmarks/screen/screen.py --only cost --quick # smoke run: 1M parameters, 2 rounds x 2 syncs

Writes benchmarks/screen/results/screen_cost.md (``--quick``: screen_cost_quick.md, which git ignores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_localsgd.engine import OuterSync
from lightning_localsgd.engine.outer import squared_norm
from lightning_localsgd.engine.screen import PseudoGradientScreen, count_sketch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
import harness as h  # noqa: E402

#: The sizes; ``--quick`` replaces the default, any flag given overrides either.
PRESETS = {"default": dict(numel=4_000_000, syncs=5, rounds=4), "quick": dict(numel=1_000_000, syncs=2, rounds=2)}


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for codec in (None, "int8"):
        params = [torch.randn(args.numel, generator=torch.Generator().manual_seed(0))]
        plain = OuterSync(params, compression=codec)
        screened = OuterSync(params, compression=codec, screen=PseudoGradientScreen(10.0))
        # the direction test's sketch is made and gathered with two groups too (it judges only with three or more)
        direction = OuterSync(params, compression=codec, screen=PseudoGradientScreen(10.0, min_cosine=0.0))
        g = torch.Generator().manual_seed(rank)
        times: dict[str, list[list[float]]] = {"plain": [], "screened": [], "direction": [], "screen_alone": [],
                                               "sketch_alone": []}
        for r in range(args.rounds):
            order = [("plain", plain), ("screened", screened), ("direction", direction)]
            for name, engine in order if r % 2 == 0 else order[::-1]:
                per = []
                for _ in range(args.syncs):
                    params[0].add_(torch.randn(args.numel, generator=g), alpha=1e-3)
                    dist.barrier()
                    t0 = time.perf_counter()
                    engine.sync()
                    per.append(time.perf_counter() - t0)
                    engine.reset_snapshot()  # both engines start each sync from the same θ_g
                times[name].append(per)
            alone = []
            for _ in range(args.syncs):  # the screen's own work, timed alone
                dist.barrier()
                t0 = time.perf_counter()
                sq = squared_norm(screened.snapshot[0].view(-1), params[0].view(-1))
                screened.screen.screen(screened.cross, None, sq, None, params[0].device)
                alone.append(time.perf_counter() - t0)
            times["screen_alone"].append(alone)
            sketching = []
            for _ in range(args.syncs):  # the direction test's count sketch, timed alone
                t0 = time.perf_counter()
                count_sketch([(direction.snapshot[0].view(-1) - params[0].view(-1), 0)])
                sketching.append(time.perf_counter() - t0)
            times["sketch_alone"].append(sketching)
        results[codec or "fp32"] = times
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This leg's flags (``screen.py`` declares ``--quick`` and ``--only``)."""
    p.add_argument("--numel", type=int, help=f"parameters per group (default {PRESETS['default']['numel']:,})")
    p.add_argument("--syncs", type=int,
                   help=f"syncs per configuration and round (default {PRESETS['default']['syncs']})")
    p.add_argument("--rounds", type=int, help=f"rounds, the order reversed every other one "
                   f"(default {PRESETS['default']['rounds']})")


def run(size: argparse.Namespace, suffix: str, command: str) -> Path:
    """Both configurations, every round; writes and returns ``results/screen_cost[_quick].md``."""
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.pt")
        mp.spawn(_worker, args=(2, h.free_port(), size, out), nprocs=2)
        results = torch.load(out)
    lines = [f"# Robust screen: cost per sync ({size.numel / 1e6:g}M fp32 parameters, 2 groups on gloo, 1 thread "
             f"each; {size.rounds} rounds x {size.syncs} syncs)", "",
             "| sync | without screen, median s | with screen, median s | ratio (median over rounds) "
             "| screen alone, median s | with screen + direction test (`screen_min_cosine=0`), median s | ratio "
             "| count sketch alone, median s |", "|---|---|---|---|---|---|---|---|"]
    for codec, times in results.items():
        plain = statistics.median(t for per in times["plain"] for t in per)
        screened = statistics.median(t for per in times["screened"] for t in per)
        direction = statistics.median(t for per in times["direction"] for t in per)

        def ratio(name: str) -> float:
            return statistics.median(statistics.median(s) / statistics.median(q)
                                     for s, q in zip(times[name], times["plain"]))

        alone = statistics.median(t for per in times["screen_alone"] for t in per)
        sketch = statistics.median(t for per in times["sketch_alone"] for t in per)
        lines.append(f"| {codec} | {plain:.4f} | {screened:.4f} | {ratio('screened'):.3f} | {alone:.4f} | "
                     f"{direction:.4f} | {ratio('direction'):.3f} | {sketch:.4f} |")
    lines += ["", "A shared machine: ratios spread by a few % (the load average is in the first line)."]
    text = "\n".join(lines) + "\n"
    print(text)
    return h.write_summary(h.results_dir("screen") / f"screen_cost{suffix}.md", text, started, command)


if __name__ == "__main__":
    import screen

    screen.main(["--only", "cost", *sys.argv[1:]])
