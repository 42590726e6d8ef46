"""Federated worker groups: each job is one cluster; jobs meet at syncs through torchft.

Each job (its own SLURM job, torchrun or edge box, with its own ``torch.distributed`` world) is one worker group (DDP
inside it), or, with ``cluster_sync_every``, several worker groups that sync inside the job every ``sync_every`` steps
over its own process groups (level 1 of two-stage sync, the one-world machinery) while the jobs sync every
``cluster_sync_every`` steps here (level 2; :func:`~lightning_localsgd.topology.job_cluster_groups`). What crosses jobs
is the outermost level (:attr:`LocalSGDController.outermost_sync`). Groups find each other through torchft's
*lighthouse* (quorum, heartbeats) and sync over torchft's managed, reconfigurable process group, which pairs rank ``k``
of every live job (the same pairing as the cross groups of a single world). Nothing here is a home-made membership
service or store: the lighthouse, the :class:`torchft.Manager` per job rank, its process group and its healing transport
are torchft's.

**Every quorum is one sync (of the outermost level), or one warm-up step.** At each sync a group asks for a quorum,
then takes part in one weighted mean over the groups in it: a group weighs what its schedule says (1, or with
time-based sync the tokens it processed since its last sync) if it trained since its last sync, and 0 if it just
joined (or healed in that quorum), so the mean is over the groups that did the work and the same outer step runs
everywhere (``θ_g`` stays identical). The commit vote (``Manager.should_commit``) runs after the reduce and *before*
anything is written (:meth:`~lightning_localsgd.engine.comm.Communicator.commit`), so a sync that fails mid-way leaves
``θ_g``, the outer state and ``θ_i`` untouched; it is then redone with a new quorum of the groups left, until
``sync_timeout``. A warm-up step is one round as torchft's DDP runs it: the quorum at the step's start (a joiner heals
before its forward), the gradient mean after backward (the controller's, over :class:`TorchftCommunicator`), then the
commit vote; a step whose vote fails is not applied (no retry). A group that misses a sync the others committed heals
at its next quorum: its work since its last sync is dropped, counted in :attr:`Federation.dropped_weight` and logged.

**Healing.** A job starting while others run (new, or restarted with the same ``group_id``) joins at its
``on_train_start``: its manager is behind the others', so torchft fetches one live peer's state (its
:class:`~lightning_localsgd.state.TrainingState`, the same state a checkpoint holds: inner model and optimizers, LR
schedulers, ``θ_g``, outer optimizer state, schedule and trainer counters; with two levels both levels' engine
states; not the error feedback of compressed syncs, which starts from zero) and loads it on the training thread before
that quorum's sync, in which the joiner weighs 0.

**Every feature, one code path.** :class:`TorchftCommunicator` implements the whole
:class:`~lightning_localsgd.engine.comm.Communicator` interface (all-reduce, all-to-all, all-gather, commit vote), so
compressed syncs (the two-phase compressed all-reduce) and streaming syncs run on the engine unchanged. The
controller starts and applies every sync through :meth:`Federation.start_sync` / :meth:`Federation.finish_sync`:
each started sync (every parameter, or one streaming fragment) is one quorum and one commit; a failed attempt is
redone when no inner step ran since it started and dropped otherwise (``θ_g`` untouched; the fragment syncs at its
next turn).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Optional

from torch import Tensor

from ._compat import managed_process_group, quorum_started
from .engine.comm import Communicator, SyncAbortedError, Work
from .engine.outer import OuterSync, SyncResult
from .topology import check_group_size

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from .engine.schedules import SyncSchedule

__all__ = ["Federation", "TorchftCommunicator", "check_lighthouse_reachable", "federated_cluster_size",
           "federated_group_size", "lighthouse_url", "main_lighthouse", "refuse_unsupported"]

log = logging.getLogger(__name__)

#: Without ``sync_timeout``: how long a sync (quorum, reduce, healing, retries) may take in federated mode.
DEFAULT_SYNC_TIMEOUT = 600.0
#: Pause before redoing a failed sync attempt (the quorum request itself then waits for the groups left).
_RETRY_PAUSE = 0.05
#: How long connecting to the lighthouse may take at start (env ``TORCHFT_CONNECT_TIMEOUT_SEC`` overrides it).
DEFAULT_CONNECT_TIMEOUT = 30.0


def lighthouse_url(address: str) -> str:
    """``host:port`` (or ``http://host:port``) as torchft wants it."""
    return address if "://" in address else f"http://{address}"


def check_lighthouse_address(value: Any) -> None:
    """Raise a ``ValueError`` naming ``lighthouse`` unless it is ``host:port``."""
    text = value.split("://", 1)[-1] if isinstance(value, str) else ""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"lighthouse must be the lighthouse's 'host:port' (e.g. 'lighthouse-host:29510', started "
                         f"with `lightning-localsgd lighthouse --port 29510`), got {value!r}.")


