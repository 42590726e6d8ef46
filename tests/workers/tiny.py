"""A tiny LightningModule and dataset shared by the multi-process workers and the single-process reference."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
import lightning as L

from lightning_localsgd.engine.codecs import TopKCodec, register_codec
from lightning_localsgd.engine.schedules import Action, SyncSchedule

#: ``topk`` (SparseLoCo's codec, error-feedback decay and all-gather exchange) in chunks small enough that this file's
#: models and the tests' tensors are sparsified: per 64 values the top 4, 2-bit values, β = 0.95. Registered here so
#: that the test processes, the workers and the hand reference know the name.
TOPK_TEST = "topk_test"
register_codec(TOPK_TEST, TopKCodec(chunk=64, k=4), override=True)
#: The same codec over the two-phase exchange (the mean of each chunk re-sparsified by its owner, with its own decayed
#: residual): what ``topk`` ran before it gathered.
TOPK_TWO_PHASE = "topk_test_two_phase"
register_codec(TOPK_TWO_PHASE, TopKCodec(chunk=64, k=4, exchange="two_phase"), override=True)
#: The same codec whose gathered payloads are combined per value over the members that sent it (``aggregate=
#: "senders"``) instead of divided by the number of members.
TOPK_SENDERS = "topk_test_senders"
register_codec(TOPK_SENDERS, TopKCodec(chunk=64, k=4, aggregate="senders"), override=True)

DATASET_SIZE = 240  # divisible by 1..4 ranks × batch 2, so DistributedSampler adds no padding


def make_dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(DATASET_SIZE, 4, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(DATASET_SIZE, 1, generator=g)
    return TensorDataset(x, y)


def make_inner_optimizer(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    if kind == "momentum":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)
    raise ValueError(kind)


class TinyNet(nn.Module):
    def __init__(self, buffer: bool = False, hidden: int = 8) -> None:
        super().__init__()
        self.net1 = nn.Linear(4, hidden)
        self.net2 = nn.Linear(hidden, 1)
        self.use_buffer = buffer
        if buffer:
            self.register_buffer("running_mean", torch.zeros(4))
            self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_buffer and self.training:
            with torch.no_grad():
                self.running_mean.mul_(0.9).add_(0.1 * x.mean(0))
                self.num_batches.add_(1)
        return self.net2(torch.tanh(self.net1(x)))


class TinyModule(L.LightningModule):
    def __init__(self, inner: str = "sgd", manual: bool = False, buffer: bool = False, nan_at: int = -1,
                 group_size: int = 1, shard: str = "", hidden: int = 8, nan_from: int = -1, nan_loss_at: int = -1,
                 nan_buffer_at: int = -1, loss_scale: float = 1.0, loss_scale_group: int = 1,
                 loss_scale_from: int = 0) -> None:
        super().__init__()
        self.model = TinyNet(buffer, hidden)
        self.shard = shard
        self.inner = inner
        self.nan_at = nan_at
        self.nan_from, self.nan_loss_at, self.nan_buffer_at = nan_from, nan_loss_at, nan_buffer_at
        self.loss_scale, self.loss_scale_group = loss_scale, loss_scale_group
        self.loss_scale_from = loss_scale_from  # the scale applies from this step on
        self.group_size = group_size
        self.automatic_optimization = not manual

    def configure_model(self):
        """FSDP's convention: shard in configure_model ("group" = over the worker group, as documented;
        "world" = over all ranks, which the local-SGD FSDP strategy must refuse)."""
        if not self.shard:
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if self.shard == "group":
            mesh = self.device_mesh["shard"]
        else:
            mesh = init_device_mesh("cpu", (self.trainer.world_size,))
        fully_shard(self.model.net1, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        step, group_1 = self.trainer.global_step, self.global_rank // self.group_size == 1
        if group_1 and (step == self.nan_at or 0 <= self.nan_from <= step):
            with torch.no_grad():
                self.model.net1.weight[0, 0] = float("nan")
        if group_1 and step == self.nan_buffer_at:
            self.model.running_mean[0] = float("nan")
        loss = F.mse_loss(self(x), y)
        if group_1 and step == self.nan_loss_at:
            loss = loss * float("nan")  # NaN gradients: the inner optimizer's state (AdamW's moments) turns NaN
        if self.loss_scale != 1.0 and self.global_rank // self.group_size == self.loss_scale_group \
                and step >= self.loss_scale_from:
            loss = loss * self.loss_scale  # a broken group: its gradients, and with SGD its pseudo-gradient, scaled
        if not self.automatic_optimization:
            opt1, opt2 = self.optimizers()
            opt1.zero_grad()
            opt2.zero_grad()
            self.manual_backward(loss)
            opt1.step()
            opt2.step()
        return loss

    def configure_optimizers(self):
        if not self.automatic_optimization:
            return [make_inner_optimizer(self.inner, self.model.net1.parameters()),
                    make_inner_optimizer(self.inner, self.model.net2.parameters())]
        return make_inner_optimizer(self.inner, self.parameters())


class ValidatedTinyModule(TinyModule):
    """TinyModule with a validation loop (Lightning runs it during fit); counts the validation batches it ran."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.validation_batches = 0

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.validation_batches += 1
        self.log("val_loss", F.mse_loss(self(x), y))


class GrowingSchedule(SyncSchedule):
    """A registered schedule for the tests: the k-th interval after the warm-up is ``interval(H, k)`` local steps
    (default ``H + k``: H, H+1, H+2, ...), so its syncs fall where no built-in schedule puts them."""

    def __init__(self, sync_every: int, warmup_steps: int = 0,
                 interval: Callable[[int, int], int] = lambda h, k: h + k) -> None:
        super().__init__(sync_every, warmup_steps)
        self.interval = interval
        self.intervals_done = 0

    def _steps_in_interval(self) -> int:
        return self.interval(self.sync_every, self.intervals_done)

    def local_step(self) -> Action:
        self.steps_since_sync += 1
        if self.steps_since_sync >= self._steps_in_interval():
            self.steps_since_sync = 0
            self.intervals_done += 1
            return Action.SYNC
        return Action.NONE

    def communicates_next(self) -> bool:
        return self.in_warmup or self.steps_since_sync + 1 >= self._steps_in_interval()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "intervals_done": self.intervals_done}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.intervals_done = int(state["intervals_done"])

