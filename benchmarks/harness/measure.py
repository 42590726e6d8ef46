"""What a run measures, the same way for DDP, local SGD and DiLoCo: a Lightning callback plus a DDP comm hook.

* validation loss on a fixed held-out set (the first ``val_windows`` windows of the validation split), periodically
  (local SGD: only right after a sync, when every worker holds the same model) and at the end;
* the training clock from the first batch, evaluation time excluded;
* DDP's gradient bytes (a counting communication hook, delayed by the emulated link);
* optionally the cross-group bytes of every training step.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from .netmodel import NetworkModel

EVAL_BATCH = 32


def _batches(x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The evaluation windows in batches of :data:`EVAL_BATCH`."""
    for i in range(0, len(x), EVAL_BATCH):
        yield x[i:i + EVAL_BATCH], y[i:i + EVAL_BATCH]


def _token_losses(model: Any, xb: torch.Tensor, yb: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy of the model's next-token logits (fp32), ``reduction`` as in ``F.cross_entropy``."""
    logits, _ = model(xb)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), yb.reshape(-1), reduction=reduction)


@torch.no_grad()
def window_losses(model: Any, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Mean loss of every window (for bootstrap intervals over windows); ``model`` is left in eval mode."""
    model.eval()
    per_window: list[float] = []
    for xb, yb in _batches(x, y):
        per_window.extend(_token_losses(model, xb, yb, "none").view(-1, y.size(1)).mean(1).tolist())
    return per_window


def install_ddp_hook(ddp: torch.nn.parallel.DistributedDataParallel, stats: dict,
                     netmodel: Optional[NetworkModel], all_reduce: Callable) -> None:
    """DDP's gradient all-reduce through a hook that counts its bytes and time and adds the emulated delay."""
    world = dist.get_world_size()

    def hook(state, bucket):  # no annotations: DDP rejects any but the real (evaluated) GradBucket / Future types
        t0 = time.perf_counter()
        tensor = bucket.buffer()
        nbytes = tensor.numel() * tensor.element_size()
        stats["bytes"] += nbytes
        stats["calls"] += 1
        if netmodel is not None:
            netmodel.delay("all_reduce", nbytes, world)
        fut = all_reduce(tensor.div_(world), async_op=True).get_future()

        def done(f: torch.futures.Future) -> torch.Tensor:
            stats["comm_seconds"] += time.perf_counter() - t0
            return f.value()[0]

        return fut.then(done)

    ddp.register_comm_hook(None, hook)


class Measure(Callback):
    """Periodic validation on the fixed held-out windows, training clock without evaluation time, DDP bytes.

    ``counter``: the byte counter of :func:`~harness.netmodel.install_network_model`; ``all_reduce``: the original
    (uncounted, undelayed) collective, for the evaluation's own reduction.
    """

    def __init__(self, cfg: dict, counter: dict, netmodel: Optional[NetworkModel], all_reduce: Callable) -> None:
        self.cfg, self.counter, self.netmodel, self.all_reduce = cfg, counter, netmodel, all_reduce
        self.local = cfg["mode"] != "ddp"
        self.curve: list[dict] = []
        self.eval_seconds = 0.0
        self.t_start: Optional[float] = None
        self.train_seconds = 0.0
        self.ddp = {"bytes": 0, "calls": 0, "comm_seconds": 0.0}
        self.stopped_at_target = False
        self.step_bytes: list[int] = []  # cross-group bytes of each training step (cfg["step_bytes"])
        self.train_end_bytes = 0
        self._bytes_mark = 0
        self._windows: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def cross_bytes_now(self) -> int:
        """Cross-group bytes so far: the Python collectives plus DDP's gradient buckets."""
        return self.counter.get("bytes", 0) + self.ddp["bytes"]

    def tokens(self, trainer: Any, step: int) -> int:
        """Tokens all ranks have trained on after ``step`` steps."""
        return step * self.cfg["batch_size"] * self.cfg["block_size"] * trainer.world_size

    # -- evaluation
    def windows(self, trainer: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out windows (inputs, targets), read once."""
        if self._windows is None:
            ds = trainer.datamodule.val_dataset
            n = min(self.cfg["val_windows"], len(ds))
            xs, ys = zip(*(ds[i] for i in range(n)))
            self._windows = torch.stack(xs), torch.stack(ys)
        return self._windows

    @torch.no_grad()
    def evaluate(self, trainer: Any, pl_module: Any) -> float:
        """Mean held-out loss; the windows are split over the ranks and the sums all-reduced (not counted)."""
        t0 = time.perf_counter()
        x, y = self.windows(trainer)
        rank, world = trainer.global_rank, trainer.world_size
        x, y = x[rank::world].to(pl_module.device), y[rank::world].to(pl_module.device)
        was_training = pl_module.training
        pl_module.eval()
        total = torch.zeros(2, dtype=torch.float64, device=pl_module.device)
        for xb, yb in _batches(x, y):
            total[0] += _token_losses(pl_module, xb, yb, "sum").double()
            total[1] += yb.numel()
        pl_module.train(was_training)
        if world > 1:
            self.all_reduce(total)
        self.eval_seconds += time.perf_counter() - t0
        return float(total[0] / total[1])

    def train_clock(self) -> float:
        """Training seconds so far, evaluation excluded."""
        return 0.0 if self.t_start is None else time.perf_counter() - self.t_start - self.eval_seconds

    def record(self, trainer: Any, pl_module: Any) -> float:
        """Evaluate now and append the point to the curve."""
        step = trainer.global_step
        train_s = self.train_clock()
        loss = self.evaluate(trainer, pl_module)
        self.curve.append(dict(step=step, tokens=self.tokens(trainer, step), train_seconds=train_s, val_loss=loss))
        return loss

    # -- hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if isinstance(trainer.strategy.model, torch.nn.parallel.DistributedDataParallel):
            install_ddp_hook(trainer.strategy.model, self.ddp, self.netmodel, self.all_reduce)
            # Lightning (>= 2.5) broadcasts a SIGTERM flag from rank 0 before every batch. Local SGD keeps it off
            # the cross-group links; for the DDP baseline we drop it too, so DDP pays exactly one collective
            # (the gradient all-reduce) per step: the comparison does not profit from this Lightning detail.
            trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.counter.clear()  # count only the collectives of training (not those of Lightning's setup)
        if self.netmodel is not None:
            self.netmodel.slept = 0.0
        self.record(trainer, pl_module)
        self.t_start = time.perf_counter()
        self.eval_seconds = 0.0
        self._bytes_mark = self.cross_bytes_now()  # the evaluation's own all-reduce is not counted anyway

    def _take_bytes(self) -> int:
        """Cross-group bytes since the last call."""
        now = self.cross_bytes_now()
        taken, self._bytes_mark = now - self._bytes_mark, now
        return taken

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.cfg.get("step_bytes"):  # the strategy's sync ran before (its callback comes first)
            self.step_bytes.append(self._take_bytes())
        every, step = self.cfg["eval_every"], trainer.global_step
        if not every or step % every:
            return
        if self.local and trainer.strategy.schedule.steps_since_sync != 0:
            return  # between syncs the workers hold different models
        loss = self.record(trainer, pl_module)
        target = self.cfg.get("stop_at_loss")
        if target is not None and loss <= target:
            self.stopped_at_target = True
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.train_seconds = self.train_clock()
        if self.cfg.get("step_bytes"):  # the train-end sync ran before (the strategy's callback comes first)
            self.train_end_bytes = self._take_bytes()
