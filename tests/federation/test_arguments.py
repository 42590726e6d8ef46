"""Every strategy runs as a federated worker group (DDP, FSDP2 or DeepSpeed ZeRO inside each job)."""

from __future__ import annotations

import pytest

import lightning_localsgd as lsgd


@pytest.mark.parametrize("name", ["LocalSGDStrategy", "LocalSGDFSDPStrategy", "LocalSGDDeepSpeedStrategy"])
def test_every_strategy_takes_lighthouse(name):
    if name == "LocalSGDDeepSpeedStrategy":
        pytest.importorskip("deepspeed")
    from lightning_localsgd.federation import Federation

    strategy = getattr(lsgd, name)(lighthouse="lighthouse-host:29510", group_id="g0")
    # the controller's syncs travel across jobs; the strategy itself holds no federation
    assert strategy.lighthouse == "lighthouse-host:29510" and isinstance(strategy.local_sgd.syncs, Federation)
    assert not hasattr(strategy, "federation")


def test_strategies_do_not_import_the_federation():
    # the controller alone talks to the transport (its Syncs): no strategy module imports federation.py
    import ast
    from pathlib import Path

    for path in (Path(lsgd.__file__).parent / "strategies").glob("*.py"):
        tree = ast.parse(path.read_text())
        modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not any("federation" in m for m in modules), (path.name, modules)
        assert ".federation" not in path.read_text(), path.name


def test_federated_group_size_is_the_job_world():
    from lightning_localsgd.federation import federated_group_size

    assert federated_group_size(None, 4) == 4 and federated_group_size(1, 4) == 4
    with pytest.raises(ValueError, match="group_size=2 with lighthouse=.*job's world size \\(4\\)"):
        federated_group_size(2, 4)


# ---------------------------------------------------------------- several worker groups per job (two levels)
LIGHTHOUSE = "lighthouse-host:29510"


def federated_trainer(devices: int, **strategy_args):
    """A Trainer over a federated LocalSGDStrategy: its construction checks the layout (nothing starts)."""
    import lightning as L

    return L.Trainer(accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
                     strategy=lsgd.LocalSGDStrategy(lighthouse=LIGHTHOUSE, process_group_backend="gloo",
                                                    **strategy_args))


def test_several_groups_per_job_make_the_job_a_cluster():
    from lightning_localsgd.engine.schedules import PeriodicSchedule, TwoStageSchedule

    two = federated_trainer(4, group_size=2, sync_every=2, cluster_sync_every=4, cluster_outer_optimizer="average")
    strategy = two.strategy
    assert (strategy.group_size, strategy.cluster_size) == (2, 2)  # cluster_size implied: the job's 2 groups
    assert isinstance(strategy.schedule, TwoStageSchedule) and strategy.schedule.cluster_sync_every == 4
    assert "across jobs (through the lighthouse) every 4 steps" in strategy.local_sgd.config.describe(2)
    ones = federated_trainer(2, sync_every=2, cluster_sync_every=4).strategy  # groups of 1 (the default group_size)
    assert (ones.group_size, ones.cluster_size) == (1, 2)
    # without cluster_sync_every nothing changes: the job is one worker group synced across jobs every sync_every
    one = federated_trainer(4, sync_every=2).strategy
    assert (one.group_size, one.cluster_size) == (4, None) and isinstance(one.schedule, PeriodicSchedule)


@pytest.mark.parametrize("devices, args, message", [
    (4, {"group_size": 2},
     r"group_size=2 with lighthouse= and no cluster_sync_every.*job's world size \(4\).*set cluster_sync_every"),
    (2, {"group_size": 2, "cluster_sync_every": 8},
     r"cluster_sync_every=8 with lighthouse= needs several worker groups per job, but group_size=2 .*Either set "
     r"group_size to a divisor of 2 below it \(e.g. 1.*or remove cluster_sync_every"),
    (1, {"cluster_sync_every": 8}, r"cluster_sync_every=8 with lighthouse= .*run the job on more ranks"),
    (4, {"group_size": 3, "cluster_sync_every": 8}, r"group_size=3 does not divide the world size 4"),
])
def test_contradictory_job_layouts_are_refused_before_training(devices, args, message):
    with pytest.raises(ValueError, match=message):
        federated_trainer(devices, sync_every=4, **args)


@pytest.mark.parametrize("args, message", [
    ({"cluster_size": 2, "cluster_sync_every": 8},
     r"cluster_size=2 is not supported with lighthouse= .*the job is the cluster, so cluster_size is implied.*"
     r"set group_size below the job's world size and cluster_sync_every.*Leave cluster_size=None"),
    ({"cluster_size": 2}, r"cluster_size=2 is not supported with lighthouse="),
    ({"cluster_sync_every": 6}, r"cluster_sync_every=6 must be a multiple of sync_every=4"),
    ({"cluster_sync_every": 8, "cluster_outer_optimizer": "nope"}, r"cluster_outer_optimizer: "),
])
def test_two_level_arguments_are_checked_on_construction(args, message):
    with pytest.raises(ValueError, match=message):
        lsgd.LocalSGDStrategy(lighthouse=LIGHTHOUSE, sync_every=4, **args)
