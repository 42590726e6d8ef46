"""The outer step of local SGD on one rank's parameters, framework-free.

Every ``H`` inner steps the worker groups synchronize::

    Δ    = θ_g − mean_i θ_i          pseudo-gradient
    θ_g ← outer_optimizer.step(θ_g, grad=Δ)
    θ_i ← θ_g                        for every group i

:class:`OuterSync` holds ``θ_g`` (the *snapshot*) and the outer optimizer for the elements one rank owns (its
:class:`~.layout.Layout`), reduces with a reducer (:mod:`.reducers`) over the rank's cross-group communicator, applies
the non-finite policy and writes ``θ_g`` back. Callers decide *when* to call it and *which* tensors it sees (whole
parameters, a slice of a DDP group, FSDP shards, ZeRO partitions).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .codecs import check_codec
from .comm import Communicator, SyncAbortedError, as_communicator
from .fragment import FragmentSync, PendingSyncs
from .layout import Fragment, Layout
from .presets import OuterOptimizerFactory
from .reducers import (DEFAULT_BUCKET_BYTES, DEFAULT_COMPRESSED_BUCKET_BYTES, MeanReducer, Reduction,
                       assign_buffers, compressed_reducer, finite_buffer_mean, gather_slices, reduce_buffers)
from .screen import PseudoGradientScreen, count_sketch, log_verdict

__all__ = ["NonFinitePseudoGradientError", "OuterSync", "SyncResult", "merge_outer_states"]

GroupLike = Union[Communicator, dist.ProcessGroup, None]

log = logging.getLogger(__name__)


class NonFinitePseudoGradientError(FloatingPointError):
    """The pseudo-gradient of a sync holds NaN or inf; the snapshot was left untouched."""


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
    nonfinite_groups: list[int] = field(default_factory=list)
    """A skipped sync: the indices (in the cross group) of the groups whose parameters or buffers were not finite."""
    screened_out: list[int] = field(default_factory=list)
    """The robust screen (``screen=``): the indices (in the cross group) of the groups left out of this sync."""


_NORM_CHUNK = {"cpu": 1 << 16}
"""Elements per chunk of the pseudo-gradient norm, by device type (default below): on a CPU a chunk of 256 KB stays in
the cache and keeps fp32 accumulation close to float64 (relative error ~2e-7 at 10M elements, where one fp32 pass over
all of them is off by ~1e-3)."""
_NORM_CHUNK_DEFAULT = 1 << 22


def squared_norm(a: Tensor, b: Optional[Tensor] = None) -> float:
    """``Σ (a − b)²`` (``b`` = ``None``: ``Σ a²``) of flat fp32 tensors, without a tensor of their size.

    One fp32 pass per chunk (``a − b`` of a chunk goes into a small scratch tensor), the chunks' norms added in float64.
    A chunk whose fp32 norm is not finite is redone in float64, so the result is non-finite exactly when an element of
    ``a − b`` (in fp32) is, as a float64 sum of squares over the whole tensor would be; the value differs from that sum
    by fp32 rounding only.
    """
    n = a.numel()
    if n == 0:
        return 0.0
    chunk = _NORM_CHUNK.get(a.device.type, _NORM_CHUNK_DEFAULT)
    scratch = torch.empty(min(chunk, n), dtype=a.dtype, device=a.device) if b is not None else None

    def piece(lo: int, hi: int) -> Tensor:
        if b is None:
            return a[lo:hi]
        assert scratch is not None
        return torch.sub(a[lo:hi], b[lo:hi], out=scratch[: hi - lo])

    bounds = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
    norms = torch.stack([torch.linalg.vector_norm(piece(lo, hi)) for lo, hi in bounds]).double()
    total = float(norms.pow(2).sum().item())
    if not math.isfinite(total):  # an fp32 overflow, or a NaN / inf element: redo those chunks in float64
        squares = norms.pow(2)
        for k in torch.nonzero(~torch.isfinite(squares)).view(-1).tolist():
            squares[k] = piece(*bounds[k]).double().pow(2).sum()
        total = float(squares.sum().item())
    return total


def _blend(live: Tensor, global_: Tensor, mix: float) -> None:
    """``live ← mix·live + (1−mix)·global_`` in fp32 (``mix`` = 0: a plain copy)."""
    if mix == 0.0:
        live.copy_(global_)
    else:
        live.copy_(live.float().mul(mix).add_(global_.to(live.device), alpha=1.0 - mix))


def load_outer_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any], saved_class: Optional[str]) -> None:
    """Load the outer optimizer's state; this run's hyper-parameters (lr, momentum, ...) win over the saved ones."""
    mine = type(optimizer).__name__
    if saved_class is not None and saved_class != mine:
        raise ValueError(
            f"the checkpoint's outer optimizer is {saved_class}, this run's is {mine}: its state (e.g. momentum) "
            "cannot be carried over. Resume with the same outer_optimizer, or start a new run from the weights."
        )
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(saved)
    except (KeyError, ValueError) as err:
        raise ValueError(f"the checkpoint's outer optimizer state does not fit this run's {mine} ({err}). Resume "
                         "with the same outer_optimizer.") from err
    changed = sorted({f"{k}: {g[k]!r} -> {f[k]!r}" for g, f in zip(optimizer.param_groups, fresh)
                      for k in f if k in g and g[k] != f[k]})
    for group, hyper in zip(optimizer.param_groups, fresh):
        group.update(hyper)
    if changed:
        log.warning(f"local SGD: the outer optimizer's hyper-parameters differ from the checkpoint's; this run's "
                    f"are used ({', '.join(changed)}).")


class OuterSync:
    """Snapshot ``θ_g``, outer optimizer and the sync of one rank's parameters across worker groups.

    Args:
        tensors: the live parameters (or parameter shards) of this rank, in the same order on every rank. They are
            read at each sync and overwritten with the new ``θ_g``.
        buffers: floating-point buffers to average across groups at each sync (e.g. running statistics).
        outer_optimizer: a factory ``params -> Optimizer`` or ``None`` for exact averaging (see
            :func:`~.presets.resolve_outer_optimizer`).
        cross_group: communicator (or process group; ``None`` = the default group) joining this rank with the ranks
            that hold the same shard in the other groups (FSDP's "replicate" dimension).
        slice_group: communicator / process group of this rank's worker group when its ranks hold identical replicas
            (DDP inside a group) and should each sync one slice (``None`` = the rank syncs all of ``tensors`` itself).
        sharding_group: communicator / process group whose ranks hold the other shards of the same replica (FSDP or
            ZeRO inside a group: FSDP's "shard" dimension): their squared norms are summed for the pseudo-gradient
            norm and the non-finite check. Defaults to ``slice_group``.
        state_device: where the snapshot and the outer optimizer state live (default: the tensors' device).
        on_nonfinite: ``"raise"`` (default) raises :class:`NonFinitePseudoGradientError`; ``"skip"`` drops the sync
            and resets every group to the previous ``θ_g``. In both cases the snapshot is left untouched.
        bucket_bytes: bytes of fp32 values per bucket. Uncompressed: one all-reduce per bucket, all launched at once
            (default 25 MiB, as DDP's buckets); compressed: the pipeline's buckets, whose codec work overlaps the
            transfer of the others (default 4 MiB of pseudo-gradient). ``None``: the default of the reducer used.
        compression: ``None`` (all-reduce fp32 parameters) or a registered codec name (``"bf16"``, ``"int8"``,
            ``"int4"``, ``"topk"``, ...), with error feedback: the exchange the codec asks for (:mod:`.reducers`: the
            two-phase compressed all-reduce, or the sparse codecs' all-gather and local sum).
        fragments: split the tensors into this many contiguous fragments of about equal size, which
            :meth:`start_sync` / :meth:`finish_sync` can sync separately (streaming sync). Default 1.
        fragment_sizes: the sizes to balance the fragments by (default: the tensors' ``numel``).
        screen: a :class:`~.screen.PseudoGradientScreen`: each sync leaves out the groups whose pseudo-gradient is an
            outlier (weight 0 in the mean). Default ``None``: every group counts.
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        buffers: Sequence[Tensor] = (),
        outer_optimizer: Optional[OuterOptimizerFactory] = None,
        cross_group: GroupLike = None,
        slice_group: GroupLike = None,
        sharding_group: GroupLike = None,
        state_device: Optional[Union[str, torch.device]] = None,
        on_nonfinite: str = "raise",
        bucket_bytes: Optional[int] = None,
        compression: Optional[str] = None,
        fragments: int = 1,
        fragment_sizes: Optional[Sequence[int]] = None,
        screen: Optional[PseudoGradientScreen] = None,
    ) -> None:
        if not tensors:
            raise ValueError("OuterSync needs at least one tensor to synchronize.")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}.")
        check_codec(compression)
        self.tensors = list(tensors)
        self.buffers = [b for b in buffers if torch.is_floating_point(b)]
        self.cross = as_communicator(cross_group)
        self.slicing = as_communicator(slice_group) if slice_group is not None else None
        self.sharding = as_communicator(sharding_group) if sharding_group is not None else self.slicing
        self.on_nonfinite = on_nonfinite
        self.compression = compression
        self.device = self.tensors[0].device
        self.state_device = torch.device(state_device) if state_device is not None else self.device
        self.layout = Layout([t.numel() for t in self.tensors], self.slicing.size if self.slicing else 1,
                             self.slicing.rank if self.slicing else 0, fragments, fragment_sizes)
        self.reducer = MeanReducer(self.cross, self.device, bucket_bytes or DEFAULT_BUCKET_BYTES,
                                   numel=self.layout.owned_numel)
        self.compressor = compressed_reducer(self.cross, compression, self.layout.owned_numel, self.device,
                                             bucket_bytes or DEFAULT_COMPRESSED_BUCKET_BYTES) \
            if compression is not None else None
        # θ_g for the owned pieces, fp32 whatever the training precision, as parameters of the outer optimizer: views
        # of one flat tensor (a fragment's θ_g is a view of it, never a copy).
        # θ_g in host memory for an accelerator's parameters: page-locked, so that the copies to and from the device
        # are direct transfers (pageable memory measured 26x slower than the bandwidth limit on an H200: docs/gpu.md)
        self._host_state = self.state_device.type == "cpu" and self.device.type != "cpu"
        self._flat = torch.empty(self.layout.owned_numel, dtype=torch.float32, device=self.state_device,
                                 pin_memory=self._host_state)
        self._host_mean: Optional[Tensor] = None
        """Host-resident state: the page-locked buffer the mean is copied into (allocated at the first sync)."""
        self.snapshot: list[torch.nn.Parameter] = []
        offset = 0
        for p in self.layout.pieces:
            self.snapshot.append(torch.nn.Parameter(self._flat[offset : offset + p.numel], requires_grad=False))
            offset += p.numel
        self.whole = self._fragment_sync(self.layout.fragment(None))
        """The sync of every parameter (its ranges overlap every fragment's)."""
        self.fragments = [self._fragment_sync(self.layout.fragment(f)) for f in range(self.layout.num_fragments)]
        """The streaming fragments' syncs, in order."""
        self._syncs: dict[Optional[int], FragmentSync] = {None: self.whole, **{s.index: s for s in self.fragments}}
        self.outer_optimizer = outer_optimizer(self.snapshot) if outer_optimizer is not None else None
        self.num_syncs = 0
        self.bytes_sent = 0
        self.screen = screen
        self.reset_snapshot()

    def _fragment_sync(self, frag: Fragment) -> FragmentSync:
        theta = self._flat[frag.owned[0] : frag.owned[1]]
        return FragmentSync(frag, theta, self.snapshot[slice(*frag.pieces)], self.compressor)

    def fragment_sync(self, fragment: Optional[int]) -> FragmentSync:
        """The sync of fragment ``fragment`` (``None``: every parameter)."""
        self.layout.fragment(fragment)  # raises for a fragment this layout does not have
        return self._syncs[fragment]

    @property
    def fragment_syncs(self) -> list[FragmentSync]:
        """Every fragment's sync, the sync of every parameter first."""
        return list(self._syncs.values())

    @property
    def pending(self) -> PendingSyncs:
        """Syncs started and not yet finished, by fragment (``None``: all parameters); read-only (each is its
        fragment's :attr:`~.fragment.FragmentSync.pending`)."""
        return PendingSyncs(self._syncs)

    def rebind(self, tensors: Sequence[Tensor]) -> None:
        """Point the sync at new live tensors holding the same elements, e.g. partitions or shards an inner strategy
        re-created (a checkpoint load, a re-view of sharded storage). Refused unless they match the layout: the same
        number of tensors, each with the same number of elements, on the same device."""
        tensors = list(tensors)
        numels = [t.numel() for t in tensors]
        if numels != self.layout.numels:
            raise ValueError(f"OuterSync.rebind: the new tensors hold {numels} elements, the sync was built for "
                             f"{self.layout.numels}; build a new OuterSync for another model or layout.")
        devices = {t.device for t in tensors}
        if devices != {self.device}:
            raise ValueError(f"OuterSync.rebind: the new tensors are on {sorted(map(str, devices))}, the sync's "
                             f"workspace on {self.device}.")
        self.tensors = tensors

    @property
    def num_groups(self) -> int:
        """Worker groups taking part in a sync: the cross communicator's size. The communicator owns membership (a
        fault-tolerant transport's changes from one quorum to the next); nothing else sets it."""
        return self.cross.size

    @property
    def group_index(self) -> int:
        """This group's index among them: the cross communicator's rank."""
        return self.cross.rank

    @property
    def communicators(self) -> list[Communicator]:
        """Every communicator a sync talks over (the sync guard bounds their collectives)."""
        return [c for c in (self.cross, self.slicing, self.sharding) if c is not None]

    @property
    def total_numel(self) -> int:
        return self.layout.total_numel

    @property
    def owned_numel(self) -> int:
        return self.layout.owned_numel

    @property
    def num_fragments(self) -> int:
        return self.layout.num_fragments

    # ------------------------------------------------------------------ snapshot
    def _owned_views(self, fragment: Optional[Fragment] = None) -> list[Tensor]:
        return self.layout.owned_views(self.tensors, fragment)

    @torch.no_grad()
    def reset_snapshot(self) -> None:
        """Set ``θ_g`` to the current parameters (which must then be equal in every group)."""
        for snap, view in zip(self.snapshot, self._owned_views()):
            snap.copy_(view)

    @property
    def workspace_bytes(self) -> int:
        """Bytes of the persistent reduce buffers: one fp32 copy of the owned elements + 8 from the first
        uncompressed sync on, two copies from the first compressed one (the new residuals until the vote, the mean);
        not part of :attr:`state_bytes` (nothing in them is kept from one sync to the next)."""
        return self.reducer.workspace_bytes + (self.compressor.workspace_bytes if self.compressor is not None else 0)

    @property
    def state_bytes(self) -> int:
        """Bytes held by the snapshot, the outer optimizer state and the error feedback on this rank."""
        total = sum(s.numel() * s.element_size() for s in self.snapshot)
        if self.compressor is not None:
            total += self.compressor.state_bytes
            total += sum(s.mean_error.numel() * s.mean_error.element_size()
                         for s in self._syncs.values() if s.mean_error is not None)
        if self.outer_optimizer is not None:
            for state in self.outer_optimizer.state.values():
                total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))
        return total

    # ------------------------------------------------------------------ sync
    @torch.no_grad()
    def sync(self, weight: Optional[float] = None, stop: Optional[bool] = None) -> SyncResult:
        """Run one outer step of every parameter: reduce, pseudo-gradient, outer optimizer, write back. Collective.

        Args:
            weight: this group's weight ``w_i`` in the mean (e.g. tokens processed since the last sync). ``None`` =
                uniform ``1/G``, which sends nothing extra; a weight adds one float to the reduce (compressed: 4 bytes
                to every chunk; the error feedback stays that of the unweighted pseudo-gradient, and a member of
                weight 0 keeps its own as it was).
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
        frag = self.fragment_sync(fragment)
        if frag.pending is not None:
            raise RuntimeError(f"the sync of fragment {fragment} was started twice without finish_sync in between.")
        start = time.perf_counter()
        if self.screen is not None:  # an outlier group sends with weight 0 (every member knows which)
            weight = self._screen(frag, weight)
        red = Reduction(fragment=fragment, numel=frag.numel, weighted=weight is not None, has_stop=stop is not None)
        # A rank holding none of the fragment (a slice of a DDP group) pairs only with ranks holding none of it
        # either (the same slice in every group): their collective would carry nothing, so none of them runs it.
        talk = self.num_groups > 1 and (frag.numel > 0 or weight is not None or stop is not None)
        if self.compressor is not None:
            snap = frag.theta.to(self.device) if frag.numel else None
            self.compressor.start(red, frag, self._owned_views(frag.fragment), snap, talk, weight=weight, stop=stop)
        else:
            busy = [r.region for r in self.pending.values() if r.region is not None]
            self.reducer.start(red, self._owned_views(frag.fragment), talk, weight, stop, offset=frag.owned[0],
                               busy=busy)
        red.seconds = time.perf_counter() - start
        frag.pending = red

    @torch.no_grad()
    def finish_sync(self, fragment: Optional[int] = None, mix: float = 0.0) -> SyncResult:
        """Wait for the collective :meth:`start_sync` launched for ``fragment``, take the outer step and write back.

        Args:
            mix: ``α`` of Streaming DiLoCo: every group continues from ``α·θ_i + (1−α)·θ_g`` (``θ_i``: its current
                parameters, which took inner steps since :meth:`start_sync`). 0 replaces them by ``θ_g``. A sync in
                which a group asked to stop (time-based) ends training: it keeps no local part, so that every group
                ends on ``θ_g``.
        """
        frag = self.fragment_sync(fragment)
        red = frag.pending
        if red is None:
            raise RuntimeError(f"finish_sync({fragment}) without a started sync of that fragment.")
        frag.pending = None
        start = time.perf_counter()
        if self.compressor is not None:
            # waits for its buckets one by one (the pipeline); a failure leaves only the reduction's own buffers to
            # the collectives still in flight, and θ_g and the error feedback as they were
            mean, stop_requested = self.compressor.finish(red, frag, frag.theta.to(self.device))
        else:
            try:
                red.wait()
            except BaseException:
                self.reducer.discard(red)  # a bucket may still be in flight
                raise
            mean, stop_requested = self.reducer.finish(red, lambda: frag.theta)
        verdict, frag.verdict = frag.verdict, None
        result = self._outer_step(frag, self._to_state_device(mean, frag), red, 0.0 if stop_requested else mix,
                                  sorted(verdict.excluded) if verdict is not None else [])
        result.seconds = red.seconds + time.perf_counter() - start
        result.stop_requested = stop_requested
        return result

    def _screen(self, frag: FragmentSync, weight: Optional[float]) -> Optional[float]:
        """Screen this sync of ``frag`` (collective): this group's weight in it, after the verdict."""
        assert self.screen is not None
        views = self._owned_views(frag.fragment)
        sq = sum(squared_norm(snap.view(-1).to(view.device), view.float().reshape(-1))
                 for snap, view in zip(frag.snapshot, views))
        sketch = None
        if self.screen.min_cosine is not None:
            # each element's index: its place among this rank's owned elements, apart for each rank of a sharded group
            # (the same slice in every group), so that the group's ranks' sketches add up to its whole one
            base = frag.owned[0] + ((self.sharding.rank << 40) if self.sharding is not None else 0)
            firsts = itertools.accumulate((snap.numel() for snap in frag.snapshot), initial=base)
            sketch = count_sketch((snap.view(-1).to(view.device) - view.float().reshape(-1), first)  # one at a time
                                  for snap, view, first in zip(frag.snapshot, views, firsts))
        verdict = self.screen.screen(self.cross, self.sharding, float(sq), weight, self.device, sketch)
        if verdict.excluded:
            frag.verdict = verdict
            if self.sharding is None or self.sharding.rank == 0:  # one line per group
                log_verdict(verdict, self.group_index, self.cross.member_name, self.num_syncs + 1)
        return verdict.weight(self.group_index, weight)

    def drop_sync(self, fragment: Optional[int] = None) -> None:
        """Forget a started sync without applying it (θ_g, the outer state and the error feedback unchanged); a
        collective of it still in flight is left to finish into its own buffer."""
        frag = self.fragment_sync(fragment)
        red, frag.pending, frag.verdict = frag.pending, None, None
        if red is not None and red.works:
            self.reducer.discard(red)

    def _to_state_device(self, mean: Tensor, frag: FragmentSync) -> Tensor:
        """The mean on the state device. Host-resident state: copied into one persistent page-locked buffer (a new
        pageable tensor per sync costs its page faults at every sync, seconds at 1B parameters)."""
        if not self._host_state:
            return mean.to(self.state_device)
        if self._host_mean is None:
            self._host_mean = torch.empty(self.layout.owned_numel, dtype=torch.float32, pin_memory=True)
        return self._host_mean[frag.owned[0] : frag.owned[0] + mean.numel()].copy_(mean)

    def _outer_step(self, frag: FragmentSync, mean: Tensor, red: Reduction, mix: float,
                    screened_out: Sequence[int] = ()) -> SyncResult:
        """``mean``: the groups' mean of the fragment, on the state device, a tensor this sync may overwrite;
        ``screened_out``: the groups the screen left out (their buffers are left out of the buffers' mean too)."""
        snapshots = frag.snapshot
        theta = frag.theta
        if mean.numel() and mean.untyped_storage().data_ptr() == theta.untyped_storage().data_ptr():
            mean = mean.clone()  # never scratch in θ_g itself
        # Buffers go with the last fragment; they are reduced first, so that a non-finite one stops the sync before
        # θ_g changes, as a non-finite parameter does.
        kept_groups = self.num_groups - len(screened_out)
        buffer_sum = reduce_buffers(self.cross, self.buffers, left_out=self.group_index in screened_out) \
            if frag.is_last else None
        # Pseudo-gradient Δ = θ_g − mean: for an outer optimizer formed in place of the mean (the reduce buffer, which
        # becomes the gradient); for averaging never formed, only its norm. The norm over the whole fragment: the
        # shards of a worker group add their squares.
        if self.outer_optimizer is None:
            delta = None
            sq_local = squared_norm(theta, mean)
        else:
            delta = torch.sub(theta, mean, out=mean)
            sq_local = squared_norm(delta)
        sq = torch.tensor([sq_local], dtype=torch.float64, device=self.device)
        if self.sharding is not None and self.sharding.size > 1:
            self.sharding.all_reduce(sq)
        sq_norm = float(sq.item())
        if not self.cross.commit():  # a fault-tolerant transport's vote: nothing has been written yet
            raise SyncAbortedError("the sync was aborted (a collective failed, or too few groups took part); the "
                                   "global parameters and the outer optimizer state are unchanged.")
        buffers_finite = buffer_sum is None or bool(torch.isfinite(buffer_sum).all())
        if not math.isfinite(sq_norm) or not buffers_finite:
            return self._nonfinite(frag, red, buffers_finite)
        if self.compressor is not None:
            self.compressor.commit(red, frag)
        # No group weighed in (groups that all just joined, or resumed from their checkpoints): there is no mean, so
        # θ_g, the outer state, the buffers and every group's parameters stay as they are (a job resuming from a
        # checkpoint taken mid-interval keeps its inner progress, as in one world).
        idle = red.total_weight == 0.0
        if self.outer_optimizer is None:
            # Outer SGD with lr 1 and no momentum is the mean itself; copy it to stay exact.
            theta.copy_(mean)
        elif idle:
            pass  # no outer step: momentum must not act
        else:
            # Only this fragment's parameters get a gradient: torch optimizers skip (and keep the state of) the rest.
            # torch.optim's own optimizers copy what they keep of a gradient, so theirs are views of Δ (scratch after
            # this step); another optimizer gets copies, in case it keeps a reference.
            views = type(self.outer_optimizer).__module__.startswith("torch.optim")
            assert delta is not None
            offset = 0
            for snap in snapshots:
                grad = delta[offset : offset + snap.numel()].view_as(snap)
                snap.grad = grad if views else grad.clone()
                offset += snap.numel()
            self.outer_optimizer.step()
            for snap in snapshots:
                snap.grad = None
        if not idle:
            self.write_back(frag.index, mix)
        sent = red.sent
        if buffer_sum is not None and self.num_groups > 1:
            if not idle and kept_groups > 0:
                assign_buffers(self.buffers, buffer_sum / kept_groups)
            sent += buffer_sum.numel() * buffer_sum.element_size()
        result = self._finish(sent, math.sqrt(sq_norm), frag)
        result.screened_out = list(screened_out)
        return result

    def _nonfinite(self, frag: FragmentSync, red: Reduction, buffers_finite: bool = True) -> SyncResult:
        """The non-finite policy: raise naming the groups at fault, or skip: every group restarts from θ_g and the
        groups with non-finite buffers take the mean of the finite groups' buffers."""
        bad = self._nonfinite_groups(frag.fragment)
        what = "parameters" if buffers_finite else "parameters or floating-point buffers"
        if self.on_nonfinite == "raise":
            raise NonFinitePseudoGradientError(
                f"the pseudo-gradient is not finite (worker groups with NaN/inf {what}: {bad}); the global "
                "parameters and buffers were left unchanged. Resume from the last checkpoint saved before this step, "
                "lower the learning rate, enable gradient clipping, or pass on_nonfinite='skip' to drop such syncs."
            )
        self.write_back(frag.index)
        if not buffers_finite:
            finite_mean = finite_buffer_mean(self.cross, self.buffers)
            if finite_mean is not None:
                assign_buffers(self.buffers, finite_mean)
        if self.compressor is not None:
            self.compressor.drop(frag)
        result = self._finish(red.sent, float("nan"), frag, skipped=True)
        result.nonfinite_groups = bad
        return result

    def _finish(self, sent: int, norm: float, frag: FragmentSync, skipped: bool = False) -> SyncResult:
        if not skipped and frag.is_last:
            self.num_syncs += 1
        self.bytes_sent += sent
        return SyncResult(pseudo_grad_norm=norm, bytes_sent=sent, seconds=0.0, skipped=skipped, fragment=frag.index)

    @torch.no_grad()
    def write_back(self, fragment: Optional[int] = None, mix: float = 0.0) -> None:
        """Copy ``θ_g`` of a fragment into the live tensors (``mix`` > 0: ``α·θ_i + (1−α)·θ_g``); with a shard
        group, all-gather the ranks' pieces of the fragment first. Collective over the shard group."""
        frag = self.layout.fragment(fragment)
        if self.slicing is None or self.slicing.size == 1:
            for snap, view in zip(self.snapshot[slice(*frag.pieces)], self._owned_views(frag)):
                _blend(view, snap, mix)
            return
        a, b = frag.flat
        theta = self._syncs[frag.index].theta
        flat = gather_slices(self.slicing, self.layout.slice_counts(frag), theta.to(self.device))
        for t, offset in zip(self.tensors, self.layout.offsets):  # flat = θ_g[a:b]
            lo, hi = max(a, offset), min(b, offset + t.numel())
            if lo < hi:
                _blend(t.detach().view(-1)[lo - offset : hi - offset], flat[lo - a : hi - a], mix)

    def _nonfinite_groups(self, frag: Fragment) -> list[int]:
        """Indices of the worker groups whose local parameters hold NaN/inf (only run on the failure path)."""
        views = self._owned_views(frag) + (self.buffers if frag.is_last else [])
        local_bad = any(not bool(torch.isfinite(v).all()) for v in views)
        flags = torch.zeros(self.num_groups, dtype=torch.float32, device=self.device)
        flags[self.group_index] = float(local_bad)
        if self.num_groups > 1:
            self.cross.all_reduce(flags)
        if self.sharding is not None and self.sharding.size > 1:
            self.sharding.all_reduce(flags)
        return [i for i, f in enumerate(flags.tolist()) if f > 0]

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """This rank's snapshot slice, outer optimizer state, error feedback and counters (CPU tensors)."""
        compressed = {"compression_error": None, "compression_mean_error": {}, "compression_mean_error_owner": {}}
        if self.compressor is not None:
            kept = [s for s in self._syncs.values() if s.mean_error is not None]
            compressed.update(self.compressor.state_dict(),
                              compression_mean_error={s.index: s.mean_error.detach().cpu().clone() for s in kept},
                              compression_mean_error_owner={s.index: s.mean_error_owner for s in kept
                                                            if s.mean_error_owner is not None})
        return {
            "snapshot": [s.detach().cpu().clone() for s in self.snapshot],
            "outer_optimizer": self.outer_optimizer.state_dict() if self.outer_optimizer is not None else None,
            "outer_optimizer_class": type(self.outer_optimizer).__name__ if self.outer_optimizer is not None else None,
            "num_syncs": self.num_syncs,
            "bytes_sent": self.bytes_sent,
            "total_numel": self.total_numel,
            "owned_numel": self.owned_numel,
            **compressed,
            # streaming sync: collectives in flight are waited for and their results kept, to apply after a resume
            "pending": [p.state_dict() for p in self.pending.values()],
            # the robust screen's per-group norms, verdicts and bans (replicated: the same on every member)
            "screen": self.screen.state_dict() if self.screen is not None else None,
        }

    @torch.no_grad()
    def load_merged_state(self, merged: Mapping[str, Any]) -> None:
        """Restore ``θ_g`` and the outer optimizer state from :func:`merge_outer_states` (the whole flattened model),
        taking this rank's slice of it: a resume on another layout (world size, ``group_size``)."""
        if merged["total_numel"] != self.total_numel:
            raise ValueError(f"local-SGD state does not match the model: the checkpoint's global parameters hold "
                             f"{merged['total_numel']} elements, the model has {self.total_numel}.")
        ranges = [(self.layout.offsets[p.index] + p.start, self.layout.offsets[p.index] + p.stop)
                  for p in self.layout.pieces]
        outer = merged["outer_optimizer"]
        if outer is not None:
            pieces = {i: {**outer["scalars"], **{k: v[a:b].clone() for k, v in outer["flat"].items()}}
                      for i, (a, b) in enumerate(ranges)} if outer["flat"] or outer["scalars"] else {}
            outer = {"state": pieces,
                     "param_groups": [{**g, "params": list(range(len(ranges)))} for g in outer["param_groups"]]}
        self.load_state_dict({
            "snapshot": [merged["snapshot"][a:b] for a, b in ranges], "outer_optimizer": outer,
            "outer_optimizer_class": merged["outer_optimizer_class"], "num_syncs": merged["num_syncs"],
            "bytes_sent": merged["bytes_sent"], "total_numel": self.total_numel, "owned_numel": self.owned_numel,
            "compression_error": None, "compression_mean_error": {}, "pending": [],
        })

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
            load_outer_optimizer(self.outer_optimizer, state["outer_optimizer"], state.get("outer_optimizer_class"))
            for st in self.outer_optimizer.state.values():
                for k, v in st.items():
                    if isinstance(v, Tensor) and v.dim() > 0:
                        st[k] = v.to(self.state_device)
        self.num_syncs = int(state["num_syncs"])
        self.bytes_sent = int(state["bytes_sent"])
        if self.screen is not None:  # absent (a checkpoint from before it was saved, or a merged one): afresh
            self.screen.load_state_dict(state.get("screen"))
        if self.compressor is not None:
            self.compressor.load_state_dict(state)
            mean_errors = state.get("compression_mean_error", {})
            owners = state.get("compression_mean_error_owner") or {}
            for sync in self._syncs.values():
                kept = mean_errors.get(sync.index)
                sync.mean_error = kept.to(self.device) if kept is not None else None
                sync.mean_error_owner = tuple(owners[sync.index]) if kept is not None and sync.index in owners \
                    else None
        for sync in self._syncs.values():
            if sync.pending is not None and sync.pending.works:  # dropped while in flight
                self.reducer.discard(sync.pending)
            sync.pending = None
        for p in state.get("pending", []):
            self.fragment_sync(p["fragment"]).pending = Reduction.from_state(p, self.device)


def merge_outer_states(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The :meth:`OuterSync.state_dict` of the ranks of one worker group (slices ``0..S-1`` of the flattened model,
    in rank order) as one state of the whole model: ``θ_g`` flat, each per-element outer-optimizer state (e.g. the
    momentum buffer) flat, the rest (e.g. a step count) from slice 0. Syncs in flight and error feedback are left out.
    :meth:`OuterSync.load_merged_state` takes a rank's slice of it on any layout."""
    first = states[0]
    snapshot = torch.cat([s.reshape(-1).float() for st in states for s in st["snapshot"]])
    if snapshot.numel() != first["total_numel"]:
        raise ValueError(f"the outer states cover {snapshot.numel()} of the model's {first['total_numel']} elements: "
                         "pass every slice of one worker group, in rank order.")
    outer = None
    if first["outer_optimizer"] is not None:
        pieces = [(st["outer_optimizer"]["state"], i, s.numel()) for st in states for i, s in enumerate(st["snapshot"])]
        per_piece = [state.get(i, state.get(str(i), {})) for state, i, _ in pieces]
        flat_keys = {k for k, v in per_piece[0].items() if isinstance(v, Tensor) and v.numel() == pieces[0][2]}
        flat_keys = {k for k in flat_keys if all(k in st for st in per_piece)}
        outer = {"flat": {k: torch.cat([st[k].reshape(-1) for st in per_piece]) for k in sorted(flat_keys)},
                 "scalars": {k: v for k, v in per_piece[0].items() if k not in flat_keys},
                 "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                  for g in first["outer_optimizer"]["param_groups"]]}
    return {"merged": True, "snapshot": snapshot, "outer_optimizer": outer,
            "outer_optimizer_class": first.get("outer_optimizer_class"),
            "num_syncs": first["num_syncs"], "bytes_sent": first["bytes_sent"], "total_numel": first["total_numel"]}
