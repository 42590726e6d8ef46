"""One rank's local SGD, without Lightning: the arguments, the schedule, the engines, the guard, the checkpoint state.

A strategy builds a :class:`LocalSGDController` from its :class:`~.config.LocalSGDConfig`, calls :meth:`setup` once the
process groups and the tensors to sync exist, :meth:`step_end` after every training step that stepped an optimizer
and :meth:`train_end` when training ends. The controller asks the schedule what the step does and runs it through the
engines (:class:`~.engine.OuterSync`, one per sync level) under the sync guard. The strategy hands itself in at
construction as the controller's host (:class:`SyncHost`: the methods the controller calls on it, declared once).
The outermost syncs, and the membership around them (start, join, warm-up rounds, inner steps, shutdown), run through
one object the controller alone talks to (:class:`Syncs`): :class:`DirectSyncs` in one world, a federation's across
jobs (:func:`make_syncs` picks it from the arguments). Checkpoints: :meth:`meta` (layout and every counter, the same
for every strategy) and :meth:`rank_state` (this rank's engine state), restored with :meth:`restore`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence

import torch
from torch import Tensor

from .config import LocalSGDConfig
from .engine import NonFinitePseudoGradientError, OuterSync, ProcessGroupCommunicator, SyncResult
from .engine.comm import Communicator, as_communicator
from .engine.schedules import Action, SyncSchedule, TimeBasedSchedule, TimeBasedStreamingSchedule
from .federation import Federation
from .reliability import SyncGuard
from .topology import Topology

if TYPE_CHECKING:
    from .state import TrainingState

__all__ = ["CHECKPOINT_KEY", "FORMAT_VERSION", "DirectSyncs", "HostFacts", "LocalSGDController", "NoHost", "SyncHost",
           "Syncs", "make_syncs"]

#: Where a checkpoint keeps the local-SGD state (a key of the checkpoint dict, or of its ``meta.pt``).
CHECKPOINT_KEY = "local_sgd"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class HostFacts:
    """What a transport across jobs needs of the rank that runs the controller (its strategy and trainer), handed to
    :meth:`Syncs.start` explicitly, so that the transport holds no strategy."""

    rank: int
    """This rank's global rank in its job's own world."""
    world_size: int
    """The ranks of that world."""
    training_state: Callable[[], "TrainingState"]
    """This rank's exact training state (what healing sends to a joining peer, and loads from a live one)."""
    global_step: Callable[[], int] = lambda: 0
    """The trainer's optimizer steps (where training starts from, for the log)."""
    checkpoint_path: Callable[[], Optional[str]] = lambda: None
    """The checkpoint ``fit`` resumed from, if any (for the log)."""
    data_position: Callable[[], Optional[tuple[int, int]]] = lambda: None
    """Where the training loader is: ``(epoch, samples)`` of its epoch's order (:func:`~lightning_localsgd.data.
    data_position`), ``None`` without a resumable loader."""
    continue_data_at: Callable[[int, int], bool] = lambda epoch, samples: False
    """Make the training continue its data at ``(epoch, samples)`` (healing: the job's last committed position);
    False where it cannot (no resumable loader, or its epoch already iterating)."""


