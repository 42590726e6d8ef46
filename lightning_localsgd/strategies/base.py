"""The Lightning glue every local-SGD strategy shares: the step-end callback, the controller's hooks, logging.

A strategy mixes :class:`LocalSGDMixin` in front of a Lightning strategy (``class X(LocalSGDMixin, DDPStrategy)``),
decorates itself with :func:`~lightning_localsgd.config.local_sgd_arguments` and says which tensors to sync
(:meth:`LocalSGDMixin.local_sgd_tensors`) over which process groups. The algorithm lives in
:class:`~lightning_localsgd.controller.LocalSGDController` and :mod:`lightning_localsgd.engine`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import fields
from datetime import timedelta
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor

from .._compat import (attached_trainer, epoch_batches_done, fit_loop_can_stop_early, is_max_limit_reached,
                       recount_epoch_batches, rewind_epoch_fetcher)
from ..async_checkpoint import AsyncCheckpointWriter
from ..config import LocalSGDConfig
from ..controller import LocalSGDController
from ..data import continue_at, data_position, make_resumable
from ..engine import OuterSync, SyncResult, SyncSchedule
from ..preemption import SigtermStop, stop_at_sync_steps
from ..state import ReplicaState, TrainingState, set_data_counters
from ..reliability import stop_local_ranks
from ..syncs import HostFacts
from ..tensors import batch_tokens
from ..topology import (Topology, add_cluster_groups, check_cluster_size, check_group_size, federated_cluster_size,
                        federated_group_size, job_cluster_groups, keep_process_groups_at_exit)

__all__ = ["LocalSGDMixin", "is_fitting", "training_ends_here"]

log = logging.getLogger(__name__)


def is_fitting(trainer: Optional[Trainer]) -> bool:
    return trainer is not None and trainer.state.fn == TrainerFn.FITTING


class _SyncAtStepEnd(Callback):
    """Runs the strategy's step-end logic before any user callback (so checkpoints see the synced state)."""

    def __init__(self, strategy: "LocalSGDMixin") -> None:
        self.strategy = strategy

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.strategy.local_sgd.train_start()  # across jobs: join the running ones (heal from one) before a step

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.strategy.local_sgd_epoch_start(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.strategy.local_sgd_step_start()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.strategy.local_sgd_step_end(batch)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Runs before every other callback's and the LightningModule's on_train_end, so they see the synced model
        # (a no-op when _SyncBeforeLastCheckpoint already ran it).
        self.strategy.local_sgd_train_end(trainer)


def training_ends_here(trainer: Trainer) -> bool:
    """Whether the fit loop stops once the hook running now returns (the fit loop's own stop conditions).

    Read in ``on_train_batch_end``, ``on_validation_end`` or ``on_train_epoch_end``: ``max_steps`` reached, the last
    batch of the last epoch (``max_epochs``), or ``trainer.should_stop`` set (``EarlyStopping``, a ``Timer``, the
    module) with ``min_steps`` / ``min_epochs`` met. The same on every rank: ``EarlyStopping`` reduces its decision.
    """
    if trainer.sanity_checking:
        return False
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    if is_max_limit_reached(epoch_loop.global_step, fit_loop.max_steps):
        return True
    if trainer.should_stop and fit_loop_can_stop_early(fit_loop):
        return True
    progress = fit_loop.epoch_progress.current
    # at the last batch of an epoch the epoch counts as done; at on_train_epoch_end `processed` already counts it
    epochs = progress.started if epoch_batches_done(epoch_loop) else progress.processed
    return is_max_limit_reached(epochs, fit_loop.max_epochs if fit_loop.max_epochs is not None else -1)


class _SyncBeforeLastCheckpoint(Callback):
    """Runs the train-end sync as soon as training is known to end, right before the checkpoint callbacks.

    Inserted just before the first checkpoint callback (Lightning keeps those last), so it runs after the callbacks
    that decide to stop (``EarlyStopping`` in ``on_validation_end`` / ``on_train_epoch_end``) and before any checkpoint
    is written at the last step or epoch: the last checkpoint a ``fit`` writes holds the model ``fit`` returns, with
    the counters of a finished interval, so a resume from it continues from that model.
    """

    def __init__(self, strategy: "LocalSGDMixin") -> None:
        self.strategy = strategy

    def _sync_if_ending(self, trainer: Trainer) -> None:
        if training_ends_here(trainer):
            self.strategy.local_sgd_train_end(trainer)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._sync_if_ending(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync_if_ending(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync_if_ending(trainer)


def one_group_message(world_size: int, group_size: int) -> str:
    """The warning for a run whose ranks form a single worker group: it trains, but no local SGD happens."""
    if world_size == 1:
        return ("local SGD on a single rank: there is one worker and no other to synchronize with, so this is plain "
                "single-process training. Use devices (and/or num_nodes) >= 2.")
    smaller = max((d for d in range(1, world_size) if world_size % d == 0), default=1)
    return (f"local SGD: group_size={group_size} puts all {world_size} ranks into one worker group, so there is no "
            "other group to synchronize with: every step is plain data parallelism (DDP / FSDP / ZeRO) inside the "
            f"group and no local SGD happens. Pass group_size={smaller} ({world_size // smaller} worker groups) or "
            f"another divisor of {world_size} below {world_size}. The FSDP and DeepSpeed strategies (and their "
            "registered names, e.g. 'local_sgd_fsdp') default group_size to the devices per node, which on one "
            "machine is every rank.")


def check_world_size(world_size: int, group_size: int, cluster_size: Optional[int], lighthouse: Optional[str]) -> None:
    """Fail before any process starts when ``group_size`` / ``cluster_size`` cannot split the ranks."""
    check_group_size(world_size, group_size)
    if cluster_size is not None:
        check_cluster_size(world_size // group_size, cluster_size)
    if world_size == group_size and lighthouse is None:
        rank_zero_warn(one_group_message(world_size, group_size), category=UserWarning)


def launch_sizes(config: LocalSGDConfig, world_size: int, devices_per_node: int) -> tuple[int, Optional[int]]:
    """``(group_size, cluster_size)`` once the launcher knows the world size, checked before any process starts.

    ``group_size=None`` (FSDP, DeepSpeed) is the devices per node. Federated with one level, the job's own world is
    the worker group; with two levels the job is the cluster (its groups sync inside it, the jobs through torchft).
    """
    group_size, cluster_size = config.group_size, config.cluster_size
    if config.lighthouse is not None and config.cluster_sync_every is None:
        group_size = federated_group_size(group_size, world_size)
    if group_size is None:
        group_size = devices_per_node
    if config.lighthouse is not None and config.cluster_sync_every is not None:
        cluster_size = federated_cluster_size(group_size, world_size, config.cluster_sync_every)
    check_world_size(world_size, group_size, cluster_size, config.lighthouse)
    return group_size, cluster_size


def add_cluster_groups_for(topology: Topology, cluster_size: int, federated: bool,
                           timeout: Optional[timedelta]) -> None:
    """Two-stage sync: the level-1 and level-2 process groups. Federated, the job is the cluster and level 2 is
    torchft's communicator (set when the controller starts its syncs across jobs)."""
    if federated:
        job_cluster_groups(topology)
    else:
        add_cluster_groups(topology, cluster_size, timeout)


def check_time_based_trainer(trainer: Trainer) -> None:
    """Time-based sync with several worker groups in one world: they run different numbers of steps, so nothing may
    be collective over that world between syncs. (A federated job of one worker group is its own world: its
    collectives pair up with nobody else's.)"""
    problems = []
    if trainer.checkpoint_callbacks:
        problems.append("checkpoint callbacks (ModelCheckpoint; pass Trainer(enable_checkpointing=False) and call "
                        "trainer.save_checkpoint after fit)")
    if trainer.early_stopping_callback is not None:
        problems.append("EarlyStopping callbacks")
    if is_overridden("validation_step", trainer.lightning_module) and trainer.limit_val_batches != 0:
        problems.append("validation during fit (pass Trainer(limit_val_batches=0) and call trainer.validate "
                        "after fit)")
    if problems:
        raise ValueError(
            "sync_every_seconds: worker groups run different numbers of steps between syncs, so collectives "
            "that Lightning runs at step or epoch counts would pair up wrongly across groups. Remove: "
            + "; ".join(problems) + "."
        )


def insert_callbacks(trainer: Trainer, strategy: "LocalSGDMixin") -> list[Callback]:
    """Put the step-end callback first and the train-end sync right before the first checkpoint callback."""
    last = _SyncBeforeLastCheckpoint(strategy)
    at = next((i for i, c in enumerate(trainer.callbacks) if isinstance(c, Checkpoint)), len(trainer.callbacks))
    trainer.callbacks.insert(at, last)
    first = _SyncAtStepEnd(strategy)
    trainer.callbacks.insert(0, first)
    return [first, last]


def writer_timeout(sync_timeout: Optional[float], process_group_timeout: Optional[timedelta]) -> Optional[timedelta]:
    """How long a background checkpoint write may take: ``sync_timeout``, else the process groups' timeout."""
    return timedelta(seconds=sync_timeout) if sync_timeout is not None else process_group_timeout


def log_sync(trainer: Trainer, controller: LocalSGDController, result: SyncResult,
             cluster_result: Optional[SyncResult] = None) -> None:
    """Log a sync's metrics (``local_sgd/...``) to the trainer's loggers, on global rank 0."""
    if trainer.global_rank != 0 or not trainer.loggers:
        return
    assert controller.outer_sync is not None
    metrics = {
        "local_sgd/syncs": float(controller.outer_sync.num_syncs),
        "local_sgd/bytes_sent": float(controller.bytes_sent),
        "local_sgd/sync_seconds": result.seconds,
        "local_sgd/pseudo_grad_norm": result.pseudo_grad_norm,
        "local_sgd/skipped": float(result.skipped),
    }
    if controller.outer_sync.screen is not None:
        metrics["local_sgd/screened_out"] = float(len(result.screened_out))
    if result.fragment is not None:
        metrics["local_sgd/fragment"] = float(result.fragment)
    if cluster_result is not None and controller.cluster_sync is not None:
        metrics["local_sgd/cluster_syncs"] = float(controller.cluster_sync.num_syncs)
        metrics["local_sgd/cluster_pseudo_grad_norm"] = cluster_result.pseudo_grad_norm
        if controller.cluster_sync.screen is not None:
            metrics["local_sgd/cluster_screened_out"] = float(len(cluster_result.screened_out))
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def save_again_at_this_step(strategy: "LocalSGDMixin", trainer: Trainer, saves: list[tuple[str, int, bool]]) -> None:
    """After the train-end sync: write again every checkpoint of ``saves`` (path, step, weights only) taken at this
    step before the sync, so every checkpoint of the last step holds the model ``fit`` returns. Collective."""
    stale = dict.fromkeys((path, weights_only) for path, step, weights_only in saves if step == trainer.global_step)
    if stale and strategy._async_writer is not None:
        strategy._async_writer.wait()  # a save_top_k removal deferred behind a background write happens first
    for path, weights_only in stale:
        if strategy.broadcast(os.path.exists(path)):  # type: ignore[attr-defined]  # not one top-k removed since
            trainer.save_checkpoint(path, weights_only=weights_only)


def remove_callbacks(trainer: Optional[Trainer], callbacks: list[Callback]) -> None:
    """Take the strategy's own callbacks out of ``trainer`` again."""
    for callback in callbacks:
        if trainer is not None and callback in trainer.callbacks:
            trainer.callbacks.remove(callback)


def raise_unless_handling_another(error: BaseException) -> None:
    """Raise ``error`` (a failed background write), or only log it while another error propagates."""
    if sys.exc_info()[1] is None:
        raise error
    log.error(f"{error} (while handling another error: {sys.exc_info()[1]!r})")  # that one propagates


class LocalSGDMixin:
    """Local-SGD behaviour for a Lightning strategy. Put it first in the bases: ``class X(LocalSGDMixin, DDPStrategy)``.

    Every local-SGD argument is an attribute (``strategy.sync_every``, ...), read from :attr:`local_sgd`'s config.
    """

    local_sgd: LocalSGDController
    topology: Optional[Topology] = None

    #: The ranks of a worker group hold different shards of one replica (FSDP, ZeRO), not identical replicas (DDP).
    shards_within_group = False
    #: What one rank's exact training state is for this strategy kind (checkpoints and healing).
    training_state_class: type[TrainingState] = ReplicaState

    def _init_local_sgd(self, config: LocalSGDConfig) -> None:
        # the strategy is the controller's host (SyncHost); the controller picks how its syncs travel (one world, or
        # jobs meeting through a lighthouse) and alone talks to that transport
        self.local_sgd = LocalSGDController(config, host=self)
        self.topology = None
        self._stepped_this_batch = False
        self._starts_step = True  # the next batch is the first micro-batch of an optimizer step
        self._callbacks: list[Callback] = []
        self._train_ended = False
        self._saves: list[tuple[str, int, bool]] = []  # (path, global step, weights only) of this fit's checkpoints
        self._sigterm: Optional[SigtermStop] = None  # the SIGTERM handling of this fit (more than one group)
        self._async_writer: Optional[AsyncCheckpointWriter] = None  # async_save: created at the first save

    @property
    def training_state(self) -> TrainingState:
        """This rank's exact training state, as checkpoints and federated healing read and restore it."""
        return self.training_state_class(self)

    # what the controller holds (outer_sync, cluster_sync, schedule, last_sync, ...): read-only properties, set below
    outer_sync: Optional[OuterSync]
    cluster_sync: Optional[OuterSync]
    schedule: SyncSchedule
    last_sync: Optional[SyncResult]
    sync_seconds_total: float
    bytes_sent: int

    @property
    def ddp_bytes_per_step(self) -> int:
        """Bytes DDP would all-reduce per optimizer step on each rank: the gradients of the full model (a ZeRO-3
        parameter's full size is its ``ds_numel``)."""
        return sum(getattr(p, "ds_numel", p.numel()) * p.element_size()
                   for p in self.lightning_module.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ hooks for the concrete strategy
    def local_sgd_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        """(parameters, buffers) this rank syncs. Default: the module's trainable parameters and float buffers."""
        module = self.lightning_module
        params = [p for p in module.parameters() if p.requires_grad]
        buffers = [b for b in module.buffers() if torch.is_floating_point(b)]
        return params, buffers

    def local_sgd_slice_group(self) -> Optional[dist.ProcessGroup]:
        """Process group whose ranks hold identical replicas and split the sync in slices (DDP inside a group)."""
        return None

    def local_sgd_sharding_group(self) -> Optional[dist.ProcessGroup]:
        """Process group whose ranks hold the other shards of one replica (FSDP or ZeRO inside a group), or None."""
        return self.topology.inner_group if self.shards_within_group and self.topology is not None else None

    def local_sgd_fragment_sizes(self) -> Optional[list[int]]:
        """Sizes to balance streaming fragments by (None: the synced tensors' own sizes)."""
        return None

    def before_local_sgd_sync(self) -> None:
        """Called before any sync reads the tensors (FSDP / DeepSpeed refresh their views of the shards here)."""

    def after_local_sgd_sync(self) -> None:
        """Called after a sync wrote the tensors (DeepSpeed refreshes the module's parameters from them)."""

    def reset_inner_optimizers(self) -> None:
        """After a skipped sync on a group whose values were not finite: forget the inner optimizers' state (AdamW's
        moments, momentum buffers), which the NaN reached; they start afresh from ``θ_g`` as at the first step."""
        for optimizer in self.optimizers:  # type: ignore[attr-defined]
            optimizer.state.clear()

    # ------------------------------------------------------------------ the rest of the controller's host (SyncHost)
    def on_local_sgd_sync(self, result: SyncResult, cluster_result: Optional[SyncResult]) -> None:
        """A sync was applied: log it (``local_sgd/...`` metrics, rank 0)."""
        log_sync(self.lightning_module.trainer, self.local_sgd, result, cluster_result)

    def stop_training(self) -> None:
        """Another group finished training (time-based sync): stop after this step too."""
        self.lightning_module.trainer.should_stop = True

    def wants_to_stop(self) -> bool:
        """Whether a SIGTERM arrived on this rank (fed by :mod:`~lightning_localsgd.preemption`'s handler)."""
        return self._sigterm is not None and self._sigterm.received

    # ------------------------------------------------------------------ setup
    def _configure_launcher(self) -> None:
        # The world size is known here, before the processes start: fail early on a bad group_size.
        self.group_size, self.cluster_size = launch_sizes(
            self.local_sgd.config, self.num_nodes * self.num_processes, self.num_processes)  # type: ignore[attr-defined]
        super()._configure_launcher()  # type: ignore[misc]

    def _resolve_group_size(self) -> None:
        """``group_size=None`` (FSDP, DeepSpeed): the devices per node, once the launcher knows them."""
        if self.group_size is None:
            self.group_size = self.num_processes  # type: ignore[attr-defined]

    def _add_cluster_groups(self) -> None:
        """Two-stage sync: create the level-1 and level-2 process groups (collective, right after the topology).
        Federated: the job is the cluster; level 2 is torchft's communicator (set in :meth:`setup_local_sgd`)."""
        if self.cluster_size is not None and self.topology is not None:
            add_cluster_groups_for(self.topology, self.cluster_size, self.local_sgd.config.lighthouse is not None,
                                   getattr(self, "_timeout", None))

    def setup_local_sgd(self, trainer: Trainer) -> None:
        """Build the engines, hook the step end into the trainer, check the trainer for time-based sync."""
        assert self.topology is not None
        params, buffers = self.local_sgd_tensors()
        controller = self.local_sgd
        controller.setup(self.topology, params, buffers, slice_group=self.local_sgd_slice_group(),
                         sharding_group=self.local_sgd_sharding_group(), fragment_sizes=self.local_sgd_fragment_sizes(),
                         fallback_timeout=getattr(self, "_timeout", None), host_facts=self._host_facts(trainer))
        if not controller.schedule.lockstep and self.topology.num_groups > 1:
            # groups stepping apart share this world (a federated job of one group: its collectives stay inside it)
            check_time_based_trainer(trainer)
        self._train_ended = False
        self._starts_step = True
        self._saves = []
        self._callbacks = insert_callbacks(trainer, self)
        if self.topology.num_groups > 1:  # SIGTERM: every rank stops at one step, no collective in the handler
            self._sigterm = stop_at_sync_steps(trainer, self.local_sgd)
        rank_zero_info(controller.config.describe(self.topology.num_groups))

    def _host_facts(self, trainer: Trainer) -> HostFacts:
        """What a transport across jobs needs of this rank: its place, its exact state, where it starts from."""
        return HostFacts(rank=trainer.global_rank, world_size=trainer.world_size,
                         training_state=lambda: self.training_state, global_step=lambda: trainer.global_step,
                         checkpoint_path=lambda: getattr(trainer, "ckpt_path", None),
                         data_position=lambda: data_position(self._training_loader(trainer)),
                         continue_data_at=lambda epoch, samples: self._continue_data_at(trainer, epoch, samples))

    # ------------------------------------------------------------------ data
    def process_dataloader(self, dataloader: object) -> object:
        """The training loader of ``fit`` continues mid-epoch on resume: a map-style dataset's loader becomes a
        :class:`~lightning_localsgd.data.ResumableDataLoader` with a :class:`~lightning_localsgd.data.ResumableSampler`
        in place of the ``DistributedSampler`` Lightning injected (same shares and seed); see
        :mod:`lightning_localsgd.data`."""
        dataloader = super().process_dataloader(dataloader)  # type: ignore[misc]
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None  # type: ignore[attr-defined]
        if is_fitting(trainer) and trainer.training:
            c = self.local_sgd.config
            dataloader = make_resumable(dataloader, None if c.data_jobs is None else (c.data_job_index, c.data_jobs),
                                        getattr(self.local_sgd.syncs, "data_shares", None))
        return dataloader

    def local_sgd_epoch_start(self, trainer: Trainer) -> None:
        """An epoch starts: its length in batches is the loader's now (a federated job reading a departed job's
        data after its own share reads more batches in that epoch; Lightning counts an epoch's batches once)."""
        sampler = getattr(self._training_loader(trainer), "sampler", None)
        if getattr(sampler, "shares", None) is not None and sampler.shares.departures:
            recount_epoch_batches(trainer)

    @staticmethod
    def _training_loader(trainer: Trainer) -> Any:
        """The training loader of ``fit`` (the first, with several)."""
        loaders = trainer.train_dataloader
        if isinstance(loaders, Mapping):
            loaders = next(iter(loaders.values()), None)
        elif isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        return loaders

    def _continue_data_at(self, trainer: Trainer, epoch: int, samples: int) -> bool:
        """The next training batch continues the data at ``(epoch, samples)``, Lightning's epoch and batch counters
        with it (so its epoch ends where the loader's does): healing takes the job's last committed position. Inside
        a running epoch too (a live job that healed with its work dropped: a live rewind,
        :func:`~lightning_localsgd.data.continue_at`)."""
        loader = self._training_loader(trainer)
        if data_position(loader) is None:
            return False
        running = loader._iterating
        if running and getattr(loader, "in_order", True) is False:
            rank_zero_warn("local SGD: the training loader has in_order=False: batches its workers prefetched before "
                           "a live rewind may come after the rewound ones, so the rewind is not exact (a sample may be "
                           "read twice or not at all); keep in_order=True for exactly-once data", category=UserWarning)
        moved = continue_at(loader, epoch, samples, live=True)
        if moved is None:
            return False
        set_data_counters(trainer, *moved)
        if running:  # the running epoch's fetcher counts from the moved counter; its length may be another epoch's
            recount_epoch_batches(trainer)
            rewind_epoch_fetcher(trainer)
        else:  # another epoch may hold another number of batches (an epoch resumed mid-way runs no start hook)
            self.local_sgd_epoch_start(trainer)
        return True

    # ------------------------------------------------------------------ per step
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Optional[Any] = None,
                       **kwargs: Any) -> Any:
        """Every real optimizer step passes here: count it for the schedule; in warm-up, average the gradients."""
        real = self.is_real_optimizer_step()
        out = super().optimizer_step(optimizer, self.local_sgd.warmup_closure(optimizer, closure), model,  # type: ignore[misc]
                                     **kwargs)
        self._stepped_this_batch = self._stepped_this_batch or real
        return out

    def is_real_optimizer_step(self) -> bool:
        """Whether the optimizer step about to run really steps (DeepSpeed: only on an accumulation boundary)."""
        return True

    def local_sgd_step_start(self) -> None:
        """Before each training batch: at the first micro-batch of an optimizer step, tell the controller."""
        if self._starts_step:
            self._starts_step = False
            self.local_sgd.step_start()

    def local_sgd_step_end(self, batch: Any) -> None:
        """After each training batch: count its tokens, and after a real optimizer step ask the schedule."""
        if self.local_sgd.schedule.counts_tokens:  # only time-based sync weighs groups by tokens
            self.local_sgd.record_tokens(batch_tokens(batch))
        if not self._stepped_this_batch:
            return  # an accumulation micro-batch, or a manual-optimization step that stepped nothing
        self._stepped_this_batch = False
        self._starts_step = True
        self.local_sgd.step_end()

    def local_sgd_train_end(self, trainer: Trainer) -> None:
        """The train-end sync, once per ``fit``: as soon as training is known to end, or at ``on_train_end``.

        A checkpoint written at this step before the sync (before the end of training was known: e.g. at the end of
        validation, before ``EarlyStopping`` decides in ``on_train_epoch_end``) is written again after it, so that
        every checkpoint of the last step holds the model ``fit`` returns. Collective, as saving is.
        """
        if self._train_ended:
            return
        self._train_ended = True
        before = self.local_sgd.last_sync
        self.local_sgd.train_end()
        saves, self._saves = self._saves, []
        if self.local_sgd.last_sync is not before:  # a sync ran: those checkpoints hold the model before it
            save_again_at_this_step(self, trainer, saves)

    def note_checkpoint(self, checkpoint: dict[str, Any], filepath: Any) -> None:
        """Every strategy's ``save_checkpoint`` calls this first: what a ``fit`` saves before its train-end sync is
        written again after it (see :meth:`local_sgd_train_end`)."""
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None  # type: ignore[attr-defined]
        if is_fitting(trainer) and not self._train_ended:
            self._saves.append((str(filepath), trainer.global_step, "optimizer_states" not in checkpoint))

    @property
    def saves_async(self) -> bool:
        """Whether checkpoints during ``fit`` are written in the background (``async_save=True``, or Lightning's
        ``AsyncCheckpointIO`` plugin passed)."""
        return self.local_sgd.config.async_save or isinstance(self.checkpoint_io, AsyncCheckpointIO)  # type: ignore[attr-defined]

    def checkpoint_writer(self) -> Optional[AsyncCheckpointWriter]:
        """Every strategy's ``save_checkpoint`` calls this: the background writer for this save (asynchronous saves
        during ``fit``), or ``None`` for a synchronous one, once the write in flight (if any) finished. Raises the
        error of a failed background write."""
        if self._async_writer is not None:
            self._async_writer.wait()
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None  # type: ignore[attr-defined]
        if not self.saves_async or not is_fitting(trainer) or trainer.state.status != TrainerStatus.RUNNING:
            return None  # not inside fit (e.g. trainer.save_checkpoint after fit returned): nothing to overlap with
        if self._async_writer is None:
            self._async_writer = AsyncCheckpointWriter(writer_timeout(self.local_sgd.config.sync_timeout,
                                                                      getattr(self, "_timeout", None)))
        return self._async_writer

    def remove_checkpoint(self, filepath: Any) -> None:
        """``save_top_k`` removing an old checkpoint: while a background write is in flight, only once that write is
        committed (dropped if it fails), so a crash during it leaves the old checkpoint loadable."""
        remove = super().remove_checkpoint  # type: ignore[misc]
        if self._async_writer is not None and self._async_writer.defer_removal(lambda: remove(filepath)):
            return
        remove(filepath)

    # ------------------------------------------------------------------ end
    def on_train_end(self) -> None:
        super().on_train_end()  # type: ignore[misc]
        # the train-end sync already ran from the internal callback, before the user's on_train_end hooks
        self._remove_hooks(self.lightning_module.trainer if self.lightning_module is not None else None)

    def teardown(self) -> None:
        # the end of training: the background write in flight finishes (its error is raised below) before anything
        # it may need (the process groups) goes
        write_error = self._async_writer.close() if self._async_writer is not None else None
        self._remove_hooks(attached_trainer(self.lightning_module) if self.lightning_module is not None else None)
        self.local_sgd.shutdown()
        super().teardown()  # type: ignore[misc]
        if write_error is not None:
            raise_unless_handling_another(write_error)

    def _remove_hooks(self, trainer: Optional[Trainer]) -> None:
        remove_callbacks(trainer, self._callbacks)
        self._callbacks = []
        if self._sigterm is not None:
            self._sigterm.remove()
            self._sigterm = None

    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)  # type: ignore[misc]
        keep_process_groups_at_exit()  # a peer may be dead or frozen: don't wait for its collectives at exit
        stop_local_ranks(self, exception)  # after a failed sync, don't leave the ranks this process launched waiting


def _config_property(name: str) -> property:
    def get(self: LocalSGDMixin) -> Any:
        return getattr(self.local_sgd.config, name)

    def set_(self: LocalSGDMixin, value: Any) -> None:
        setattr(self.local_sgd.config, name, value)

    return property(get, set_, doc=f"The ``{name}`` argument (see the class docstring).")


for _field in fields(LocalSGDConfig):
    if _field.init:
        setattr(LocalSGDMixin, _field.name, _config_property(_field.name))


def _controller_property(name: str, doc: str) -> property:
    return property(lambda self: getattr(self.local_sgd, name), doc=doc)


for _name, _doc in {
    "outer_sync": "The sync engine of this rank (level 1 with two-stage sync); ``None`` before ``fit`` sets it up.",
    "cluster_sync": "Two-stage sync: the engine of the sync across clusters.",
    "schedule": "The sync schedule: what each step does, and the step counters.",
    "last_sync": "The result of the last sync (``None`` before the first).",
    "sync_seconds_total": "Seconds this rank spent in syncs.",
    "bytes_sent": "Cumulative bytes this rank put into cross-group collectives (both levels with two-stage sync).",
}.items():
    setattr(LocalSGDMixin, _name, _controller_property(_name, _doc))
