"""Federated jobs for benchmarks: an in-process torchft lighthouse, one process per job, warm spares for restarts.

A benchmark script that runs federated jobs (``lighthouse=``) hands :func:`run_jobs` one configuration per job; each
job is ``python SCRIPT --worker CFG.json`` and writes its record (JSON) to ``cfg["out"]``. A job that SIGKILLs itself
(a scripted failure) is restarted at once when the script's ``restart`` callback returns the next incarnation's
configuration: from a *warm spare*, a process that has already imported torch, Lightning and torchft and waits for its
configuration (``python SCRIPT --standby GO``, see :func:`standby`), so that a restart measures rejoining and
healing, not Python start-up. Traffic stays on 127.0.0.1 (or inside the caller's network namespace).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from .launch import ROOT

#: What a job's environment must not inherit: each job is its own torch.distributed world.
_WORLD_VARS = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK", "PL_GLOBAL_SEED")


def job_env() -> dict:
    """One thread per process, gloo on the loopback, ``benchmarks/`` importable, no inherited world."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "GLOO_SOCKET_IFNAME": "lo", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")) if p)
    for var in _WORLD_VARS:
        env.pop(var, None)
    return env


def standby(go: Path, imports: Callable[[], None], worker: Callable[[dict], None]) -> None:
    """A warm spare: run ``imports``, then wait until the driver writes the path of the job's configuration into
    ``go`` and run ``worker`` on it."""
    imports()
    while not go.exists():
        time.sleep(0.02)
    time.sleep(0.02)  # the driver writes the file in one call; let it land
    worker(json.loads(Path(go.read_text().strip()).read_text()))


def run_jobs(script: Path, jobs: list[dict], run_dir: Path, *, join_ms: int, heartbeat_ms: int,
             timeout: float, restart: Optional[Callable[[dict, dict], Optional[dict]]] = None,
             wants_spare: Callable[[dict], bool] = lambda job: False) -> dict:
    """Run ``jobs`` (dicts with ``name``; ``lighthouse``, ``out`` and ``t0`` are filled in) against an in-process
    lighthouse until every job has exited.

    ``restart(job, record)`` is called when a job SIGKILLed itself (``record``: what it wrote to ``out``) and returns
    the next incarnation's configuration (``None``: not restarted). ``wants_spare(job)``: whether to keep a warm spare
    ready for a restart of that job. Returns ``{"records": [...], "restarts": [...], "t0": ...}``; raises on a job
    that exits with an error or on ``timeout``.
    """
    from torchft._torchft import LighthouseServer

    server = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=join_ms, quorum_tick_ms=50,
                              heartbeat_timeout_ms=heartbeat_ms)
    address = "127.0.0.1:" + server.address().rsplit(":", 1)[-1]
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    procs: dict[str, tuple[subprocess.Popen, dict]] = {}
    spares: dict[str, tuple[subprocess.Popen, Path, Path]] = {}
    restarts: list[dict] = []
    records: list[dict] = []

    def spawn(args: list[str], log_path: Path) -> subprocess.Popen:
        log = open(log_path, "w")  # noqa: SIM115 (the job's log, open while it runs)
        return subprocess.Popen([sys.executable, str(script), *args], env=job_env(), cwd=str(ROOT), stdout=log,
                                stderr=subprocess.STDOUT)

    def start(job: dict) -> None:
        job = {k: v for k, v in job.items() if k != "log"}  # a restart's job carries its predecessor's log path
        job.update(lighthouse=address, t0=t0, out=str(run_dir / f"{job['name']}.json"))
        cfg_path = run_dir / f"{job['name']}.cfg.json"
        cfg_path.write_text(json.dumps(job))
        slot = job.get("slot", job["name"])
        if slot in spares:
            proc, go, job["log"] = spares.pop(slot)
            go.write_text(str(cfg_path))
        else:
            job["log"] = run_dir / f"{job['name']}.log"
            proc = spawn(["--worker", str(cfg_path)], job["log"])
        procs[job["name"]] = (proc, job)
        if wants_spare(job):
            go, log = run_dir / f"go_after_{job['name']}", run_dir / f"after_{job['name']}.log"
            spares[slot] = (spawn(["--standby", str(go)], log), go, log)

    try:
        for job in jobs:
            start(job)
        while procs:
            if time.time() - t0 > timeout:
                raise RuntimeError(f"the jobs did not finish within {timeout:.0f} s (logs: {run_dir})")
            for name, (proc, job) in list(procs.items()):
                if proc.poll() is None:
                    continue
                del procs[name]
                out = Path(job["out"])
                record = json.loads(out.read_text()) if out.exists() else {}
                if proc.returncode == -signal.SIGKILL and record.get("killed"):
                    records.append(record)
                    nxt = restart(job, record) if restart is not None else None
                    if nxt is not None:
                        restarts.append(dict(job=name, next=nxt["name"], t=time.time() - t0))
                        start(nxt)
                elif proc.returncode == 0:
                    records.append(record)
                else:
                    text = Path(job["log"]).read_text()[-4000:]
                    raise RuntimeError(f"job {name} failed (exit {proc.returncode}):\n{text}")
            time.sleep(0.05)
    finally:
        for proc, *_ in [*procs.values(), *spares.values()]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        server.shutdown()
    return dict(records=records, restarts=restarts, t0=t0)
