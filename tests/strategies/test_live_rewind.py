"""A live rewind (``continue_at(..., live=True)``): a running epoch's loader moves back to a position, and its next
batch is the first of the replica's share from there; the epoch then ends at its end. In one process: the sampler's
jump (mid-epoch, after a partial last batch, back into the previous epoch; a federated job's extras:
test_data_departure), worker prefetch (dropped, exact), and Lightning's fit loop following the rewind (its batch
counter and its epoch's end).

The references are written by hand: epoch ``e``'s order is ``torch.randperm(n)`` of seed ``e`` (``DistributedSampler``'s
with seed 0), read in batches of the loader's size from the position."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_localsgd.data import continue_at, data_position, make_resumable
from lightning_localsgd.strategies.base import LocalSGDMixin


@pytest.fixture(autouse=True)
def seed_zero(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")


def order(n: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).tolist()


def in_batches(samples: list[int], size: int) -> list[list[int]]:
    return [samples[i:i + size] for i in range(0, len(samples), size)]


def loader(n: int, batch_size: int, **kwargs) -> DataLoader:
    return make_resumable(DataLoader(TensorDataset(torch.arange(n)), batch_size=batch_size, shuffle=True, **kwargs))


def rest(iterator) -> list[list[int]]:
    return [batch[0].tolist() for batch in iterator]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_running_epoch_moves_back_and_its_next_batch_is_the_first_after_the_position(workers):
    """Three batches read (with workers, more were prefetched from the old position: dropped); back to sample 2."""
    data = loader(10, 2, num_workers=workers)
    iterator = iter(data)
    read = [next(iterator)[0].tolist() for _ in range(3)]
    assert read == in_batches(order(10, 0), 2)[:3]
    assert continue_at(data, 0, 2) is None  # not live: a running iteration does not move
    assert continue_at(data, 0, 2, live=True) == (0, 1)
    assert data_position(data) == (0, 2)
    assert rest(iterator) == in_batches(order(10, 0)[2:], 2)
    assert data_position(data) == (0, 10)


def test_after_a_partial_last_batch_the_epoch_goes_on_from_the_position():
    """11 samples in batches of 3: the last batch (2 samples) handed out, then back to sample 6."""
    data = loader(11, 3)
    iterator = iter(data)
    assert [next(iterator)[0].tolist() for _ in range(4)] == in_batches(order(11, 0), 3)
    assert continue_at(data, 0, 6, live=True) == (0, 2)
    assert rest(iterator) == in_batches(order(11, 0)[6:], 3)


def test_back_into_the_previous_epoch_then_its_end_and_to_an_epochs_end_the_next_epochs_start():
    data = loader(10, 2)
    data.sampler.set_epoch(1)
    iterator = iter(data)
    next(iterator), next(iterator)
    assert continue_at(data, 0, 8, live=True) == (0, 4)  # the rest of epoch 0, then the iteration ends
    assert rest(iterator) == [order(10, 0)[8:10]] and data.sampler.epoch == 0
    data.sampler.set_epoch(1)
    iterator = iter(data)
    next(iterator), next(iterator), next(iterator)
    assert continue_at(data, 0, 10, live=True) == (1, 0)  # epoch 0 read to its end: epoch 1 from its start
    assert rest(iterator) == in_batches(order(10, 1), 2)


def test_two_rewinds_with_prefetch_each_drop_what_was_asked_for_before():
    data = loader(12, 2, num_workers=2, prefetch_factor=2)
    iterator = iter(data)
    next(iterator), next(iterator)
    continue_at(data, 0, 0, live=True)
    assert next(iterator)[0].tolist() == order(12, 0)[0:2]
    continue_at(data, 0, 6, live=True)
    assert rest(iterator) == in_batches(order(12, 0)[6:], 2)


class Ledger(L.Callback):
    """Records each training batch's samples; at the end of batch ``at`` (once) rewinds to ``to`` as a healed job
    does (the strategy's ``_continue_data_at``, inside ``on_train_batch_end`` where the syncs run)."""

    def __init__(self, at: int, to: tuple[int, int]) -> None:
        self.at, self.to, self.read, self.batch_idx = at, to, [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.read.append((trainer.current_epoch, batch[0].tolist()))
        self.batch_idx.append(batch_idx)
        if len(self.read) == self.at:
            host = SimpleNamespace(_training_loader=LocalSGDMixin._training_loader,
                                   local_sgd_epoch_start=lambda trainer: None)
            assert LocalSGDMixin._continue_data_at(host, trainer, *self.to)


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0].float()[:, None]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("at, to", [(4, (0, 2)), (5, (0, 4)), (7, (0, 8))])
def test_lightnings_fit_loop_follows_a_live_rewind(at, to):
    """10 samples in batches of 2, two epochs; at the end of batch ``at`` the data moves back to ``to``: the next
    batch Lightning trains on is the first after it, with its batch index, and the epoch ends at the data's end
    (batch 7: in epoch 1, back into epoch 0)."""
    ledger = Ledger(at, to)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, callbacks=[ledger])
    trainer.fit(Tiny(), make_resumable(DataLoader(TensorDataset(torch.arange(10)), batch_size=2, shuffle=True)))
    epochs = [(e, i, b) for e in (0, 1) for i, b in enumerate(in_batches(order(10, e), 2))]
    after = [(e, b) for e, _, b in epochs].index((to[0], order(10, to[0])[to[1]:to[1] + 2]))
    expected = epochs[:at] + epochs[after:]
    assert ledger.read == [(e, b) for e, _, b in expected]
    assert ledger.batch_idx == [i for _, i, _ in expected]
