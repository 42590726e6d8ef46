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
  depend on the weights.

Both talk only through a :class:`~lightning_localsgd.engine.comm.Communicator`. Between ``start`` and ``finish`` the
collective runs behind the caller's inner steps (streaming sync); a :class:`Reduction` in flight can be saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from .codecs import get_codec
from .comm import Communicator, Work
from .layout import Fragment

__all__ = ["CompressedReducer", "MeanReducer", "Reduction", "assign_buffers", "finite_buffer_mean", "gather_slices",
           "reduce_buffers"]

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024  # as DDP's default bucket_cap_mb


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
        state = {k: getattr(self, k) for k in ("fragment", "numel", "weighted", "has_stop", "payload_numel", "sent",
                                               "seconds")}
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


class CompressedReducer:
    """Two-phase compressed all-reduce of the pseudo-gradient, with error feedback in both phases.

    Error feedback, and what changes it:

    * phase 1 (:attr:`error`): this rank's own residual, in the units of its unweighted pseudo-gradient. A weighted
      reduce weighs the decoded chunks at the receiver, so the residual is the same whatever the weight; a member of
      weight 0 (a group that did not train the interval) sends no usable values and keeps its residual as it was.
    * phase 2 (:attr:`mean_error`): the residual of the mean chunk this rank encodes, which depends on which chunk
      that is: the members' number and this rank's index among them. A residual kept from a sync of another
      membership (a fault-tolerant transport's quorum changed) is dropped, not applied to another chunk.
    * both change only in :meth:`commit` (the sync went through); an aborted sync leaves them as they were.
    """

    #: Bytes appended to every chunk of a weighted reduce (the sender's weight) and one carrying a stop flag.
    EXTRA_BYTES = 4

    def __init__(self, comm: Communicator, codec: str, owned_numel: int, device: torch.device) -> None:
        self.comm = comm
        self.codec_name = codec
        self.codec = get_codec(codec)
        self.owned_numel = owned_numel
        self.device = device
        self.error: Optional[Tensor] = None
        """Error feedback of phase 1, on this rank's owned pseudo-gradient."""
        self.mean_error: dict[Optional[int], Tensor] = {}
        """Error feedback of phase 2, on the mean chunk this rank encodes, by fragment."""
        self.mean_error_owner: dict[Optional[int], tuple[int, int]] = {}
        """``(members, rank)`` of the sync that made each :attr:`mean_error` (absent: any, as a checkpoint's)."""

    def _chunk_numel(self, n: int) -> int:
        """Elements per chunk of ``n`` values (the last chunk is zero-padded)."""
        return max(1, math.ceil(n / self.comm.size))

    @staticmethod
    def _extras(red: Reduction) -> int:
        return CompressedReducer.EXTRA_BYTES * (int(red.weighted) + int(red.has_stop))

    def start(self, red: Reduction, fragment: Fragment, local: list[Tensor], snapshot: Tensor, talk: bool,
              weight: Optional[float] = None, stop: Optional[bool] = None) -> None:
        """Phase 1: encode the error-fed pseudo-gradient in chunks and launch the all-to-all.

        ``weight``: this member's weight in a weighted mean (``None``: uniform); ``stop``: its stop flag. Both ride
        with every chunk (4 bytes each)."""
        n = red.numel
        if n == 0:
            red.buf = torch.zeros(0, dtype=torch.uint8, device=self.device)
            return
        groups = self.comm.size
        local_flat = torch.cat([v.float().reshape(-1) for v in local])
        if self.error is None:
            self.error = torch.zeros(self.owned_numel, dtype=torch.float32, device=self.device)
        olo, ohi = fragment.owned
        d = snapshot - local_flat + self.error[olo:ohi]
        chunk = self._chunk_numel(n)
        padded = torch.zeros(chunk * groups, dtype=torch.float32, device=self.device)
        padded[:n] = d
        payloads = [self.codec.encode(padded[j * chunk : (j + 1) * chunk]) for j in range(groups)]
        if weight == 0.0:
            red.new_error = None  # nothing of this member's values counts: its residual stays as it was
        else:
            decoded = torch.cat([self.codec.decode(q, chunk) for q in payloads])
            red.new_error = d - decoded[:n]
        extras = [float(weight)] if weight is not None else []
        extras += [float(bool(stop))] if stop is not None else []
        if extras:  # the same few bytes after every chunk: each chunk owner learns every member's weight
            tail = torch.tensor(extras, dtype=torch.float32, device=self.device).view(torch.uint8)
            payloads = [torch.cat([q, tail]) for q in payloads]
        red.payload_numel = payloads[0].numel()
        send = torch.cat(payloads)
        if talk:
            red.buf = torch.empty_like(send)
            red.works.append(self.comm.all_to_all(red.buf, send, async_op=True))
            red.sent = send.numel()  # bytes of one compressed copy of the slice, as one fp32 copy for an all-reduce
        else:
            red.buf = send

    def finish(self, red: Reduction, fragment: Fragment, snapshot: Tensor) -> tuple[Tensor, bool]:
        """Phase 2: average the received chunk, encode it (error feedback), all-gather the means.

        Returns (the new mean, whether any member asked to stop). A weighted reduce sets ``red.total_weight``; when
        it is 0 (no member weighed in) every member knows it from phase 1 and the mean is ``snapshot`` (no phase 2)."""
        n = red.numel
        if n == 0:
            return snapshot, False
        groups, chunk, stride = self.comm.size, self._chunk_numel(n), red.payload_numel
        size = stride - self._extras(red)
        assert red.buf is not None
        received = [red.buf[i * stride : (i + 1) * stride] for i in range(groups)]
        tails = [r[size:].clone().view(torch.float32).tolist() for r in received] if self._extras(red) else []
        weights = [t[0] for t in tails] if red.weighted else []
        stop_requested = any(t[-1] > 0 for t in tails) if red.has_stop else False
        total = torch.zeros(chunk, dtype=torch.float32, device=self.device)
        if red.weighted:
            red.total_weight = total_weight = float(sum(weights))
            if total_weight <= 0:  # every member weighs 0 (e.g. all just joined): no mean, θ_g stays
                return snapshot, stop_requested
            for r, w in zip(received, weights):
                if w != 0:  # a member of weight 0 may send anything (even non-finite): it is not read
                    total += w * self.codec.decode(r[:size], chunk)
            mine = total / total_weight
        else:
            for r in received:
                total += self.codec.decode(r[:size], chunk)
            mine = total / groups
        red.chunk_owner = owner = (groups, self.comm.rank)
        kept = self.mean_error.get(fragment.index)
        if kept is not None and self.mean_error_owner.get(fragment.index, owner) == owner:
            mine = mine + kept
        payload = self.codec.encode(mine)
        red.new_mean_error = mine - self.codec.decode(payload, chunk)
        if groups > 1:
            gathered = torch.empty(groups * size, dtype=torch.uint8, device=self.device)
            self.comm.all_gather(gathered, payload)
        else:
            gathered = payload
        mean_delta = torch.cat([self.codec.decode(gathered[j * size : (j + 1) * size], chunk)
                                for j in range(groups)])[:n]
        return snapshot - mean_delta, stop_requested

    def commit(self, red: Reduction, fragment: Fragment) -> None:
        """The sync went through: keep the errors this reduce made for the next one."""
        if red.new_error is not None:
            assert self.error is not None
            olo, ohi = fragment.owned
            self.error[olo:ohi] = red.new_error
        if red.new_mean_error is not None:
            self.mean_error[fragment.index] = red.new_mean_error
            if red.chunk_owner is not None:
                self.mean_error_owner[fragment.index] = red.chunk_owner

    def drop(self, fragment: Fragment) -> None:
        """The sync was skipped (non-finite): forget the fragment's error feedback."""
        if self.error is not None:
            olo, ohi = fragment.owned
            self.error[olo:ohi].zero_()
        self.mean_error.pop(fragment.index, None)
        self.mean_error_owner.pop(fragment.index, None)

    def reset(self) -> None:
        """Forget all error feedback (a group that joins a running federation starts from zero)."""
        self.error = None
        self.mean_error, self.mean_error_owner = {}, {}

    @property
    def state_bytes(self) -> int:
        total = self.error.numel() * self.error.element_size() if self.error is not None else 0
        return total + sum(e.numel() * e.element_size() for e in self.mean_error.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "compression_error": self.error.detach().cpu().clone() if self.error is not None else None,
            "compression_mean_error": {k: v.detach().cpu().clone() for k, v in self.mean_error.items()},
            "compression_mean_error_owner": dict(self.mean_error_owner),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        error = state.get("compression_error")
        self.error = error.to(self.device) if error is not None else None
        self.mean_error = {k: v.to(self.device) for k, v in state.get("compression_mean_error", {}).items()}
        self.mean_error_owner = {k: tuple(v) for k, v in (state.get("compression_mean_error_owner") or {}).items()
                                 if k in self.mean_error}


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


def reduce_buffers(comm: Communicator, buffers: list[Tensor]) -> Optional[Tensor]:
    """The sum over ``comm`` of the floating-point buffers, flat in fp32 (one all-reduce); ``None`` without any."""
    if not buffers:
        return None
    flat = torch.cat([b.detach().float().view(-1) for b in buffers])
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
