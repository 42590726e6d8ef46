"""The run secret: only the run's own federated jobs take part in its syncs.

Every job of a run holds the same secret (``LOCALSGD_RUN_SECRET``, or the file ``run_secret_file`` names). It is read
when the federation starts, kept as a derived HMAC key inside a :class:`RunSecret` (whose ``repr`` hides it and which
refuses to be pickled, so it never reaches a log, a checkpoint or the hyperparameters), and used for two things:

**Who is in a quorum.** torchft's lighthouse takes any process that heartbeats into a quorum and its managed process
group would include every participant. The ``AuthenticatedProcessGroup``
(:func:`make_authenticated_process_group`) is the process group the torchft Manager reconfigures at each new quorum
(``configure``, on torchft's quorum thread, before any healing): rank 0 of each job runs a mutual proof over the
quorum's store (the members write a record with a fresh nonce, then for every other member ``HMAC(secret, quorum id,
their positions, the prover's record, the verifier's nonce)``), verifies every proof it receives, logs one line per
member that did not prove the secret, and hands the verified set to its job's other ranks through the job's own store
(MACed). Every rank ``k`` then builds its gloo group over rank ``k`` of the verified jobs only, rendezvoused on verified
job ``k``'s store (mod their number) under a prefix derived from the secret (a process without it can neither compute
the prefix nor read it anywhere). Every collective of a sync (layout check,
data positions, the reduce, the screen) runs over that group: an unauthenticated member receives nothing and nothing
it sends is averaged; its own collectives time out on its side only, and the honest jobs' commit vote is per job.

**Healing.** The ``AuthenticatedHTTPTransport`` (:func:`make_healing_transport`) replaces torchft's
``HTTPTransport`` (which binds every interface and serves the staged state to whoever asks): it listens on the address
this host reaches the lighthouse from, serves the state only to a request carrying ``HMAC(secret, its URL, step,
nonce)`` and MACs the response, which the receiver verifies before it unpickles anything, so an impostor that torchft
names as the healing source (by claiming a higher step) cannot feed state to an honest job either: that heal fails
and the attempt is redone.

Without a secret nothing here is used and federated runs behave as torchft does (a trusted network). What the secret
does not give (docs/multi_cluster.md): encryption (gloo and HTTP are plaintext; an on-path attacker can read and alter
traffic: run over WireGuard / a VPN), or availability (a process that joins the lighthouse can still delay or stall
quorums: it claims a higher step, or heartbeats without taking part).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from .addresses import url_host

__all__ = ["ENV_VAR", "RunSecret", "authenticated_members", "check_run_secret_file", "load_run_secret",
           "make_authenticated_process_group", "make_healing_transport"]

log = logging.getLogger(__name__)

ENV_VAR = "LOCALSGD_RUN_SECRET"
"""The environment variable holding the run secret (``run_secret_file`` takes precedence)."""

_POLL_S = 0.005
_MAX_REQUEST_BYTES = 4096
_PROOF_HEADER = "X-LocalSGD-Proof"


class RunSecret:
    """The run secret as an HMAC-SHA256 key (derived, the raw value is not kept). Hidden from ``repr`` / ``str``; not
    picklable, so it cannot reach a checkpoint, a hyperparameter dump or a spawned process by accident."""

    __slots__ = ("_key",)

    def __init__(self, value: bytes) -> None:
        self._key = hashlib.sha256(b"lightning-localsgd run secret\0" + value).digest()

    def mac(self, *parts: Any) -> bytes:
        """HMAC-SHA256 over ``parts`` (each length-prefixed, so that no two part lists give the same message)."""
        message = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in parts:
            data = part if isinstance(part, bytes) else str(part).encode()
            message.update(len(data).to_bytes(8, "big") + data)
        return message.digest()

    def verify(self, tag: bytes, *parts: Any) -> bool:
        return hmac.compare_digest(tag, self.mac(*parts))

    def __repr__(self) -> str:
        return "RunSecret(<hidden>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a RunSecret is never pickled (it must not reach a checkpoint or a log)")


def check_run_secret_file(path: Any) -> None:
    """Raise a ``ValueError`` naming ``run_secret_file`` unless it is a readable, non-empty file (its content is
    never shown)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"run_secret_file must be the path of a file holding the run secret, got {path!r}.")
    try:
        with open(path, "rb") as f:
            empty = not f.read().strip()
    except OSError as err:
        raise ValueError(f"run_secret_file={str(path)!r} cannot be read ({err.strerror}): give the path of a file "
                         "holding the run secret (every job of the run the same), e.g. made with `head -c 32 "
                         "/dev/urandom | base64 > secret`, readable by this job only.") from None
    if empty:
        raise ValueError(f"run_secret_file={str(path)!r} is empty: write the run secret into it (every job of the run "
                         "the same), e.g. `head -c 32 /dev/urandom | base64 > secret`.")


