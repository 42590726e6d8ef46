"""Compressed and streaming syncs across federated jobs (CPU, gloo), against a hand reference.

The jobs are ``tests/workers/train_federated.py`` (one process each, its own data order), launched as in
test_federated.py. The reference below is written out independently of the library: each group's inner SGD steps;
at each sync start the values every group sends (a fragment's parameters, or all of them); the weighted mean over
the groups whose records say they took part, either exact or through the two-phase compressed all-reduce with error
feedback (codec round trips from ``engine.codecs``, the rest by hand); the outer step (Nesterov by hand) applied
when the sync is, and every group continuing from ``mix·θ_i + (1−mix)·θ_g``. Who took part, with which weight and
at which index of the quorum comes from the jobs' own sync records; a sync no group committed changes nothing.
"""

from __future__ import annotations

import copy
import math
import signal
import time

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchft")
from reference import initial_net, reference_fragments
from test_federated import (H, STEPS, group_batches, killed_on_exit, launch, lighthouse, load, params_at,  # noqa: F401
                            run_jobs, wait_all)

from lightning_localsgd.engine.codecs import decode, encode, get_codec
from workers.tiny import TOPK_TEST

ATOL = 1e-5
NAMES = [k for k, _ in initial_net().named_parameters()]
SIZES = [p.numel() for p in initial_net().parameters()]


def starts_at(t: int, fragments: int) -> list[int]:
    """Streaming schedule: fragment f starts at local steps t ≡ (f+1)·H/F (mod H), t >= (f+1)·H/F."""
    out = []
    for f in range(fragments):
        offset = (f + 1) * H // fragments
        if t >= offset and (t - offset) % H == 0:
            out.append(f)
    return out


def records(dump: dict, step: int, fragment) -> list[dict]:
    return [a for a in dump["attempts"] if a["step"] == step and a.get("fragment") == fragment]


