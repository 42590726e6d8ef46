"""Warm-up, registered schedules and time-based token-weighted syncs across federated jobs (CPU, gloo).

The jobs are ``tests/workers/train_federated.py`` processes meeting at torchft's lighthouse, as in
``test_federated.py``. References by hand:

- warm-up: one process, one network; at each warm-up step the mean of the two jobs' gradients (each on its own batch)
  and one SGD step: synchronous data parallelism over both jobs;
- a registered schedule (``growing``: intervals H, H+1, H+2 after the warm-up): each job's inner SGD steps, then
  DiLoCo's outer step (Nesterov, lr 0.7, momentum 0.9) on the mean at each of the schedule's sync steps;
- time-based: at every sync, ``Σ_i w_i θ_i / Σ_i w_i`` over the θ_i the jobs sent, ``w_i`` = the tokens job ``i``
  processed since its previous sync (8 per step: batch 2 × 4 features).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchft")
from reference import initial_net
from test_federated import (group_batches, killed_on_exit, launch, lighthouse, load,  # noqa: F401 (lighthouse: a fixture)
                            run_jobs, wait_all)

ATOL = 1e-5
TOKENS_PER_STEP = 2 * 4


def params_after(dump: dict, step: int) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in next(p for s, p in dump["steps"] if s == step).items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


def sgd_step(net: torch.nn.Module, grads: list[dict[str, torch.Tensor]]) -> None:
    """One SGD step (lr 0.1, the tiny module's) with the mean of ``grads``."""
    with torch.no_grad():
        for k, p in net.named_parameters():
            p -= 0.1 * torch.stack([g[k] for g in grads]).mean(0)


def grad_of(net: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
    net.zero_grad()
    x, y = batch
    F.mse_loss(net(x), y).backward()
    return {k: p.grad.detach().clone() for k, p in net.named_parameters()}


def test_warmup_time_based_and_registered_schedules_are_accepted_with_a_lighthouse():
    from lightning_localsgd.config import LocalSGDConfig
    from lightning_localsgd.engine.schedules import TimeBasedSchedule

    config = LocalSGDConfig(lighthouse="h:29510", warmup_steps=10, sync_every_seconds=5)
    assert isinstance(config.build_schedule(), TimeBasedSchedule) and config.build_schedule().warmup_steps == 10
    assert LocalSGDConfig(lighthouse="h:29510", sync_schedule="periodic").build_schedule().sync_every == 64
    with pytest.raises(ValueError, match="cluster_size=2 is not supported with lighthouse="):
        LocalSGDConfig(lighthouse="h:29510", cluster_size=2, cluster_sync_every=128)  # refused: one job per cluster


def test_a_warmup_step_whose_vote_fails_is_not_applied():
    """The warm-up step's round without processes (torchft's manager scripted, as in test_retry): a step's gradient
    is the mean over the quorum; a step whose collective fails gets no gradient (the commit vote says no), so the
    optimizer leaves the parameters as they were, as torchft's OptimizerWrapper does; both rounds are recorded."""
    from datetime import timedelta

    from test_retry import FakeManager

    from lightning_localsgd.config import LocalSGDConfig
    from lightning_localsgd.controller import LocalSGDController
    from lightning_localsgd.federation import Federation, TorchftCommunicator

    fed = Federation("127.0.0.1:1", "g0", 1, 30.0)
    fed.manager = FakeManager([(2, True)])
    fed.comm = TorchftCommunicator(fed.manager, timedelta(seconds=30))

    # the controller alone talks to the federation: it opens and closes each warm-up round through its syncs
    controller = LocalSGDController(LocalSGDConfig(sync_every=4, warmup_steps=2), syncs=fed)
    controller.warmup_comm = fed.comm
    net = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5]])

    def closure():
        optimizer.zero_grad()
        loss = F.mse_loss(net(x), y)
        loss.backward()
        return loss

    def warmup_step() -> None:
        controller.step_start()
        optimizer.step(controller.warmup_closure(optimizer, closure))
        controller.schedule.step()

    before = [p.detach().clone() for p in net.parameters()]
    closure()
    mine = [p.grad.clone() for p in net.parameters()]
    peer = [torch.full_like(g, 0.25) for g in mine]
    fed.manager._pg.others = [torch.cat([g.reshape(-1) for g in peer])]
    warmup_step()
    after_first = [p.detach().clone() for p in net.parameters()]
    for b, a, g, h in zip(before, after_first, mine, peer):
        assert torch.allclose(a, b - 0.1 * (g + h) / 2, atol=1e-7)
    fed.manager._pg.fail = ConnectionError("Connection reset by peer")
    warmup_step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(after_first, net.parameters()))
    assert fed.manager.votes == [True, False]
    assert [(a["kind"], a["participants"], a["committed"]) for a in fed.attempts] == \
        [("warmup", 2, True), ("warmup", 2, False)]
    assert not controller.schedule.in_warmup


