"""Train TinyModule on 2 CPU processes with an outer preset, a codec and a sync schedule registered from outside.

Nothing here edits lightning_localsgd: it uses only the public registries. Lightning's popen launcher re-runs this
script in each child, so the registrations (at import) reach every rank. Global rank 0 writes its final parameters,
the steps at which syncs ran and the bytes sent to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny import GrowingSchedule, TinyModule, make_dataset  # noqa: E402

import lightning_localsgd  # noqa: E402
from lightning_localsgd import Codec, LocalSGDStrategy  # noqa: E402

SYNC_STEPS = (2, 6, 14)  # local steps where the "doubling" schedule syncs: H = 2, 4, 8


class TaggedFP32(Codec):
    """Lossless: the fp32 bytes plus an 8-byte tag, so its payload size (4n + 8) tells that it ran."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.reshape(-1).float().contiguous().view(torch.uint8), torch.full((8,), 7, dtype=torch.uint8)])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return payload[: 4 * numel].clone().view(torch.float32)

    def payload_bytes(self, numel: int) -> int:
        return 4 * numel + 8


lightning_localsgd.register_outer_optimizer("half_sgd", functools.partial(torch.optim.SGD, lr=0.5), override=True)
lightning_localsgd.register_codec("tagged_fp32", TaggedFP32(), override=True)
# syncs after 2, 4, 8, ... local steps: the interval doubles after every sync
lightning_localsgd.register_schedule(
    "doubling", lambda config: GrowingSchedule(2, config.warmup_steps, interval=lambda h, k: h * 2 ** k), override=True)


class SyncSteps(L.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        syncs = trainer.strategy.outer_sync.num_syncs
        if syncs > self.seen:
            self.steps.append(trainer.global_step)
            self.seen = syncs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    L.seed_everything(0, verbose=False)
    model = TinyModule(inner="sgd")
    strategy = LocalSGDStrategy(outer_optimizer="half_sgd", compression="tagged_fp32", sync_schedule="doubling",
                                sync_on_train_end=False, process_group_backend="gloo")
    recorder = SyncSteps()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=SYNC_STEPS[-1], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder])
    trainer.fit(model, DataLoader(make_dataset(), batch_size=2, shuffle=False))
    if trainer.global_rank == 0:
        torch.save({"params": {k: v.detach().clone() for k, v in model.named_parameters()},
                    "sync_steps": recorder.steps, "bytes_sent": trainer.strategy.bytes_sent,
                    "numel": sum(p.numel() for p in model.parameters())}, args.out)


if __name__ == "__main__":
    main()