def connect_timeout() -> float:
    return float(os.environ.get("TORCHFT_CONNECT_TIMEOUT_SEC", DEFAULT_CONNECT_TIMEOUT))


def check_lighthouse_reachable(address: str, timeout: float) -> None:
    """Fail fast, naming the address, when nothing listens there (torchft would retry until its own timeouts)."""
    text = address.split("://", 1)[-1]
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout
    last: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, deadline - time.monotonic())):
                return
        except OSError as err:
            last = err
            time.sleep(0.2)
    raise ConnectionError(
        f"local SGD: the lighthouse at {address!r} is unreachable ({last}); tried for {timeout:g} s. Start it with "
        f"`lightning-localsgd lighthouse --port {port}` on a host every job reaches, check the address and firewall, "
        "or raise the connect timeout with TORCHFT_CONNECT_TIMEOUT_SEC."
    )


def refuse_unsupported(config: Any) -> None:
    """The sync features that federated mode does not support, refused before training with the fix."""
    unsupported = {
        "cluster_size": (config.cluster_size, None, "in federated mode the job is the cluster, so cluster_size is "
                         "implied (the job's worker groups: its world size / group_size). Run one job per cluster; for "
                         "several worker groups per job set group_size below the job's world size and "
                         "cluster_sync_every for the sync across jobs"),
    }
    if config.cluster_sync_every is not None:  # several groups per job
        unsupported["warmup_steps"] = (config.warmup_steps, 0, "with several worker groups per job a warm-up step "
                                       "would average gradients inside the job and across jobs in one vote, which "
                                       "federated warm-up does not do; use one group per job for warm-up")
    for name, (value, default, why) in unsupported.items():
        if value != default:
            raise ValueError(f"{name}={value!r} is not supported with lighthouse= (federated worker groups): {why}. "
                             f"Leave {name}={default!r}, or train in one world without lighthouse.")
    gap = config.sync_every // max(1, config.fragments)  # steps between two fragments' starts
    if config.overlap_steps >= gap:
        raise ValueError(
            f"overlap_steps={config.overlap_steps} with lighthouse= (federated worker groups) must be smaller than "
            f"sync_every/fragments={gap}: each fragment's sync is one quorum of torchft's manager, which holds one "
            f"quorum at a time, so a fragment's sync must be applied before the next one starts. Use overlap_steps <= "
            f"{gap - 1}, or fewer fragments.")


def federated_group_size(group_size: Optional[int], world_size: int) -> int:
    """One level (no ``cluster_sync_every``): the job's own world is the worker group."""
    if group_size not in (None, 1, world_size):
        raise ValueError(
            f"group_size={group_size} with lighthouse= and no cluster_sync_every: without a sync across jobs each job "
            f"is one worker group, so group_size is the job's world size ({world_size}). For several worker groups "
            "per job (syncing every sync_every steps inside it) set cluster_sync_every, a multiple of sync_every, for "
            "the sync across jobs; or leave group_size unset.")
    return world_size


