"""``benchmarks/harness``: the ranks-on-one-device launch (``share_gpu``) trains exactly what Lightning's launcher does.

``share_gpu`` starts every rank itself as the single rank of its own "node" (torchelastic's variables), so that on a
GPU machine all of them take ``cuda:0`` over gloo: the ``--gpu`` presets of ``scaling_law.py`` and
``equal_compute.py`` use it. Here it runs on the CPU, where the same run can also be launched the usual way: the two
must give the same losses, bit for bit, for DDP and for local SGD.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import harness


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["ddp", "average"])
@pytest.mark.slow
def test_shared_launch_trains_what_the_launcher_trains(mode: str) -> None:
    model = dict(size="nano", learning_rate=3e-3, warmup_steps=2, max_steps=8)
    common = dict(steps=8, model=model, batch_size=2, block_size=32, devices=2, sync_every=4, val_windows=16,
                  data=dict(max_tokens=200_000))
    usual = harness.launch(harness.run_config("usual", mode, **common), timeout=240)
    shared = harness.launch(harness.run_config("shared", mode, share_gpu=True, **common), timeout=240)
    assert shared["steps"] == usual["steps"] == 8
    assert shared["per_window"] == usual["per_window"]
    assert shared["tokens"] == usual["tokens"]
    if mode == "average":
        assert shared["num_syncs"] == usual["num_syncs"] == 2
