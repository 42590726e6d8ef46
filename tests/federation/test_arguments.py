"""Only LocalSGDStrategy runs as a federated worker group; the others refuse lighthouse= before training."""

from __future__ import annotations

import pytest

import lightning_localsgd as lsgd


@pytest.mark.parametrize("name", ["LocalSGDFSDPStrategy", "LocalSGDDeepSpeedStrategy"])
def test_other_strategies_refuse_lighthouse(name):
    with pytest.raises(ValueError, match=rf"lighthouse= .* is supported by LocalSGDStrategy .*not yet by {name}"):
        getattr(lsgd, name)(lighthouse="lighthouse-host:29510")


def test_federated_group_size_is_the_job_world():
    from lightning_localsgd.federation import federated_group_size

    assert federated_group_size(None, 4) == 4 and federated_group_size(1, 4) == 4
    with pytest.raises(ValueError, match="group_size=2 with lighthouse=.*job's world size \\(4\\)"):
        federated_group_size(2, 4)
