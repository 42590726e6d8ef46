"""The job's rendezvous store listens on MASTER_ADDR only (topology.init_default_group), and is otherwise torch's:

a 2-rank fit of every strategy trains as the hand reference with the store's port listening on 127.0.0.1 alone (torch's
own store listens on every interface), the default group's keys sit where torch's env:// rendezvous puts them, torchrun's
agent store is left to torch, and an address this host cannot listen on fails before training, naming MASTER_ADDR.
The listeners are read back from the kernel's table of listening sockets."""

from __future__ import annotations

import importlib.util
import socket
from datetime import timedelta

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import LightningEnvironment
from torch.utils.data import DataLoader

from _launch import run_tiny
from _listening import listening, need_proc, own_listening_sockets  # noqa: F401 (need_proc: a fixture)
from _forkserver import free_port
from reference import check_against_reference
from workers.tiny import TinyModule, make_dataset

from lightning_localsgd import LocalSGDStrategy, topology
from lightning_localsgd._compat import default_store
from lightning_localsgd.topology import init_default_group, rendezvous_store, store_listener

TIMEOUT = timedelta(seconds=60)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    "local_sgd", "fsdp",
    pytest.param("deepspeed", marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                        reason="deepspeed is not installed")),
])
def test_a_fit_listens_on_master_addr_only_and_trains_as_the_reference(tmp_path, need_proc, strategy):
    """Two ranks with MASTER_ADDR=127.0.0.1 (the launch helpers' address): rank 0's store listens there only, not on
    0.0.0.0 / ``::``, and both ranks end where the single-process reference does."""
    ranks = run_tiny(tmp_path, devices=2, strategy=strategy, sync_every=3, steps=6, store_listeners=True)
    assert all(dump["info"]["store_listeners"] == ["127.0.0.1"] for dump in ranks), \
        [dump["info"]["store_listeners"] for dump in ranks]
    check_against_reference(ranks, 2, 1, sync_every=3, outer="average", steps=6)


# ------------------------------------------------------------------------------------------------ one process
@pytest.fixture
def fresh_world(monkeypatch):
    """No default process group before (an in-process test elsewhere may have left one) or after; the rendezvous
    environment variables the test sets are undone."""
    for var in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "USE_LIBUV"):
        monkeypatch.delenv(var, raising=False)
    if dist.is_initialized():
        dist.destroy_process_group()
    yield monkeypatch
    if dist.is_initialized():
        dist.destroy_process_group()


def _one_rank(monkeypatch, address: str, port: int) -> LightningEnvironment:
    monkeypatch.setenv("MASTER_ADDR", address)
    monkeypatch.setenv("MASTER_PORT", str(port))
    env = LightningEnvironment()
    env.set_world_size(1)
    env.set_global_rank(0)
    return env


def _default_group_keys(port: int) -> set[str]:
    """The keys in the store at 127.0.0.1:``port`` after the default group's store recorded ``probe`` (read by a plain
    client, as torchft's manager and the run secret's job store read it)."""
    default_store().set("probe", "1")
    client = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False, timeout=TIMEOUT)
    return {key for key in client.list_keys() if key.endswith("probe")}


def test_the_default_groups_keys_are_where_torchs_env_rendezvous_puts_them(fresh_world, need_proc):
    port = free_port()
    init_default_group(_one_rank(fresh_world, "127.0.0.1", port), "gloo", TIMEOUT, None)
    assert listening(port) == {"127.0.0.1"}
    ours = _default_group_keys(port)
    dist.destroy_process_group()

    port = free_port()  # torch's own env:// rendezvous, as Lightning ran it before
    fresh_world.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=TIMEOUT)
    torchs = _default_group_keys(port)
    assert ours == torchs and len(ours) == 1, (ours, torchs)


