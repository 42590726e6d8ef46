"""What listens where, read back from the kernel's table of listening sockets (Linux: /proc/net/tcp and tcp6): the
tests of "nothing listens wider than asked" (the lighthouse, a job's torchft servers, the job's rendezvous store) and the
workers that record it."""

from __future__ import annotations

import ipaddress
import os

import pytest


def listening(port: int) -> set[str]:
    """The addresses bound by the sockets listening on ``port`` (Linux: /proc/net/tcp and tcp6)."""
    return {address for address, bound_port, _inode in listening_sockets() if bound_port == port}


def listening_sockets() -> set[tuple[str, int, int]]:
    """Every listening TCP socket on this machine: ``(address, port, inode)`` (Linux: /proc/net/tcp and tcp6)."""
    found = set()
    for path, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = open(path).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A":  # LISTEN
                raw = bytes.fromhex(address)
                # the kernel prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4))
                found.add((str(ipaddress.ip_address(raw)), int(hex_port, 16), int(line.split()[9])))
    return found


def own_listening_sockets() -> set[tuple[str, int]]:
    """The listening sockets this process holds (its open file descriptors' socket inodes): ``(address, port)``."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return {(address, port) for address, port, inode in listening_sockets() if inode in inodes}


@pytest.fixture
def need_proc():
    try:
        open("/proc/net/tcp").close()
    except FileNotFoundError:
        pytest.skip("no /proc/net/tcp on this system")
