"""Sharded inner strategies inside federated jobs: FSDP2 and DeepSpeed ZeRO in each job, rank k of every job syncing
shard k through torchft (CPU, gloo).

Jobs are launched as in ``test_federated.py`` (``tests/workers/train_federated.py --strategy fsdp|deepspeed``, two
ranks each); each rank dumps the job's *full* parameters after every step (FSDP2 shards gathered inside the job), which
are compared with the same hand reference: each job's inner step is the mean gradient of its two ranks' batches (what
FSDP's reduce-scatter and ZeRO's gradient partitioning compute), and each sync is the mean over the jobs that weighed in
followed by the outer step.
"""

from __future__ import annotations

import signal
import time

import pytest
import torch

pytest.importorskip("torchft")
import test_federated as federated
from test_federated import (H, HEARTBEAT_S, STEPS, assert_matches, committed, launch, lighthouse, load,  # noqa: F401
                            killed_on_exit, params_at, reference, wait_all)


def run_jobs(tmp_path, address, jobs: int, **options) -> dict[str, dict]:
    """Jobs of two ranks."""
    return federated.run_jobs(tmp_path, address, jobs, ranks=2, timeout=240, **options)


def check_sharded_syncs(dumps: dict[str, dict], strategy: str, full_numel: int, padded: bool = False) -> None:
    """Every sync of every rank equals the hand reference; all ranks end identical; each rank reduced its shard."""
    assert all(d["strategy"] == strategy for d in dumps.values())
    jobs = {name: d for name, d in dumps.items() if not name.endswith("_r1")}
    ref = reference(jobs, "diloco", ranks=2)
    final = dumps["g0"]["final"]
    for name, d in dumps.items():
        assert d["global_step"] == STEPS
        assert all(committed(d, s)["participants"] == 2 and committed(d, s)["weight"] == 1.0
                   for s in range(H, STEPS + 1, H)), d["attempts"]
        assert_matches(d, ref, range(H, STEPS + 1, H))
        assert all(torch.equal(d["final"][k], final[k]) for k in final), name
    for g in jobs:  # rank k of the job synced shard k only: the two shards make one copy of the model
        sizes = [sum(t.numel() for t in dumps[n]["snapshot"]) for n in (g, g + "_r1")]
        assert min(sizes) > 0 and (sum(sizes) >= full_numel if padded else sum(sizes) == full_numel), sizes
    # the jobs really drift apart between syncs (a wrong mean would show)
    assert max(float((params_at(dumps["g0"], 2)[k] - params_at(dumps["g1"], 2)[k]).abs().max())
               for k in ref[H]) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("shard", ["", "group"], ids=["automatic", "self-sharded"])