def load_run_secret(run_secret_file: Optional[str]) -> Optional[RunSecret]:
    """The run secret from ``run_secret_file``, else from ``LOCALSGD_RUN_SECRET``; ``None`` when neither is given
    (surrounding whitespace is not part of it)."""
    if run_secret_file is not None:
        check_run_secret_file(run_secret_file)
        with open(run_secret_file, "rb") as f:
            return RunSecret(f.read().strip())
    value = os.environ.get(ENV_VAR)
    if value is None:
        return None
    if not value.strip():
        raise ValueError(f"{ENV_VAR} is set but empty: set it to the run secret (every job of the run the same), or "
                         "unset it to run without one (a trusted network only, docs/multi_cluster.md).")
    return RunSecret(value.strip().encode())


# ---------------------------------------------------------------------------------------------------- quorum membership
def _wait_for(store: Any, key: str, deadline: float) -> Optional[bytes]:
    """The value of ``key`` once it is set, or ``None`` if it is not by ``deadline``."""
    while True:
        if store.check([key]):
            return bytes(store.get(key))
        if time.monotonic() >= deadline:
            return None
        time.sleep(_POLL_S)


def make_authenticated_process_group(secret: RunSecret, job_store: str, timeout: timedelta, min_groups: int) -> Any:
    """The process group for torchft's Manager with a run secret (see the module's docstring)."""
    return _authenticated_class()(secret, job_store, timeout, min_groups)


_CLASS: Optional[type] = None


