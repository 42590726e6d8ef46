"""The compressed reduce's pipeline: many buckets, an uneven last bucket and chunk, weights and the stop flag, against
the two phases written out by hand (bit for bit); a collective failing mid-pipeline leaves θ_g and both error
feedbacks as they were. Members are threads of this process over a communicator whose collectives complete only once
every member has launched them (as a real transport's), or ranks over gloo."""

from __future__ import annotations

import functools
import math
import threading

import pytest
import torch

from lightning_localsgd.engine import OuterSync
from lightning_localsgd.engine.codecs import TopKCodec, get_codec, payload_bytes, register_codec
from lightning_localsgd.engine.comm import Communicator
from reference import gathered_compressed_sync, weighted_compressed_sync
from test_outer import spawn
from workers.tiny import TOPK_SENDERS, TOPK_TEST, TOPK_TWO_PHASE

SHAPES = [(37, 41), (300,), (1, 1200)]  # 2,977 values; tensor boundaries fall inside buckets
N = sum(math.prod(s) for s in SHAPES)


class AsyncGroup:
    """The members' collectives by launch order: the ``k``-th collective every member launched is done once the last
    member launched it (a wait before that blocks, as a real transport's). Members launching different collectives at
    the same place is an error, as is a ``k`` listed in ``fail`` (its wait raises on every member)."""

    def __init__(self, size: int, fail: tuple[str, int] | None = None) -> None:
        self.size, self.fail = size, fail
        self.lock = threading.Condition()
        self.ops: dict[int, dict] = {}
        self.log: list[tuple[str, int]] = []  # (kind, bytes sent by member 0)
        self.counts = {"all_to_all": 0, "all_gather": 0}

    def launch(self, rank: int, seq: int, kind: str, output: torch.Tensor, input: torch.Tensor) -> "AsyncWork":
        with self.lock:
            op = self.ops.setdefault(seq, {"kind": kind, "inputs": {}, "outputs": {}, "done": False})
            assert op["kind"] == kind, f"collective {seq}: member {rank} launched {kind}, another {op['kind']}"
            op["inputs"][rank], op["outputs"][rank] = input.clone(), output
            if rank == 0:
                self.counts[kind] += 1
                op["index"] = self.counts[kind]
                self.log.append((kind, input.numel()))
            if len(op["inputs"]) == self.size:
                inputs = [op["inputs"][r] for r in range(self.size)]
                for r, out in op["outputs"].items():
                    if kind == "all_to_all":
                        width = inputs[0].numel() // self.size
                        out.copy_(torch.cat([x[r * width : (r + 1) * width] for x in inputs]))
                    else:
                        out.copy_(torch.cat(inputs))
                op["done"] = True
                self.lock.notify_all()
        return AsyncWork(self, seq)


class AsyncWork:
    def __init__(self, group: AsyncGroup, seq: int) -> None:
        self.group, self.seq = group, seq

    def wait(self) -> None:
        with self.group.lock:
            op = self.group.ops[self.seq]
            assert self.group.lock.wait_for(lambda: op["done"], timeout=30), f"collective {self.seq} never completed"
            if self.group.fail is not None and (op["kind"], op.get("index")) == self.group.fail:
                raise ConnectionError(f"{op['kind']} {op['index']}: connection closed by peer")


class AsyncComm(Communicator):
    def __init__(self, group: AsyncGroup, rank: int) -> None:
        self.group, self._rank, self.seq = group, rank, 0

    @property
    def size(self) -> int:
        return self.group.size

    @property
    def rank(self) -> int:
        return self._rank

    def _launch(self, kind, output, input):
        self.seq += 1
        return self.group.launch(self._rank, self.seq, kind, output, input)

    def all_reduce(self, tensor, op="sum", async_op=False):
        raise AssertionError("a compressed sync of averaging without buffers runs no all-reduce across groups")

    def all_to_all(self, output, input, async_op=False):
        work = self._launch("all_to_all", output, input)
        if async_op:
            return work
        work.wait()
        return None

    def all_gather(self, output, input):
        self._launch("all_gather", output, input).wait()

    def all_gather_async(self, output, input):
        return self._launch("all_gather", output, input)


