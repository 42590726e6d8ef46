"""A Hugging Face ``GPT2LMHeadModel`` (tiny config, random init, no download) wrapped the way HF users write it."""

from __future__ import annotations

import torch
import lightning as L
from torch.utils.data import TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

SEQ, VOCAB = 16, 64


def make_tokens(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randint(0, VOCAB, (n, SEQ), generator=g))


class HFGPT2(L.LightningModule):
    """``training_step`` calls the wrapped model directly: ``self.model(input_ids=x, labels=x).loss``."""

    def __init__(self, shard_self: bool = False, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        self.model = GPT2LMHeadModel(config)  # ties lm_head.weight to transformer.wte.weight

    def configure_model(self) -> None:
        """The README's self-sharding recipe: each block over the worker group, then the LightningModule as root."""
        from torch.distributed.fsdp import FSDPModule, fully_shard

        # no mesh: not under the FSDP strategy (e.g. load_from_checkpoint); FSDPModule: sharded already (validate)
        if not self.hparams.shard_self or self.device_mesh is None or isinstance(self, FSDPModule):
            return
        mesh = self.device_mesh["shard"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.model(input_ids=x, labels=x).loss
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.log("val_loss", self.model(input_ids=x, labels=x).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