def _authenticated_class() -> type:
    """The process group class: a subclass of torchft's reconfigurable gloo group, made on first use (torchft is an
    optional dependency, imported only by a federated run)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from torchft.process_group import ProcessGroupGloo, create_store_client

    class AuthenticatedProcessGroup(ProcessGroupGloo):
        """torchft's reconfigurable gloo group over the members of each quorum that proved the run secret."""

        def __init__(self, secret: RunSecret, job_store: str, timeout: timedelta, min_groups: int) -> None:
            super().__init__(timeout=timeout)
            self.secret = secret
            self.job_store = job_store
            """``host:port`` of this job's own store (its rank 0's TCPStore, the store torchft advertises)."""
            self.wait_s = timeout.total_seconds()
            """How long the proof exchange waits for a member's record, then for its proofs."""
            self.min_groups = min_groups
            self.members: list[int] = []
            """The quorum positions (torchft's replica ranks) of the verified members, this job's included."""
            self.member_rank = 0
            """This job's index among :attr:`members`: its rank in the group the collectives run on."""
            self.excluded: list[str] = []
            """Per quorum (rank 0): who did not prove the secret, as logged."""
            self.replica_ids: list[str] = []
            """The quorum's members as the lighthouse names them (set by the Manager's quorum observer)."""

        def configure(self, store_addr: str, replica_id: str, rank: int, world_size: int,
                      quorum_id: Optional[int] = None, group_rank: Optional[int] = None,
                      group_world_size: Optional[int] = None, global_ranks: Optional[list[int]] = None) -> None:
            """torchft's reconfiguration at a new quorum (its quorum thread): the proof exchange, then torchft's own
            gloo group over the verified members only (a store address, rank and size of their own)."""
            self.abort(errored=False)  # nothing runs on the last quorum's group once this one is being formed
            self.members, self.member_rank = [], 0
            job = create_store_client(f"{self.job_store}/localsgd_run_secret", timeout=timedelta(seconds=self.wait_s))
            verdict_key = f"verdict/{quorum_id}"
            if not group_rank:
                verdict = self._authenticate(store_addr, replica_id, rank, world_size, quorum_id)
                body = json.dumps(verdict, sort_keys=True).encode()
                job.set(verdict_key, json.dumps({"verdict": verdict, "mac": self.secret.mac(
                    "verdict", quorum_id, body).hex()}))
            else:  # this job's rank 0 decided; its record is MACed (the job's store is reachable by other jobs)
                wait_s = 3 * self.wait_s  # rank 0 waits up to wait_s for the records, then as long for the proofs
                raw = _wait_for(job, verdict_key, time.monotonic() + wait_s)
                if raw is None:
                    raise TimeoutError(f"local SGD: rank {group_rank} did not receive its job's verdict on the members "
                                       f"of quorum {quorum_id} within {wait_s:g} s")
                record = json.loads(raw)
                verdict = record["verdict"]
                body = json.dumps(verdict, sort_keys=True).encode()
                if not self.secret.verify(bytes.fromhex(record["mac"]), "verdict", quorum_id, body):
                    raise PermissionError(f"local SGD: the verdict on the members of quorum {quorum_id} in this job's "
                                          "store is not its rank 0's (it fails the run secret's MAC)")
            # the positions are the same in every rank's quorum (torchft sorts the same participants for each rank)
            members = [int(m) for m in verdict["members"]]
            if len(members) < self.min_groups:
                raise RuntimeError(f"local SGD: only {len(members)} member(s) of quorum {quorum_id} proved the run "
                                   f"secret, fewer than min_groups={self.min_groups}")
            prefix = self.secret.mac("group", quorum_id, body).hex()[:32]
            # rank k meets on verified job k's store (mod their number), as torchft spreads its ranks' stores
            k = group_rank or 0
            stores = verdict["stores"]
            super().configure(f"{stores[k % len(stores)]}/localsgd/{prefix}/{k}", replica_id, members.index(rank),
                              len(members), quorum_id, group_rank, group_world_size, None)
            self.members, self.member_rank = members, members.index(rank)

        def _authenticate(self, store_addr: str, replica_id: str, rank: int, world_size: int,
                          quorum_id: Optional[int]) -> dict[str, Any]:
            """Rank 0: the mutual proof over the quorum's store; the verified members and their stores."""
            store = create_store_client(f"{store_addr}/localsgd_auth", timeout=timedelta(seconds=self.wait_s))
            nonce = secrets.token_hex(16)
            mine = json.dumps({"nonce": nonce, "group": replica_id, "store": self.job_store}).encode()
            store.set(f"record/{rank}", mine)
            others = [j for j in range(world_size) if j != rank]
            # A member silent for the whole timeout is excluded; a shorter wait could exclude a slow honest member
            # that then excludes us in turn: two groups each committing alone, θ_g split. (torchft's own gloo group
            # waits as long for a dead member.) A wrong proof excludes at once.
            deadline = time.monotonic() + self.wait_s
            records = {j: r for j in others if (r := _wait_for(store, f"record/{j}", deadline)) is not None}
            parsed: dict[int, dict[str, Any]] = {}
            for j, raw in records.items():
                try:
                    parsed[j] = json.loads(raw)
                    str(parsed[j]["nonce"]), str(parsed[j]["store"])
                except (ValueError, KeyError, TypeError):
                    parsed.pop(j, None)
            for j, record in parsed.items():  # my proof to j, bound to j's fresh nonce
                store.set(f"proof/{rank}/{j}", self.secret.mac("proof", quorum_id, rank, j, mine, record["nonce"]))
            deadline = time.monotonic() + self.wait_s
            verified = {rank: json.loads(mine)}
            for j, record in parsed.items():
                proof = _wait_for(store, f"proof/{j}/{rank}", deadline)
                if proof is not None and self.secret.verify(proof, "proof", quorum_id, j, rank, records[j], nonce):
                    verified[j] = record
            self.excluded = [self._describe(j, parsed.get(j), quorum_id) for j in others if j not in verified]
            for line in self.excluded:
                log.warning(line)
            members = sorted(verified)
            # what every verified member computes alike: the members, their nonces and stores
            return {"members": members, "nonces": [verified[m]["nonce"] for m in members],
                    "stores": [str(verified[m]["store"]) for m in members]}

        def _describe(self, position: int, record: Optional[dict[str, Any]], quorum_id: Optional[int]) -> str:
            # its name as the lighthouse lists it (else as it claims); its address as it claims (torchft does not
            # hand the members' addresses to the process group)
            listed = (self.replica_ids[position] if position < len(self.replica_ids)
                      else str(record.get("group", "?")) if record is not None else "?")
            said = (f"address {str(record.get('store'))!r} as it claims, a wrong proof" if record is not None
                    else f"no proof within {self.wait_s:g} s")
            return (f"local SGD: group {listed.split(':', 1)[0]!r} (member {position} of quorum {quorum_id}, "
                    f"lighthouse id {listed!r}; {said}) did not prove the run secret: it is excluded from this "
                    "quorum's syncs (it receives no parameters, optimizer state or θ_g, and nothing it sends is "
                    "averaged)")

        def __repr__(self) -> str:
            return f"AuthenticatedProcessGroup(members={self.members})"

    _CLASS = AuthenticatedProcessGroup
    return _CLASS


def authenticated_members(pg: Any) -> Optional[tuple[int, int]]:
    """``(size, rank)`` of the verified members' group when ``pg`` is an authenticated one, else ``None``."""
    if _CLASS is not None and isinstance(pg, _CLASS) and pg.members:
        return len(pg.members), pg.member_rank
    return None


# ---------------------------------------------------------------------------------------------------- healing transport
_TRANSPORT: Optional[type] = None


def make_healing_transport(secret: RunSecret, host: str, timeout: timedelta) -> Any:
    """torchft's ``checkpoint_transport`` with a run secret: HTTP on ``host`` only, state served only to a request
    that proves the secret, responses MACed (see the module's docstring)."""
    return _transport_class()(secret, host, timeout)