def federated_cluster_size(group_size: int, world_size: int, cluster_sync_every: int) -> int:
    """Two levels (``cluster_sync_every``): the job is the cluster; returns its number of worker groups."""
    check_group_size(world_size, group_size)
    if group_size == world_size:
        below = [d for d in range(1, world_size) if world_size % d == 0]
        fix = (f"set group_size to a divisor of {world_size} below it (e.g. {below[-1]}, or the devices per node for "
               "a group per node)") if below else "run the job on more ranks (devices, num_nodes)"
        raise ValueError(
            f"cluster_sync_every={cluster_sync_every} with lighthouse= needs several worker groups per job, but "
            f"group_size={group_size} makes the job's {world_size} rank(s) one worker group (then the jobs sync every "
            f"sync_every steps and there is no second level). Either {fix}, or remove cluster_sync_every.")
    return world_size // group_size


class _CheckedWork:
    """A torchft collective in flight; a failure is reported to the manager (so the commit vote says no) and raised."""

    def __init__(self, manager: Any, work: Any, timeout: timedelta) -> None:
        self.manager, self.work, self.timeout = manager, work, timeout

    def wait(self) -> None:
        try:
            self.work.wait(self.timeout)
        except Exception as err:
            self.manager.report_error(err)
            raise


class TorchftCommunicator(Communicator):
    """The cross-group communicator over torchft's managed process group: the groups of the current quorum.

    ``rank`` is this group's index in the quorum and ``size`` the number of participants; both change from one
    quorum to the next. :meth:`commit` is the manager's vote: False if any collective of this attempt failed on any
    rank of this job, or fewer than ``min_groups`` groups took part.
    """

    def __init__(self, manager: Any, timeout: timedelta) -> None:
        self.manager = manager
        self.timeout = timeout

    @property
    def size(self) -> int:
        return max(1, self.manager.num_participants())

    @property
    def rank(self) -> int:
        rank = self.manager.participating_rank() if quorum_started(self.manager) else 0
        return int(rank or 0)

    def _run(self, launch: Any) -> _CheckedWork:
        try:
            return _CheckedWork(self.manager, launch(), self.timeout)
        except Exception as err:
            self.manager.report_error(err)
            raise

    def all_reduce(self, tensor: Tensor, op: str = "sum", async_op: bool = False) -> Optional[Work]:
        from torch.distributed import AllreduceOptions, ReduceOp

        opts = AllreduceOptions()
        opts.reduceOp = {"sum": ReduceOp.SUM, "max": ReduceOp.MAX}[op]
        work = self._run(lambda: managed_process_group(self.manager).allreduce([tensor], opts))
        if async_op:
            return work
        work.wait()
        return None

    def all_to_all(self, output: Tensor, input: Tensor, async_op: bool = False) -> Optional[Work]:
        from torch.distributed import AllToAllOptions

        # equal splits (empty split lists), as all_to_all_single: member j gets the j-th chunk of every input
        work = self._run(
            lambda: managed_process_group(self.manager).alltoall_base(output, input, [], [], AllToAllOptions()))
        if async_op:
            return work
        work.wait()
        return None

    def all_gather(self, output: Tensor, input: Tensor) -> None:
        from torch.distributed.distributed_c10d import AllgatherOptions

        # gloo's allgather into one list of views of ``output``, in member order (the managed PG's ranks are the
        # quorum's participating ranks)
        views = list(output.split(input.numel()))
        self._run(lambda: managed_process_group(self.manager).allgather([views], [input], AllgatherOptions())).wait()

    def commit(self) -> bool:
        return bool(self.manager.should_commit())

    def __repr__(self) -> str:
        return "TorchftCommunicator()"


@dataclass
class _Attempt:
    """One sync attempt over a quorum: its record (see :attr:`Federation.attempts`), what a redo needs."""

    record: dict[str, Any]
    weight: Optional[float]
    stop: Optional[bool]
    deadline: float
    began: float
    inner_steps: int


