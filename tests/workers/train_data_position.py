"""The example TextDataModule under local SGD on CPU processes: records a hash of every training batch per rank.

``python train_data_position.py --devices 2 --out DIR --steps N [--ckpt-every K] [--resume CKPT]`` writes
``DIR/rank{r}.pt``: ``{"seen": [sha1, ...]}`` for the batches this rank trained on, in order.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_localsgd  # noqa: F401  (registers the strategies)
from lightning_localsgd import LocalSGDStrategy
from lightning_localsgd.examples.data import TextDataModule


class BatchRecorder(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        self.seen.append(hashlib.sha1(x.numpy().tobytes()).hexdigest())  # the same in every process
        return (self.w * x.float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=13)
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--resume", default=None)
    args = p.parse_args()
    L.seed_everything(0, verbose=False)
    dm = TextDataModule(source="builtin", max_tokens=40_000, block_size=16, batch_size=4, seed=3)
    model = BatchRecorder()
    callbacks = [ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), every_n_train_steps=args.ckpt_every,
                                 save_top_k=-1, filename="{step}")] if args.ckpt_every else []
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, max_steps=args.steps, limit_train_batches=5,
                        limit_val_batches=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks, enable_checkpointing=bool(args.ckpt_every),
                        strategy=LocalSGDStrategy(sync_every=4, process_group_backend="gloo"))
    trainer.fit(model, dm, ckpt_path=args.resume)
    torch.save({"seen": model.seen}, os.path.join(args.out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