def _transport_class() -> type:
    """The transport class: a torchft ``CheckpointTransport``, made on first use (as the process group)."""
    global _TRANSPORT
    if _TRANSPORT is not None:
        return _TRANSPORT
    import torch
    from torchft.checkpointing.transport import CheckpointTransport

    class AuthenticatedHTTPTransport(CheckpointTransport):
        """torchft's healing transport for runs with a secret: HTTP bound to one address; a request must prove the
        secret for the step it asks (bound to this server's URL, so it cannot be relayed to another job), and the
        response's MAC binds it to that request's nonce."""

        def __init__(self, secret: RunSecret, host: str, timeout: timedelta) -> None:
            self.secret = secret
            self.timeout = timeout
            self._staging = threading.Condition()
            self._staged: Optional[tuple[int, Any]] = None
            self.refused = 0
            """Requests refused (no or a wrong proof, or a step not staged)."""
            transport = self

            class Handler(BaseHTTPRequestHandler):
                def do_GET(self) -> None:
                    transport._refuse(self, 403)

                def do_POST(self) -> None:
                    transport._serve(self)

                def log_message(self, format: str, *args: Any) -> None:
                    pass  # no access log (requests carry proofs)

            server_class = type("Server", (ThreadingHTTPServer,), {
                "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET, "daemon_threads": True})
            self._server = server_class((host, 0), Handler)
            self._url = f"http://{url_host(host)}:{self._server.server_address[1]}/localsgd/heal"
            self._thread = threading.Thread(target=self._server.serve_forever, name="localsgd-heal", daemon=True)
            self._thread.start()

        def metadata(self) -> str:
            return self._url

        def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict: Any, timeout: timedelta) -> None:
            with self._staging:
                self._staged = (step, state_dict)  # served on request, until disallow_checkpoint
                self._staging.notify_all()

        def disallow_checkpoint(self) -> None:
            with self._staging:
                self._staged = None

        def _refuse(self, handler: BaseHTTPRequestHandler, code: int) -> None:
            self.refused += 1
            handler.send_response(code)
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        def _serve(self, handler: BaseHTTPRequestHandler) -> None:
            try:
                length = int(handler.headers.get("Content-Length") or 0)
                request = json.loads(handler.rfile.read(length)) if 0 < length <= _MAX_REQUEST_BYTES else {}
                step, nonce, proof = int(request["step"]), str(request["nonce"]), bytes.fromhex(request["proof"])
            except (ValueError, KeyError, TypeError):
                return self._refuse(handler, 403)
            if not self.secret.verify(proof, "heal-request", self._url, step, nonce):
                return self._refuse(handler, 403)
            with self._staging:  # the healer may ask before this job's quorum thread staged the step (as torchft's)
                if not self._staging.wait_for(lambda: self._staged is not None and self._staged[0] == step,
                                              timeout=self.timeout.total_seconds()):
                    return self._refuse(handler, 409)
                body = io.BytesIO()
                torch.save(self._staged[1], body)
            data = body.getvalue()
            tag = self.secret.mac("heal-response", self._url, step, nonce, hashlib.sha256(data).digest())
            handler.send_response(200)
            handler.send_header("Content-Type", "application/octet-stream")
            handler.send_header("Content-Length", str(len(data)))
            handler.send_header(_PROOF_HEADER, tag.hex())
            handler.end_headers()
            handler.wfile.write(data)

        def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> Any:
            nonce = secrets.token_hex(16)
            proof = self.secret.mac("heal-request", metadata, step, nonce).hex()
            request = urllib.request.Request(metadata, data=json.dumps(
                {"step": step, "nonce": nonce, "proof": proof}).encode(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=timeout.total_seconds()) as response:
                    data = response.read()
                    tag = response.headers.get(_PROOF_HEADER) or ""
            except urllib.error.HTTPError as err:
                raise PermissionError(f"local SGD: the healing source {metadata} refused this job's request for step "
                                      f"{step} (HTTP {err.code}: it does not hold the run secret, or no longer "
                                      "stages that step)") from None
            try:
                genuine = self.secret.verify(bytes.fromhex(tag), "heal-response", metadata, step, nonce,
                                             hashlib.sha256(data).digest())
            except ValueError:
                genuine = False
            if not genuine:  # checked before unpickling anything
                raise PermissionError(f"local SGD: the state offered by the healing source {metadata} for step {step} "
                                      "does not prove the run secret: refused, nothing of it is loaded")
            return torch.load(io.BytesIO(data), weights_only=False)

        def shutdown(self, wait: bool = True) -> None:
            self._server.shutdown()
            self._server.server_close()
            if wait:
                self._thread.join()

    _TRANSPORT = AuthenticatedHTTPTransport
    return _TRANSPORT
