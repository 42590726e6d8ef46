"""The cross-group reduce of a sync, in two halves: ``start`` launches the collective, ``finish`` returns the mean.

* :class:`MeanReducer`: the fp32 all-reduce of the owned parameters, cut in buckets that are all in flight together;
  optionally weighted (``Σ w_i θ_i / Σ w_i``: one extra float) and carrying a stop flag (one more float).
* :class:`CompressedReducer`: the two-phase compressed all-reduce. Each rank splits its pseudo-gradient ``θ_g − θ_i``
  plus the codec's error at the previous sync (error feedback) in ``G`` chunks and encodes them; an all-to-all gives
  rank ``j`` every group's chunk ``j``, which it decodes and averages; it encodes that mean (plus its own error
  feedback of this second encoding) and an all-gather hands every rank all the mean chunks. Each rank sends
  ``2(G−1)/G`` of one compressed copy, as a ring all-reduce does. A weighted reduce (``Σ w_i d_i / Σ w_i``) appends
  the sender's weight (and a stop flag) to every chunk it sends, so each chunk owner, and every rank, knows every
  weight; the chunks are weighted where they are decoded, so what is encoded (and the error feedback) does not
  depend on the weights. Both phases run in buckets, as a pipeline: the codec work of one bucket overlaps the
  transfer of the others, and the all-gathers of the first buckets the all-to-alls of the last.
* :class:`AllGatherReducer`: the exchange of the codecs whose payloads are not closed under averaging (the sparse
  ones: :attr:`~.codecs.Codec.exchange` ``"all_gather"``): every member's encoded pseudo-gradient to every member, which
  decodes and sums them itself; one residual per rank. :func:`compressed_reducer` picks the codec's.

Both talk only through a :class:`~lightning_localsgd.engine.comm.Communicator`. Between ``start`` and ``finish`` the
collective runs behind the caller's inner steps (streaming sync); a :class:`Reduction` in flight can be saved.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from .codecs import get_codec
from .comm import Communicator, Work

if TYPE_CHECKING:
    from .fragment import FragmentSync

__all__ = ["AllGatherReducer", "CompressedReducer", "MeanReducer", "Reduction", "assign_buffers", "compressed_reducer",
           "finite_buffer_mean", "gather_slices", "reduce_buffers"]

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024  # as DDP's default bucket_cap_mb
DEFAULT_COMPRESSED_BUCKET_BYTES = 4 * 1024 * 1024
"""fp32 bytes of pseudo-gradient (over all chunks) per bucket of the compressed pipeline: at 100 Mbit/s an int8 bucket
is ~0.1 s on the wire, and one bucket's encoding, the part of phase 1 that nothing hides, ~10 ms of one CPU core."""


@dataclass
class Reduction:
    """A reduce started and not yet finished (its collective may still be in flight)."""

    fragment: Optional[int]
    numel: int
    weighted: bool
    has_stop: bool
    buf: Optional[Tensor] = None
    """The reduce buffer (fp32 values, weight, stop flag) or the received compressed chunks (uint8)."""
    payload_numel: int = 0
    bucket_numel: int = 0
    """A compressed reduce: elements of each chunk per pipelined bucket (0: the whole chunk in one bucket)."""
    new_error: Optional[Tensor] = None
    new_mean_error: Optional[Tensor] = None
    sent: int = 0
    seconds: float = 0.0
    total_weight: Optional[float] = None
    """A weighted reduce, once finished: ``Σ_i w_i`` over the groups (0: no group weighed in)."""
    chunk_owner: Optional[tuple[int, int]] = None
    """A compressed reduce, once finished: ``(members, this rank)`` of the quorum that owned its mean chunks."""
    works: list[Work] = field(default_factory=list)
    region: Optional[tuple[int, int]] = None
    """The range of :attr:`MeanReducer.workspace` that ``buf`` is (``None``: a buffer of its own); not saved."""

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []

    def state_dict(self) -> dict[str, Any]:
        self.wait()
        assert self.buf is not None
        state = {k: getattr(self, k) for k in ("fragment", "numel", "weighted", "has_stop", "payload_numel",
                                               "bucket_numel", "sent", "seconds")}
        state["buf"] = self.buf.detach().cpu().clone()
        state["new_error"] = self.new_error.detach().cpu().clone() if self.new_error is not None else None
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "Reduction":
        reduction = cls(**{k: v for k, v in state.items() if k not in ("buf", "new_error")})
        reduction.buf = state["buf"].to(device)
        reduction.new_error = state["new_error"].to(device) if state["new_error"] is not None else None
        return reduction