def federated_reference(dumps: dict[str, dict], codec: str | None = None, fragments: int = 1, overlap: int = 0,
                        mix: float = 0.0, outer: str = "diloco", ranks: int = 1) -> dict:
    """θ_g after every step, each group's parameters after every step, and the groups' phase-1 error feedback at
    the end, by hand. A restarted group (``start_step`` > 0) starts from the parameters it recorded right after
    healing (the test checks separately that they are a live peer's). ``ranks`` > 1 (exact mean only): a job's
    inner step is the gradient of the mean of its ranks' losses (DDP / FSDP inside it)."""
    assert codec is None or ranks == 1, "the compressed reduce is modelled per group of one rank"
    streaming = fragments > 1 or overlap > 0
    frags = reference_fragments(NAMES, SIZES, fragments)
    base = initial_net()
    theta_g = {k: v.detach().clone() for k, v in base.named_parameters()}
    momentum: dict[str, torch.Tensor] = {}
    nets: dict[str, torch.nn.Module] = {}
    cursor = {g: 0 for g in dumps}
    batches = {g: group_batches(d["seed"], ranks) for g, d in dumps.items()}
    total = sum(SIZES)
    error = {g: torch.zeros(total) for g in dumps}  # phase 1, over all parameters (a fragment uses its range)
    mean_error: dict[str, dict] = {g: {} for g in dumps}  # phase 2, fragment -> (owner (size, rank), residual)
    in_flight: dict = {}  # fragment -> (names, participants, mean of the fragment or None)
    history: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    thetas: dict[int, dict[str, torch.Tensor]] = {}

    def last_step(g):
        return dumps[g]["global_step"]

    def flat(net, names):
        p = dict(net.named_parameters())
        return torch.cat([p[k].detach().reshape(-1) for k in names])

    def offset_of(names):
        lo = sum(SIZES[: NAMES.index(names[0])])
        return lo, lo + sum(SIZES[NAMES.index(k)] for k in names)

    def start(step, fragment, names):
        """What the groups send at a sync start, reduced as the library must: the new mean of ``names`` (None: no
        group weighed in, or the sync was not committed anywhere: nothing changes)."""
        recs = {g: records(d, step, fragment) for g, d in dumps.items()}
        done = {g: next(a for a in r if a["committed"]) for g, r in recs.items() if any(a["committed"] for a in r)}
        if not done:
            return None, []
        members = sorted(done, key=lambda g: done[g]["rank"])
        size = done[members[0]]["participants"]
        assert len(members) == size and [done[g]["rank"] for g in members] == list(range(size)), done
        weights = {g: done[g]["weight"] for g in members}
        total_weight = sum(weights.values())
        theta = torch.cat([theta_g[k].reshape(-1) for k in names])
        n = theta.numel()
        if codec is None:
            if total_weight == 0:
                return None, members
            return sum(weights[g] * flat(nets[g], names) for g in members if weights[g]) / total_weight, members
        lo, hi = offset_of(names)
        chunk = math.ceil(n / size)
        decay = get_codec(codec).feedback_decay  # the residuals kept: β times what the codec lost (1 but for topk)
        if get_codec(codec).exchange == "all_gather":  # topk: every member's payload to every member, summed
            total = torch.zeros(n)
            for g in members:  # in member (quorum) order
                d = theta - flat(nets[g], names) + error[g][lo:hi]
                s = decode(encode(d, codec), codec, n)
                if weights[g] != 0:  # a member of weight 0 keeps its residual and is not read
                    error[g][lo:hi] = decay * (d - s)
                    total += weights[g] * s
            return (theta - total / total_weight if total_weight else None), members
        decoded = {}
        for g in members:
            d = F.pad(theta - flat(nets[g], names) + error[g][lo:hi], (0, chunk * size - n))
            q = [decode(encode(d[j * chunk : (j + 1) * chunk], codec), codec, chunk) for j in range(size)]
            if weights[g] != 0:  # a member of weight 0 keeps its residual
                error[g][lo:hi] = decay * (d - torch.cat(q))[:n]
            decoded[g] = q
        if total_weight == 0:
            return None, members
        sent = []
        for j, owner in enumerate(members):
            m = sum(weights[g] * decoded[g][j] for g in members if weights[g]) / total_weight
            key, kept = mean_error[owner].get(fragment, (None, None))
            if kept is not None and key == (size, j):  # a residual of another membership is dropped
                m = m + kept
            s = decode(encode(m, codec), codec, chunk)
            mean_error[owner][fragment] = ((size, j), decay * (m - s))
            sent.append(s)
        return theta - torch.cat(sent)[:n], members

    def apply(names, mean, members, alpha):
        if mean is not None:
            offset = 0
            for k in names:
                m = mean[offset : offset + theta_g[k].numel()].view_as(theta_g[k])
                offset += theta_g[k].numel()
                if outer == "average":
                    theta_g[k] = m.clone()
                else:  # DiLoCo by hand: Nesterov SGD, lr 0.7, momentum 0.9
                    delta = theta_g[k] - m
                    momentum[k] = delta.clone() if k not in momentum else 0.9 * momentum[k] + delta
                    theta_g[k] = theta_g[k] - 0.7 * (delta + 0.9 * momentum[k])
        for g in members:  # every group of a committed sync continues from θ_g (blended)
            with torch.no_grad():
                for k, p in nets[g].named_parameters():
                    if k in names:
                        p.copy_(alpha * p + (1 - alpha) * theta_g[k] if alpha else theta_g[k])

    for g, d in dumps.items():
        if d["start_step"] == 0:
            nets[g] = copy.deepcopy(base)
    for t in range(1, STEPS + 1):
        for g, net in nets.items():
            if t <= last_step(g):
                opt = torch.optim.SGD(net.parameters(), lr=0.1)
                losses = [F.mse_loss(net(x), y) for x, y in batches[g][cursor[g]]]
                cursor[g] += 1
                opt.zero_grad()
                (losses[0] if len(losses) == 1 else torch.stack(losses).mean()).backward()
                opt.step()
        for g, d in dumps.items():  # a restarted group enters at the sync it healed in, with a live peer's θ_i
            if d["start_step"] == t and t > 0:
                nets[g] = copy.deepcopy(base)
                with torch.no_grad():
                    for k, p in nets[g].named_parameters():
                        p.copy_(d["start_params"]["model." + k])
        if streaming:
            for f in starts_at(t, fragments):
                in_flight[f] = (frags[f], *start(t, f, frags[f]))
            for f in (starts_at(t - overlap, fragments) if t > overlap else []):
                names, mean, members = in_flight.pop(f)
                apply(names, mean, members, mix)
        elif t % H == 0:
            mean, members = start(t, None, NAMES)
            apply(NAMES, mean, members, 0.0)
        history[t] = {g: {k: v.detach().clone() for k, v in net.named_parameters()} for g, net in nets.items()}
        thetas[t] = {k: v.clone() for k, v in theta_g.items()}
    for f in sorted(in_flight):  # train end: the syncs in flight, then one of every parameter
        names, mean, members = in_flight.pop(f)
        apply(names, mean, members, mix)
    if streaming:
        mean, members = start(STEPS, None, NAMES)
        apply(NAMES, mean, members, 0.0)
    final = {g: {k: v.detach().clone() for k, v in net.named_parameters()} for g, net in nets.items()}
    return {"history": history, "theta": thetas, "final": final, "final_theta": theta_g, "error": error}


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].reshape(-1) - b[k].reshape(-1)).abs().max()) for k in b)