def test_two_jobs_of_two_ranks_fsdp_inside_each_match_the_hand_reference(tmp_path, lighthouse, shard):
    """2 jobs × 2 ranks, FSDP2 inside each job (sharded by the strategy, or by the module itself in configure_model
    over ``device_mesh["shard"]``): every sync equals the hand reference on the gathered parameters."""
    dumps = run_jobs(tmp_path, lighthouse(2), 2, outer="diloco", strategy="fsdp", shard=shard)
    check_sharded_syncs(dumps, "LocalSGDFSDPStrategy", sum(v.numel() for v in dumps["g0"]["final"].values()))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_jobs_of_two_ranks_zero_inside_each_match_the_hand_reference(tmp_path, lighthouse, monkeypatch, stage):
    """2 jobs × 2 ranks, DeepSpeed ZeRO (stage 1, 2, 3) inside each job: rank k syncs its fp32 master partition k."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    dumps = run_jobs(tmp_path, lighthouse(2), 2, outer="diloco", strategy="deepspeed", stage=stage)
    check_sharded_syncs(dumps, "LocalSGDDeepSpeedStrategy", sum(v.numel() for v in dumps["g0"]["final"].values()),
                        padded=True)


@pytest.mark.slow
def test_three_fsdp_jobs_one_killed_mid_interval_then_restarted_heals_shard_by_shard(tmp_path, lighthouse):
    """3 jobs × 2 ranks with FSDP2; g2 (both ranks) is SIGKILLed mid-interval at step 6; g0 and g1 sync at step 8 over
    themselves; g2 restarted with the same group_id heals in that sync, each rank receiving its own shard from rank k
    of a live job (never a full copy), and the three jobs sync at step 12 and end with identical full parameters."""
    address = lighthouse(2)
    die_at = H + 2
    opts = dict(outer="diloco", strategy="fsdp", devices=2, sync_timeout=30)
    procs = [launch(tmp_path, address, g, barrier=3, wait_for="g2r", wait_at_step=2 * H - 1,
                    die_at_step=die_at if g == 2 else -1, **opts) for g in range(3)]
    with killed_on_exit(procs):
        assert procs[2].wait(timeout=200) == -signal.SIGKILL, (tmp_path / "g2.log").read_text()[-3000:]
        killed_at = time.monotonic()
        procs.append(launch(tmp_path, address, 2, name="g2r", **opts))
        codes = wait_all([procs[0], procs[1], procs[3]], tmp_path, timeout=240)
    assert codes == [0, 0, 0], "\n".join((tmp_path / f"{n}.log").read_text()[-2000:] for n in ("g0", "g1", "g2r"))
    print(f"restarted job ran {time.monotonic() - killed_at:.1f} s")
    names = [f"{g}{r}" for g in ("g0", "g1", "g2", "g2r") for r in ("", "_r1")]
    dumps = {n: load(tmp_path, n) for n in names}
    assert dumps["g2"]["killed"] and dumps["g2_r1"]["killed"] and dumps["g2"]["global_step"] == die_at

    for n in ("g0", "g0_r1", "g1", "g1_r1"):  # the survivors: never healed, the restarted job weighs 0 at step 8
        d = dumps[n]
        assert d["global_step"] == STEPS and d["healed"] == 0
        assert committed(d, H)["participants"] == 3
        assert committed(d, 2 * H)["participants"] == 3 and committed(d, 2 * H)["weight"] == 1.0, d["attempts"]
        assert committed(d, 3 * H)["participants"] == 3
        waits = [a["seconds"] for a in d["attempts"]]
        assert max(waits) < 30, waits  # nobody waited for as long as sync_timeout
    for n in ("g2r", "g2r_r1"):  # every rank of the restarted job healed once, in the sync of step 8, weight 0
        d = dumps[n]
        heal = committed(d, 2 * H)
        assert heal is not None and heal["healed"] and heal["weight"] == 0.0, d["attempts"]
        assert d["healed"] == 1 and d["start_step"] == 2 * H and d["global_step"] == STEPS
        # healed state per rank: the rank's own shard (θ_g and the outer momentum of its shard), not a full copy
        assert d["heal_bytes"] > 0 and d["heal_bytes"] < 0.75 * 3 * 4 * sum(v.numel() for v in d["final"].values())
        peer = dumps["g0" + n[3:]]  # the same rank of a survivor: the same shard of θ_g
        assert all(torch.equal(x, y) for x, y in zip(d["snapshot"], peer["snapshot"]))
    jobs = {n: dumps[n] for n in ("g0", "g1", "g2", "g2r")}
    ref = reference(jobs, "diloco", ranks=2)
    for n, d in dumps.items():
        if not d["killed"]:
            assert_matches(d, ref, range(3 * H if n.startswith("g2r") else H, STEPS + 1, H))
            assert all(torch.equal(d["final"][k], dumps["g0"]["final"][k]) for k in d["final"]), n
    start = {k.removeprefix("model."): v for k, v in dumps["g2r"]["start_params"].items()}
    assert all(torch.equal(start[k], params_at(dumps["g0"], 2 * H)[k]) for k in start)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_job_killed_and_restarted_heals_its_partitions(tmp_path, lighthouse, monkeypatch, stage):
    """2 jobs × 2 ranks with DeepSpeed ZeRO-2 / 3; g1 (both ranks) is SIGKILLed mid-interval; g0 syncs alone at step 8,
    where the restarted g1 heals (each rank its own fp32 master partition, θ_g and outer state from rank k of g0)
    with weight 0; both sync at step 12 and all four ranks end identical, every sync equal to the hand reference."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    address = lighthouse(1)
    opts = dict(outer="diloco", strategy="deepspeed", stage=stage, devices=2, sync_timeout=30)
    procs = [launch(tmp_path, address, g, barrier=2, wait_for="g1r", wait_at_step=2 * H - 1,
                    die_at_step=H + 2 if g == 1 else -1, **opts) for g in range(2)]
    with killed_on_exit(procs):
        assert procs[1].wait(timeout=200) == -signal.SIGKILL, (tmp_path / "g1.log").read_text()[-3000:]
        procs.append(launch(tmp_path, address, 1, name="g1r", **opts))
        codes = wait_all([procs[0], procs[2]], tmp_path, timeout=240)
    assert codes == [0, 0], "\n".join((tmp_path / f"{n}.log").read_text()[-2000:] for n in ("g0", "g1r"))
    dumps = {n + r: load(tmp_path, n + r) for n in ("g0", "g1", "g1r") for r in ("", "_r1")}
    full = sum(v.numel() for v in dumps["g0"]["final"].values())
    for n in ("g1r", "g1r_r1"):
        d = dumps[n]
        heal = committed(d, 2 * H)
        assert heal is not None and heal["healed"] and heal["weight"] == 0.0, d["attempts"]
        assert d["healed"] == 1 and d["start_step"] == 2 * H and d["global_step"] == STEPS
        # its own partition only: master partition + θ_g + outer momentum of about half the model
        assert 0 < d["heal_bytes"] < 0.75 * 3 * 4 * full, d["heal_bytes"]
        assert all(torch.equal(x, y) for x, y in zip(d["snapshot"], dumps["g0" + n[3:]]["snapshot"]))
    for n in ("g0", "g0_r1"):
        assert committed(dumps[n], 2 * H)["participants"] == 2 and dumps[n]["healed"] == 0
    ref = reference({n: dumps[n] for n in ("g0", "g1", "g1r")}, "diloco", ranks=2)
    for n in ("g0", "g0_r1", "g1r", "g1r_r1"):
        assert_matches(dumps[n], ref, range(3 * H if n.startswith("g1r") else H, STEPS + 1, H))
        assert all(torch.equal(dumps[n]["final"][k], dumps["g0"]["final"][k]) for k in dumps["g0"]["final"]), n


