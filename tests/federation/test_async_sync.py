"""Syncs that nobody waits for (``async_sync=True``): the federated sync runs beside training, its result is applied
at the first step end after it finished by the one-step-delayed rule with the local progress kept:
``θ_i ← θ_g_new + (θ_i − θ_i_sent)``.

References written out here: the outer step by hand (exact mean / DiLoCo's Nesterov SGD, lr 0.7, momentum 0.9) on
the token-weighted mean of what the jobs sent, and each job's inner SGD step (lr 0.1) on its own batch; compressed
syncs (int8's two-phase exchange, topk_test's all-gather, with error feedback) by tests/reference.py's
``weighted_compressed_sync``.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchft")
from reference import initial_net
from test_federated import group_batches, lighthouse, run_jobs  # noqa: F401 (lighthouse: a fixture)
from test_retry import FakeManager

from lightning_localsgd.background import BackgroundFederation
from lightning_localsgd.config import LocalSGDConfig
from lightning_localsgd.engine import OuterSync
from lightning_localsgd.engine.presets import resolve_outer_optimizer
from lightning_localsgd.federation import TorchftCommunicator

ATOL = 1e-5
TOKENS_PER_STEP = 2 * 4


class GatedManager(FakeManager):
    """A scripted manager whose quorum forms only when the test lets the other job "arrive" (``arrive.set()``)."""

    def __init__(self, script):
        super().__init__(script)
        self.arrive = threading.Event()

    def start_quorum(self, timeout=None):
        assert self.arrive.wait(30), "the test never let the peer arrive"
        super().start_quorum(timeout)


def test_the_background_sync_applies_the_delayed_update_and_keeps_the_local_progress():
    """One job with a scripted peer (weight 1, θ_p = [3, 4]) and DiLoCo outside. The sync starts with θ_i = [1, 2]
    (weight 3) and waits in its quorum for the peer; meanwhile the training thread takes a "step" (θ_i += [0.5,
    -0.25]) and polls without waiting. Once the peer arrived, the next poll applies θ_g_new by hand and keeps the
    step: θ_i = θ_g_new + [0.5, -0.25]. Fails without the background thread (launch would block in the quorum) and
    without the rule (θ_i would be θ_g_new)."""
    fed = BackgroundFederation("127.0.0.1:1", "g0", 1, 30.0)
    fed.manager = GatedManager([(2, True)])
    fed.comm = TorchftCommunicator(fed.manager, timedelta(seconds=30))
    fed._training_thread = threading.get_ident()
    param = torch.nn.Parameter(torch.tensor([0.0, 0.0]))
    engine = OuterSync([param], cross_group=fed.comm, outer_optimizer=resolve_outer_optimizer("diloco"))
    fed.engine = engine
    with torch.no_grad():
        param.copy_(torch.tensor([1.0, 2.0]))
    fed.manager._pg.others = [torch.tensor([3.0, 4.0, 1.0, 0.0])]  # the peer's w·θ_p, w and its stop flag
    fed.trained = True

    began = time.monotonic()
    assert fed.launch(engine, weight=3.0, stop=False)
    assert time.monotonic() - began < 1.0  # the training thread does not wait for the quorum
    assert not fed.launch(engine, weight=1.0) and fed.deferred == 1  # one sync in flight at a time
    with torch.no_grad():
        param.add_(torch.tensor([0.5, -0.25]))  # an inner step beside the sync
    assert fed.poll(engine) is None  # not done: nothing applied, no waiting
    assert torch.equal(param.detach(), torch.tensor([1.5, 1.75]))

    fed.manager.arrive.set()
    deadline = time.monotonic() + 10
    result = None
    while result is None:
        assert time.monotonic() < deadline
        result = fed.poll(engine)
        time.sleep(0.01)
    mean = (3.0 * torch.tensor([1.0, 2.0]) + torch.tensor([3.0, 4.0])) / 4.0
    delta = torch.zeros(2) - mean  # θ_g − mean
    theta_g_new = torch.zeros(2) - 0.7 * (delta + 0.9 * delta)  # Nesterov, first step: momentum buffer = Δ
    assert torch.allclose(engine.snapshot[0].detach(), theta_g_new, atol=1e-6)
    assert torch.allclose(param.detach(), theta_g_new + torch.tensor([0.5, -0.25]), atol=1e-6)
    assert engine.tensors[0] is param  # the engine is back on the live parameter
    assert not result.stop_requested and fed.attempts[-1]["committed"] and fed.attempts[-1]["weight"] == 3.0


def test_async_sync_is_refused_where_it_is_not_supported():
    with pytest.raises(ValueError, match="async_sync=True runs the sync across federated jobs"):
        LocalSGDConfig(async_sync=True, sync_every_seconds=1.0)
    with pytest.raises(ValueError, match="async_sync=True needs time-based syncs"):
        LocalSGDConfig(async_sync=True, lighthouse="h:29510")
    with pytest.raises(ValueError, match="async_sync=True needs time-based syncs"):
        LocalSGDConfig(async_sync=True, lighthouse="h:29510", sync_every_seconds=1.0, sync_schedule="periodic")
    with pytest.raises(ValueError, match="does not combine with streaming"):
        LocalSGDConfig(async_sync=True, lighthouse="h:29510", sync_every_seconds=1.0, fragments=2)
    with pytest.raises(ValueError, match="async_sync=True does not combine with data_jobs"):
        LocalSGDConfig(async_sync=True, lighthouse="h:29510", sync_every_seconds=1.0, data_jobs=2, data_job_index=0)
    with pytest.raises(ValueError, match="on_nonfinite='skip'"):
        LocalSGDConfig(async_sync=True, lighthouse="h:29510", sync_every_seconds=1.0, on_nonfinite="skip")
    with pytest.raises(ValueError, match="async_sync must be True or False"):
        LocalSGDConfig(async_sync="yes", lighthouse="h:29510", sync_every_seconds=1.0)
    from lightning_localsgd import LocalSGDFSDPStrategy

    with pytest.raises(ValueError, match="LocalSGDStrategy jobs of one rank only"):
        LocalSGDFSDPStrategy(async_sync=True, lighthouse="h:29510", sync_every_seconds=1.0)
    LocalSGDConfig(async_sync=True, lighthouse="h:29510", sync_every_seconds=1.0, compression="int8", warmup_steps=2)


def test_async_sync_refuses_a_job_of_several_ranks_before_it_connects():
    """A DDP job of two ranks: refused when the federation starts (the job's world is known there), naming the reason
    and the fix, before torchft's Manager exists (nothing connected, nothing to shut down)."""
    from lightning_localsgd.syncs import HostFacts

    fed = BackgroundFederation("127.0.0.1:1", "g0", 1, 30.0)
    host = HostFacts(rank=0, world_size=2, training_state=lambda: None)
    with pytest.raises(ValueError, match=r"jobs of one rank only, this job has 2: .*agree on the step end .*"
                                         r"Run one rank per job, or leave async_sync=False"):
        fed.start(None, LocalSGDConfig(), host)
    assert fed.manager is None


def params_after(dump: dict, step: int) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in next(p for s, p in dump["steps"] if s == step).items()}


