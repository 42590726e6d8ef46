"""Elastic resume: a checkpoint resumed on another number of groups starts every group from θ_g and the outer state
(the inner drift since the last sync is dropped); the first sync after it equals a hand reference from θ_g."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler

from _launch import max_diff, run_tiny
from lightning_localsgd.checkpoint import read_checkpoint
from workers.tiny import TinyNet, make_dataset, make_inner_optimizer

H = 4


def _global_state(ckpt, old_group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """θ_g and DiLoCo's momentum, flat, from the rank files of the old group 0 (its slices, in rank order)."""
    ranks = read_checkpoint(ckpt)["local_sgd"]["ranks"][:old_group_size]
    theta = torch.cat([s.reshape(-1) for r in ranks for s in r["snapshot"]])
    momentum = torch.cat([st["momentum_buffer"].reshape(-1) for r in ranks
                          for _, st in sorted(r["outer_optimizer"]["state"].items())])
    return theta, momentum


def _unflatten(net: TinyNet, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name, p in net.named_parameters():
        out[name] = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    return out


def _hand_reference(theta: torch.Tensor, momentum: torch.Tensor, world: int, epoch: int, steps: int) -> dict:
    """Every new group (one rank each) starts from θ_g, takes `steps` inner SGD steps on its batches of `epoch`,
    then one DiLoCo outer step (Nesterov, lr 0.7, momentum 0.9) with the checkpoint's momentum."""
    base = TinyNet(False)
    with torch.no_grad():
        for p, value in zip(base.parameters(), _unflatten(base, theta).values()):
            p.copy_(value)
    x, y = make_dataset().tensors
    finals = []
    for rank in range(world):
        sampler = DistributedSampler(make_dataset(), num_replicas=world, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        idx = list(sampler)
        net = copy.deepcopy(base)
        opt = make_inner_optimizer("sgd", net.parameters())
        for b in range(steps):
            batch = idx[2 * b : 2 * b + 2]
            opt.zero_grad()
            F.mse_loss(net(x[batch]), y[batch]).backward()
            opt.step()
        finals.append(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    delta = theta - torch.stack(finals).mean(0)
    buf = 0.9 * momentum + delta
    return _unflatten(base, theta - 0.7 * (delta + 0.9 * buf))


@pytest.mark.parametrize("old, new", [
    (dict(devices=4, group_size=1), dict(devices=2, group_size=1)),  # 4 groups -> 2
    (dict(devices=4, group_size=2), dict(devices=4, group_size=1)),  # 2 groups of 2 (θ_g in slices) -> 4
])
def test_resume_on_another_layout_starts_from_theta_g(tmp_path, old, new):
    opts = dict(sync_every=H, outer="diloco", inner="sgd", seed_by_rank=True, batches_per_epoch=3)
    run_tiny(tmp_path / "a", steps=7, ckpt_every=6, **old, **opts)
    ckpt = tmp_path / "a" / "ckpt" / "step=6.ckpt"  # mid-interval: 2 steps after the sync at step 4
    resumed = run_tiny(tmp_path / "b", steps=8, resume=ckpt, **new, **opts)
    theta, momentum = _global_state(ckpt, old["group_size"])
    # epochs of 3 batches: the checkpoint ends epoch 1, the resumed run starts epoch 2; the interval goes on, so
    # the first sync comes after 2 inner steps, at step 8
    want = _hand_reference(theta, momentum, world=new["devices"], epoch=2, steps=2)
    for r, dump in enumerate(resumed):
        assert dump["info"]["global_step"] == 8 and dump["info"]["num_syncs"] == 2, r  # counters continued
        assert len(dump["steps"]) == 2
        assert max_diff(dump["steps"][1], want) <= 1e-6, r
