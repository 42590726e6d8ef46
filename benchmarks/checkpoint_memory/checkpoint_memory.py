"""Peak RSS per rank at a checkpoint save, and checkpoint bytes written per rank (issue 24).

A Hugging Face ``GPT2LMHeadModel`` (random init, no download; ~12.7M parameters at the default size), AdamW,
``--devices`` CPU processes (gloo) in groups of ``--group-size``, ``ModelCheckpoint(every_n_train_steps=4)``. Each
rank records its RSS right before and right after each save, its peak RSS over the run (``VmHWM``) and the bytes of
the files it wrote; rank 0 prints one table and writes
``benchmarks/checkpoint_memory/results/checkpoint_memory.{csv,md}``.

    python benchmarks/checkpoint_memory/checkpoint_memory.py     # 4 ranks = 4 groups, local SGD
    python benchmarks/checkpoint_memory/checkpoint_memory.py --strategy ddp  # Lightning's DDP, for comparison
    PYTHONPATH=<older checkout> python benchmarks/checkpoint_memory/checkpoint_memory.py --label before  # earlier
    python benchmarks/checkpoint_memory/checkpoint_memory.py --async-save  # background writes (async_save/)

The script is its own Lightning worker: Lightning's launcher re-runs it for the other ranks.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mb(field: str = "VmRSS") -> float:
    """A field of /proc/self/status in MB (VmRSS: now; VmHWM: the peak so far)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class GPT2Module(L.LightningModule):
    def __init__(self, n_embd: int, n_layer: int, seq: int) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=4, n_positions=seq, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0)
        self.model = GPT2LMHeadModel(config)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.model(input_ids=x, labels=x).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def measure_saves(strategy, record: list) -> None:
    """Wrap the strategy's save: RSS before / after and seconds of each save on this rank."""
    original = strategy.save_checkpoint

    def save_checkpoint(*args, **kwargs):
        before, start = rss_mb(), time.perf_counter()
        out = original(*args, **kwargs)
        writer = getattr(strategy, "_async_writer", None)  # async_save: the host copy's share of the stall
        record.append({"rss_before_mb": before, "rss_after_mb": rss_mb(), "peak_so_far_mb": rss_mb("VmHWM"),
                       "seconds": time.perf_counter() - start,
                       "stage_seconds": writer.stage_seconds if writer is not None else None})
        return out

    strategy.save_checkpoint = save_checkpoint


def files_by_writer(folder: Path, devices: int, group_size: int) -> dict[int, int]:
    """Bytes of the checkpoint written by each rank (from the file names of the folder layout)."""
    written = dict.fromkeys(range(devices), 0)
    if folder.is_file():  # a single file: rank 0 wrote it all
        written[0] = folder.stat().st_size
        return written
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        name = path.name
        if name.startswith("rank") and name.endswith(".pt"):
            written[int(name[4:9])] += path.stat().st_size
        elif name.startswith("group") and name.endswith(".pt"):  # groupGGGGG.pt or groupGGGGG.partKKKKK.pt
            part = int(name[15:20]) if ".part" in name else 0
            written[int(name[5:10]) * group_size + part] += path.stat().st_size
        else:  # meta.pt, checksum sidecars
            written[0] += path.stat().st_size
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--group-size", type=int, default=1)
    p.add_argument("--strategy", default="local_sgd", choices=["local_sgd", "ddp"])
    p.add_argument("--n-embd", type=int, default=208)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--every", type=int, default=4, help="ModelCheckpoint(every_n_train_steps=...)")
    p.add_argument("--async-save", action="store_true", help="LocalSGDStrategy(async_save=True)")
    p.add_argument("--csv", default=str(RESULTS / "checkpoint_memory.csv"), help="append the rows here ('': no)")
    p.add_argument("--label", default="")
    p.add_argument("--out", default="/tmp/checkpoint_memory")
    args = p.parse_args()
    torch.set_num_threads(1)

    import lightning_localsgd  # noqa: F401  (registers the strategies)
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_localsgd import LocalSGDStrategy

    L.seed_everything(0, verbose=False)
    model = GPT2Module(args.n_embd, args.n_layer, args.seq)
    data = DataLoader(TensorDataset(torch.randint(0, 50257, (64, args.seq))), batch_size=2)
    strategy = DDPStrategy(process_group_backend="gloo") if args.strategy == "ddp" else \
        LocalSGDStrategy(sync_every=16, group_size=args.group_size, process_group_backend="gloo",
                         async_save=args.async_save)
    ckpt_dir = Path(args.out) / "ckpt"
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=args.every, save_top_k=-1,
                                                   filename="{step}")])
    saves: list[dict] = []
    measure_saves(trainer.strategy, saves)
    start = time.perf_counter()
    trainer.fit(model, data)  # ends after the last background write is committed (teardown waits for it)
    rank = trainer.global_rank
    mine = {"rank": rank, "peak_rss_mb": rss_mb("VmHWM"), "saves": saves, "fit_seconds": time.perf_counter() - start}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(mine))
    trainer.strategy.barrier()
    if rank != 0:
        return
    ranks = [json.loads((Path(args.out) / f"rank{r}.json").read_text()) for r in range(args.devices)]
    params = sum(p.numel() for p in model.parameters())
    last = ckpt_dir / f"step={args.steps}.ckpt"
    written = files_by_writer(last, args.devices, args.group_size if args.strategy != "ddp" else args.devices)
    label = args.label or args.strategy
    rows = []
    for r in ranks:
        rows.append({"label": label, "strategy": args.strategy, "devices": args.devices,
                     "group_size": args.group_size, "params": params, "rank": r["rank"],
                     "peak_rss_mb": round(r["peak_rss_mb"], 1),
                     "save_rss_growth_mb": round(max(s["rss_after_mb"] - s["rss_before_mb"] for s in r["saves"]), 1),
                     "save_seconds": round(max(s["seconds"] for s in r["saves"]), 3),
                     "bytes_written": written[r["rank"]]})
    others = [row["peak_rss_mb"] for row in rows[1:]]
    ratio = rows[0]["peak_rss_mb"] / max(others)
    print(f"{label}: {params / 1e6:.1f}M parameters, {args.devices} ranks, group_size {args.group_size}; "
          f"rank 0 peak RSS / largest other rank's = {ratio:.3f}")
    for row in rows:
        print(row)
    if not args.csv:
        return
    path = Path(args.csv)
    path.parent.mkdir(exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) + ["rank0_over_others"])
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**row, "rank0_over_others": round(ratio, 3)})


if __name__ == "__main__":
    main()