def inner_step(params: dict[str, torch.Tensor], batch) -> dict[str, torch.Tensor]:
    """One SGD step (lr 0.1, the tiny module's) from ``params`` on ``batch``, by hand."""
    net = initial_net()
    with torch.no_grad():
        for k, p in net.named_parameters():
            p.copy_(params[k])
    x, y = batch
    F.mse_loss(net(x), y).backward()
    return {k: (p - 0.1 * p.grad).detach() for k, p in net.named_parameters()}


def syncs_of(dump: dict) -> list[dict]:
    return [a for a in dump["attempts"] if a["kind"] == "sync" and a["committed"]]


@pytest.mark.slow
def test_two_jobs_async_syncs_match_the_delayed_update_reference(tmp_path, lighthouse):
    """2 jobs of one rank, 2 warm-up steps, then sync_every_seconds=0.4 with async_sync=True, g1 3× slower per step,
    outer "average". For every sync: the weights are the tokens each job processed since its previous sync started; θ_g_new is the token-weighted
    mean of what the jobs sent (their parameters at the step end the sync started); each job applied it at a later
    step end, the fast one after taking steps beside it (nobody waited), by the delayed rule with the local progress
    kept, checked against one inner step by hand from the parameters before that step. g0 reaches max_steps, its
    last sync (on its training thread, after the one in flight is applied) carries the stop; both end on θ_g_new of
    that sync. Fails without async_sync (no sync is applied later than it started) and without the rule."""
    dumps = run_two_uneven_jobs(tmp_path, lighthouse(2))
    assert_the_delayed_update_reference(dumps)