@pytest.mark.slow
def test_warmup_then_a_registered_schedule_across_two_jobs(tmp_path, lighthouse):
    """2 jobs, warmup_steps=3 then the registered ``growing`` schedule (syncs at steps 5, 8, 12), DiLoCo outside.
    Every warm-up step equals synchronous data parallelism over both jobs (one quorum and one commit per step, the
    first one the join's); every sync of the registered schedule equals the hand reference; both end identical."""
    warmup, h, steps = 3, 2, 12
    sync_steps = [5, 8, 12]  # intervals 2, 3, 4 after the warm-up
    dumps = run_jobs(tmp_path, lighthouse(2), 2, warmup_steps=warmup, schedule="growing", sync_every=h,
                     max_steps=steps, outer="diloco")

    # the reference: warm-up as one network on both jobs' mean gradient, then local SGD with DiLoCo at the syncs
    batches = {g: [b[0] for b in group_batches(dumps[g]["seed"])] for g in dumps}
    net = initial_net()
    expected: dict[int, dict[str, torch.Tensor]] = {}
    for s in range(warmup):
        sgd_step(net, [grad_of(net, batches[g][s]) for g in dumps])
        expected[s + 1] = {k: v.detach().clone() for k, v in net.named_parameters()}
    theta_g = {k: v.detach().clone() for k, v in net.named_parameters()}
    nets = {g: copy.deepcopy(net) for g in dumps}
    momentum: dict[str, torch.Tensor] = {}
    previous = warmup
    for s in sync_steps:
        for g, local in nets.items():
            for i in range(previous, s):
                sgd_step(local, [grad_of(local, batches[g][i])])
        for k, old in theta_g.items():
            mean = torch.stack([dict(nets[g].named_parameters())[k].detach() for g in dumps]).mean(0)
            delta = old - mean
            momentum[k] = delta.clone() if k not in momentum else 0.9 * momentum[k] + delta
            theta_g[k] = old - 0.7 * (delta + 0.9 * momentum[k])
        expected[s] = {k: v.clone() for k, v in theta_g.items()}
        for local in nets.values():
            with torch.no_grad():
                for k, p in local.named_parameters():
                    p.copy_(theta_g[k])
        previous = s

    for g, d in dumps.items():
        assert d["global_step"] == steps
        rounds = [a for a in d["attempts"] if a["kind"] == "warmup"]
        print(g, "warm-up rounds:", [(a["step"], a["participants"], round(a["seconds"], 3)) for a in rounds])
        assert [(a["step"], a["participants"], a["committed"]) for a in rounds] == \
            [(s, 2, True) for s in range(warmup)], d["attempts"]
        syncs = [a for a in d["attempts"] if a["kind"] == "sync"]
        assert [(a["step"], a["participants"], a["weight"], a["committed"]) for a in syncs] == \
            [(s, 2, 1.0, True) for s in sync_steps], d["attempts"]
        for s, ref in expected.items():
            diff = max_diff(params_after(d, s), ref)
            assert diff < ATOL, f"{g}: after step {s} off the hand reference by {diff:.3g}"
    assert all(torch.equal(dumps["g0"]["final"][k], dumps["g1"]["final"][k]) for k in dumps["g0"]["final"])
    # the jobs' batches really differ (a job averaging with itself would show) and they drift apart between syncs
    assert max_diff(params_after(dumps["g0"], warmup + 1), params_after(dumps["g1"], warmup + 1)) > 1e-4


def sync_records(dump: dict) -> list[tuple[dict, dict]]:
    """The committed syncs after the join, each with the reduce it sent (the job's θ_i going in)."""
    out = []
    for i, a in enumerate(dump["attempts"]):
        if a["kind"] == "sync" and a["committed"]:
            reduce = next(r for r in dump["reduces"] if r["attempt"] == i)
            out.append((a, reduce))
    return out


