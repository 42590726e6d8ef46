"""The fault matrix: what the other ranks do when one rank is killed, frozen or preempted, and what is left on disk.

Every rank is started as its own process (``LOCAL_RANK`` set, as torchrun or SLURM start them; CPU, gloo), trains a
small MLP with ``LocalSGDStrategy(sync_every=4, sync_timeout=T)`` for 16 steps, a checkpoint every 3 steps. One rank
(global rank 0, or another: rank 1 of 2, rank 2 of 4) gets one signal at one moment:

* ``interval``: at the start of step 7 (mid-interval, after the checkpoint of step 6: the next sync is at step 8);
* ``sync``: 1 s after it started step 8, while it waits in the sync of step 8 (the next rank stalls 2 s before it);
* ``save``: 0.5 s into the checkpoint save of step 6 (rank 0's write is held 2 s between writing the temp file and
  renaming it; the other ranks wait for it).

Signals: ``SIGKILL`` (a crash, the OOM killer), ``SIGSTOP`` (a frozen node or a partition: alive, answers nothing;
it is killed once the others have ended) and ``SIGTERM`` (a preemption: every rank must stop cleanly, exit code 0).

Expected: ``SIGTERM`` - every rank exits 0; ``SIGKILL`` / ``SIGSTOP`` mid-interval or mid-sync - every survivor exits
non-zero naming the rank; mid-save (Lightning's barrier, outside a sync, bounded by the process group's ``timeout``)
- every survivor exits non-zero; always - the newest checkpoint verifies. Per run the CSV records the survivors' exit codes, the time from the fault to the last survivor's exit, which ranks
they named in their ``SyncFailedError``, and whether the newest checkpoint on disk verifies (its SHA-256 sidecar) and
loads::

    python benchmarks/faults/faults.py           # the full matrix: 3 signals x 2 ranks x 3 moments x 2 and 4 ranks
    python benchmarks/faults/faults.py --worlds 2 --signals SIGKILL

Writes ``benchmarks/faults/results/faults.csv``, ``faults.png`` and ``faults.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import free_port  # noqa: E402  (benchmarks/ on the path first)

RESULTS = Path(__file__).parent / "results"
SYNC_EVERY, STEPS, CKPT_EVERY = 4, 16, 3
MOMENTS = {"interval": 6, "sync": 7, "save": 6}  # global_step at which the fault is armed (0-based)


# ----------------------------------------------------------------------------------------------------- the worker
def worker(args: argparse.Namespace) -> None:
    from datetime import timedelta

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_localsgd.checkpoint_io as checkpoint_io
    from lightning_localsgd import LocalSGDStrategy

    torch.set_num_threads(1)
    rank = int(os.environ["LOCAL_RANK"])
    sig = getattr(signal, args.signal)

    def fire(what: str) -> None:
        print(f"[fault] t={time.time():.3f} rank {rank} gets {args.signal} ({what})", flush=True)
        os.kill(os.getpid(), sig)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    class Fault(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step = trainer.global_step
            if args.moment == "interval" and rank == args.fault_rank and step == MOMENTS["interval"]:
                fire("mid-interval, start of step 7")
            if args.moment == "sync" and step == MOMENTS["sync"]:
                if rank == (args.fault_rank + 1) % args.world:
                    time.sleep(2.0)  # the fault rank reaches the sync of step 8 first and waits there
                elif rank == args.fault_rank:
                    threading.Timer(1.0, fire, args=("waiting in the sync of step 8",)).start()

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            if args.moment == "save" and rank == args.fault_rank and trainer.global_step == MOMENTS["save"]:
                threading.Timer(0.5, fire, args=("during the checkpoint save of step 6",)).start()

    original_save = checkpoint_io.torch.save

    def held_save(obj, f, *a, **k):  # rank 0's write at step 6: the temp file is complete, the rename waits 2 s
        original_save(obj, f, *a, **k)
        if args.moment == "save" and isinstance(obj, dict) and obj.get("global_step") == MOMENTS["save"]:
            time.sleep(2.0)

    checkpoint_io.torch.save = held_save
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 16, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True).tanh()), batch_size=16)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.world, max_steps=STEPS, logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        # timeout: the process group's, for the collectives outside a sync (Lightning's barriers around a save)
        strategy=LocalSGDStrategy(sync_every=SYNC_EVERY, sync_timeout=args.sync_timeout, process_group_backend="gloo",
                                  timeout=timedelta(seconds=args.pg_timeout)),
        callbacks=[Fault(), ModelCheckpoint(dirpath=args.out, every_n_train_steps=CKPT_EVERY, save_top_k=-1,
                                            filename="{step}")],
    )
    trainer.fit(Module(), data)
    print(f"[done] rank {rank} reached step {trainer.global_step}", flush=True)


# ----------------------------------------------------------------------------------------------------- the driver
def last_checkpoint(folder: Path) -> tuple[str, bool]:
    """The newest ``step=N.ckpt`` and whether it verifies against its checksum and loads."""
    from lightning_localsgd.checkpoint import read_checkpoint
    from lightning_localsgd.integrity import verify

    files = sorted(folder.glob("step=*.ckpt"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    if not files:
        return "-", False
    try:
        ok = verify(files[-1])
        read_checkpoint(files[-1])  # a folder: every group's and rank's files
    except Exception:
        ok = False
    return files[-1].name, ok


def run_case(world: int, sig: str, who: str, moment: str, sync_timeout: float, out: Path, pg_timeout: float = 30,
             bound: float = 150) -> dict:
    fault_rank = 0 if who == "rank 0" else (1 if world == 2 else 2)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    for r in range(world):
        env = {**os.environ, "LOCAL_RANK": str(r), "NODE_RANK": "0", "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONWARNINGS": "ignore",
               "OMP_NUM_THREADS": "1"}
        logs.append(open(out / f"log{r}.txt", "w"))
        cmd = [sys.executable, __file__, "--worker", "--world", str(world), "--signal", sig, "--moment", moment,
               "--fault-rank", str(fault_rank), "--sync-timeout", str(sync_timeout), "--pg-timeout", str(pg_timeout),
               "--out", str(out / "ckpt")]
        procs.append(subprocess.Popen(cmd, stdout=logs[-1], stderr=subprocess.STDOUT, env=env))
    ended: dict[int, float] = {}
    survivors = [r for r in range(world) if r != fault_rank or sig == "SIGTERM"]
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline and any(r not in ended for r in survivors):
        for r, p in enumerate(procs):
            if r not in ended and p.poll() is not None:
                ended[r] = time.time()
        time.sleep(0.05)
    hung = [r for r in survivors if r not in ended]
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    for f in logs:
        f.close()
    texts = [(out / f"log{r}.txt").read_text(errors="replace") for r in range(world)]
    fired = re.search(r"\[fault\] t=([\d.]+)", texts[fault_rank])
    t_fault = float(fired.group(1)) if fired else None
    named = sorted({m for r in survivors for m in re.findall(
        r"rank\(s\) (\[[\d, ]*\]) (?:did not reach it|stopped answering during the sync)", texts[r])})
    codes = [procs[r].returncode for r in survivors]
    detect = max(ended[r] for r in survivors if r in ended) - t_fault if t_fault and not hung else None
    ckpt, verifies = last_checkpoint(out / "ckpt")
    if sig == "SIGTERM":  # a clean stop of every rank
        good = not hung and all(c == 0 for c in codes) and not any("SyncFailedError" in texts[r] for r in survivors)
    elif moment == "save":  # outside a sync (Lightning's barrier): the backend's error, no rank named; a bounded stop
        good = not hung and all(c not in (0, None) for c in codes)
    else:  # the survivors stop, naming the rank
        good = not hung and all(c not in (0, None) for c in codes) and named == [f"[{fault_rank}]"]
    return {
        "world": world, "signal": sig, "rank": who, "fault_rank": fault_rank, "moment": moment,
        "fault_fired": t_fault is not None, "survivor_exit_codes": " ".join(map(str, codes)),
        "named": " ".join(named) or "-", "hung_ranks": " ".join(map(str, hung)) or "-",
        "detect_s": round(detect, 2) if detect is not None else "", "last_checkpoint": ckpt,
        "checkpoint_verifies": verifies, "as_expected": good and verifies and t_fault is not None,
    }


def plot(rows: list[dict], path: Path) -> None:
    from harness.output import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(11, 4))
    labels = [f"{r['world']}r {r['signal'][3:]} {r['rank'].replace('rank 0', 'r0')} {r['moment']}" for r in rows]
    values = [float(r["detect_s"]) if r["detect_s"] != "" else 0.0 for r in rows]
    colors = ["tab:green" if r["as_expected"] else "tab:red" for r in rows]
    ax.bar(range(len(rows)), values, color=colors)
    ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("fault -> last survivor exit (s)")
    ax.set_title("fault matrix (green: as expected; red: not)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--signal", default="SIGKILL", help=argparse.SUPPRESS)
    p.add_argument("--moment", default="interval", help=argparse.SUPPRESS)
    p.add_argument("--fault-rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--sync-timeout", type=float, default=5.0, help="the strategy's sync_timeout (s)")
    p.add_argument("--pg-timeout", type=float, default=30.0,
                   help="the strategy's timeout (s): the process groups', for collectives outside a sync")
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--signals", nargs="+", default=["SIGKILL", "SIGSTOP", "SIGTERM"])
    p.add_argument("--moments", nargs="+", default=list(MOMENTS))
    p.add_argument("--name", default="faults")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    import tempfile

    from harness.output import loadavg, md_table, write_csv, write_summary

    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        for world in args.worlds:
            for sig in args.signals:
                for who in ("rank 0", "other"):
                    for moment in args.moments:
                        row = run_case(world, sig, who, moment, args.sync_timeout,
                                       Path(tmp) / f"{world}-{sig}-{who[:1]}-{moment}", pg_timeout=args.pg_timeout)
                        row["load"] = loadavg()
                        rows.append(row)
                        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    RESULTS.mkdir(exist_ok=True)
    write_csv(RESULTS / f"{args.name}.csv", rows)
    plot(rows, RESULTS / f"{args.name}.png")
    cols = [("world", "ranks"), ("signal", "signal"), ("rank", "rank"), ("moment", "when"),
            ("survivor_exit_codes", "survivors' exit codes"), ("named", "named"), ("detect_s", "fault -> exit (s)"),
            ("last_checkpoint", "last checkpoint"), ("checkpoint_verifies", "verifies"), ("as_expected", "as expected")]
    ok = sum(1 for r in rows if r["as_expected"])
    text = (f"sync_timeout={args.sync_timeout:g} s, process-group timeout={args.pg_timeout:g} s, {len(rows)} runs, "
            f"{ok} as expected.\n\n" + md_table(rows, cols))
    write_summary(RESULTS / f"{args.name}.md", text, started,
                  "python benchmarks/faults/faults.py " + " ".join(sys.argv[1:]))
    print(text)


if __name__ == "__main__":
    main()
