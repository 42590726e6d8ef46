"""Bad input fails before the first step, with a message naming the parameter and the fix."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

import lightning_localsgd  # noqa: F401
from lightning_localsgd import LocalSGDStrategy, NonFinitePseudoGradientError
from _launch import run_tiny


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sync_every": 0}, "sync_every must be an integer >= 1"),
        ({"sync_every": -3}, "sync_every must be an integer >= 1"),
        ({"sync_every": 2.5}, "sync_every must be an integer >= 1"),
        ({"sync_every": True}, "sync_every must be an integer >= 1"),
        ({"group_size": 0}, "group_size must be an integer >= 1"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
        ({"outer_optimizer": "adam"}, r"outer_optimizer='adam' is not a known name.*'average', 'diloco'"),
        ({"outer_optimizer": 3}, "outer_optimizer must be one of"),
        ({"outer_optimizer": lambda params: "not an optimizer"}, "must return a torch.optim.Optimizer.*returned str"),
        ({"outer_optimizer": lambda: None}, "outer_optimizer: calling it with a list of parameters failed"),
        ({"outer_state_device": "cuda:7"}, "outer_state_device='cuda:7'"),
        ({"outer_state_device": "nonsense"}, "outer_state_device='nonsense' is not a device"),
        ({"outer_state_device": "meta"}, "outer_state_device='meta' holds no data"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite must be 'raise' or 'skip'"),
        ({"model_averaging_period": 4}, "remove `model_averaging_period`"),
        ({"process_group": object()}, "remove `process_group` and set group_size"),
    ],
)
def test_constructor_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalSGDStrategy(**kwargs)


@pytest.mark.parametrize("devices,group_size,match", [
    (3, 2, r"group_size=2 does not divide the world size 3.*\[1, 3\]"),
    (2, 4, "group_size=4 is larger than the world size 2"),
])
def test_group_size_checked_against_world_size_at_trainer_creation(devices, group_size, match):
    with pytest.raises(ValueError, match=match):
        L.Trainer(accelerator="cpu", devices=devices, strategy=LocalSGDStrategy(group_size=group_size), logger=False)


def test_public_attributes_and_registered_names():
    s = LocalSGDStrategy(sync_every=8, outer_optimizer="diloco", group_size=2, warmup_steps=5,
                         outer_state_device="cpu", find_unused_parameters=True)
    assert (s.sync_every, s.outer_optimizer, s.group_size, s.warmup_steps, s.outer_state_device) == (
        8, "diloco", 2, 5, "cpu")
    assert s._ddp_kwargs == {"find_unused_parameters": True}  # DDP's own arguments pass through
    factory = functools.partial(torch.optim.SGD, lr=0.5)
    assert LocalSGDStrategy(outer_optimizer=factory).outer_optimizer is factory
    for name, outer in [("local_sgd", "average"), ("diloco", "diloco"), ("local_sgd_spawn", "average")]:
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=name, logger=False)
        assert isinstance(trainer.strategy, LocalSGDStrategy) and trainer.strategy.outer_optimizer == outer


def test_sync_batchnorm_is_rejected_before_training(tmp_path):
    from torch.utils.data import DataLoader
    from workers.tiny import TinyModule, make_dataset

    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=LocalSGDStrategy(), sync_batchnorm=True,
                        logger=False, enable_checkpointing=False, max_steps=1, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="sync_batchnorm=False"):
        trainer.fit(TinyModule(), DataLoader(make_dataset(), batch_size=2))


def test_nonfinite_pseudo_gradient_names_step_and_group(tmp_path):
    out = run_tiny(tmp_path, devices=2, sync_every=2, steps=6, nan_at=2, ckpt_every=2, expect_fail=True)
    err = out[0]["stderr"]
    assert NonFinitePseudoGradientError.__name__ in err
    assert "local SGD sync at step 4" in err and "worker groups with NaN/inf parameters: [1]" in err
    # the checkpoint written at the last good sync is intact and finite
    ckpt = torch.load(tmp_path / "ckpt" / "step=2.ckpt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
