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
from _launch import run_tiny, worker_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from harness.launch import shared_gpu_rank_env  # noqa: E402  (one definition of a shared-GPU rank's variables)

WORKER = Path(__file__).resolve().parent.parent / "workers" / "train_tiny.py"
ON_CPU = os.environ.get("LOCALSGD_CUDA_TESTS_ON_CPU") == "1"
"""Run this folder's tests on the CPU instead (checks the tests themselves, e.g. before spending GPU time)."""
DEVICE = "cpu" if ON_CPU else "cuda:0"


def use_device() -> None:
    """In a spawned rank: make ``cuda:0`` the current device (nothing on the CPU)."""
    if not ON_CPU:
        torch.cuda.set_device(0)


def run_on_gpus(out: Path, world: int, timeout: float = 240, **options) -> list[dict]:
    """Run tests/workers/train_tiny.py on ``world`` GPUs, one rank each, over NCCL (on the CPU, ``ON_CPU``: gloo)."""
    return run_tiny(out, devices=world, timeout=timeout, accelerator="cpu" if ON_CPU else "cuda",
                    backend="gloo" if ON_CPU else "nccl", **options)


def gpus_available(n: int) -> bool:
    """Whether ``n`` GPUs are there for one rank each (always, when the tests run on the CPU)."""
    return ON_CPU or torch.cuda.device_count() >= n


def run_on_gpu(out: Path, world: int = 2, timeout: float = 240, **options) -> list[dict]:
    """Run tests/workers/train_tiny.py as ``world`` ranks that share ``cuda:0`` (gloo between them); return each
    rank's dump (tensors moved to the CPU, so that the CPU hand references compare with them)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(WORKER), "--accelerator", "cpu" if ON_CPU else "cuda", "--devices", "1", "--num-nodes", str(world),
           "--out", str(out), *worker_flags(options)]
    port = free_port()
    procs, logs = [], []
    for rank in range(world):
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
               **shared_gpu_rank_env(rank, world, port)}
        if ON_CPU:
            env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator, as tests/strategies/test_deepspeed.py
        logs.append(open(out / f"log{rank}.txt", "w"))
        procs.append(subprocess.Popen(cmd, env=env, stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    text = "\n".join(f"--- rank {r}\n" + (out / f"log{r}.txt").read_text()[-4000:] for r in range(world))
    assert not any(codes), f"ranks exited with {codes}:\n{text}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False, map_location="cpu") for r in range(world)]
