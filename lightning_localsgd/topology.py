"""Process groups for worker groups: the *inner* group of a rank and its *cross* group.

``W`` ranks, ``S = group_size`` ranks per worker group, ``G = W / S`` groups. Worker group ``i`` is ranks
``[i·S, (i+1)·S)``; cross group ``k`` is ``{i·S + k : i < G}``, the ranks holding the same shard index in every
group. Inner parallelism (DDP all-reduce, FSDP sharding) uses the inner group; the periodic outer reduce uses the
cross group. With ``S`` = devices per node the per-step traffic stays inside a node.

The default process group itself is started here too (:func:`init_default_group`): over the rendezvous store torch's
``env://`` rendezvous would make, except that the store's server listens on ``MASTER_ADDR`` only.
"""

from __future__ import annotations

import atexit
import errno
import ipaddress
import math
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ._compat import init_dist_connection

#: the prefix torch's ``init_process_group`` puts before the default group's keys when it makes the store itself
#: (``env://``); with ``store=`` it adds none, so :func:`rendezvous_store` does: the keys every user of the store
#: (reliability's records, the run secret's verdicts) reads stay where they were
DEFAULT_PG_PREFIX = "default_pg"


def check_group_size(world_size: int, group_size: int) -> None:
    """Raise a ``ValueError`` naming ``group_size`` when it cannot split ``world_size`` ranks into worker groups."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer (ranks per worker group), got {group_size!r}.")
    if group_size > world_size:
        raise ValueError(
            f"group_size={group_size} is larger than the world size {world_size}: a worker group cannot have more "
            f"ranks than there are. Use a group_size that divides {world_size}, e.g. 1 or {world_size}."
        )
    if world_size % group_size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"group_size={group_size} does not divide the world size {world_size} (devices × nodes). "
            f"Pick one of {divisors}, or change the number of devices."
        )


def group_ranks(world_size: int, group_size: int) -> list[list[int]]:
    """Ranks of each worker group: ``[[0..S-1], [S..2S-1], ...]``."""
    return [list(range(i * group_size, (i + 1) * group_size)) for i in range(world_size // group_size)]


def cross_group_ranks(world_size: int, group_size: int) -> list[list[int]]:
    """Ranks of each cross group: cross group ``k`` joins rank ``k`` of every worker group."""
    return [list(range(k, world_size, group_size)) for k in range(group_size)]


def check_cluster_size(num_groups: int, cluster_size: int) -> None:
    """Raise a ``ValueError`` naming ``cluster_size`` when it cannot split the worker groups into clusters."""
    if isinstance(cluster_size, bool) or not isinstance(cluster_size, int) or cluster_size < 1:
        raise ValueError(f"cluster_size must be a positive integer (worker groups per cluster), got {cluster_size!r}.")
    if num_groups % cluster_size:
        divisors = [d for d in range(1, num_groups + 1) if num_groups % d == 0]
        raise ValueError(
            f"cluster_size={cluster_size} does not divide the {num_groups} worker groups (world size / group_size). "
            f"Pick one of {divisors}."
        )


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


def cluster_cross_group_ranks(world_size: int, group_size: int, cluster_size: int) -> tuple[list[list[int]], ...]:
    """Rank lists of the two sync levels of two-stage local SGD.

    Group ``i`` lies in cluster ``i // cluster_size``. Level 1 (inside a cluster) joins rank ``k`` of the groups of one
    cluster; level 2 (across clusters) joins rank ``k`` of the ``j``-th group of every cluster.
    """
    groups = world_size // group_size
    clusters = groups // cluster_size
    intra = [[(c * cluster_size + j) * group_size + k for j in range(cluster_size)]
             for c in range(clusters) for k in range(group_size)]
    inter = [[(c * cluster_size + j) * group_size + k for c in range(clusters)]
             for j in range(cluster_size) for k in range(group_size)]
    return intra, inter


@dataclass
class Topology:
    """Where this rank sits: its worker group, its place in it, and the two process groups it talks over."""

    world_size: int
    rank: int
    group_size: int
    inner_group: Optional[dist.ProcessGroup]
    """Process group of the rank's worker group; ``None`` when ``group_size == 1``."""
    cross_group: Optional[dist.ProcessGroup]
    """Process group of the rank's cross group; ``None`` means the default (world) group, when ``group_size == 1``."""
    cluster_size: Optional[int] = None
    """Worker groups per cluster for two-stage sync; ``None`` = one level."""
    intra_cluster_group: Optional[dist.ProcessGroup] = None
    """Level 1 of two-stage sync: this rank's shard in every group of its cluster."""
    inter_cluster_group: Any = None
    """Level 2 of two-stage sync: this rank's place in every cluster (a process group, or in federated mode the
    torchft communicator across jobs: see :func:`job_cluster_groups`)."""
    inter_cluster_slice_group: Optional[dist.ProcessGroup] = None
    """Level 2 split over the cluster's groups: the ranks of the cluster holding the same slice of ``θ_c``, each of
    which reduces ``1/cluster_size`` of that slice across clusters and all-gathers the rest from the others, so a
    cluster sends one copy of the model per level-2 sync. ``None``: every rank reduces its whole slice."""
    cluster_group: Optional[dist.ProcessGroup] = None
    """With :attr:`inter_cluster_slice_group`: every rank of this rank's cluster (their level-2 pieces make one copy
    of the model, so the pseudo-gradient norm adds their squares)."""

    def federate(self, comm: Any) -> None:
        """Federated mode: the outermost level crosses jobs over ``comm`` (torchft's communicator): level 2 when the
        job holds several worker groups (:func:`job_cluster_groups`), else the cross group."""
        if self.cluster_size is not None:
            self.inter_cluster_group = comm
        else:
            self.cross_group = comm

    @property
    def num_groups(self) -> int:
        return self.world_size // self.group_size

    @property
    def group_index(self) -> int:
        return self.rank // self.group_size

    @property
    def rank_in_group(self) -> int:
        return self.rank % self.group_size


