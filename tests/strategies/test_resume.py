"""Checkpoints taken mid-interval resume exactly; they load back into plain DDP."""

from __future__ import annotations

import pytest
import torch

from _launch import max_diff, run_tiny
from lightning_localsgd.checkpoint import convert_checkpoint, read_checkpoint
from workers.tiny import TinyModule


def _opt_diff(a: dict, b: dict) -> float:
    worst = 0.0
    for sa, sb in zip(a["state"].values(), b["state"].values()):
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                worst = max(worst, float((sa[k].float() - sb[k].float()).abs().max()))
    return worst


def test_mid_interval_resume_is_exact_and_loads_into_ddp(tmp_path):
    # Lightning restarts a dataloader from its first batch on resume, so the checkpoint is taken at the end of an
    # epoch (3 batches each) to feed both runs the same data; it is still mid-interval for local SGD (6 % 4 = 2).
    opts = dict(devices=2, sync_every=4, steps=10, outer="diloco", inner="adamw", seed_by_rank=True,
                batches_per_epoch=3)
    straight = run_tiny(tmp_path / "a", ckpt_every=6, **opts)
    ckpt = tmp_path / "a" / "ckpt" / "step=6.ckpt"
    assert ckpt.is_dir()  # a folder: every rank wrote its own files
    saved = read_checkpoint(ckpt)
    state = saved["local_sgd"]
    assert state["schedule"] == {"steps_done": 6, "steps_since_sync": 2}  # mid-interval
    assert state["groups"][1] is not None and len(state["ranks"]) == 2
    # the two groups really differ at step 6, and the checkpoint keeps both
    assert max_diff(state["groups"][1]["state_dict"], saved["state_dict"]) > 1e-4
    assert max_diff(straight[1]["steps"][5], state["groups"][1]["state_dict"]) == 0.0

    resumed = run_tiny(tmp_path / "b", resume=ckpt, **opts)
    for a, b in zip(straight, resumed):
        assert max_diff(a["final"], b["final"]) == 0.0
        assert max_diff(a["steps"][-1], b["steps"][-1]) == 0.0
        for oa, ob in zip(a["optimizers"], b["optimizers"]):
            assert _opt_diff(oa, ob) == 0.0
        assert a["info"]["num_syncs"] == b["info"]["num_syncs"] == 3
        sa, sb = a["outer_state"], b["outer_state"]
        assert all(torch.equal(x, y) for x, y in zip(sa["snapshot"], sb["snapshot"]))
        mom_a = [s["momentum_buffer"] for s in sa["outer_optimizer"]["state"].values()]
        mom_b = [s["momentum_buffer"] for s in sb["outer_optimizer"]["state"].values()]
        assert all(torch.equal(x, y) for x, y in zip(mom_a, mom_b))

    # converted to Lightning's own format: a plain module and a plain DDP run read it
    plain = convert_checkpoint(ckpt, tmp_path / "model.ckpt")
    module = TinyModule.load_from_checkpoint(plain)
    assert max_diff(dict(module.named_parameters()), straight[0]["steps"][5]) == 0.0
    run_tiny(tmp_path / "c", devices=2, strategy="ddp", inner="adamw", steps=8, resume=plain)


def test_resume_with_other_group_size_fails_clearly_where_shards_cannot_be_recut(tmp_path):
    # DDP replicas resume on another layout from θ_g (test_elastic_resume.py); FSDP's shards cannot be re-cut
    run_tiny(tmp_path / "a", devices=2, strategy="fsdp", group_size=1, sync_every=4, steps=6, ckpt_every=6)
    ckpt = tmp_path / "a" / "ckpt" / "step=6.ckpt"
    out = run_tiny(tmp_path / "b", devices=2, strategy="fsdp", group_size=2, sync_every=4, steps=8, resume=ckpt,
                   expect_fail=True)
    assert "group_size=2" in out[0]["stderr"] and "worker groups of 1" in out[0]["stderr"]


@pytest.mark.slow
def test_local_sgd_starts_from_the_weights_of_a_plain_ddp_checkpoint(tmp_path):
    # a plain single-file Lightning checkpoint (written by plain DDP, no local-SGD state): every group starts from its
    # weights and local SGD from a new interval (TrainingState.restore of a checkpoint without a layout)
    run_tiny(tmp_path / "ddp", devices=2, strategy="ddp", steps=4, ckpt_every=4, seed_by_rank=True)
    plain = tmp_path / "ddp" / "ckpt" / "step=4.ckpt"
    saved = torch.load(plain, weights_only=False)
    assert "local_sgd" not in saved
    # resumed at its last step: nothing left to train, so every rank's model is exactly the file's weights
    ranks = run_tiny(tmp_path / "local_sgd", devices=2, sync_every=4, steps=4, resume=plain, seed_by_rank=True)
    for dump in ranks:
        assert dump["info"]["global_step"] == 4 and dump["info"]["num_syncs"] == 0
        assert max_diff(dump["final"], saved["state_dict"]) == 0.0