#: run_two_uneven_jobs: per-step sleeps of the fast and the slow job, the sync period, max_steps, warm-up steps
FAST_S, SLOW_S, PERIOD, STEPS, WARMUP = 0.05, 0.15, 0.4, 40, 2


def run_two_uneven_jobs(out, address: str, jobs: int = 2, **options) -> dict[str, dict]:
    """The run of the delayed-update reference test: g1 3× slower per step than g0, ``options`` on top (a third job:
    g2's options, at g0's pace)."""
    paces = (("g0", FAST_S), ("g1", SLOW_S), ("g2", FAST_S))[:jobs]
    per_job = {g: {"step_sleep": s, **options.pop(g, {})} for g, s in paces}
    return run_jobs(out, address, jobs, sync_every_seconds=PERIOD, max_steps=STEPS, outer="average", async_sync=True,
                    warmup_steps=WARMUP, **options, **per_job)


def assert_the_delayed_update_reference(dumps: dict[str, dict]) -> None:
    """The checks of :func:`test_two_jobs_async_syncs_match_the_delayed_update_reference` on its run's dumps."""
    steps, warmup = STEPS, WARMUP
    fast, slow = dumps["g0"], dumps["g1"]
    assert fast["global_step"] == steps and slow["global_step"] < steps
    for d in (fast, slow):  # the warm-up steps ran on the training thread, one round each over both jobs
        rounds = [a for a in d["attempts"] if a["kind"] == "warmup"]
        assert [(a["step"], a["participants"], a["committed"]) for a in rounds] == [(s, 2, True) for s in range(warmup)]
    fs, ss = syncs_of(fast), syncs_of(slow)
    assert len(fs) == len(ss) >= 3, (fast["attempts"], slow["attempts"])
    batches = {g: [b[0] for b in group_batches(d["seed"])] for g, d in (("g0", fast), ("g1", slow))}
    previous = {"g0": warmup, "g1": warmup}  # the tokens count from the end of the warm-up
    beside = 0
    for k, pair in enumerate(zip(fs, ss)):
        weights, sent = [], []
        for name, a in zip(("g0", "g1"), pair):
            assert a["weight"] == TOKENS_PER_STEP * (a["step"] - previous[name]), (name, k, a)
            assert a["participants"] == 2
            previous[name] = a["step"]
            weights.append(a["weight"])
            sent.append(params_after(dumps[name], a["step"]) if a["step"] > 0 else None)
        last = k == len(fs) - 1
        if last:  # the stop: every job ends on θ_g_new of the stopping sync
            assert pair[0]["stop"] is True and pair[0]["step"] == steps
            theta = {n: (weights[0] * sent[0][n] + weights[1] * sent[1][n]) / sum(weights) for n in sent[0]}
            for name in ("g0", "g1"):
                final = {n.removeprefix("model."): v for n, v in dumps[name]["final"].items()}
                assert max(float((final[n] - theta[n]).abs().max()) for n in theta) < ATOL, name
            continue
        theta = {n: (weights[0] * sent[0][n] + weights[1] * sent[1][n]) / sum(weights) for n in sent[0]}
        for name, a, theirs in zip(("g0", "g1"), pair, sent):
            applied = a["applied_step"]
            assert applied > a["step"], (name, a)  # applied at a later step end: the job trained beside it
            beside += name == "g0"
            before = inner_step(params_after(dumps[name], applied - 1), batches[name][applied - 1])
            expected = {n: theta[n] + before[n] - theirs[n] for n in theta}
            got = params_after(dumps[name], applied)
            diff = max(float((got[n] - expected[n]).abs().max()) for n in expected)
            assert diff < ATOL, f"{name}: sync {k} (started at step {a['step']}, applied at {applied}) off by {diff:.3g}"
    assert beside >= 2
    assert all(torch.equal(fast["final"][n], slow["final"][n]) for n in fast["final"])
    assert fast["dropped"] == 0.0 and slow["dropped"] == 0.0