def unbind_gloo_default_group() -> None:
    """Let sub-groups be created when the default process group is gloo bound to a GPU (ranks sharing one GPU).

    Lightning binds the default group to the rank's CUDA device (``init_process_group(device_id=...)``), and torch then
    creates every sub-group by *splitting* the default group: ``new_group`` calls ``perform_nocolor_split``, which
    ``ProcessGroupGloo`` does not have, and ``init_device_mesh`` deep-copies gloo's options, which do not pickle (both
    seen on torch 2.11 with an H200: docs/gpu.md). The binding only serves NCCL's eager, splittable communicators, so
    for a gloo default group it is dropped before the first sub-group is made; NCCL groups keep it.
    """
    group = dist.group.WORLD
    if getattr(group, "bound_device_id", None) is not None and dist.get_backend(group) == "gloo":
        group.bound_device_id = None


def new_groups(rank_lists: Sequence[Sequence[int]], rank: int,
               timeout: Optional[timedelta] = None) -> Optional[dist.ProcessGroup]:
    """Create a process group for each list of ranks and return the one ``rank`` is in (``None`` if none).

    ``new_group`` is collective over the default group: every rank creates every group, in the same order, including
    the groups it is not in.
    """
    kwargs = {"timeout": timeout} if timeout is not None else {}
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(list(ranks), **kwargs)
        if rank in ranks:
            mine = group
    return mine


_exit_teardown = {"registered": False, "skip": False}


def destroy_process_groups_at_exit() -> None:
    """Destroy the process groups when the interpreter exits (once per process; the strategies' setup calls it).

    A gloo worker thread may drop the last reference to a finished collective's tensors after the Python side moved
    on; when that happens once the interpreter is finalizing (a rank that leaves right after its last collective,
    under load), the thread cannot take the GIL and the process aborts: "terminate called without an active
    exception", exit code -6. ``atexit`` runs before finalization, and destroying a gloo group joins its worker
    threads with the GIL released. Lightning registers this for NCCL only.
    """
    if not _exit_teardown["registered"]:
        _exit_teardown["registered"] = True
        atexit.register(_destroy_process_groups)


def keep_process_groups_at_exit() -> None:
    """A run failed: leave the process groups to the exit (destroying one waits for its collectives in flight, which a
    dead or frozen peer may never finish)."""
    _exit_teardown["skip"] = True


def _destroy_process_groups() -> None:
    if not _exit_teardown["skip"] and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # (a group still referenced elsewhere lives on, its threads with it)


