"""The run secret across federated jobs (CPU, gloo, torchft): two honest jobs (the secret from a file, and from
``LOCALSGD_RUN_SECRET``) and two impostors at the same lighthouse, one with another secret, one with none. The
impostors receive no state and nothing of theirs reaches θ_g: the honest jobs end identical and equal to the two run
alone, each logs the impostors by name, and the secret appears in no log, dump or checkpoint. Without the secret the
impostors' pseudo-gradients are averaged in (the honest jobs end elsewhere)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("torchft")
from test_federated import killed_on_exit, launch, load, wait_all  # noqa: F401
from torchft._torchft import LighthouseServer

from test_federated_features import max_diff

SECRET = "honest-run-secret-7f3a9c"
OTHER = "impostor-secret-0b41"
JOIN_TIMEOUT_MS = 2000  # a heartbeating impostor that stops asking for quorums delays each quorum this long
IMPOSTOR_TIMEOUT = "8"  # the secret-less impostor's gloo group over all members never forms: it waits this long


@pytest.fixture
def quick_lighthouse():
    servers = []

    def start() -> str:
        server = LighthouseServer(bind="127.0.0.1:0", min_replicas=1, join_timeout_ms=JOIN_TIMEOUT_MS,
                                  quorum_tick_ms=50, heartbeat_timeout_ms=1000)
        servers.append(server)
        return "127.0.0.1:" + server.address().rsplit(":", 1)[-1]

    yield start
    for server in servers:
        server.shutdown()


def honest(files: dict[str, Path], group: int) -> dict:
    return {"run_secret_file": files["secret"]} if group == 0 else {"secret_env_file": files["secret"]}


def run(out: Path, address: str, jobs: dict[int, dict], **options) -> list[int]:
    out.mkdir(parents=True, exist_ok=True)
    procs = [launch(out, address, g, barrier=len(jobs), proof_window=2.0, **{**options, **extra})
             for g, extra in jobs.items()]
    with killed_on_exit(procs):
        return wait_all(procs, out, timeout=240)


def thetas(dump: dict) -> list[torch.Tensor]:
    """Every θ_g the job held after its start: before each of its reduces, and at the end."""
    snaps = [r["snapshot"] for r in dump["reduces"]] + [dump["snapshot"]]
    return [torch.cat([s.flatten() for s in snap]) for snap in snaps]


@pytest.mark.slow
def test_impostors_get_nothing_and_send_nothing_into_theta_g(tmp_path, quick_lighthouse):
    files = {"secret": tmp_path / "secret", "other": tmp_path / "other"}
    files["secret"].write_text(SECRET + "\n")
    files["other"].write_text(OTHER)
    four = tmp_path / "four"
    jobs = {0: {**honest(files, 0), "ckpt_dir": tmp_path / "ckpt"}, 1: honest(files, 1),
            2: {"run_secret_file": files["other"]}, 3: {"sync_timeout": IMPOSTOR_TIMEOUT}}
    codes = run(four, quick_lighthouse(), jobs, outer="diloco")
    logs = {g: (four / f"g{g}.log").read_text() for g in jobs}
    # every job ends normally: the impostors train alone once the honest jobs have left
    assert codes == [0, 0, 0, 0], "\n".join(logs[g][-3000:] for g in jobs)
    alone = tmp_path / "alone"
    assert run(alone, quick_lighthouse(), {0: honest(files, 0), 1: honest(files, 1)}, outer="diloco") == [0, 0]
    d = {g: load(four, f"g{g}") for g in jobs}
    ref = load(alone, "g0")
    # the honest jobs: identical, and as if the impostors had never been there
    assert max_diff(d[0]["final"], d[1]["final"]) == 0.0
    assert max_diff(d[0]["final"], ref["final"]) < 1e-6, max_diff(d[0]["final"], ref["final"])
    syncs = [a for a in d[0]["attempts"] if a["committed"] and a["weight"] > 0]
    assert len(syncs) == 3 and all(a["participants"] == 2 for a in syncs), d[0]["attempts"]
    assert d[0]["healed"] == d[1]["healed"] == 0
    # the impostors: alone in every sync they committed, never healed, never held the run's θ_g
    run_thetas = thetas(d[0])[1:]  # after the first sync (the initial weights come from the seed, known to all)
    for g in (2, 3):
        assert d[g]["healed"] == 0 and "healed from a live peer" not in logs[g]
        assert all(a["participants"] == 1 for a in d[g]["attempts"] if a["committed"]), d[g]["attempts"]
        held = thetas(d[g]) + [torch.cat([v.flatten() for v in params.values()]) for _, params in d[g]["steps"]]
        assert all((theta - t).abs().max() > 1e-4 for theta in held for t in run_thetas)
    # every honest job names both impostors
    for g in (0, 1):
        for name in ("g2", "g3"):
            assert f"local SGD: group '{name}' (member" in logs[g] and "did not prove the run secret" in logs[g], \
                logs[g][-3000:]
    # the secret: in no log, dump or checkpoint of any job
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("secret", "other")]
    assert any(p.is_relative_to(tmp_path / "ckpt") for p in written)  # g0's checkpoints
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