class Federation:
    """One job rank's membership: its torchft Manager, the sync loop over quorums, healing state.

    Built by the strategy once the job's own process group exists (the job's ``TCPStore`` at
    ``MASTER_ADDR:MASTER_PORT`` is the store torchft's manager needs).
    """

    def __init__(self, lighthouse: str, group_id: Optional[str], min_groups: int,
                 sync_timeout: Optional[float]) -> None:
        self.lighthouse = lighthouse
        self.group_id = group_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.min_groups = min_groups
        self.timeout = timedelta(seconds=sync_timeout or DEFAULT_SYNC_TIMEOUT)
        self.manager: Any = None
        self.comm: Optional[TorchftCommunicator] = None
        self.strategy: Any = None
        self.trainer: Optional["Trainer"] = None
        self.inner_steps = 0
        """Inner steps this group took (``trained = True`` after each one counts it)."""
        self._synced_at: dict[Optional[int], int] = {None: 0}
        """:attr:`inner_steps` when each fragment's last committed sync started (``None``: every parameter's)."""
        self.healed_from_peer = 0
        """How many times this group loaded a live peer's state."""
        self.attempts: list[dict[str, Any]] = []
        """Per quorum: kind (join, sync, warmup), step, fragment, participants, rank, weight sent, stop, healed,
        committed, seconds in all and quorum_seconds waiting for the quorum (for logs and tests)."""
        self.dropped_weight = 0.0
        """The weight (tokens with time-based sync, else intervals) of work this group lost by missing a sync."""
        self._open_round: Optional[dict[str, Any]] = None
        """A warm-up step's quorum whose vote is still to come (:meth:`end_round`)."""
        self._open: dict[Optional[int], _Attempt] = {}
        """Syncs started over a quorum and not yet finished, by fragment (``None``: every parameter)."""
        self._unit: Optional[int] = None
        self._peer_unit: Optional[int] = None
        self._healed_now = False

    # ------------------------------------------------------------------ setup
    def start(self, strategy: Any, trainer: "Trainer") -> TorchftCommunicator:
        """Create this rank's Manager (rank k of the job joins torchft's replica rank k) and the communicator."""
        from torchft import Manager, ProcessGroupGloo

        self.strategy, self.trainer = strategy, trainer
        check_lighthouse_reachable(self.lighthouse, connect_timeout())
        store_addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        store_port = int(os.environ["MASTER_PORT"])
        self.manager = Manager(
            pg=ProcessGroupGloo(timeout=self.timeout), load_state_dict=self.load_state_dict,
            state_dict=self.state_dict, min_replica_size=self.min_groups, use_async_quorum=False,
            timeout=self.timeout, quorum_timeout=self.timeout,
            connect_timeout=timedelta(seconds=connect_timeout()), rank=trainer.global_rank,
            world_size=trainer.world_size, store_addr=store_addr, store_port=store_port,
            lighthouse_addr=lighthouse_url(self.lighthouse), replica_id=self.group_id,
            init_sync=False,  # every group of a fresh run starts from the same weights (rank 0's, by seed)
        )
        self.comm = TorchftCommunicator(self.manager, self.timeout)
        return self.comm

    def shutdown(self) -> None:
        if self.manager is not None:
            self.manager.shutdown(wait=False)
            self.manager = None

    # ------------------------------------------------------------------ weights
    @property
    def trained(self) -> bool:
        """Whether this group took inner steps since its last sync. Set it True after every inner step; False
        forgets them (a group that joins weighs 0 until it trains)."""
        return self.inner_steps > max(self._synced_at.values())

    @trained.setter
    def trained(self, value: bool) -> None:
        if value:
            self.inner_steps += 1
        else:
            self._synced_at = {None: self.inner_steps}

    def _trained_for(self, engine: OuterSync, fragment: Optional[int]) -> bool:
        """Whether the values this sync sends moved since they were last synced: one fragment's, or (a sync of every
        parameter) any fragment's. This group's weight in that sync is 0 otherwise."""
        units = [fragment] if fragment is not None else range(engine.num_fragments)
        since_all = self._synced_at.get(None, -1)
        return any(self.inner_steps > max(self._synced_at.get(u, -1), since_all) for u in units)

    def _committed(self, fragment: Optional[int], inner_steps: int) -> None:
        if fragment is None:
            self._synced_at = {None: inner_steps}
        else:
            self._synced_at[fragment] = inner_steps

    # ------------------------------------------------------------------ syncs
    # The controller runs every sync through start_sync / finish_sync / sync (as it does DirectSyncs' in one world):
    # each started sync is one quorum and one commit vote, whether it is a sync of every parameter or one fragment's.
    # A failed attempt leaves θ_g, the outer state and the error feedback as they were; it is redone over a new quorum
    # when no inner step ran since it started (a whole sync, a fragment without overlap), and dropped otherwise (a
    # fragment with overlap: θ_i moved on; that fragment syncs at its next turn).
    def join(self, engine: OuterSync, schedule: Optional["SyncSchedule"] = None) -> None:
        """At ``on_train_start``: this group's first quorum, weight 0, in which it heals from a live peer when the
        others are ahead. Then it does what the others do in that quorum, as its ``schedule`` (a peer's, once healed)
        says: in warm-up the quorum is the next warm-up step's (the vote comes after backward, :meth:`end_round`);
        after it, the sync the others run: every parameter, or, mid-stream, the fragment they start (applied when
        this group's schedule, now the peers', applies it), with the stop flag of a time-based sync."""
        self.trained = False
        for fragment in list(engine.pending):  # syncs in flight from a checkpoint: their quorum is gone
            engine.drop_sync(fragment)
        stop = False if schedule is not None and not schedule.lockstep else None
        deadline = time.monotonic() + self.timeout.total_seconds()
        while True:
            began = time.perf_counter()
            record = self._quorum("join", None, deadline)
            if schedule is not None and schedule.in_warmup:
                self._open_round = dict(record, kind="warmup", _start=began)
                return
            fragment = self._unit = self._peer_unit if self._healed_now else None
            if self._launch(engine, record, fragment, 0.0, stop, deadline, began):
                break
        if fragment is None or not self._overlaps():
            self.finish_sync(engine, fragment)
        if stop is not None and schedule is not None:
            schedule.synced()  # the interval (its clock and tokens; a peer's, once healed) starts now

    def sync(self, engine: OuterSync, weight: Optional[float] = None, stop: Optional[bool] = None) -> SyncResult:
        """One sync of every parameter over the groups of a quorum; a failed attempt is redone with a new quorum
        until the timeout."""
        self.start_sync(engine, None, weight, stop)
        result = self.finish_sync(engine, None)
        assert result is not None  # no inner step between its start and finish: redone, never dropped
        return result

    def start_sync(self, engine: OuterSync, fragment: Optional[int] = None, weight: Optional[float] = None,
                   stop: Optional[bool] = None, deadline: Optional[float] = None) -> None:
        """Form a quorum and launch the sync of ``fragment`` over it; redone with a new quorum until it launches or
        ``sync_timeout`` passes. This group's weight: ``weight`` (the schedule's; ``None``: 1) if it trained since its
        last sync and did not heal now, else 0."""
        deadline = deadline if deadline is not None else time.monotonic() + self.timeout.total_seconds()
        while True:
            began = time.perf_counter()
            record = self._quorum("sync", fragment, deadline)
            if self._launch(engine, record, fragment, weight, stop, deadline, began):
                return

    def _quorum(self, kind: str, fragment: Optional[int], deadline: float) -> dict[str, Any]:
        """One quorum (healing this group when the others are ahead); the start of its record."""
        self._healed_now = False
        self._unit = fragment  # what a peer healing in this quorum takes part in (see state_dict)
        waited = time.perf_counter()
        self.manager.start_quorum(timeout=timedelta(seconds=max(1.0, deadline - time.monotonic())))
        assert self.comm is not None
        return {"kind": kind, "step": self._step(), "participants": self.comm.size, "rank": self.comm.rank,
                "healed": self._healed_now, "quorum_seconds": time.perf_counter() - waited}

    def _launch(self, engine: OuterSync, record: dict[str, Any], fragment: Optional[int], weight: Optional[float],
                stop: Optional[bool], deadline: float, began: float) -> bool:
        """Launch the sync of ``fragment`` over the quorum just formed; False: the attempt failed (recorded, voted,
        paused; the caller forms a new quorum)."""
        assert engine.cross is self.comm  # the engine reads the quorum from it
        trained = self._trained_for(engine, fragment)
        if trained and self._healed_now:  # it missed a sync the others committed: its work is replaced by a peer's
            lost = 1.0 if weight is None else float(weight)
            record["dropped_weight"] = lost
            self.dropped_weight += lost
            log.warning(f"local SGD: group {self.group_id} missed a sync of the other groups and healed from a live "
                        f"peer; the work since its last sync (weight {lost:g}) is dropped")
        own = (1.0 if weight is None else float(weight)) if trained and not self._healed_now else 0.0
        record.update(fragment=fragment, weight=own, stop=stop)
        attempt = _Attempt(record, weight, stop, deadline, began, self.inner_steps)
        try:
            engine.start_sync(fragment, weight=own, stop=stop)
        except Exception as err:
            if not self._failed(attempt, err):
                raise
            self._pause_or_give_up(attempt, err)
            return False
        self._open[fragment] = attempt
        return True

    def finish_sync(self, engine: OuterSync, fragment: Optional[int] = None,
                    mix: float = 0.0) -> Optional[SyncResult]:
        """Apply the sync :meth:`start_sync` launched, if the quorum's vote says so. A failed attempt is redone (no
        inner step since its start) or dropped (``None``: θ_g, the outer state, the error feedback and the parameters as
        they were)."""
        while True:
            attempt = self._open.pop(fragment)
            try:
                result = engine.finish_sync(fragment, mix=mix)
            except Exception as err:
                if not self._failed(attempt, err):
                    raise
                if self._step() != attempt.record["step"]:  # inner steps since the start: θ_i moved on
                    log.warning(f"local SGD: the federated sync of fragment {fragment} started at step "
                                f"{attempt.record['step']} failed ({err}); dropped (θ_g untouched), it syncs again "
                                "at its next turn")
                    return None
                self._pause_or_give_up(attempt, err)
                self.start_sync(engine, fragment, attempt.weight, attempt.stop, deadline=attempt.deadline)
                continue
            attempt.record.update(committed=True, seconds=time.perf_counter() - attempt.began)
            self.attempts.append(attempt.record)
            self._committed(fragment, attempt.inner_steps)
            return result

    # ------------------------------------------------------------------ warm-up steps
    def start_round(self) -> None:
        """A warm-up step starts: its quorum (healing a joining group before its forward). The vote on applying the
        step comes after the gradient mean (:meth:`end_round`). No retry: a step whose vote fails is not applied."""
        if self._open_round is not None:
            return  # the join's quorum is this step's
        began = time.perf_counter()
        self._open_round = dict(self._quorum("warmup", None, time.monotonic() + self.timeout.total_seconds()),
                                _start=began)

    def end_round(self, committed: bool) -> None:
        """The vote of the warm-up step :meth:`start_round` (or the join) opened."""
        record, self._open_round = self._open_round, None
        if record is None:
            return
        record.update(committed=committed, seconds=time.perf_counter() - record.pop("_start"))
        self.attempts.append(record)
        if not committed:
            log.warning(f"local SGD: the federated warm-up step {record['step']} failed (a collective failed or too "
                        "few groups took part); its update is not applied")

    def _failed(self, attempt: "_Attempt", err: BaseException) -> bool:
        """Record a failed attempt and cast this rank's vote; False: not a transport failure (a bug: raise it)."""
        if isinstance(err, SyncAbortedError):
            pass  # the vote said no (a collective failed here or on a rank of this job)
        elif self.manager.errored() is not None:
            self.manager.should_commit()  # the other ranks of this job wait for this rank's vote
        else:
            return False
        attempt.record.update(committed=False, seconds=time.perf_counter() - attempt.began, error=str(err)[:200])
        self.attempts.append(attempt.record)
        log.warning(f"local SGD: federated sync at step {attempt.record['step']} failed ({err})")
        return True

    def _pause_or_give_up(self, attempt: "_Attempt", err: BaseException) -> None:
        if time.monotonic() >= attempt.deadline:
            raise TimeoutError(
                f"local SGD: the federated sync at step {attempt.record['step']} did not succeed within sync_timeout="
                f"{self.timeout.total_seconds():g} s (last error: {err}). Check that at least min_groups="
                f"{self.min_groups} groups are running and reach the lighthouse {self.lighthouse}."
            ) from err
        time.sleep(_RETRY_PAUSE)

    def _step(self) -> int:
        return int(self.strategy.local_sgd.schedule.steps_done) if self.strategy is not None else 0

    def _overlaps(self) -> bool:
        """Whether a fragment's sync is applied some steps after it starts (streaming with ``overlap_steps``)."""
        return self.strategy is not None and self.strategy.local_sgd.config.overlap_steps > 0

    # ------------------------------------------------------------------ healing
    def state_dict(self) -> dict[str, Any]:
        """What a joining group receives: this rank's :class:`~lightning_localsgd.state.TrainingState` (the same
        parts a checkpoint holds), cloned to the CPU, without the error feedback of compressed syncs (a joiner
        starts from zero: the residuals are this group's own), and which fragment this quorum syncs (``None``:
        every parameter). torchft calls it only when a peer heals, while this rank's training thread waits in the
        quorum (before anything of this sync is launched, so no sync is in flight)."""
        assert self.strategy is not None
        state = self.strategy.training_state.capture()
        for level in ("outer", "cluster"):  # both levels' engines (two levels: the job's and the jobs')
            engine_state = state["rank"].get(level)
            if engine_state is not None:
                engine_state.update(compression_error=None, compression_mean_error={},
                                    compression_mean_error_owner={})
        state["federation"] = {"fragment": self._unit}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Apply a live peer's state on the training thread (torchft calls it inside ``start_quorum``)."""
        assert self.strategy is not None
        self.strategy.training_state.load(state)
        self._peer_unit = state.get("federation", {}).get("fragment")
        self._healed_now = True
        self.healed_from_peer += 1
        log.info(f"local SGD: group {self.group_id} healed from a live peer at step "
                 f"{state['counters']['global_step']}")