class Syncs(Protocol):
    """How the syncs of the outermost level run, and the membership around them: the one object the controller talks
    to about the transport, whichever carries it. A feature (compression, streaming, ...) is written once, against it.

    :class:`DirectSyncs` runs them over a fixed set of groups (one world: every attempt goes through, a failure is an
    error, the membership calls do nothing); :class:`~lightning_localsgd.federation.Federation` over torchft's quorums
    of jobs (each attempt one quorum and one commit vote, a failed attempt redone or dropped; a job joins, heals and
    leaves)."""

    across_jobs: bool
    """Whether the groups are separate jobs that meet at syncs (then :meth:`join` runs before the first step)."""

    def start(self, schedule: SyncSchedule, config: LocalSGDConfig, host: Optional[HostFacts]) -> Optional[Communicator]:
        """Before the engines are built: connect. Returns the communicator the outermost level crosses jobs over
        (``None``: the topology's own process groups)."""
        ...

    def join(self, engine: OuterSync) -> None:
        """Training starts: meet the running groups over ``engine`` (the outermost level), healing from one when they
        are ahead."""
        ...

    def start_round(self) -> None:
        """A warm-up step starts (across jobs: its quorum, which heals a joining group before its forward)."""
        ...

    def end_round(self, committed: bool) -> None:
        """The vote on a warm-up step's gradient mean was taken."""
        ...

    def inner_step(self) -> None:
        """This group took an inner step (it weighs in at its next sync)."""
        ...

    def start_sync(self, engine: OuterSync, fragment: Optional[int] = None, weight: Optional[float] = None,
                   stop: Optional[bool] = None) -> None:
        """Launch the sync of ``fragment`` (``None``: every parameter)."""
        ...

    def finish_sync(self, engine: OuterSync, fragment: Optional[int] = None, mix: float = 0.0) -> Optional[SyncResult]:
        """Apply it; ``None`` when the transport dropped it (θ_g and the parameters untouched)."""
        ...

    def sync(self, engine: OuterSync, weight: Optional[float] = None, stop: Optional[bool] = None) -> SyncResult:
        """A sync of every parameter, started and applied now."""
        ...

    def shutdown(self) -> None:
        """Training is over for good (the strategy's teardown): leave."""
        ...


class DirectSyncs:
    """:class:`Syncs` over a fixed set of groups (one world): every attempt goes through, a failure is an error, and
    there is no membership to manage."""

    across_jobs = False

    def start(self, schedule: SyncSchedule, config: LocalSGDConfig, host: Optional[HostFacts]) -> Optional[Communicator]:
        return None

    def join(self, engine: OuterSync) -> None:
        pass

    def start_round(self) -> None:
        pass

    def end_round(self, committed: bool) -> None:
        pass

    def inner_step(self) -> None:
        pass

    def start_sync(self, engine: OuterSync, fragment: Optional[int] = None, weight: Optional[float] = None,
                   stop: Optional[bool] = None) -> None:
        engine.start_sync(fragment, weight=weight, stop=stop)

    def finish_sync(self, engine: OuterSync, fragment: Optional[int] = None, mix: float = 0.0) -> Optional[SyncResult]:
        return engine.finish_sync(fragment, mix=mix)

    def sync(self, engine: OuterSync, weight: Optional[float] = None, stop: Optional[bool] = None) -> SyncResult:
        return engine.sync(weight=weight, stop=stop)

    def shutdown(self) -> None:
        pass


