"""Federated jobs × the inner strategies × the sync features, and exact resume from checkpoints written in the
background (CPU, gloo).

Jobs of two ranks (DDP, FSDP2 or DeepSpeed ZeRO-2 inside each) are launched as in ``test_federated.py``, every rank
forked together (``launch(fork_ranks=True)``). Each run exercises several features at once and is compared with a hand
reference that models exactly that combination:

- int8-compressed syncs with a registered schedule (``growing``: intervals H, H+1, H+2, ...) after fully synchronous
  warm-up steps (DDP, FSDP; DeepSpeed refuses warm-up): the warm-up steps as one network on the mean gradient of
  the four ranks, then each job's inner steps (SGD with momentum), and at each of the schedule's sync steps the
  two-phase compressed mean with error feedback, computed *per rank* on the elements that rank syncs (a DDP slice of
  the flattened replica, FSDP2's dim-0 shards, ZeRO's zero-padded flat partition), then DiLoCo's outer step. Both
  jobs then resume from their own checkpoints (of a sync step, or mid-interval), written asynchronously, and continue
  bit for bit as the uninterrupted run did (inner momentum, θ_g, DiLoCo's momentum, the error feedback, the
  schedule's state and the data position included);
- FSDP2 × streaming (fragments with overlap): ``test_federated_features.federated_reference`` with two ranks a job;
- FSDP2 × time-based token-weighted syncs: every sync is the token-weighted mean of what each rank sent.

Two levels (several worker groups per job) with FSDP2 and DeepSpeed are cases of
``test_federated_groups.test_two_jobs_of_two_groups_match_the_two_stage_reference``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchft")
from reference import initial_net, weighted_compressed_sync
import test_federated as federated
from test_federated import group_batches, lighthouse  # noqa: F401 (lighthouse: a fixture)
from test_federated_features import federated_reference
from test_federated_schedules import TOKENS_PER_STEP, params_after, sync_records
from workers.tiny import make_inner_optimizer

from lightning_localsgd.checkpoint import is_checkpoint_folder

ATOL = 1e-5
RANKS = 2
NAMES = [k for k, _ in initial_net().named_parameters()]
SHAPES = [tuple(p.shape) for p in initial_net().parameters()]
NUMEL = sum(math.prod(s) for s in SHAPES)
WRITE_DELAY = 0.5  # seconds each checkpoint rank file write sleeps (in the background)


def run_jobs(out, address: str, jobs: int = 2, **options) -> dict[str, dict]:
    """``jobs`` jobs of two ranks, started together; every rank's dump (``g0``, ``g0_r1``, ...)."""
    return federated.run_jobs(out, address, jobs, ranks=RANKS, timeout=200, **options)


def owned(strategy: str, rank: int, partition: int = 0) -> list[int]:
    """The elements rank ``rank`` of a job syncs, in its order, as indices into the flattened replica (the
    parameters concatenated in order); -1: padding (zero)."""
    if strategy == "ddp":  # DDP inside the job: rank k owns slice k of the flattened replica
        width = math.ceil(NUMEL / RANKS)
        return list(range(rank * width, min((rank + 1) * width, NUMEL)))
    if strategy == "fsdp":  # FSDP2: dim-0 chunks of every parameter (a rank past the last chunk holds none)
        out, offset = [], 0
        for shape in SHAPES:
            index = torch.arange(math.prod(shape)).view(shape) + offset
            chunks = index.chunk(RANKS, dim=0)
            out += chunks[rank].reshape(-1).tolist() if rank < len(chunks) else []
            offset += math.prod(shape)
        return out
    # ZeRO 1-2: the flat fp32 copy, zero-padded to a multiple of 2 × ranks, cut in equal partitions
    padded = list(range(NUMEL)) + [-1] * (partition * RANKS - NUMEL)
    return padded[rank * partition:(rank + 1) * partition]


def pick(flat: torch.Tensor, index: list[int]) -> torch.Tensor:
    """The elements ``index`` of a flattened replica (0 for padding)."""
    return torch.stack([flat[i] if i >= 0 else flat.new_zeros(()) for i in index])