@pytest.mark.slow
def test_job_of_another_world_size_is_refused_naming_both_layouts(tmp_path, lighthouse):
    """An FSDP2 job of 2 ranks and one of 1 rank meet at the first quorum: both are refused before their first step,
    each log naming both jobs' layouts, without waiting for sync_timeout."""
    address = lighthouse(2)
    start = time.monotonic()
    procs = [launch(tmp_path, address, g, barrier=2, strategy="fsdp", devices=2 - g, sync_timeout=120)
             for g in range(2)]
    with killed_on_exit(procs):
        codes = wait_all(procs, tmp_path, timeout=200)
    elapsed = time.monotonic() - start
    logs = [(tmp_path / f"g{g}.log").read_text() for g in range(2)]
    assert codes[0] != 0 and codes[1] != 0, logs
    for log in logs:
        assert "LayoutMismatchError: local SGD: the federated jobs do not hold the model alike" in log, log[-3000:]
        assert "job 'g0': 2 rank(s) with FSDP2 shards" in log and "job 'g1': 1 rank(s) with FSDP2 shards" in log
    print(f"both refused after {elapsed:.1f} s (start-up included)")
    assert elapsed < 100  # not the sync_timeout of 120 s: refused at the first quorum


@pytest.mark.slow
def test_fsdp_jobs_checkpoint_on_their_own_and_one_resumes_alone_from_its_folder(tmp_path, lighthouse):
    """2 FSDP2 jobs × 2 ranks, each checkpointing into its own folder (every rank its own files, no collective across
    jobs). g1 is SIGKILLed at step 6; after g0 finished, g1 restarts from its own checkpoint of step 4, finds no live
    peer and says so in one line naming that checkpoint, and continues from exactly the state it saved."""
    address = lighthouse(1)
    opts = dict(outer="diloco", strategy="fsdp", devices=2, sync_timeout=30)
    procs = [launch(tmp_path, address, g, barrier=2, ckpt_dir=tmp_path / f"ckpt_g{g}",
                    die_at_step=H + 2 if g == 1 else -1, **opts) for g in range(2)]
    with killed_on_exit(procs):
        assert procs[1].wait(timeout=200) == -signal.SIGKILL, (tmp_path / "g1.log").read_text()[-3000:]
        assert wait_all([procs[0]], tmp_path, timeout=200) == [0]
        resume = tmp_path / "ckpt_g1" / f"step={H}.ckpt"
        procs.append(launch(tmp_path, address, 1, name="g1r", resume=resume, **opts))
        assert procs[2].wait(timeout=200) == 0, (tmp_path / "g1r.log").read_text()[-3000:]
    for g, steps in ((0, (H, 2 * H, 3 * H)), (1, (H,))):  # each job's own folders, one file per rank
        for s in steps:
            folder = tmp_path / f"ckpt_g{g}" / f"step={s}.ckpt"
            assert (folder / "meta.pt").is_file(), sorted(p.name for p in (tmp_path / f"ckpt_g{g}").iterdir())
            assert sorted(p.name for p in folder.glob("save-*/rank*.pt")) == ["rank00000.pt", "rank00001.pt"]
    killed, resumed = load(tmp_path, "g1"), [load(tmp_path, n) for n in ("g1r", "g1r_r1")]
    assert killed["killed"] and killed["global_step"] == H + 2
    assert resumed[0]["alone_at_start"] == (
        f"local SGD: group 'g1' found no live peer at the lighthouse {address}: it starts from its checkpoint "
        f"{resume} (step {H}) and trains alone until other groups join (they heal from it).")
    assert "found no live peer" in (tmp_path / "g1r.log").read_text()
    for d in resumed:
        assert d["start_step"] == H and d["healed"] == 0 and d["global_step"] == STEPS
        assert all(committed(d, s)["participants"] == 1 for s in (2 * H, 3 * H)), d["attempts"]
        # exactly the state it saved at step 4 (after that sync), gathered over the job's two ranks
        saved = next(p for s, p in killed["steps"] if s == H)
        assert all(torch.equal(d["start_params"][k], saved[k]) for k in d["start_params"])