@pytest.mark.slow
def test_async_syncs_with_the_run_secret_match_the_same_reference(tmp_path, lighthouse):
    """The run of :func:`test_two_jobs_async_syncs_match_the_delayed_update_reference` with the run secret (g0 from
    ``run_secret_file``, g1 from ``LOCALSGD_RUN_SECRET``): the background thread forms its quorums over torchft's
    authenticated process group, which is reconfigured (and its members proved) per quorum on the background thread,
    and both jobs' syncs pass the same hand-reference checks and end on one model. Fails if the background quorum
    lost the secret's proof (the jobs would not pair) or the authenticated group's collectives broke the sync."""
    secret = tmp_path / "secret"
    secret.write_text("async-honest-secret-51c2\n")
    other = tmp_path / "other"
    other.write_text("async-impostor-secret-9d0e")
    dumps = run_two_uneven_jobs(tmp_path, lighthouse(2), jobs=3, g0={"run_secret_file": secret},
                                g1={"secret_env_file": secret}, g2={"run_secret_file": other})
    assert_the_delayed_update_reference(dumps)
    for name in ("g0", "g1"):
        log_text = (tmp_path / f"{name}.log").read_text()
        assert "local SGD: group 'g2' (member" in log_text and "did not prove the run secret" in log_text, name
    impostor = dumps["g2"]
    assert impostor["healed"] == 0 and all(a["participants"] == 1 for a in impostor["attempts"] if a["committed"])
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p not in (secret, other)]
    assert all(b"async-honest-secret-51c2" not in p.read_bytes() for p in written)


