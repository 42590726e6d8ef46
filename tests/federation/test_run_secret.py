"""The run secret's parts, without a lighthouse: the secret itself (hidden, never pickled, never in a config dump),
the mutual proof torchft's process group runs at each new quorum (threads standing for the jobs, one TCPStore for the
quorum's), and the healing transport (HTTP on one address, state only with a proof, responses MACed)."""

from __future__ import annotations

import http.server
import io
import json
import pickle
import threading
import urllib.error
import urllib.request
from datetime import timedelta

import pytest
import torch

pytest.importorskip("torchft")
from torch.distributed import AllreduceOptions, TCPStore
from torchft.process_group import create_store_client

import lightning_localsgd.run_secret as rs
from lightning_localsgd.config import LocalSGDConfig

SECRET = "the-run-secret-5d1e"
TIMEOUT = timedelta(seconds=10)


# ---------------------------------------------------------------------------------------------------- the secret
def test_the_secret_is_hidden_never_pickled_and_read_from_file_or_env(tmp_path, monkeypatch):
    path = tmp_path / "secret"
    path.write_text(f"  {SECRET}\n")
    monkeypatch.delenv(rs.ENV_VAR, raising=False)
    assert rs.load_run_secret(None) is None
    from_file = rs.load_run_secret(str(path))
    assert SECRET not in repr(from_file) and SECRET not in str(from_file) and "hidden" in repr(from_file)
    with pytest.raises(TypeError, match="never pickled"):
        pickle.dumps(from_file)
    monkeypatch.setenv(rs.ENV_VAR, SECRET)
    from_env = rs.load_run_secret(None)
    assert from_env.mac("x") == from_file.mac("x") != rs.RunSecret(b"another").mac("x")
    path.write_text("another")
    assert rs.load_run_secret(str(path)).mac("x") != from_env.mac("x")  # the file wins over the variable
    monkeypatch.setenv(rs.ENV_VAR, " ")
    with pytest.raises(ValueError, match="LOCALSGD_RUN_SECRET is set but empty"):
        rs.load_run_secret(None)


def test_run_secret_file_refusals_name_the_argument_not_the_content(tmp_path):
    with pytest.raises(ValueError, match="run_secret_file=.* only applies to federated worker groups"):
        LocalSGDConfig(run_secret_file=str(tmp_path / "secret"))
    with pytest.raises(ValueError, match="run_secret_file=.*missing.* cannot be read"):
        LocalSGDConfig(lighthouse="lh:29510", run_secret_file=str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="run_secret_file=.*empty.* is empty"):
        LocalSGDConfig(lighthouse="lh:29510", run_secret_file=str(tmp_path / "empty"))
    (tmp_path / "secret").write_text(SECRET)
    config = LocalSGDConfig(lighthouse="lh:29510", run_secret_file=str(tmp_path / "secret"))
    assert SECRET not in repr(config) and SECRET not in repr(vars(config))