@pytest.mark.parametrize("version, libuv", [("2.13.0", True), ("2.7.1", False)])
def test_the_store_backend_takes_the_socket(fresh_world, need_proc, version, libuv):
    """torch's libuv store takes a listening socket from torch 2.8 on; before, its previous backend serves it (both
    run here, on the installed torch, with the version it reports patched)."""
    fresh_world.setattr(torch, "__version__", torch.torch_version.TorchVersion(version))
    port = free_port()
    store = rendezvous_store("127.0.0.1", port, 0, 1, TIMEOUT)
    assert store._underlying_non_prefix_store.libuvBackend is libuv
    assert listening(port) == {"127.0.0.1"}
    store.set("probe", "1")
    client = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False, timeout=TIMEOUT)
    assert client.get("default_pg/probe") == b"1"


def test_torchruns_agent_store_is_left_to_torch(fresh_world, need_proc):
    """Under torchrun's agent store every rank, rank 0 included, is a client of the store the agent hosts: nothing
    binds MASTER_PORT (it is the agent's) and the default group's keys land in the agent's store."""
    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    env = _one_rank(fresh_world, "127.0.0.1", agent.port)
    fresh_world.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    assert rendezvous_store("127.0.0.1", agent.port, 0, 1, TIMEOUT) is None
    before = own_listening_sockets()
    init_default_group(env, "gloo", TIMEOUT, None)  # binding MASTER_PORT here would fail: the agent listens on it
    assert not any(port == agent.port for _host, port in own_listening_sockets() - before)
    default_store().set("probe", "1")
    assert [key for key in agent.list_keys() if key.endswith("probe")] == ["default_pg/0//probe"]


def test_an_address_not_on_this_host_fails_before_training(fresh_world, tmp_path):
    """192.0.2.1 (TEST-NET-1, documentation only) is on no machine: the fit fails at setup, naming MASTER_ADDR and
    the fix, with no step run and no process group started."""
    _one_rank(fresh_world, "192.0.2.1", free_port())
    model = TinyModule()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=LocalSGDStrategy(), logger=False,
                        enable_checkpointing=False, max_steps=2, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"MASTER_ADDR='192.0.2.1' MASTER_PORT=\d+: global rank 0 hosts the job's "
                                         r"rendezvous store there and cannot listen on it .*0\.0\.0\.0 to listen on "
                                         r"every interface"):
        trainer.fit(model, DataLoader(make_dataset(), batch_size=2))
    assert trainer.global_step == 0 and not dist.is_initialized()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_port_in_use_and_a_name_on_loopback_across_nodes_are_refused(monkeypatch, need_proc):
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(ValueError, match=r"MASTER_PORT=\d+: .*another process listens on that port already.*pick "
                                             r"a free MASTER_PORT"):
            store_listener("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
    # 127.0.0.1 asked for on several nodes (ranks of one machine, each started as a node) is taken as asked
    asked = store_listener("127.0.0.1", 0, num_nodes=2)
    asked.close()
    # a host name that /etc/hosts maps to loopback is no address the other nodes reach
    real = socket.getaddrinfo
    monkeypatch.setattr(topology.socket, "getaddrinfo",
                        lambda host, *a, **k: real("127.0.1.1" if host == "node0" else host, *a, **k))
    with pytest.raises(ValueError, match=r"MASTER_ADDR='node0' .*resolves to 127\.0\.1\.1 on this host .*a loopback "
                                         r"address the other 1 node\(s\) cannot reach"):
        store_listener("node0", 0, num_nodes=2)
    single = store_listener("node0", 0)  # one node: loopback is where every rank is
    assert listening(single.getsockname()[1]) == {"127.0.1.1"}
    single.close()


@pytest.mark.parametrize("address, bound", [("0.0.0.0", "0.0.0.0"), ("::", "::")])
def test_every_interface_when_asked(need_proc, address, bound):
    """MASTER_ADDR=0.0.0.0 or ``::`` still listens on every interface (``::`` IPv4 too, as torch's own store)."""
    try:
        sock = store_listener(address, 0)
    except ValueError as err:  # no IPv6 on this machine
        pytest.skip(f"cannot listen on {address}: {err}")
    try:
        port = sock.getsockname()[1]
        assert listening(port) == {bound}
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        sock.close()
