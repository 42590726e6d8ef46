"""The Hugging Face GPT2 module of ``hf.py`` under one local-SGD strategy; each rank dumps what tests/clients compare.

    python tests/workers/train_hf.py --strategy local_sgd|diloco_groups|fsdp|fsdp_self|deepspeed --devices N --out DIR

Fit A: one epoch of 4 steps with a validation pass at its end and ``ModelCheckpoint(save_last=True)``; it ends
between two syncs (sync_every 3, or 64 for the registered name), so the train-end sync makes the model ``fit``
returns. Fit B: a new Trainer resumes from A's ``last.ckpt`` for a second epoch (ending with a validation pass, no
checkpoint), then ``trainer.validate`` on the same trainer. Every rank writes ``DIR/rank{r}.pt``: its state at the end of A, at the start of B (after the restore)
and at the end of B.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf import HFGPT2, make_tokens  # noqa: E402
from train_tiny import _deepspeed_state, _params  # noqa: E402

import lightning_localsgd  # noqa: E402,F401
from lightning_localsgd import LocalSGDDeepSpeedStrategy, LocalSGDFSDPStrategy, LocalSGDStrategy  # noqa: E402
from lightning_localsgd.tensors import dtensor_to_local  # noqa: E402


def make_strategy(name: str):
    if name == "local_sgd":
        return "local_sgd"  # the registered name, as a new user writes it (sync_every 64: only the train-end sync)
    if name == "diloco_groups":
        return LocalSGDStrategy(outer_optimizer="diloco", group_size=2, sync_every=3, process_group_backend="gloo")
    if name == "fsdp":  # the strategy shards the module itself (each GPT2 block, then the root)
        return LocalSGDFSDPStrategy(outer_optimizer="diloco", group_size=2, sync_every=3, process_group_backend="gloo")
    if name == "fsdp_self":
        return LocalSGDFSDPStrategy(group_size=1, sync_every=3, process_group_backend="gloo")
    if name == "deepspeed":
        return LocalSGDDeepSpeedStrategy(stage=2, group_size=1, sync_every=3, process_group_backend="gloo",
                                         logging_batch_size_per_gpu=2)
    raise ValueError(name)


def state(trainer: L.Trainer, model: L.LightningModule) -> dict:
    """This rank's training state: full parameters, inner optimizer state (its shard), outer state, counters."""
    s = trainer.strategy
    deepspeed = isinstance(s, LocalSGDDeepSpeedStrategy)
    return copy.deepcopy({  # optimizer and outer state_dicts hold the live tensors
        "params": _params(model),
        "optimizers": [_deepspeed_state(o) if deepspeed else dtensor_to_local(o.state_dict())
                       for o in trainer.optimizers],
        "outer": {k: v for k, v in s.outer_sync.state_dict().items() if k in ("snapshot", "outer_optimizer")},
        "schedule": s.schedule.state_dict(),
        "global_step": trainer.global_step,
    })


class AtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.state = state(trainer, pl_module)


def trainer_for(args, epochs: int, callbacks: list) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=args.devices, strategy=make_strategy(args.strategy),
                     max_epochs=epochs, limit_train_batches=4, limit_val_batches=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                     enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                     default_root_dir=args.out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", required=True)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    L.seed_everything(100 + int(os.environ.get("LOCAL_RANK", 0)), verbose=False)  # the strategy aligns the ranks
    train = DataLoader(make_tokens(), batch_size=2)
    val = DataLoader(make_tokens(8), batch_size=2)
    ckpt_dir = os.path.join(args.out, "ckpt")

    model = HFGPT2(shard_self=args.strategy == "fsdp_self")
    trainer = trainer_for(args, 1, [ModelCheckpoint(dirpath=ckpt_dir, save_last=True)])
    trainer.fit(model, train, val)
    a_end = state(trainer, model)

    resumed = HFGPT2(shard_self=args.strategy == "fsdp_self")
    start = AtTrainStart()
    trainer = trainer_for(args, 2, [start])
    trainer.fit(resumed, train, val, ckpt_path=os.path.join(ckpt_dir, "last.ckpt"))
    # a fit that ended with a validation pass and saved nothing after it, then validate on the same trainer
    val_loss = trainer.validate(resumed, val, verbose=False)[0]["val_loss"]
    torch.save({"a_end": a_end, "b_start": start.state, "b_end": state(trainer, resumed), "val_loss": val_loss},
               os.path.join(args.out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