def test_the_cli_config_dump_shows_the_path_never_the_secret(tmp_path, capsys, monkeypatch):
    from lightning_localsgd.cli import main

    (tmp_path / "secret").write_text(SECRET)
    monkeypatch.setenv(rs.ENV_VAR, SECRET)
    with pytest.raises(SystemExit) as exc:  # the dump LightningCLI also saves as config.yaml at fit
        main(["fit", "--trainer.strategy", "LocalSGDStrategy", "--trainer.strategy.lighthouse", "lh:29510",
              "--trainer.strategy.run_secret_file", str(tmp_path / "secret"), "--print_config"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr()
    assert f"run_secret_file: {tmp_path / 'secret'}" in out.out
    assert SECRET not in out.out + out.err


# ---------------------------------------------------------------------------------------------------- quorum proofs
def _configure(pg, quorum_store: int, job_rank: int, quorum_rank: int, size: int, quorum_id: int, results: dict,
               key) -> None:
    try:
        pg.configure(f"127.0.0.1:{quorum_store}/torchft/{quorum_id}/{job_rank}", f"g{quorum_rank}:uuid",
                     quorum_rank, size, quorum_id, job_rank, 2, None)
        value = torch.tensor([float(10 ** quorum_rank)])
        pg.allreduce([value], AllreduceOptions()).wait()
        results[key] = value.item()
    except Exception as err:  # noqa: BLE001 (reported to the test)
        results[key] = err


def test_the_quorum_group_holds_the_members_that_proved_the_secret_only(caplog):
    """Quorum members 0 and 1: the run's jobs, two ranks each; member 2: a job with another secret; member 3 writes
    nothing (a process without the library's proof). Every rank k of the run's jobs all-reduces over rank k of those
    two only (1 + 10); the other-secret job ends alone (100); each job's rank 0 logs every member it did not verify."""
    quorum = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    jobs = [TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False) for _ in range(3)]
    run, other = rs.RunSecret(SECRET.encode()), rs.RunSecret(b"another")
    wait = timedelta(seconds=1)  # how long the members wait for member 3's record, then exclude it
    pgs = {(m, r): rs.make_authenticated_process_group(run if m < 2 else other, f"127.0.0.1:{jobs[m].port}", wait, 1)
           for m, ranks in ((0, 2), (1, 2), (2, 1)) for r in range(ranks)}
    results: dict = {}
    threads = [threading.Thread(target=_configure, args=(pg, quorum.port, r, m, 4, 7, results, (m, r)))
               for (m, r), pg in pgs.items()]
    with caplog.at_level("WARNING", logger="lightning_localsgd.run_secret"):
        [t.start() for t in threads]
        [t.join(60) for t in threads]
    assert results == {(0, 0): 11.0, (0, 1): 11.0, (1, 0): 11.0, (1, 1): 11.0, (2, 0): 100.0}, results
    assert [pgs[m, r].members for m in (0, 1) for r in (0, 1)] == [[0, 1]] * 4 and pgs[2, 0].members == [2]
    assert rs.authenticated_members(pgs[1, 1]) == (2, 1)
    lines = [r.getMessage() for r in caplog.records]
    for member, why, logged_by in ((2, "a wrong proof", 2), (3, "no proof within 1 s", 3)):  # rank 0s only
        assert sum(f"(member {member} of quorum 7" in line and why in line for line in lines) == logged_by, lines
    assert all(SECRET not in line for line in lines)


def test_a_forged_verdict_in_the_job_store_is_refused():
    """Rank k takes the verified members from its rank 0 through the job's store, which other jobs reach: a verdict
    not MACed with the run secret is refused."""
    job = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    forged = {"members": [0, 1, 2], "nonces": ["00", "11", "22"], "stores": [f"127.0.0.1:{job.port}"] * 3}
    writer = create_store_client(f"127.0.0.1:{job.port}/localsgd_run_secret", TIMEOUT)  # as another job can
    writer.set("verdict/9", json.dumps({"verdict": forged, "mac": "00" * 32}))
    pg = rs.make_authenticated_process_group(rs.RunSecret(SECRET.encode()), f"127.0.0.1:{job.port}", TIMEOUT, 1)
    with pytest.raises(PermissionError, match="not its rank 0's"):
        pg.configure(f"127.0.0.1:{job.port}/torchft/9/1", "g0:uuid", 0, 3, 9, 1, 2, None)
    assert pg.members == []


# ---------------------------------------------------------------------------------------------------- healing
@pytest.fixture
def transports():
    made = []

    def make(secret: bytes = SECRET.encode()):
        made.append(rs.make_healing_transport(rs.RunSecret(secret), "127.0.0.1", TIMEOUT))
        return made[-1]

    yield make
    for transport in made:
        transport.shutdown()


def _post(url: str, body: dict) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        assert err.read() == b""  # a refusal carries nothing
        return err.code


def test_the_healing_transport_serves_state_only_to_a_request_proving_the_secret(transports):
    source, healer, impostor = transports(), transports(), transports(b"another")
    assert source._server.server_address[0] == "127.0.0.1"  # the address given, not every interface
    state = {"theta_g": torch.arange(6.0), "step": 3}
    source.send_checkpoint([1], 5, state, TIMEOUT)
    got = healer.recv_checkpoint(0, source.metadata(), 5, TIMEOUT)
    assert torch.equal(got["theta_g"], state["theta_g"]) and got["step"] == 3
    with pytest.raises(PermissionError, match="refused this job's request"):
        impostor.recv_checkpoint(0, source.metadata(), 5, TIMEOUT)
    with pytest.raises(urllib.error.HTTPError) as err:  # a plain GET (as torchft's HTTPTransport serves) gets nothing
        urllib.request.urlopen(source.metadata(), timeout=10)
    assert err.value.code == 403 and err.value.read() == b""
    # a proof made for another server's URL (a request relayed by an impostor named as the source) is refused
    other = transports()
    relayed = {"step": 5, "nonce": "ab", "proof": rs.RunSecret(SECRET.encode()).mac(
        "heal-request", other.metadata(), 5, "ab").hex()}
    assert _post(source.metadata(), relayed) == 403
    assert _post(source.metadata(), {"step": 5, "nonce": "ab", "proof": "00" * 32}) == 403
    assert source.refused == 4
    source.disallow_checkpoint()  # after the vote: the state may change, nothing is served any more
    fresh = transports()
    fresh.timeout = timedelta(seconds=0.2)
    source.timeout = timedelta(seconds=0.2)
    with pytest.raises(PermissionError, match="no longer stages that step"):
        fresh.recv_checkpoint(0, source.metadata(), 5, TIMEOUT)


class _Unpickled(Exception):
    pass


class _Trap:
    """Unpickling it raises: the test sees whether a receiver unpickled what an impostor sent."""

    def __reduce__(self):
        return (_raise, ())


def _raise():
    raise _Unpickled("the impostor's bytes were unpickled")


def test_state_from_a_source_without_the_secret_is_refused_before_unpickling(transports):
    """An impostor named as the healing source (it claimed a higher step) answers with state of its choosing: the
    response's MAC fails and nothing of it is loaded."""
    payload = io.BytesIO()
    torch.save({"theta_g": torch.zeros(3), "trap": _Trap()}, payload)

    class Impostor(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload.getvalue())))
            self.send_header("X-LocalSGD-Proof", "00" * 32)
            self.end_headers()
            self.wfile.write(payload.getvalue())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Impostor)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(PermissionError, match="does not prove the run secret"):
            transports().recv_checkpoint(0, f"http://127.0.0.1:{server.server_address[1]}/localsgd/heal", 9, TIMEOUT)
    finally:
        server.shutdown()
        server.server_close()
