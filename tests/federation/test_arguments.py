"""Every strategy runs as a federated worker group (DDP, FSDP2 or DeepSpeed ZeRO inside each job)."""

from __future__ import annotations

import pytest

import lightning_localsgd as lsgd


@pytest.mark.parametrize("name", ["LocalSGDStrategy", "LocalSGDFSDPStrategy", "LocalSGDDeepSpeedStrategy"])
def test_every_strategy_takes_lighthouse(name):
    if name == "LocalSGDDeepSpeedStrategy":
        pytest.importorskip("deepspeed")
    strategy = getattr(lsgd, name)(lighthouse="lighthouse-host:29510", group_id="g0")
    assert strategy.lighthouse == "lighthouse-host:29510" and strategy.federation is not None


def test_federated_group_size_is_the_job_world():
    from lightning_localsgd.federation import federated_group_size

    assert federated_group_size(None, 4) == 4 and federated_group_size(1, 4) == 4
    with pytest.raises(ValueError, match="group_size=2 with lighthouse=.*job's world size \\(4\\)"):
        federated_group_size(2, 4)
