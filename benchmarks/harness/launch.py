"""Starting runs: one training run per subprocess, optionally inside a network namespace with a shaped loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

BENCHMARKS = Path(__file__).resolve().parent.parent
ROOT = BENCHMARKS.parent


def netns_available() -> tuple[bool, str]:
    """Whether ``unshare -n`` + ``tc ... tbf`` on the namespace's loopback works here (root, kernel, tools)."""
    for tool in ("unshare", "ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` not found"
    cmd = ["unshare", "-n", "sh", "-c",
           "ip link set lo up && tc qdisc add dev lo root tbf rate 100mbit burst 32kb latency 400ms"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except Exception as err:  # noqa: BLE001
        return False, f"{type(err).__name__}: {err}"
    if proc.returncode:
        text = (proc.stderr or proc.stdout).strip()
        return False, text.splitlines()[-1] if text else f"exit status {proc.returncode}"
    return True, "unshare -n + tc tbf on lo"


def choose_emulation(requested: str, parser: Any) -> str:
    """Resolve ``--emulation auto|netns|sleep`` (error through ``parser`` if netns is asked for but unusable)."""
    ok, why = netns_available()
    emulation = ("netns" if ok else "sleep") if requested == "auto" else requested
    if emulation == "netns" and not ok:
        parser.error(f"network namespaces / tc are not usable here ({why}); use --emulation sleep")
    if not ok:
        print(f"note: network namespaces / tc are not usable here ({why}): software model (sleep = bytes / rate + "
              "hops × latency per collective)")
    return emulation


def netns_prefix(rate_bit_s: float) -> list[str]:
    """Command prefix: a private network namespace whose loopback is shaped to ``rate_bit_s`` (token bucket).

    MTU 9000 (jumbo frames): with the loopback's 64 KiB MTU a token bucket smaller than a packet drops it, and with a
    1500-byte MTU the Python/gloo sender becomes CPU-bound at 1 Gbit/s. The bucket holds ``max(32 KiB, 1 ms of
    traffic)``, i.e. almost no burst allowance. Nothing leaves the namespace: its only interface is its own ``lo``.
    """
    burst = max(32 * 1024, int(rate_bit_s / 8 * 1e-3))
    setup = (f"ip link set lo mtu 9000 && ip link set lo up && "
             f"tc qdisc add dev lo root tbf rate {int(rate_bit_s)}bit burst {burst} latency 1000ms && exec \"$@\"")
    return ["unshare", "-n", "sh", "-c", setup, "sh"]


def worker_env() -> dict:
    """One thread per process, gloo on the loopback, and ``benchmarks/`` importable (``python -m harness``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCHMARKS), env.get("PYTHONPATH", "")) if p)
    env.pop("MASTER_PORT", None)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_gpu_rank_env(rank: int, world: int, port: int | str) -> dict[str, str]:
    """torchelastic's variables for rank ``rank`` of ``world`` ranks sharing one GPU: each is told it is the only rank
    (local rank 0) of its own node, so that ``Trainer(devices=1, num_nodes=world)`` puts every rank on ``cuda:0``."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "RANK": str(rank),
            "GROUP_RANK": str(rank), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "NODE_RANK": str(rank)}


def _run_shared(cmd: list[str], world: int, timeout: float) -> tuple[int, str]:
    """``world`` copies of ``cmd`` as the ranks of one job on one machine, each told it is the only rank of its node
    (torchelastic's variables), so that every rank takes ``cuda:0``: :func:`launch` with ``share_gpu``."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = {**worker_env(), **shared_gpu_rank_env(rank, world, port)}
        procs.append(subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=subprocess.PIPE if rank == 0 else
                                      subprocess.DEVNULL, stderr=subprocess.STDOUT))
    try:
        out, _ = procs[0].communicate(timeout=timeout)
        codes = [procs[0].returncode] + [p.wait(timeout=max(1.0, timeout / 10)) for p in procs[1:]]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return next((c for c in codes if c), 0), out.decode(errors="replace")


def launch(config: dict, prefix: Optional[list[str]] = None, timeout: float = 1800) -> dict:
    """Run one training run in a subprocess (``prefix`` e.g. :func:`netns_prefix`) and return rank 0's result.

    The subprocess is ``python -m harness CONFIG.json``; Lightning's popen launcher re-runs it once per extra rank.
    With ``config["share_gpu"]`` the ``devices`` ranks are started here instead, each as the single rank of a
    "node" (``Trainer(devices=1, num_nodes=devices)``), so that all of them run on ``cuda:0`` (or the CPU).
    """
    with tempfile.TemporaryDirectory(prefix="lsgd_bench_") as tmp:
        cfg_path = Path(tmp) / "config.json"
        out_path = Path(tmp) / "result.json"
        cfg_path.write_text(json.dumps({**config, "out": str(out_path)}))
        cmd = list(prefix or []) + [sys.executable, "-m", "harness", str(cfg_path)]
        t0 = time.time()
        if config.get("share_gpu"):
            code, text = _run_shared(cmd, config["devices"], timeout)
        else:
            proc = subprocess.run(cmd, env=worker_env(), cwd=str(ROOT), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, timeout=timeout)
            code, text = proc.returncode, proc.stdout.decode(errors="replace")
        if code or not out_path.exists():
            raise RuntimeError(f"run {config['name']!r} failed (exit {code}):\n{text[-4000:]}")
        result = json.loads(out_path.read_text())
        result["process_seconds"] = time.time() - t0
        return result