def agent_hosts_store() -> bool:
    """Whether torchrun's agent hosts the job's rendezvous store (every rank is its client); else global rank 0 does
    (Lightning's launcher, SLURM, plain ``init_process_group``)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def store_listener(address: str, port: int, num_nodes: int = 1) -> socket.socket:
    """A TCP socket bound to ``address:port`` (``MASTER_ADDR:MASTER_PORT``) and listening, for the store's server.

    ``address`` is resolved as the store's clients resolve it (a name, an IPv4 or IPv6 address); ``0.0.0.0`` / ``::``
    listen on every interface (``::`` IPv4 included, as torch's own store). Raises a ``ValueError`` naming
    ``MASTER_ADDR`` / ``MASTER_PORT`` and the fix when this host cannot listen there.
    """
    where = f"MASTER_ADDR={address!r} MASTER_PORT={port}"
    try:
        found = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ValueError(f"{where}: global rank 0 hosts the job's rendezvous store there, but {address!r} does not "
                         f"resolve on this host ({err}). Set MASTER_ADDR to an address of this machine that the other "
                         "ranks reach (or 0.0.0.0 to listen on every interface).") from err
    if num_nodes > 1 and not _is_loopback_literal(address):
        # a name mapped to loopback here (127.0.1.1 in /etc/hosts) is not what the other nodes reach
        reachable = [entry for entry in found if not _ip(entry[4]).is_loopback]
        if not reachable:
            raise ValueError(
                f"{where}: {address!r} resolves to {_ip(found[0][4])} on this host (global rank 0's), a loopback "
                f"address the other {num_nodes - 1} node(s) cannot reach, and the job's rendezvous store listens there. "
                "Set MASTER_ADDR to this machine's address on the network the nodes share (e.g. its IP address; a "
                "host name mapped to 127.0.1.1 in /etc/hosts resolves to loopback), or to 0.0.0.0 to listen on every "
                "interface.")
        found = reachable
    errors: list[OSError] = []
    for family, kind, proto, _name, sockaddr in found:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store: a port left in TIME_WAIT
            if family == socket.AF_INET6 and _ip(sockaddr).is_unspecified:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::": IPv4 too, as torch's "[::]"
            sock.bind(sockaddr)
            sock.listen(socket.SOMAXCONN)  # every rank connects at once
            return sock
        except OSError as err:
            sock.close()
            errors.append(err)
    err = errors[0]
    if any(e.errno == errno.EADDRINUSE for e in errors):
        fix = ("another process listens on that port already (an earlier run still alive?): pick a free MASTER_PORT, "
               "or leave it unset for Lightning to choose one")
    else:
        fix = ("that address is not one of this machine's: set MASTER_ADDR to an address of the machine of global rank "
               "0 that the other ranks reach (e.g. its address on the network the nodes share), or to 0.0.0.0 to "
               "listen on every interface")
    raise ValueError(f"{where}: global rank 0 hosts the job's rendezvous store there and cannot listen on it ({err}); "
                     f"{fix}.") from err


def _ip(sockaddr: Any) -> Any:
    return ipaddress.ip_address(str(sockaddr[0]).split("%")[0])  # without an IPv6 scope ("fe80::1%eth0")


def _is_loopback_literal(address: str) -> bool:
    """``127.x.x.x``, ``::1``, ``localhost``: the user asked for loopback itself (not a name that happens to map there)."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address.lower() in ("localhost", "localhost.localdomain")


def rendezvous_store(address: str, port: int, rank: int, world_size: int, timeout: timedelta,
                     num_nodes: int = 1) -> Optional[dist.Store]:
    """The store of the default process group, as torch's ``env://`` rendezvous makes it, but listening on ``address``.

    torch's own store server binds every interface whatever ``MASTER_ADDR`` says; here global rank 0 binds the socket
    itself (:func:`store_listener`) and hands it to its ``TCPStore`` (``master_listen_fd``), the other ranks connect
    as clients. Everything else is torch's: multi-tenant server, libuv unless ``USE_LIBUV=0``, the timeout, the
    ``default_pg`` key prefix. ``None`` under torchrun's agent store (torch's own path then: every rank a client).
    """
    if agent_hosts_store():
        return None
    # torch's default backend (libuv) takes a listening socket from torch 2.8 on (pytorch#150215); before, its
    # previous backend does
    use_libuv = os.environ.get("USE_LIBUV", "1") == "1" and (rank != 0 or torch.__version__ >= (2, 8))
    if rank == 0:
        listener = store_listener(address, port, num_nodes)
        try:
            store = dist.TCPStore(address, port, world_size, is_master=True, timeout=timeout, multi_tenant=True,
                                  master_listen_fd=listener.fileno(), use_libuv=use_libuv)
        except BaseException:
            listener.close()
            raise
        listener.detach()  # the store owns the socket now and closes it with itself
    else:
        store = dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout, use_libuv=use_libuv)
    store.set_timeout(timeout)
    return dist.PrefixStore(DEFAULT_PG_PREFIX, store)


