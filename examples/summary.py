"""A table at the end of ``fit``: final validation loss, communication of local SGD versus DDP, throughput, a sample.

:class:`TrainingSummary` is a Lightning callback. At the end of ``fit`` it prints on global rank 0 a rich table with

* the final validation loss and perplexity (of the final model: if the last validation ran before the last step or
  before the last local-SGD sync, it evaluates the validation set once more),
* the number of local-SGD syncs, the bytes each rank sent across worker groups, what DDP would have all-reduced per
  rank for the same optimizer steps (``strategy.ddp_bytes_per_step * steps``), and their ratio,
* wall time, tokens processed by all ranks, non-embedding parameters,

followed by a text sample from ``model.generate``. Entries that do not apply (plain DDP, a single device, a model
without ``generate``) read ``n/a``. The numbers are also kept in :attr:`TrainingSummary.stats` and written to
``summary.json`` in the trainer's log directory.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from rich import box, get_console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from lightning_localsgd._compat import stop_live_progress_bar
from lightning_localsgd.engine.presets import outer_optimizer_name

from .gpt import decode_bytes, encode_bytes

__all__ = ["TrainingSummary", "format_bytes"]

NA = "n/a"


def format_bytes(n: Optional[float]) -> str:
    """``1234567 -> '1.23 MB'`` (decimal units), ``None -> 'n/a'``."""
    if n is None:
        return NA
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return NA  # unreachable


def _format_seconds(s: float) -> str:
    m, sec = divmod(s, 60)
    return f"{int(m)} min {sec:.1f} s" if m else f"{sec:.1f} s"


class TrainingSummary(Callback):
    """Print a summary table and a generated sample at the end of ``fit`` (global rank 0).

    Args:
        sample_tokens: number of tokens to generate for the sample; 0 disables the sample.
        prompt: text the sample starts from.
        temperature: sampling temperature.
        top_k: sample among the ``top_k`` most likely tokens (``None``: all).
        final_validation: when the last validation does not reflect the final model (it ran before the last step or
            before the last sync), evaluate the validation set again for the table. ``False``: show the last logged
            ``val_loss`` and its step.
    """

    def __init__(
        self,
        sample_tokens: int = 300,
        prompt: str = "def ",
        temperature: float = 0.8,
        top_k: Optional[int] = 40,
        final_validation: bool = True,
    ) -> None:
        self.sample_tokens = sample_tokens
        self.prompt = prompt
        self.temperature = temperature
        self.top_k = top_k
        self.final_validation = final_validation
        self.stats: dict[str, Any] = {}
        self.sample: Optional[str] = None
        self._start = 0.0
        self._tokens = 0
        self._val: Optional[tuple[float, int, int]] = None  # (loss, global_step, syncs) of the last validation

    # ------------------------------------------------------------------ bookkeeping
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()
        self._tokens = 0
        self._val = None
        self.stats = {}
        self.sample = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(x, torch.Tensor):
            self._tokens += x.numel()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get("val_loss")
        if loss is not None:
            self._val = (float(loss), trainer.global_step, _num_syncs(trainer))

    # ------------------------------------------------------------------ end of fit
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        wall = time.perf_counter() - self._start
        # collectives first, on every rank
        count = torch.tensor(float(self._tokens), device=trainer.strategy.root_device)
        tokens = int(trainer.strategy.reduce(count, reduce_op="sum").item())
        val_loss, val_step = self._final_val_loss(trainer, pl_module)
        log_dir = trainer.log_dir  # a broadcast under DDP
        if not trainer.is_global_zero:
            return
        self.stats = self._collect(trainer, pl_module, wall, tokens, val_loss, val_step)
        if self.sample_tokens > 0:
            self.sample = self._generate(trainer, pl_module)
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            with open(os.path.join(log_dir, "summary.json"), "w") as f:
                json.dump({**self.stats, "sample": self.sample}, f, indent=2)
        stop_live_progress_bar(trainer.progress_bar_callback)  # RichProgressBar: the table prints below it
        console = get_console()
        console.print(self._table())
        if self.sample is not None:
            console.print(Panel(Text(_printable(self.sample)), expand=False, title_align="left",
                                title=Text(f"sample: {self.sample_tokens} tokens after {self.prompt!r}")))

    def _final_val_loss(self, trainer: Trainer, pl_module: LightningModule) -> tuple[Optional[float], Optional[int]]:
        fresh = self._val is not None and self._val[1] == trainer.global_step and self._val[2] == _num_syncs(trainer)
        if fresh or not self.final_validation:
            return (self._val[0], self._val[1]) if self._val is not None else (None, None)
        loss = self._evaluate(trainer, pl_module)
        if loss is None:
            return (self._val[0], self._val[1]) if self._val is not None else (None, None)
        return loss, trainer.global_step

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> Optional[float]:
        """Token-weighted mean loss of ``model(x, y) -> (logits, loss)`` on the validation loader, all ranks."""
        loader = trainer.val_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if loader is None and trainer.datamodule is not None and hasattr(trainer.datamodule, "val_dataloader"):
            loader = trainer.datamodule.val_dataloader()
        if loader is None or not hasattr(pl_module, "generate"):  # only models with the GPT forward signature
            return None
        limit = trainer.num_val_batches[0] if trainer.num_val_batches else trainer.limit_val_batches
        if isinstance(limit, float):  # a fraction (1.0 = all) of the loader
            limit = math.ceil(limit * len(loader)) if limit < 1.0 else float("inf")
        device = trainer.strategy.root_device
        previous_device, was_training = pl_module.device, pl_module.training
        pl_module.to(device).eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for i, (x, y) in enumerate(loader):
                if i >= limit:
                    break
                _, loss = pl_module(x.to(device), y.to(device))
                total[0] += float(loss) * y.numel()
                total[1] += y.numel()
        pl_module.to(previous_device).train(was_training)
        total = trainer.strategy.reduce(total, reduce_op="sum")
        return float(total[0] / total[1]) if total[1] > 0 else None

    def _collect(self, trainer: Trainer, pl_module: LightningModule, wall: float, tokens: int,
                 val_loss: Optional[float], val_step: Optional[int]) -> dict[str, Any]:
        strategy = trainer.strategy
        steps = trainer.global_step
        outer = getattr(strategy, "outer_sync", None)
        param_bytes = getattr(strategy, "ddp_bytes_per_step", None) if outer is not None else None
        if param_bytes is None:
            param_bytes = sum(p.numel() * p.element_size() for p in pl_module.parameters() if p.requires_grad)
        ddp_bytes = param_bytes * steps if trainer.world_size > 1 else None
        sent = outer.bytes_sent if outer is not None else None
        non_embedding = getattr(pl_module, "num_non_embedding_params", None)
        return {
            "strategy": _describe_strategy(trainer),
            "world_size": trainer.world_size,
            "optimizer_steps": steps,
            "val_loss": val_loss,
            "val_loss_step": val_step,
            "val_ppl": math.exp(val_loss) if val_loss is not None and val_loss < 700 else None,
            "num_syncs": outer.num_syncs if outer is not None else None,
            "sync_seconds": getattr(strategy, "sync_seconds_total", None) if outer is not None else None,
            "bytes_sent_per_rank": sent,
            "ddp_bytes_per_rank": ddp_bytes,
            "bytes_ratio": ddp_bytes / sent if sent and ddp_bytes else None,
            "wall_seconds": wall,
            "tokens": tokens,
            "tokens_per_second": tokens / wall if wall > 0 else None,
            "non_embedding_params": non_embedding,
            "params": sum(p.numel() for p in pl_module.parameters()),
        }

    def _table(self) -> Table:
        s = self.stats
        table = Table(title="Training summary", box=box.ROUNDED, show_header=False, title_justify="left")
        table.add_column(style="bold cyan")
        table.add_column(justify="right")
        table.add_row("strategy", s["strategy"])
        val = NA if s["val_loss"] is None else f"{s['val_loss']:.4f}"
        table.add_row(f"final val loss (step {s['val_loss_step']})" if s["val_loss"] is not None else "final val loss",
                      val)
        table.add_row("val perplexity", NA if s["val_ppl"] is None else f"{s['val_ppl']:.2f}")
        table.add_row("optimizer steps", f"{s['optimizer_steps']:,}")
        table.add_row("local-SGD syncs", NA if s["num_syncs"] is None else f"{s['num_syncs']:,}")
        table.add_row("bytes sent across groups / rank", format_bytes(s["bytes_sent_per_rank"]))
        table.add_row("DDP all-reduce bytes / rank", format_bytes(s["ddp_bytes_per_rank"]))
        ratio = s["bytes_ratio"]
        table.add_row("communication saved", NA if ratio is None else f"{ratio:.1f}x fewer bytes")
        if s["sync_seconds"] is not None:
            table.add_row("time in syncs", _format_seconds(s["sync_seconds"]))
        table.add_row("wall time (fit)", _format_seconds(s["wall_seconds"]))
        tps = s["tokens_per_second"]
        table.add_row("tokens processed", f"{s['tokens']:,}" + ("" if tps is None else f" ({tps:,.0f}/s)"))
        n = s["non_embedding_params"]
        table.add_row("non-embedding params", NA if n is None else f"{n:,}")
        return table

    def _generate(self, trainer: Trainer, pl_module: LightningModule) -> Optional[str]:
        if not hasattr(pl_module, "generate"):
            return None
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        device = trainer.strategy.root_device
        if tokenizer is not None:
            ids = torch.tensor([tokenizer.encode(self.prompt, add_special_tokens=False) or [0]], dtype=torch.long)
        else:
            ids = encode_bytes(self.prompt)[None] if self.prompt else torch.zeros(1, 1, dtype=torch.long)
        previous_device, was_training = pl_module.device, pl_module.training
        pl_module.to(device).eval()
        try:
            out = pl_module.generate(ids.to(device), self.sample_tokens, temperature=self.temperature,
                                     top_k=self.top_k)[0].cpu()
        finally:
            pl_module.to(previous_device).train(was_training)
        return tokenizer.decode(out.tolist()) if tokenizer is not None else decode_bytes(out)


def _printable(text: str) -> str:
    """Replace control characters (a barely trained model emits any byte) so they cannot garble the terminal."""
    return "".join(c if c.isprintable() or c in "\n\t" else "\ufffd" for c in text)


def _num_syncs(trainer: Trainer) -> int:
    outer = getattr(trainer.strategy, "outer_sync", None)
    return outer.num_syncs if outer is not None else 0


def _describe_strategy(trainer: Trainer) -> str:
    strategy = trainer.strategy
    name = type(strategy).__name__
    if getattr(strategy, "outer_sync", None) is not None or hasattr(strategy, "sync_every"):
        topology = getattr(strategy, "topology", None)
        groups = topology.num_groups if topology is not None else trainer.world_size // strategy.group_size
        outer = outer_optimizer_name(strategy.outer_optimizer, arguments=False)
        return f"{name} ({groups} groups x {strategy.group_size}, H={strategy.sync_every}, {outer})"
    return f"{name} ({trainer.world_size} process{'es' if trainer.world_size > 1 else ''})"
