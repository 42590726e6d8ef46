"""Launch tests/workers/train_tiny.py on N CPU processes and load what each rank wrote.

The N ranks are forked by the tests' fork server (``_forkserver.run_ranks``: started together with ``LOCAL_RANK``
set, as torchrun does, from a process that has imported torch and Lightning already); with
``LOCALSGD_TESTS_NO_FORKSERVER=1`` the worker runs as before, a fresh ``python`` whose Lightning launcher re-runs it
for ranks 1..N-1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import _forkserver

WORKER = Path(__file__).parent / "workers" / "train_tiny.py"


def worker_flags(options: dict) -> list[str]:
    """``--key value`` command-line flags of a worker (True: ``--key``; None / False: left out; 0 is a value)."""
    out: list[str] = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not None and value is not False:  # not `value in (None, False)`: 0 == False
            out += [flag, str(value)]
    return out


def run_tiny(out: Path, devices: int = 2, expect_fail: bool = False, timeout: int = 240, worker: Path = WORKER,
             **options) -> list[dict]:
    """Run the worker (default: train_tiny.py) with `--key value` options (True flags become `--key`); return the
    ranks' dumps (`out/rank{r}.pt`)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(worker), "--devices", str(devices), "--out", str(out), *worker_flags(options)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK"):
        env.pop(var, None)
    if _forkserver.enabled():
        proc = _forkserver.run_ranks(cmd, devices, capture_output=True, text=True, timeout=timeout, env=env)
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if expect_fail:
        assert proc.returncode != 0, proc.stdout[-3000:]
        return [{"stderr": proc.stderr, "stdout": proc.stdout}]
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False, map_location="cpu") for r in range(devices)]


def strip(params: dict) -> dict:
    """Parameter names without the LightningModule's `model.` prefix."""
    return {k.removeprefix("model."): v for k, v in params.items()}


def max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over the parameters of `b` (the reference names only parameters)."""
    a, b = strip(a), strip(b)
    assert set(b) <= set(a), (a.keys(), b.keys())
    return max(float((a[k] - b[k]).abs().max()) for k in b)


def assert_resume_exact(straight: list[dict], resumed: list[dict]) -> None:
    """Every rank of a resumed run ends bit for bit as the uninterrupted run: parameters, the inner optimizers' state
    (this rank's shards) and θ_g."""
    for a, b in zip(straight, resumed):
        assert max_diff(a["final"], b["final"]) == 0.0
        for oa, ob in zip(a["optimizers"], b["optimizers"]):
            for sa, sb in zip(oa["state"].values(), ob["state"].values()):
                assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert all(torch.equal(x, y) for x, y in zip(a["outer_state"]["snapshot"], b["outer_state"]["snapshot"]))