def run_members(engines, fn):
    """``fn(rank, engine)`` on every member at once (threads); their results, or the first member's error."""
    results, errors = [None] * len(engines), [None] * len(engines)

    def run(r):
        try:
            results[r] = fn(r, engines[r])
        except BaseException as err:  # noqa: BLE001 (re-raised below)
            errors[r] = err

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if any(e is not None for e in errors):
        raise next(e for e in errors if e is not None)
    return results


def theta0() -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(3))


def locals_at(sync: int, size: int, theta: torch.Tensor) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(50 + sync)
    return [theta + 0.01 * torch.randn(N, generator=g) for _ in range(size)]


def members(group: AsyncGroup, codec: str, bucket_bytes: int, **options) -> list[OuterSync]:
    out = []
    for r in range(group.size):
        flat = theta0()
        params, offset = [], 0
        for shape in SHAPES:
            numel = math.prod(shape)
            params.append(torch.nn.Parameter(flat[offset : offset + numel].view(shape).clone(), requires_grad=False))
            offset += numel
        out.append(OuterSync(params, cross_group=AsyncComm(group, r), compression=codec, bucket_bytes=bucket_bytes,
                             **options))
    return out


def set_locals(engines: list[OuterSync], locals_: list[torch.Tensor]) -> None:
    for engine, x in zip(engines, locals_):
        offset = 0
        for p in engine.tensors:
            p.data.copy_(x[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def state(engine: OuterSync) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """θ_g, the phase-1 residual and the phase-2 residuals of a member (copies)."""
    return (torch.cat([s.detach().reshape(-1) for s in engine.snapshot]), engine.compressor.error.clone(),
            {s.index: s.mean_error.clone() for s in (engine.whole, *engine.fragments) if s.mean_error is not None})


BLOCK = 256  # values of each chunk per bucket: one block of int8 / int4, 256 values of bf16, 4 chunks of topk_test


def bucket_bytes(size: int) -> int:
    """The ``bucket_bytes`` (fp32 over the ``size`` chunks) that makes buckets of :data:`BLOCK` values per chunk."""
    return 4 * size * BLOCK


@pytest.mark.parametrize("codec,size,weighted", [("int8", 3, True), ("int4", 2, True), ("bf16", 3, False),
                                                 ("int8", 2, False), (TOPK_TWO_PHASE, 3, True),
                                                 (TOPK_TWO_PHASE, 2, False), (TOPK_TEST, 3, True),
                                                 (TOPK_TEST, 2, False), (TOPK_SENDERS, 3, True),
                                                 (TOPK_SENDERS, 2, False)])
def test_many_buckets_match_the_hand_reference_bit_for_bit(codec, size, weighted):
    """Two phases, or topk_test's all-gather (its values divided by the number of members, or for topk_test_senders
    by the members that sent each): each bucket (``size`` × 256 values: 4 or 6 buckets, the last one short
    and ending in a short chunk of 64) all-gathered as soon as it is encoded, against the hand reference, which
    encodes every member's values whole: one residual per member, no mean residual, one payload per member."""
    gathered = codec in (TOPK_TEST, TOPK_SENDERS)
    group = AsyncGroup(size)
    engines = members(group, codec, bucket_bytes(size))
    chunk = math.ceil(N / size)  # 993 (3 members) / 1489 (2): an uneven last bucket, a padded last chunk
    theta, errors, mean_errors = theta0(), [torch.zeros(N)] * size, [None] * size
    syncs = [(3.0, 0.0, 1.5), (1.0, 2.0, 2.0)] if weighted else [(1.0,) * size] * 2  # a member of weight 0, then not
    for sync, weights in enumerate(syncs):
        weights = weights[:size]
        locals_ = locals_at(sync, size, theta)
        set_locals(engines, locals_)
        group.log.clear()
        stops = [r == size - 1 and sync == 1 for r in range(size)]
        results = run_members(engines, lambda r, e: e.sync(weight=weights[r], stop=stops[r]) if weighted else e.sync())
        theta, errors, mean_errors = weighted_compressed_sync(theta, locals_, list(weights), errors, mean_errors, codec)
        for r, e in enumerate(engines):
            snapshot, error, mean_error = state(e)
            assert torch.equal(snapshot, theta), (sync, r)
            assert torch.equal(error, errors[r]), (sync, r)
            assert mean_error == {} if gathered else torch.equal(mean_error[None], mean_errors[r]), (sync, r)
            assert torch.equal(torch.cat([p.detach().reshape(-1) for p in e.tensors]), theta)
            assert results[r].stop_requested == (weighted and sync == 1)
        extras = 4 * 2 if weighted else 0  # weight and stop flag, once per chunk (per member when gathered)
        if gathered:
            assert [k for k, _ in group.log] == ["all_gather"] * math.ceil(N / (size * BLOCK))
            assert sum(b for _, b in group.log) == results[0].bytes_sent == payload_bytes(codec, N) + extras
            continue
        # bucket after bucket: every all-to-all, then every all-gather, one per bucket; the bytes: the codec's payload
        buckets = math.ceil(chunk / BLOCK)
        assert [k for k, _ in group.log] == ["all_to_all"] * buckets + ["all_gather"] * buckets
        sent = sum(b for k, b in group.log if k == "all_to_all")
        assert sent == results[0].bytes_sent == size * (payload_bytes(codec, chunk) + extras)
        assert sum(b for k, b in group.log if k == "all_gather") == payload_bytes(codec, chunk)
    assert all(float(e.abs().max()) > 0 for e in errors)  # the codec lost something
    assert mean_errors == [None] * size if gathered else float(mean_errors[0].abs().max()) > 0


@pytest.mark.parametrize("aggregate,step", [("senders", [4.5, 0.0, 3.0, 0.0]), ("mean", [3.0, 0.0, 1.0, 0.0])])
def test_all_gather_aggregate_by_hand(aggregate, step):
    """Three members, one chunk of 4 values, the top 1 of each in 2 bits (the largest magnitude ``s`` decodes to
    ``3s/4``). Pseudo-gradients ``θ_g − θ_i``: (4, 0, 0, 1), (8, 0, 1, 0), (0, 0, 4, 2): members 0 and 1 send value 0
    (3 and 6), member 2 value 2 (3). ``"senders"`` moves θ_g by (3 + 6)/2 = 4.5 at 0 and by 3 at 2 (what one member
    sent, whole); ``"mean"`` by (3 + 6)/3 = 3 and 3/3 = 1. The residuals, 0.95 × what each member did not send, do not
    depend on it."""
    name = f"topk_test_k1_{aggregate}"
    register_codec(name, TopKCodec(chunk=4, k=1, aggregate=aggregate), override=True)
    group = AsyncGroup(3)
    engines = [OuterSync([torch.nn.Parameter(torch.zeros(4), requires_grad=False)], cross_group=AsyncComm(group, r),
                         compression=name) for r in range(3)]
    deltas = torch.tensor([[4.0, 0, 0, 1], [8, 0, 1, 0], [0, 0, 4, 2]])
    set_locals(engines, list(-deltas))  # θ_g = 0
    run_members(engines, lambda r, e: e.sync())
    kept = 0.95 * torch.tensor([[1.0, 0, 0, 1], [2, 0, 1, 0], [0, 0, 1, 2]])
    for r, e in enumerate(engines):
        assert torch.equal(e.snapshot[0].detach(), -torch.tensor(step)), r
        assert torch.equal(e.compressor.error, kept[r]), r


def test_topk_recipe_is_registered_as_documented():
    """compression="topk_recipe" is TopKCodec(k=96, indices="elias-fano", aggregate="senders") at topk's bytes (116 per
    4096 values), and outer_optimizer="topk_recipe" outer SGD with lr √2 and no momentum. Two members' sync with both:
    θ_g ← θ_g − √2 · (θ_g − m), m the hand reference's per-sender mean of the gathered payloads; residuals 0.95 × what
    each member did not send."""
    from lightning_localsgd.engine.presets import resolve_outer_optimizer

    codec = get_codec("topk_recipe")
    assert (codec.k, codec.chunk, codec.value_bits, codec.indices, codec.exchange, codec.aggregate,
            codec.feedback_decay) == (96, 4096, 2, "elias-fano", "all_gather", "senders", 0.95)
    assert payload_bytes("topk_recipe", 4096) == payload_bytes("topk", 4096) == 116
    factory = resolve_outer_optimizer("topk_recipe")
    opt = factory([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == math.sqrt(2)
    assert opt.defaults["momentum"] == 0 and not opt.defaults["nesterov"]
    n = 2 * 4096 + 300
    theta = torch.randn(n, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(8)
    locals_ = [theta + 0.01 * torch.randn(n, generator=g) for _ in range(2)]
    group = AsyncGroup(2)
    engines = [OuterSync([torch.nn.Parameter(theta.clone(), requires_grad=False)], outer_optimizer=factory,
                         cross_group=AsyncComm(group, r), compression="topk_recipe") for r in range(2)]
    set_locals(engines, locals_)
    run_members(engines, lambda r, e: e.sync())
    mean, errors = gathered_compressed_sync(theta, locals_, [1.0, 1.0], [torch.zeros(n)] * 2, "topk_recipe")
    expected = theta - math.sqrt(2) * (theta - mean)
    for r, e in enumerate(engines):
        torch.testing.assert_close(e.snapshot[0].detach(), expected, rtol=0, atol=1e-6)
        assert torch.equal(e.compressor.error, errors[r]), r
    assert float((theta - mean).ne(0).float().mean()) > 0.0234  # the union of two members' 2.34% of the values


def test_sparse_all_gather_streams_fragments_with_both_in_flight():
    """Streaming with topk_test's all-gather, 3 members, time-based weights (one member of weight 0 in the second
    fragment): fragment 0's sync is started, the members move on (inner steps) while its buckets are in flight and
    start fragment 1's, then both are applied (α = 0); twice. Each fragment's θ_g and residual (its range of the
    member's one residual) equal the hand reference on its range, bit for bit."""
    size = 3
    group = AsyncGroup(size)
    engines = members(group, TOPK_TEST, 4 * BLOCK, fragments=2)
    ranges = [engines[0].fragment_sync(f).owned for f in range(2)]
    assert ranges[0][1] == ranges[1][0] and ranges[1][1] == N and ranges[0][1] > 2 * BLOCK  # buckets in each
    theta, errors = theta0(), [torch.zeros(N)] * size
    for sync, weights in enumerate([((2.0, 1.0, 3.0), (1.0, 1.0, 1.0)), ((1.0, 2.0, 1.0), (1.0, 0.0, 2.0))]):
        at_start = [locals_at(2 * sync, size, theta), locals_at(2 * sync + 1, size, theta)]

        def member(r, e):
            set_locals([e], [at_start[0][r]])
            e.start_sync(0, weight=weights[0][r])
            set_locals([e], [at_start[1][r]])  # inner steps while fragment 0's collectives are in flight
            e.start_sync(1, weight=weights[1][r])
            return [e.finish_sync(0), e.finish_sync(1)]

        group.log.clear()
        results = run_members(engines, member)
        new_theta, new_errors = theta.clone(), [e.clone() for e in errors]
        for f, (lo, hi) in enumerate(ranges):
            part, kept = gathered_compressed_sync(theta[lo:hi], [x[lo:hi] for x in at_start[f]], list(weights[f]),
                                                  [e[lo:hi] for e in errors], TOPK_TEST)
            new_theta[lo:hi] = part
            for r in range(size):
                new_errors[r][lo:hi] = kept[r]
        theta, errors = new_theta, new_errors
        for r, e in enumerate(engines):
            snapshot, error, mean_error = state(e)
            assert torch.equal(snapshot, theta) and torch.equal(error, errors[r]) and mean_error == {}, (sync, r)
            assert torch.equal(torch.cat([p.detach().reshape(-1) for p in e.tensors]), theta)
            assert [res.bytes_sent for res in results[r]] == [payload_bytes(TOPK_TEST, hi - lo) + 4
                                                              for lo, hi in ranges]
        assert [k for k, _ in group.log] == ["all_gather"] * sum(math.ceil((hi - lo) / BLOCK) for lo, hi in ranges)
    assert all(float(e.abs().max()) > 0 for e in errors)


def test_sparse_all_gather_in_flight_saved_and_resumed_is_exact(tmp_path):
    """A checkpoint taken while topk_test's fragment-0 sync is in flight (its gathered payloads and the new residual in
    the saved reduction) and loaded into new engines finishes to the same θ_g and residuals, bit for bit, as engines
    never stopped; the next sync too."""
    size = 3
    straight = members(AsyncGroup(size), TOPK_TEST, 4 * BLOCK, fragments=2)
    saved = members(AsyncGroup(size), TOPK_TEST, 4 * BLOCK, fragments=2)
    theta = theta0()
    for engines in (straight, saved):
        set_locals(engines, locals_at(0, size, theta))
        run_members(engines, lambda r, e: e.start_sync(0, weight=float(r + 1)))
    for r, e in enumerate(saved):
        torch.save(e.state_dict(), tmp_path / f"rank{r}.pt")
    resumed = members(AsyncGroup(size), TOPK_TEST, 4 * BLOCK, fragments=2)
    for r, e in enumerate(resumed):
        e.load_state_dict(torch.load(tmp_path / f"rank{r}.pt", weights_only=False))
        assert list(e.pending) == [0]
    for engines in (straight, resumed):
        run_members(engines, lambda r, e: e.finish_sync(0))
        set_locals(engines, locals_at(1, size, state(engines[0])[0]))
        run_members(engines, lambda r, e: e.sync(weight=1.0))
    for a, b in zip(straight, resumed):
        (snap_a, err_a, mean_a), (snap_b, err_b, mean_b) = state(a), state(b)
        assert torch.equal(snap_a, snap_b) and torch.equal(err_a, err_b) and mean_a == mean_b == {}
    assert not torch.equal(state(straight[0])[0], theta0()) and float(state(straight[0])[1].abs().max()) > 0


@pytest.mark.parametrize("codec,fail", [("int8", ("all_to_all", 3)), ("int8", ("all_gather", 2)),
                                        ("int8", ("all_gather", 6)), (TOPK_TEST, ("all_gather", 3))])
def test_a_failure_mid_pipeline_leaves_theta_g_and_both_error_feedbacks_as_they_were(codec, fail):
    """int8 (two phases) or topk_test (all-gather: 6 buckets of 512 values, the third one fails)."""
    size = 2
    group = AsyncGroup(size)
    engines = members(group, codec, bucket_bytes(size))  # 6 buckets: 5 of 256 values per chunk, one of 209
    theta, errors, mean_errors = theta0(), [torch.zeros(N)] * size, [None] * size
    weights = (2.0, 1.0)
    set_locals(engines, locals_at(0, size, theta))
    run_members(engines, lambda r, e: e.sync(weight=weights[r]))
    theta, errors, mean_errors = weighted_compressed_sync(theta, locals_at(0, size, theta), list(weights), errors,
                                                          mean_errors, codec)
    before = [state(e) for e in engines]
    assert all(torch.equal(b[0], theta) for b in before)
    locals_ = locals_at(1, size, theta)
    set_locals(engines, locals_)
    group.counts = {"all_to_all": 0, "all_gather": 0}
    group.fail = fail
    with pytest.raises(ConnectionError, match="closed by peer"):
        run_members(engines, lambda r, e: e.sync(weight=weights[r]))
    for e, (snapshot, error, mean_error) in zip(engines, before):
        assert not e.pending
        now = state(e)
        assert torch.equal(now[0], snapshot) and torch.equal(now[1], error)
        assert now[2].keys() == mean_error.keys() and all(torch.equal(now[2][k], v) for k, v in mean_error.items())
    group.fail = None  # the attempt is redone (a fault-tolerant transport: over a new quorum) and goes through
    run_members(engines, lambda r, e: e.sync(weight=weights[r]))
    theta, errors, mean_errors = weighted_compressed_sync(theta, locals_, list(weights), errors, mean_errors, codec)
    for r, e in enumerate(engines):
        snapshot, error, mean_error = state(e)
        assert torch.equal(snapshot, theta) and torch.equal(error, errors[r])
        if codec == TOPK_TEST:  # all-gather: no mean residual
            assert mean_error == {} and mean_errors[r] is None
        else:
            assert torch.equal(mean_error[None], mean_errors[r])


def scenario_gloo(rank, world, codec):
    """Two weighted syncs over gloo with buckets of one block per chunk (its collectives really in flight)."""
    flat = theta0()
    params, offset = [], 0
    for shape in SHAPES:
        params.append(torch.nn.Parameter(flat[offset : offset + math.prod(shape)].view(shape).clone(),
                                         requires_grad=False))
        offset += math.prod(shape)
    engine = OuterSync(params, compression=codec, bucket_bytes=bucket_bytes(world))
    theta, out = theta0(), []
    for sync in range(2):
        x = locals_at(sync, world, theta)[rank]
        offset = 0
        for p in params:
            p.data.copy_(x[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        result = engine.sync(weight=float(rank + 1))
        theta = torch.cat([s.detach().reshape(-1) for s in engine.snapshot])
        mean_error = engine.whole.mean_error
        out.append((theta, engine.compressor.error.clone(), mean_error.clone() if mean_error is not None else None,
                    result.bytes_sent))
    return out


@pytest.mark.parametrize("codec,world", [("int4", 2), (TOPK_TWO_PHASE, 2), (TOPK_TEST, 3)])
def test_many_buckets_over_gloo_match_the_hand_reference_bit_for_bit(tmp_path, codec, world):
    """Two phases (int4, topk_test_two_phase: one compressed copy in G chunks a rank) or all-gather (topk_test: one
    payload of the rank's values, 3 ranks)."""
    got = spawn(functools.partial(scenario_gloo, codec=codec), world, tmp_path)
    theta, errors, mean_errors = theta0(), [torch.zeros(N)] * world, [None] * world
    gathered = codec == TOPK_TEST
    for sync in range(2):
        theta, errors, mean_errors = weighted_compressed_sync(theta, locals_at(sync, world, theta),
                                                              [1.0 + r for r in range(world)], errors, mean_errors,
                                                              codec)
        for r in range(world):
            snapshot, error, mean_error, sent = got[r][sync]
            assert torch.equal(snapshot, theta) and torch.equal(error, errors[r])
            if gathered:
                assert mean_error is None
                assert sent == payload_bytes(codec, N) + 4
            else:
                assert torch.equal(mean_error, mean_errors[r])
                assert sent == world * (payload_bytes(codec, math.ceil(N / world)) + 4)


@pytest.mark.parametrize("codec", [TOPK_TEST, TOPK_TWO_PHASE, "int8"])
def test_resume_from_a_state_dict_with_error_feedback_is_exact(tmp_path, codec):
    """Members that save their state after a sync (θ_g and the error feedbacks, decayed for topk; the all-gather's
    one residual) and load it into new engines go on bit for bit as members that were never stopped."""
    size = 2
    group = AsyncGroup(size)
    straight = members(group, codec, bucket_bytes(size))
    theta = theta0()
    history = []
    for sync in range(3):
        set_locals(straight, locals_at(sync, size, theta))
        run_members(straight, lambda r, e: e.sync())
        theta = state(straight[0])[0]
        history.append([state(e) for e in straight])
    assert float(history[0][0][1].abs().max()) > 0
    if codec == TOPK_TEST:  # all-gather: one residual per member, nothing of a mean
        assert history[0][0][2] == {}
    else:
        assert float(history[0][0][2][None].abs().max()) > 0

    group = AsyncGroup(size)
    first = members(group, codec, bucket_bytes(size))
    theta = theta0()
    set_locals(first, locals_at(0, size, theta))
    run_members(first, lambda r, e: e.sync())
    for r, e in enumerate(first):
        torch.save(e.state_dict(), tmp_path / f"rank{r}.pt")
    theta = state(first[0])[0]
    group = AsyncGroup(size)
    resumed = members(group, codec, bucket_bytes(size))
    for r, e in enumerate(resumed):
        e.load_state_dict(torch.load(tmp_path / f"rank{r}.pt", weights_only=False))
    for sync in (1, 2):
        set_locals(resumed, locals_at(sync, size, theta))
        run_members(resumed, lambda r, e: e.sync())
        theta = state(resumed[0])[0]
        for e, (snapshot, error, mean_error) in zip(resumed, history[sync]):
            now = state(e)
            assert torch.equal(now[0], snapshot) and torch.equal(now[1], error)
            assert now[2].keys() == mean_error.keys() and all(torch.equal(now[2][k], v) for k, v in mean_error.items())
