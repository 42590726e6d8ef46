"""The last checkpoint of a fit, for each way a fit ends, on 2 CPU processes (local SGD, groups of 1, H=5).

    python tests/workers/train_end_conditions.py --devices 2 --out DIR

Runs one fit per end condition, each ending between two syncs, each with a fresh TinyModule and Trainer; every rank
writes ``DIR/rank{r}.pt``: for each condition the parameters ``fit`` returned and the checkpoint files written.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny import TinyModule, make_dataset  # noqa: E402

import lightning_localsgd  # noqa: E402,F401
from lightning_localsgd import LocalSGDStrategy  # noqa: E402

SYNC_EVERY = 5


class ValidatedTiny(TinyModule):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y), sync_dist=True)


class StopAt(Callback):
    """Sets trainer.should_stop in on_train_batch_end (as a user callback would), after `step` steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def conditions(out: str) -> dict[str, tuple[dict, list]]:
    """name -> (Trainer arguments, callbacks); none ends on a multiple of SYNC_EVERY steps."""
    def ckpt(name: str, **kwargs) -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=os.path.join(out, name), save_last=True, save_top_k=-1, **kwargs)

    return {
        # every_n_train_steps fires at the last step, save_last writes last.ckpt there too
        "max_steps": (dict(max_steps=7), [ckpt("max_steps", every_n_train_steps=7, filename="{step}")]),
        # no validation: saved in on_train_epoch_end of the last epoch
        "max_epochs": (dict(max_epochs=2, limit_train_batches=3, limit_val_batches=0), [ckpt("max_epochs")]),
        # EarlyStopping stops after the first validation (epoch 0, step 3); ModelCheckpoint saves in the same hook
        "early_stopping": (dict(max_epochs=5, limit_train_batches=3, limit_val_batches=2),
                           [EarlyStopping(monitor="val_loss", stopping_threshold=1e9),
                            ckpt("early_stopping", monitor="val_loss")]),
        # should_stop set by a user callback at step 4; a checkpoint every step
        "should_stop": (dict(max_steps=20, limit_val_batches=0),
                        [StopAt(4), ckpt("should_stop", every_n_train_steps=1, filename="{step}")]),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    data = DataLoader(make_dataset(), batch_size=2)
    results = {}
    for name, (limits, callbacks) in conditions(args.out).items():
        L.seed_everything(1000 + int(os.environ.get("LOCAL_RANK", 0)), verbose=False)
        model = ValidatedTiny(inner="adamw")
        trainer = L.Trainer(accelerator="cpu", devices=args.devices, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=callbacks, **limits,
                            strategy=LocalSGDStrategy(sync_every=SYNC_EVERY, process_group_backend="gloo"))
        trainer.fit(model, data, data)
        results[name] = {"params": {k: v.detach().clone() for k, v in model.named_parameters()},
                         "global_step": trainer.global_step, "num_syncs": trainer.strategy.outer_sync.num_syncs}
    torch.save(results, os.path.join(args.out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