@pytest.mark.slow
def test_a_restarted_job_heals_from_a_peer_whose_syncs_run_in_the_background(tmp_path, lighthouse):
    """g0 and g1 with async_sync (T=0.3 s, DiLoCo); g1 is SIGKILLed at step 6 and restarted with the same group_id
    while g0 trains on alone (its background syncs commit over itself) and checkpoints every 4 steps (each save first
    applies the sync in flight). The restarted job heals from g0 at its join: torchft asks g0 for its state on its
    quorum thread, which posts the capture to g0's training thread (served at a step end). The restarted job starts on
    the θ_g of that sync (weighing 0 in it) and both end on one model: parameters, θ_g and the outer momentum equal.
    No sync straddles a checkpoint (each save applied the one in flight: fails without it), and a job resumed from the
    last one starts exactly on its model and θ_g."""
    from test_federated import killed_on_exit, launch, load, wait_all

    address = lighthouse(1)
    common = dict(outer="diloco", async_sync=True, sync_every_seconds=0.3, max_steps=40, step_sleep=0.05)
    procs = [launch(tmp_path, address, 0, barrier=2, wait_for="g1r", wait_at_step=20, ckpt_dir=tmp_path / "ckpt",
                    ckpt_every=4, **common),
             launch(tmp_path, address, 1, barrier=2, die_at_step=6, **common)]
    with killed_on_exit(procs):
        assert procs[1].wait(timeout=150) == -9, (tmp_path / "g1.log").read_text()[-3000:]
        procs.append(launch(tmp_path, address, 1, name="g1r", **common))
        codes = wait_all([procs[0], procs[2]], tmp_path)
    assert codes == [0, 0], "\n".join((tmp_path / f"{n}.log").read_text()[-3000:] for n in ("g0", "g1r"))
    g0, killed, restarted = (load(tmp_path, n) for n in ("g0", "g1", "g1r"))
    assert killed["killed"] and killed["global_step"] == 6
    assert restarted["healed"] == 1 and restarted["start_step"] > 6, restarted["attempts"]
    join = next(a for a in restarted["attempts"] if a["kind"] == "join")
    assert join["healed"] and join["weight"] == 0.0 and join["committed"] and join["participants"] == 2
    # g0 synced with the restarted job from its background thread, applied at a later step end
    print("g0 syncs:", [(a["step"], a["participants"], a.get("applied_step"), a["weight"]) for a in syncs_of(g0)])
    assert any(a["committed"] and a["participants"] == 2 and a["step"] > 6 and a.get("applied_step", 0) > a["step"]
               for a in syncs_of(g0))
    # the restarted job starts on θ_g of the join's sync (its own copy of the peer's θ_g after the outer step)
    start = {k.removeprefix("model."): v for k, v in restarted["start_params"].items()}
    snap = restarted["start_engines"]["outer"]["snapshot"]
    assert torch.equal(torch.cat([start[k].reshape(-1) for k in start]), torch.cat([s.reshape(-1) for s in snap]))
    # one model at the end
    assert all(torch.equal(g0["final"][k], restarted["final"][k]) for k in g0["final"])
    assert all(torch.equal(x, y) for x, y in zip(g0["snapshot"], restarted["snapshot"]))
    for key, state in g0["outer_state"]["state"].items():
        assert torch.equal(state["momentum_buffer"], restarted["outer_state"]["state"][key]["momentum_buffer"])
    # g0's checkpoints (every 4 steps) each applied the sync in flight first: none started at or before a save's
    # step is applied after it, the saved engine counts exactly the syncs applied by then, and holds none in flight
    from lightning_localsgd.checkpoint import read_checkpoint

    saves = sorted(int(p.name.split("=")[1].split(".")[0]) for p in (tmp_path / "ckpt").iterdir())
    assert len(saves) >= 5, saves
    # (the stopping sync runs on the training thread: applied at its own step; a save at that step is written again
    # after it)
    applied = [(a["step"], a.get("applied_step", a["step"])) for a in syncs_of(g0)]
    for step in saves:
        assert not any(start <= step < done for start, done in applied), (step, applied)
        engine = read_checkpoint(tmp_path / "ckpt" / f"step={step}.ckpt")["local_sgd"]["ranks"][0]
        # (+1: the join's sync, weight 0)
        assert engine["pending"] == [] and engine["num_syncs"] == 1 + sum(done <= step for _, done in applied), step
    # exact resume from the last of them: the job continues from the saved model and θ_g, nothing in flight
    last = saves[-1]
    saved = read_checkpoint(tmp_path / "ckpt" / f"step={last}.ckpt")
    resumed = launch(tmp_path, address, 0, name="g0resume", resume=tmp_path / "ckpt" / f"step={last}.ckpt",
                     **{**common, "max_steps": last + 3})
    with killed_on_exit([resumed]):
        assert wait_all([resumed], tmp_path, timeout=120) == [0], (tmp_path / "g0resume.log").read_text()[-3000:]
    again = load(tmp_path, "g0resume")
    assert again["start_step"] == last
    assert all(torch.equal(again["start_params"][k], saved["state_dict"][k]) for k in again["start_params"])
    assert all(torch.equal(a, b) for a, b in zip(again["start_engines"]["outer"]["snapshot"],
                                                 saved["local_sgd"]["ranks"][0]["snapshot"]))