def flat_params(net: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def flat_dump(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([params[f"model.{k}"].reshape(-1) for k in NAMES])


def compressed_reference(dumps: dict[str, dict], strategy: str, warmup: int, sync_steps: list[int], steps: int,
                         partition: int) -> dict:
    """By hand: every job's flattened parameters after every step, θ_g after the last step and each rank's phase-1
    error feedback (job, rank) at the end. Who owns which mean chunk comes from the jobs' records (their index in
    each quorum)."""
    jobs = {g: d for g, d in dumps.items() if "_r" not in g}
    layouts = [owned(strategy, k, partition) for k in range(RANKS)]
    batches = {g: group_batches(d["seed"], RANKS) for g, d in jobs.items()}
    net = initial_net()
    opt = make_inner_optimizer("momentum", net.parameters())

    def inner_step(net, opt, per_rank: list) -> None:
        opt.zero_grad()
        torch.stack([F.mse_loss(net(x), y) for x, y in per_rank]).mean().backward()
        opt.step()

    history: dict[int, dict[str, torch.Tensor]] = {}
    for s in range(warmup):  # synchronous data parallelism over every rank of both jobs
        inner_step(net, opt, [b for g in jobs for b in batches[g][s]])
        history[s + 1] = {g: flat_params(net) for g in jobs}
    theta = flat_params(net)
    local = {g: copy.deepcopy((net, opt)) for g in jobs}  # each job's model and inner optimizer (its momentum)
    momentum: torch.Tensor | None = None
    errors = {(g, k): torch.zeros(len(layouts[k])) for g in jobs for k in range(RANKS)}
    # phase 2: (job, rank) -> ((members, its index) when it owned the chunk, the residual of that chunk's encoding)
    kept: dict[tuple[str, int], tuple[tuple[int, int], torch.Tensor]] = {}
    for t in range(warmup + 1, steps + 1):
        for g, (n, o) in local.items():
            inner_step(n, o, batches[g][t - 1])
        if t in sync_steps:
            mean = torch.zeros(NUMEL)
            for k, index in enumerate(layouts):
                quorum = {g: next(a for a in dumps[g if k == 0 else f"{g}_r{k}"]["attempts"]
                                  if a["kind"] == "sync" and a["step"] == t and a["committed"]) for g in jobs}
                members = sorted(jobs, key=lambda g: quorum[g]["rank"])
                assert [quorum[g]["rank"] for g in members] == list(range(len(jobs)))
                residuals = [kept[(g, k)][1] if (g, k) in kept and kept[(g, k)][0] == (len(members), j) else None
                             for j, g in enumerate(members)]
                result, new_errors, new_residuals = weighted_compressed_sync(
                    pick(theta, index), [pick(flat_params(local[g][0]), index) for g in members],
                    [1.0] * len(members), [errors[(g, k)] for g in members], residuals)
                for j, g in enumerate(members):
                    errors[(g, k)] = new_errors[j]
                    kept[(g, k)] = ((len(members), j), new_residuals[j])
                for i, v in zip(index, result):
                    if i >= 0:
                        mean[i] = v
            delta = theta - mean  # DiLoCo by hand: Nesterov SGD, lr 0.7, momentum 0.9 (elementwise)
            momentum = delta.clone() if momentum is None else 0.9 * momentum + delta
            theta = theta - 0.7 * (delta + 0.9 * momentum)
            for n, _ in local.values():
                with torch.no_grad():
                    torch.nn.utils.vector_to_parameters(theta.clone(), n.parameters())
        history[t] = {g: flat_params(n) for g, (n, _) in local.items()}
    return {"history": history, "theta": theta, "errors": errors, "layouts": layouts}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def same(a, b) -> bool:
    """Nested dicts / lists of tensors, equal bit for bit (an FSDP2 optimizer state's DTensors: this rank's shard)."""
    if isinstance(a, torch.Tensor):
        a, b = (t.to_local() if hasattr(t, "to_local") else t for t in (a, b))
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_int8_registered_schedule_then_exact_resume_from_checkpoints_saved_in_the_background(
        tmp_path, lighthouse, monkeypatch, strategy):
    """2 jobs × 2 ranks (DDP, FSDP2 or ZeRO-2 inside), int8 with error feedback, DiLoCo, the registered ``growing``
    schedule (after 3 warm-up steps with DDP / FSDP2: syncs at 5, 8, 12; DeepSpeed, no warm-up: 3, 7, 12), inner
    SGD with momentum, a resumable data loader, each job checkpointing once with ``async_save=True`` (FSDP at a
    sync step, DDP and DeepSpeed mid-interval)
    (every rank file's write slowed down, so the save returns before it is written). Every step of every rank equals
    the hand reference; then both jobs resume from their own checkpoints on a new lighthouse and end bit for bit as
    the uninterrupted run (parameters, θ_g, outer momentum, error feedback, inner momentum)."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (the fork server's)
    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    warmup, h, steps = (0, 3, 12) if strategy == "deepspeed" else (3, 2, 12)
    sync_steps, s = [], warmup
    while s + h + len(sync_steps) <= steps:
        s += h + len(sync_steps)
        sync_steps.append(s)
    assert sync_steps[-1] == steps  # the last interval ends at max_steps (no train-end sync)
    # FSDP checkpoints at a sync step, DDP and DeepSpeed one step after it (mid-interval: the resumed jobs' first
    # quorum is a sync in which no job weighs in, which must leave their inner progress as it is)
    saved_at = sync_steps[1] + (0 if strategy == "fsdp" else 1)
    common = dict(strategy=strategy, outer="diloco", compression="int8", schedule="growing", sync_every=h,
                  warmup_steps=warmup, max_steps=steps, inner="momentum", resumable_data=True)
    dumps = run_jobs(tmp_path / "a", lighthouse(2), ckpt_every=saved_at, async_save=True, write_delay=WRITE_DELAY,
                     g0={"ckpt_dir": tmp_path / "ckpt_g0"}, g1={"ckpt_dir": tmp_path / "ckpt_g1"}, **common)

    partition = dumps["g0"]["snapshot"][0].numel() if strategy == "deepspeed" else 0
    if strategy == "deepspeed":  # ZeRO pads the flat copy to a multiple of 2 × ranks
        assert partition == 2 * math.ceil(NUMEL / (2 * RANKS)), partition
    ref = compressed_reference(dumps, strategy, warmup, sync_steps, steps, partition)
    for name, d in dumps.items():
        job, rank = name[:2], 1 if "_r1" in name else 0
        assert d["strategy"] == {"ddp": "LocalSGDStrategy", "fsdp": "LocalSGDFSDPStrategy",
                                 "deepspeed": "LocalSGDDeepSpeedStrategy"}[strategy] and d["global_step"] == steps
        rounds = [(a["step"], a["participants"], a["committed"]) for a in d["attempts"] if a["kind"] == "warmup"]
        assert rounds == [(s, 2, True) for s in range(warmup)], d["attempts"]
        syncs = [(a["step"], a["participants"], a["weight"], a["committed"]) for a in d["attempts"]
                 if a["kind"] == "sync"]
        assert syncs == [(s, 2, 1.0, True) for s in sync_steps], d["attempts"]
        for s, got in d["steps"]:
            diff = max_diff(flat_dump(got), ref["history"][s][job])
            assert diff < ATOL, f"{name}: after step {s} off the hand reference by {diff:.3g}"
        layout = ref["layouts"][rank]
        assert [t.numel() for t in d["snapshot"]] and sum(t.numel() for t in d["snapshot"]) == len(layout)
        assert max_diff(torch.cat([t.reshape(-1) for t in d["snapshot"]]), pick(ref["theta"], layout)) < ATOL
        assert max_diff(d["compression_error"], ref["errors"][(job, rank)]) < ATOL
        assert float(d["compression_error"].abs().max()) > 0  # the codec really lost something, fed back
        # the save returned before its files were written (each write sleeps WRITE_DELAY s first)
        assert d["saved_async"] and len(d["save_seconds"]) == 1, d["save_seconds"]
        assert d["save_seconds"][0] < WRITE_DELAY, d["save_seconds"]
    # the jobs drift apart between syncs (a wrong mean would show)
    assert max_diff(ref["history"][warmup + 1]["g0"], ref["history"][warmup + 1]["g1"]) > 1e-4

    # both jobs resume from their own checkpoints of step `saved_at`, with no peer ahead of them to heal from
    folders = [tmp_path / f"ckpt_g{g}" / f"step={saved_at}.ckpt" for g in range(2)]
    assert all(is_checkpoint_folder(f) for f in folders)
    resumed = run_jobs(tmp_path / "b", lighthouse(2), g0={"resume": folders[0]}, g1={"resume": folders[1]}, **common)
    for name, d in resumed.items():
        a = dumps[name]
        assert d["start_step"] == saved_at and d["healed"] == 0 and d["global_step"] == steps
        assert [(x["kind"], x["step"], x["participants"], x["weight"]) for x in d["attempts"]] == \
            [("join", saved_at, 2, 0.0)] + [("sync", s, 2, 1.0) for s in sync_steps if s > saved_at], d["attempts"]
        assert [s for s, _ in d["steps"]] == list(range(saved_at + 1, steps + 1))
        for s, got in d["steps"]:
            assert same(got, dict(a["steps"])[s]), f"{name}: step {s} differs from the uninterrupted run"
        for key in ("final", "snapshot", "outer_state", "compression_error", "inner_state"):
            assert same(d[key], a[key]), f"{name}: {key} differs from the uninterrupted run"
        assert len(d["inner_state"]) > 0  # the inner momentum was restored, not restarted


@pytest.mark.slow
def test_fsdp_jobs_streaming_with_overlap_match_the_hand_reference(tmp_path, lighthouse):
    """2 FSDP2 jobs × 2 ranks, 2 fragments (whole tensors, cut by the full parameters' sizes on every rank), τ=1,
    α=0.5, DiLoCo, H=4, 12 steps: every step of every rank equals Streaming DiLoCo over the two jobs by hand, and each
    rank's θ_g is its shards of the reference's."""
    dumps = run_jobs(tmp_path, lighthouse(2), strategy="fsdp", outer="diloco", fragments=2, overlap_steps=1,
                     overlap_mix=0.5)
    jobs = {g: dumps[g] for g in ("g0", "g1")}
    ref = federated_reference(jobs, fragments=2, overlap=1, mix=0.5, ranks=RANKS)
    for name, d in dumps.items():
        job, rank = name[:2], 1 if "_r1" in name else 0
        assert [(a["participants"], a["committed"]) for a in d["attempts"]] == [(2, True)] * len(d["attempts"])
        assert {a["fragment"] for a in d["attempts"]} == {None, 0, 1}
        for s, got in d["steps"]:
            want = torch.cat([ref["history"][s][job][k].reshape(-1) for k in NAMES])
            diff = max_diff(flat_dump(got), want)
            assert diff < ATOL, f"{name}: after step {s} off the reference by {diff:.3g}"
        theta = torch.cat([ref["final_theta"][k].reshape(-1) for k in NAMES])
        assert max_diff(torch.cat([t.reshape(-1) for t in d["snapshot"]]), pick(theta, owned("fsdp", rank))) < ATOL
    # a fragment's parameters moved on between its start and its application (so τ and α matter)
    g0, g1 = (torch.cat([params_after(dumps[g], 3)[k].reshape(-1) for k in NAMES]) for g in ("g0", "g1"))
    assert max_diff(g0, g1) > 1e-4


@pytest.mark.slow
def test_fsdp_jobs_time_based_token_weighted_syncs_with_a_three_times_slower_job(tmp_path, lighthouse):
    """2 FSDP2 jobs × 2 ranks, sync_every_seconds=1.0, g1 3× slower per step. At every sync rank k of each job sends
    its shards: the result is the token-weighted mean (weights: the tokens each rank processed since its previous
    sync) of what the two ranks k sent, and the two ranks' results make the job's full parameters; g0 reaches
    max_steps, its last sync carries the stop, and all four ranks end with the same model."""
    fast_s, slow_s, steps = 0.1, 0.3, 40
    dumps = run_jobs(tmp_path, lighthouse(2), strategy="fsdp", sync_every_seconds=1.0, max_steps=steps,
                     outer="average", g0={"step_sleep": fast_s}, g1={"step_sleep": slow_s})
    records = {name: sync_records(d) for name, d in dumps.items()}
    counts = {len(r) for r in records.values()}
    assert len(counts) == 1 and min(counts) >= 3, {n: d["attempts"] for n, d in dumps.items()}
    assert dumps["g0"]["global_step"] == steps and dumps["g1"]["global_step"] <= 0.6 * steps
    previous = {name: 0 for name in dumps}
    unequal = False
    for k in range(min(counts)):
        expected = {}
        for rank in ("", "_r1"):
            (fa, fr), (sa, sr) = records["g0" + rank][k], records["g1" + rank][k]
            weights = []
            for name, a in (("g0" + rank, fa), ("g1" + rank, sa)):
                assert a["weight"] == TOKENS_PER_STEP * (a["step"] - previous[name]) and a["participants"] == 2
                previous[name] = a["step"]
                weights.append(a["weight"])
            unequal |= weights[0] != weights[1]
            expected[rank] = {n: (weights[0] * fr["params"][n] + weights[1] * sr["params"][n]) / sum(weights)
                              for n in fr["params"]}
        full = {n: torch.cat([expected[""][n], expected["_r1"][n]]) for n in expected[""]}  # dim-0 shards
        for name, d in dumps.items():
            step = records[name][k][0]["step"]
            got = d["final"] if k == min(counts) - 1 else \
                {f"model.{n}": v for n, v in params_after(d, step).items()}
            diff = max(float((got[n] - full[n]).abs().max()) for n in full)
            assert diff < ATOL, f"{name}: sync {k} (step {step}) off the token-weighted mean by {diff:.3g}"
    assert unequal, "no sync mixed unequal weights"
    assert records["g0"][-1][0]["stop"] is True
    for name, d in dumps.items():
        assert all(torch.equal(d["final"][n], dumps["g0"]["final"][n]) for n in d["final"]), name
