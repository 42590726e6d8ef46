"""Host addresses as the listeners of a federated run need them: which local interface reaches a peer, and how a host
goes into a URL. A leaf: the run secret's healing transport and ``_compat``'s bound torchft servers both use it."""

from __future__ import annotations

import socket

__all__ = ["local_address_towards", "url_host"]


def local_address_towards(address: str) -> str:
    """The address of this host's interface that reaches ``address`` (``host:port``): what the healing transport
    binds and advertises (loopback when the lighthouse is on this machine)."""
    text = address.split("://", 1)[-1]
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    family, _, _, _, sockaddr = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(sockaddr)  # UDP: picks the route, sends nothing
        return str(probe.getsockname()[0])


def url_host(host: str) -> str:
    """``host`` as it goes into a URL or a ``host:port`` bind string (an IPv6 address in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
