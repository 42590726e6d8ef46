"""LocalSGDDeepSpeedStrategy on 4 CPU processes = 2 worker groups × 2 ZeRO ranks (DeepSpeed's CPU accelerator, gloo)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import lightning as L
import pytest
import torch

from lightning_localsgd import LocalSGDDeepSpeedStrategy
from _launch import max_diff, run_tiny
from reference import simulate

ATOL = 1e-5
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="DeepSpeed is not installed: pip install 'lightning-localsgd[deepspeed]'"
)


@pytest.fixture(autouse=True)
def _deepspeed_on_cpu(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator, in the workers too


@needs_deepspeed
@pytest.mark.parametrize("stage, accumulate", [(1, 2), (2, 1), (3, 1)])
@pytest.mark.slow
def test_deepspeed_stages_match_reference_and_only_partitions_cross_groups(tmp_path, stage, accumulate):
    H, steps = 3, 6
    # ZeRO-3: with a persistence threshold of 10 elements net1.weight (32) stays partitioned between forwards and
    # the three smaller tensors are persistent (kept gathered): the sync must refresh both kinds
    extra = {"ds_persist_threshold": 10} if stage == 3 else {}
    # Stage 1 with gradient accumulation: DeepSpeed steps on every 2nd micro-batch and H counts those steps. (Lightning
    # divides the loss by accumulate_grad_batches and DeepSpeed divides it again; AdamW does not see that scale.)
    ranks = run_tiny(tmp_path, devices=4, strategy="deepspeed", stage=stage, group_size=2, sync_every=H, steps=steps,
                     accumulate=accumulate, seed_by_rank=True, count_collectives=True, outer="diloco", inner="adamw",
                     **extra)
    # ZeRO inside a group is data parallel inside a group: the same reference as LocalSGDStrategy(group_size=2)
    history, _, _ = simulate(4, 2, sync_every=H, outer="diloco", steps=steps, seed=1000, inner="adamw",
                             accumulate=accumulate)
    sync_batches = {b for b in range(steps * accumulate) if (b + 1) % (H * accumulate) == 0}
    for r, dump in enumerate(ranks):
        g = r // 2
        assert len(dump["steps"]) == len(history) == steps * accumulate
        for b, (got, want) in enumerate(zip(dump["steps"], history)):
            assert max_diff(got, want[g]) <= ATOL, (r, b)
        assert dump["info"]["num_syncs"] == steps // H and dump["info"]["global_step"] == steps
        own = {2 * g, 2 * g + 1}
        cross = [c for c in dump["collectives"] if c["batch"] >= 0 and not set(c["ranks"] or []) <= own]
        cross = [c for c in cross if not (c["op"] == "all_reduce" and c["numel"] == 1)]  # the SIGTERM flags
        if stage == 3:  # DeepSpeed checks its ZeRO-3 prefetch trace on all ranks once, right after recording it
            cross = [c for c in cross if not (c["op"] == "broadcast" and c["batch"] <= 1)]
        assert {c["batch"] for c in cross} == sync_batches
        for b in sync_batches:
            here = [(c["op"], sorted(c["ranks"]), c["numel"]) for c in cross if c["batch"] == b]
            # one reduce of this rank's fp32 master partition with the same partition of the other group
            assert here == [("all_reduce", [r % 2, r % 2 + 2], dump["outer_state"]["owned_numel"])]
        # the snapshot + Nesterov state cover this rank's ZeRO partition only (about half the 49 parameters)
        assert dump["outer_state"]["owned_numel"] < 49
        assert dump["info"]["state_bytes"] == 2 * 4 * dump["outer_state"]["owned_numel"]
    if stage == 3:
        assert ranks[0]["info"]["ds_persistent"] == 3
    # the two partitions of a group together hold the whole model (plus ZeRO's alignment padding)
    assert ranks[0]["outer_state"]["owned_numel"] + ranks[1]["outer_state"]["owned_numel"] >= 49


@needs_deepspeed
@pytest.mark.slow
def test_deepspeed_mid_interval_resume_is_exact(tmp_path):
    opts = dict(devices=4, strategy="deepspeed", stage=3, ds_persist_threshold=10, group_size=2, sync_every=4,
                steps=10, outer="diloco", inner="adamw", seed_by_rank=True, batches_per_epoch=3)
    straight = run_tiny(tmp_path / "a", ckpt_every=6, **opts)
    ckpt = tmp_path / "a" / "ckpt" / "step=6.ckpt"  # 2 steps after the sync at step 4
    # the one folder layout: each group's DeepSpeed partitions and every rank's outer state in the save's sub-folder
    (save,) = [p for p in ckpt.iterdir() if p.is_dir()]
    assert (ckpt / "meta.pt").is_file()
    assert all((save / "deepspeed" / f"group{g:05d}" / "checkpoint").is_dir() for g in range(2))
    assert sorted(p.name for p in save.glob("rank*.pt")) == [f"rank{r:05d}.pt" for r in range(4)]
    resumed = run_tiny(tmp_path / "b", resume=ckpt, **opts)
    for a, b in zip(straight, resumed):
        assert b["info"]["global_step"] == 10
        assert max_diff(a["final"], b["final"]) == 0.0
        for got, want in zip(b["steps"], a["steps"][6:]):
            assert max_diff(got, want) == 0.0
        (oa,), (ob,) = a["optimizers"], b["optimizers"]
        assert all(torch.equal(x, y) for x, y in zip(oa["master"], ob["master"]))
        for sa, sb in zip(oa["state"].values(), ob["state"].values()):
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa if torch.is_tensor(sa[k]))
        assert all(torch.equal(x, y) for x, y in zip(a["outer_state"]["snapshot"], b["outer_state"]["snapshot"]))
        assert a["outer_state"]["num_syncs"] == b["outer_state"]["num_syncs"]
    # between syncs the groups differed, so the resumed run must have restored each group's own state
    assert max_diff(straight[0]["steps"][5], straight[2]["steps"][5]) > 0.0
    # the one converter gives each group's weights (DeepSpeed's own zero_to_fp32 on the group's partitions)
    from lightning_localsgd import convert_checkpoint

    for group, rank in ((0, 0), (1, 2)):
        convert_checkpoint(ckpt, tmp_path / "model.pt", group=group)
        weights = torch.load(tmp_path / "model.pt", weights_only=False)["state_dict"]
        assert max_diff(weights, straight[rank]["steps"][5]) == 0.0


@needs_deepspeed
@pytest.mark.slow
def test_deepspeed_bf16_mixed_syncs_fp32_master_weights(tmp_path):
    # bf16 with ZeRO stage 1 and fp32 gradient accumulation runs DeepSpeed's BF16_Optimizer (otherwise the ZeRO
    # optimizer of the fp32 tests, with bf16 bit16 partitions): the fp32 master partitions are the ones synced
    ranks = run_tiny(tmp_path, devices=4, strategy="deepspeed", stage=1, group_size=2, sync_every=2, steps=4,
                     outer="diloco", inner="adamw", precision="bf16-mixed", ds_fp32_grad_accum=True)
    assert ranks[0]["info"]["ds_optimizer"] == "BF16_Optimizer"
    for dump in ranks:
        assert all(s.dtype == torch.float32 for s in dump["outer_state"]["snapshot"])
        assert all(m.dtype == torch.float32 for m in dump["optimizers"][0]["master"])
        assert dump["steps"][0]["model.net1.weight"].dtype == torch.bfloat16
        for b in (1, 3):  # after each sync every rank holds the same bf16 weights
            assert max_diff(dump["steps"][b], ranks[0]["steps"][b]) == 0.0
    assert max_diff(ranks[2]["steps"][2], ranks[0]["steps"][2]) > 0.0  # mid-interval the groups differ
    for r in (0, 1):  # after the last sync the fp32 masters of partition r are equal in both groups
        assert all(torch.equal(x, y) for x, y in zip(ranks[r]["optimizers"][0]["master"],
                                                     ranks[r + 2]["optimizers"][0]["master"]))


@needs_deepspeed
def test_deepspeed_errors_before_training():
    with pytest.raises(ValueError, match=r"group_size=3 does not divide the world size 4"):
        L.Trainer(accelerator="cpu", devices=4, strategy=LocalSGDDeepSpeedStrategy(group_size=3), logger=False)
    with pytest.raises(ValueError, match=r"does not support ZeRO offloading \(offload_optimizer to cpu\)"):
        LocalSGDDeepSpeedStrategy(stage=2, offload_optimizer=True)
    with pytest.raises(ValueError, match=r"offload_param to nvme"):
        LocalSGDDeepSpeedStrategy(config={"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}})
    with pytest.raises(ValueError, match=r"needs ZeRO stage 1, 2 or 3 .* got stage 0"):
        LocalSGDDeepSpeedStrategy(stage=0)
    with pytest.raises(ValueError, match=r"needs ZeRO stage 1, 2 or 3"):
        LocalSGDDeepSpeedStrategy(zero_optimization=False)
    with pytest.raises(ValueError, match=r"warm-up steps are not supported with DeepSpeed"):
        LocalSGDDeepSpeedStrategy(warmup_steps=10)
    with pytest.raises(ValueError, match=r"does not support load_full_weights=True"):
        LocalSGDDeepSpeedStrategy(stage=3, load_full_weights=True)
    with pytest.raises(ValueError, match=r"sync_every must be an integer >= 1"):
        LocalSGDDeepSpeedStrategy(sync_every=0)
    for name, stage, outer in (("local_sgd_deepspeed_stage_1", 1, "average"), ("diloco_deepspeed_stage_3", 3, "diloco"),
                               ("local_sgd_deepspeed", 2, "average")):
        trainer = L.Trainer(accelerator="cpu", devices=4, strategy=name, logger=False)
        strategy = trainer.strategy
        assert isinstance(strategy, LocalSGDDeepSpeedStrategy)
        assert (strategy.zero_stage, strategy.outer_optimizer, strategy.group_size) == (stage, outer, 4)


def test_deepspeed_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning-localsgd\[deepspeed\]'"):
        LocalSGDDeepSpeedStrategy(stage=2)


@pytest.mark.slow
def test_package_imports_and_registers_without_deepspeed():
    code = (
        "import sys; sys.modules['deepspeed'] = None\n"
        "import lightning_localsgd\n"
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "names = StrategyRegistry.available_strategies()\n"
        "assert all(f'{o}_deepspeed_stage_{s}' in names for o in ('local_sgd', 'diloco') for s in (1, 2, 3)), names\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