def init_default_group(cluster_environment: Any, backend: str, timeout: Optional[timedelta],
                       device_id: Optional[torch.device], num_nodes: int = 1) -> None:
    """Start the default process group as Lightning does (``_init_dist_connection``: ``MASTER_ADDR`` / ``MASTER_PORT``
    from the cluster environment, ``init_process_group``), over :func:`rendezvous_store` (every strategy's
    ``setup_distributed`` calls it first; Lightning's own then finds the group started). Nothing when it is already
    (a second fit in the same processes)."""
    if dist.is_initialized():
        return
    rank, world_size = cluster_environment.global_rank(), cluster_environment.world_size()
    address, port = cluster_environment.main_address, int(cluster_environment.main_port)
    kwargs: dict[str, Any] = {"timeout": timeout, "device_id": device_id}
    if backend != "mpi":  # MPI meets without a store
        store = rendezvous_store(address, port, rank, world_size, timeout or default_pg_timeout, num_nodes)
        if store is not None:
            kwargs["store"] = store
    init_dist_connection(cluster_environment, backend, rank, world_size, **kwargs)


def build_topology(group_size: int, timeout: Optional[timedelta] = None) -> Topology:
    """Create the inner and cross process groups. Collective: every rank must call it, in the same order."""
    unbind_gloo_default_group()
    destroy_process_groups_at_exit()
    world_size, rank = dist.get_world_size(), dist.get_rank()
    check_group_size(world_size, group_size)
    if group_size == 1:
        return Topology(world_size, rank, 1, inner_group=None, cross_group=None)
    inner = new_groups(group_ranks(world_size, group_size), rank, timeout)
    cross = new_groups(cross_group_ranks(world_size, group_size), rank, timeout)
    return Topology(world_size, rank, group_size, inner_group=inner, cross_group=cross)


def add_cluster_groups(topology: Topology, cluster_size: int, timeout: Optional[timedelta] = None) -> Topology:
    """Create the two process groups of two-stage sync. Collective: every rank calls it, in the same order."""
    check_cluster_size(topology.num_groups, cluster_size)
    intra_ranks, inter_ranks = cluster_cross_group_ranks(topology.world_size, topology.group_size, cluster_size)
    topology.cluster_size = cluster_size
    topology.intra_cluster_group = new_groups(intra_ranks, topology.rank, timeout)
    topology.inter_cluster_group = new_groups(inter_ranks, topology.rank, timeout)
    return topology


def job_cluster_groups(topology: Topology) -> Topology:
    """Federated mode with several worker groups per job: the job is the cluster. Not collective (no new group).

    Level 1 is the job's own cross groups (rank ``k`` of every group of the job: fast links). Level 2 crosses jobs
    over torchft's communicator, set by :meth:`Topology.federate` once the federation starts; it pairs rank ``r`` of
    every job. Rank ``r = i·S + k`` holds slice ``k`` of ``θ_c`` like the other groups' rank ``k``, so level 2 is
    split over them: it reduces piece ``i`` of slice ``k`` across jobs and all-gathers the other pieces over its level-1
    cross group, and every job sends one copy of the model per level-2 sync over the slow links (not one per group).
    """
    job_cross = topology.cross_group if topology.cross_group is not None else dist.group.WORLD
    topology.cluster_size = topology.num_groups
    topology.intra_cluster_group = topology.cross_group
    topology.inter_cluster_slice_group = job_cross
    topology.cluster_group = dist.group.WORLD  # the job's world
    return topology


def build_mesh_topology(device_type: str, group_size: int,
                        inner_dims: Optional[Sequence[tuple[str, int]]] = None,
                        replicate_dim: str = "replicate") -> tuple[DeviceMesh, Topology]:
    """A device mesh ``(replicate_dim, *inner_dims)`` and the :class:`Topology` it gives. Collective.

    Row ``i`` of the mesh is worker group ``i`` (its inner dimensions, e.g. ``("shard", S)`` for FSDP or
    ``("data_parallel", D), ("tensor_parallel", T)`` for a 2-D inner strategy, multiply to ``group_size``); column
    ``k`` is cross group ``k``: the ranks holding the same place in every group. An inner strategy shards over the
    inner dimensions; the outer sync runs over ``mesh[replicate_dim]``.
    """
    unbind_gloo_default_group()
    destroy_process_groups_at_exit()
    world_size, rank = dist.get_world_size(), dist.get_rank()
    check_group_size(world_size, group_size)
    dims = list(inner_dims) if inner_dims is not None else [("shard", group_size)]
    if math.prod(size for _, size in dims) != group_size:
        raise ValueError(f"the inner mesh dimensions {dims} must multiply to group_size={group_size}.")
    names = tuple(name for name, _ in dims)
    mesh = init_device_mesh(device_type, (world_size // group_size, *(size for _, size in dims)),
                            mesh_dim_names=(replicate_dim, *names))
    if len(dims) == 1:
        inner = mesh[names[0]].get_group()
    else:  # the whole worker group, over all its inner dimensions
        inner = new_groups(group_ranks(world_size, group_size), rank)
    topology = Topology(world_size, rank, group_size, inner_group=inner, cross_group=mesh[replicate_dim].get_group())
    return mesh, topology