@pytest.mark.slow
def test_time_based_token_weighted_syncs_with_a_three_times_slower_job(tmp_path, lighthouse):
    """2 jobs, sync_every_seconds=1.0; g1 sleeps 3× as long per step as g0. Every sync's weights are the tokens each
    job processed since its previous sync, and its result is the token-weighted mean of what the jobs sent; the fast
    job waits for the slow one at most about one slow step per sync; g0 reaches max_steps, its last sync carries the
    stop, and both end with the same model."""
    fast_s, slow_s, period, steps = 0.1, 0.3, 1.0, 40
    dumps = run_jobs(tmp_path, lighthouse(2), 2, sync_every_seconds=period, max_steps=steps, outer="average",
                     g0={"step_sleep": fast_s}, g1={"step_sleep": slow_s})
    fast, slow = dumps["g0"], dumps["g1"]
    assert fast["global_step"] == steps and slow["global_step"] <= 0.6 * steps, (fast["global_step"],
                                                                              slow["global_step"])
    fs, ss = sync_records(fast), sync_records(slow)
    assert len(fs) == len(ss) >= 3, (fast["attempts"], slow["attempts"])
    previous = {"g0": 0, "g1": 0}
    unequal = False
    for k, ((fa, fr), (sa, sr)) in enumerate(zip(fs, ss)):
        weights = []
        for name, (a, _) in (("g0", (fa, fr)), ("g1", (sa, sr))):
            assert a["weight"] == TOKENS_PER_STEP * (a["step"] - previous[name]), (name, k, a)
            assert a["participants"] == 2
            previous[name] = a["step"]
            weights.append(a["weight"])
        unequal |= weights[0] != weights[1]
        expected = {n: (weights[0] * fr["params"][n] + weights[1] * sr["params"][n]) / sum(weights)
                    for n in fr["params"]}
        for name, a in (("g0", fa), ("g1", sa)):
            # the stopping sync runs at the train end, after the step's own record: the final parameters
            got = dumps[name]["final"] if k == len(fs) - 1 else \
                {f"model.{n}": v for n, v in params_after(dumps[name], a["step"]).items()}
            diff = max(float((got[n] - expected[n]).abs().max()) for n in expected)
            assert diff < ATOL, f"{name}: sync {k} (step {a['step']}) off the token-weighted mean by {diff:.3g}"
    assert unequal, "no sync mixed unequal weights"
    # the stop: g0's last sync asked for it, both jobs' last syncs were that one, and they end identical
    assert fs[-1][0]["stop"] is True and fast["global_step"] == fs[-1][0]["step"]
    assert slow["global_step"] == ss[-1][0]["step"]
    assert all(torch.equal(fast["final"][n], slow["final"][n]) for n in fast["final"])
    # the fast job waits for the slow one at most one slow step (+ quorum ticks, the sync, 2 shared cores) per sync;
    # its last, stopping sync waits for the slow job's next timed sync (as in one world)
    for name, d in dumps.items():
        print(name, [(a["step"], round(a["quorum_seconds"], 3), round(a["seconds"], 3)) for a, _ in sync_records(d)])
    waits = [a["quorum_seconds"] for a, _ in fs[:-1]]
    print("fast job's waits in the quorum:", [round(w, 3) for w in waits], "slow:",
          [round(a["quorum_seconds"], 3) for a, _ in ss])
    assert max(waits) < slow_s + 0.6, waits
    assert fast["dropped"] == 0.0 and slow["dropped"] == 0.0