@pytest.mark.slow
def test_a_late_job_weighs_in_at_its_next_sync_with_its_stale_pseudo_gradient(tmp_path):
    """3 jobs with async_sync (T=0.4 s, outer "average"), a lighthouse that waits 0.3 s for stragglers. g2's training
    thread stalls ~3 s at step 6, so it starts no sync meanwhile and g0 and g1 sync without it (2 of 3: a majority).
    When g2's next sync meets theirs, g2 is behind and heals, but only θ_g (and the outer state) comes from a peer: it
    keeps its own progress and sends its stale pseudo-gradient Δ_late = θ_g_own − θ_2 (θ_g_own: the mean of its last
    committed sync, θ_2: its parameters when this sync started) on the peers' θ_g, θ_g_peer − Δ_late, with its tokens
    since its previous sync started. The merged sync's θ_g_new = the token-weighted mean of g0's and g1's θ and
    θ_g_peer − Δ_late (by hand from the records); each job then applies it by the delayed rule, and all end on one
    model. Fails without the merge (g2 weighs 0: its interval dropped, counted in dropped_weight)."""
    from torchft._torchft import LighthouseServer
    from test_federated import killed_on_exit, launch, load, wait_all

    server = LighthouseServer(bind="127.0.0.1:0", min_replicas=1, join_timeout_ms=300, quorum_tick_ms=50,
                              heartbeat_timeout_ms=1000)
    names = ("g0", "g1", "g2")
    try:
        address = "127.0.0.1:" + server.address().rsplit(":", 1)[-1]
        common = dict(outer="average", async_sync=True, sync_every_seconds=0.4, max_steps=120, step_sleep=0.05)
        procs = [launch(tmp_path, address, g, barrier=3, **common,
                        **(dict(wait_for="go", wait_at_step=6) if g == 2 else {})) for g in range(3)]
        with killed_on_exit(procs):
            deadline = time.monotonic() + 120
            while not all((tmp_path / f"ready_{n}").exists() for n in names):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(3.0)  # g2 stalls at step 6 meanwhile
            (tmp_path / "ready_go").touch()
            codes = wait_all(procs, tmp_path, timeout=200)
        assert codes == [0, 0, 0], "\n".join((tmp_path / f"{n}.log").read_text()[-3000:] for n in names)
    finally:
        server.shutdown()
    dumps = {n: load(tmp_path, n) for n in names}
    syncs = {n: syncs_of(d) for n, d in dumps.items()}
    for n in names:
        print(n, [(a["step"], a["participants"], a["weight"], a["healed"], a.get("merged_late")) for a in syncs[n]])
    late = next(k for k, a in enumerate(syncs["g2"]) if a["healed"])
    merged = syncs["g2"][late]
    assert merged["merged_late"] and merged["weight"] > 0 and merged["participants"] == 3
    assert dumps["g2"]["dropped"] == 0.0 and dumps["g2"]["healed"] >= 1
    # g0 and g1: the first `late` syncs with g2, then at least one without it, then the merged one
    solo = [a for a in syncs["g0"][late:] if a["participants"] == 2]
    at = late + len(solo)
    assert solo and all(a["participants"] == 3 for a in syncs["g0"][:late])
    assert syncs["g0"][at]["participants"] == 3 and len(syncs["g1"]) == len(syncs["g0"])

    def sent(name: str, k: int) -> dict[str, torch.Tensor]:
        return params_after(dumps[name], syncs[name][k]["step"])

    def mean(parts: list[tuple[float, dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        total = sum(w for w, _ in parts)
        return {n: sum(w * p[n] for w, p in parts) / total for n in parts[0][1]}

    # by hand: θ_g_own = g2's last committed sync (the mean of the three θ sent there), θ_g_peer = the peers' last
    # sync without g2 (the mean of g0's and g1's θ), Δ_late = θ_g_own − θ_2
    # (g2 late at its first sync: θ_g_own is θ_g of the join, where every job weighed 0: the initial parameters)
    start = {k.removeprefix("model."): v for k, v in dumps["g2"]["start_params"].items()}
    theta_own = mean([(syncs[n][late - 1]["weight"], sent(n, late - 1)) for n in names]) if late else start
    theta_peer = mean([(syncs[n][at - 1]["weight"], sent(n, at - 1)) for n in ("g0", "g1")])
    previous = syncs["g2"][late - 1]["step"] if late else 0
    assert merged["weight"] == TOKENS_PER_STEP * (merged["step"] - previous)
    sent2 = {n: theta_peer[n] - (theta_own[n] - v) for n, v in sent("g2", late).items()}
    theta_new = mean([(syncs["g0"][at]["weight"], sent("g0", at)), (syncs["g1"][at]["weight"], sent("g1", at)),
                      (merged["weight"], sent2)])
    for name, k, what in (("g0", at, sent("g0", at)), ("g1", at, sent("g1", at)), ("g2", late, sent2)):
        a = syncs[name][k]  # g2's parameters and θ_sent moved by the shift θ_g_peer − θ_g_own
        applied = a["applied_step"]
        batch = group_batches(dumps[name]["seed"])[applied - 1][0]
        before = inner_step(params_after(dumps[name], applied - 1), batch)
        got = params_after(dumps[name], applied)
        diff = max(float((got[n] - (theta_new[n] + before[n] - what[n])).abs().max()) for n in theta_new)
        assert diff < ATOL, f"{name}: the merged sync (applied at step {applied}) off the hand reference by {diff:.3g}"
    assert all(torch.equal(dumps["g0"]["final"][n], dumps[m]["final"][n]) for m in ("g1", "g2")
               for n in dumps["g0"]["final"])


class PairedPG:
    """torchft's managed process group of two jobs whose managers live in this process: every collective of one
    job's background thread meets the other's at a barrier (member order = the managers' ranks)."""

    def __init__(self, shared: dict, rank: int) -> None:
        self.shared, self.rank = shared, rank

    def _exchange(self, tensor):
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = tensor.clone()
        barrier.wait()
        values = list(slots)
        barrier.wait()
        return values

    def allreduce(self, tensors, opts):
        from torch.distributed import ReduceOp

        values = torch.stack(self._exchange(tensors[0]))
        tensors[0].copy_(values.amax(0) if opts.reduceOp == ReduceOp.MAX else values.sum(0))
        return _Done()

    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts):
        values = self._exchange(input)
        chunk = input.numel() // len(values)
        output.copy_(torch.cat([v[self.rank * chunk : (self.rank + 1) * chunk] for v in values]))
        return _Done()

    def allgather(self, output_lists, input_list, opts):
        for out, value in zip(output_lists[0], self._exchange(input_list[0])):
            out.copy_(value)
        return _Done()


class _Done:
    def wait(self, timeout=None):
        return True


class PairedManager(GatedManager):
    """One of two scripted managers whose quorums hold both jobs (``participants`` 2, this job's ``rank``); records
    the engine's error feedback at every quorum (what a redo starts from)."""

    def __init__(self, script, shared: dict, rank: int):
        super().__init__(script)
        self._pg, self.rank, self.errors_at_quorum = PairedPG(shared, rank), rank, []

    def start_quorum(self, timeout=None):
        super().start_quorum(timeout)
        error = self.engine.compressor.error
        self.errors_at_quorum.append(None if error is None else error.clone())

    def participating_rank(self):
        return self.rank


@pytest.mark.parametrize("codec", ["int8", "topk_test"])
def test_a_compressed_background_sync_matches_the_hand_reference_and_commits_its_error_feedback_when_it_commits(
        codec):
    """Two jobs (threads of this process, each with its own background federation and compressed engine, averaging)
    run two background syncs while their training threads take a step beside each. Sync 2's first attempt is voted
    down (e.g. a rank of a job failed) and redone over a new quorum from the same copies. Each sync's θ_g_new,
    every error feedback (int8: both phases' residuals; topk_test: its all-gather's) equal the hand computation of the
    compressed sync (tests/reference.py) of what each job sent (its parameters when the sync started, not the moved
    live ones) with the residuals of the last *committed* sync: neither a sync in flight nor an aborted attempt
    changes them. Each job's parameters after the apply are θ_g_new + its step beside the sync (the delayed rule).
    Fails if the sync read the live parameters, if the apply dropped the local progress, or if an aborted attempt (or a
    sync not yet committed) wrote the error feedback."""
    from reference import weighted_compressed_sync
    from workers.tiny import TOPK_TEST

    codec = TOPK_TEST if codec == "topk_test" else codec
    n = 300  # int8: two blocks of 256, the second partial; topk_test: 5 chunks of 64, the last partial
    g = torch.Generator().manual_seed(7)
    theta = torch.randn(n, generator=g)
    shared = {"slots": [None, None], "barrier": threading.Barrier(2, timeout=30)}
    feds, params, engines = [], [], []
    for rank in range(2):
        fed = BackgroundFederation("127.0.0.1:1", f"g{rank}", 1, 30.0)
        fed.manager = PairedManager([(2, True), (2, False), (2, True)], shared, rank)  # sync 2: voted down, redone
        fed.comm = TorchftCommunicator(fed.manager, timedelta(seconds=30))
        fed._training_thread = threading.get_ident()
        param = torch.nn.Parameter(theta.clone())
        engine = OuterSync([param], cross_group=fed.comm, compression=codec)
        fed.engine = fed.manager.engine = engine
        feds.append(fed), params.append(param), engines.append(engine)
    errors, mean_errors = [torch.zeros(n), torch.zeros(n)], [None, None]
    for k, weights in enumerate([(3.0, 1.0), (1.0, 2.0)]):
        sent = [theta + 0.05 * torch.randn(n, generator=g) for _ in range(2)]
        steps = [0.01 * torch.randn(n, generator=g) for _ in range(2)]
        for fed, param, x in zip(feds, params, sent):
            with torch.no_grad():
                param.copy_(x)
            fed.trained = True
            fed.manager.arrive.clear()
        committed = [None if e.compressor.error is None else e.compressor.error.clone() for e in engines]
        if k == 1:
            committed_1 = committed
        for fed, engine, w in zip(feds, engines, weights):
            assert fed.launch(engine, weight=w, stop=False)
        for fed, engine, param, step, before in zip(feds, engines, params, steps, committed):
            with torch.no_grad():
                param.add_(step)  # an inner step beside the sync
            assert fed.poll(engine) is None  # in flight: nothing applied, its error feedback not written
            same = before is None and engine.compressor.error is None
            assert same or torch.equal(engine.compressor.error, before), k
        for fed in feds:
            fed.manager.arrive.set()
        results = [None, None]
        deadline = time.monotonic() + 30
        while None in results:
            assert time.monotonic() < deadline
            for r, (fed, engine) in enumerate(zip(feds, engines)):
                if results[r] is None:
                    results[r] = fed.poll(engine)
            time.sleep(0.01)
        theta, errors, mean_errors = weighted_compressed_sync(theta, sent, list(weights), errors, mean_errors, codec)
        for r, (fed, engine, param) in enumerate(zip(feds, engines, params)):
            assert torch.equal(engine.snapshot[0].detach(), theta), (codec, k, r)
            assert torch.equal(engine.compressor.error, errors[r]), (codec, k, r)
            if mean_errors[r] is not None:
                assert torch.equal(engine.whole.mean_error, mean_errors[r]), (codec, k, r)
            # θ_g_new + the step beside it, in the order the apply adds: θ_i + (θ_g_new − θ_i_sent)
            assert torch.equal(param.detach(), (sent[r] + steps[r]) + (theta - sent[r])), (codec, k, r)
            assert engine.tensors[0] is param
            records = [a for a in fed.attempts if a["kind"] == "sync"]
            if k == 1:  # the attempt voted down, then its redo, which started from sync 1's residuals
                assert [a["committed"] for a in records] == [True, False, True], records
                quorums = fed.manager.errors_at_quorum
                assert len(quorums) == 3 and quorums[0] is None, (codec, r)
                assert torch.equal(quorums[1], committed_1[r]) and torch.equal(quorums[2], committed_1[r]), (codec, r)
            assert records[-1]["committed"] and records[-1]["weight"] == weights[r]
    assert all(float(e.abs().max()) > 0 for e in errors)  # the codec lost something that was fed back