# ---------------------------------------------------------------------------------------------------- lighthouse CLI
def main_lighthouse(argv: list[str]) -> None:
    """``lightning-localsgd lighthouse``: run torchft's lighthouse in this process until interrupted."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="lightning-localsgd lighthouse",
        description="Start torchft's lighthouse: the quorum service federated worker groups (jobs started with "
                    "lighthouse=HOST:PORT) meet at. Run it once, on a host every job reaches. See docs/multi_cluster.md.")
    parser.add_argument("--port", type=int, default=29510, help="port to listen on (default 29510; 0: any free one)")
    parser.add_argument("--bind", default="[::]", help="address to bind (default [::], every interface)")
    parser.add_argument("--min-groups", type=int, default=1, help="fewest groups in a quorum (default 1)")
    parser.add_argument("--join-timeout-ms", type=int, default=10000,
                        help="how long a quorum waits for heartbeating groups to join (default 10000)")
    parser.add_argument("--heartbeat-timeout-ms", type=int, default=5000,
                        help="after this long without a heartbeat a group counts as gone (default 5000)")
    parser.add_argument("--quorum-tick-ms", type=int, default=100, help="quorum check interval (default 100)")
    args = parser.parse_args(argv)
    if args.min_groups < 1:
        parser.error("--min-groups must be >= 1")
    from torchft.coordination import LighthouseServer

    server = LighthouseServer(bind=f"{args.bind}:{args.port}", min_replicas=args.min_groups,
                              join_timeout_ms=args.join_timeout_ms, quorum_tick_ms=args.quorum_tick_ms,
                              heartbeat_timeout_ms=args.heartbeat_timeout_ms)
    port = server.address().rsplit(":", 1)[-1]
    print(f"lighthouse listening on {socket.gethostname()}:{port} ({server.address()}); pass "
          f"lighthouse=\"{socket.gethostname()}:{port}\" to every job. Ctrl-C stops it.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
