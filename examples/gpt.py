"""A small, readable decoder-only transformer (GPT) as a LightningModule.

The model follows the structure of nanoGPT's ``model.py`` and is meant to be
read from top to bottom:

1. :class:`CausalSelfAttention` - multi-head self-attention with a causal mask,
   computed by :func:`torch.nn.functional.scaled_dot_product_attention`.
2. :class:`MLP` - the position-wise feed-forward network (4x expansion, GELU).
3. :class:`Block` - pre-LayerNorm residual block: ``x + attn(ln(x))`` then
   ``x + mlp(ln(x))``.
4. :class:`GPT` - token + position embeddings, a stack of blocks, a final
   LayerNorm and a language-model head whose weight is tied to the token
   embedding. It is a :class:`~lightning.pytorch.LightningModule` with the
   training / validation steps, an AdamW optimizer and a warm-up + cosine
   learning-rate schedule.

Modules are created in :meth:`GPT.configure_model` rather than in ``__init__``
so that sharded strategies (FSDP, DeepSpeed) can build the model directly on
the right device or in sharded form. The Trainer calls ``configure_model``
for you; outside a Trainer call it yourself::

    model = GPT(size="nano")
    model.configure_model()
    logits, loss = model(idx, targets)
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

__all__ = [
    "GPT",
    "GPT_SIZES",
    "Block",
    "CausalSelfAttention",
    "MLP",
    "count_non_embedding_params",
    "decode_bytes",
    "encode_bytes",
    "warmup_cosine_lr_factor",
]

#: Named model sizes: ``name -> dict(n_layer=..., n_head=..., n_embd=...)``.
#: The ladder is ordered by increasing number of non-embedding parameters
#: (see :func:`count_non_embedding_params`). ``gpt2`` and ``gpt2-medium`` match
#: the shapes of the original GPT-2 124M / 350M models.
GPT_SIZES: dict[str, dict[str, int]] = {
    "nano": dict(n_layer=2, n_head=2, n_embd=32),  # ~25K non-embedding params
    "micro": dict(n_layer=2, n_head=4, n_embd=64),  # ~99K
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),  # ~0.8M
    "small": dict(n_layer=6, n_head=6, n_embd=192),  # ~2.7M
    "medium": dict(n_layer=8, n_head=8, n_embd=256),  # ~6.3M
    "large": dict(n_layer=12, n_head=8, n_embd=512),  # ~38M
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # ~85M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # ~302M
}


def count_non_embedding_params(n_layer: int, n_embd: int, bias: bool = False) -> int:
    """Number of parameters of a :class:`GPT`, not counting the embeddings.

    The token embedding, the position embedding and the language-model head
    (which shares its weight with the token embedding) are excluded. With
    ``d = n_embd`` each :class:`Block` holds

    * ``ln_1``, ``ln_2`` weights: ``2d``
    * attention ``c_attn`` (d -> 3d) and ``c_proj`` (d -> d): ``4d^2``
    * MLP ``c_fc`` (d -> 4d) and ``c_proj`` (4d -> d): ``8d^2``
    * with ``bias=True`` also the biases: LayerNorms ``2d``, ``c_attn`` ``3d``,
      attention ``c_proj`` ``d``, ``c_fc`` ``4d``, MLP ``c_proj`` ``d`` -> ``11d``

    plus the final LayerNorm ``ln_f`` (``d``, or ``2d`` with bias). In total::

        n_layer * (12 d^2 + 2d + 11d * bias) + d * (1 + bias)

    The number does not depend on ``n_head``, ``vocab_size`` or ``block_size``.
    """
    d = n_embd
    b = int(bias)
    return n_layer * (12 * d * d + 2 * d + 11 * d * b) + d * (1 + b)


def warmup_cosine_lr_factor(step: int, warmup_steps: int, max_steps: Optional[float], min_lr_ratio: float) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based).

    * warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``
      (so the first step already uses a small, non-zero learning rate and
      step ``warmup_steps - 1`` uses the full one);
    * cosine decay from 1 to ``min_lr_ratio`` between ``warmup_steps`` and
      ``max_steps``: ``min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos(pi * t))``
      with ``t = (step - warmup_steps) / (max_steps - warmup_steps)``;
    * ``min_lr_ratio`` after ``max_steps``.

    If ``max_steps`` is ``None`` or infinite the factor stays at 1 after the warm-up.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if max_steps is None or not math.isfinite(max_steps):
        return 1.0
    decay_steps = max(1.0, max_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def encode_bytes(text: str) -> torch.Tensor:
    """Encode ``text`` as a 1-D ``int64`` tensor of UTF-8 byte values (vocabulary of 256)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode_bytes(tokens: Union[torch.Tensor, Sequence[int]]) -> str:
    """Decode byte-level tokens (values 0-255) back to text.

    Invalid UTF-8 sequences (which a barely trained model easily produces)
    are replaced by U+FFFD instead of raising.
    """
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.flatten().tolist()
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position only attends to itself and the past."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        assert n_embd % n_head == 0
        self.n_head = n_head
        self.dropout = dropout
        # query, key and value projections for all heads, in one matrix
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        # output projection
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # batch, sequence length, embedding dim
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_dim)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        # re-assemble all head outputs side by side
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear(d, 4d) -> GELU -> Linear(4d, d)."""

    def __init__(self, n_embd: int, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Transformer block with pre-LayerNorm residual connections."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(LightningModule):
    """Decoder-only transformer language model (nanoGPT style).

    The modules are built in :meth:`configure_model`, which the Trainer calls
    (inside the strategy's init context, so FSDP / DeepSpeed can build them
    sharded). To use the model without a Trainer, call ``model.configure_model()``
    once before ``forward`` / ``generate``. The number of non-embedding
    parameters is available before building as ``model.num_non_embedding_params``.

    Args:
        size: Name of a preset in ``GPT_SIZES`` (nano, micro, tiny, small, medium,
            large, gpt2, gpt2-medium). If given it overrides ``n_layer``, ``n_head``
            and ``n_embd``.
        n_layer: Number of transformer blocks.
        n_head: Number of attention heads; must divide ``n_embd``.
        n_embd: Embedding / residual stream width.
        block_size: Maximum context length (number of positions).
        vocab_size: Vocabulary size. The default 256 is the byte-level vocabulary
            of ``TextDataModule`` without a tokenizer; link it to ``data.vocab_size``.
        dropout: Dropout probability (attention, residual and embedding dropout).
        learning_rate: Peak learning rate of AdamW (reached after the warm-up).
        weight_decay: AdamW weight decay, applied only to parameters with
            ``dim >= 2`` (matrices and embeddings; not biases or LayerNorm weights).
        betas: AdamW ``(beta1, beta2)``.
        warmup_steps: Number of optimizer steps of linear learning-rate warm-up.
        max_steps: Step at which the cosine decay reaches ``min_lr_ratio * learning_rate``.
            If ``None``, ``trainer.estimated_stepping_batches`` is used (if that is
            infinite the learning rate stays constant after the warm-up).
        min_lr_ratio: Final learning rate as a fraction of ``learning_rate``.
        bias: Use biases in the Linear and LayerNorm layers.
    """

    def __init__(
        self,
        size: Optional[str] = None,
        n_layer: int = 2,
        n_head: int = 2,
        n_embd: int = 64,
        block_size: int = 128,
        vocab_size: int = 256,
        dropout: float = 0.0,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        max_steps: Optional[int] = None,
        min_lr_ratio: float = 0.1,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if size is not None:
            if size not in GPT_SIZES:
                raise ValueError(f"Unknown GPT size={size!r}; choose one of {list(GPT_SIZES)} or pass size=None.")
            n_layer, n_head, n_embd = (GPT_SIZES[size][k] for k in ("n_layer", "n_head", "n_embd"))
        for name, value in dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                                vocab_size=vocab_size).items():
            if value < 1:
                raise ValueError(f"GPT {name} must be >= 1, got {value}.")
        if n_embd % n_head != 0:
            raise ValueError(f"GPT n_embd={n_embd} must be divisible by n_head={n_head}.")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"GPT min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")
        if warmup_steps < 0:
            raise ValueError(f"GPT warmup_steps must be >= 0, got {warmup_steps}.")
        # the resolved architecture (after applying the size preset)
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.block_size, self.vocab_size = block_size, vocab_size
        self.dropout, self.bias = dropout, bias
        self.val_loss = MeanMetric()
        self.transformer: Optional[nn.ModuleDict] = None
        self.lm_head: Optional[nn.Linear] = None

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Create the modules (idempotent: does nothing if they already exist)."""
        if self.transformer is not None:
            return
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(self.vocab_size, self.n_embd),  # token embedding
                wpe=nn.Embedding(self.block_size, self.n_embd),  # position embedding
                drop=nn.Dropout(self.dropout),
                h=nn.ModuleList(
                    [Block(self.n_embd, self.n_head, self.dropout, self.bias) for _ in range(self.n_layer)]
                ),
                ln_f=nn.LayerNorm(self.n_embd, bias=self.bias),
            )
        )
        self.lm_head = nn.Linear(self.n_embd, self.vocab_size, bias=False)
        # weight tying: the output projection re-uses the token embedding matrix
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the init of the projections into the residual stream by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def num_non_embedding_params(self) -> int:
        """Parameter count without token/position embeddings (lm_head is tied), from the config.

        Computed by :func:`count_non_embedding_params`, so it is available before
        :meth:`configure_model` and independent of sharding.
        """
        return count_non_embedding_params(self.n_layer, self.n_embd, self.bias)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """Compute next-token logits for ``idx`` of shape ``(B, T)``.

        Returns ``(logits, loss)``: ``logits`` of shape ``(B, T, vocab_size)`` and the
        mean cross-entropy against ``targets`` (shape ``(B, T)``), or ``None`` if
        ``targets`` is not given.
        """
        if self.transformer is None:
            raise RuntimeError(
                "GPT modules are not built yet: call `model.configure_model()` first "
                "(the Trainer does this automatically)."
            )
        B, T = idx.shape
        if T > self.block_size:
            raise ValueError(f"Cannot forward a sequence of length {T}: block_size is only {self.block_size}.")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after the prompt ``idx`` (shape ``(B, T)``).

        Returns a ``(B, T + max_new_tokens)`` tensor. The context is cropped to the
        last ``block_size`` tokens. Put the model in ``eval()`` mode first if it
        uses dropout.
        """
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.block_size else idx[:, -self.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :] / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    # -------------------------------------------------------------- training
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self(x, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_ppl", torch.exp(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        _, loss = self(x, y)
        self.val_loss.update(loss, weight=y.numel())

    def on_validation_epoch_end(self) -> None:
        # MeanMetric.compute() already averages over all processes (weighted by tokens)
        mean_loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val_loss", mean_loss, prog_bar=True, sync_dist=True)
        self.log("val_ppl", torch.exp(mean_loss), sync_dist=True)

    def on_fit_start(self) -> None:
        n = self.num_non_embedding_params
        rank_zero_info(
            f"GPT: {n:,} non-embedding parameters "
            f"(n_layer={self.n_layer}, n_head={self.n_head}, n_embd={self.n_embd}, vocab_size={self.vocab_size})"
        )
        for logger in self.loggers:
            logger.log_hyperparams({"num_non_embedding_params": n})

    def configure_optimizers(self):
        hp = self.hparams
        # weight decay on matrices and embeddings (dim >= 2), not on biases and LayerNorm weights
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=hp.learning_rate,
            betas=tuple(hp.betas),
        )
        max_steps = hp.max_steps
        if max_steps is None and self._trainer is not None:
            max_steps = self.trainer.estimated_stepping_batches
        lr_lambda = partial(
            warmup_cosine_lr_factor,
            warmup_steps=hp.warmup_steps,
            max_steps=max_steps,
            min_lr_ratio=hp.min_lr_ratio,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
