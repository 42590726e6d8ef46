"""The run secret across federated jobs (CPU, gloo, torchft): two honest jobs (the secret from a file, and from
``LOCALSGD_RUN_SECRET``) and two impostors at the same lighthouse, one with another secret, one with none. The
impostors receive no state and nothing of theirs reaches θ_g: the honest jobs end identical and equal to the two run
alone, each logs the impostors by name, and the secret appears in no log, dump or checkpoint. Without the secret the
impostors' pseudo-gradients are averaged in (the honest jobs end elsewhere)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchft")
from test_federated import H, killed_on_exit, launch, lighthouse, load, wait_all  # noqa: F401 (a fixture)

from test_federated_features import max_diff

SECRET = "honest-run-secret-7f3a9c"
OTHER = "impostor-secret-0b41"
IMPOSTOR_TIMEOUT = "8"  # the secret-less impostor's sync_timeout: it waits this long for its gloo group, then gives up
HONEST_TIMEOUT = "20"  # the honest jobs wait this long for the secret-less impostor's proof at their first quorum


def honest(files: dict[str, Path], group: int) -> dict:
    return {"run_secret_file": files["secret"]} if group == 0 else {"secret_env_file": files["secret"]}


def run(out: Path, address: str, jobs: dict[int, dict], **options) -> list[int]:
    out.mkdir(parents=True, exist_ok=True)
    procs = [launch(out, address, g, barrier=len(jobs), **{**options, **extra})
             for g, extra in jobs.items()]
    with killed_on_exit(procs):
        return wait_all(procs, out, timeout=240)


def thetas(dump: dict) -> list[torch.Tensor]:
    """Every θ_g the job held after its start: before each of its reduces, and at the end."""
    snaps = [r["snapshot"] for r in dump["reduces"]] + [dump["snapshot"]]
    return [torch.cat([s.flatten() for s in snap]) for snap in snaps]


@pytest.mark.slow
def test_impostors_get_nothing_and_send_nothing_into_theta_g(tmp_path, lighthouse):
    files = {"secret": tmp_path / "secret", "other": tmp_path / "other"}
    files["secret"].write_text(SECRET + "\n")
    files["other"].write_text(OTHER)
    four = tmp_path / "four"
    jobs = {0: {**honest(files, 0), "ckpt_dir": tmp_path / "ckpt"}, 1: honest(files, 1),
            2: {"run_secret_file": files["other"]}, 3: {"sync_timeout": IMPOSTOR_TIMEOUT}}
    codes = run(four, lighthouse(1), jobs, outer="diloco", sync_timeout=HONEST_TIMEOUT)
    logs = {g: (four / f"g{g}.log").read_text() for g in jobs}
    # the secret-less impostor's gloo group over the whole quorum never forms (the others are not in it): it gives up
    assert codes[:3] == [0, 0, 0], "\n".join(logs[g][-3000:] for g in jobs)
    assert codes[3] != 0 and "did not succeed within sync_timeout=8 s" in logs[3], logs[3][-3000:]
    alone = tmp_path / "alone"
    assert run(alone, lighthouse(1), {0: honest(files, 0), 1: honest(files, 1)}, outer="diloco") == [0, 0]
    d = {g: load(four, f"g{g}") for g in range(3)}
    ref = load(alone, "g0")
    # the honest jobs: identical, and as if the impostors had never been there
    assert max_diff(d[0]["final"], d[1]["final"]) == 0.0
    assert max_diff(d[0]["final"], ref["final"]) < 1e-6, max_diff(d[0]["final"], ref["final"])
    syncs = [a for a in d[0]["attempts"] if a["committed"] and a["weight"] > 0]
    assert len(syncs) == 3 and all(a["participants"] == 2 for a in syncs), d[0]["attempts"]
    assert d[0]["healed"] == d[1]["healed"] == 0
    # the impostor with another secret: alone in every sync it committed, never healed, never held the run's θ_g
    initial = torch.cat([v.flatten() for v in d[0]["start_params"].values()])  # from the seed, known to all
    run_thetas = [t for t in thetas(d[0]) if not torch.equal(t, initial)]
    assert len(run_thetas) == 3  # after the syncs of steps 4, 8 and 12
    assert d[2]["healed"] == 0 and all(a["participants"] == 1 for a in d[2]["attempts"] if a["committed"])
    held = thetas(d[2]) + [torch.cat([v.flatten() for v in params.values()]) for _, params in d[2]["steps"]]
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


@pytest.mark.slow
def test_late_jobs_heal_from_a_live_peer_only_with_the_secret(tmp_path, lighthouse):
    """g0 trains alone past its first sync; then g1 (the run's secret) and g2 (another) join at g0's sync of step
    8: g1 heals from g0 through the authenticated transport and the two end identical; g2's request is refused and it
    never heals (without the secret it would heal and train on from the run's state)."""
    secret, other = tmp_path / "secret", tmp_path / "other"
    secret.write_text(SECRET)
    other.write_text(OTHER)
    address = lighthouse(1)
    steps = 4 * H  # g2 meets g0 and g1 at the sync of step 12 at the latest, and they go on after it
    procs = [launch(tmp_path, address, 0, outer="diloco", run_secret_file=secret,
                    mark_at_step=H + 1, wait_for="g1", wait_at_step=2 * H - 1, max_steps=steps)]
    with killed_on_exit(procs):
        deadline = time.monotonic() + 120
        while not (tmp_path / "at_g0").exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "g0.log").read_text()[-3000:]
            time.sleep(0.1)
        # g1 waits (after its heal) until g2 runs, so that g2 meets the others in a quorum
        procs += [launch(tmp_path, address, 1, outer="diloco", secret_env_file=secret,
                         wait_for="g2", wait_at_step=2 * H, max_steps=steps),
                  launch(tmp_path, address, 2, outer="diloco", run_secret_file=other)]
        codes = wait_all(procs, tmp_path, timeout=240)
    logs = {g: (tmp_path / f"g{g}.log").read_text() for g in range(3)}
    assert codes[:2] == [0, 0], "\n".join(logs[g][-3000:] for g in range(2))
    d = {g: load(tmp_path, f"g{g}") for g in range(2)}
    assert d[0]["healed"] == 0 and d[1]["healed"] == 1 and d[1]["start_step"] == 2 * H, d[1]["attempts"]
    assert max_diff(d[0]["final"], d[1]["final"]) == 0.0
    assert all(torch.equal(x, y) for x, y in zip(d[0]["snapshot"], d[1]["snapshot"]))
    # the impostor: refused by the honest jobs' transport while they run (its sync_timeout outlasts them), never
    # healed; it trains alone from its initial weights once they have left
    assert codes[2] == 0 and "refused this job's request" in logs[2], logs[2][-3000:]
    impostor = load(tmp_path, "g2")
    assert impostor["healed"] == 0 and impostor["start_step"] == 0, impostor["attempts"]
    assert "local SGD: group 'g2' (member" in logs[0], logs[0][-3000:]
