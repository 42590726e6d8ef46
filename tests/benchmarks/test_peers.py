"""``benchmarks/peers/peers.py`` at a tiny setting: where the math is the same, ours and a peer agree.

Two processes (gloo) train the micro GPT 8 steps with H = 4, once with our engine's ``OuterSync`` (averaging) and once
with torch's ``PostLocalSGDOptimizer`` + ``PeriodicModelAverager`` (aligned to sync after steps H, 2H), on the same
batches: the final parameters must agree. Also the pure-Python parts of the report (feature matrix, targets).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "peers"))

import peers


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_ours_engine_and_torch_averager_agree(tmp_path: Path) -> None:
    import torch

    g = torch.Generator().manual_seed(0)  # random byte tokens: the agreement does not depend on the text
    batches = {}
    for r in range(peers.WORLD):
        tokens = [torch.randint(0, 256, (4, 33), generator=g) for _ in range(8)]
        batches[r] = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
    torch.save(batches, tmp_path / "batches.pt")
    res = peers.launch_job(dict(kind="agree", peers=["ours_engine", "torch_averager"], mode="average", steps=8,
                                sync_every=4, size="0.1M", seed=peers.SEED, block_size=32, batch_size=4,
                                batches=str(tmp_path / "batches.pt"), timeout=100), timeout=110)
    diffs = res[0]
    assert diffs["ours_engine"] == 0.0
    assert diffs["torch_averager"] <= 1e-6, diffs


def test_feature_matrix_and_targets() -> None:
    rows = [dict(peer="ours", impl="ours (engine)", feature="streaming (fragments)", result="yes", detail="ran"),
            dict(peer="torchft", impl="torchft DiLoCo", feature="streaming (fragments)", result="no", detail="x")]
    matrix = {r["feature"]: r for r in peers.feature_matrix(rows)}
    assert matrix["streaming (fragments)"]["ours"] == "**yes** (ours (engine)): ran"
    assert matrix["streaming (fragments)"]["accelerate"].startswith("not tried")
    assert set(matrix) == set(peers.FEATURES)
    sync = [dict(size="1M", mode="average", impl="ours_engine", seconds_median=1.0),
            dict(size="1M", mode="average", impl="torch_averager", label="torch", seconds_median=0.5,
                 ours_over_this_median=2.0, ours_over_this_low=1.9, ours_over_this_high=2.1)]
    (target,) = peers.summarize(sync, [], [])
    assert target["fastest_peer"] == "torch" and target["holds"] == "no"