@pytest.mark.slow
def test_ddp_job_of_two_ranks_healing_from_two_live_jobs_keeps_one_replica(tmp_path, lighthouse):
    """3 DDP jobs × 2 ranks with a stateful inner optimizer (SGD momentum); g2 is SIGKILLed and restarted. torchft heals
    its rank 0 from one live job and its rank 1 from the other, whose momentum buffers differ: the restarted job's two
    ranks must still hold one replica (same parameters after every step, same momentum at the end)."""
    address = lighthouse(2)
    opts = dict(outer="average", inner="momentum", devices=2, sync_timeout=30)
    procs = [launch(tmp_path, address, g, barrier=3, wait_for="g2r", wait_at_step=2 * H - 1,
                    die_at_step=H + 2 if g == 2 else -1, **opts) for g in range(3)]
    with killed_on_exit(procs):
        assert procs[2].wait(timeout=200) == -signal.SIGKILL, (tmp_path / "g2.log").read_text()[-3000:]
        procs.append(launch(tmp_path, address, 2, name="g2r", **opts))
        codes = wait_all([procs[0], procs[1], procs[3]], tmp_path, timeout=240)
    assert codes == [0, 0, 0], "\n".join((tmp_path / f"{n}.log").read_text()[-2000:] for n in ("g0", "g1", "g2r"))
    r0, r1 = load(tmp_path, "g2r"), load(tmp_path, "g2r_r1")
    assert r0["healed"] == r1["healed"] == 1 and r0["start_step"] == 2 * H
    for (s0, p0), (s1, p1) in zip(r0["steps"], r1["steps"]):
        assert s0 == s1 and all(torch.equal(p0[k], p1[k]) for k in p0), s0
    assert len(r0["inner_state"]) > 0
    for a, b in zip(r0["inner_state"], r1["inner_state"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    # the two live jobs' momentum really differed (so healing each rank from another job would show)
    g0, g1 = load(tmp_path, "g0"), load(tmp_path, "g1")
    assert any(not torch.equal(a["momentum_buffer"], b["momentum_buffer"])
               for a, b in zip(g0["inner_state"], g1["inner_state"]))


@pytest.mark.slow
def test_fsdp_job_resumed_from_its_folder_while_the_other_trains_heals_to_it(tmp_path, lighthouse):
    """2 FSDP2 jobs × 2 ranks with per-job checkpoints; g1 is SIGKILLed at step 6 and restarted from its own folder
    (step 4) while g0 keeps training: it loads its folder, then heals at g0's next sync (g0's state is newer), weighs 0
    there, and both end with identical full parameters; no job ever reads the other's folder."""
    address = lighthouse(1)
    opts = dict(outer="diloco", strategy="fsdp", devices=2, sync_timeout=30)
    procs = [launch(tmp_path, address, g, barrier=2, ckpt_dir=tmp_path / f"ckpt_g{g}", wait_for="g1r",
                    wait_at_step=2 * H - 1 if g == 0 else -1, die_at_step=H + 2 if g == 1 else -1, **opts)
             for g in range(2)]
    with killed_on_exit(procs):
        assert procs[1].wait(timeout=200) == -signal.SIGKILL, (tmp_path / "g1.log").read_text()[-3000:]
        procs.append(launch(tmp_path, address, 1, name="g1r", resume=tmp_path / "ckpt_g1" / f"step={H}.ckpt",
                            ckpt_dir=tmp_path / "ckpt_g1", **opts))
        codes = wait_all([procs[0], procs[2]], tmp_path, timeout=240)
    assert codes == [0, 0], "\n".join((tmp_path / f"{n}.log").read_text()[-2000:] for n in ("g0", "g1r"))
    assert "Restored all states from the checkpoint" in (tmp_path / "g1r.log").read_text()
    g0 = load(tmp_path, "g0")
    for n in ("g1r", "g1r_r1"):
        d = load(tmp_path, n)
        heal = committed(d, 2 * H)
        assert heal is not None and heal["healed"] and heal["weight"] == 0.0, d["attempts"]
        assert d["healed"] == 1 and d["start_step"] == 2 * H and d["alone_at_start"] is None
        assert all(torch.equal(d["final"][k], g0["final"][k]) for k in g0["final"])
    # the resumed job checkpoints on in its own folder, one file per rank: at step 12 (it healed to step 8 and
    # trained from there, so step 8 is not one of its steps)
    saved = sorted(p.name for p in (tmp_path / "ckpt_g1").iterdir())
    assert saved == [f"step={3 * H}.ckpt", f"step={H}.ckpt"], saved
    folder = tmp_path / "ckpt_g1" / f"step={3 * H}.ckpt"
    assert sorted(p.name for p in folder.glob("save-*/rank*.pt")) == ["rank00000.pt", "rank00001.pt"]
