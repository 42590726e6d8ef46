"""An outside client: Lightning's demo LightningTransformer trains with strategy="local_sgd", unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

import _forkserver

WORKER = Path(__file__).resolve().parents[1] / "workers" / "train_transformer.py"


def _write_corpus(tmp_path):
    # a small local text file where the demo's WikiText2 looks for it, so nothing is downloaded
    text = "\n".join(line for line in (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text().splitlines()
                     if line.strip())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "wikitext-2.txt").write_text(text[:20000])


def _run(tmp_path, *extra):
    _write_corpus(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    n = 4 if extra else 2
    cmd = [sys.executable, str(WORKER), str(tmp_path), *extra]
    if _forkserver.enabled():  # the n ranks forked together (LOCAL_RANK set), as torchrun starts them
        proc = _forkserver.run_ranks(cmd, n, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                     env={**env, "OMP_NUM_THREADS": "1"})
    else:  # Lightning's launcher re-runs the script for ranks 1..n-1
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    return ([json.loads((tmp_path / f"info{r}.json").read_text()) for r in range(n)],
            [torch.load(tmp_path / f"params{r}.pt") for r in range(n)])


def test_lightning_transformer_trains_with_local_sgd(tmp_path):
    infos, params = _run(tmp_path)
    assert [i["steps"] for i in infos] == [6, 6]
    # default sync_every=64 > 6 steps: the only sync is the one at the end of training, which leaves every rank
    # with the same model although the ranks were seeded differently and trained on different data
    assert [i["syncs"] for i in infos] == [1, 1]
    assert torch.equal(params[0], params[1])


def test_lightning_transformer_trains_with_local_sgd_fsdp(tmp_path):
    # the module never calls fully_shard: the strategy shards it (each nn.ModuleList element, then the root)
    infos, params = _run(tmp_path, "fsdp")
    assert [i["syncs"] for i in infos] == [2] * 4  # sync_every=3 over 6 steps
    assert all(torch.equal(params[0], p) for p in params[1:])
