"""Nothing listens wider than asked: `lightning-localsgd lighthouse` binds loopback unless told otherwise, and
binds exactly the address `--bind` names (read back from the kernel's table of listening sockets)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

pytest.importorskip("torchft")

from lightning_localsgd.federation import LOOPBACK, lighthouse_bind, main_lighthouse, start_lighthouse


def listening(port: int) -> set[str]:
    """The addresses bound by the sockets listening on ``port`` (Linux: /proc/net/tcp and tcp6)."""
    found = set()
    for path, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = open(path).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
                found.add(str(ipaddress.ip_address(raw)))
    return found


@pytest.fixture
def need_proc():
    try:
        open("/proc/net/tcp").close()
    except FileNotFoundError:
        pytest.skip("no /proc/net/tcp on this system")


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
