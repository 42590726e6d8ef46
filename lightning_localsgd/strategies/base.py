"""Local-SGD glue shared by every strategy: arguments, schedule, warm-up reduce, sync at step end, checkpoints, logs.

A strategy mixes :class:`LocalSGDMixin` in front of a Lightning strategy and tells it which tensors to sync
(:meth:`LocalSGDMixin._local_sgd_tensors`) and over which process groups. The algorithm itself is
:class:`lightning_localsgd.outer.OuterSync`.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from ..comm import check_codec
from ..outer import (
    OuterOptimizerSpec,
    OuterSync,
    SyncResult,
    check_outer_optimizer_factory,
    resolve_outer_optimizer,
)
from ..reliability import SyncGuard, check_sync_timeout, stop_local_ranks
from ..schedule import Action, SyncSchedule
from ..topology import Topology, add_cluster_groups, check_cluster_size, check_group_size

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "local_sgd"
_FORMAT_VERSION = 1


def _check_positive_int(name: str, value: Any, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}. {fix}")


def check_state_device(value: Optional[Union[str, torch.device]]) -> Optional[torch.device]:
    """Parse ``outer_state_device`` and check the device exists on this machine."""
    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"outer_state_device={value!r} is not a device. Use 'cpu', 'cuda', 'cuda:0', ... or None (the "
            "parameters' device)."
        ) from err
    if device.type == "meta":
        raise ValueError("outer_state_device='meta' holds no data. Use 'cpu' or None (the parameters' device).")
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    if not available:
        raise ValueError(
            f"outer_state_device={value!r}: no {device.type} device is available on this machine. Use 'cpu' or None "
            "(the parameters' device)."
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"outer_state_device={value!r}: this machine has {count} {device.type} device(s). Use an index below "
            f"{count}, or None (the parameters' device)."
        )
    return device


class _SyncAtStepEnd(Callback):
    """Runs the strategy's step-end logic before any user callback (so checkpoints see the synced state)."""

    def __init__(self, strategy: "LocalSGDMixin") -> None:
        self.strategy = strategy

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.strategy._interval_started = time.monotonic()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.strategy.sync_every_seconds is not None:  # only time-based sync weighs groups by tokens
            self.strategy._tokens_since_sync += _batch_tokens(batch)
        self.strategy._local_sgd_step_end(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Runs before every other callback's and the LightningModule's on_train_end, so they see the synced model.
        self.strategy._local_sgd_train_end(trainer)


class LocalSGDMixin:
    """Local-SGD behaviour for a Lightning strategy. Put it first in the bases: ``class X(LocalSGDMixin, DDPStrategy)``."""

    # set by the concrete strategy's setup
    topology: Optional[Topology]
    outer_sync: Optional[OuterSync]

    def _init_local_sgd(
        self,
        sync_every: int,
        outer_optimizer: OuterOptimizerSpec,
        group_size: int,
        warmup_steps: int,
        outer_state_device: Optional[Union[str, torch.device]],
        on_nonfinite: str,
        sync_on_train_end: bool,
        sync_timeout: Optional[float] = None,
        cluster_size: Optional[int] = None,
        cluster_sync_every: Optional[int] = None,
        cluster_outer_optimizer: OuterOptimizerSpec = "diloco",
        compression: Optional[str] = None,
        fragments: int = 1,
        overlap_steps: int = 0,
        overlap_mix: float = 0.0,
        sync_every_seconds: Optional[float] = None,
    ) -> None:
        _check_positive_int("sync_every", sync_every, 1, "It is H, the optimizer steps between two syncs; e.g. 64.")
        _check_positive_int("group_size", group_size, 1, "It is the number of ranks per worker group; e.g. 1.")
        _check_positive_int("warmup_steps", warmup_steps, 0, "Use 0 to start local SGD at the first step.")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}.")
        if not isinstance(sync_on_train_end, bool):
            raise ValueError(f"sync_on_train_end must be True or False, got {sync_on_train_end!r}.")
        factory = resolve_outer_optimizer(outer_optimizer)
        check_outer_optimizer_factory(factory)
        cluster_factory = self._check_two_stage(sync_every, cluster_size, cluster_sync_every, cluster_outer_optimizer)
        check_codec(compression)
        self._check_streaming(sync_every, fragments, overlap_steps, overlap_mix, cluster_size)
        self._check_time_based(sync_every_seconds, cluster_size, compression, fragments, overlap_steps,
                               sync_on_train_end)
        self.fragments = fragments
        self.overlap_steps = overlap_steps
        self.overlap_mix = float(overlap_mix)
        self.sync_every_seconds = None if sync_every_seconds is None else float(sync_every_seconds)
        self._interval_started = time.monotonic()
        self._tokens_since_sync = 0
        self._stop_received = False
        self.sync_every = sync_every
        self.outer_optimizer = outer_optimizer
        self.group_size = group_size
        self.warmup_steps = warmup_steps
        self.outer_state_device = outer_state_device
        self.on_nonfinite = on_nonfinite
        self.sync_on_train_end = sync_on_train_end
        self.sync_timeout = check_sync_timeout(sync_timeout)
        self._sync_guard: Optional[SyncGuard] = None
        self._outer_factory = factory
        self._state_device = check_state_device(outer_state_device)
        self.compression = compression
        self.cluster_size = cluster_size
        self.cluster_sync_every = cluster_sync_every
        self.cluster_outer_optimizer = cluster_outer_optimizer
        self._cluster_factory = cluster_factory
        self.cluster_sync: Optional[OuterSync] = None
        self.schedule = SyncSchedule(sync_every, warmup_steps, cluster_sync_every, fragments, overlap_steps,
                                     time_based=sync_every_seconds is not None)
        self.topology = None
        self.outer_sync = None
        self.last_sync: Optional[SyncResult] = None
        self.sync_seconds_total = 0.0
        self._stepped_this_batch = False
        self._restored_state: Optional[dict[str, Any]] = None
        self._callback: Optional[_SyncAtStepEnd] = None

    @staticmethod
    def _check_two_stage(sync_every: int, cluster_size: Optional[int], cluster_sync_every: Optional[int],
                         cluster_outer_optimizer: OuterOptimizerSpec) -> Optional[Callable[..., Any]]:
        if cluster_size is None:
            if cluster_sync_every is not None:
                raise ValueError(
                    "cluster_sync_every is set but cluster_size is not: two-stage sync needs both. Set cluster_size "
                    "(worker groups per cluster), or remove cluster_sync_every for one level of sync."
                )
            return None
        _check_positive_int("cluster_size", cluster_size, 1, "It is the number of worker groups per cluster.")
        if cluster_sync_every is None:
            raise ValueError(
                "cluster_size is set but cluster_sync_every is not: give H2, the steps between two syncs across "
                f"clusters, a multiple of sync_every={sync_every} (e.g. {4 * sync_every})."
            )
        _check_positive_int("cluster_sync_every", cluster_sync_every, 1, "It is H2, steps between cross-cluster syncs.")
        if cluster_sync_every % sync_every:
            raise ValueError(
                f"cluster_sync_every={cluster_sync_every} must be a multiple of sync_every={sync_every}: the sync "
                f"across clusters happens on a sync inside the clusters. Use e.g. {sync_every * max(1, round(cluster_sync_every / sync_every))}."
            )
        try:
            factory = resolve_outer_optimizer(cluster_outer_optimizer)
            check_outer_optimizer_factory(factory)
        except ValueError as err:
            raise ValueError(f"cluster_outer_optimizer: {err}") from err
        return factory

    @staticmethod
    def _check_streaming(sync_every: int, fragments: int, overlap_steps: int, overlap_mix: float,
                         cluster_size: Optional[int]) -> None:
        _check_positive_int("fragments", fragments, 1, "It is the number of parts the parameters are split into for "
                            "streaming sync; 1 syncs them all at once.")
        _check_positive_int("overlap_steps", overlap_steps, 0, "It is τ, inner steps a fragment's sync runs behind; "
                            "0 applies it at once.")
        if sync_every % fragments:
            raise ValueError(
                f"sync_every={sync_every} must be a multiple of fragments={fragments}: fragment f syncs every "
                f"sync_every steps, staggered by sync_every/fragments steps. Use e.g. sync_every="
                f"{fragments * max(1, round(sync_every / fragments))}."
            )
        if overlap_steps >= sync_every:
            raise ValueError(
                f"overlap_steps={overlap_steps} must be smaller than sync_every={sync_every}: a fragment's sync must be "
                "applied before the next sync of that fragment starts."
            )
        if isinstance(overlap_mix, bool) or not isinstance(overlap_mix, (int, float)) or not 0.0 <= overlap_mix < 1.0:
            raise ValueError(
                f"overlap_mix must be a number in [0, 1), got {overlap_mix!r}. It is α of Streaming DiLoCo: the "
                "parameters continue from α·local + (1−α)·global; e.g. 0.5."
            )
        if overlap_mix and not overlap_steps:
            raise ValueError(
                f"overlap_mix={overlap_mix} only acts when overlap_steps > 0 (with no overlap the local parameters "
                "equal what was sent). Set overlap_steps, or remove overlap_mix."
            )
        if (fragments > 1 or overlap_steps) and cluster_size is not None:
            raise ValueError(
                "streaming sync (fragments > 1 or overlap_steps > 0) does not combine with two-stage sync "
                "(cluster_size). Use one of them."
            )

    @staticmethod
    def _check_time_based(sync_every_seconds: Optional[float], cluster_size: Optional[int],
                          compression: Optional[str], fragments: int, overlap_steps: int,
                          sync_on_train_end: bool) -> None:
        if sync_every_seconds is None:
            return
        if isinstance(sync_every_seconds, bool) or not isinstance(sync_every_seconds, (int, float)) \
                or not math.isfinite(sync_every_seconds) or sync_every_seconds <= 0:
            raise ValueError(
                f"sync_every_seconds must be a positive number of seconds, got {sync_every_seconds!r}; e.g. 30.0, or "
                "None to sync every sync_every steps."
            )
        for name, value, bad in (("cluster_size", cluster_size, cluster_size is not None),
                                 ("compression", compression, compression is not None),
                                 ("fragments", fragments, fragments > 1),
                                 ("overlap_steps", overlap_steps, overlap_steps > 0)):
            if bad:
                raise ValueError(
                    f"sync_every_seconds (time-based sync of uneven workers) does not combine with {name}={value!r}. "
                    f"Remove one of them."
                )
        if not sync_on_train_end:
            raise ValueError(
                "sync_every_seconds needs sync_on_train_end=True: a group that finishes tells the others to stop in "
                "its last sync, and they wait for it."
            )

    # ------------------------------------------------------------------ hooks for the concrete strategy
    def _local_sgd_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        """(parameters, buffers) this rank syncs. Default: the module's trainable parameters and float buffers."""
        module = self.lightning_module
        params = [p for p in module.parameters() if p.requires_grad]
        buffers = [b for b in module.buffers() if torch.is_floating_point(b)]
        return params, buffers

    def _local_sgd_shard_group(self) -> Optional[dist.ProcessGroup]:
        """Process group whose ranks hold identical replicas and split the sync in slices (DDP inside a group)."""
        return None

    def _local_sgd_norm_group(self) -> Optional[dist.ProcessGroup]:
        """Process group whose ranks hold the other shards of one replica (FSDP inside a group), or None."""
        return None

    def _local_sgd_fragment_sizes(self, params: list[Tensor]) -> Optional[list[int]]:
        """Sizes to balance streaming fragments by (None: the synced tensors' own sizes)."""
        return None

    # ------------------------------------------------------------------ setup
    def _check_world_size(self, world_size: int) -> None:
        check_group_size(world_size, self.group_size)
        if self.cluster_size is not None:
            check_cluster_size(world_size // self.group_size, self.cluster_size)

    def _add_cluster_groups(self) -> None:
        """Two-stage sync: create the level-1 and level-2 process groups (collective, right after the topology)."""
        if self.cluster_size is not None and self.topology is not None:
            add_cluster_groups(self.topology, self.cluster_size, getattr(self, "_timeout", None))

    def _setup_local_sgd(self, trainer: Trainer) -> None:
        assert self.topology is not None
        params, buffers = self._local_sgd_tensors()
        if not params:
            raise ValueError("local SGD: the LightningModule has no trainable parameters to synchronize.")
        self.outer_sync = OuterSync(
            params,
            buffers,
            outer_optimizer=self._outer_factory,
            cross_group=self.topology.cross_group if self.cluster_size is None else self.topology.intra_cluster_group,
            shard_group=self._local_sgd_shard_group(),
            norm_group=self._local_sgd_norm_group(),
            state_device=self._state_device,
            on_nonfinite=self.on_nonfinite,
            compression=self.compression,
            fragments=self.fragments,
            fragment_sizes=self._local_sgd_fragment_sizes(params),
        )
        if self.cluster_size is not None:
            # Level 2 reads and writes level 1's snapshot θ_c: the cluster's global parameters.
            self.cluster_sync = OuterSync(
                self.outer_sync.snapshot,
                outer_optimizer=self._cluster_factory,
                cross_group=self.topology.inter_cluster_group,
                norm_group=self.outer_sync.norm_group,
                on_nonfinite=self.on_nonfinite,
                compression=self.compression,
            )
        if self._restored_state is not None:
            if self.cluster_sync is not None and self._restored_state.get("cluster") is not None:
                self.cluster_sync.load_state_dict(self._restored_state["cluster"])
            self.outer_sync.load_state_dict(self._restored_state["rank"])
            self.schedule.load_state_dict(self._restored_state["schedule"])
            self.sync_seconds_total = float(self._restored_state.get("sync_seconds_total", 0.0))
            self._tokens_since_sync = int(self._restored_state.get("tokens_since_sync", 0))
            self._restored_state = None
        if self.sync_every_seconds is not None:
            self._check_time_based_trainer(trainer)
        self._sync_guard = SyncGuard.for_strategy(self)
        self._callback = _SyncAtStepEnd(self)
        trainer.callbacks.insert(0, self._callback)
        self._limit_sigterm_broadcast(trainer)
        when = f"every {self.sync_every} steps" if self.sync_every_seconds is None else \
            f"every {self.sync_every_seconds:g} s (token-weighted)"
        if self.fragments > 1 or self.overlap_steps:
            when += f" in {self.fragments} staggered fragment(s), applied {self.overlap_steps} step(s) later"
        rank_zero_info(
            f"local SGD: {self.topology.num_groups} worker group(s) of {self.group_size} rank(s), sync {when}, outer "
            f"optimizer {self._outer_name()}, warm-up {self.warmup_steps} steps."
        )

    def _check_time_based_trainer(self, trainer: Trainer) -> None:
        """Time-based sync: groups run different numbers of steps, so nothing may be collective between syncs."""
        problems = []
        if trainer.checkpoint_callbacks:
            problems.append("checkpoint callbacks (ModelCheckpoint; pass Trainer(enable_checkpointing=False) and call "
                            "trainer.save_checkpoint after fit)")
        if trainer.early_stopping_callback is not None:
            problems.append("EarlyStopping callbacks")
        if is_overridden("validation_step", self.lightning_module) and trainer.limit_val_batches != 0:
            problems.append("validation during fit (pass Trainer(limit_val_batches=0) and call trainer.validate "
                            "after fit)")
        if problems:
            raise ValueError(
                "sync_every_seconds: worker groups run different numbers of steps between syncs, so collectives "
                "that Lightning runs at step or epoch counts would pair up wrongly across groups. Remove: "
                + "; ".join(problems) + "."
            )

    def _limit_sigterm_broadcast(self, trainer: Trainer) -> None:
        """Keep Lightning's per-batch SIGTERM broadcast off the cross-group links between syncs.

        Lightning (>= 2.5) broadcasts a one-element tensor from rank 0 to all ranks before every training batch so
        that a SIGTERM stops all ranks together. Across slow links that is one latency-bound collective per step,
        the very cost local SGD removes. We run it only on steps that cross groups anyway (warm-up steps and steps
        that end in a sync): a SIGTERM on rank 0 then stops every rank within ``sync_every`` steps.
        """
        loop = trainer.fit_loop.epoch_loop
        original = getattr(loop, "_broadcast_sigterm_tensor", None)
        if original is None or self.topology is None or self.topology.num_groups == 1:
            return
        schedule = self.schedule
        if self.sync_every_seconds is not None:
            # Groups take different numbers of steps: a per-batch broadcast would pair with another group's sync.
            loop._broadcast_sigterm_tensor = lambda: None
            self._restore_sigterm = lambda: setattr(loop, "_broadcast_sigterm_tensor", original)
            return

        def broadcast_at_sync_steps() -> None:
            if schedule.in_warmup or schedule.steps_since_sync + 1 >= schedule.sync_every:
                guard = self._sync_guard if not schedule.in_warmup else None  # sync_timeout: sync steps only
                with guard.timeouts() if guard is not None else nullcontext():
                    original()

        loop._broadcast_sigterm_tensor = broadcast_at_sync_steps
        self._restore_sigterm = lambda: setattr(loop, "_broadcast_sigterm_tensor", original)

    def _outer_name(self) -> str:
        if isinstance(self.outer_optimizer, str):
            return self.outer_optimizer
        func = getattr(self.outer_optimizer, "func", self.outer_optimizer)  # functools.partial(torch.optim.SGD, ...)
        return getattr(func, "__name__", None) or type(func).__name__

    @property
    def ddp_bytes_per_step(self) -> int:
        """Bytes DDP would all-reduce per optimizer step on each rank (the gradients of the synced parameters)."""
        params, _ = self._local_sgd_tensors()
        return sum(p.numel() * p.element_size() for p in params)

    # ------------------------------------------------------------------ per step
    def _wrap_closure_for_warmup(self, optimizer: Any, closure: Callable[[], Any]) -> Callable[[], Any]:
        """During warm-up, average the gradients across groups after backward, before clipping and the step."""
        if not self.schedule.in_warmup or self.topology is None or self.topology.num_groups == 1:
            return closure

        def reduce_after(*args: Any, **kwargs: Any) -> Any:
            out = closure(*args, **kwargs)
            self._all_reduce_grads(optimizer)
            return out

        return reduce_after

    @torch.no_grad()
    def _all_reduce_grads(self, optimizer: Any) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        grads = []
        for p in params:
            if p.grad is None:  # as DDP with find_unused_parameters: an unused parameter gets a zero gradient
                p.grad = torch.zeros_like(p)
            grads.append(_local(p.grad))
        if not grads:
            return
        assert self.topology is not None
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.topology.cross_group)
        flat.div_(self.topology.num_groups)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def _local_sgd_step_end(self, trainer: Trainer) -> None:
        if not self._stepped_this_batch:
            return  # an accumulation micro-batch, or a manual-optimization step that stepped nothing
        self._stepped_this_batch = False
        action = self.schedule.step()
        if action is Action.END_WARMUP:
            assert self.outer_sync is not None
            self.outer_sync.reset_snapshot()  # all ranks hold the same parameters after synchronous steps
            if self.cluster_sync is not None:
                self.cluster_sync.reset_snapshot()
            self._interval_started = time.monotonic()
            self._tokens_since_sync = 0
        elif action is Action.SYNC:
            self._run_sync(trainer)
        elif action is Action.SYNC_ALL:
            self._run_sync(trainer, all_levels=True)
        elif action is Action.STREAM:
            self._run_stream(trainer, self.schedule.starting, self.schedule.finishing)
        elif self.sync_every_seconds is not None and not self.schedule.in_warmup and self._time_is_up():
            self._run_timed_sync(trainer, stop=False)

    def _time_is_up(self) -> bool:
        """``sync_every_seconds`` have passed since the last sync; the ranks of a worker group agree on it."""
        assert self.sync_every_seconds is not None
        due = time.monotonic() - self._interval_started >= self.sync_every_seconds
        if self.group_size > 1 and self.topology is not None:
            # the ranks of a group step together (DDP / FSDP inside it); they must enter the sync at the same step
            flag = torch.tensor([float(due)], device=self.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.topology.inner_group)
            due = bool(flag.item() > 0)
        return due

    def _run_timed_sync(self, trainer: Trainer, stop: bool) -> None:
        """Time-based sync: weight = tokens since the last sync; any group's ``stop`` ends training for all."""
        assert self.outer_sync is not None
        weight = float(self._tokens_since_sync)
        with self._guarded_sync():
            result = self.outer_sync.sync(weight=weight, stop=stop)
        self._tokens_since_sync = 0
        self.schedule.steps_since_sync = 0
        self._interval_started = time.monotonic()
        if result.stop_requested:
            self._stop_received = True
            trainer.should_stop = True  # another group finished: stop after this step, as every group does
        self._record(trainer, result)

    def _run_stream(self, trainer: Trainer, starting: list[int], finishing: list[int]) -> None:
        """Streaming sync: launch the syncs of ``starting`` fragments, apply those of ``finishing``."""
        assert self.outer_sync is not None
        with self._guarded_sync():
            for f in starting:
                self.outer_sync.start_sync(f)
            for f in finishing:
                result = self.outer_sync.finish_sync(f, mix=self.overlap_mix)
                self._record(trainer, result)

    def _before_sync(self) -> None:
        """Called before any sync reads the parameters (FSDP refreshes its views of the shards here)."""

    @contextmanager
    def _guarded_sync(self) -> Iterator[None]:
        """Around every sync: refresh the views, apply ``sync_timeout``, name the step in a non-finite error."""
        self._before_sync()
        try:
            with self._sync_guard.sync(self.schedule.steps_done) if self._sync_guard is not None else nullcontext():
                yield
        except FloatingPointError as err:
            raise type(err)(f"local SGD sync at step {self.schedule.steps_done}: {err}") from err

    def _record(self, trainer: Trainer, result: SyncResult, cluster_result: Optional[SyncResult] = None) -> None:
        self.last_sync = result
        self.sync_seconds_total += result.seconds
        self._log_sync(trainer, result, cluster_result)

    def _run_sync(self, trainer: Trainer, all_levels: bool = False) -> None:
        assert self.outer_sync is not None
        cluster_result = None
        with self._guarded_sync():
            result = self.outer_sync.sync()
            if all_levels and self.cluster_sync is not None and not result.skipped:
                # two-stage: θ_c (level 1's snapshot) takes the level-2 outer step across clusters, then every
                # group of the cluster continues from it
                cluster_result = self.cluster_sync.sync()
                self.outer_sync._write_back()
                result = SyncResult(
                    pseudo_grad_norm=result.pseudo_grad_norm,
                    bytes_sent=result.bytes_sent + cluster_result.bytes_sent,
                    seconds=result.seconds + cluster_result.seconds,
                    skipped=cluster_result.skipped,
                )
        self._record(trainer, result, cluster_result)

    @property
    def bytes_sent(self) -> int:
        """Cumulative bytes this rank put into cross-group collectives (both levels with two-stage sync)."""
        total = self.outer_sync.bytes_sent if self.outer_sync is not None else 0
        return total + (self.cluster_sync.bytes_sent if self.cluster_sync is not None else 0)

    def _log_sync(self, trainer: Trainer, result: SyncResult, cluster_result: Optional[SyncResult] = None) -> None:
        if trainer.global_rank != 0 or not trainer.loggers:
            return
        assert self.outer_sync is not None
        metrics = {
            "local_sgd/syncs": float(self.outer_sync.num_syncs),
            "local_sgd/bytes_sent": float(self.bytes_sent),
            "local_sgd/sync_seconds": result.seconds,
            "local_sgd/pseudo_grad_norm": result.pseudo_grad_norm,
            "local_sgd/skipped": float(result.skipped),
        }
        if result.fragment is not None:
            metrics["local_sgd/fragment"] = float(result.fragment)
        if cluster_result is not None and self.cluster_sync is not None:
            metrics["local_sgd/cluster_syncs"] = float(self.cluster_sync.num_syncs)
            metrics["local_sgd/cluster_pseudo_grad_norm"] = cluster_result.pseudo_grad_norm
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_end(self) -> None:
        super().on_train_end()  # type: ignore[misc]
        # the train-end sync already ran from the internal callback, before the user's on_train_end hooks
        self._remove_hooks(self.lightning_module.trainer if self.lightning_module is not None else None)

    def teardown(self) -> None:
        self._remove_hooks(self.lightning_module._trainer if self.lightning_module is not None else None)
        super().teardown()  # type: ignore[misc]

    def _local_sgd_train_end(self, trainer: Trainer) -> None:
        if self.outer_sync is None or self.schedule.in_warmup:
            return
        if self.sync_every_seconds is not None:
            if not self._stop_received:  # the others learn in this sync that training is over
                self._run_timed_sync(trainer, stop=True)
            return
        if self.outer_sync.pending:
            # streaming: apply the fragments still in flight, in the order they were started
            with self._guarded_sync():
                for f in sorted(self.outer_sync.pending, key=lambda f: -1 if f is None else f):
                    self._record(trainer, self.outer_sync.finish_sync(f, mix=self.overlap_mix))
        streaming = self.fragments > 1 or self.overlap_steps > 0
        unsynced = self.schedule.steps_since_sync > 0 or self.schedule.syncs_since_cluster_sync > 0 or (
            streaming and self.schedule.local_steps > 0)
        if self.sync_on_train_end and unsynced:
            self.schedule.steps_since_sync = 0
            self.schedule.syncs_since_cluster_sync = 0
            self._run_sync(trainer, all_levels=True)

    def _remove_hooks(self, trainer: Optional[Trainer]) -> None:
        if trainer is not None and self._callback is not None and self._callback in trainer.callbacks:
            trainer.callbacks.remove(self._callback)
        self._callback = None
        restore = getattr(self, "_restore_sigterm", None)
        if restore is not None:
            restore()
            self._restore_sigterm = None

    # ------------------------------------------------------------------ checkpoints
    def _local_sgd_checkpoint(self, checkpoint: dict[str, Any]) -> Optional[dict[str, Any]]:
        """Gather every group's model/optimizer state and every rank's outer state to global rank 0. Collective."""
        if self.outer_sync is None or self.topology is None:
            return None
        topo = self.topology
        mine: dict[str, Any] = {
            "rank": self.outer_sync.state_dict(),
            "cluster": self.cluster_sync.state_dict() if self.cluster_sync is not None else None,
            "group": None,
        }
        if topo.rank_in_group == 0 and topo.group_index > 0:
            # group 0's state is the checkpoint's own `state_dict` / `optimizer_states`
            mine["group"] = {
                "state_dict": checkpoint["state_dict"],
                "optimizer_states": checkpoint.get("optimizer_states"),
            }
        gathered: Optional[list[Any]] = [None] * topo.world_size if topo.rank == 0 else None
        dist.gather_object(_to_cpu(mine), gathered, dst=0)
        if topo.rank != 0:
            return None
        assert gathered is not None
        return {
            "format_version": _FORMAT_VERSION,
            "world_size": topo.world_size,
            "group_size": topo.group_size,
            "sync_every": self.sync_every,
            "warmup_steps": self.warmup_steps,
            "outer_optimizer": self._outer_name(),
            "schedule": self.schedule.state_dict(),
            "sync_seconds_total": self.sync_seconds_total,
            "tokens_since_sync": self._tokens_since_sync,
            "groups": [None] + [gathered[i * topo.group_size]["group"] for i in range(1, topo.num_groups)],
            "ranks": [g["rank"] for g in gathered],
            "clusters": [g.get("cluster") for g in gathered],
        }

    def _check_restored_layout(self, state: Mapping[str, Any], world_size: int) -> None:
        if state.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"unknown local-SGD checkpoint format {state.get('format_version')!r}.")
        if state["world_size"] != world_size or state["group_size"] != self.group_size:
            raise ValueError(
                f"cannot resume local SGD exactly: the checkpoint was written by {state['world_size']} ranks in worker "
                f"groups of {state['group_size']}, this run has {world_size} ranks and group_size={self.group_size}. "
                "Resume with the same devices, num_nodes and group_size; or load only the weights into a new run "
                "(e.g. `LightningModule.load_from_checkpoint`) to start a fresh local-SGD run from them."
            )

    def _group_entry(self, checkpoint: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
        """This rank's group's model/optimizer state from a local-SGD checkpoint, or None for group 0 / no state."""
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None or self.topology is None:
            return None
        self._check_restored_layout(state, self.topology.world_size)
        return state["groups"][self.topology.group_index]

    def _stash_restored_state(self, checkpoint: Mapping[str, Any], rank: int, world_size: int) -> bool:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            return False
        self._check_restored_layout(state, world_size)
        self._restored_state = {
            "rank": state["ranks"][rank],
            "cluster": state.get("clusters", [None] * (rank + 1))[rank],
            "schedule": state["schedule"],
            "sync_seconds_total": state.get("sync_seconds_total", 0.0),
            "tokens_since_sync": state.get("tokens_since_sync", 0),
        }
        return True

    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)  # type: ignore[misc]
        stop_local_ranks(self, exception)  # after a failed sync, don't leave the ranks this process launched waiting


def _local(tensor: Tensor) -> Tensor:
    """The rank's own part of a tensor: the local shard of a DTensor (FSDP2), else the tensor itself."""
    if hasattr(tensor, "to_local"):
        return tensor.detach().to_local()  # shares storage with the DTensor
    return tensor


def _batch_tokens(batch: Any) -> int:
    """Tokens in a batch: the elements of its first tensor (the token ids of a language model's input)."""
    if isinstance(batch, Tensor):
        return batch.numel()
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        tokens = _batch_tokens(value)
        if tokens:
            return tokens
    return 0


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def is_fitting(trainer: Optional[Trainer]) -> bool:
    return trainer is not None and trainer.state.fn == TrainerFn.FITTING
