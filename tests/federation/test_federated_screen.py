"""The robust screen across federated jobs (CPU, gloo, torchft): three jobs, one of them broken (its loss, and with
SGD its pseudo-gradient, scaled x100 at every step). Every sync leaves the broken job out; the jobs end identical,
equal to the two honest jobs run without it; every job logs which job was left out. Without the screen the broken
job's pseudo-gradient ends the run (non-finite within three syncs). The direction test (``screen_min_cosine``) across
jobs: a sign-flipped job, whose norm the norm screen lets through, is left out of every sync likewise."""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import pytest

pytest.importorskip("torchft")
from test_federated import H, killed_on_exit, launch, lighthouse, load, run_jobs, wait_all  # noqa: F401

from test_federated_features import NAMES, max_diff


def check_g2_left_out_of_every_sync(out: Path, three: dict, two: dict, tolerance: float, why: str = "") -> dict:
    """Three jobs (dumps ``three``, logs in ``out``) of which g2 is broken, against the honest two run alone
    (``two``): g2 left out of each of the 3 syncs, every job logging it (the honest jobs with ``why``), and the jobs
    ending identical and within ``tolerance`` of the two alone. Returns the three jobs' final parameters."""
    final = {name: {k.removeprefix("model."): v for k, v in d["final"].items()} for name, d in three.items()}
    alone = {k.removeprefix("model."): v for k, v in two["g0"]["final"].items()}
    assert max_diff(final["g0"], final["g1"]) == 0.0 and max_diff(final["g0"], final["g2"]) == 0.0
    assert max_diff(final["g0"], alone) < tolerance, max_diff(final["g0"], alone)
    syncs = [a for a in three["g0"]["attempts"] if a["committed"] and a["weight"] > 0]
    assert len(syncs) == 3 and all(a["participants"] == 3 for a in syncs)
    assert all(d["screened_total"] == 3 for d in three.values())  # left out of each of the 3 syncs
    assert two["g0"]["screened_total"] == 0
    broken_id = f"{zlib.crc32(b'g2'):#x}"
    for g in (0, 1):
        log = (out / f"g{g}.log").read_text()
        assert log.count(f"(id {broken_id}) was left out of sync") == 3, log[-3000:]
        assert not why or log.count(why) == 3, log[-3000:]
    log = (out / "g2.log").read_text()
    assert log.count("this group (group 'g2') was left out of sync") == 3, log[-3000:]
    return final


@pytest.mark.slow
def test_three_jobs_one_broken_the_honest_two_end_as_without_it(tmp_path, lighthouse):
    three = run_jobs(tmp_path / "three", lighthouse(3), 3, outer="diloco", screen_factor=10.0,
                     g2=dict(loss_scale=100.0))
    two = run_jobs(tmp_path / "two", lighthouse(2), 2, outer="diloco", screen_factor=10.0)
    final = check_g2_left_out_of_every_sync(tmp_path / "three", three, two, tolerance=1e-5)
    # without the screen the broken job's pseudo-gradient lands in θ_g: a non-finite one within three syncs here
    out = tmp_path / "unscreened"
    out.mkdir()
    address = lighthouse(3)
    procs = [launch(out, address, g, barrier=3, outer="diloco", **({"loss_scale": 100.0} if g == 2 else {}))
             for g in range(3)]
    with killed_on_exit(procs):
        codes = wait_all(procs, out)
    assert codes[0] != 0 and "the pseudo-gradient is not finite" in (out / "g0.log").read_text()
    assert set(NAMES) <= set(final["g0"])


@pytest.mark.slow
def test_a_job_that_heals_takes_its_peers_screen_state(tmp_path, lighthouse):
    """g0 trains alone past its first two syncs (its screen keeps its norms); g1 joins at g0's sync of step 8 and
    heals from it. The screen's state is replicated (every member decides from the same gathered figures), so the
    healed job must hold g0's history of the syncs before it joined, or the two-group rule (each group against its
    own history) would judge g0 differently on each job: both end with the same screen state."""
    address = lighthouse(1)
    steps = 4 * H
    procs = [launch(tmp_path, address, 0, outer="diloco", screen_factor=10.0, mark_at_step=H + 1, wait_for="g1",
                    wait_at_step=2 * H - 1, max_steps=steps)]
    with killed_on_exit(procs):
        deadline = time.monotonic() + 120
        while not (tmp_path / "at_g0").exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "g0.log").read_text()[-3000:]
            time.sleep(0.1)
        procs.append(launch(tmp_path, address, 1, outer="diloco", screen_factor=10.0, max_steps=steps))
        codes = wait_all(procs, tmp_path, timeout=200)
    assert codes == [0, 0], "\n".join((tmp_path / f"g{g}.log").read_text()[-3000:] for g in range(2))
    d = {g: load(tmp_path, f"g{g}") for g in range(2)}
    assert d[1]["healed"] == 1 and d[1]["start_step"] == 2 * H, d[1]["attempts"]
    g0_id = zlib.crc32(b"g0")
    assert len(d[0]["screen"]["history"][g0_id]) == 4  # g0's norms of the syncs of steps 4, 8 (alone), 12, 16
    assert d[1]["screen"] == d[0]["screen"]


@pytest.mark.slow
def test_three_jobs_one_sign_flipped_the_direction_test_leaves_it_out(tmp_path, lighthouse):
    """The direction test across jobs: its count sketches (1024 numbers per job) travel with the norms in the screen's
    all-gather through torchft's communicator. Every job reads one data order (seed 0), so the honest jobs' steps point
    alike, as the direction test presumes (with an order each, the tiny task's two-sample batches make the honest jobs
    disagree: the screen module's docstring); g2's loss is negated (SGD ascends: a pseudo-gradient of an honest norm
    pointing against the others'), so the norm screen lets it through. With ``screen_min_cosine=0`` every sync leaves
    it out and the jobs end equal to the two honest jobs run without it."""
    same_order = dict(g1=dict(seed=0), outer="diloco", screen_factor=10.0, screen_min_cosine=0.0)
    three = run_jobs(tmp_path / "three", lighthouse(3), 3, g2=dict(seed=0, loss_scale=-1.0), **same_order)
    two = run_jobs(tmp_path / "two", lighthouse(2), 2, **same_order)
    check_g2_left_out_of_every_sync(tmp_path / "three", three, two, tolerance=1e-6,
                                    why="with the other 2 groups' pseudo-gradients (their upper median) < "
                                        "screen_min_cosine 0")
