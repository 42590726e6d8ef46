"""LocalSGDFSDPStrategy on 4 CPU processes = 2 worker groups × 2 FSDP2 shards (gloo)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_localsgd import LocalSGDFSDPStrategy
from lightning_localsgd.checkpoint import convert_checkpoint
from _launch import assert_resume_exact, max_diff, run_tiny
from reference import simulate

ATOL = 1e-5


def test_fsdp_groups_match_reference_and_only_shards_cross_groups(tmp_path):
    H, steps = 3, 6
    ranks = run_tiny(tmp_path, devices=4, strategy="fsdp", group_size=2, sync_every=H, steps=steps,
                     seed_by_rank=True, count_collectives=True, outer="diloco", inner="adamw")
    # FSDP inside a group is DDP inside a group: the same reference as LocalSGDStrategy(group_size=2)
    history, final, _ = simulate(4, 2, sync_every=H, outer="diloco", steps=steps, seed=1000, inner="adamw")
    sync_batches = {b for b in range(steps) if (b + 1) % H == 0}
    for r, dump in enumerate(ranks):
        g = r // 2
        for b, (got, want) in enumerate(zip(dump["steps"], history)):
            assert max_diff(got, want[g]) <= ATOL, (r, b)
        own = {2 * g, 2 * g + 1}
        cross = [c for c in dump["collectives"] if c["batch"] >= 0 and not set(c["ranks"] or []) <= own]
        cross = [c for c in cross if not (c["op"] == "all_reduce" and c["numel"] == 1)]  # the SIGTERM flags
        assert {c["batch"] for c in cross} == sync_batches
        for b in sync_batches:
            here = [(c["op"], sorted(c["ranks"]), c["numel"]) for c in cross if c["batch"] == b]
            # one reduce of this rank's shard with the same shard of the other group; never the full model
            assert here == [("all_reduce", [r % 2, r % 2 + 2], dump["outer_state"]["owned_numel"])]
        inner = [c for c in dump["collectives"] if c["batch"] >= 0 and c["op"] == "reduce_scatter_single"]
        assert inner and all(sorted(c["ranks"]) == sorted(own) for c in inner)  # FSDP's per-step traffic stays inside
    # each rank's snapshot + Nesterov state covers its shard only (2 × shard bytes): 49 params split 29 / 20
    assert [d["info"]["state_bytes"] for d in ranks] == [2 * 29 * 4, 2 * 20 * 4, 2 * 29 * 4, 2 * 20 * 4]


def test_fsdp_mid_interval_resume_is_exact(tmp_path):
    opts = dict(devices=4, strategy="fsdp", group_size=2, sync_every=4, steps=10, outer="diloco", inner="adamw",
                seed_by_rank=True, batches_per_epoch=3)
    straight = run_tiny(tmp_path / "a", ckpt_every=6, **opts)
    ckpt = tmp_path / "a" / "ckpt" / "step=6.ckpt"
    assert ckpt.is_dir()
    resumed = run_tiny(tmp_path / "b", resume=ckpt, **opts)
    assert_resume_exact(straight, resumed)
    # converted: group 0's full weights in Lightning's format, and a plain DDP run resumes from the file
    plain = convert_checkpoint(ckpt, tmp_path / "model.ckpt")
    saved = torch.load(plain, weights_only=False)
    assert max_diff(saved["state_dict"], straight[0]["steps"][5]) == 0.0
    run_tiny(tmp_path / "c", devices=2, strategy="ddp", inner="adamw", steps=8, resume=plain)


def test_fsdp_loads_the_weights_of_a_plain_lightning_checkpoint(tmp_path):
    # a plain single-file Lightning checkpoint (here written by plain DDP) restores its weights into the FSDP shards
    run_tiny(tmp_path / "ddp", devices=2, strategy="ddp", steps=4, ckpt_every=4, seed_by_rank=True)
    plain = tmp_path / "ddp" / "ckpt" / "step=4.ckpt"
    saved = torch.load(plain, weights_only=False)
    # resumed at its last step: nothing left to train, so every rank's model is exactly the file's weights
    ranks = run_tiny(tmp_path / "fsdp", devices=2, strategy="fsdp", group_size=1, steps=4, resume=plain)
    for dump in ranks:
        assert dump["info"]["global_step"] == 4
        assert max_diff(dump["final"], saved["state_dict"]) == 0.0


def test_fsdp_configure_model_sharding_and_bf16_policy(tmp_path):
    # a module that shards itself in configure_model over the worker group
    ranks = run_tiny(tmp_path / "user", devices=4, strategy="fsdp", group_size=2, sync_every=2, steps=4,
                     shard="group")
    history, _, _ = simulate(4, 2, sync_every=2, outer="average", steps=4)
    for r, dump in enumerate(ranks):
        assert max_diff(dump["steps"][-1], history[-1][r // 2]) <= ATOL
    # bf16 compute with fp32 reduce: the shards, the snapshot and the outer step stay fp32
    ranks = run_tiny(tmp_path / "bf16", devices=4, strategy="fsdp", group_size=2, sync_every=2, steps=4, mp_bf16=True,
                     outer="diloco")
    for dump in ranks:
        assert all(s.dtype == torch.float32 for s in dump["outer_state"]["snapshot"])
        assert max_diff(dump["steps"][1], ranks[0]["steps"][1]) == 0.0  # synced after step 2
        assert max_diff(dump["steps"][2], ranks[0]["steps"][2]) > 0.0 or dump is ranks[0] or dump is ranks[1]


def test_fsdp_sharding_across_groups_is_refused(tmp_path):
    out = run_tiny(tmp_path, devices=4, strategy="fsdp", group_size=2, steps=2, shard="world", expect_fail=True)
    assert "Sharding across worker groups defeats local SGD" in out[0]["stderr"]


def test_fsdp_errors_before_training():
    with pytest.raises(ValueError, match=r"group_size=3 does not divide the world size 4"):
        L.Trainer(accelerator="cpu", devices=4, strategy=LocalSGDFSDPStrategy(group_size=3), logger=False)
    with pytest.raises(ValueError, match="auto_wrap_policy must be a set of nn.Module classes"):
        LocalSGDFSDPStrategy(auto_wrap_policy={"Block"})
    with pytest.raises(ValueError, match="mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy"):
        LocalSGDFSDPStrategy(mp_policy="bf16")
    with pytest.raises(ValueError, match="sync_every must be an integer >= 1"):
        LocalSGDFSDPStrategy(sync_every=0)
    with pytest.raises(ValueError, match="save_distributed_checkpoint=False: one full checkpoint file would gather"):
        LocalSGDFSDPStrategy(save_distributed_checkpoint=False)
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy="diloco_fsdp", logger=False)
    assert isinstance(trainer.strategy, LocalSGDFSDPStrategy) and trainer.strategy.group_size == 4
