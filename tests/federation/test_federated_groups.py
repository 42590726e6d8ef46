"""Several worker groups per federated job: two-stage sync where the cluster is the job (CPU, gloo).

Each job (``tests/workers/train_federated.py``) holds ``world / group_size`` worker groups (DDP inside each) that sync
inside the job every ``sync_every`` steps over the job's own process groups (level 1), and the jobs sync every
``cluster_sync_every`` steps through torchft (level 2). The reference is the one-world two-stage reference
(``reference.simulate_two_stage``) with every job a cluster reading its own data order.
"""

from __future__ import annotations

import math
import signal

import pytest
import torch

pytest.importorskip("torchft")  # the [ft] extra; installed with [dev]
from reference import simulate_two_stage
from test_federated import (committed, group_batches, launch, lighthouse, load, params_at,  # noqa: F401 (fixture)
                            killed_on_exit, wait_all)

ATOL = 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_two_jobs_of_two_groups_match_the_two_stage_reference(tmp_path, lighthouse, monkeypatch,  # noqa: F811
                                                              strategy):
    """2 jobs × 4 ranks, group_size=2: 2 groups of 2 ranks per job (DDP, FSDP2 or ZeRO-2 inside each group), H1=2
    inside the job, H2=4 across jobs (DiLoCo at both levels). After every step each rank's parameters equal its
    group's in the hand reference; each job's ranks send one copy of the model per level-2 sync (rank r reduces a
    quarter: its piece of its group's slice, shard or partition of θ_c; ZeRO's partitions are zero-padded)."""
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (the fork server's)
    jobs, ranks, group_size, H1, H2, steps = 2, 4, 2, 2, 4, 8
    address = lighthouse(2)
    opts = dict(devices=ranks, group_size=group_size, sync_every=H1, cluster_sync_every=H2, max_steps=steps,
                outer="diloco", cluster_outer="diloco", barrier=jobs, strategy=strategy)
    procs = [launch(tmp_path, address, j, fork_ranks=True, **opts) for j in range(jobs)]
    with killed_on_exit(procs):
        codes = wait_all(procs, tmp_path, timeout=300)
    assert codes == [0] * jobs, "\n".join((tmp_path / f"g{j}.log").read_text()[-3000:] for j in range(jobs))
    dumps = {(j, r): load(tmp_path, f"g{j}" if r == 0 else f"g{j}_r{r}") for j in range(jobs) for r in range(ranks)}

    # the reference: job j is cluster j; its group i reads the job's sampler ranks i·S .. i·S + S - 1 (seed j)
    groups_per_job = ranks // group_size
    batches = []
    for j in range(jobs):
        per_step = group_batches(j, ranks=ranks)
        batches += [[step[i * group_size:(i + 1) * group_size] for step in per_step] for i in range(groups_per_job)]
    history, final = simulate_two_stage(jobs * ranks, groups_per_job, H1, H2, "diloco", "diloco", steps,
                                        group_size=group_size, batches=batches)
    numel = sum(v.numel() for v in final[0].values())
    for (j, r), d in dumps.items():
        g = j * groups_per_job + r // group_size
        assert (d["group_size"], d["cluster_size"]) == (group_size, groups_per_job)
        assert [s for s, _ in d["steps"]] == list(range(1, steps + 1))
        for b, (_, got) in enumerate(d["steps"]):
            got = {k.removeprefix("model."): v for k, v in got.items()}
            diff = max(float((got[k] - history[b][g][k]).abs().max()) for k in got)
            assert diff < ATOL, f"job {j} rank {r} after step {b + 1}: off the reference by {diff:.3g}"
        # level 1 every H1 steps; level 2 every H2 steps and once at the join (weight 0 everywhere: no outer step)
        assert (d["num_syncs"], d["cluster_syncs"]) == (steps // H1, steps // H2 + 1)
        # the level-2 syncs (and the join at step 0) went through the lighthouse's quorum, both jobs weighing 1
        assert [a["step"] for a in d["attempts"] if a["committed"]] == [0, *range(H2, steps + 1, H2)], d["attempts"]
        assert all(committed(d, s)["participants"] == jobs and committed(d, s)["weight"] == 1.0
                   for s in range(H2, steps + 1, H2))
    for j in range(jobs):  # the job's ranks hold disjoint level-2 pieces making one copy of the model
        pieces = [sum(t.numel() for t in dumps[j, r]["cluster_snapshot"]) for r in range(ranks)]
        if strategy == "deepspeed":  # one copy of the group's two zero-padded partitions (a multiple of 2 × 2)
            assert sum(pieces) == 4 * math.ceil(numel / 4) and min(pieces) > 0, pieces
        else:
            assert sum(pieces) == numel and min(pieces) > 0, pieces
        # so the level-2 bytes of a job are one fp32 copy of the model (plus each rank's weight) per level-2 sync
        sent = sum(dumps[j, r]["cluster_bytes"] for r in range(ranks))
        assert sent == (steps // H2 + 1) * 4 * (sum(pieces) + ranks), sent
    # the groups really drift apart between syncs, inside a job and across jobs (so a wrong mean would show)
    first = history[0]
    assert max(float((first[0][k] - first[1][k]).abs().max()) for k in first[0]) > 1e-4
    assert max(float((first[0][k] - first[2][k]).abs().max()) for k in first[0]) > 1e-4


@pytest.mark.slow
def test_restarted_job_of_two_groups_heals_both_levels(tmp_path, lighthouse):  # noqa: F811
    """2 jobs × 2 ranks, group_size=1 (2 groups of 1 rank per job), H1=2, H2=4, DiLoCo at both levels. g1 is SIGKILLed
    at step 6 (after a level-1 sync, mid level-2 interval) and restarted with the same group_id: at g0's level-2 sync
    of step 8 it heals rank by rank from g0 — the model, θ_c and level 1's momentum, its piece of θ_g and level 2's
    momentum, the counters — and both jobs then end identical, both levels' states included."""
    H1, H2, steps = 2, 4, 12
    address = lighthouse(2)
    opts = dict(devices=2, group_size=1, sync_every=H1, cluster_sync_every=H2, max_steps=steps, outer="diloco",
                cluster_outer="diloco")
    procs = [launch(tmp_path, address, j, barrier=2, wait_for="g1r", wait_at_step=2 * H2 - 1,
                    die_at_step=H2 + H1 if j == 1 else -1, **opts) for j in range(2)]
    with killed_on_exit(procs):
        assert procs[1].wait(timeout=200) == -signal.SIGKILL, (tmp_path / "g1.log").read_text()[-3000:]
        procs.append(launch(tmp_path, address, 1, name="g1r", **opts))  # the same group_id, a fresh job
        codes = wait_all([procs[0], procs[2]], tmp_path, timeout=200)
    assert codes == [0, 0], "\n".join((tmp_path / f"{n}.log").read_text()[-3000:] for n in ("g0", "g1r"))
    dump = {(name, r): load(tmp_path, name if r == 0 else f"{name}_r{r}") for name in ("g0", "g1", "g1r")
            for r in range(2)}
    for r in range(2):
        live, killed, healed = dump["g0", r], dump["g1", r], dump["g1r", r]
        assert killed["killed"] and killed["global_step"] == H2 + H1
        assert live["healed"] == 0 and live["global_step"] == steps
        assert committed(live, 2 * H2)["participants"] == 2 and committed(live, 2 * H2)["weight"] == 1.0
        heal = committed(healed, 2 * H2)
        assert heal is not None and heal["healed"] and heal["weight"] == 0.0, healed["attempts"]
        assert healed["healed"] == 1 and healed["start_step"] == 2 * H2 and healed["global_step"] == steps
        # before its first inner step: the live job's rank r after the sync of step 8
        start = {k.removeprefix("model."): v for k, v in healed["start_params"].items()}
        assert all(torch.equal(start[k], params_at(live, 2 * H2)[k]) for k in start)
        assert (healed["num_syncs"], healed["cluster_syncs"]) == (live["num_syncs"], live["cluster_syncs"])
        # healed, before its first inner step, both levels' states are the live job's rank r after step 8: θ_c
        # slice and level 1's momentum, θ_g piece and level 2's momentum, the syncs counted
        after_heal = dict(live["engines"])[2 * H2]
        for level in ("outer", "cluster"):
            got, want = healed["start_engines"][level], after_heal[level]
            assert all(torch.equal(x, y) for x, y in zip(got["snapshot"], want["snapshot"])), level
            momenta = [(got["outer_optimizer"]["state"][k]["momentum_buffer"], v["momentum_buffer"])
                       for k, v in want["outer_optimizer"]["state"].items()]
            assert momenta and all(torch.equal(x, y) for x, y in momenta), level
            assert max(float(y.abs().max()) for _, y in momenta) > 0  # the momentum a fresh start would lack
            assert got["num_syncs"] == want["num_syncs"] > 0
        # and both jobs end identical after the level-2 sync of step 12 (level 1's momentum is each job's own)
        assert all(torch.equal(healed["final"][k], live["final"][k]) for k in live["final"])
        assert all(torch.equal(x, y) for x, y in zip(healed["snapshot"], live["snapshot"]))
        assert all(torch.equal(x, y) for x, y in zip(healed["cluster_snapshot"], live["cluster_snapshot"]))
        assert all(torch.equal(healed["cluster_state"]["state"][k]["momentum_buffer"], v["momentum_buffer"])
                   for k, v in live["cluster_state"]["state"].items())
    assert all(torch.equal(dump["g0", 1]["final"][k], dump["g0", 0]["final"][k]) for k in dump["g0", 0]["final"])
    # the job's two groups really differ between syncs (rank 0 and rank 1 after step 1)
    first = [params_at(dump["g0", r], 1) for r in range(2)]
    assert max(float((first[0][k] - first[1][k]).abs().max()) for k in first[0]) > 1e-4
