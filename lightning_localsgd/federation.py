"""Federated worker groups: each job is one worker group; groups meet at syncs through torchft.

Each job (its own SLURM job, torchrun or edge box, with its own ``torch.distributed`` world) is one worker group; DDP,
FSDP2 or DeepSpeed ZeRO runs inside it as usual (the job's ranks hold replicas, shards or partitions of one model). Groups find each other through torchft's *lighthouse* (quorum, heartbeats) and sync over
torchft's managed, reconfigurable process group, which pairs rank ``k`` of every live group (the same pairing as the
cross groups of a single world). Nothing here is a home-made membership service or store: the lighthouse, the
:class:`torchft.Manager` per job rank, its process group and its healing transport are torchft's.

**Every quorum is one sync.** At each sync a group asks for a quorum, then takes part in one weighted mean over the
groups in it: a group that trained the interval weighs 1, a group that just joined (or healed in that quorum) weighs
0, so the mean is over the groups that did the work and the same outer step runs everywhere (``θ_g`` stays
identical). The commit vote (``Manager.should_commit``) runs after the reduce and *before* anything is written
(:meth:`~lightning_localsgd.engine.comm.Communicator.commit`), so a sync that fails mid-way leaves ``θ_g``, the outer
state and ``θ_i`` untouched; it is then redone with a new quorum of the groups left, until ``sync_timeout``.

**Healing.** A job starting while others run (new, or restarted with the same ``group_id``) joins at its
``on_train_start``: its manager is behind the others', so torchft fetches one live peer's state (its
:class:`~lightning_localsgd.state.TrainingState`, the same state a checkpoint holds: inner model and optimizers, LR
schedulers, ``θ_g``, outer optimizer state, schedule and trainer counters) and loads it on the training thread before that quorum's sync, in which the joiner weighs 0.
Healing is per rank: rank ``k`` receives rank ``k``'s state of a live job, i.e. its own shard with FSDP2 / ZeRO.

**Layouts.** Rank ``k`` of every job syncs what it holds with rank ``k`` of the others, so the jobs must hold the
model alike (world size, strategy, shard sizes). Each sync attempt first compares the jobs' layouts over rank 0's
managed process group; a job that does not fit is refused before its first step, naming both layouts.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
import zlib
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Optional

from torch import Tensor

from .engine.comm import Communicator, SyncAbortedError, Work
from .engine.outer import OuterSync, SyncResult

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

__all__ = ["Federation", "LayoutMismatchError", "TorchftCommunicator", "check_lighthouse_reachable", "lighthouse_url", "main_lighthouse",
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
        "warmup_steps": (config.warmup_steps, 0, "warm-up averages gradients across groups at every step"),
        "compression": (config.compression, None, "the weighted federated mean sends fp32"),
        "fragments": (config.fragments, 1, "streaming syncs would straddle quorums"),
        "overlap_steps": (config.overlap_steps, 0, "streaming syncs would straddle quorums"),
        "sync_every_seconds": (config.sync_every_seconds, None, "time-based sync is not supported across jobs yet"),
        "sync_schedule": (config.sync_schedule, None, "only the periodic schedule is supported across jobs"),
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


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a nested state (what healing moved)."""
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


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
        from torch.distributed.distributed_c10d import AllgatherOptions

        chunks = list(output.chunk(self.size))
        self._run(lambda: self.manager._pg.allgather([chunks], [input], AllgatherOptions())).wait()

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
        self.healed_bytes = 0
        """Bytes of tensor state this rank received from live peers (its own shard only with FSDP / ZeRO)."""
        self._layout: Optional[dict[str, Any]] = None
        self.alone_at_start: Optional[str] = None
        """The line logged when this group's join found no other group in its quorum (else ``None``)."""
        self.attempts: list[dict[str, Any]] = []
        """Per sync attempt: step, participants, weight, committed, seconds (for logs and tests)."""

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
    def join(self, engine: OuterSync) -> None:
        """At ``on_train_start``: one quorum, weight 0. Heals from a live peer when the others are ahead."""
        self.trained = False
        if self.strategy is not None:
            self.layout(engine)  # collective inside the job, before any quorum (healing compares it with a peer's)
        self.sync(engine)
        if self.comm is not None and self.comm.size == 1:  # nobody else in the quorum: say where this start comes from
            self.alone_at_start = self._alone_line()
            if self.trainer is None or self.trainer.global_rank == 0:
                from lightning.pytorch.utilities.rank_zero import rank_zero_info

                rank_zero_info(self.alone_at_start)

    def _alone_line(self) -> str:
        trainer = self.trainer
        ckpt_path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        step = trainer.global_step if trainer is not None else 0
        source = (f"its checkpoint {ckpt_path} (step {step})" if ckpt_path else
                  f"its initial weights (step {step})")
        return (f"local SGD: group {self.group_id!r} found no live peer at the lighthouse {self.lighthouse}: it starts "
                f"from {source} and trains alone until other groups join (they heal from it).")

    def sync(self, engine: OuterSync) -> SyncResult:
        """One sync over the groups of a quorum; a failed attempt is redone with a new quorum until the timeout."""
        deadline = time.monotonic() + self.timeout.total_seconds()
        while True:
            start = time.perf_counter()
            self._healed_now = False
            self.manager.start_quorum(timeout=timedelta(seconds=max(1.0, deadline - time.monotonic())))
            if self._healed_now:  # the ranks of a DDP group agree on one peer's replica (collective in the group)
                self.strategy.training_state.agree_after_healing()
            step = self._step()  # after healing: the peers' step
            weight = 1.0 if self.trained and not self._healed_now else 0.0
            assert self.comm is not None and engine.cross is self.comm  # the engine reads the quorum from it
            record = {"step": step, "participants": self.comm.size, "weight": weight, "healed": self._healed_now}
            try:
                self._check_layouts(engine)
                result = engine.sync(weight=weight)
            except Exception as err:
                if isinstance(err, SyncAbortedError):
                    pass  # the vote said no (a collective failed here or on a rank of this job)
                elif self.manager.errored() is not None:
                    self.manager.should_commit()  # the other ranks of this job wait for this rank's vote
                else:
                    raise
                record.update(committed=False, seconds=time.perf_counter() - start, error=str(err)[:200])
                self.attempts.append(record)
                log.warning(f"local SGD: federated sync at step {step} failed ({err}); retrying with the groups left")
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"local SGD: the federated sync at step {step} did not succeed within sync_timeout="
                        f"{self.timeout.total_seconds():g} s (last error: {err}). Check that at least min_groups="
                        f"{self.min_groups} groups are running and reach the lighthouse {self.lighthouse}."
                    ) from err
                time.sleep(_RETRY_PAUSE)
                continue
            record.update(committed=True, seconds=time.perf_counter() - start)
            self.attempts.append(record)
            self.trained = False
            return result

    def layout(self, engine: Optional[OuterSync] = None) -> dict[str, Any]:
        """This job's layout (:func:`job_layout`). Collective inside the job the first time (an all-gather of two
        numbers per rank, at the join); then kept, since a run's layout does not change (``OuterSync.rebind``)."""
        if self._layout is None:
            import torch
            import torch.distributed as dist

            assert self.strategy is not None and self.trainer is not None
            engine = engine or self.strategy.local_sgd.outer_sync
            numels = list(engine.layout.numels)
            mine = torch.tensor([sum(numels), sizes_digest(numels)], dtype=torch.int64, device=_job_device(engine))
            gathered = [mine]
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
                dist.all_gather(gathered, mine)  # the job's own world
            self._layout = job_layout(self.group_id, self.strategy.training_state.kind,
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

        if self.strategy is None or self.trainer is None:
            return  # the sync loop driven without a strategy (its unit tests): there is no layout to compare
        assert self.comm is not None
        mine = self.layout(engine)
        verdict = torch.zeros(1 + _ENCODED, dtype=torch.int64)  # 0 fits, 1 mismatch (+ the other layout), 2 failed
        failure: Optional[BaseException] = None
        if self.trainer.global_rank == 0:
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

    def _step(self) -> int:
        return int(self.strategy.local_sgd.schedule.steps_done) if self.strategy is not None else 0

    # ------------------------------------------------------------------ healing
    def state_dict(self) -> dict[str, Any]:
        """What a joining group receives: this rank's :class:`~lightning_localsgd.state.TrainingState` (the same
        parts a checkpoint holds), cloned to the CPU. torchft calls it only when a peer heals, while this rank's
        training thread waits in the quorum (before its commit vote, after which the state changes)."""
        assert self.strategy is not None
        return {"layout": self.layout(), "training": self.strategy.training_state.capture()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Apply a live peer's state on the training thread (torchft calls it inside ``start_quorum``)."""
        assert self.strategy is not None
        problem = layout_mismatch(self.layout(), [state["layout"]])  # this job's layout: known since its join
        if problem is not None:  # refused before anything of the peer's state is loaded
            raise LayoutMismatchError(problem)
        state = state["training"]
        self.strategy.training_state.load(state)
        self._healed_now = True
        self.healed_from_peer += 1
        self.healed_bytes += state_bytes(state)
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
