"""Process groups of worker groups (lightning_localsgd/topology.py) on bare torch.distributed (gloo, 2 ranks)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _forkserver
from _forkserver import free_port
from lightning_localsgd.topology import add_cluster_groups, build_mesh_topology, build_topology



def _bound_gloo(rank: int, port: int, out: str, unbind: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # what Lightning's init_process_group(device_id=cuda:i) does on a GPU, here with a CPU device (torch accepts only
    # an accelerator at init): the same sub-group code path in torch
    dist.group.WORLD.bound_device_id = torch.device("cpu", 0)
    result = {}
    try:
        if unbind:
            topo = build_topology(2)  # inner group [0, 1], cross groups [0] and [1]: each rank is outside one
            x = torch.ones(1) * (rank + 1)
            dist.all_reduce(x, group=topo.inner_group)
            result["inner_sum"] = float(x)
            _, mesh_topo = build_mesh_topology("cpu", 2)
            result["mesh_cross_size"] = dist.get_world_size(mesh_topo.cross_group)
        else:  # torch alone: a sub-group that leaves a rank out fails on that rank
            try:
                dist.new_group([0])
                dist.new_group([1])
                result["error"] = None
            except (AttributeError, ValueError) as err:  # GPU: no perform_nocolor_split; CPU: not an accelerator
                result["error"] = str(err)
        result["bound"] = dist.group.WORLD.bound_device_id
    finally:
        torch.save(result, os.path.join(out, f"{rank}.pt"))
        dist.destroy_process_group()


@pytest.mark.parametrize("unbind", [False, True], ids=["torch_alone", "build_topology"])
def test_groups_of_a_gloo_default_group_bound_to_a_device(tmp_path, unbind):
    """Ranks sharing one GPU over gloo (tests/cuda, the --gpu benchmarks): Lightning binds the default group to the
    device, torch then splits sub-groups from it, which gloo cannot do; build_topology drops the binding first."""
    launch = _forkserver.spawn if _forkserver.enabled() else mp.spawn
    launch(_bound_gloo, args=(free_port(), str(tmp_path), unbind), nprocs=2)
    got = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(2)]
    if unbind:
        assert [g["inner_sum"] for g in got] == [3.0, 3.0]
        assert [g["mesh_cross_size"] for g in got] == [1, 1]
        assert all(g["bound"] is None for g in got)
    else:  # the torch behaviour the workaround is for; if a torch release fixes it, this says so
        assert all(g["error"] for g in got), got


def _members(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=4)
    try:
        ranks = lambda group: dist.get_process_group_ranks(group)  # noqa: E731
        topo = add_cluster_groups(build_topology(2), cluster_size=2)
        _, mesh = build_mesh_topology("cpu", 2, inner_dims=[("data_parallel", 1), ("tensor_parallel", 2)])
        torch.save({"inner": ranks(topo.inner_group), "cross": ranks(topo.cross_group),
                    "intra": ranks(topo.intra_cluster_group), "inter": ranks(topo.inter_cluster_group),
                    "mesh_inner": ranks(mesh.inner_group), "mesh_cross": ranks(mesh.cross_group)},
                   os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_every_rank_gets_the_groups_it_is_in(tmp_path):
    """4 ranks, worker groups of 2, clusters of 2 groups, and a 2-D inner mesh: each rank's process groups hold the
    ranks worked out by hand (every rank creates every group, each keeps its own)."""
    launch = _forkserver.spawn if _forkserver.enabled() else mp.spawn
    launch(_members, args=(free_port(), str(tmp_path)), nprocs=4)
    got = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(4)]
    groups = [[0, 1], [0, 1], [2, 3], [2, 3]]  # worker group i: ranks 2i, 2i + 1
    cross = [[0, 2], [1, 3], [0, 2], [1, 3]]  # cross group k: rank k of every group
    assert [g["inner"] for g in got] == groups and [g["mesh_inner"] for g in got] == groups
    assert [g["cross"] for g in got] == cross and [g["mesh_cross"] for g in got] == cross
    assert [g["intra"] for g in got] == cross  # one cluster of both groups: level 1 is the cross group
    assert [g["inter"] for g in got] == [[0], [1], [2], [3]]  # one cluster: level 2 is each rank alone


_EXIT_SCRIPT = """
import atexit, sys
import torch.distributed as dist
from lightning_localsgd.topology import build_topology, keep_process_groups_at_exit
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
# atexit runs its handlers last registered first: this one runs after those build_topology registers
atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
build_topology(1)
build_topology(1)  # registered once per process
if sys.argv[2] == "failed":
    keep_process_groups_at_exit()
"""


@pytest.mark.parametrize("run", ["clean", "failed"])
def test_process_groups_destroyed_at_exit_before_finalization(tmp_path, run):
    """A clean run's process groups are destroyed by atexit, before the interpreter finalizes (a gloo worker thread
    that releases a collective's tensors during finalization aborts the process); a failed run's are left to the
    exit (destroying waits for collectives in flight, which a dead peer never finishes)."""
    proc = _forkserver.run([sys.executable, "-c", _EXIT_SCRIPT, str(tmp_path / "store"), run], capture_output=True,
                           text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("initialized at exit:") == 1, proc.stdout
    assert f"initialized at exit: {run == 'failed'}" in proc.stdout, proc.stdout
