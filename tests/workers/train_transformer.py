"""Lightning's own demo LightningTransformer, unchanged, trained with strategy="local_sgd" on a local text file.

The demo's WikiText2 dataset reads ./data/wikitext-2.txt and only downloads when that file is missing: the test
writes a small file there first, so nothing is downloaded (the module's own prepare_data still imports `requests`,
which the `dev` extra installs).
"""

import json
import os
import sys

import torch
import lightning as L
from lightning.pytorch.demos.transformer import LightningTransformer, WikiText2
from torch.utils.data import DataLoader

import lightning_localsgd  # noqa: F401  registers "local_sgd"

if __name__ == "__main__":
    out = sys.argv[1]
    fsdp = len(sys.argv) > 2 and sys.argv[2] == "fsdp"
    L.seed_everything(int(os.environ.get("LOCAL_RANK", 0)))  # different seeds: the strategy must align the ranks
    dataset = WikiText2(block_size=16, download=False)  # the test wrote ./data/wikitext-2.txt
    model = LightningTransformer(vocab_size=dataset.vocab_size)
    if fsdp:  # 2 worker groups × 2 FSDP2 shards; the strategy shards the unchanged module itself
        strategy, devices = lightning_localsgd.LocalSGDFSDPStrategy(group_size=2, sync_every=3), 4
    else:
        strategy, devices = "local_sgd", 2
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=6, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(dataset, batch_size=4))
    flat = torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1)
                      for p in model.parameters()])
    torch.save(flat, os.path.join(out, f"params{trainer.global_rank}.pt"))
    with open(os.path.join(out, f"info{trainer.global_rank}.json"), "w") as f:
        json.dump({"syncs": trainer.strategy.outer_sync.num_syncs, "steps": trainer.global_step,
                   "loss": float(trainer.callback_metrics.get("train_loss", float("nan")))}, f)