@pytest.mark.slow
def test_time_based_jobs_of_one_group_each_validate_during_fit(tmp_path, lighthouse):
    """2 jobs of one rank, sync_every_seconds=0.5, g1 3× slower per step, a validation loop every 3 steps (Lightning's
    default kind of fit): a job of one worker group is its own world, so validation's collectives pair up with nobody
    else's and it is not refused (one world with two groups refuses it: test_time_based.py). Both jobs validate, every
    sync is the token-weighted mean of what the jobs sent, and they end identical."""
    steps = 16
    dumps = run_jobs(tmp_path, lighthouse(2), 2, sync_every_seconds=0.5, max_steps=steps, outer="average",
                     validate_every=3, g0={"step_sleep": 0.05}, g1={"step_sleep": 0.15})
    fast, slow = dumps["g0"], dumps["g1"]
    assert fast["global_step"] == steps and slow["global_step"] < steps, (fast["global_step"], slow["global_step"])
    assert fast["validation_batches"] >= 2 * (steps // 3) and slow["validation_batches"] >= 2
    fs, ss = sync_records(fast), sync_records(slow)
    assert len(fs) == len(ss) >= 2, (fast["attempts"], slow["attempts"])
    previous = {"g0": 0, "g1": 0}
    for k, ((fa, fr), (sa, sr)) in enumerate(zip(fs, ss)):
        for name, a in (("g0", fa), ("g1", sa)):
            assert a["weight"] == TOKENS_PER_STEP * (a["step"] - previous[name]), (name, k, a)
            previous[name] = a["step"]
        weights = [fa["weight"], sa["weight"]]
        if k < len(fs) - 1 and sum(weights) > 0:  # the stopping sync's result is the final model (checked below)
            expected = {n: (weights[0] * fr["params"][n] + weights[1] * sr["params"][n]) / sum(weights)
                        for n in fr["params"]}
            for name, a in (("g0", fa), ("g1", sa)):
                got = params_after(dumps[name], a["step"])
                diff = max(float((got[n.removeprefix("model.")] - expected[n]).abs().max()) for n in expected)
                assert diff < ATOL, f"{name}: sync {k} (step {a['step']}) off the token-weighted mean by {diff:.3g}"
    assert fs[-1][0]["stop"] is True
    assert all(torch.equal(fast["final"][n], slow["final"][n]) for n in fast["final"])


@pytest.mark.slow
def test_time_based_streaming_across_a_fast_and_a_three_times_slower_job(tmp_path, lighthouse):
    """2 jobs, sync_every_seconds=1.0 in 2 fragments (one fragment's sync every 0.5 s, in turn), τ=1; g1 sleeps 3× as
    long per step as g0. Each fragment's sync is its own quorum and commit; its weights are the tokens each job
    processed since that fragment's previous sync; the fragment's values one step later (the job's own step) are the
    token-weighted mean of what the jobs sent. g0 finishes first: its stop rides on the next fragment's sync, then
    both jobs sync each fragment once more, and they end identical."""
    from reference import reference_fragments

    fast_s, slow_s, steps, fragments = 0.1, 0.3, 40, 2
    dumps = run_jobs(tmp_path, lighthouse(2), 2, sync_every_seconds=1.0, fragments=fragments, overlap_steps=1,
                     max_steps=steps, outer="average", g0={"step_sleep": fast_s}, g1={"step_sleep": slow_s})
    net = initial_net()
    names = [k for k, _ in net.named_parameters()]
    runs = reference_fragments(names, [p.numel() for p in net.parameters()], fragments)
    fast, slow = dumps["g0"], dumps["g1"]
    assert fast["global_step"] == steps and slow["global_step"] <= 0.6 * steps
    fs, ss = sync_records(fast), sync_records(slow)
    order = [a["fragment"] for a, _ in fs]
    assert order == [a["fragment"] for a, _ in ss] and len(order) >= 3 * fragments, (fast["attempts"], slow["attempts"])
    regular, end = order[:-fragments - 1], order[-fragments - 1:]
    assert regular == [k % fragments for k in range(len(regular))]
    assert end == [len(regular) % fragments, *range(fragments)]  # the stop, then each fragment once more
    assert fs[-fragments - 1][0]["stop"] is True and all(a["participants"] == 2 for a, _ in fs + ss)
    previous = {"g0": [0] * fragments, "g1": [0] * fragments}
    unequal = False
    for k, ((fa, fr), (sa, sr)) in enumerate(zip(fs, ss)):
        f = fa["fragment"]
        weights = []
        for name, a in (("g0", fa), ("g1", sa)):
            assert a["fragment"] == f and a["weight"] == TOKENS_PER_STEP * (a["step"] - previous[name][f]), (name, k, a)
            previous[name][f] = a["step"]
            weights.append(a["weight"])
        unequal |= weights[0] != weights[1] and min(weights) > 0
        if sum(weights) == 0:
            continue
        expected = {n: (weights[0] * fr["params"][f"model.{n}"] + weights[1] * sr["params"][f"model.{n}"]) / sum(weights)
                    for n in runs[f]}
        last_of_fragment = k >= len(fs) - fragments
        for name, a in (("g0", fa), ("g1", sa)):
            if k >= len(regular) and not last_of_fragment:
                continue  # the stopping sync: overwritten by the fragment's last sync at the end, checked there
            # a regular sync is applied one of the job's own steps later; the end's last syncs give the final model
            got = {n.removeprefix("model."): v for n, v in dumps[name]["final"].items()} if last_of_fragment else \
                params_after(dumps[name], a["step"] + 1)
            diff = max(float((got[n] - expected[n]).abs().max()) for n in expected)
            assert diff < ATOL, f"{name}: sync {k} (fragment {f}, step {a['step']}) off the weighted mean by {diff:.3g}"
    assert unequal, "no sync mixed unequal weights"
    assert all(torch.equal(fast["final"][n], slow["final"][n]) for n in fast["final"])
    # the fast job waits in a fragment's quorum at most about one slow step (+ quorum ticks, 2 shared cores)
    waits = [a["quorum_seconds"] for a, _ in fs[:len(regular)]]
    print("fast job's waits in the quorum:", [round(w, 3) for w in waits])
    assert max(waits) < slow_s + 0.6, waits
    assert fast["dropped"] == 0.0 and slow["dropped"] == 0.0


@pytest.mark.slow
def test_job_killed_inside_a_warmup_step_does_not_stop_the_other(tmp_path, lighthouse):
    """2 jobs, warmup_steps=4; g1 SIGKILLs itself inside the gradient all-reduce of the third warm-up step. g0: that
    step's vote fails, so it is not applied (the parameters stay those after step 2); the next step's quorum holds
    g0 alone and its mean gradient is g0's own; g0 trains on to max_steps. Reference by hand."""
    import signal

    warmup, steps = 4, 8
    address = lighthouse(1)
    procs = [launch(tmp_path, address, g, barrier=2, warmup_steps=warmup, sync_every=2, max_steps=steps,
                    die_in_sync_at_step=2 if g == 1 else -1) for g in range(2)]
    with killed_on_exit(procs):
        assert procs[1].wait(timeout=150) == -signal.SIGKILL, (tmp_path / "g1.log").read_text()[-3000:]
        assert wait_all(procs[:1], tmp_path) == [0], (tmp_path / "g0.log").read_text()[-3000:]
    d, killed = load(tmp_path, "g0"), load(tmp_path, "g1")
    rounds = [a for a in d["attempts"] if a["kind"] == "warmup"]
    print("g0 warm-up rounds:", [(a["step"], a["participants"], a["committed"], round(a["seconds"], 2))
                                 for a in rounds])
    assert [(a["step"], a["participants"], a["committed"]) for a in rounds] == \
        [(0, 2, True), (1, 2, True), (2, 2, False), (3, 1, True)], d["attempts"]
    assert killed["killed"] and d["global_step"] == steps

    batches = {g: [b[0] for b in group_batches(g)] for g in range(2)}
    net = initial_net()
    for s in range(2):  # both jobs
        sgd_step(net, [grad_of(net, batches[g][s]) for g in range(2)])
    assert max_diff(params_after(d, 2), dict(net.named_parameters())) < ATOL
    assert max_diff(params_after(d, 3), params_after(d, 2)) == 0.0  # the failed step is not applied
    for s in range(3, steps):  # g0 alone: its own gradient in warm-up, then local SGD over a quorum of one
        sgd_step(net, [grad_of(net, batches[0][s])])
    assert max_diff(d["final"], {f"model.{k}": v for k, v in net.named_parameters()}) < ATOL


@pytest.mark.slow
def test_time_based_job_joining_late_heals_weighs_zero_then_its_tokens(tmp_path, lighthouse):
    """Time-based syncs, g0 (fast) and g1 (3× slower) start together; g2 starts once they trained (g0 waits for it
    at step 15). g2 heals at its first quorum and weighs 0 there (it sends the stop flag's slot too, so the reduce
    matches the others'); every later sync is the token-weighted mean over the three; all end identical."""
    import time

    address = lighthouse(2)
    common = dict(sync_every_seconds=1.0, max_steps=40, outer="average")
    procs = [launch(tmp_path, address, 0, barrier=2, step_sleep=0.1, wait_for="g2", wait_at_step=15, **common),
             launch(tmp_path, address, 1, barrier=2, step_sleep=0.3, **common)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready_g{g}").exists() for g in range(2)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.5)  # past their join
    procs.append(launch(tmp_path, address, 2, step_sleep=0.2, **common))
    with killed_on_exit(procs):
        assert wait_all(procs, tmp_path) == [0, 0, 0], \
            "\n".join((tmp_path / f"g{g}.log").read_text()[-2000:] for g in range(3))
    dumps = {f"g{g}": load(tmp_path, f"g{g}") for g in range(3)}
    joined = next(a for a in dumps["g2"]["attempts"] if a["kind"] == "join" and a["committed"])
    assert joined["healed"] and joined["weight"] == 0.0 and joined["participants"] == 3, dumps["g2"]["attempts"]
    assert dumps["g2"]["healed"] == 1 and dumps["g2"]["dropped"] == 0.0
    # the syncs of the three jobs, in quorum order from g2's join on (g2's first one is its join)
    per_job = {}
    for name, d in dumps.items():
        records = [(i, a) for i, a in enumerate(d["attempts"]) if a["committed"] and a["kind"] in ("join", "sync")
                   and a["participants"] == 3]
        per_job[name] = [(a, next(r for r in d["reduces"] if r["attempt"] == i)) for i, a in records]
    counts = {name: len(v) for name, v in per_job.items()}
    assert len(set(counts.values())) == 1 and counts["g0"] >= 3, (counts, dumps["g0"]["attempts"])
    for k in range(counts["g0"]):
        weights = [per_job[n][k][0]["weight"] for n in dumps]
        assert (k == 0) == (weights[2] == 0.0), weights  # g2 weighs 0 only in its join
        if k > 0:
            for n in dumps:
                previous = per_job[n][k - 1][0]["step"]
                assert per_job[n][k][0]["weight"] == TOKENS_PER_STEP * (per_job[n][k][0]["step"] - previous)
        expected = {p: sum(w * per_job[n][k][1]["params"][p] for w, n in zip(weights, dumps)) / sum(weights)
                    for p in per_job["g0"][k][1]["params"]}
        last = k == counts["g0"] - 1
        for n, d in dumps.items():
            if last:
                got = d["final"]
            elif per_job[n][k][0]["kind"] == "join":  # g2's join at on_train_start: its parameters at its first step
                got = d["start_params"]
            else:
                got = {f"model.{p}": v for p, v in params_after(d, per_job[n][k][0]["step"]).items()}
            diff = max(float((got[p] - expected[p]).abs().max()) for p in expected)
            assert diff < ATOL, f"{n}: sync {k} off the token-weighted mean by {diff:.3g}"
    for n in ("g1", "g2"):
        assert all(torch.equal(dumps[n]["final"][p], dumps["g0"]["final"][p]) for p in dumps["g0"]["final"])


def test_the_stopping_sync_waits_until_the_others_are_due(monkeypatch):
    """A group that finishes right after a timed sync does not ask for its stopping sync at once: the others, whose
    clocks restarted at that sync, enter their next one only when it is due, and a federated quorum holds only the
    jobs that ask within the lighthouse's join timeout. It waits until its own interval is due, then syncs."""
    import lightning_localsgd.controller as controller_module
    from lightning_localsgd.config import LocalSGDConfig
    from lightning_localsgd.controller import LocalSGDController

    now = [100.0]
    controller = LocalSGDController(LocalSGDConfig(sync_every_seconds=30.0))
    controller.schedule.clock = lambda: now[0]
    controller.schedule.synced()  # the last sync ended at t=100
    now[0] = 112.0  # training ends 12 s later
    assert controller.schedule.seconds_until_due() == 18.0
    events = []

    def sleep(seconds):
        events.append(("sleep", seconds))
        now[0] += seconds

    monkeypatch.setattr(controller_module.time, "sleep", sleep)
    controller.outer_sync = object()  # set up (its sync is replaced below)
    controller.timed_sync = lambda stop: events.append(("sync", now[0], stop))
    controller.train_end()
    assert events == [("sleep", 18.0), ("sync", 130.0, True)]  # the stop goes out when the others are due
    now[0] = 200.0  # past due: no wait
    assert controller.schedule.seconds_until_due() == 0.0
