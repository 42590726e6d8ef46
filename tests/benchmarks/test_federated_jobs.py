"""``harness.federated.run_jobs`` (chaos and edge drive their federated jobs through it) on a stub job script: a
job of several ranks, a self-kill restarted from the ``restart`` callback, the other ranks of a killed job ended, exit
statuses counted as done, and no restart once the killed job's peers are all gone (``restart_alone=False``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from harness.federated import run_jobs  # noqa: E402

STUB = '''
import json, os, signal, sys, time
from pathlib import Path

cfg = json.loads(Path(sys.argv[2]).read_text())
rank = int(os.environ.get("LOCAL_RANK", 0))
out = cfg["out"] if rank == 0 else cfg["out"].replace(".json", f".r{rank}.json")
rec = dict(name=cfg["name"], rank=rank, world=os.environ.get("WORLD_SIZE"), killed=None)
Path(cfg["out"].replace(".json", f".r{rank}.pid")).write_text(str(os.getpid()))
time.sleep(cfg.get("delay", 0))
if cfg.get("die"):
    if rank == 0:
        world = int(os.environ.get("WORLD_SIZE", 1))
        while not all(Path(cfg["out"].replace(".json", f".r{r}.pid")).exists() for r in range(world)):
            time.sleep(0.05)  # every rank is up before rank 0 dies
        rec["killed"] = {"step": 1}
        Path(out).write_text(json.dumps(rec))
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)  # outlives its rank 0: run_jobs must end it
Path(out).write_text(json.dumps(rec))
sys.exit(cfg.get("exit", 0))
'''


def _run(tmp_path: Path, jobs: list[dict], **kwargs) -> dict:
    tmp_path.mkdir(exist_ok=True)
    script = tmp_path / "stub.py"
    script.write_text(STUB)
    return run_jobs(script, jobs, tmp_path / "run", join_ms=1000, heartbeat_ms=1000, timeout=60, **kwargs)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_killed_job_of_two_ranks_is_ended_and_restarted(tmp_path: Path) -> None:
    asked = []

    def restart(job: dict, record: dict) -> dict:
        asked.append((job["name"], record["killed"]))
        return dict(name="a1", ranks=2)

    out = _run(tmp_path, [dict(name="a", ranks=2, die=True), dict(name="b", delay=3, exit=3)], restart=restart,
               done_codes=(0, 3))
    assert asked == [("a", {"step": 1})]
    assert [r["job"] for r in out["restarts"]] == ["a"] and out["restarts"][0]["next"] == "a1"
    assert sorted((r["name"], r["killed"] is not None) for r in out["records"]) == [
        ("a", True), ("a1", False), ("b", False)]
    # both ranks of the restarted job ran as one world of two; the killed job's rank 1 was ended with it
    assert json.loads((tmp_path / "run" / "a1.r1.json").read_text())["world"] == "2"
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "run" / "a.r1.pid").read_text()), 0)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_no_restart_when_the_killed_job_is_alone(tmp_path: Path) -> None:
    out = _run(tmp_path, [dict(name="c", die=True, delay=3), dict(name="d")],
               restart=lambda job, record: dict(name="c1"), restart_alone=False)
    assert out["restarts"] == []
    assert sorted(r["name"] for r in out["records"]) == ["c", "d"]
    with pytest.raises(RuntimeError, match="job e failed"):  # an exit status not in done_codes
        _run(tmp_path / "x", [dict(name="e", exit=3)])
