"""A per-sample ledger: the tiny model trained on a dataset whose samples carry their index; every rank records the
indices of each batch it trained on, in order, under any local-SGD strategy, with the user's own plain ``DataLoader``.

``python train_ledger.py --devices N --out DIR --steps S [--strategy local_sgd|fsdp|deepspeed] [--group-size G]
[--ckpt-every K] [--resume CKPT] [--loader plain|sequential|subclass|workers|stateful]`` writes ``DIR/rank{r}.pt``:
``{"ledger": [[index, ...] per training step], "epochs": [epoch per training step], "global_step": ...}``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_localsgd  # noqa: E402,F401  (registers the strategies)
from workers.tiny import TinyModule, make_dataset  # noqa: E402


class IndexedDataset(Dataset):
    """The tiny dataset's ``(x, y)`` with the sample's index."""

    def __init__(self, size: int = 0) -> None:
        x, y = make_dataset().tensors
        self.x, self.y = (x[:size], y[:size]) if size else (x, y)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class UserLoader(DataLoader):
    """A user's own DataLoader subclass with an argument of its own."""

    def __init__(self, dataset, tag: str, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.tag = tag


class CountingLoader(DataLoader):
    """A loader that saves its own position (as torchdata's StatefulDataLoader does): the strategy leaves it alone
    and Lightning checkpoints it; here it drops the batches of the epoch handed out before the checkpoint. Its state
    is the rank's own (as an iterable dataset's position is)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.handed_out, self.skip = 0, 0

    def __iter__(self):
        iterator, skip = super().__iter__(), self.skip
        self.skip, self.handed_out = 0, skip
        for _ in range(skip):
            next(iterator)
        for batch in iterator:
            self.handed_out += 1
            yield batch

    def state_dict(self):
        return {"handed_out": self.handed_out, "rank": torch.distributed.get_rank()}

    def load_state_dict(self, state):  # each rank gets its own state back (the checkpoint's meta holds rank 0's)
        if state["rank"] != torch.distributed.get_rank():
            raise RuntimeError(f"rank {torch.distributed.get_rank()} got the loader state of rank {state['rank']}")
        self.skip = state["handed_out"]


class LedgerModule(TinyModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ledger: list[list[int]] = []
        self.epochs: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.ledger.append(index.tolist())
        self.epochs.append(self.current_epoch)
        return super().training_step((x, y), batch_idx)

    def validation_step(self, batch, batch_idx):
        pass


def make_loader(kind: str, dataset: Dataset, batch_size: int) -> DataLoader:
    if kind == "plain":
        return DataLoader(dataset, batch_size=batch_size, shuffle=True)
    if kind == "sequential":
        return DataLoader(dataset, batch_size=batch_size, shuffle=False)
    if kind == "subclass":
        return UserLoader(dataset, tag="mine", batch_size=batch_size, shuffle=True)
    if kind == "workers":
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=2, persistent_workers=True)
    if kind == "stateful":
        return CountingLoader(dataset, batch_size=batch_size, shuffle=True)
    raise ValueError(kind)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--strategy", default="local_sgd", choices=["local_sgd", "fsdp", "deepspeed"])
    p.add_argument("--group-size", type=int, default=1)
    p.add_argument("--sync-every", type=int, default=3)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--resume", default=None)
    p.add_argument("--loader", default="plain")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--dataset-size", type=int, default=0, help="the first N samples of the tiny dataset (0: all)")
    p.add_argument("--batches-per-epoch", type=int, default=None, help="limit_train_batches")
    p.add_argument("--val-every", type=int, default=0, help="validate on 2 batches every N training batches")
    args = p.parse_args()

    L.seed_everything(0, verbose=False)
    common = dict(sync_every=args.sync_every, group_size=args.group_size, process_group_backend="gloo")
    if args.strategy == "fsdp":
        strategy = lightning_localsgd.LocalSGDFSDPStrategy(**common)
    elif args.strategy == "deepspeed":
        strategy = lightning_localsgd.LocalSGDDeepSpeedStrategy(stage=2, logging_batch_size_per_gpu=args.batch_size,
                                                                **common)
    else:
        strategy = lightning_localsgd.LocalSGDStrategy(**common)
    model = LedgerModule()
    callbacks = [ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), every_n_train_steps=args.ckpt_every,
                                 save_top_k=-1, filename="{step}")] if args.ckpt_every else []
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps,
                        limit_train_batches=args.batches_per_epoch, limit_val_batches=2 if args.val_every else 0,
                        val_check_interval=args.val_every or None, num_sanity_val_steps=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                        enable_checkpointing=bool(args.ckpt_every))
    loader = make_loader(args.loader, IndexedDataset(args.dataset_size), args.batch_size)
    val = DataLoader(IndexedDataset(args.dataset_size), batch_size=args.batch_size) if args.val_every else None
    trainer.fit(model, loader, val, ckpt_path=args.resume)
    torch.save({"ledger": model.ledger, "epochs": model.epochs, "global_step": trainer.global_step,
                "loader": type(trainer.train_dataloader).__name__,
                "val_loader": type(trainer.val_dataloaders).__name__ if val is not None else None},
               os.path.join(args.out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