def check(dumps: dict, ref: dict, names) -> None:
    """Every surviving group's parameters after every step it ran, and at the end, equal the reference."""
    for name in names:
        d = dumps[name]
        for s, got in d["steps"]:
            want = ref["history"][s][name]
            diff = max_diff({k.removeprefix("model."): v for k, v in got.items()}, want)
            assert diff < ATOL, f"{name}: after step {s} off the reference by {diff:.3g}"
        final = {k.removeprefix("model."): v for k, v in d["final"].items()}
        assert max_diff(final, ref["final"][name]) < ATOL, name
        snapshot = torch.cat([s.reshape(-1) for s in d["snapshot"]])
        assert float((snapshot - torch.cat([ref["final_theta"][k].reshape(-1) for k in NAMES])).abs().max()) < ATOL


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["int8", TOPK_TEST])
def test_two_jobs_int8_compressed_syncs_match_the_hand_reference(tmp_path, lighthouse, codec):
    """2 jobs, int8 (or topk: sparse, decayed error feedback, all-gathered) with error feedback, DiLoCo, H=4, 12
    steps: every sync equals the compressed mean by hand (int8: two phases, phase-1 residuals per job, phase-2
    residuals per chunk owner; topk: each job's payload gathered over the torchft communicator and summed in quorum
    order, one residual per job), the jobs end identical, and each job's error feedback equals the reference's."""
    dumps = run_jobs(tmp_path, lighthouse(2), 2, outer="diloco", compression=codec)
    for d in dumps.values():
        assert [(a["step"], a["participants"], a["weight"], a["committed"]) for a in d["attempts"]] == \
            [(0, 2, 0.0, True)] + [(s, 2, 1.0, True) for s in range(H, STEPS + 1, H)], d["attempts"]
    ref = federated_reference(dumps, codec=codec)
    check(dumps, ref, ["g0", "g1"])
    for name, d in dumps.items():
        assert float((d["compression_error"] - ref["error"][name]).abs().max()) < ATOL
        assert float(d["compression_error"].abs().max()) > 0  # the codec really lost something, fed back
    # compression is visible: the exact mean would differ
    exact = federated_reference(dumps, codec=None)
    assert max_diff(ref["final"]["g0"], exact["final"]["g0"]) > 1e-5
    assert max(float((params_at(dumps["g0"], 2)[k] - params_at(dumps["g1"], 2)[k]).abs().max()) for k in NAMES) > 1e-4


@pytest.mark.slow
def test_two_jobs_streaming_with_overlap_match_the_hand_reference(tmp_path, lighthouse):
    """2 jobs, 2 fragments, τ=1, α=0.5, DiLoCo, H=4, 12 steps: fragment 0 starts at steps 2, 6, 10 and fragment 1
    at 4, 8, 12, each over its own quorum and commit, applied one step later; at the end fragment 1's sync of step 12
    and one sync of every parameter. Every step equals the hand reference (Streaming DiLoCo over the two jobs)."""
    dumps = run_jobs(tmp_path, lighthouse(2), 2, outer="diloco", fragments=2, overlap_steps=1, overlap_mix=0.5)
    expected = [(0, None)] + [(t, f) for t in range(1, STEPS + 1) for f in starts_at(t, 2)] + [(STEPS, None)]
    for d in dumps.values():
        got = [(a["step"], a["fragment"]) for a in d["attempts"]]
        assert got == expected and all(a["committed"] and a["participants"] == 2 for a in d["attempts"]), got
        assert [a["weight"] for a in d["attempts"]] == [0.0] + [1.0] * (len(expected) - 1)
    ref = federated_reference(dumps, fragments=2, overlap=1, mix=0.5)
    check(dumps, ref, ["g0", "g1"])
    # a fragment's parameters really moved on between its start and its application (so τ and α matter)
    assert max_diff(params_at(dumps["g0"], 3), params_at(dumps["g1"], 3)) > 1e-4