def make_syncs(config: LocalSGDConfig) -> Syncs:
    """The :class:`Syncs` the arguments ask for: with ``lighthouse`` a federation of jobs (torchft), else
    :class:`DirectSyncs`."""
    if config.lighthouse is None:
        return DirectSyncs()
    return Federation(config.lighthouse, config.group_id, config.min_groups, config.sync_timeout)


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
        syncs: how the syncs of the outermost level (:attr:`outermost_sync`) run (:class:`Syncs`). Default: the one
            the arguments ask for (:func:`make_syncs`): :class:`DirectSyncs`, or with ``lighthouse`` a federation's
            (over quorums of jobs, a failed attempt redone or dropped). Level 1 of two-stage sync runs directly.
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
        if not self.schedule.in_warmup or self.warmup_comm is None:
            return closure

        def reduce_after(*args: Any, **kwargs: Any) -> Any:
            out = closure(*args, **kwargs)
            self._average_gradients(optimizer)
            return out

        return reduce_after

    @torch.no_grad()
    def _average_gradients(self, optimizer: Any) -> None:
        """The mean gradient over the groups of this step, or, when the members vote against the step (a fault-
        tolerant transport whose collective failed), no gradient at all: the optimizer then skips every parameter."""
        comm = self.warmup_comm
        assert comm is not None
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        failed: Optional[BaseException] = None
        grads = []
        flat = None
        if comm.size > 1:
            for p in params:
                if p.grad is None:  # as DDP with find_unused_parameters: an unused parameter gets a zero gradient
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad.detach().to_local() if hasattr(p.grad, "to_local") else p.grad)
            if grads:
                flat = torch.cat([g.reshape(-1) for g in grads])
                try:
                    comm.all_reduce(flat)
                except Exception as err:  # noqa: BLE001 (fatal unless the members vote to drop the step)
                    failed = err
        committed = comm.commit()
        if failed is not None and committed:
            raise failed  # a transport without a vote (one world): a failed collective ends training
        self.syncs.end_round(committed)
        if not committed:  # as torchft's OptimizerWrapper: the step is not applied
            for p in params:
                p.grad = None
            return
        if flat is None:
            return
        flat.div_(comm.size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def record_tokens(self, tokens: int) -> None:
        if self.schedule.counts_tokens:
            self.schedule.record_tokens(tokens)

    def step_end(self) -> None:
        """A training step that stepped an optimizer is over: do what the schedule says."""
        self.syncs.inner_step()  # this group weighs in at its next sync
        action = self.schedule.step()
        if action is Action.END_WARMUP:
            for engine in self.engines:
                engine.reset_snapshot()  # all ranks hold the same parameters after synchronous steps
        elif action is Action.SYNC:
            self.sync()
        elif action is Action.SYNC_ALL:
            self.sync(all_levels=True)
        elif action is Action.STREAM:  # after a stop every group only applies what is in flight (train_end syncs)
            self.stream([] if self.stop_received else self.schedule.starting, self.schedule.finishing)
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
            "consecutive_skips": self.consecutive_skips, **extra,
        }

    def rank_state(self) -> dict[str, Any]:
        """This rank's engine states (snapshot slice, outer optimizer, error feedback, syncs in flight)."""
        return {"outer": self.outer_sync.state_dict() if self.outer_sync is not None else None,
                "cluster": self.cluster_sync.state_dict() if self.cluster_sync is not None else None}

    def check_meta(self, meta: Mapping[str, Any], world_size: int) -> None:
        """Raise a ``ValueError`` saying what changed when a checkpoint cannot be resumed exactly by this run."""
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unknown local-SGD checkpoint format {meta.get('format_version')!r}.")
        if meta["world_size"] != world_size or meta["group_size"] != self.config.group_size:
            raise ValueError(
                f"cannot resume local SGD exactly: the checkpoint was written by {meta['world_size']} ranks in worker "
                f"groups of {meta['group_size']}, this run has {world_size} ranks and group_size="
                f"{self.config.group_size}. Resume with the same devices, num_nodes and group_size; or load only the "
                "weights into a new run (e.g. `LightningModule.load_from_checkpoint`) to start a fresh local-SGD run "
                "from them."
            )
        if meta.get("fragments", 1) != self.config.fragments:
            raise ValueError(
                f"cannot resume local SGD exactly: the checkpoint was written with fragments={meta.get('fragments', 1)}"
                f", this run has fragments={self.config.fragments} (streaming syncs in flight belong to the old "
                "fragments). Resume with the same fragments, or load only the weights into a new run."
            )

    def check_elastic(self, meta: Mapping[str, Any]) -> None:
        """Raise a ``ValueError`` when a checkpoint of another layout cannot be resumed from its ``θ_g``."""
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unknown local-SGD checkpoint format {meta.get('format_version')!r}.")
        c = self.config
        features = {"cluster_size": c.cluster_size, "fragments": c.fragments if c.fragments != 1 else None,
                    "sync_every_seconds": c.sync_every_seconds}
        used = {k: v for k, v in features.items() if v is not None}
        if used or meta.get("fragments", 1) != 1:
            raise ValueError(
                f"cannot resume local SGD on another world size or group_size with {used or {'fragments': meta.get('fragments')}}: "
                f"the checkpoint was written by {meta['world_size']} ranks in worker groups of {meta['group_size']}, "
                f"this run has group_size={c.group_size}. Resume with the same devices, num_nodes and group_size; "
                "elastic resume supports the periodic sync of one level."
            )

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

