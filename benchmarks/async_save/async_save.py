"""The training stall per checkpoint save, synchronous vs asynchronous writes, side by side (issue 24 item 3).

1. **Training runs** (``benchmarks/checkpoint_memory/checkpoint_memory.py``: Hugging Face GPT-2 of ~12.7M parameters,
   AdamW, CPU
   ranks on gloo, one worker group per rank, ``ModelCheckpoint(every_n_train_steps=--every)``), alternately with
   ``async_save=False`` and ``async_save=True``, ``--repeats`` times each. The stall of a save is the time
   ``strategy.save_checkpoint`` keeps the training thread; with ``async_save`` the part of it spent copying the
   state to host memory is recorded too (the target: the stall is about that copy). Also the wall time of ``fit``
   (which ends once the last write is committed).
2. **One process, one state** (the same GPT-2 + AdamW state dict): the time the caller is blocked by each way of
   starting an asynchronous save, and the time until the files are on disk: this package's writer
   (:mod:`lightning_localsgd.async_checkpoint`), Lightning's ``AsyncCheckpointIO`` (clone, then ``torch.save`` in a
   thread) and torch DCP's ``async_save`` (its own multi-file format), next to a synchronous atomic ``torch.save``.

    python benchmarks/async_save/async_save.py   # writes async_save/results/async_save{,_runs,_micro}.csv

Rank 0 of each run prints its saves; this script prints the summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CHECKPOINT_MEMORY = Path(__file__).resolve().parents[1] / "checkpoint_memory" / "checkpoint_memory.py"


def training_runs(args) -> list[dict]:
    rows = []
    for repeat in range(args.repeats):
        for mode in ("sync", "async"):
            out = Path(args.out) / f"{mode}{repeat}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, str(CHECKPOINT_MEMORY), "--devices", str(args.devices), "--steps",
                   str(args.steps), "--every", str(args.every), "--csv", "", "--out", str(out), "--label", mode]
            if mode == "async":
                cmd.append("--async-save")
            env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, timeout=1800)
            for r in range(args.devices):
                rank = json.loads((out / f"rank{r}.json").read_text())
                for i, save in enumerate(rank["saves"]):
                    rows.append({"mode": mode, "repeat": repeat, "rank": r, "save": i,
                                 "stall_seconds": round(save["seconds"], 4),
                                 "host_copy_seconds": None if save["stage_seconds"] is None
                                 else round(save["stage_seconds"], 4),
                                 "fit_seconds": round(rank["fit_seconds"], 2)})
            shutil.rmtree(out / "ckpt", ignore_errors=True)
    return rows


def gpt2_state(n_embd: int, n_layer: int, seq: int) -> dict:
    """A GPT-2 model's state dict and its AdamW state after one step (what a DDP group's checkpoint holds)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=4, n_positions=seq))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 50257, (2, seq))
    model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    return {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()]}


def micro(args) -> list[dict]:
    import torch
    import torch.distributed.checkpoint as dcp
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    from lightning_localsgd.async_checkpoint import AsyncCheckpointWriter
    from lightning_localsgd.checkpoint_io import AtomicCheckpointIO, atomic_save

    torch.set_num_threads(1)
    state = gpt2_state(args.n_embd, args.n_layer, args.seq)
    tensors = [*state["state_dict"].values(),
               *(t for st in state["optimizer_states"][0]["state"].values() for t in st.values() if t.dim())]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)  # the model and AdamW's two moments
    rows = []
    for repeat in range(args.repeats):
        folder = Path(tempfile.mkdtemp(prefix="async_save_micro.", dir=args.out))

        def record(method: str, blocked: float, done: float) -> None:
            rows.append({"method": method, "repeat": repeat, "blocked_seconds": round(blocked, 4),
                         "written_seconds": round(done, 4), "state_mb": round(nbytes / 2**20, 1)})

        start = time.perf_counter()
        atomic_save(state, folder / "sync.pt")
        record("synchronous atomic torch.save", time.perf_counter() - start, time.perf_counter() - start)

        writer = AsyncCheckpointWriter()
        start = time.perf_counter()
        staged = writer.stage(state)
        writer.submit(lambda: atomic_save(staged, folder / "ours.pt"), None, description="micro")
        blocked = time.perf_counter() - start
        writer.wait()
        record("lightning_localsgd async_save (host copy + writer thread)", blocked, time.perf_counter() - start)

        io = AsyncCheckpointIO(AtomicCheckpointIO())
        start = time.perf_counter()
        io.save_checkpoint(state, folder / "lightning.pt")
        blocked = time.perf_counter() - start
        io.teardown()
        record("Lightning AsyncCheckpointIO (clone + thread)", blocked, time.perf_counter() - start)

        flat = {"model": state["state_dict"], "optim": state["optimizer_states"][0]["state"]}
        start = time.perf_counter()
        future = dcp.async_save(flat, checkpoint_id=str(folder / "dcp"))
        blocked = time.perf_counter() - start
        future.result()
        record("torch DCP async_save", blocked, time.perf_counter() - start)
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--every", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=208)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--out", default="/tmp/async_save_bench")
    p.add_argument("--skip-runs", action="store_true", help="only the one-process comparison")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)

    summary = []
    if not args.skip_runs:
        runs = training_runs(args)
        write_csv(RESULTS / "async_save_runs.csv", runs)
        for mode in ("sync", "async"):
            mine = [r for r in runs if r["mode"] == mode]
            copies = [r["host_copy_seconds"] for r in mine if r["host_copy_seconds"] is not None]
            fits = sorted({(r["repeat"], r["rank"]): r["fit_seconds"] for r in mine}.values())
            summary.append({"mode": mode, "devices": args.devices, "saves": len(mine),
                            "median_stall_seconds": round(statistics.median(r["stall_seconds"] for r in mine), 4),
                            "max_stall_seconds": round(max(r["stall_seconds"] for r in mine), 4),
                            "median_host_copy_seconds": round(statistics.median(copies), 4) if copies else None,
                            "median_fit_seconds": round(statistics.median(fits), 2)})
        ratio = summary[0]["median_stall_seconds"] / summary[1]["median_stall_seconds"]
        for row in summary:
            row["sync_over_async_stall"] = round(ratio, 1)
        write_csv(RESULTS / "async_save.csv", summary)
        for row in summary:
            print(row)
    rows = micro(args)
    write_csv(RESULTS / "async_save_micro.csv", rows)
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        print(f"{method}: blocked {statistics.median(r['blocked_seconds'] for r in mine):.3f} s, written "
              f"{statistics.median(r['written_seconds'] for r in mine):.3f} s (median of {len(mine)})")


if __name__ == "__main__":
    main()