@pytest.mark.slow
def test_three_jobs_one_killed_inside_a_compressed_fragment_sync_then_restarted_heals(tmp_path, lighthouse):
    """int8 + 2 fragments, τ=1, α=0.5, DiLoCo, H=4, 12 steps, 3 jobs. g2 SIGKILLs itself inside the all-to-all of
    fragment 0's sync started at step 6 (a quorum of all three). g0 and g1: that attempt fails when they apply it at
    step 7 and is dropped (θ_g, the outer momentum and the error feedback as they were; inner steps had run since its
    start); g2 restarted with the same group_id heals at fragment 1's sync of step 8 from a live peer (its θ_i, with
    zero error feedback), takes part in it with weight 0 and applies it at step 9 like the others. Every step of
    every job equals the hand reference and the three jobs end identical."""
    address = lighthouse(2)
    opts = dict(outer="diloco", compression="int8", fragments=2, overlap_steps=1, overlap_mix=0.5)
    procs = [launch(tmp_path, address, g, barrier=3, wait_for="g2r", wait_at_step=7,
                    die_in_sync_at_step=6 if g == 2 else -1, **opts) for g in range(3)]
    with killed_on_exit(procs):
        assert procs[2].wait(timeout=150) == -signal.SIGKILL, (tmp_path / "g2.log").read_text()[-3000:]
        killed_at = time.monotonic()
        procs.append(launch(tmp_path, address, 2, name="g2r", **opts))
        codes = wait_all([procs[0], procs[1], procs[3]], tmp_path)
    assert codes == [0, 0, 0], "\n".join((tmp_path / f"{n}.log").read_text()[-2000:] for n in ("g0", "g1", "g2r"))
    print(f"restarted job ran {time.monotonic() - killed_at:.1f} s")
    dumps = {name: load(tmp_path, name) for name in ("g0", "g1", "g2", "g2r")}
    killed, restarted = dumps["g2"], dumps["g2r"]

    assert killed["killed"] and killed["global_step"] == 6 and killed["reduces"][-1]["participants"] == 3
    f0 = slice(0, sum(SIZES[: len(reference_fragments(NAMES, SIZES, 2)[0])]))  # fragment 0's elements
    for name in ("g0", "g1"):
        d = dumps[name]
        assert d["global_step"] == STEPS and d["healed"] == 0
        failed = records(d, 6, 0)
        assert len(failed) == 1 and not failed[0]["committed"] and failed[0]["participants"] == 3, d["attempts"]
        assert "by peer" in failed[0]["error"] or "Connection" in failed[0]["error"], failed
        joined = records(d, 8, 1)
        assert [(a["participants"], a["weight"], a["committed"]) for a in joined] == [(3, 1.0, True)], joined
        # θ_g, momentum and error feedback of fragment 0 untouched by the dropped attempt: at fragment 0's next
        # start (step 10) as they were when the failed one started (step 6)
        at6, at10 = ([r for r in d["reduces"] if r["step"] == s][0] for s in (6, 10))
        assert torch.equal(at6["snapshot"][0], at10["snapshot"][0])  # net1.weight: fragment 0
        assert torch.equal(at6["momentum"][0], at10["momentum"][0])
        assert torch.equal(at6["error"][f0], at10["error"][f0]) and float(at6["error"][f0].abs().max()) > 0
    # the restarted job healed before its first step, from a live peer's parameters, with zero error feedback
    heal = records(restarted, 8, 1)
    assert [(a["healed"], a["weight"], a["committed"]) for a in heal] == [(True, 0.0, True)], restarted["attempts"]
    assert restarted["healed"] == 1 and restarted["start_step"] == 8 and restarted["global_step"] == STEPS
    start = {k.removeprefix("model."): v for k, v in restarted["start_params"].items()}
    assert any(max_diff(start, params_at(dumps[p], 8)) == 0.0 for p in ("g0", "g1"))
    assert restarted["start_error"] is not None and float(restarted["start_error"].abs().max()) == 0.0
    assert float(dumps["g0"]["reduces"][-1]["error"].abs().max()) > 0  # the peers' own is not zero
    assert records(restarted, 10, 0)[0]["weight"] == 1.0  # then it weighs in
    # values: every step equals the hand reference; all end identical
    ref = federated_reference(dumps, codec="int8", fragments=2, overlap=1, mix=0.5)
    check(dumps, ref, ["g0", "g1", "g2r"])
    for name in ("g1", "g2r"):
        assert all(torch.equal(dumps[name]["final"][k], dumps["g0"]["final"][k]) for k in dumps["g0"]["final"])
        assert all(torch.equal(x, y) for x, y in zip(dumps[name]["snapshot"], dumps["g0"]["snapshot"]))
