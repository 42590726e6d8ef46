"""Lightning training on one GPU shared by 2-4 ranks (gloo between them), against the CPU hand references of
tests/reference.py: DDP worker groups, host-resident outer state, bf16-mixed with the fp32 snapshot, streaming with
overlap, a compressed sync, FSDP2 with ``MixedPrecisionPolicy``, DeepSpeed ZeRO-2 on the CUDA accelerator, exact
resume.

Tolerance: the CPU suite compares at 1e-6; on the GPU the same fp32 arithmetic runs in other kernels (other summation
orders), so these compare at ``ATOL`` = 1e-5 — the bound tests/strategies/test_deepspeed.py already uses — and print
the largest difference seen, so that docs/gpu.md can report it.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from lightning_localsgd.engine.codecs import payload_bytes
from _launch import assert_resume_exact, max_diff, run_tiny, strip
from _gpu import DEVICE, gpus_available, run_on_gpu, run_on_gpus
from reference import simulate, simulate_streaming

ATOL = 1e-5


def check(ranks, group_size, history, final, label):
    worst = 0.0
    for r, dump in enumerate(ranks):
        g = r // group_size
        assert dump["info"]["param_device"] == DEVICE, dump["info"]
        assert len(dump["steps"]) == len(history)
        for b, (got, want) in enumerate(zip(dump["steps"], history)):
            diff = max_diff(got, want[g])
            worst = max(worst, diff)
            assert diff <= ATOL, f"{label}: rank {r} batch {b}: {diff}"
        worst = max(worst, max_diff(dump["final"], final[g]))
        assert max_diff(dump["final"], final[g]) <= ATOL
    print(f"[gpu-vs-reference] {label}: largest difference {worst:.3g}")


@pytest.mark.parametrize("state_device", [None, "cpu"], ids=["state_on_gpu", "state_on_host"])
def test_ddp_groups_on_one_gpu_match_reference(tmp_path, state_device):
    # 4 ranks = 2 worker groups of 2 (DDP over the group's process group), DiLoCo over AdamW, 2 synchronous
    # warm-up steps, ending mid-interval (the train-end sync)
    ranks = run_on_gpu(tmp_path, world=4, group_size=2, sync_every=2, steps=7, warmup=2, outer="diloco", inner="adamw",
                       seed_by_rank=True, state_device=state_device)
    history, final, _ = simulate(4, 2, sync_every=2, outer="diloco", steps=7, warmup=2, inner="adamw", seed=1000)
    check(ranks, 2, history, final, f"ddp groups, outer state on {state_device or 'gpu'}")
    for dump in ranks:
        assert dump["info"]["snapshot_device"] == ("cpu" if state_device == "cpu" else DEVICE)
        assert all(s.dtype == torch.float32 for s in dump["outer_state"]["snapshot"])


def test_bf16_mixed_keeps_an_fp32_snapshot_on_the_host(tmp_path):
    ranks = run_on_gpu(tmp_path, world=2, sync_every=2, steps=4, precision="bf16-mixed", outer="diloco",
                       state_device="cpu", seed_by_rank=True)
    for dump in ranks:
        assert dump["info"]["snapshot_device"] == "cpu" and dump["info"]["num_syncs"] == 2
        assert all(s.dtype == torch.float32 for s in dump["outer_state"]["snapshot"])
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in dump["final"].values()
                   if v.is_floating_point())
    assert max_diff(ranks[0]["steps"][1], ranks[1]["steps"][1]) == 0.0  # synced after step 2
    assert max_diff(ranks[0]["steps"][2], ranks[1]["steps"][2]) > 0.0  # then apart again
    # the snapshot is the synced model, bit for bit, in fp32
    names = ["net1.weight", "net1.bias", "net2.weight", "net2.bias"]
    for k, snap in zip(names, ranks[0]["outer_state"]["snapshot"]):
        assert torch.equal(snap.reshape(-1), strip(ranks[0]["final"])[k].reshape(-1))


def test_streaming_with_overlap_on_one_gpu_matches_reference(tmp_path):
    # F=2, τ=1, α=0.5, DiLoCo over AdamW, H=4: the asynchronous fragment collectives run beside CUDA streams
    ranks = run_on_gpu(tmp_path, world=2, sync_every=4, fragments=2, overlap_steps=1, overlap_mix=0.5, outer="diloco",
                       inner="adamw", steps=10, seed_by_rank=True)
    history, final, _, _ = simulate_streaming(2, 4, 2, 1, 0.5, "diloco", 10, inner="adamw", seed=1000)
    check(ranks, 1, history, final, "streaming F=2 tau=1")
    assert max_diff(ranks[0]["final"], ranks[1]["final"]) == 0.0


def test_compressed_sync_on_one_gpu_matches_the_cpu_run(tmp_path):
    # int8 with error feedback: the CPU suite checks the CPU run against the hand reference; the GPU run must give
    # the same model up to float rounding, which can move a value by at most one int8 step of a pseudo-gradient
    opts = dict(sync_every=2, steps=6, compression="int8", outer="diloco", inner="adamw", seed_by_rank=True)
    gpu = run_on_gpu(tmp_path / "gpu", world=2, **opts)
    cpu = run_tiny(tmp_path / "cpu", devices=2, **opts)
    assert gpu[0]["info"]["bytes_sent"] == cpu[0]["info"]["bytes_sent"] == 3 * 2 * payload_bytes("int8", math.ceil(49 / 2))
    assert max_diff(gpu[0]["final"], gpu[1]["final"]) == 0.0
    diff = max_diff(gpu[0]["final"], cpu[0]["final"])
    print(f"[gpu-vs-cpu] int8 sync: largest difference {diff:.3g}")
    assert diff <= 1e-3
    for a, b in zip(gpu, cpu):
        assert torch.allclose(a["outer_state"]["compression_error"], b["outer_state"]["compression_error"], atol=1e-3)


@pytest.mark.skipif(not gpus_available(4), reason=(
    "FSDP2 on CUDA needs 4 GPUs (one rank each, NCCL). Ranks sharing one GPU go over gloo, and gloo's all-gather of "
    "FSDP2's CUDA shards crashes the ranks (SIGSEGV in gloo::allgather, torch 2.11 on an H200: docs/gpu.md)"))
def test_fsdp2_on_gpus_matches_reference_and_bf16_policy_keeps_fp32_state(tmp_path):
    ranks = run_on_gpus(tmp_path / "fp32", world=4, strategy="fsdp", group_size=2, sync_every=3, steps=6,
                       seed_by_rank=True, outer="diloco", inner="adamw")
    history, final, _ = simulate(4, 2, sync_every=3, outer="diloco", steps=6, seed=1000, inner="adamw")
    check(ranks, 2, history, final, "fsdp2 fp32")
    ranks = run_on_gpus(tmp_path / "bf16", world=4, strategy="fsdp", group_size=2, sync_every=2, steps=4, mp_bf16=True,
                       outer="diloco")
    for dump in ranks:
        assert all(s.dtype == torch.float32 for s in dump["outer_state"]["snapshot"])
        assert max_diff(dump["steps"][1], ranks[0]["steps"][1]) == 0.0  # synced after step 2
    assert max_diff(ranks[0]["steps"][2], ranks[2]["steps"][2]) > 0.0  # the two groups apart again


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed is not installed: pip install 'lightning-localsgd[deepspeed]'")
def test_deepspeed_stage2_on_the_cuda_accelerator_matches_reference(tmp_path):
    ranks = run_on_gpu(tmp_path, world=4, strategy="deepspeed", stage=2, group_size=2, sync_every=3, steps=6,
                       seed_by_rank=True, outer="diloco", inner="adamw")
    history, final, _ = simulate(4, 2, sync_every=3, outer="diloco", steps=6, seed=1000, inner="adamw")
    check(ranks, 2, history, final, "deepspeed zero-2")
    assert all(d["info"]["num_syncs"] == 2 for d in ranks)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync_save", "async_save"])
def test_mid_interval_resume_on_cuda_is_exact(tmp_path, async_save):
    # async_save: the state is copied from the GPU to host memory on the training thread, then written behind it
    opts = dict(world=2, sync_every=4, steps=10, outer="diloco", inner="adamw", seed_by_rank=True,
                batches_per_epoch=3)
    straight = run_on_gpu(tmp_path / "a", ckpt_every=6, async_save=async_save, **opts)
    ckpt = tmp_path / "a" / "ckpt" / "step=6.ckpt"
    assert ckpt.exists()
    resumed = run_on_gpu(tmp_path / "b", resume=ckpt, **opts)
    assert_resume_exact(straight, resumed)
