"""The public extension points, used from outside the package: an outer-optimizer preset, a codec and a sync
schedule registered by name (tests/workers/train_extended.py), then a 2-process training run with all three,
checked against the same run simulated by hand."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import _forkserver
from reference import initial_net, rank_batches

import lightning_localsgd
from lightning_localsgd import Codec, LocalSGDStrategy, SyncSchedule

WORKER = Path(__file__).parent.parent / "workers" / "train_extended.py"
SYNC_STEPS = (2, 6, 14)


def simulate() -> dict[str, torch.Tensor]:
    """2 groups, inner SGD lr 0.1; at local steps 2, 6, 14: θ_g ← θ_g − 0.5·(θ_g − mean_i θ_i), every group ← θ_g."""
    base = initial_net()
    nets = [copy.deepcopy(base) for _ in range(2)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1) for n in nets]
    batches = [rank_batches(2, r) for r in range(2)]
    snapshot = {k: v.detach().clone() for k, v in base.named_parameters()}
    for step in range(1, SYNC_STEPS[-1] + 1):
        for g, (net, opt) in enumerate(zip(nets, opts)):
            x, y = batches[g][step - 1]
            opt.zero_grad()
            F.mse_loss(net(x), y).backward()
            opt.step()
        if step in SYNC_STEPS:
            params = [dict(n.named_parameters()) for n in nets]
            with torch.no_grad():
                for k in snapshot:
                    mean = torch.stack([p[k] for p in params]).mean(0)
                    snapshot[k] -= 0.5 * (snapshot[k] - mean)
                    for p in params:
                        p[k].copy_(snapshot[k])
    return snapshot


@pytest.mark.slow
def test_registered_preset_codec_and_schedule_train(tmp_path):
    out = tmp_path / "rank0.pt"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = _forkserver.run([sys.executable, str(WORKER), "--out", str(out)], capture_output=True, text=True,
                          timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    got = torch.load(out, weights_only=False)
    assert got["sync_steps"] == list(SYNC_STEPS)  # the schedule decided when
    chunk = math.ceil(got["numel"] / 2)
    assert got["bytes_sent"] == len(SYNC_STEPS) * 2 * (4 * chunk + 8)  # the codec's payloads crossed the groups
    expected = simulate()
    params = {k.removeprefix("model."): v for k, v in got["params"].items()}
    for k, v in expected.items():  # the preset took the outer steps (lr 0.5, not an average)
        assert torch.allclose(params[k], v, atol=1e-5), (k, float((params[k] - v).abs().max()))


def test_registries_refuse_bad_entries():
    with pytest.raises(ValueError, match="exists already"):
        lightning_localsgd.register_outer_optimizer("diloco", None)
    with pytest.raises(ValueError, match="must return a torch.optim.Optimizer"):
        lightning_localsgd.register_outer_optimizer("broken", lambda params: None)
    with pytest.raises(ValueError, match="instance of a Codec subclass"):
        lightning_localsgd.register_codec("raw", object())
    with pytest.raises(ValueError, match="exists already"):
        lightning_localsgd.register_codec("int8", type("C", (Codec,), {"encode": None, "decode": None,
                                                                      "payload_bytes": None})())
    with pytest.raises(ValueError, match="exists already"):
        lightning_localsgd.register_schedule("periodic", lambda config: SyncSchedule(1))
    with pytest.raises(ValueError, match="sync_schedule='nightly' is not a known schedule"):
        LocalSGDStrategy(sync_schedule="nightly")
    with pytest.raises(ValueError, match="compression must be one of"):
        LocalSGDStrategy(compression="zstd")


def test_registered_names_are_accepted_before_training():
    lightning_localsgd.register_outer_optimizer("test_sgd_03", lambda params: torch.optim.SGD(params, lr=0.3),
                                                override=True)
    lightning_localsgd.register_schedule("test_every_3", lambda config: SyncSchedule(3, config.warmup_steps),
                                         override=True)
    s = LocalSGDStrategy(outer_optimizer="test_sgd_03", sync_schedule="test_every_3", warmup_steps=2)
    assert s.schedule.sync_every == 3 and s.schedule.warmup_steps == 2
    assert s.local_sgd.config.outer_factory is not None
