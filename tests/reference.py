"""Single-process reference: simulates the worker groups of local SGD by hand.

Each group is a copy of the model with its own inner optimizer. A group's gradient is the mean of its ranks'
gradients (DDP inside the group); warm-up steps average across all ranks. The outer step is written out here
(exact mean, or Nesterov SGD by hand), independent of the library's code.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from typing import Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers"))
from _launch import max_diff  # noqa: E402
from lightning_localsgd.engine.codecs import decode, encode, get_codec  # noqa: E402
from lightning_localsgd.engine.comm import Communicator  # noqa: E402
from tiny import TinyNet, make_dataset, make_inner_optimizer  # noqa: E402

#: how far a multi-process run's parameters may be from :func:`simulate`'s (float32 sums in another order)
ATOL = 1e-6


def rank_batches(world: int, rank: int, batch_size: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches Lightning's injected DistributedSampler (shuffle=True, seed 0, epoch 0) gives `rank`, in order."""
    x, y = make_dataset().tensors
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).tolist()[rank::world]
    return [(x[idx[i : i + batch_size]], y[idx[i : i + batch_size]]) for i in range(0, len(idx), batch_size)]


def initial_net(buffer: bool = False, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(buffer)


def simulate(world: int, group_size: int, sync_every: int, outer: str, steps: int, warmup: int = 0,
             inner: str = "sgd", accumulate: int = 1, clip: float | None = None, buffer: bool = False,
             seed: int = 0, two_optimizers: bool = False, sync_steps: Sequence[int] | None = None,
             compression: str | None = None, partitions: Sequence[Sequence[int]] | None = None,
             loss_scales: dict[int, float] | None = None, left_out: Sequence[int] = ()):
    """Returns (per-batch list of per-group named parameters, per-group final parameters, per-group buffers).

    ``sync_steps``: the local steps (counted after the warm-up) after which a sync runs, instead of every
    ``sync_every``. ``compression``: each sync's mean is the compressed mean with error feedback of the codec's
    exchange (:func:`weighted_compressed_sync`), run separately over each of ``partitions``: the elements one rank of
    every group holds (indices into the flattened parameters, -1 for a padding zero; see :func:`fsdp_partitions`,
    :func:`zero_partitions`); default one partition of every element. ``loss_scales``: a group's loss is scaled by
    this (a broken group); ``left_out``: groups every sync's mean leaves out (the robust screen's verdict)."""
    groups = world // group_size
    base = initial_net(buffer, seed)
    nets = [copy.deepcopy(base) for _ in range(groups)]
    if two_optimizers:
        opts = [[make_inner_optimizer(inner, n.net1.parameters()), make_inner_optimizer(inner, n.net2.parameters())]
                for n in nets]
    else:
        opts = [[make_inner_optimizer(inner, n.parameters())] for n in nets]
    batches = [rank_batches(world, r) for r in range(world)]
    snapshot = {k: v.detach().clone() for k, v in base.named_parameters()}
    momentum = {}
    history = []
    steps_done, since_sync = 0, 0
    if compression is not None:
        if partitions is None:
            partitions = [list(range(sum(v.numel() for v in snapshot.values())))]
        parts = [torch.tensor(list(idx), dtype=torch.long) for idx in partitions]
        errors = [[torch.zeros(len(idx)) for _ in nets] for idx in parts]
        mean_errors = [[None] * groups for _ in parts]

    def compressed_means() -> dict[str, torch.Tensor]:
        """The compressed mean of every parameter: each partition's two-phase compressed mean, put back in place."""
        names = list(snapshot)
        flat_theta = torch.cat([snapshot[k].reshape(-1) for k in names])
        flats = [torch.cat([p.detach().reshape(-1) for p in n.parameters()]) for n in nets]
        mean = torch.empty_like(flat_theta)
        for i, idx in enumerate(parts):
            held = idx >= 0

            def take(flat):
                return torch.where(held, flat[idx.clamp(min=0)], torch.zeros(()))

            new, errors[i], mean_errors[i] = weighted_compressed_sync(
                take(flat_theta), [take(f) for f in flats], [float(g not in left_out) for g in range(groups)],
                errors[i], mean_errors[i], compression)
            mean[idx[held]] = new[held]
        out, offset = {}, 0
        for k in names:
            out[k] = mean[offset : offset + snapshot[k].numel()].view_as(snapshot[k])
            offset += snapshot[k].numel()
        return out

    def outer_step():
        names = list(snapshot)
        params = [dict(n.named_parameters()) for n in nets]
        means = compressed_means() if compression is not None else None
        for k in names:
            kept = [p for g, p in enumerate(params) if g not in left_out]
            mean = means[k] if means is not None else torch.stack([p[k].detach() for p in kept]).mean(0)
            if outer == "average":
                new = mean
            else:  # DiLoCo: Nesterov SGD, lr 0.7, momentum 0.9, written out
                delta = snapshot[k] - mean
                buf = delta.clone() if k not in momentum else 0.9 * momentum[k] + delta
                momentum[k] = buf
                new = snapshot[k] - 0.7 * (delta + 0.9 * buf)
            snapshot[k] = new.clone()
            for p in params:
                p[k].data.copy_(new)
        if buffer:
            for name in ("running_mean",):
                mean = torch.stack([getattr(n, name) for n in nets]).mean(0)
                for n in nets:
                    getattr(n, name).copy_(mean)

    for b in range(steps * accumulate):
        for g, net in enumerate(nets):
            losses = [F.mse_loss(net(batches[r][b][0]), batches[r][b][1])
                      for r in range(g * group_size, (g + 1) * group_size)]
            (torch.stack(losses).mean() * (loss_scales or {}).get(g, 1.0) / accumulate).backward()
        if (b + 1) % accumulate == 0:
            in_warmup = steps_done < warmup
            if in_warmup and groups > 1:
                for params in zip(*[list(n.parameters()) for n in nets]):
                    mean = torch.stack([p.grad for p in params]).mean(0)
                    for p in params:
                        p.grad = mean.clone()
            for net, group_opts in zip(nets, opts):
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
                for o in group_opts:
                    o.step()
                    o.zero_grad()
            steps_done += 1
            if in_warmup:
                if steps_done == warmup:
                    snapshot = {k: v.detach().clone() for k, v in nets[0].named_parameters()}
            else:
                since_sync += 1
                local = steps_done - warmup
                if (local in sync_steps) if sync_steps is not None else since_sync == sync_every:
                    since_sync = 0
                    outer_step()
        history.append([{k: v.detach().clone() for k, v in n.named_parameters()} for n in nets])
    if since_sync:
        outer_step()  # sync_on_train_end
    final = [{k: v.detach().clone() for k, v in n.named_parameters()} for n in nets]
    bufs = [{k: v.detach().clone() for k, v in n.named_buffers()} for n in nets]
    return history, final, bufs


def fsdp_partitions(shapes: Sequence[Sequence[int]], group_size: int) -> list[list[int]]:
    """The elements rank ``k`` of a worker group holds under FSDP2 (``fully_shard``), as indices into the flattened
    parameters (``shapes`` in order): every parameter split on dim 0 as ``torch.chunk`` splits it (``ceil(d0/S)``
    rows per rank; a parameter of fewer rows leaves the last ranks none), rank ``k``'s rows of each in order."""
    out = [[] for _ in range(group_size)]
    offset = 0
    for shape in shapes:
        rows = shape[0] if len(shape) else 1
        numel = math.prod(shape)
        per_row, per_rank = numel // rows, math.ceil(rows / group_size)
        for k in range(group_size):
            lo, hi = min(k * per_rank, rows), min((k + 1) * per_rank, rows)
            out[k].extend(range(offset + lo * per_row, offset + hi * per_row))
        offset += numel
    return out


def zero_partitions(numel: int, group_size: int) -> list[list[int]]:
    """The elements rank ``k`` of a worker group holds under DeepSpeed ZeRO stage 1 / 2 (its fp32 master partition), as
    indices into the flattened parameters (-1: a padding zero): the flattened parameters padded to a multiple of
    ``2·S`` (ZeRO's ``nccl_start_alignment_factor`` of 2 times the data-parallel size) and cut in ``S`` equal parts."""
    padded = math.ceil(numel / (2 * group_size)) * 2 * group_size
    size = padded // group_size
    return [[i if i < numel else -1 for i in range(k * size, (k + 1) * size)] for k in range(group_size)]


def _outer(theta, mean, kind, momentum):
    """One outer step, written out: exact mean, or Nesterov SGD lr 0.7 momentum 0.9 (momentum: dict updated)."""
    if kind == "average":
        return mean.clone()
    delta = theta - mean
    momentum["buf"] = delta.clone() if "buf" not in momentum else 0.9 * momentum["buf"] + delta
    return theta - 0.7 * (delta + 0.9 * momentum["buf"])


def simulate_two_stage(world, cluster_size, sync_every, cluster_sync_every, outer, cluster_outer, steps,
                       inner="sgd", seed=0, group_size=1, batches=None):
    """Two-stage local SGD: groups sync inside their cluster every `sync_every` steps (θ_c ← outer(θ_c, θ_c − mean
    θ_i)), clusters every `cluster_sync_every` (θ_g ← cluster_outer(θ_g, θ_g − mean θ_c), then θ_c ← θ_g and θ_i ← θ_g).
    Groups of `group_size` ranks (a group's gradient: of the mean of its ranks' losses, DDP inside it); `batches[g][b]`
    the list of group g's per-rank batches at step b (default: Lightning's sampler over the whole world). Returns
    per-batch per-group parameters and the final ones."""
    groups = world // group_size
    clusters = groups // cluster_size
    base = initial_net(False, seed)
    nets = [copy.deepcopy(base) for _ in range(groups)]
    opts = [make_inner_optimizer(inner, n.parameters()) for n in nets]
    if batches is None:
        per_rank = [rank_batches(world, r) for r in range(world)]
        batches = [[[per_rank[r][b] for r in range(g * group_size, (g + 1) * group_size)]
                    for b in range(len(per_rank[0]))] for g in range(groups)]
    names = [k for k, _ in base.named_parameters()]
    theta_c = [{k: v.detach().clone() for k, v in base.named_parameters()} for _ in range(clusters)]
    theta_g = {k: v.detach().clone() for k, v in base.named_parameters()}
    mom_c = [{k: {} for k in names} for _ in range(clusters)]
    mom_g = {k: {} for k in names}
    history = []

    def level1():
        for c in range(clusters):
            members = [dict(nets[c * cluster_size + j].named_parameters()) for j in range(cluster_size)]
            for k in names:
                mean = torch.stack([m[k].detach() for m in members]).mean(0)
                theta_c[c][k] = _outer(theta_c[c][k], mean, outer, mom_c[c][k])
                for m in members:
                    m[k].data.copy_(theta_c[c][k])

    def level2():
        for k in names:
            mean = torch.stack([theta_c[c][k] for c in range(clusters)]).mean(0)
            theta_g[k] = _outer(theta_g[k], mean, cluster_outer, mom_g[k])
            for c in range(clusters):
                theta_c[c][k] = theta_g[k].clone()
            for n in nets:
                dict(n.named_parameters())[k].data.copy_(theta_g[k])

    for b in range(steps):
        for g, net in enumerate(nets):
            losses = [F.mse_loss(net(x), y) for x, y in batches[g][b]]
            (losses[0] if len(losses) == 1 else torch.stack(losses).mean()).backward()
            opts[g].step()
            opts[g].zero_grad()
        if (b + 1) % sync_every == 0:
            level1()
            if (b + 1) % cluster_sync_every == 0:
                level2()
        history.append([{k: v.detach().clone() for k, v in n.named_parameters()} for n in nets])
    if steps % sync_every or steps % cluster_sync_every:
        level1()
        level2()
    return history, [{k: v.detach().clone() for k, v in n.named_parameters()} for n in nets]


def reference_fragments(names, sizes, fragments):
    """Contiguous runs of whole tensors, found by trying every cut: the largest run as small as possible, then the
    runs as even as possible (smallest sum of squares), then the earliest cuts."""
    import itertools

    best = None
    for inner in itertools.combinations(range(1, len(sizes)), fragments - 1):
        cuts = [0, *inner, len(sizes)]
        runs = [sum(sizes[a:b]) for a, b in zip(cuts, cuts[1:])]
        key = (max(runs), sum(r * r for r in runs), cuts)
        if best is None or key < best:
            best = key
    cuts = best[2]
    return [names[cuts[f] : cuts[f + 1]] for f in range(fragments)]


def simulate_streaming(world, sync_every, fragments, overlap, mix, outer, steps, inner="sgd", seed=0,
                       group_size=1, warmup=0, sync_on_train_end=True):
    """Streaming local SGD (Streaming DiLoCo), written out by hand.

    Groups of `group_size` ranks (a group's gradient is the mean of its ranks' gradients). `warmup` fully
    synchronous steps first (gradients averaged over all ranks), after which θ_g is set to the parameters. After
    local step t (1, 2, ... counted after the warm-up) fragment f *starts* a sync when t >= (f+1)·H/F and
    (t − (f+1)·H/F) % H == 0: every group's current parameters of that fragment are recorded (what it sends). At step t + τ the sync is *applied*: mean of what was
    sent, θ_g ← outer(θ_g, mean) per parameter of the fragment (the other parameters' outer state is untouched), and
    each group continues from mix·θ_i(now) + (1−mix)·θ_g. At a step, starts come before applications. At train end:
    the syncs still in flight are applied (in fragment order, with mix), then one outer step of every parameter from
    the groups' current parameters (mix 0), if sync_on_train_end (with F=1 and τ=0, plain local SGD, only when the
    run ends mid-interval, and α=0).

    Returns (per-batch list of per-group named parameters, per-group final parameters, snapshot θ_g, momenta).
    """
    groups = world // group_size
    base = initial_net(False, seed)
    nets = [copy.deepcopy(base) for _ in range(groups)]
    opts = [make_inner_optimizer(inner, n.parameters()) for n in nets]
    batches = [rank_batches(world, r) for r in range(world)]
    names = [k for k, _ in base.named_parameters()]
    sizes = [v.numel() for _, v in base.named_parameters()]
    frags = reference_fragments(names, sizes, fragments)
    theta_g = {k: v.detach().clone() for k, v in base.named_parameters()}
    momentum = {k: {} for k in names}
    in_flight = {}  # fragment -> per-group {name: sent value}
    history = []

    def params(g):
        return dict(nets[g].named_parameters())

    def start(f):
        in_flight[f] = [{k: params(g)[k].detach().clone() for k in frags[f]} for g in range(groups)]

    def apply(f, alpha):
        sent = in_flight.pop(f)
        for k in frags[f]:
            mean = torch.stack([s[k] for s in sent]).mean(0)
            theta_g[k] = _outer(theta_g[k], mean, outer, momentum[k])
            for g in range(groups):
                live = params(g)[k]
                live.data.copy_(alpha * live.detach() + (1 - alpha) * theta_g[k] if alpha else theta_g[k])

    def starts_at(t):
        out = []
        for f in range(fragments):
            offset = (f + 1) * sync_every // fragments
            if t >= offset and (t - offset) % sync_every == 0:
                out.append(f)
        return out

    for b in range(steps):
        for g, net in enumerate(nets):
            losses = [F.mse_loss(net(batches[r][b][0]), batches[r][b][1])
                      for r in range(g * group_size, (g + 1) * group_size)]
            torch.stack(losses).mean().backward()
        if b < warmup and groups > 1:
            for ps in zip(*[list(n.parameters()) for n in nets]):
                mean = torch.stack([p.grad for p in ps]).mean(0)
                for p in ps:
                    p.grad = mean.clone()
        for g in range(groups):
            opts[g].step()
            opts[g].zero_grad()
        if b < warmup:
            if b + 1 == warmup:
                theta_g.update({k: v.detach().clone() for k, v in nets[0].named_parameters()})
            history.append([{k: v.detach().clone() for k, v in n.named_parameters()} for n in nets])
            continue
        t = b + 1 - warmup
        for f in starts_at(t):
            start(f)
        if t > overlap:
            for f in starts_at(t - overlap):
                apply(f, mix)
        history.append([{k: v.detach().clone() for k, v in n.named_parameters()} for n in nets])
    for f in sorted(in_flight):
        apply(f, mix)
    # F=1, τ=0, α=0 is plain local SGD: no sync at the end of a full interval (with α the groups differ after a sync)
    streaming = fragments > 1 or overlap > 0 or mix > 0
    local = steps - warmup
    if sync_on_train_end and local > 0 and (local % sync_every or streaming):
        for f in range(fragments):
            start(f)
            apply(f, 0.0)
    final = [{k: v.detach().clone() for k, v in n.named_parameters()} for n in nets]
    return history, final, theta_g, {k: m.get("buf") for k, m in momentum.items()}


def gathered_compressed_sync(theta, locals_, weights, errors, codec: str):
    """One sync of the all-gather exchange (a sparse codec's), written out: every member encodes θ − θ_i + e_i whole,
    once; every member decodes all of them and sums them in member order, ``Σ w_i·d_i / Σ w_i`` (a member of weight
    0 is not read and keeps its residual; no member weighs in: θ stays); a codec whose ``aggregate`` is ``"senders"``
    divides each value by the weight of the members whose decoded value is non-zero there instead. The residual kept
    is the codec's ``feedback_decay`` times what its payload did not carry. Returns (new θ, errors)."""
    n = theta.numel()
    decay = get_codec(codec).feedback_decay
    decoded, new_errors = [], []
    for x, w, e in zip(locals_, weights, errors):
        d = theta - x + e
        s = decode(encode(d, codec), codec, n)
        new_errors.append(decay * (d - s) if w != 0 else e)
        decoded.append(s)
    total_weight = sum(weights)
    if total_weight == 0:
        return theta, new_errors
    total = torch.zeros(n)
    for w, s in zip(weights, decoded):
        if w != 0:
            total += w * s
    if get_codec(codec).aggregate == "senders":  # each value: over the weight of the members that sent it (non-zero)
        senders = sum(w * (s != 0).float() for w, s in zip(weights, decoded) if w != 0)
        return theta - torch.where(senders > 0, total / senders, torch.zeros(n)), new_errors
    return theta - total / total_weight, new_errors


def weighted_compressed_sync(theta, locals_, weights, errors, mean_errors, codec: str = "int8"):
    """One sync of the weighted two-phase compressed mean (averaging outer step), written out. ``weights[i]``: member
    i's weight (0: it sends nothing that counts and keeps its residual); ``errors[i]``: its phase-1 residual;
    ``mean_errors[j]``: the phase-2 residual the owner of chunk j kept from a sync of the same membership (None: none).
    The residuals kept are the codec's ``feedback_decay`` times what it lost. A codec whose exchange is the all-gather
    (:func:`gathered_compressed_sync`) keeps no mean residuals: ``mean_errors`` comes back as it went in.
    Returns (new θ, errors, mean residuals)."""
    if get_codec(codec).exchange == "all_gather":
        theta, errors = gathered_compressed_sync(theta, locals_, weights, errors, codec)
        return theta, errors, mean_errors
    size, n = len(locals_), theta.numel()
    chunk = math.ceil(n / size)
    total_weight = sum(weights)
    decay = get_codec(codec).feedback_decay  # what is kept: β times what the codec lost (1 but for topk)
    decoded, new_errors = [], []
    for x, w, e in zip(locals_, weights, errors):
        d = F.pad(theta - x + e, (0, chunk * size - n))
        q = [decode(encode(d[j * chunk : (j + 1) * chunk], codec), codec, chunk) for j in range(size)]
        new_errors.append(decay * (d - torch.cat(q))[:n] if w != 0 else e)
        decoded.append(q)
    sent, new_mean_errors = [], []
    for j in range(size):
        m = sum(w * q[j] for w, q in zip(weights, decoded) if w != 0) / total_weight
        if mean_errors[j] is not None:
            m = m + mean_errors[j]
        s = decode(encode(m, codec), codec, chunk)
        new_mean_errors.append(decay * (m - s))
        sent.append(s)
    return theta - torch.cat(sent)[:n], new_errors, new_mean_errors


class Alone(Communicator):
    """A cross group of one (no process group needed): the engine never talks with a single group."""

    size, rank = 1, 0

    def all_reduce(self, tensor, op="sum", async_op=False):
        return None

    def all_to_all(self, output, input, async_op=False):
        output.copy_(input)

    def all_gather(self, output, input):
        output.copy_(input)


def check_against_reference(ranks: Sequence[dict], world: int, group_size: int, **sim) -> None:
    """Every rank's parameters after every step and at the end (``ranks``: the dumps of workers/train_tiny.py) are
    :func:`simulate`'s for its group, within :data:`ATOL`."""
    history, final, _ = simulate(world, group_size, **sim)
    for r, dump in enumerate(ranks):
        g = r // group_size
        assert len(dump["steps"]) == len(history)
        for b, (got, want) in enumerate(zip(dump["steps"], history)):
            assert max_diff(got, want[g]) <= ATOL, f"rank {r} batch {b}: {max_diff(got, want[g])}"
        assert max_diff(dump["final"], final[g]) <= ATOL
