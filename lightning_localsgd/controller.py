"""One rank's local SGD, without Lightning: the arguments, the schedule, the engines, the guard, the checkpoint state.

A strategy builds a :class:`LocalSGDController` from its :class:`~.config.LocalSGDConfig`, calls :meth:`setup` once the
process groups and the tensors to sync exist, :meth:`step_end` after every training step that stepped an optimizer
and :meth:`train_end` when training ends. The controller asks the schedule what the step does and runs it through the
engines (:class:`~.engine.OuterSync`, one per sync level) under the sync guard. The strategy hands itself in at
construction as the controller's host (:class:`SyncHost`: the methods the controller calls on it, declared once).
The outermost syncs, and the membership around them (start, join, warm-up rounds, inner steps, shutdown), run through
one object the controller alone talks to (:class:`~.syncs.Syncs`, in :mod:`~lightning_localsgd.syncs`): ``DirectSyncs``
in one world, a federation's across jobs (:func:`~.syncs.make_syncs` picks it from the arguments). Checkpoints:
:meth:`meta` (layout and every counter, the same for every strategy) and :meth:`rank_state` (this rank's engine
state), restored with :meth:`restore`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence

import torch
from torch import Tensor

from .config import LocalSGDConfig
from .engine import NonFinitePseudoGradientError, OuterSync, ProcessGroupCommunicator, SyncResult
from .engine.comm import Communicator, as_communicator
from .engine.schedules import Action, TimeBasedSchedule, TimeBasedStreamingSchedule
from .engine.warmup import average_gradients
from .reliability import SyncGuard
from .syncs import HostFacts, Syncs, make_syncs
from .topology import Topology

__all__ = ["CHECKPOINT_KEY", "FORMAT_VERSION", "LocalSGDController", "NoHost", "SyncHost"]

#: Where a checkpoint keeps the local-SGD state (a key of the checkpoint dict, or of its ``meta.pt``).
CHECKPOINT_KEY = "local_sgd"
FORMAT_VERSION = 1


class SyncHost(Protocol):
    """What :class:`LocalSGDController` calls on its host, the strategy that runs it
    (:class:`~lightning_localsgd.strategies.base.LocalSGDMixin` implements it)."""

    def before_local_sgd_sync(self) -> None:
        """Before any sync reads the synced tensors (FSDP / DeepSpeed refresh their views of the shards here)."""
        ...

    def after_local_sgd_sync(self) -> None:
        """After a sync wrote them (DeepSpeed refreshes the module's parameters from its partitions here)."""
        ...

    def on_local_sgd_sync(self, result: SyncResult, cluster_result: Optional[SyncResult]) -> None:
        """A sync was applied (``cluster_result``: two-stage sync's sync across clusters, when one ran): log it."""
        ...

    def reset_inner_optimizers(self) -> None:
        """This rank's group had non-finite values at a skipped sync: forget the inner optimizers' state."""
        ...

    def stop_training(self) -> None:
        """Time-based sync: another group finished training, so this one stops too."""
        ...

    def wants_to_stop(self) -> bool:
        """Time-based sync: whether this rank asks every group to stop at the next sync (a SIGTERM arrived)."""
        ...


class NoHost:
    """A :class:`SyncHost` that does nothing: for a controller used without a strategy (tests, tools)."""

    def before_local_sgd_sync(self) -> None:
        pass

    def after_local_sgd_sync(self) -> None:
        pass

    def on_local_sgd_sync(self, result: SyncResult, cluster_result: Optional[SyncResult]) -> None:
        pass

    def reset_inner_optimizers(self) -> None:
        pass

    def stop_training(self) -> None:
        pass

    def wants_to_stop(self) -> bool:
        return False


class LocalSGDController:
    """Runs local SGD for one rank: what each step does, the syncs, the counters, the checkpoint state.

    Args:
        config: the local-SGD arguments.
        host: the strategy the controller calls back (:class:`SyncHost`). Default: :class:`NoHost`.
        syncs: how the syncs of the outermost level (:attr:`outermost_sync`) run (:class:`~.syncs.Syncs`). Default:
            the one the arguments ask for (:func:`~.syncs.make_syncs`): ``DirectSyncs``, or with ``lighthouse`` a
            federation's (over quorums of jobs, a failed attempt redone or dropped). Level 1 of two-stage sync runs directly.
    """

    def __init__(self, config: LocalSGDConfig, host: Optional[SyncHost] = None,
                 syncs: Optional[Syncs] = None) -> None:
        self.config = config
        self.host: SyncHost = host if host is not None else NoHost()
        self.syncs: Syncs = syncs if syncs is not None else make_syncs(config)
        self.schedule = config.build_schedule()
        self.topology: Optional[Topology] = None
        self.outer_sync: Optional[OuterSync] = None
        self.cluster_sync: Optional[OuterSync] = None
        self.guard: Optional[SyncGuard] = None
        self.last_sync: Optional[SyncResult] = None
        self.sync_seconds_total = 0.0
        self.stop_received = False
        self.consecutive_skips = 0
        self.warmup_comm: Optional[Communicator] = None
        """Warm-up: the communicator over every group (one world's cross group, or the federated quorum's)."""
        self._restored: Optional[tuple[Mapping[str, Any], Any, Any]] = None

    # ------------------------------------------------------------------ setup
    def setup(self, topology: Topology, tensors: Sequence[Tensor], buffers: Sequence[Tensor] = (),
              slice_group: Any = None, sharding_group: Any = None, fragment_sizes: Optional[Sequence[int]] = None,
              fallback_timeout: Any = None, host_facts: Optional[HostFacts] = None) -> None:
        """Start the syncs' transport (given ``host_facts``, what one across jobs needs of this rank), then build the
        engines over the topology's process groups (collective: every rank calls it)."""
        c = self.config
        if not tensors:
            raise ValueError("local SGD: the LightningModule has no trainable parameters to synchronize.")
        across_jobs = self.syncs.start(self.schedule, c, host_facts)
        if across_jobs is not None:  # the outermost level crosses jobs, met through the transport's quorums
            topology.federate(across_jobs)
        self.topology = topology
        self.warmup_comm = as_communicator(topology.cross_group)  # every group, also with two-stage sync
        two_stage = c.cluster_size is not None
        self.outer_sync = OuterSync(
            tensors, buffers, outer_optimizer=c.outer_factory,
            cross_group=topology.intra_cluster_group if two_stage else topology.cross_group,
            slice_group=slice_group, sharding_group=sharding_group, state_device=c.state_device,
            on_nonfinite=c.on_nonfinite, compression=c.compression, fragments=c.fragments,
            fragment_sizes=fragment_sizes, screen=c.build_screen(),
        )
        if two_stage:
            # Level 2 reads and writes level 1's snapshot θ_c: the cluster's global parameters.
            # Split over the cluster's groups (federated: the job's), each rank reduces a piece of its slice.
            split = topology.inter_cluster_slice_group
            self.cluster_sync = OuterSync(
                self.outer_sync.snapshot, outer_optimizer=c.cluster_factory, cross_group=topology.inter_cluster_group,
                slice_group=split,
                sharding_group=topology.cluster_group if split is not None else self.outer_sync.sharding,
                on_nonfinite=c.on_nonfinite, compression=c.compression, screen=c.build_screen(),
            )
        self.schedule.bind_fragments(self.outer_sync.fragments)  # a fragment's tokens are its sync's
        if self._restored is not None:
            self._apply_restored(*self._restored)
            self._restored = None
        if isinstance(self.schedule, TimeBasedSchedule) and topology.group_size > 1:
            self.schedule.agree = self._group_agrees
        self.guard = SyncGuard.for_engines(c.sync_timeout, self.engines, fallback_timeout)

    @property
    def engines(self) -> list[OuterSync]:
        return [e for e in (self.outer_sync, self.cluster_sync) if e is not None]

    @property
    def outermost_sync(self) -> Optional[OuterSync]:
        """The engine of the outermost level: across clusters with two-stage sync, else the only one. In federated
        mode it is the level that crosses jobs (its communicator is torchft's)."""
        return self.cluster_sync if self.cluster_sync is not None else self.outer_sync

    def train_start(self) -> None:
        """Training (re)starts: the schedule's clock starts. Across jobs, before the first inner step, this group
        meets the running ones on the outermost level (healing from one when they are ahead); with two levels every
        group of the job then continues from ``θ_c``, which that level wrote."""
        self.schedule.start()
        if not self.syncs.across_jobs:
            return
        engine = self.outermost_sync
        assert engine is not None and self.outer_sync is not None
        self.host.before_local_sgd_sync()  # as around every sync: current views of sharded storage
        self.syncs.join(engine)
        if engine is not self.outer_sync:
            self.outer_sync.write_back()
        self.host.after_local_sgd_sync()  # ZeRO: the module's parameters follow the partitions

    def shutdown(self) -> None:
        """The strategy's teardown: a transport across jobs leaves; the process groups are no longer held here (so
        that destroying them at exit ends their worker threads before the interpreter finalizes)."""
        self.syncs.shutdown()
        self.guard = None

    def _group_agrees(self, due: bool) -> bool:
        """The ranks of a group step together (DDP / FSDP inside it): they enter a timed sync at the same step."""
        assert self.outer_sync is not None and self.topology is not None
        flag = torch.tensor([float(due)], device=self.outer_sync.device)
        ProcessGroupCommunicator(self.topology.inner_group).all_reduce(flag, op="max")
        return bool(flag.item() > 0)

    # ------------------------------------------------------------------ per step
    def step_start(self) -> None:
        """A training step starts (its first micro-batch): a warm-up step opens a round of collectives (federated
        groups form the step's quorum here, so a joining group heals before it computes its gradient)."""
        if self.schedule.in_warmup:
            self.syncs.start_round()

    def warmup_closure(self, optimizer: Any, closure: Callable[[], Any]) -> Callable[[], Any]:
        """During warm-up, average the gradients across groups after backward, before clipping and the step."""
        comm = self.warmup_comm
        if not self.schedule.in_warmup or comm is None:
            return closure

        def reduce_after(*args: Any, **kwargs: Any) -> Any:
            out = closure(*args, **kwargs)
            params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
            self.syncs.end_round(average_gradients(comm, params))
            return out

        return reduce_after

    def record_tokens(self, tokens: int) -> None:
        if self.schedule.counts_tokens:
            self.schedule.record_tokens(tokens)

    def step_end(self) -> None:
        """A training step that stepped an optimizer is over: do what the schedule says."""
        self.syncs.inner_step()  # this group weighs in at its next sync
        action = self.schedule.step()
        # async_sync: a sync that finished beside training is applied at this step end; the clock restarts there
        if self.syncs.background and self._apply_background(self.syncs.poll) and action is Action.TIMED_SYNC:
            action = Action.NONE
        if action is Action.END_WARMUP:
            for engine in self.engines:
                engine.reset_snapshot()  # all ranks hold the same parameters after synchronous steps
        elif action is Action.SYNC:
            self.sync()
        elif action is Action.SYNC_ALL:
            self.sync(all_levels=True)
        elif action is Action.STREAM:  # after a stop every group only applies what is in flight (train_end syncs)
            self.stream([] if self.stop_received else self.schedule.starting, self.schedule.finishing)
        elif action is Action.TIMED_SYNC and self.syncs.background:
            self._launch_background(stop=self.host.wants_to_stop())
        elif action is Action.TIMED_SYNC:
            self.timed_sync(stop=self.host.wants_to_stop())

    def train_end(self) -> None:
        """Apply the fragments in flight, then a last sync of every parameter if some are unsynced."""
        if self.outer_sync is None or self.schedule.in_warmup:
            return
        if isinstance(self.schedule, TimeBasedStreamingSchedule):
            self._end_streaming_by_time(self.schedule)
            return
        if isinstance(self.schedule, TimeBasedSchedule):
            self.settle()  # async_sync: the sync in flight first (it may carry another job's stop)
            if not self.stop_received:  # the others learn in this sync that training is over
                # They enter their next timed sync when their clocks say so (all restarted at the last sync), so meet
                # them there: a collective of one world would block until then anyway, and a federated quorum forms
                # only of the jobs that ask within the lighthouse's join timeout (a job not due yet would miss it).
                time.sleep(self.schedule.seconds_until_due())
                self.timed_sync(stop=True)
            return
        if self.outer_sync.pending:
            with self._guarded():  # streaming: the fragments still in flight, in the order they were started
                for f in sorted(self.outer_sync.pending, key=lambda f: -1 if f is None else f):
                    self._finish_fragment(f)
        if self.config.sync_on_train_end and self.schedule.needs_final_sync():
            self.schedule.synced()
            self.sync(all_levels=True)

    # ------------------------------------------------------------------ syncs
    @contextmanager
    def _guarded(self) -> Iterator[None]:
        """Around every sync: refresh the views, apply ``sync_timeout``, name the step in a non-finite error."""
        self.host.before_local_sgd_sync()
        step = self.schedule.steps_done
        try:
            with self.guard.sync(step) if self.guard is not None else nullcontext():
                yield
        except FloatingPointError as err:
            raise type(err)(f"local SGD sync at step {step}: {err}") from err
        self.host.after_local_sgd_sync()

    def sync(self, all_levels: bool = False) -> None:
        """A sync of every parameter; with two-stage sync and ``all_levels``, then one across clusters."""
        assert self.outer_sync is not None
        cluster_result = None
        with self._guarded():
            if self.cluster_sync is None:
                result = self.syncs.sync(self.outer_sync)
            else:
                result = self.outer_sync.sync()
            if all_levels and self.cluster_sync is not None and not result.skipped:
                # θ_c (level 1's snapshot) takes the level-2 outer step, then every group of the cluster follows it
                cluster_result = self.syncs.sync(self.cluster_sync)
                self.outer_sync.write_back()
                result = SyncResult(pseudo_grad_norm=result.pseudo_grad_norm,
                                    bytes_sent=result.bytes_sent + cluster_result.bytes_sent,
                                    seconds=result.seconds + cluster_result.seconds, skipped=cluster_result.skipped,
                                    screened_out=result.screened_out)
        self._record(result, cluster_result)

    def stream(self, starting: list[int], finishing: list[int], stop: Optional[bool] = None) -> None:
        """Streaming sync: launch the syncs of ``starting`` fragments, apply those of ``finishing`` (a fragment in
        both lists is applied right after it starts). Time-based: each start carries the schedule's weight of that
        fragment and ``stop`` (default: whether this rank asks every group to stop)."""
        assert self.outer_sync is not None
        if stop is None and not self.schedule.lockstep:
            stop = self.host.wants_to_stop()
        with self._guarded():
            for f in finishing:  # the earlier starts first: a transport may hold one sync in flight at a time
                if f not in starting:
                    self._finish_fragment(f)
            for f in starting:
                self.syncs.start_sync(self.outer_sync, f, weight=self.schedule.fragment_weight(f), stop=stop)
                if f in finishing:
                    self._finish_fragment(f)

    def _finish_fragment(self, fragment: Optional[int]) -> None:
        assert self.outer_sync is not None
        result = None
        # not pending: a sync in flight in a checkpoint, dropped when a federated job joined (its quorum is gone)
        if fragment in self.outer_sync.pending:
            result = self.syncs.finish_sync(self.outer_sync, fragment, mix=self.config.overlap_mix)
        self.schedule.fragment_applied(fragment, applied=result is not None)
        if result is not None:  # None: dropped by the transport, the fragment syncs again at its next turn
            self._record(result)

    def _end_streaming_by_time(self, schedule: TimeBasedStreamingSchedule) -> None:
        """Time-based streaming at the end of training: apply the fragment in flight; unless another group's stop
        arrived, send this group's with the next fragment's sync, when it is due (as :meth:`train_end` does for a
        timed sync); then every group, now knowing that training ends, syncs each fragment once more with the tokens
        since its last sync, so that all end on one model (a sync carrying a stop keeps no local part of
        ``overlap_mix``: :meth:`OuterSync.finish_sync`)."""
        if schedule.in_flight is not None:
            in_flight, schedule.in_flight = schedule.in_flight, None
            self.stream([], [in_flight])
        if not self.stop_received:
            time.sleep(schedule.seconds_until_due())
            f = schedule.start_next()
            self.stream([f], [f], stop=True)
        for f in schedule.final_fragments():
            self.stream([f], [f], stop=True)

    def _launch_background(self, stop: bool) -> None:
        """``async_sync``: start a time-based sync of every parameter beside training, weighted by the tokens since
        the previous one started (a sync still in flight: none starts, the tokens go with the next)."""
        assert self.outer_sync is not None
        self.host.before_local_sgd_sync()
        if self.syncs.launch(self.outer_sync, weight=float(self.schedule.tokens_since_sync), stop=stop):
            self.schedule.synced()

    def _apply_background(self, take: Callable[[OuterSync], Optional[SyncResult]]) -> bool:
        """Apply the sync that ran beside training (``take``: the transport's poll or settle), if one is done; the
        time-based clock restarts here, when every job knows the others entered it (so the jobs' clocks do not drift
        apart). True when one was applied."""
        assert self.outer_sync is not None
        self.host.before_local_sgd_sync()
        result = take(self.outer_sync)
        if result is None:
            return False
        self.host.after_local_sgd_sync()
        self.schedule.start()
        self._record(result)
        return True

    def settle(self) -> None:
        """``async_sync``: wait for the sync running beside training, if any, and apply it (before a checkpoint and
        at the end of training: a consistent state with nothing in flight). Bounded by ``sync_timeout``."""
        if self.outer_sync is not None and self.syncs.background:
            self._apply_background(self.syncs.settle)

    def timed_sync(self, stop: bool) -> None:
        """Time-based sync: weight = tokens since the last sync; any group's ``stop`` ends training for all."""
        assert self.outer_sync is not None
        with self._guarded():
            result = self.syncs.sync(self.outer_sync, weight=float(self.schedule.tokens_since_sync), stop=stop)
        self.schedule.synced()
        self._record(result)

    def _record(self, result: SyncResult, cluster_result: Optional[SyncResult] = None) -> None:
        if result.stop_requested:  # time-based: a group asked every group to stop after this sync
            self.stop_received = True
            self.host.stop_training()
        self.last_sync = result
        self.sync_seconds_total += result.seconds
        self.host.on_local_sgd_sync(result, cluster_result)
        if result.skipped:
            self._skipped(result)
        elif result.fragment is None or result.fragment == self.config.fragments - 1:
            self.consecutive_skips = 0

    def _skipped(self, result: SyncResult) -> None:
        """A sync was dropped for non-finite values: reset the groups at fault; stop when it keeps happening."""
        assert self.outer_sync is not None
        if self.outer_sync.group_index in result.nonfinite_groups:
            self.host.reset_inner_optimizers()  # θ_i is back at θ_g, but e.g. AdamW's moments may hold the NaN that caused it
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.config.max_consecutive_skips:
            raise NonFinitePseudoGradientError(
                f"{self.consecutive_skips} consecutive syncs were skipped (non-finite values in worker groups "
                f"{result.nonfinite_groups}): training is not recovering. The global parameters are those of the last "
                "good sync. Lower the learning rate or enable gradient clipping, then resume from the last checkpoint "
                "(or raise max_consecutive_skips)."
            )

    @property
    def bytes_sent(self) -> int:
        """Cumulative bytes this rank put into cross-group collectives (both levels with two-stage sync)."""
        return sum(engine.bytes_sent for engine in self.engines)

    # ------------------------------------------------------------------ checkpoints
    def meta(self, world_size: int, **extra: Any) -> dict[str, Any]:
        """The layout and every counter: what every strategy writes once per checkpoint."""
        c = self.config
        return {
            "format_version": FORMAT_VERSION, "world_size": world_size, "group_size": c.group_size,
            "sync_every": c.sync_every, "warmup_steps": c.warmup_steps, "outer_optimizer": c.outer_name,
            "schedule": self.schedule.state_dict(), "sync_seconds_total": self.sync_seconds_total,
            "tokens_since_sync": self.schedule.tokens_since_sync, "fragments": c.fragments,
            "consecutive_skips": self.consecutive_skips, **self._data_record(), **extra,
        }

    def _data_record(self) -> dict[str, Any]:
        """Federated jobs sharing one dataset: the replicated record of who reads what (checkpoints and healing carry
        it with the counters)."""
        shares = getattr(self.syncs, "data_shares", None)
        return {"data_shares": shares.state_dict()} if shares is not None else {}

    def rank_state(self) -> dict[str, Any]:
        """This rank's engine states (snapshot slice, outer optimizer, error feedback, syncs in flight)."""
        return {"outer": self.outer_sync.state_dict() if self.outer_sync is not None else None,
                "cluster": self.cluster_sync.state_dict() if self.cluster_sync is not None else None}

    def restore(self, meta: Mapping[str, Any], outer: Optional[dict], cluster: Optional[dict] = None) -> None:
        """Restore the counters and this rank's engine states (now, or at :meth:`setup` if it has not run yet)."""
        if self.outer_sync is None:
            self._restored = (meta, outer, cluster)
        else:
            self._apply_restored(meta, outer, cluster)

    @property
    def restoring(self) -> bool:
        """A checkpoint's state waits for :meth:`setup` (so the initial weights must not be broadcast)."""
        return self._restored is not None

    def _apply_restored(self, meta: Mapping[str, Any], outer: Optional[dict], cluster: Optional[dict]) -> None:
        assert self.outer_sync is not None
        if self.cluster_sync is not None and cluster is not None:
            self.cluster_sync.load_state_dict(cluster)
        if outer is not None and outer.get("merged"):  # another layout: this rank's slice of the whole θ_g
            self.outer_sync.load_merged_state(outer)
        elif outer is not None:
            self.outer_sync.load_state_dict(outer)
        self.schedule.load_state_dict({"tokens_since_sync": meta.get("tokens_since_sync", 0), **meta["schedule"]})
        self.sync_seconds_total = float(meta.get("sync_seconds_total", 0.0))
        self.consecutive_skips = int(meta.get("consecutive_skips", 0))
        shares = getattr(self.syncs, "data_shares", None)
        if shares is not None:  # a checkpoint written before the record was kept has none: the record starts empty
            shares.load_state_dict(meta.get("data_shares"))

