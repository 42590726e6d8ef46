"""Federated worker groups: each job is one cluster; jobs meet at syncs through torchft.

Each job (its own SLURM job, torchrun or edge box, with its own ``torch.distributed`` world) is one worker group (DDP,
FSDP2 or DeepSpeed ZeRO inside it: the job's ranks hold replicas, shards or partitions of one model), or, with ``cluster_sync_every``, several worker groups that sync inside the job every ``sync_every`` steps
over its own process groups (level 1 of two-stage sync, the one-world machinery) while the jobs sync every
``cluster_sync_every`` steps here (level 2; :func:`~lightning_localsgd.topology.job_cluster_groups`). What crosses jobs
is the outermost level (:attr:`LocalSGDController.outermost_sync`). Groups find each other through torchft's
*lighthouse* (quorum, heartbeats) and sync over torchft's managed, reconfigurable process group, which pairs rank ``k``
of every live job (the same pairing as the cross groups of a single world). Nothing here is a home-made membership
service or store: the lighthouse, the :class:`torchft.Manager` per job rank, its process group and its healing transport
are torchft's.

:class:`Federation` is the controller's :class:`~lightning_localsgd.syncs.Syncs` across jobs: only the
controller talks to it (start, join, warm-up rounds, inner steps, syncs, shutdown), and it holds no strategy: the
schedule, the arguments and the host's facts (rank, world size, training state, start point) come with
:meth:`Federation.start`.

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

Healing is per rank: rank ``k`` receives rank ``k``'s state of a live job, i.e. its own shard with FSDP2 / ZeRO.

**Data across jobs** (``data_jobs``): the jobs read one dataset, each its share. Every sync attempt all-gathers the
jobs' data positions and a commit records them (:attr:`Federation.data_shares`, the same on every member, sent with
healing state and checkpoints); a job that heals continues its share at its own last committed position, from the
peer's record. A job missing from ``data_rebalance_after`` committed syncs has left: the others split its unread data,
and it gets a fresh share if it comes back (:mod:`~lightning_localsgd.data_shares`).

**Layouts.** Rank ``k`` of every job syncs what it holds with rank ``k`` of the others, so the jobs must hold the
model alike (world size, strategy, shard sizes). Each sync attempt first compares the jobs' layouts over rank 0's
managed process group; a job that does not fit is refused before its first step, naming both layouts.

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
import zlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Optional

from torch import Tensor

from ._compat import (http_transport_listening_on, managed_process_group, manager_listening_on, observe_quorums,
                      quorum_id, quorum_started)
from .addresses import local_address_towards
from .data_shares import DataShares
from .engine.comm import Communicator, SyncAbortedError, Work
from .engine.outer import OuterSync, SyncResult
from .run_secret import authenticated_members, load_run_secret, make_authenticated_process_group, make_healing_transport
from .tensors import tensor_bytes
from .topology import federated_cluster_size, federated_group_size  # noqa: F401 (their old home)

if TYPE_CHECKING:
    from .config import LocalSGDConfig
    from .engine.schedules import SyncSchedule
    from .syncs import HostFacts

__all__ = ["Federation", "LayoutMismatchError", "TorchftCommunicator", "check_lighthouse_reachable", "federated_cluster_size",
           "federated_group_size", "lighthouse_url", "main_lighthouse"]

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


class LayoutMismatchError(ValueError):
    """The jobs of a quorum do not hold the same layout (world size, strategy kind, shard sizes): refused."""


#: The strategy kinds (:attr:`TrainingState.kind`) as they appear in a layout and its message.
_KINDS = {"replica": "DDP replicas", "sharded": "FSDP2 shards", "zero": "ZeRO partitions"}
_RANKS_LISTED = 8  # per-rank sizes carried (and named in a message) for the first ranks of a job
_NAME_BYTES = 64
_ENCODED = 3 + _RANKS_LISTED + _NAME_BYTES


def job_layout(group_id: str, kind: str, per_rank: list[tuple[int, int]]) -> dict[str, Any]:
    """What a job holds and syncs, compared with every other job of a quorum: its world size, the strategy kind and,
    per rank, the elements of the tensors that rank syncs (its shards with FSDP2 / ZeRO) with a digest of their sizes.
    ``per_rank``: ``(elements, digest of the tensor sizes)`` of each rank, in rank order."""
    return {"group_id": group_id, "kind": kind, "world_size": len(per_rank), "elements": [e for e, _ in per_rank],
            "digest": zlib.crc32(repr([tuple(r) for r in per_rank]).encode())}


def sizes_digest(numels: list[int]) -> int:
    return zlib.crc32(",".join(map(str, numels)).encode())


def describe_layout(layout: dict[str, Any]) -> str:
    listed = "+".join(map(str, layout["elements"][:_RANKS_LISTED]))
    more = "+..." if layout["world_size"] > _RANKS_LISTED else ""
    return (f"job {layout['group_id']!r}: {layout['world_size']} rank(s) with "
            f"{_KINDS.get(layout['kind'], layout['kind'])}, syncing {listed}{more} elements per rank (layout digest "
            f"{layout['digest']:08x})")


def encode_layout(layout: dict[str, Any]) -> Tensor:
    """A fixed-size int64 tensor (so that every job's fits one all-gather), group id included."""
    import torch

    kinds = list(_KINDS)
    elements = list(layout["elements"][:_RANKS_LISTED])
    ints = [kinds.index(layout["kind"]) if layout["kind"] in kinds else -1, layout["world_size"], layout["digest"],
            *elements, *[-1] * (_RANKS_LISTED - len(elements))]
    name = list(layout["group_id"].encode()[:_NAME_BYTES])
    return torch.tensor(ints + name + [0] * (_NAME_BYTES - len(name)), dtype=torch.int64)


def decode_layout(encoded: Tensor) -> dict[str, Any]:
    values = [int(v) for v in encoded.tolist()]
    kind, world_size, digest = values[:3]
    elements = [e for e in values[3 : 3 + _RANKS_LISTED] if e >= 0]
    name = bytes(b for b in values[3 + _RANKS_LISTED:] if b).decode(errors="replace")
    return {"group_id": name, "kind": list(_KINDS)[kind] if 0 <= kind < len(_KINDS) else "unknown",
            "world_size": world_size, "elements": elements, "digest": digest}


def layout_mismatch(mine: dict[str, Any], others: list[dict[str, Any]]) -> Optional[str]:
    """``None`` when every job of the quorum holds what this job holds; else the message naming both layouts."""
    for other in others:
        if any(other[k] != mine[k] for k in ("kind", "world_size", "digest")):
            return (f"local SGD: the federated jobs do not hold the model alike, so rank k of each cannot sync its "
                    f"shard with rank k of the others: {describe_layout(mine)}; {describe_layout(other)}. Every job "
                    "of a run must train the same model with the same strategy (and ZeRO stage), the same number of "
                    "ranks and the same sharding (auto_wrap_policy / fully_shard calls): start this job like the "
                    "others, or point it at another lighthouse.")
    return None


def _job_device(engine: OuterSync) -> Any:
    """Where a tensor for a collective over the job's own world goes: NCCL's device, or the CPU (gloo)."""
    import torch.distributed as dist

    return engine.device if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"


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

    def __init__(self, manager: Any, timeout: timedelta, group_id: str = "") -> None:
        self.manager = manager
        self.timeout = timeout
        self.group_id = group_id

    @property
    def size(self) -> int:
        members = authenticated_members(managed_process_group(self.manager))  # with a run secret: the verified ones
        return members[0] if members is not None else max(1, self.manager.num_participants())

    @property
    def rank(self) -> int:
        members = authenticated_members(managed_process_group(self.manager))
        if members is not None:
            return members[1]
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
        self.all_gather_async(output, input).wait()

    def all_gather_async(self, output: Tensor, input: Tensor) -> Work:
        from torch.distributed.distributed_c10d import AllgatherOptions

        # gloo's allgather into one list of views of ``output``, in member order (the managed PG's ranks are the
        # quorum's participating ranks)
        views = list(output.split(input.numel()))
        return self._run(lambda: managed_process_group(self.manager).allgather([views], [input], AllgatherOptions()))

    @property
    def member_id(self) -> int:
        # the job's name, stable across quorums (the screen keeps each job's history under it)
        return zlib.crc32(self.group_id.encode())

    @property
    def member_name(self) -> str:
        return f"group {self.group_id!r}"

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
    data_rows: list[tuple[int, int, int, bool, int]] = field(default_factory=list)
    """With ``data_jobs``: each job of the quorum's ``(job, epoch, samples, weighs, lost)`` (see _exchange_positions)."""


class Federation:
    """One job rank's membership: its torchft Manager, the sync loop over quorums, healing state.

    The controller's :class:`~lightning_localsgd.syncs.Syncs` across jobs: only the controller talks to it
    (:func:`~lightning_localsgd.syncs.make_syncs` builds it from the arguments). Started by the controller once
    the job's own process group exists (the job's ``TCPStore`` at
    ``MASTER_ADDR:MASTER_PORT`` is the store torchft's manager needs).
    """

    across_jobs = True
    """The groups are separate jobs: the controller calls :meth:`join` before the first inner step."""

    def __init__(self, lighthouse: str, group_id: Optional[str], min_groups: int,
                 sync_timeout: Optional[float], run_secret_file: Optional[str] = None) -> None:
        self.lighthouse = lighthouse
        self.run_secret_file = run_secret_file
        """Where the run secret is read at :meth:`start` (else ``LOCALSGD_RUN_SECRET``); its value is not kept."""
        self.group_id = group_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.min_groups = min_groups
        self.timeout = timedelta(seconds=sync_timeout or DEFAULT_SYNC_TIMEOUT)
        self.manager: Any = None
        self.comm: Optional[TorchftCommunicator] = None
        self.host: Optional["HostFacts"] = None
        """What this rank's host told :meth:`start` (place, training state, start point); ``None`` in the sync
        loop's unit tests, which drive it without a strategy (then there is no layout to compare nor state to heal)."""
        self.schedule: Optional["SyncSchedule"] = None
        """The controller's schedule: the step counter of the records, and what a joining group does first."""
        self.overlap_steps = 0
        """``overlap_steps``: a fragment's sync applied that many inner steps after it starts (then a failed attempt
        is dropped, not redone)."""
        self.inner_steps = 0
        """Inner steps this group took (``trained = True`` after each one counts it); each fragment's sync keeps
        their count when its last committed sync started (:attr:`~.engine.fragment.FragmentSync.synced_at`)."""
        self.engine: Optional[OuterSync] = None
        """The engine the syncs run on (the outermost level), from the join or the first sync on."""
        self.healed_from_peer = 0
        """How many times this group loaded a live peer's state."""
        self.healed_bytes = 0
        """Bytes of tensor state this rank received from live peers (its own shard only with FSDP / ZeRO)."""
        self._layout: Optional[dict[str, Any]] = None
        self._checked_quorum: Optional[int] = None
        """The torchft quorum (its id) whose members' layouts were found to fit: later attempts over the same members
        skip the check. Forgotten after a failed attempt; a healing job takes its peer's (see _check_layouts)."""
        self.alone_at_start: Optional[str] = None
        """The line logged when this group's join found no other group in its quorum (else ``None``)."""
        self.attempts: list[dict[str, Any]] = []
        """Per quorum: kind (join, sync, warmup), step, fragment, participants, rank, weight sent, stop, healed,
        committed, seconds in all and quorum_seconds waiting for the quorum (for logs and tests)."""
        self.dropped_weight = 0.0
        """The weight (tokens with time-based sync, else intervals) of work this group lost by missing a sync."""
        self._open_round: Optional[dict[str, Any]] = None
        """A warm-up step's quorum whose vote is still to come (:meth:`end_round`)."""
        self._unit: Optional[int] = None
        self._peer_unit: Optional[int] = None
        self._healed_now = False
        self.data_job: Optional[int] = None
        """``data_job_index`` with ``data_jobs`` (the jobs partition one dataset), else ``None``."""
        self.data_shares: Optional[DataShares] = None
        """With ``data_jobs``: the replicated record of the jobs' data (positions at committed syncs, departed jobs'
        data split between the others, samples contributed and read again), the same on every member."""
        self._lost_data = 0  # samples read since the last committed sync and read again after a heal (reported once)

    # ------------------------------------------------------------------ setup
    def start(self, schedule: "SyncSchedule", config: "LocalSGDConfig",
              host: Optional["HostFacts"]) -> TorchftCommunicator:
        """Create this rank's Manager (rank k of the job joins torchft's replica rank k) and the communicator."""
        from torchft import Manager, ProcessGroupGloo

        if host is None:
            raise ValueError("local SGD: federated syncs (lighthouse=) need the host's facts (its rank, world size "
                             "and training state): pass host_facts to LocalSGDController.setup.")
        self.host, self.schedule, self.overlap_steps = host, schedule, config.overlap_steps
        self.data_job = config.data_job_index if config.data_jobs is not None else None
        if config.data_jobs is not None:
            self.data_shares = DataShares(config.data_jobs, config.data_rebalance_after)
        check_lighthouse_reachable(self.lighthouse, connect_timeout())
        store_addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        store_port = int(os.environ["MASTER_PORT"])
        secret = load_run_secret(self.run_secret_file)
        # the manager server (rank 0's) and the healing transport listen on the interface that reaches the
        # lighthouse only (loopback for a one-machine run), not on every interface as torchft's defaults do
        listen_on = local_address_towards(self.lighthouse)
        if secret is None:  # torchft's process group and plain HTTP transport (a trusted network)
            pg, transport = ProcessGroupGloo(timeout=self.timeout), http_transport_listening_on(listen_on, self.timeout)
        else:  # only the jobs proving the run secret take part, heal or are healed (run_secret.py)
            pg = make_authenticated_process_group(secret, f"{store_addr}:{store_port}", self.timeout, self.min_groups)
            transport = make_healing_transport(secret, listen_on, self.timeout)
        self.manager = manager_listening_on(
            listen_on, Manager, pg=pg, checkpoint_transport=transport, load_state_dict=self.load_state_dict,
            state_dict=self.state_dict, min_replica_size=self.min_groups, use_async_quorum=False,
            timeout=self.timeout, quorum_timeout=self.timeout,
            connect_timeout=timedelta(seconds=connect_timeout()), rank=host.rank,
            world_size=host.world_size, store_addr=store_addr, store_port=store_port,
            lighthouse_addr=lighthouse_url(self.lighthouse), replica_id=self.group_id,
            init_sync=False,  # every group of a fresh run starts from the same weights (rank 0's, by seed)
        )
        if secret is not None:  # who the lighthouse lists in each quorum, for the line naming an unverified member
            observe_quorums(self.manager, lambda quorum: setattr(pg, "replica_ids", list(quorum.replica_ids)))
        self.comm = TorchftCommunicator(self.manager, self.timeout, self.group_id)
        return self.comm

    def shutdown(self) -> None:
        if self.data_shares is not None and self.data_shares.commits and (self.host is None or self.host.rank == 0):
            from lightning.pytorch.utilities.rank_zero import rank_zero_info

            lines = "; ".join(f"job {job}: {n['contributed']} contributed, {n['reread']} read again after a failure"
                              for job, n in self.data_summary.items())
            rank_zero_info(f"local SGD: data summary at the end of fit (samples of each data job): {lines}")
        if self.manager is not None:
            self.manager.shutdown(wait=False)
            self.manager = None

    background = False
    """Every sync runs on the training thread (``async_sync``: :class:`~.background.BackgroundFederation`)."""

    def launch(self, engine: OuterSync, weight: Optional[float] = None, stop: Optional[bool] = None) -> bool:
        raise NotImplementedError("a Federation runs every sync on the training thread: async_sync=True builds a "
                                  "BackgroundFederation")

    def poll(self, engine: OuterSync) -> Optional[SyncResult]:
        return None

    def settle(self, engine: OuterSync) -> Optional[SyncResult]:
        return None

    # ------------------------------------------------------------------ weights
    def inner_step(self) -> None:
        """This group took an inner step: it weighs in at its next sync."""
        self.trained = True

    @property
    def trained(self) -> bool:
        """Whether this group took inner steps since its last sync. Set it True after every inner step; False
        forgets them (a group that joins weighs 0 until it trains)."""
        syncs = self.engine.fragment_syncs if self.engine is not None else []
        return self.inner_steps > max((s.synced_at for s in syncs), default=0)

    @trained.setter
    def trained(self, value: bool) -> None:
        if value:
            self.inner_steps += 1
        elif self.engine is not None:
            self._committed(self.engine, None, self.inner_steps)

    def _trained_for(self, engine: OuterSync, fragment: Optional[int]) -> bool:
        """Whether the values this sync sends moved since they were last synced: one fragment's, or (a sync of every
        parameter) any fragment's. This group's weight in that sync is 0 otherwise."""
        units = [engine.fragment_sync(fragment)] if fragment is not None else engine.fragments
        since_all = engine.whole.synced_at
        return any(self._steps_sent() > max(u.synced_at, since_all) for u in units)

    def _kept_own_work(self) -> bool:
        """Whether this group, healed in this quorum, took only ``θ_g`` and the outer state from its peer and keeps
        its own work to send (``async_sync``'s late job); otherwise the peer's whole state replaced its work."""
        return False

    def _steps_sent(self) -> int:
        """The inner steps whose work the sync being launched carries (all of them: it reads the live parameters)."""
        return self.inner_steps

    @staticmethod
    def _committed(engine: OuterSync, fragment: Optional[int], inner_steps: int) -> None:
        for sync in engine.fragment_syncs if fragment is None else [engine.fragment_sync(fragment)]:
            sync.synced_at = inner_steps

    # ------------------------------------------------------------------ syncs
    # The controller runs every sync through start_sync / finish_sync / sync (as it does DirectSyncs' in one world):
    # each started sync is one quorum and one commit vote, whether it is a sync of every parameter or one fragment's.
    # A failed attempt leaves θ_g, the outer state and the error feedback as they were; it is redone over a new quorum
    # when no inner step ran since it started (a whole sync, a fragment without overlap), and dropped otherwise (a
    # fragment with overlap: θ_i moved on; that fragment syncs at its next turn).
    def join(self, engine: OuterSync) -> None:
        """At ``on_train_start``: this group's first quorum, weight 0, in which it heals from a live peer when the
        others are ahead. Then it does what the others do in that quorum, as its schedule (a peer's, once healed)
        says: in warm-up the quorum is the next warm-up step's (the vote comes after backward, :meth:`end_round`);
        after it, the sync the others run: every parameter, or, mid-stream, the fragment they start (applied when
        this group's schedule, now the peers', applies it), with the stop flag of a time-based sync."""
        schedule = self.schedule
        self.engine = engine
        self.trained = False
        for fragment in list(engine.pending):  # syncs in flight from a checkpoint: their quorum is gone
            engine.drop_sync(fragment)
        if self.host is not None:
            self.layout(engine)  # collective inside the job, before any quorum (healing compares it with a peer's)
        stop = False if schedule is not None and not schedule.lockstep else None
        deadline = time.monotonic() + self.timeout.total_seconds()
        while True:
            began = time.perf_counter()
            record = self._quorum("join", None, deadline)
            if schedule is not None and schedule.in_warmup:
                self._open_round = dict(record, kind="warmup", _start=began)
                break
            fragment = self._unit = self._peer_unit if self._healed_now else None
            if self._launch(engine, record, fragment, 0.0, stop, deadline, began):
                if fragment is None or not self._overlaps():
                    self.finish_sync(engine, fragment)
                if stop is not None and schedule is not None:
                    schedule.synced()  # the interval (its clock and tokens; a peer's, once healed) starts now
                break
        if self.comm is not None and self.comm.size == 1:  # nobody else in the quorum: say where this start comes from
            self.alone_at_start = self._alone_line()
            if self.host is None or self.host.rank == 0:
                from lightning.pytorch.utilities.rank_zero import rank_zero_info

                rank_zero_info(self.alone_at_start)

    def _alone_line(self) -> str:
        ckpt_path = self.host.checkpoint_path() if self.host is not None else None
        step = self.host.global_step() if self.host is not None else 0
        source = (f"its checkpoint {ckpt_path} (step {step})" if ckpt_path else
                  f"its initial weights (step {step})")
        return (f"local SGD: group {self.group_id!r} found no live peer at the lighthouse {self.lighthouse}: it starts "
                f"from {source} and trains alone until other groups join (they heal from it).")

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
        if self._healed_now and self.host is not None:  # the ranks of a DDP group agree on one peer's replica
            self.host.training_state().agree_after_healing()  # (collective inside the group)
        assert self.comm is not None
        return {"kind": kind, "step": self._step(), "participants": self.comm.size, "rank": self.comm.rank,
                "healed": self._healed_now, "quorum_seconds": time.perf_counter() - waited}

    def _launch(self, engine: OuterSync, record: dict[str, Any], fragment: Optional[int], weight: Optional[float],
                stop: Optional[bool], deadline: float, began: float) -> bool:
        """Launch the sync of ``fragment`` over the quorum just formed; False: the attempt failed (recorded, voted,
        paused; the caller forms a new quorum)."""
        assert engine.cross is self.comm  # the engine reads the quorum from it
        self.engine = engine
        trained = self._trained_for(engine, fragment)
        kept = trained and self._healed_now and self._kept_own_work()
        if kept:  # it missed a sync the others committed, healed θ_g only and sends its own work now
            record["merged_late"] = True
        elif trained and self._healed_now:  # it missed a sync the others committed: its work is replaced by a peer's
            lost = 1.0 if weight is None else float(weight)
            record["dropped_weight"] = lost
            self.dropped_weight += lost
            log.warning(f"local SGD: group {self.group_id} missed a sync of the other groups and healed from a live "
                        f"peer; the work since its last sync (weight {lost:g}) is dropped")
        own = (1.0 if weight is None else float(weight)) if trained and (kept or not self._healed_now) else 0.0
        record.update(fragment=fragment, weight=own, stop=stop)
        attempt = _Attempt(record, weight, stop, deadline, began, self._steps_sent())
        try:
            self._check_layouts(engine)
            attempt.data_rows = self._exchange_positions(own > 0)
            engine.start_sync(fragment, weight=own, stop=stop)
        except Exception as err:
            if not self._failed(attempt, err):
                raise
            self._pause_or_give_up(attempt, err)
            return False
        engine.fragment_sync(fragment).attempt = attempt
        return True

    def finish_sync(self, engine: OuterSync, fragment: Optional[int] = None,
                    mix: float = 0.0) -> Optional[SyncResult]:
        """Apply the sync :meth:`start_sync` launched, if the quorum's vote says so. A failed attempt is redone (no
        inner step since its start) or dropped (``None``: θ_g, the outer state, the error feedback and the parameters as
        they were)."""
        while True:
            sync = engine.fragment_sync(fragment)
            attempt, sync.attempt = sync.attempt, None
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
            self._commit_data(attempt.data_rows)
            self._committed(engine, fragment, attempt.inner_steps)
            return result

    def layout(self, engine: Optional[OuterSync] = None) -> dict[str, Any]:
        """This job's layout (:func:`job_layout`). Collective inside the job the first time (an all-gather of two
        numbers per rank, at the join); then kept, since a run's layout does not change (``OuterSync.rebind``)."""
        if self._layout is None:
            import torch
            import torch.distributed as dist

            assert self.host is not None and engine is not None, "the layout is first taken at the join"
            numels = list(engine.layout.numels)
            mine = torch.tensor([sum(numels), sizes_digest(numels)], dtype=torch.int64, device=_job_device(engine))
            gathered = [mine]
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
                dist.all_gather(gathered, mine)  # the job's own world
            self._layout = job_layout(self.group_id, self.host.training_state().kind,
                                      [tuple(int(v) for v in t.tolist()) for t in gathered])
        return self._layout

    def _check_layouts(self, engine: OuterSync) -> None:
        """Every sync attempt, before any other collective: rank 0 of each job all-gathers the jobs' layouts over
        its managed process group (~600 bytes per job; rank 0's exists whatever the other jobs' world sizes, unlike
        rank k's) and tells the job's other ranks what it found. A job that never synced is refused
        (:class:`LayoutMismatchError`, before its first step); a running job fails only this attempt and redoes the
        sync without the job that does not fit."""
        import torch
        import torch.distributed as dist

        if self.host is None:
            return  # the sync loop driven without a strategy (its unit tests): there is no layout to compare
        assert self.comm is not None
        # Once per set of members: the quorum id changes exactly when the members change. Every member decides alike:
        # each records the id when the check passes and forgets it when an attempt fails (then every member's
        # attempt fails: a collective needs all of them). The one way a member fails while the others commit (its
        # own vote after the collectives) leaves it a step behind, so it heals in the next quorum and takes the
        # recorded id from its peer with the rest of the state (state_dict).
        quorum = quorum_id(self.manager)
        if quorum == self._checked_quorum:
            return
        mine = self.layout(engine)
        verdict = torch.zeros(1 + _ENCODED, dtype=torch.int64)  # 0 fits, 1 mismatch (+ the other layout), 2 failed
        failure: Optional[BaseException] = None
        if self.host.rank == 0:
            try:
                encoded = encode_layout(mine)
                gathered = torch.empty(self.comm.size * _ENCODED, dtype=torch.int64)
                self.comm.all_gather(gathered, encoded)
                other = next((o for o in map(decode_layout, gathered.view(self.comm.size, -1))
                              if layout_mismatch(mine, [o]) is not None), None)
                if other is not None:
                    verdict[0], verdict[1:] = 1, encode_layout(other)
            except Exception as err:  # reported to the manager by the communicator: this attempt fails
                verdict[0], failure = 2, err
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shared = verdict.to(_job_device(engine))
            dist.broadcast(shared, src=0)  # the job's own world: its other ranks learn rank 0's verdict
            verdict = shared.cpu()
        if verdict[0] == 2:
            if failure is None:
                failure = RuntimeError("local SGD: the layout exchange of this sync attempt failed on rank 0")
                self.manager.report_error(failure)
            raise failure
        if verdict[0] == 1:
            problem = layout_mismatch(mine, [decode_layout(verdict[1:])])
            assert problem is not None
            error = LayoutMismatchError(problem)
            if any(a["committed"] for a in self.attempts):  # a running job keeps going without the newcomer
                log.warning(f"{problem} This job keeps training; the sync is redone without the job that does not fit.")
                self.manager.report_error(error)
            raise error
        self._checked_quorum = quorum

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
        self._checked_quorum = None  # the next attempt checks the layouts again (as every member of this one does)
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
        return int(self.schedule.steps_done) if self.schedule is not None else 0

    def _overlaps(self) -> bool:
        """Whether a fragment's sync is applied some steps after it starts (streaming with ``overlap_steps``)."""
        return self.overlap_steps > 0

    # ------------------------------------------------------------------ healing
    def state_dict(self) -> dict[str, Any]:
        """What a joining group receives: this rank's :class:`~lightning_localsgd.state.TrainingState` (the same
        parts a checkpoint holds), cloned to the CPU, without the error feedback of compressed syncs (a joiner
        starts from zero: the residuals are this group's own), and which fragment this quorum syncs (``None``:
        every parameter). torchft calls it only when a peer heals, while this rank's training thread waits in the
        quorum (before anything of this sync is launched, so no sync is in flight)."""
        assert self.host is not None
        state = self.host.training_state().capture()
        for level in ("outer", "cluster"):  # both levels' engines (two levels: the job's and the jobs')
            engine_state = state["rank"].get(level)
            if engine_state is not None:
                engine_state.update(compression_error=None, compression_mean_error={},
                                    compression_mean_error_owner={})
        state["federation"] = {"fragment": self._unit, "checked_quorum": self._checked_quorum}
        return {"layout": self.layout(), "training": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Apply a live peer's state on the training thread (torchft calls it inside ``start_quorum``)."""
        assert self.host is not None
        problem = layout_mismatch(self.layout(), [state["layout"]])  # this job's layout: known since its join
        if problem is not None:  # refused before anything of the peer's state is loaded
            raise LayoutMismatchError(problem)
        state = state["training"]
        self.host.training_state().load(state)
        self._peer_unit = state.get("federation", {}).get("fragment")
        self._checked_quorum = state.get("federation", {}).get("checked_quorum")  # decide as the peers do
        self._healed_now = True
        self.healed_from_peer += 1
        self.healed_bytes += tensor_bytes(state)
        log.info(f"local SGD: group {self.group_id} healed from a live peer at step "
                 f"{state['counters']['global_step']}")
        self._continue_own_data()  # the data record came with the counters (LocalSGDController.meta)

    # ------------------------------------------------------------------ data positions (data_jobs)
    # The jobs read one dataset, each its share (data.py: one order, data_jobs × the job's ranks replicas). Each sync
    # attempt all-gathers every job's position (5 numbers per job: index, epoch, samples, whether it weighs in, samples
    # read again; over each rank's managed process group: rank k of every job, all of them since the jobs hold the
    # same layout); a commit records them (data_shares.DataShares), so every member knows where each job's committed
    # contribution ends, and a job that heals (its parameters replaced by a peer's, its reading since its last
    # committed sync lost with them) continues its share from there.
    @property
    def data_positions(self) -> dict[int, tuple[int, int]]:
        """With ``data_jobs``: each job's data position ``(epoch, samples)`` at its last committed sync, by
        ``data_job_index``: where that job's committed contribution ends (the same on every member)."""
        return dict(self.data_shares.positions) if self.data_shares is not None else {}

    @property
    def data_summary(self) -> dict[int, dict[str, int]]:
        """With ``data_jobs``: per job, samples ``contributed`` (read before a committed sync it weighed in at) and
        ``reread`` (read, dropped with its work by a heal, read again); logged at the end of fit."""
        return self.data_shares.summary() if self.data_shares is not None else {}

    def _exchange_positions(self, counted: bool) -> list[tuple[int, int, int, bool, int]]:
        """Every job of the quorum's ``(job, epoch, samples, weighs, lost)``: its data position in this attempt,
        whether the attempt counts its work (``counted``: this job weighs in; a joiner's position is its committed
        one already), the samples it reads again after a heal."""
        if self.data_job is None or self.host is None:
            return []
        import torch

        assert self.comm is not None
        position = self.host.data_position()
        mine = torch.tensor([self.data_job, *(position or (-1, -1)), int(counted and position is not None),
                             self._lost_data], dtype=torch.int64)
        gathered = torch.empty(self.comm.size * mine.numel(), dtype=torch.int64)
        self.comm.all_gather(gathered, mine)
        rows = gathered.view(self.comm.size, -1).tolist()
        indices = [row[0] for row in rows]
        if len(set(indices)) != len(indices):
            raise ValueError(f"local SGD: two live federated jobs have the same data_job_index (the quorum's: "
                             f"{sorted(indices)}), so they read the same share of the dataset: give each job its own "
                             f"index in 0 .. data_jobs - 1 (this job {self.group_id!r} has {self.data_job}).")
        return [(job, epoch, samples, bool(weighs), lost) for job, epoch, samples, weighs, lost in rows]

    def _commit_data(self, rows: list[tuple[int, int, int, bool, int]]) -> None:
        """A sync committed: record the rows (every member alike); log departures and returns; a job that came back
        continues at its fresh share."""
        shares = self.data_shares
        if shares is None or self.host is None:
            return
        away = shares.away(self.data_job) is not None  # type: ignore[arg-type]
        for event in shares.commit(rows):
            if self.host.rank == 0:
                log.warning(event)
        self._lost_data = 0
        if away and shares.away(self.data_job) is None:  # type: ignore[arg-type]
            fresh = shares.positions[self.data_job]  # type: ignore[index]
            if not self.host.continue_data_at(*fresh):  # moves a running epoch too (a live rewind)
                log.warning(f"local SGD: group {self.group_id} came back, but its training loader has no data "
                            f"position (not a resumable loader): its data cannot move to its fresh share at {fresh}")

    def _continue_own_data(self) -> None:
        """Healed: this job's data continues where its last committed sync ended (the peer's record); what it read
        since then is read again (counted in the summary). A live job (cut off, or late, with its work dropped) moves
        its running epoch back there: the next batch it trains on is the first sample after that position (a live
        rewind). A job whose data was given away waits for its fresh share (decided when this quorum's sync commits).
        ``async_sync``'s late job keeps its work (merged, not dropped) and does not come here (its data would go on;
        ``async_sync`` with ``data_jobs`` is refused for now)."""
        assert self.host is not None
        if self.data_job is None or self.data_shares is None:
            return
        if self.data_shares.away(self.data_job) is not None:
            log.warning(f"local SGD: group {self.group_id} (data job {self.data_job}) healed after the others split its "
                        "unread data between them: it gets a fresh share when this sync commits")
            return
        position = self.data_positions.get(self.data_job)
        here = self.host.data_position()
        if position is None:
            log.warning(f"local SGD: group {self.group_id} healed, but its peer has no committed data position for "
                        f"data_job_index {self.data_job} (no sync of it committed since the peer started): it keeps "
                        "its own data position")
        elif self.host.continue_data_at(*position):
            if here is not None and self.data_shares.size is not None:  # its reading past the position is read again
                self._lost_data += max(0, self.data_shares.between(self.data_job, position, here))
            log.info(f"local SGD: group {self.group_id} continues its share of the data at its last committed "
                     f"position: epoch {position[0]}, sample {position[1]} of the epoch's order")
        else:
            log.warning(f"local SGD: group {self.group_id} healed, but its training loader has no data position (not "
                        f"a resumable loader): its data cannot move back to its last committed position {position}, "
                        "so the samples it read since then (their work dropped by the heal) are not read again")


# ---------------------------------------------------------------------------------------------------- lighthouse CLI
LOOPBACK = "127.0.0.1"
"""The lighthouse's default bind address: reachable from this machine only (a one-machine run). Jobs on other
machines need ``--bind`` of an interface they reach (a private network's, e.g. WireGuard's), docs/multi_cluster.md."""

_WILDCARDS = ("0.0.0.0", "::", "[::]", "")


def lighthouse_bind(bind: str, port: int) -> str:
    """torchft's ``host:port`` bind string (an IPv6 address in brackets)."""
    host = bind.strip()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def start_lighthouse(bind: str = LOOPBACK, port: int = 29510, min_groups: int = 1, join_timeout_ms: int = 10000,
                     heartbeat_timeout_ms: int = 5000, quorum_tick_ms: int = 100) -> tuple[Any, str]:
    """Start torchft's lighthouse bound to ``bind`` (``"0.0.0.0"`` / ``"[::]"``: every interface). Returns the server
    and the ``host:port`` jobs pass as ``lighthouse=`` (the host name when bound to every interface)."""
    from torchft.coordination import LighthouseServer

    server = LighthouseServer(bind=lighthouse_bind(bind, port), min_replicas=min_groups,
                              join_timeout_ms=join_timeout_ms, quorum_tick_ms=quorum_tick_ms,
                              heartbeat_timeout_ms=heartbeat_timeout_ms)
    bound_port = server.address().rsplit(":", 1)[-1]
    host = socket.gethostname() if bind.strip() in _WILDCARDS else lighthouse_bind(bind, 0).rsplit(":", 1)[0]
    return server, f"{host}:{bound_port}"


def main_lighthouse(argv: list[str]) -> None:
    """``lightning-localsgd lighthouse``: run torchft's lighthouse in this process until interrupted."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="lightning-localsgd lighthouse",
        description="Start torchft's lighthouse: the quorum service federated worker groups (jobs started with "
                    "lighthouse=HOST:PORT) meet at. Run it once, on a host every job reaches. See docs/multi_cluster.md.")
    parser.add_argument("--port", type=int, default=29510, help="port to listen on (default 29510; 0: any free one)")
    parser.add_argument("--bind", default=LOOPBACK,
                        help=f"address to listen on (default {LOOPBACK}: this machine only). For jobs on other "
                             "machines give the address of an interface they reach, preferably a private network's "
                             "(e.g. the WireGuard address); 0.0.0.0 or [::] listens on every interface")
    parser.add_argument("--min-groups", type=int, default=1, help="fewest groups in a quorum (default 1)")
    parser.add_argument("--join-timeout-ms", type=int, default=10000,
                        help="how long a quorum waits for heartbeating groups to join (default 10000)")
    parser.add_argument("--heartbeat-timeout-ms", type=int, default=5000,
                        help="after this long without a heartbeat a group counts as gone (default 5000)")
    parser.add_argument("--quorum-tick-ms", type=int, default=100, help="quorum check interval (default 100)")
    args = parser.parse_args(argv)
    if args.min_groups < 1:
        parser.error("--min-groups must be >= 1")
    server, address = start_lighthouse(args.bind, args.port, args.min_groups, args.join_timeout_ms,
                                       args.heartbeat_timeout_ms, args.quorum_tick_ms)
    reach = "this machine only" if args.bind == LOOPBACK else f"bound to {args.bind}"
    print(f"lighthouse listening on {address} ({reach}); pass lighthouse=\"{address}\" to every job. Ctrl-C stops "
          "it.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
