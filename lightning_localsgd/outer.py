"""The outer step of local SGD, on bare ``torch.distributed``.

Every ``H`` inner steps the worker groups synchronize::

    Δ    = θ_g − mean_i θ_i          pseudo-gradient
    θ_g ← outer_optimizer.step(θ_g, grad=Δ)
    θ_i ← θ_g                        for every group i

:class:`OuterSync` holds ``θ_g`` (the *snapshot*) and the outer optimizer for the parameters one rank owns, and runs
that update with one all-reduce over the rank's *cross group* (the ranks holding the same shard in every worker
group). It imports nothing from Lightning: the strategies decide *when* to call it and *which* tensors it sees
(whole parameters, a slice of the flattened parameters, FSDP shards).

Two layouts are supported:

* ``shard_group=None``: the rank owns all of ``tensors`` (one rank per worker group, or FSDP shards that are already
  local to the rank).
* ``shard_group`` of size ``S > 1``: the ``S`` ranks of a worker group hold identical replicas (DDP inside the
  group). The flattened parameters are split in ``S`` slices; rank ``k`` of the group syncs slice ``k`` with rank
  ``k`` of every other group, then the group all-gathers the slices. Cross-group bytes per rank are ``1/S`` of the
  model and the snapshot and outer state per rank are ``1/S`` of the model too.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import check_codec, decode, encode

OuterOptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
OuterOptimizerSpec = Union[str, OuterOptimizerFactory, None]

#: Names accepted for ``outer_optimizer``. ``"average"`` is outer SGD with lr 1.0 and no momentum, computed as the
#: exact mean; ``"diloco"`` is outer SGD with Nesterov momentum 0.9 and lr 0.7 (Douillard et al., 2023).
OUTER_OPTIMIZER_NAMES = ("average", "diloco")

_DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024  # as DDP's default bucket_cap_mb


class NonFinitePseudoGradientError(FloatingPointError):
    """The pseudo-gradient of a sync holds NaN or inf; the snapshot was left untouched."""


def resolve_outer_optimizer(spec: OuterOptimizerSpec) -> Optional[OuterOptimizerFactory]:
    """Turn an ``outer_optimizer`` argument into a factory ``params -> Optimizer`` (``None`` means exact averaging).

    Raises:
        ValueError: for an unknown name or a value that is neither a name nor a callable.
    """
    if spec is None or (isinstance(spec, str) and spec == "average"):
        return None
    if isinstance(spec, str):
        if spec == "diloco":
            return partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)
        raise ValueError(
            f"outer_optimizer={spec!r} is not a known name. Use one of {OUTER_OPTIMIZER_NAMES} or a callable "
            "`params -> torch.optim.Optimizer`, e.g. `functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, "
            "nesterov=True)`."
        )
    if not callable(spec):
        raise ValueError(
            f"outer_optimizer must be one of {OUTER_OPTIMIZER_NAMES} or a callable `params -> torch.optim.Optimizer`, "
            f"got {type(spec).__name__}."
        )
    return spec


def check_outer_optimizer_factory(factory: Optional[OuterOptimizerFactory]) -> None:
    """Call ``factory`` on a dummy parameter and check it returns a ``torch.optim.Optimizer``.

    Run before training so a bad callable fails early with a message that names the parameter.
    """
    if factory is None:
        return
    try:
        optimizer = factory([torch.nn.Parameter(torch.zeros(1))])
    except Exception as err:
        raise ValueError(
            f"outer_optimizer: calling it with a list of parameters failed ({type(err).__name__}: {err}). It must be "
            "a callable `params -> torch.optim.Optimizer`, e.g. `functools.partial(torch.optim.SGD, lr=0.7)`."
        ) from err
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"outer_optimizer must return a torch.optim.Optimizer, but it returned {type(optimizer).__name__}. "
            "Pass a callable `params -> torch.optim.Optimizer`, e.g. `functools.partial(torch.optim.SGD, lr=0.7)`."
        )


@dataclass
class SyncResult:
    """What one sync did, as seen from the calling rank."""

    pseudo_grad_norm: float
    """L2 norm of the whole pseudo-gradient ``θ_g − mean_i θ_i`` (all shards of the model)."""
    bytes_sent: int
    """Bytes this rank put into cross-group collectives in this sync."""
    seconds: float
    """Wall time of the sync on this rank, communication included."""
    skipped: bool = False
    """True when a non-finite pseudo-gradient made the sync be dropped (``on_nonfinite="skip"``)."""
    fragment: Optional[int] = None
    """The fragment synced (streaming sync), or ``None`` for all parameters."""
    stop_requested: bool = False
    """Time-based sync: some group asked to stop training after this sync."""


@dataclass
class _Pending:
    """A sync started by :meth:`OuterSync.start_sync`, not yet applied."""

    fragment: Optional[int]
    numel: int
    weighted: bool
    has_stop: bool
    buf: Optional[Tensor] = None
    """The reduce buffer (fp32 values, weight, stop flag) or the all-gathered compressed payloads (uint8)."""
    payload_numel: int = 0
    new_error: Optional[Tensor] = None
    new_mean_error: Optional[Tensor] = None
    sent: int = 0
    seconds: float = 0.0
    works: list = field(default_factory=list)

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
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "_Pending":
        pending = cls(**{k: v for k, v in state.items() if k not in ("buf", "new_error")})
        pending.buf = state["buf"].to(device)
        pending.new_error = state["new_error"].to(device) if state["new_error"] is not None else None
        return pending


def _blend(live: Tensor, global_: Tensor, mix: float) -> None:
    """``live ← mix·live + (1−mix)·global_`` in fp32 (``mix`` = 0: a plain copy)."""
    if mix == 0.0:
        live.copy_(global_)
    else:
        live.copy_(live.float().mul(mix).add_(global_.to(live.device), alpha=1.0 - mix))


def split_fragments(sizes: Sequence[int], fragments: int) -> list[int]:
    """Split tensors of ``sizes`` (in order) into ``fragments`` contiguous runs, making the largest run as small as
    possible (it sets the peak bytes of a streaming sync).

    Returns the ``fragments + 1`` boundaries as tensor indices (``[0, ..., len(sizes)]``); every run holds at least
    one tensor.
    """
    if fragments < 1 or fragments > len(sizes):
        raise ValueError(
            f"fragments={fragments}: the model has {len(sizes)} parameter tensors to split into fragments; use a "
            f"number from 1 to {len(sizes)}."
        )
    sizes = [int(s) for s in sizes]

    def greedy(capacity: int) -> list[int]:
        """Boundaries of the fewest runs of at most ``capacity`` each, filled left to right."""
        bounds, run = [0], 0
        for i, s in enumerate(sizes):
            if run + s > capacity and run > 0:
                bounds.append(i)
                run = 0
            run += s
        return bounds + [len(sizes)]

    # binary search for the smallest capacity that needs at most `fragments` runs
    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(greedy(mid)) - 1 <= fragments:
            hi = mid
        else:
            lo = mid + 1
    bounds = greedy(lo)
    # fewer runs than asked: split the largest runs of several tensors (never raises the largest run)
    while len(bounds) - 1 < fragments:
        runs = [(sum(sizes[a:b]), k) for k, (a, b) in enumerate(zip(bounds, bounds[1:])) if b - a > 1]
        _, k = max(runs)
        a, b = bounds[k], bounds[k + 1]
        half, best, acc = sum(sizes[a:b]) / 2, a + 1, 0
        for j in range(a + 1, b):  # the cut nearest to the run's middle
            acc += sizes[j - 1]
            if abs(acc - half) < abs(sum(sizes[a:best]) - half):
                best = j
        bounds.insert(k + 1, best)
    return bounds


@dataclass
class _Piece:
    """The part ``[start, stop)`` of ``tensors[index].view(-1)`` that this rank owns."""

    index: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


class OuterSync:
    """Snapshot ``θ_g``, outer optimizer and the sync of one rank's parameters across worker groups.

    Args:
        tensors: the live parameters (or parameter shards) of this rank, in the same order on every rank. They are
            read at each sync and overwritten with the new ``θ_g``.
        buffers: floating-point buffers to average across groups at each sync (e.g. running statistics).
        outer_optimizer: a factory ``params -> Optimizer`` or ``None`` for exact averaging (see
            :func:`resolve_outer_optimizer`).
        cross_group: process group joining this rank with the ranks that hold the same shard in the other groups
            (``None`` = the default group).
        shard_group: process group of this rank's worker group when its ranks hold identical replicas and should
            each sync one slice (``None`` = the rank syncs all of ``tensors`` itself).
        norm_group: process group whose ranks hold the other shards of the same model replica (FSDP inside a
            group): their squared norms are summed for the pseudo-gradient norm and the non-finite check. Defaults
            to ``shard_group``.
        state_device: where the snapshot and the outer optimizer state live (default: the tensors' device).
        on_nonfinite: ``"raise"`` (default) raises :class:`NonFinitePseudoGradientError`; ``"skip"`` drops the sync
            and resets every group to the previous ``θ_g``. In both cases the snapshot is left untouched.
        bucket_bytes: size of one all-reduce bucket.
        compression: ``None`` (default: all-reduce fp32 parameters), or ``"bf16"``, ``"int8"``, ``"int4"``: a
            compressed all-reduce in two phases. Each rank splits its pseudo-gradient ``θ_g − θ_i`` (plus the error
            the codec made on it at the previous sync: error feedback) in ``G`` chunks and encodes them; an all-to-all
            gives rank ``j`` every group's chunk ``j``, which it decodes and averages; it encodes that mean (plus its
            own error feedback of this second encoding) and an all-gather hands every rank all the mean chunks. Each
            rank sends ``2(G−1)/G`` of one compressed copy, as a ring all-reduce does (see :mod:`.comm`).
        fragments: split the tensors into this many contiguous fragments of about equal size, which
            :meth:`start_sync` / :meth:`finish_sync` can sync separately (streaming sync). Default 1.
        fragment_sizes: the sizes to balance the fragments by (default: the tensors' ``numel``); FSDP passes the
            full parameters' sizes so every shard of a group cuts the model at the same parameters.
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        buffers: Sequence[Tensor] = (),
        outer_optimizer: Optional[OuterOptimizerFactory] = None,
        cross_group: Optional[dist.ProcessGroup] = None,
        shard_group: Optional[dist.ProcessGroup] = None,
        norm_group: Optional[dist.ProcessGroup] = None,
        state_device: Optional[Union[str, torch.device]] = None,
        on_nonfinite: str = "raise",
        bucket_bytes: int = _DEFAULT_BUCKET_BYTES,
        compression: Optional[str] = None,
        fragments: int = 1,
        fragment_sizes: Optional[Sequence[int]] = None,
    ) -> None:
        if not tensors:
            raise ValueError("OuterSync needs at least one tensor to synchronize.")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}.")
        self.tensors = list(tensors)
        self.buffers = [b for b in buffers if torch.is_floating_point(b)]
        self.cross_group = cross_group
        self.shard_group = shard_group
        self.norm_group = norm_group if norm_group is not None else shard_group
        self.on_nonfinite = on_nonfinite
        self.bucket_bytes = int(bucket_bytes)
        check_codec(compression)
        self.compression = compression
        self.device = self.tensors[0].device
        self.state_device = torch.device(state_device) if state_device is not None else self.device
        self.num_groups = dist.get_world_size(cross_group)
        self.group_index = dist.get_rank(cross_group)
        self.shard_count = dist.get_world_size(shard_group) if shard_group is not None else 1
        self.shard_index = dist.get_rank(shard_group) if shard_group is not None else 0

        # Split the flattened parameters in `shard_count` equal slices; this rank owns slice `shard_index`.
        self.total_numel = sum(t.numel() for t in self.tensors)
        self.slice_numel = math.ceil(self.total_numel / self.shard_count)
        own_start = self.shard_index * self.slice_numel
        own_stop = min(own_start + self.slice_numel, self.total_numel)
        self.pieces: list[_Piece] = []
        offset = 0
        for i, t in enumerate(self.tensors):
            lo, hi = max(own_start, offset), min(own_stop, offset + t.numel())
            if lo < hi:
                self.pieces.append(_Piece(i, lo - offset, hi - offset))
            offset += t.numel()
        self.owned_numel = sum(p.numel for p in self.pieces)

        # Fragments (streaming sync): runs of whole tensors, the same on every rank.
        sizes = list(fragment_sizes) if fragment_sizes is not None else [t.numel() for t in self.tensors]
        if len(sizes) != len(self.tensors):
            raise ValueError(f"fragment_sizes has {len(sizes)} entries for {len(self.tensors)} tensors.")
        self.num_fragments = fragments
        self.fragment_bounds = split_fragments(sizes, fragments)
        self._tensor_offsets = [0]
        for t in self.tensors:
            self._tensor_offsets.append(self._tensor_offsets[-1] + t.numel())
        self._piece_bounds: list[int] = []  # first piece of each fragment, then len(pieces)
        self._owned_bounds: list[int] = []  # offset of each fragment in the owned elements, then owned_numel
        for f in range(fragments + 1):
            first_tensor = self.fragment_bounds[f]
            idx = next((i for i, p in enumerate(self.pieces) if p.index >= first_tensor), len(self.pieces))
            self._piece_bounds.append(idx)
            self._owned_bounds.append(sum(p.numel for p in self.pieces[:idx]))
        self.pending: dict[Optional[int], _Pending] = {}
        """Syncs started and not yet finished, by fragment (``None``: all parameters)."""

        # θ_g for the owned pieces, fp32 whatever the training precision, as parameters of the outer optimizer.
        self.snapshot: list[torch.nn.Parameter] = [
            torch.nn.Parameter(torch.empty(p.numel, dtype=torch.float32, device=self.state_device), requires_grad=False)
            for p in self.pieces
        ]
        self.outer_optimizer = outer_optimizer(self.snapshot) if outer_optimizer is not None else None
        self.num_syncs = 0
        self.bytes_sent = 0
        self._error: Optional[Tensor] = None  # error feedback of the codec on this rank's pseudo-gradient
        self._mean_error: dict[Optional[int], Tensor] = {}  # error feedback of the mean chunk this rank encodes
        self.reset_snapshot()

    # ------------------------------------------------------------------ fragments
    def _fragment_pieces(self, fragment: Optional[int]) -> tuple[int, int]:
        if fragment is None:
            return 0, len(self.pieces)
        return self._piece_bounds[fragment], self._piece_bounds[fragment + 1]

    def _fragment_owned(self, fragment: Optional[int]) -> tuple[int, int]:
        if fragment is None:
            return 0, self.owned_numel
        return self._owned_bounds[fragment], self._owned_bounds[fragment + 1]

    def _fragment_flat(self, fragment: Optional[int]) -> tuple[int, int]:
        """The fragment's range in the flattened parameters of the whole replica."""
        if fragment is None:
            return 0, self.total_numel
        return self._tensor_offsets[self.fragment_bounds[fragment]], self._tensor_offsets[self.fragment_bounds[fragment + 1]]

    # ------------------------------------------------------------------ snapshot
    def _owned_views(self) -> list[Tensor]:
        return [self.tensors[p.index].detach().view(-1)[p.start : p.stop] for p in self.pieces]

    @torch.no_grad()
    def reset_snapshot(self) -> None:
        """Set ``θ_g`` to the current parameters (which must then be equal in every group)."""
        for snap, view in zip(self.snapshot, self._owned_views()):
            snap.copy_(view)

    @property
    def state_bytes(self) -> int:
        """Bytes held by the snapshot and the outer optimizer state on this rank."""
        total = sum(s.numel() * s.element_size() for s in self.snapshot)
        if self._error is not None:
            total += self._error.numel() * self._error.element_size()
        total += sum(e.numel() * e.element_size() for e in self._mean_error.values())
        if self.outer_optimizer is not None:
            for state in self.outer_optimizer.state.values():
                total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))
        return total

    # ------------------------------------------------------------------ sync
    def _buckets(self, numel: int) -> list[tuple[int, int]]:
        per_bucket = max(1, self.bucket_bytes // 4)
        return [(lo, min(lo + per_bucket, numel)) for lo in range(0, numel, per_bucket)] or [(0, 0)]

    def _check_fragment(self, fragment: Optional[int]) -> None:
        if fragment is not None and not 0 <= fragment < self.num_fragments:
            raise ValueError(f"fragment must be None or in [0, {self.num_fragments}), got {fragment!r}.")

    @torch.no_grad()
    def sync(self, weight: Optional[float] = None, stop: Optional[bool] = None) -> SyncResult:
        """Run one outer step of every parameter: reduce, pseudo-gradient, outer optimizer, write back. Collective.

        Args:
            weight: this group's weight ``w_i`` in the mean (e.g. tokens processed since the last sync). ``None`` =
                uniform ``1/G``, which sends nothing extra; a weight adds one float to the reduce.
            stop: with time-based sync, whether this group stops training after this sync; every rank learns
                whether any group asked (:attr:`SyncResult.stop_requested`). Adds one float to the reduce.
        """
        self.start_sync(None, weight=weight, stop=stop)
        return self.finish_sync(None)

    @torch.no_grad()
    def start_sync(self, fragment: Optional[int] = None, weight: Optional[float] = None,
                   stop: Optional[bool] = None) -> None:
        """Start the sync of one fragment (``None``: all parameters): read ``θ_i`` and launch the cross-group
        collective without waiting for it. :meth:`finish_sync` applies it, possibly some inner steps later
        (streaming sync: the communication runs behind those steps). Collective on all ranks.
        """
        self._check_fragment(fragment)
        if fragment in self.pending:
            raise RuntimeError(f"the sync of fragment {fragment} was started twice without finish_sync in between.")
        if self.compression is not None and (weight is not None or stop is not None):
            raise ValueError("weighted or time-based syncs (heterogeneous workers) do not support compression.")
        start = time.perf_counter()
        plo, phi = self._fragment_pieces(fragment)
        olo, ohi = self._fragment_owned(fragment)
        n = ohi - olo
        views = self._owned_views()[plo:phi]
        pending = _Pending(fragment=fragment, numel=n, weighted=weight is not None, has_stop=stop is not None)
        # A rank holding none of the fragment (a slice of a DDP group) pairs only with ranks holding none of it
        # either (the same slice in every group): their collective would carry nothing, so none of them runs it.
        talk = self.num_groups > 1 and (n > 0 or weight is not None or stop is not None)
        if self.compression is not None and n == 0:
            pending.buf = torch.zeros(0, dtype=torch.uint8, device=self.device)
        elif self.compression is not None:
            local = torch.cat([v.float().reshape(-1) for v in views])
            snap = self._flat_snapshot(plo, phi).to(self.device)
            if self._error is None:
                self._error = torch.zeros(self.owned_numel, dtype=torch.float32, device=self.device)
            d = snap - local + self._error[olo:ohi]
            # phase 1: chunk j of every rank's pseudo-gradient goes to rank j of the cross group (all-to-all)
            chunk = self._chunk_numel(n)
            padded = torch.zeros(chunk * self.num_groups, dtype=torch.float32, device=self.device)
            padded[:n] = d
            payloads = [encode(padded[j * chunk : (j + 1) * chunk], self.compression) for j in range(self.num_groups)]
            pending.payload_numel = payloads[0].numel()
            decoded = torch.cat([decode(q, self.compression, chunk) for q in payloads])
            pending.new_error = d - decoded[:n]
            send = torch.cat(payloads)
            if talk:
                pending.buf = torch.empty_like(send)
                pending.works.append(dist.all_to_all_single(pending.buf, send, group=self.cross_group, async_op=True))
                # bytes of one compressed copy of the rank's slice, as `M` counts one fp32 copy for an all-reduce
                pending.sent = send.numel()
            else:
                pending.buf = send
        else:
            extras = [float(weight)] if weight is not None else []
            extras += [float(bool(stop))] if stop is not None else []
            buf = torch.empty(n + len(extras), dtype=torch.float32, device=self.device)
            if n:
                torch.cat([v.float().reshape(-1) for v in views], out=buf[:n])
            if weight is not None:
                buf[:n].mul_(float(weight))
            if extras:
                buf[n:] = torch.tensor(extras, dtype=torch.float32)
            if talk:
                # one all-reduce per bucket, all in flight together
                for lo, hi in self._buckets(buf.numel()):
                    pending.works.append(dist.all_reduce(buf[lo:hi], op=dist.ReduceOp.SUM, group=self.cross_group,
                                                         async_op=True))
                pending.sent = buf.numel() * buf.element_size()
            pending.buf = buf
        pending.seconds = time.perf_counter() - start
        self.pending[fragment] = pending

    @torch.no_grad()
    def finish_sync(self, fragment: Optional[int] = None, mix: float = 0.0) -> SyncResult:
        """Wait for the collective :meth:`start_sync` launched for ``fragment``, take the outer step and write back.

        Args:
            mix: ``α`` of Streaming DiLoCo: every group continues from ``α·θ_i + (1−α)·θ_g`` (``θ_i``: its current
                parameters, which took inner steps since :meth:`start_sync`). 0 replaces them by ``θ_g``.
        """
        self._check_fragment(fragment)
        if fragment not in self.pending:
            raise RuntimeError(f"finish_sync({fragment}) without a started sync of that fragment.")
        pending = self.pending.pop(fragment)
        start = time.perf_counter()
        pending.wait()
        plo, phi = self._fragment_pieces(fragment)
        n = pending.numel
        stop_requested = False
        if self.compression is not None:
            mean = self._compressed_phase_two(fragment, pending)
        else:
            buf = pending.buf
            if pending.has_stop:
                stop_requested = bool(buf[-1].item() > 0)
            if pending.weighted:
                total_weight = float(buf[n].item())
                # every group's weight is 0 (e.g. a stop-sync right after a sync): nothing to average
                mean = buf[:n] / total_weight if total_weight > 0 else self._flat_snapshot(plo, phi).to(self.device)
            else:
                mean = buf[:n] / self.num_groups
        result = self._outer_step(fragment, mean.to(self.state_device), pending, mix)
        result.seconds = pending.seconds + time.perf_counter() - start
        result.stop_requested = stop_requested
        return result

    def _chunk_numel(self, n: int) -> int:
        """Elements per chunk of a compressed all-reduce of ``n`` values (the last chunk is zero-padded)."""
        return max(1, math.ceil(n / self.num_groups))

    def _compressed_phase_two(self, fragment: Optional[int], pending: "_Pending") -> Tensor:
        """Average the received chunk, encode it (with error feedback), all-gather the means; return the new mean."""
        n = pending.numel
        plo, phi = self._fragment_pieces(fragment)
        if n == 0:
            return self._flat_snapshot(plo, phi).to(self.device)
        chunk = self._chunk_numel(n)
        size = pending.payload_numel
        assert pending.buf is not None
        total = torch.zeros(chunk, dtype=torch.float32, device=self.device)
        for i in range(self.num_groups):
            total += decode(pending.buf[i * size : (i + 1) * size], self.compression, chunk)
        mine = total / self.num_groups + self._mean_error.get(fragment, torch.zeros_like(total))
        payload = encode(mine, self.compression)
        pending.new_mean_error = mine - decode(payload, self.compression, chunk)
        if self.num_groups > 1:
            gathered = torch.empty(self.num_groups * size, dtype=torch.uint8, device=self.device)
            dist.all_gather_into_tensor(gathered, payload, group=self.cross_group)
        else:
            gathered = payload
        mean_delta = torch.cat([decode(gathered[j * size : (j + 1) * size], self.compression, chunk)
                                for j in range(self.num_groups)])[:n]
        return self._flat_snapshot(plo, phi).to(self.device) - mean_delta

    def _flat_snapshot(self, plo: int, phi: int) -> Tensor:
        snaps = self.snapshot[plo:phi]
        return torch.cat([s.view(-1) for s in snaps]) if snaps else torch.zeros(0, device=self.state_device)

    def _outer_step(self, fragment: Optional[int], mean: Tensor, pending: "_Pending", mix: float) -> SyncResult:
        plo, phi = self._fragment_pieces(fragment)
        olo, ohi = self._fragment_owned(fragment)
        snapshots = self.snapshot[plo:phi]

        # Pseudo-gradient norm over the whole fragment: the shards of a worker group add their squares.
        delta = self._flat_snapshot(plo, phi) - mean
        sq = delta.double().pow(2).sum().reshape(1).to(self.device)
        if self.norm_group is not None and dist.get_world_size(self.norm_group) > 1:
            dist.all_reduce(sq, group=self.norm_group)
        sq_norm = float(sq.item())

        if not math.isfinite(sq_norm):
            bad = self._nonfinite_groups(plo, phi)
            if self.on_nonfinite == "raise":
                raise NonFinitePseudoGradientError(
                    f"the pseudo-gradient is not finite (worker groups with NaN/inf parameters: {bad}); the global "
                    "parameters were left unchanged, so the last checkpoint is good. Lower the learning rate, enable "
                    "gradient clipping, or pass on_nonfinite='skip' to drop such syncs."
                )
            self._write_back(fragment)  # every group restarts from the last good θ_g
            if self._error is not None:
                self._error[olo:ohi].zero_()
            self._mean_error.pop(fragment, None)
            return self._finish(pending.sent, float("nan"), fragment, skipped=True)

        if pending.new_error is not None:
            assert self._error is not None
            self._error[olo:ohi] = pending.new_error
        if pending.new_mean_error is not None:
            self._mean_error[fragment] = pending.new_mean_error

        if self.outer_optimizer is None:
            # Outer SGD with lr 1 and no momentum is the mean itself; copy it to stay exact.
            offset = 0
            for snap in snapshots:
                snap.copy_(mean[offset : offset + snap.numel()])
                offset += snap.numel()
        else:
            # Only this fragment's parameters get a gradient: torch optimizers skip (and keep the state of) the rest.
            offset = 0
            for snap in snapshots:
                snap.grad = delta[offset : offset + snap.numel()].view_as(snap).clone()
                offset += snap.numel()
            self.outer_optimizer.step()
            for snap in snapshots:
                snap.grad = None
        self._write_back(fragment, mix)
        sent = pending.sent
        if fragment is None or fragment == self.num_fragments - 1:
            sent += self._average_buffers()  # buffers go with the last fragment
        return self._finish(sent, math.sqrt(sq_norm), fragment)

    def _finish(self, sent: int, norm: float, fragment: Optional[int], skipped: bool = False) -> SyncResult:
        if not skipped and (fragment is None or fragment == self.num_fragments - 1):
            self.num_syncs += 1
        self.bytes_sent += sent
        return SyncResult(pseudo_grad_norm=norm, bytes_sent=sent, seconds=0.0, skipped=skipped, fragment=fragment)

    def _write_back(self, fragment: Optional[int] = None, mix: float = 0.0) -> None:
        """Copy ``θ_g`` of a fragment into the live tensors (``mix`` > 0: ``α·θ_i + (1−α)·θ_g``); with a shard
        group, all-gather the ranks' pieces of the fragment first."""
        plo, phi = self._fragment_pieces(fragment)
        if self.shard_count == 1:
            for snap, view in zip(self.snapshot[plo:phi], self._owned_views()[plo:phi]):
                _blend(view, snap, mix)
            return
        # The fragment is the flat range [a, b); rank k of the group owns [k·L, (k+1)·L) of the flat parameters.
        a, b = self._fragment_flat(fragment)
        L = self.slice_numel
        counts = [max(0, min(b, (k + 1) * L) - max(a, k * L)) for k in range(self.shard_count)]
        width = max(1, max(counts))
        own = torch.zeros(width, dtype=torch.float32, device=self.device)
        mine = counts[self.shard_index]
        if mine:
            own[:mine] = self._flat_snapshot(plo, phi).to(self.device)
        gathered = torch.empty(width * self.shard_count, dtype=torch.float32, device=self.device)
        dist.all_gather_into_tensor(gathered, own, group=self.shard_group)
        flat = torch.cat([gathered[k * width : k * width + c] for k, c in enumerate(counts)])  # = θ_g[a:b]
        offset = 0
        for t in self.tensors:
            lo, hi = max(a, offset), min(b, offset + t.numel())
            if lo < hi:
                _blend(t.detach().view(-1)[lo - offset : hi - offset], flat[lo - a : hi - a], mix)
            offset += t.numel()

    def _average_buffers(self) -> int:
        if not self.buffers or self.num_groups == 1:
            return 0
        flat = torch.cat([b.detach().float().view(-1) for b in self.buffers])
        dist.all_reduce(flat, group=self.cross_group)
        flat.div_(self.num_groups)
        offset = 0
        for b in self.buffers:
            b.detach().view(-1).copy_(flat[offset : offset + b.numel()])
            offset += b.numel()
        return flat.numel() * flat.element_size()

    def _nonfinite_groups(self, plo: int = 0, phi: Optional[int] = None) -> list[int]:
        """Indices of the worker groups whose local parameters hold NaN/inf (only run on the failure path)."""
        local_bad = any(not bool(torch.isfinite(v).all()) for v in self._owned_views()[plo:phi])
        flags = torch.zeros(self.num_groups, dtype=torch.float32, device=self.device)
        flags[self.group_index] = float(local_bad)
        if self.num_groups > 1:
            dist.all_reduce(flags, group=self.cross_group)
        if self.norm_group is not None and dist.get_world_size(self.norm_group) > 1:
            dist.all_reduce(flags, group=self.norm_group)
        return [i for i, f in enumerate(flags.tolist()) if f > 0]

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """This rank's snapshot slice, outer optimizer state and counters (CPU tensors)."""
        return {
            "snapshot": [s.detach().cpu().clone() for s in self.snapshot],
            "outer_optimizer": self.outer_optimizer.state_dict() if self.outer_optimizer is not None else None,
            "num_syncs": self.num_syncs,
            "bytes_sent": self.bytes_sent,
            "total_numel": self.total_numel,
            "owned_numel": self.owned_numel,
            "compression_error": self._error.detach().cpu().clone() if self._error is not None else None,
            "compression_mean_error": {k: v.detach().cpu().clone() for k, v in self._mean_error.items()},
            # streaming sync: collectives in flight are waited for and their results kept, to apply after a resume
            "pending": [p.state_dict() for p in self.pending.values()],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the parameter layout must be the same."""
        if state["total_numel"] != self.total_numel or state["owned_numel"] != self.owned_numel:
            raise ValueError(
                f"local-SGD state does not match the model: the checkpoint holds {state['owned_numel']} of "
                f"{state['total_numel']} elements for this rank, the model has {self.owned_numel} of "
                f"{self.total_numel}. Resume with the same model and the same world size and group_size."
            )
        for snap, saved in zip(self.snapshot, state["snapshot"]):
            snap.copy_(saved)
        if (state["outer_optimizer"] is None) != (self.outer_optimizer is None):
            raise ValueError(
                "the checkpoint's outer optimizer does not match this run's outer_optimizer (averaging vs. an "
                "optimizer). Resume with the same outer_optimizer."
            )
        if self.outer_optimizer is not None:
            self.outer_optimizer.load_state_dict(state["outer_optimizer"])
            for st in self.outer_optimizer.state.values():
                for k, v in st.items():
                    if isinstance(v, Tensor) and v.dim() > 0:
                        st[k] = v.to(self.state_device)
        self.num_syncs = int(state["num_syncs"])
        self.bytes_sent = int(state["bytes_sent"])
        error = state.get("compression_error")
        self._error = error.to(self.device) if error is not None and self.compression is not None else None
        self._mean_error = {k: v.to(self.device) for k, v in state.get("compression_mean_error", {}).items()} \
            if self.compression is not None else {}
        self.pending = {}
        for p in state.get("pending", []):
            self._check_fragment(p["fragment"])
            self.pending[p["fragment"]] = _Pending.from_state(p, self.device)