class MeanReducer:
    """fp32 all-reduce of the owned values, bucketed, optionally weighted, with an optional stop flag.

    With ``numel`` (the rank's owned elements) the reduce runs in a persistent *workspace* of ``numel + 2`` fp32
    values, allocated at the first sync: a fragment's reduce uses the workspace at its place in the owned elements
    (its weight / stop flag right after its values), so no sync allocates (nor page-faults) a model-sized buffer. A
    reduce whose range overlaps one still in flight (``busy``) gets a buffer of its own, as every reduce did before.
    """

    def __init__(self, comm: Communicator, device: torch.device, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 numel: Optional[int] = None) -> None:
        self.comm = comm
        self.device = device
        self.bucket_bytes = int(bucket_bytes)
        self.numel = numel
        self.workspace: Optional[Tensor] = None
        """The persistent reduce buffer (``numel + 2`` fp32 values), once a sync has used it."""

    @property
    def workspace_bytes(self) -> int:
        return self.workspace.numel() * self.workspace.element_size() if self.workspace is not None else 0

    def _buckets(self, numel: int) -> list[tuple[int, int]]:
        per_bucket = max(1, self.bucket_bytes // 4)
        return [(lo, min(lo + per_bucket, numel)) for lo in range(0, numel, per_bucket)] or [(0, 0)]

    def _buffer(self, red: Reduction, size: int, offset: Optional[int],
                busy: Sequence[tuple[int, int]]) -> Tensor:
        """``size`` fp32 values for ``red``: the workspace at ``offset`` where that range is free, else a new tensor."""
        lo, hi = (offset, offset + size) if offset is not None else (0, 0)
        if (offset is None or self.numel is None or hi > self.numel + 2
                or any(lo < b and a < hi for a, b in busy)):
            return torch.empty(size, dtype=torch.float32, device=self.device)
        if self.workspace is None:
            self.workspace = torch.empty(self.numel + 2, dtype=torch.float32, device=self.device)
        red.region = (lo, hi)
        return self.workspace[lo:hi]

    def start(self, red: Reduction, local: list[Tensor], talk: bool, weight: Optional[float],
              stop: Optional[bool], offset: Optional[int] = None, busy: Sequence[tuple[int, int]] = ()) -> None:
        """Copy ``local`` (the owned views of the fragment) into the buffer and launch the all-reduce.

        ``offset``: where the fragment starts in the owned elements (``None``: no workspace); ``busy``: the workspace
        ranges of the reduces still in flight."""
        n = red.numel
        extras = [float(weight)] if weight is not None else []
        extras += [float(bool(stop))] if stop is not None else []
        buf = self._buffer(red, n + len(extras), offset, busy)
        if n:
            torch.cat([v.float().reshape(-1) for v in local], out=buf[:n])
        if weight is not None:
            buf[:n].mul_(float(weight))
        if extras:
            buf[n:] = torch.tensor(extras, dtype=torch.float32)
        red.buf = buf
        if talk:
            try:
                for lo, hi in self._buckets(buf.numel()):  # one all-reduce per bucket, all in flight together
                    red.works.append(self.comm.all_reduce(buf[lo:hi], async_op=True))
            except BaseException:
                self.discard(red)
                raise
            red.sent = buf.numel() * buf.element_size()

    def discard(self, red: Reduction) -> None:
        """``red`` ends without its collectives waited for (a failure, a dropped pending sync): they may still write
        into its buffer, so a workspace it used is left to them and the next sync allocates a new one."""
        if red.region is not None:
            self.workspace = None

    def finish(self, red: Reduction, snapshot: Callable[[], Tensor]) -> tuple[Tensor, bool]:
        """(mean of the groups' values, whether any group asked to stop); ``snapshot()``: θ_g of the fragment.

        The mean is computed in place in the reduce buffer (no new tensor): the caller may use that buffer as
        scratch; it never aliases ``snapshot()`` (an all-zero-weight reduce copies θ_g into the buffer)."""
        buf, n = red.buf, red.numel
        assert buf is not None
        stop_requested = bool(buf[-1].item() > 0) if red.has_stop else False
        mean = buf[:n]
        if red.weighted:
            red.total_weight = total_weight = float(buf[n].item())
            # every group's weight is 0 (e.g. a stop-sync right after a sync): nothing to average
            if total_weight > 0:
                mean.div_(total_weight)
            else:
                mean.copy_(snapshot())
        else:
            mean.div_(self.comm.size)
        return mean, stop_requested


@dataclass(frozen=True)
class _Buckets:
    """How a compressed reduce is cut. Member ``j`` owns chunk ``j`` (``chunk`` values from ``j·chunk``; the last one
    zero-padded); every chunk is cut alike in buckets, element ranges ``ranges`` of the chunk, which go through the
    pipeline one after the other. A member's piece of bucket ``b`` is ``payloads[b]`` bytes of codec payload (plus the
    weight / stop flag in bucket 0: ``sizes[b]`` bytes in all); bucket ``b`` is ``G`` such pieces, in member order, at
    byte ``offsets[b]`` of the send and receive buffers (``total`` bytes: one compressed copy of the values)."""

    chunk: int
    ranges: list[tuple[int, int]]
    payloads: list[int]
    sizes: list[int]
    offsets: list[int]
    total: int

    def span(self, b: int, groups: int) -> slice:
        """Bucket ``b``'s bytes in the send and receive buffers."""
        return slice(self.offsets[b], self.offsets[b] + groups * self.sizes[b])


class CompressedReducer:
    """Two-phase compressed all-reduce of the pseudo-gradient, with error feedback in both phases, pipelined in buckets.

    Error feedback, and what changes it:

    * phase 1 (:attr:`error`): this rank's own residual, in the units of its unweighted pseudo-gradient. A weighted
      reduce weighs the decoded chunks at the receiver, so the residual is the same whatever the weight; a member of
      weight 0 (a group that did not train the interval) sends no usable values and keeps its residual as it was.
    * phase 2 (the fragment's :attr:`~.fragment.FragmentSync.mean_error`): the residual of the mean chunk this rank
      encodes, which depends on which chunk that is: the members' number and this rank's index among them. A residual kept from a sync of another
      membership (a fault-tolerant transport's quorum changed) is dropped, not applied to another chunk.
    * both change only in :meth:`commit` (the sync went through); an aborted sync leaves them as they were. Both
      keep ``β`` times the codec's loss, ``β`` its :attr:`~.codecs.Codec.feedback_decay` (1 but for the topk codecs).

    The pipeline: every chunk is cut alike in buckets of about ``bucket_bytes`` fp32 bytes over the ``G`` chunks
    (whole codec blocks, :attr:`~.codecs.Codec.block_numel`; a codec without blocks sends each chunk whole). Phase 1
    encodes bucket after bucket and launches each bucket's all-to-all as soon as it is encoded, so the encoding of a
    bucket overlaps the transfer of the ones before; phase 2 averages and re-encodes each bucket as its all-to-all
    arrives and launches its all-gather at once, so that work overlaps the transfer of the later buckets; the gathered
    means are decoded as they arrive. Every member launches the collectives in the same order (bucket order, all
    all-to-alls first), whatever their timing. The codecs' blocks make the result identical, bit for bit, to one
    payload per chunk; only the order of the bytes on the wire differs. Memory: per sync, the compressed payloads
    (sent, received, gathered) and one bucket of fp32 scratch; from one sync to the next, a :attr:`workspace`.
    """

    #: Bytes appended to every chunk of a weighted reduce (the sender's weight) and one carrying a stop flag.
    EXTRA_BYTES = 4

    def __init__(self, comm: Communicator, codec: str, owned_numel: int, device: torch.device,
                 bucket_bytes: int = DEFAULT_COMPRESSED_BUCKET_BYTES) -> None:
        self.comm = comm
        self.codec_name = codec
        self.codec = get_codec(codec)
        self.owned_numel = owned_numel
        self.device = device
        self.bucket_bytes = int(bucket_bytes)
        self.error: Optional[Tensor] = None
        """Error feedback of phase 1, on this rank's owned pseudo-gradient (each fragment's
        :attr:`~.fragment.FragmentSync.error` is a view of it); that of phase 2 is each fragment's
        (:attr:`~.fragment.FragmentSync.mean_error`)."""
        self.workspace: Optional[Tensor] = None
        """Two fp32 copies of the owned elements, allocated at the first sync: row 0 holds the new phase-1 residuals
        of the syncs in flight (until :meth:`commit`), row 1 the mean :meth:`finish` returns. A model-sized tensor
        allocated afresh at every sync costs its page faults every time (tens of ms at 10M parameters)."""

    @property
    def workspace_bytes(self) -> int:
        return self.workspace.numel() * self.workspace.element_size() if self.workspace is not None else 0

    def _workspace(self, fragment: "FragmentSync") -> tuple[Tensor, Tensor]:
        """The fragment's new residuals and its mean in :attr:`workspace` (the fragments' ranges do not overlap)."""
        if self.workspace is None:
            self.workspace = torch.empty(2, self.owned_numel, dtype=torch.float32, device=self.device)
        olo, ohi = fragment.owned
        return self.workspace[0, olo:ohi], self.workspace[1, olo:ohi]

    def _chunk_numel(self, n: int) -> int:
        """Elements per chunk of ``n`` values (the last chunk is zero-padded)."""
        return max(1, math.ceil(n / self.comm.size))

    def _bucket_numel(self, chunk: int) -> int:
        """Elements of each chunk per bucket: ``bucket_bytes`` of fp32 over the ``G`` chunks, in whole codec blocks
        (at least one); 0: the whole chunk in one bucket (a codec without blocks, or a chunk that fits)."""
        block = self.codec.block_numel
        if not block:
            return 0
        per_chunk = self.bucket_bytes // (4 * self.comm.size)
        step = max(block, per_chunk // block * block)
        return step if step < chunk else 0

    @staticmethod
    def _extras(red: Reduction) -> int:
        return CompressedReducer.EXTRA_BYTES * (int(red.weighted) + int(red.has_stop))

    def _buckets(self, red: Reduction) -> _Buckets:
        groups, chunk = self.comm.size, self._chunk_numel(red.numel)
        step = red.bucket_numel or chunk
        ranges = [(lo, min(lo + step, chunk)) for lo in range(0, chunk, step)]
        payloads = [self.codec.payload_bytes(hi - lo) for lo, hi in ranges]
        sizes = [p + (self._extras(red) if b == 0 else 0) for b, p in enumerate(payloads)]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + groups * size)
        return _Buckets(chunk, ranges, payloads, sizes, offsets[:-1], offsets[-1])

    def _begin(self, red: Reduction, fragment: "FragmentSync", weight: Optional[float],
               stop: Optional[bool]) -> tuple[Tensor, Optional[Tensor]]:
        """The fragment's residual to add (allocated at the first sync), where its new one goes (``red.new_error``)
        and the bytes of the weight / stop flag that ride with the payload (``None``: neither)."""
        if self.error is None:
            self.error = torch.zeros(self.owned_numel, dtype=torch.float32, device=self.device)
        olo, ohi = fragment.owned
        # weight 0: nothing of this member's values counts, its residual stays as it was
        red.new_error = None if weight == 0.0 else self._workspace(fragment)[0]
        extras = [float(weight)] if weight is not None else []
        extras += [float(bool(stop))] if stop is not None else []
        tail = torch.tensor(extras, dtype=torch.float32, device=self.device).view(torch.uint8) if extras else None
        return self.error[olo:ohi], tail

    def start(self, red: Reduction, fragment: "FragmentSync", local: list[Tensor], snapshot: Tensor, talk: bool,
              weight: Optional[float] = None, stop: Optional[bool] = None) -> None:
        """Phase 1: encode the error-fed pseudo-gradient, bucket by bucket, launching each bucket's all-to-all.

        ``weight``: this member's weight in a weighted mean (``None``: uniform); ``stop``: its stop flag. Both ride
        with every chunk (4 bytes each, in its first bucket)."""
        n = red.numel
        if n == 0:
            red.buf = torch.zeros(0, dtype=torch.uint8, device=self.device)
            return
        groups = self.comm.size
        red.bucket_numel = self._bucket_numel(self._chunk_numel(n))
        plan = self._buckets(red)
        error, tail = self._begin(red, fragment, weight, stop)
        # the same few bytes after every chunk's first bucket: each chunk owner learns every member's weight
        send = torch.empty(plan.total, dtype=torch.uint8, device=self.device)
        red.buf = torch.empty_like(send) if talk else send
        red.payload_numel = plan.sizes[0]
        local_starts = _starts(local)
        scratch = torch.empty(max(hi - lo for lo, hi in plan.ranges), dtype=torch.float32, device=self.device)
        chunk = plan.chunk
        for b, (lo, hi) in enumerate(plan.ranges):
            width, payload, size, offset = hi - lo, plan.payloads[b], plan.sizes[b], plan.offsets[b]
            x = scratch[:width]
            for j in range(groups):
                a, z = min(j * chunk + lo, n), min(j * chunk + hi, n)
                _pseudo_gradient(x[: z - a], local, local_starts, a, z, snapshot, error)
                x[z - a :].zero_()  # the last chunk's padding
                q = self.codec.encode(x)
                piece = send[offset + j * size : offset + (j + 1) * size]
                piece[:payload] = q
                if b == 0 and tail is not None:
                    piece[payload:] = tail
                if red.new_error is not None and z > a:
                    torch.sub(x[: z - a], self.codec.decode(q, width)[: z - a], out=red.new_error[a:z])
            if talk:  # this bucket travels while the next one is encoded
                span = plan.span(b, groups)
                red.works.append(self.comm.all_to_all(red.buf[span], send[span], async_op=True))
        if talk:
            red.sent = plan.total  # bytes of one compressed copy of the slice, as one fp32 copy for an all-reduce

    def finish(self, red: Reduction, fragment: "FragmentSync", snapshot: Tensor) -> tuple[Tensor, bool]:
        """Phase 2: as each bucket's all-to-all arrives, average the received pieces of this rank's chunk, encode the
        mean (error feedback) and launch its all-gather; then decode the gathered means as they arrive.

        Waits for the all-to-alls :meth:`start` launched (``red.works``, one per bucket) itself. Returns (the new
        mean, whether any member asked to stop). A weighted reduce sets ``red.total_weight``; when it is 0 (no member
        weighed in) every member knows it from phase 1 and the mean is ``snapshot`` (no phase 2)."""
        n = red.numel
        if n == 0:
            return snapshot, False
        assert red.buf is not None
        groups, plan = self.comm.size, self._buckets(red)
        chunk, extras = plan.chunk, self._extras(red)
        arrivals = list(red.works)  # one all-to-all per bucket while talking; none for a reduce of one member

        def received(b: int) -> list[Tensor]:
            if arrivals:
                arrivals[b].wait()
            offset, size = plan.offsets[b], plan.sizes[b]
            return [red.buf[offset + i * size : offset + (i + 1) * size] for i in range(groups)]

        first = received(0)
        tails = [r[plan.payloads[0] :].clone().view(torch.float32).tolist() for r in first] if extras else []
        weights = [t[0] for t in tails] if red.weighted else []
        stop_requested = any(t[-1] > 0 for t in tails) if red.has_stop else False
        total_weight = 0.0
        if red.weighted:
            red.total_weight = total_weight = float(sum(weights))
            if total_weight <= 0:  # every member weighs 0 (e.g. all just joined): no mean, θ_g stays
                red.wait()  # the other buckets' all-to-alls, which every member launched
                return snapshot, stop_requested
        red.chunk_owner = owner = (groups, self.comm.rank)
        kept = fragment.mean_error
        if kept is not None and fragment.mean_error_owner not in (None, owner):
            kept = None
        new_mean_error = torch.empty(chunk, dtype=torch.float32, device=self.device)
        gathered: list[Tensor] = []
        gathers: list[Work] = []
        for b, (lo, hi) in enumerate(plan.ranges):
            width, payload = hi - lo, plan.payloads[b]
            pieces = first if b == 0 else received(b)
            total = torch.zeros(width, dtype=torch.float32, device=self.device)
            if red.weighted:
                for r, w in zip(pieces, weights):
                    if w != 0:  # a member of weight 0 may send anything (even non-finite): it is not read
                        total += w * self.codec.decode(r[:payload], width)
                mine = total / total_weight
            else:
                for r in pieces:
                    total += self.codec.decode(r[:payload], width)
                mine = total / groups
            if kept is not None:
                mine = mine + kept[lo:hi]
            q = self.codec.encode(mine)
            torch.sub(mine, self.codec.decode(q, width), out=new_mean_error[lo:hi])
            if groups > 1:  # gathered while the next buckets arrive and are averaged
                out = torch.empty(groups * payload, dtype=torch.uint8, device=self.device)
                gathers.append(self.comm.all_gather_async(out, q))
                gathered.append(out)
            else:
                gathered.append(q)
        red.works = []
        mean = self._workspace(fragment)[1]
        for b, (lo, hi) in enumerate(plan.ranges):
            width, payload = hi - lo, plan.payloads[b]
            if gathers:
                gathers[b].wait()
            for j in range(groups):
                a, z = min(j * chunk + lo, n), min(j * chunk + hi, n)
                if z > a:
                    mean_delta = self.codec.decode(gathered[b][j * payload : (j + 1) * payload], width)
                    torch.sub(snapshot[a:z], mean_delta[: z - a], out=mean[a:z])
        red.new_mean_error = new_mean_error
        return mean, stop_requested

    def commit(self, red: Reduction, fragment: "FragmentSync") -> None:
        """The sync went through: keep the errors this reduce made for the next one, times the codec's
        :attr:`~.codecs.Codec.feedback_decay` ``β`` (the next sync adds ``β·e``: SparseLoCo's ``e ← β·e + Δ``)."""
        decay = self.codec.feedback_decay
        if red.new_error is not None:
            assert self.error is not None
            olo, ohi = fragment.owned
            self.error[olo:ohi] = red.new_error
            if decay != 1.0:
                self.error[olo:ohi].mul_(decay)
        if red.new_mean_error is not None:
            fragment.mean_error = red.new_mean_error * decay if decay != 1.0 else red.new_mean_error
            if red.chunk_owner is not None:
                fragment.mean_error_owner = red.chunk_owner

    def drop(self, fragment: "FragmentSync") -> None:
        """The sync was skipped (non-finite): forget the fragment's error feedback."""
        if self.error is not None:
            olo, ohi = fragment.owned
            self.error[olo:ohi].zero_()
        fragment.forget_error()

    def reset(self, fragments: Iterable["FragmentSync"]) -> None:
        """Forget all error feedback (a group that joins a running federation starts from zero)."""
        self.error = None
        for fragment in fragments:
            fragment.forget_error()

    @property
    def state_bytes(self) -> int:
        """Bytes of the phase-1 residual (the fragments hold those of phase 2)."""
        return self.error.numel() * self.error.element_size() if self.error is not None else 0

    def state_dict(self) -> dict[str, Any]:
        """The phase-1 residual (the fragments' phase-2 residuals are saved with them: ``OuterSync.state_dict``)."""
        return {"compression_error": self.error.detach().cpu().clone() if self.error is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        error = state.get("compression_error")
        self.error = error.to(self.device) if error is not None else None


@dataclass(frozen=True)
class _GatherPlan:
    """How an all-gather reduce is cut: buckets ``ranges`` of the fragment's values (whole codec blocks), each member's
    piece of bucket ``b`` ``payloads[b]`` bytes of codec payload (plus the weight / stop flag in bucket 0: ``sizes[b]``
    bytes), at byte ``offsets[b]`` of the send buffer (``total`` bytes: this member's payload) and ``G·offsets[b]`` of
    the gathered one (the ``G`` members' pieces of bucket ``b`` in member order)."""

    ranges: list[tuple[int, int]]
    payloads: list[int]
    sizes: list[int]
    offsets: list[int]
    total: int


class AllGatherReducer(CompressedReducer):
    """The all-gather exchange of codecs whose payloads are not closed under averaging (:attr:`~.codecs.Codec.exchange`
    ``"all_gather"``: the sparse ones), SparseLoCo's: each member encodes its error-fed pseudo-gradient ``θ_g − θ_i +
    e`` once, the members all-gather the payloads, and every member decodes the ``G`` payloads and sums them in member
    order, itself (weighted: ``Σ w_i·d_i / Σ w_i``; else ``Σ d_i / G``): the same mean, bit for bit, on every rank.
    A codec whose :attr:`~.codecs.Codec.aggregate` is ``"senders"`` divides each value by the (weight of the) members
    that sent it instead of by ``G`` (``Σ w_i``).

    Error feedback: one residual per rank (:attr:`error`), exactly what its payload did not carry, times the codec's
    ``β``; no second encoding, so no phase-2 residual. It changes only in :meth:`commit`; a member of weight 0 keeps
    its own; :meth:`reset` zeroes it (a healed group starts from zero). Bytes: this member's payload ``P`` per sync
    (:attr:`Reduction.sent`, plus 4 bytes for a weight, 4 for a stop flag, in its first bucket); a ring all-gather
    sends ``(G−1)·P`` of them on the wire and receives as many.

    The pipeline: the fragment is cut in buckets of about ``bucket_bytes`` fp32 bytes (whole codec blocks); each
    bucket's all-gather is launched as soon as it is encoded, so the encoding of a bucket overlaps the transfer of the
    ones before, and :meth:`finish` decodes and sums each bucket as it arrives. Cut anywhere at whole blocks, the
    payloads decode to the same values: the mean does not depend on the buckets.
    """

    def _plan(self, red: Reduction) -> _GatherPlan:
        n, step = red.numel, red.bucket_numel or red.numel
        ranges = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
        payloads = [self.codec.payload_bytes(hi - lo) for lo, hi in ranges]
        sizes = [p + (self._extras(red) if b == 0 else 0) for b, p in enumerate(payloads)]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        return _GatherPlan(ranges, payloads, sizes, offsets[:-1], offsets[-1])

    def _bucket_numel(self, numel: int) -> int:
        """Values per bucket: ``bucket_bytes`` of fp32 in whole codec blocks (at least one); 0: one bucket."""
        block = self.codec.block_numel
        if not block:
            return 0
        step = max(block, self.bucket_bytes // 4 // block * block)
        return step if step < numel else 0

    def start(self, red: Reduction, fragment: "FragmentSync", local: list[Tensor], snapshot: Tensor, talk: bool,
              weight: Optional[float] = None, stop: Optional[bool] = None) -> None:
        """Encode the error-fed pseudo-gradient bucket by bucket, launching each bucket's all-gather.

        ``weight``: this member's weight in a weighted mean (``None``: uniform); ``stop``: its stop flag. Both ride
        in its first bucket (4 bytes each)."""
        n = red.numel
        if n == 0:
            red.buf = torch.zeros(0, dtype=torch.uint8, device=self.device)
            return
        red.bucket_numel = self._bucket_numel(n)
        plan = self._plan(red)
        error, tail = self._begin(red, fragment, weight, stop)
        members = self.comm.size if talk else 1
        send = torch.empty(plan.total, dtype=torch.uint8, device=self.device)
        red.buf = torch.empty(members * plan.total, dtype=torch.uint8, device=self.device) if talk else send
        red.payload_numel = plan.sizes[0]
        local_starts = _starts(local)
        x = torch.empty(max(hi - lo for lo, hi in plan.ranges), dtype=torch.float32, device=self.device)
        for b, (lo, hi) in enumerate(plan.ranges):
            width, payload, size, offset = hi - lo, plan.payloads[b], plan.sizes[b], plan.offsets[b]
            _pseudo_gradient(x[:width], local, local_starts, lo, hi, snapshot, error)
            q = self.codec.encode(x[:width])
            piece = send[offset : offset + size]
            piece[:payload] = q
            if b == 0 and tail is not None:
                piece[payload:] = tail
            if red.new_error is not None:
                torch.sub(x[:width], self.codec.decode(q, width), out=red.new_error[lo:hi])
            if talk:  # this bucket travels while the next one is encoded
                out = red.buf[members * offset : members * (offset + size)]
                red.works.append(self.comm.all_gather_async(out, piece))
        if talk:
            red.sent = plan.total

    def finish(self, red: Reduction, fragment: "FragmentSync", snapshot: Tensor) -> tuple[Tensor, bool]:
        """Decode and sum the gathered payloads bucket by bucket, as they arrive (member order on every rank).

        Returns (the new mean ``θ_g − Σ``, whether any member asked to stop). A weighted reduce sets
        ``red.total_weight``; when it is 0 (no member weighed in) the mean is ``snapshot``."""
        n = red.numel
        if n == 0:
            return snapshot, False
        assert red.buf is not None
        plan = self._plan(red)
        members = red.buf.numel() // plan.total  # G, or 1 where nothing was gathered
        arrivals = list(red.works)
        red.works = []

        def received(b: int) -> list[Tensor]:
            if arrivals:
                arrivals[b].wait()
            offset, size = members * plan.offsets[b], plan.sizes[b]
            return [red.buf[offset + i * size : offset + (i + 1) * size] for i in range(members)]

        first = received(0)
        extras = self._extras(red)
        tails = [r[plan.payloads[0] :].clone().view(torch.float32).tolist() for r in first] if extras else []
        weights = [t[0] for t in tails] if red.weighted else [1.0] * members
        stop_requested = any(t[-1] > 0 for t in tails) if red.has_stop else False
        total_weight = float(sum(weights)) if red.weighted else float(members)
        if red.weighted:
            red.total_weight = total_weight
            if total_weight <= 0:  # every member weighs 0: no mean, θ_g stays
                for work in arrivals[1:]:
                    work.wait()
                return snapshot, stop_requested
        mean = self._workspace(fragment)[1]
        by_senders = self.codec.aggregate == "senders"
        for b, (lo, hi) in enumerate(plan.ranges):
            width, payload = hi - lo, plan.payloads[b]
            pieces = first if b == 0 else received(b)
            total = torch.zeros(width, dtype=torch.float32, device=self.device)
            # "senders": each value's weight is that of the members that sent it (decoded non-zero)
            senders = torch.zeros(width, dtype=torch.float32, device=self.device) if by_senders else None
            for piece, w in zip(pieces, weights):  # member order: the same sum on every rank
                if red.weighted and w == 0:  # a member of weight 0 may send anything (even non-finite): not read
                    continue
                d = self.codec.decode(piece[:payload], width)
                total += d if not red.weighted else w * d
                if senders is not None:
                    senders += (d != 0).float() if not red.weighted else w * (d != 0).float()
            if senders is not None:  # nobody sent a value: its total is 0, divided by 1
                total.div_(senders.masked_fill_(senders == 0, 1.0))
            else:
                total.div_(total_weight)
            torch.sub(snapshot[lo:hi], total, out=mean[lo:hi])
        return mean, stop_requested


def compressed_reducer(comm: Communicator, codec: str, owned_numel: int, device: torch.device,
                       bucket_bytes: int = DEFAULT_COMPRESSED_BUCKET_BYTES) -> CompressedReducer:
    """The reducer of the exchange the codec asks for (:attr:`~.codecs.Codec.exchange`): :class:`CompressedReducer`
    (``"two_phase"``) or :class:`AllGatherReducer` (``"all_gather"``)."""
    cls = AllGatherReducer if get_codec(codec).exchange == "all_gather" else CompressedReducer
    return cls(comm, codec, owned_numel, device, bucket_bytes)


def _starts(views: Sequence[Tensor]) -> list[int]:
    """Where each of ``views`` starts in their concatenation."""
    starts, offset = [], 0
    for v in views:
        starts.append(offset)
        offset += v.numel()
    return starts


def _pseudo_gradient(out: Tensor, local: Sequence[Tensor], starts: list[int], a: int, z: int, snapshot: Tensor,
                     error: Tensor) -> None:
    """``out = snapshot[a:z] − θ_i[a:z] + error[a:z]`` in fp32, ``θ_i`` being the concatenation of the flat ``local``
    views (which start at ``starts``), without concatenating them."""
    for i in range(max(0, bisect.bisect_right(starts, a) - 1), len(local)):
        view, begin = local[i], starts[i]
        if begin >= z:
            break
        lo, hi = max(a, begin), min(z, begin + view.numel())
        if lo < hi:
            out[lo - a : hi - a].copy_(view.reshape(-1)[lo - begin : hi - begin])
    torch.sub(snapshot[a:z], out, out=out)
    out.add_(error[a:z])


def gather_slices(shard: Communicator, counts: list[int], mine: Tensor) -> Tensor:
    """All-gather the slices of a fragment held by the ranks of a DDP group (rank ``k`` holds ``counts[k]``
    elements, ``mine`` on this rank) and return them concatenated in rank order."""
    width = max(1, max(counts))
    own = torch.zeros(width, dtype=torch.float32, device=mine.device)
    if counts[shard.rank]:
        own[: counts[shard.rank]] = mine
    gathered = torch.empty(width * shard.size, dtype=torch.float32, device=mine.device)
    shard.all_gather(gathered, own)
    return torch.cat([gathered[k * width : k * width + c] for k, c in enumerate(counts)])


def reduce_buffers(comm: Communicator, buffers: list[Tensor], left_out: bool = False) -> Optional[Tensor]:
    """The sum over ``comm`` of the floating-point buffers, flat in fp32 (one all-reduce); ``None`` without any.
    ``left_out``: this member's buffers do not count (the sync's screen left it out): it adds zeros."""
    if not buffers:
        return None
    flat = torch.cat([b.detach().float().view(-1) for b in buffers])
    if left_out:
        flat.zero_()
    if comm.size > 1:
        comm.all_reduce(flat)
    return flat


def finite_buffer_mean(comm: Communicator, buffers: list[Tensor]) -> Optional[Tensor]:
    """The sum of the buffers of the members whose buffers are all finite, and how many they are (the failure path:
    one more all-reduce). ``None`` when no member's buffers are finite."""
    local = torch.cat([b.detach().float().view(-1) for b in buffers])
    ok = bool(torch.isfinite(local).all())
    flat = torch.cat([local if ok else torch.zeros_like(local), local.new_tensor([float(ok)])])
    if comm.size > 1:
        comm.all_reduce(flat)
    count = float(flat[-1].item())
    return flat[:-1] / count if count > 0 else None


def assign_buffers(buffers: list[Tensor], flat: Tensor) -> None:
    """Copy ``flat`` (as built by :func:`reduce_buffers`) back into the buffers."""
    offset = 0
    for b in buffers:
        b.detach().view(-1).copy_(flat[offset : offset + b.numel()])
        offset += b.numel()
