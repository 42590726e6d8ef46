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

from .launch import ROOT, free_port

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
             wants_spare: Callable[[dict], bool] = lambda job: False, done_codes: tuple[int, ...] = (0,),
             restart_alone: bool = True) -> dict:
    """Run ``jobs`` (dicts with ``name``; ``lighthouse``, ``out`` and ``t0`` are filled in) against an in-process
    lighthouse until every job has exited.

    A job with ``ranks`` > 1 is that many processes, each started as torchrun would start it (``LOCAL_RANK`` set,
    rank 0 tracked); every process is its own session, so that a job's end takes whatever it started with it.
    ``restart(job, record)`` is called when a job SIGKILLed itself (``record``: what it wrote to ``out``) and returns
    the next incarnation's configuration (``None``: not restarted; with ``restart_alone=False`` neither is a job whose
    peers have all exited: nobody is left to heal from). ``wants_spare(job)``: whether to keep a warm spare ready for a
    restart of that job. ``done_codes``: the exit statuses of a job that ended normally. Returns
    ``{"records": [...], "restarts": [...], "t0": ...}``; raises on a job that exits otherwise or on ``timeout``.
    """
    from torchft._torchft import LighthouseServer

    server = LighthouseServer(bind="[::]:0", min_replicas=1, join_timeout_ms=join_ms, quorum_tick_ms=50,
                              heartbeat_timeout_ms=heartbeat_ms)
    address = "127.0.0.1:" + server.address().rsplit(":", 1)[-1]
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    procs: dict[str, tuple[list[subprocess.Popen], dict]] = {}  # a job's processes (rank 0 first), its config
    spares: dict[str, tuple[list[subprocess.Popen], Path, Path]] = {}
    restarts: list[dict] = []
    records: list[dict] = []

    def spawn(args: list[str], log_path: Path, ranks: int) -> list[subprocess.Popen]:
        port = free_port()
        started = []
        for r in range(ranks):
            env = job_env() if ranks == 1 else {**job_env(), "LOCAL_RANK": str(r), "NODE_RANK": "0",
                                                 "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
                                                 "MASTER_PORT": str(port)}
            path = log_path if r == 0 else log_path.with_suffix(f".r{r}.log")
            log = open(path, "w")  # noqa: SIM115 (the job's log, open while it runs)
            started.append(subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=str(ROOT), stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True))
        return started

    def end(ranks: list[subprocess.Popen]) -> None:
        for proc in ranks:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: whatever it started goes too
                except ProcessLookupError:
                    pass
            proc.wait(timeout=30)

    def start(job: dict) -> None:
        job = {k: v for k, v in job.items() if k != "log"}  # a restart's job carries its predecessor's log path
        job.update(lighthouse=address, t0=t0, out=str(run_dir / f"{job['name']}.json"))
        cfg_path = run_dir / f"{job['name']}.cfg.json"
        cfg_path.write_text(json.dumps(job))
        slot = job.get("slot", job["name"])
        if slot in spares:
            ranks, go, job["log"] = spares.pop(slot)
            go.write_text(str(cfg_path))
        else:
            job["log"] = run_dir / f"{job['name']}.log"
            ranks = spawn(["--worker", str(cfg_path)], job["log"], job.get("ranks", 1))
        procs[job["name"]] = (ranks, job)
        if wants_spare(job):
            go, log = run_dir / f"go_after_{job['name']}", run_dir / f"after_{job['name']}.log"
            spares[slot] = (spawn(["--standby", str(go)], log, job.get("ranks", 1)), go, log)

    try:
        for job in jobs:
            start(job)
        while procs:
            if time.time() - t0 > timeout:
                raise RuntimeError(f"the jobs did not finish within {timeout:.0f} s (logs: {run_dir})")
            for name, (ranks, job) in list(procs.items()):
                proc = ranks[0]
                if proc.poll() is None:
                    continue
                del procs[name]
                out = Path(job["out"])
                record = json.loads(out.read_text()) if out.exists() else {}
                if proc.returncode == -signal.SIGKILL and record.get("killed"):
                    end(ranks)  # the job's other ranks, had one outlived the self-kill
                    records.append(record)
                    nxt = restart(job, record) if restart is not None and (restart_alone or procs) else None
                    if nxt is not None:
                        restarts.append(dict(job=name, next=nxt["name"], t=time.time() - t0))
                        start(nxt)
                elif proc.returncode in done_codes:
                    records.append(record)
                else:
                    text = Path(job["log"]).read_text()[-4000:]
                    raise RuntimeError(f"job {name} failed (exit {proc.returncode}):\n{text}")
            time.sleep(0.05)
    finally:
        for ranks, *_ in [*procs.values(), *spares.values()]:
            end(ranks)
        server.shutdown()
    return dict(records=records, restarts=restarts, t0=t0)
