"""Federated worker groups: each job is one worker group; groups meet at syncs through torchft.

Each job (its own SLURM job, torchrun or edge box, with its own ``torch.distributed`` world) is one worker group; DDP
runs inside it as usual. Groups find each other through torchft's *lighthouse* (quorum, heartbeats) and sync over
torchft's managed, reconfigurable process group, which pairs rank ``k`` of every live group (the same pairing as the
cross groups of a single world). Nothing here is a home-made membership service or store: the lighthouse, the
:class:`torchft.Manager` per job rank, its process group and its healing transport are torchft's.

**Every quorum is one sync, or one warm-up step.** At each sync a group asks for a quorum, then takes part in one
weighted mean over the groups in it: a group weighs what its schedule says (1, or with time-based sync the tokens it
processed since its last sync) if it trained since its last sync, and 0 if it just joined (or healed in that
quorum), so the mean is over the groups that did the work and the same outer step runs everywhere (``θ_g`` stays
identical). The commit vote (``Manager.should_commit``) runs after the reduce and *before* anything is written
(:meth:`~lightning_localsgd.engine.comm.Communicator.commit`), so a sync that fails mid-way leaves ``θ_g``, the outer
state and ``θ_i`` untouched; it is then redone with a new quorum of the groups left, until ``sync_timeout``. A warm-up
step is one round as torchft's DDP runs it: the quorum at the step's start (a joiner heals before its forward), the
gradient mean after backward (the controller's, over :class:`TorchftCommunicator`), then the commit vote; a step
whose vote fails is not applied (no retry).

**Healing.** A job starting while others run (new, or restarted with the same ``group_id``) joins at its
``on_train_start``: its manager is behind the others', so torchft fetches one live peer's state (its
:class:`~lightning_localsgd.state.TrainingState`, the same state a checkpoint holds: inner model and optimizers, LR
schedulers, ``θ_g``, outer optimizer state, schedule and trainer counters) and loads it on the training thread before that quorum's sync, in which the joiner weighs 0.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Optional

from torch import Tensor

from .engine.comm import Communicator, SyncAbortedError, Work
from .engine.outer import OuterSync, SyncResult

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from .engine.schedules import SyncSchedule

__all__ = ["Federation", "TorchftCommunicator", "check_lighthouse_reachable", "lighthouse_url", "main_lighthouse",
           "refuse_unsupported"]

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
        "cluster_size": (config.cluster_size, None, "two-stage sync needs every cluster in one world; in federated "
                         "mode each job is one group: run one job per cluster instead"),
        "compression": (config.compression, None, "the weighted federated mean sends fp32"),
        "fragments": (config.fragments, 1, "streaming syncs would straddle quorums"),
        "overlap_steps": (config.overlap_steps, 0, "streaming syncs would straddle quorums"),
    }
    for name, (value, default, why) in unsupported.items():
        if value != default:
            raise ValueError(f"{name}={value!r} is not supported with lighthouse= (federated worker groups): {why}. "
                             f"Leave {name}={default!r}, or train in one world without lighthouse.")


def federated_group_size(group_size: Optional[int], world_size: int) -> int:
    """In federated mode the job's own world is the worker group."""
    if group_size not in (None, 1, world_size):
        raise ValueError(f"group_size={group_size} with lighthouse=: in federated mode each job is one worker group, "
                         f"so group_size is the job's world size ({world_size}). Leave group_size unset.")
    return world_size


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
        rank = self.manager.participating_rank() if self.manager._quorum_future is not None else 0
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
        work = self._run(lambda: self.manager._pg.allreduce([tensor], opts))
        if async_op:
            return work
        work.wait()
        return None

    def all_to_all(self, output: Tensor, input: Tensor, async_op: bool = False) -> Optional[Work]:
        raise NotImplementedError("compressed syncs are refused in federated mode (compression=None).")

    def all_gather(self, output: Tensor, input: Tensor) -> None:
        raise NotImplementedError("compressed syncs are refused in federated mode (compression=None).")

    def commit(self) -> bool:
        return bool(self.manager.should_commit())

    def __repr__(self) -> str:
        return "TorchftCommunicator()"


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
        self.trained = False
        """Whether this group took inner steps since its last sync (its weight in the next mean)."""
        self.healed_from_peer = 0
        """How many times this group loaded a live peer's state."""
        self.attempts: list[dict[str, Any]] = []
        """Per quorum: kind (join, sync, warmup), step, participants, weight sent, healed, committed, seconds in all
        and quorum_seconds waiting for the quorum (for logs and tests)."""
        self.dropped_weight = 0.0
        """The weight (tokens with time-based sync, else intervals) of work this group lost by missing a sync."""
        self._healed_now = False
        self._open_round: Optional[dict[str, Any]] = None
        """A warm-up step's quorum whose vote is still to come (:meth:`end_round`)."""

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

    # ------------------------------------------------------------------ syncs
    def join(self, engine: OuterSync, schedule: Optional["SyncSchedule"] = None) -> None:
        """At ``on_train_start``: this group's first quorum, in which it heals from a live peer when the others are
        ahead. What follows is what the others run in that quorum, as this group's ``schedule`` (a peer's, once
        healed) says: in warm-up the quorum is the next warm-up step's (this group computes its gradient on the
        healed parameters and weighs in like the others; the vote comes after backward); after it, a sync in which
        this group weighs 0 (with the stop flag of a time-based sync)."""
        self.trained = False
        stop = False if schedule is not None and not schedule.lockstep else None

        def attempt(record: dict[str, Any]) -> Optional[SyncResult]:
            if schedule is not None and schedule.in_warmup:
                record["kind"] = "warmup"
                self._open_round = record
                return None
            record.update(weight=0.0, stop=stop)
            return engine.sync(weight=0.0, stop=stop)

        if self._rounds("join", attempt) is not None and schedule is not None and stop is not None:
            schedule.synced()  # the interval (its clock and tokens; a peer's, once healed) starts now

    def sync(self, engine: OuterSync, weight: Optional[float] = None, stop: Optional[bool] = None) -> SyncResult:
        """One sync over the groups of a quorum; a failed attempt is redone with a new quorum until the timeout.

        The weight sent is the schedule's (``weight``: tokens since the last sync with time-based sync, ``None``: 1)
        times 1 for a group that trained since its last sync and did not heal in this quorum, 0 otherwise (a joiner
        holds a peer's parameters, not its own work)."""
        def attempt(record: dict[str, Any]) -> SyncResult:
            share = 1.0 if self.trained and not self._healed_now else 0.0
            sent = share * (1.0 if weight is None else float(weight))
            record.update(weight=sent, stop=stop)
            assert engine.cross is self.comm  # the engine reads the quorum from it
            if self.trained and self._healed_now:  # it missed a quorum the others committed: its work is replaced
                record["dropped_weight"] = 1.0 if weight is None else float(weight)
                self.dropped_weight += record["dropped_weight"]
                log.warning(f"local SGD: group {self.group_id} missed a sync of the other groups and healed from a "
                            f"live peer; the work since its last sync (weight {record['dropped_weight']:g}) is dropped")
            return engine.sync(weight=sent, stop=stop)

        result = self._rounds("sync", attempt)
        self.trained = False
        return result

    def start_round(self) -> None:
        """A warm-up step starts: its quorum (healing a joining group before its forward). The vote on applying the
        step comes after the gradient mean (:meth:`end_round`). No retry: a step whose vote fails is not applied."""
        if self._open_round is not None:
            return  # the join's quorum is this step's
        self._healed_now = False
        record = self._record("warmup")
        waited = time.perf_counter()
        self.manager.start_quorum(timeout=self.timeout)
        record.update(participants=self.comm.size if self.comm is not None else 1, healed=self._healed_now,
                      step=self._step(), quorum_seconds=time.perf_counter() - waited)
        self._open_round = record

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

    def _record(self, kind: str) -> dict[str, Any]:
        return {"kind": kind, "step": self._step(), "_start": time.perf_counter()}

    def _rounds(self, kind: str, attempt: Any) -> Any:
        """Quorum + ``attempt(record)`` until it commits (redone with a new quorum after a failure) or the timeout.
        ``attempt`` returning ``None`` leaves the round open (its vote comes later: :meth:`end_round`)."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        while True:
            self._healed_now = False
            record = self._record(kind)
            waited = time.perf_counter()
            self.manager.start_quorum(timeout=timedelta(seconds=max(1.0, deadline - time.monotonic())))
            assert self.comm is not None
            record.update(step=self._step(), participants=self.comm.size, healed=self._healed_now,  # after healing
                          quorum_seconds=time.perf_counter() - waited)
            try:
                result = attempt(record)
            except Exception as err:
                if isinstance(err, SyncAbortedError):
                    pass  # the vote said no (a collective failed here or on a rank of this job)
                elif self.manager.errored() is not None:
                    self.manager.should_commit()  # the other ranks of this job wait for this rank's vote
                else:
                    raise
                record.update(committed=False, seconds=time.perf_counter() - record.pop("_start"),
                              error=str(err)[:200])
                self.attempts.append(record)
                step = record["step"]
                log.warning(f"local SGD: federated sync at step {step} failed ({err}); retrying with the groups left")
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"local SGD: the federated sync at step {step} did not succeed within sync_timeout="
                        f"{self.timeout.total_seconds():g} s (last error: {err}). Check that at least min_groups="
                        f"{self.min_groups} groups are running and reach the lighthouse {self.lighthouse}."
                    ) from err
                time.sleep(_RETRY_PAUSE)
                continue
            if result is None:
                return None
            record.update(committed=True, seconds=time.perf_counter() - record.pop("_start"))
            self.attempts.append(record)
            return result

    def _step(self) -> int:
        return int(self.strategy.local_sgd.schedule.steps_done) if self.strategy is not None else 0

    # ------------------------------------------------------------------ healing
    def state_dict(self) -> dict[str, Any]:
        """What a joining group receives: this rank's :class:`~lightning_localsgd.state.TrainingState` (the same
        parts a checkpoint holds), cloned to the CPU. torchft calls it only when a peer heals, while this rank's
        training thread waits in the quorum (before its commit vote, after which the state changes)."""
        assert self.strategy is not None
        return self.strategy.training_state.capture()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Apply a live peer's state on the training thread (torchft calls it inside ``start_quorum``)."""
        assert self.strategy is not None
        self.strategy.training_state.load(state)
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
    from torchft._torchft import LighthouseServer

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
