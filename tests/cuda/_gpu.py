"""Ranks sharing one GPU: the multi-process CUDA tests start every rank as the one rank of its own "node"
(``Trainer(devices=1, num_nodes=W)``) so that all of them take ``cuda:0``, joined over gloo, as the benchmarks'
``--gpu`` presets do (NCCL refuses two ranks on one device)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from _forkserver import free_port
from _launch import worker_flags

WORKER = Path(__file__).resolve().parent.parent / "workers" / "train_tiny.py"
ON_CPU = os.environ.get("LOCALSGD_CUDA_TESTS_ON_CPU") == "1"
"""Run this folder's tests on the CPU instead (checks the tests themselves, e.g. before spending GPU time)."""
DEVICE = "cpu" if ON_CPU else "cuda:0"


def use_device() -> None:
    """In a spawned rank: make ``cuda:0`` the current device (nothing on the CPU)."""
    if not ON_CPU:
        torch.cuda.set_device(0)




def run_on_gpus(out: Path, world: int, timeout: float = 240, **options) -> list[dict]:
    """Run tests/workers/train_tiny.py on ``world`` GPUs, one rank each, over NCCL (Lightning's launcher starts the
    ranks); on the CPU (``ON_CPU``) over gloo. Returns each rank's dump with its tensors on the CPU."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(WORKER), "--accelerator", "cpu" if ON_CPU else "cuda", "--devices", str(world),
           "--backend", "gloo" if ON_CPU else "nccl", "--out", str(out), *worker_flags(options)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK"):
        env.pop(var, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False, map_location="cpu") for r in range(world)]


def gpus_available(n: int) -> bool:
    """Whether ``n`` GPUs are there for one rank each (always, when the tests run on the CPU)."""
    return ON_CPU or torch.cuda.device_count() >= n


def run_on_gpu(out: Path, world: int = 2, timeout: float = 240, **options) -> list[dict]:
    """Run tests/workers/train_tiny.py as ``world`` ranks that share ``cuda:0`` (gloo between them); return each
    rank's dump (tensors moved to the CPU, so that the CPU hand references compare with them)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(WORKER), "--accelerator", "cpu" if ON_CPU else "cuda", "--devices", "1", "--num-nodes", str(world),
           "--out", str(out), *worker_flags(options)]
    port = str(free_port())
    procs = []
    for rank in range(world):
        # torchelastic's variables: every rank is local rank 0 of its node, hence on cuda:0
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "WORLD_SIZE": str(world), "RANK": str(rank), "GROUP_RANK": str(rank),
               "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "NODE_RANK": str(rank)}
        if ON_CPU:
            env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator, as tests/strategies/test_deepspeed.py
        log = open(out / f"log{rank}.txt", "w")
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = "\n".join(f"--- rank {r}\n" + (out / f"log{r}.txt").read_text()[-4000:] for r in range(world))
    assert not any(codes), f"ranks exited with {codes}:\n{logs}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False, map_location="cpu") for r in range(world)]
