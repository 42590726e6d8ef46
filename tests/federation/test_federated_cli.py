"""`lightning-localsgd lighthouse` starts torchft's lighthouse and prints its address; examples/configs/federated.yaml
trains one federated group against it through `lightning-localsgd fit`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import _forkserver

pytest.importorskip("torchft")

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "federated.yaml"
TINY = ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32", "--data.max_tokens", "50000",
        "--data.block_size", "32", "--data.batch_size", "4", "--trainer.max_steps", "4",
        "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
        "--trainer.strategy.init_args.sync_every", "2", "--trainer.strategy.init_args.sync_timeout", "60"]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK", "PL_GLOBAL_SEED"):
        env.pop(var, None)
    return env


def test_lighthouse_command_and_federated_config(tmp_path):
    # stderr apart from stdout: torchft's (Rust) log lines go to stderr in several writes, which could land inside
    # the announcement line on a shared stream
    errors = open(tmp_path / "lighthouse.err", "w")  # noqa: SIM115 (the lighthouse's stderr while it runs)
    lighthouse = _forkserver.Popen(
        [sys.executable, "-m", "lightning_localsgd", "lighthouse", "--port", "0", "--min-groups", "1",
         "--join-timeout-ms", "1000", "--heartbeat-timeout-ms", "1000"],
        env=_env(), stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        deadline = time.monotonic() + 60
        first = lighthouse.stdout.readline()
        assert time.monotonic() < deadline
        match = re.match(r"lighthouse listening on (\S+):(\d+) ", first)
        assert match, first
        port = match.group(2)
        fit = _forkserver.run(
            [sys.executable, "-m", "lightning_localsgd", "fit", "--config", str(CONFIG), *TINY,
             "--trainer.strategy.init_args.lighthouse", f"127.0.0.1:{port}",
             "--trainer.strategy.init_args.group_id", "cli-a"],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=180)
        assert fit.returncode == 0, fit.stdout[-3000:] + fit.stderr[-5000:]
    finally:
        lighthouse.terminate()
        log = lighthouse.communicate(timeout=30)[0]
        errors.close()
        log += (tmp_path / "lighthouse.err").read_text()
    # the group formed quorums at the lighthouse: the join at the start and the syncs of steps 2 and 4
    quorums = re.findall(r'Quorum! .*?replica_id: "cli-a:', log)
    assert len(quorums) >= 3, log[-3000:]
