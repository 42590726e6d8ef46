"""Nothing listens wider than asked: `lightning-localsgd lighthouse` binds loopback unless told otherwise, and
binds exactly the address `--bind` names; a federated job's own servers (torchft's manager server on rank 0, the
healing transport) listen on the interface that reaches the lighthouse only (read back from the kernel's table of
listening sockets)."""

from __future__ import annotations

import socket
from datetime import timedelta
from types import SimpleNamespace

import pytest

pytest.importorskip("torchft")

from _listening import listening, need_proc, own_listening_sockets  # noqa: F401 (need_proc: a fixture)
from lightning_localsgd.federation import LOOPBACK, lighthouse_bind, main_lighthouse, start_lighthouse


def test_default_bind_is_loopback_only(need_proc):
    server, address = start_lighthouse(port=0)
    try:
        host, port = address.rsplit(":", 1)
        assert host == LOOPBACK == "127.0.0.1"
        assert listening(int(port)) == {"127.0.0.1"}
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
            pass
    finally:
        server.shutdown()


@pytest.mark.parametrize("bind, bound, announced", [("0.0.0.0", "0.0.0.0", socket.gethostname()),
                                                    ("::1", "::1", "[::1]")])
def test_bind_names_exactly_what_listens(need_proc, bind, bound, announced):
    try:
        server, address = start_lighthouse(bind, port=0)
    except Exception as err:  # e.g. no IPv6 on this machine
        pytest.skip(f"cannot bind {bind}: {err}")
    try:
        host, port = address.rsplit(":", 1)
        assert host == announced
        assert listening(int(port)) == {bound}
    finally:
        server.shutdown()


def test_bind_strings_and_the_cli_default(capsys):
    assert lighthouse_bind("127.0.0.1", 29510) == "127.0.0.1:29510"
    assert lighthouse_bind("::", 0) == "[::]:0" and lighthouse_bind("[::1]", 5) == "[::1]:5"
    with pytest.raises(SystemExit):
        main_lighthouse(["--help"])
    assert "default 127.0.0.1: this machine only" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("secret", [None, "run-secret"], ids=["no-secret", "run-secret"])
def test_a_federated_jobs_servers_listen_where_the_lighthouse_is_reached_only(need_proc, monkeypatch, secret):
    """Rank 0 of a job started against a lighthouse on loopback: torchft's manager server (which torchft binds to
    ``[::]``) and the healing transport (torchft's binds every interface) listen on 127.0.0.1 and advertise it."""
    from torch.distributed import TCPStore

    from lightning_localsgd.federation import Federation
    from lightning_localsgd.run_secret import ENV_VAR
    from lightning_localsgd.syncs import HostFacts

    server, address = start_lighthouse(port=0)
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # the job's store (Lightning's, in a run)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    if secret is None:
        monkeypatch.delenv(ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(ENV_VAR, secret)
    federation = Federation(address, "g0", min_groups=1, sync_timeout=10)
    before = own_listening_sockets()
    try:
        federation.start(None, SimpleNamespace(overlap_steps=0, data_jobs=None),
                         HostFacts(rank=0, world_size=1, training_state=lambda: None))
        opened = own_listening_sockets() - before
        manager_address = store.get("manager_addr").decode()  # what the manager server advertises (torchft's key)
        manager_port = int(manager_address.rsplit(":", 1)[1])
        assert {host for host, _port in opened} == {"127.0.0.1"}, opened  # none on :: or 0.0.0.0
        assert len(opened) >= 2, opened  # the manager server and the healing transport
        assert ("127.0.0.1", manager_port) in opened
        assert manager_address == f"http://127.0.0.1:{manager_port}"
        transport = federation.manager._checkpoint_transport
        advertised = transport.metadata()
        assert advertised.startswith("http://127.0.0.1:"), advertised
    finally:
        federation.shutdown()
        server.shutdown()
