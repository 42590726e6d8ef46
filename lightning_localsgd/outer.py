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
from dataclasses import dataclass
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
        compression: ``None`` (default: all-reduce fp32 parameters), or ``"bf16"``, ``"int8"``, ``"int4"``: each rank
            compresses its pseudo-gradient ``θ_g − θ_i`` plus the error the codec made at the previous sync (error
            feedback), the ranks all-gather the payloads and average the decoded values (see :mod:`.comm`).
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

        # θ_g for the owned pieces, fp32 whatever the training precision, as parameters of the outer optimizer.
        self.snapshot: list[torch.nn.Parameter] = [
            torch.nn.Parameter(torch.empty(p.numel, dtype=torch.float32, device=self.state_device), requires_grad=False)
            for p in self.pieces
        ]
        self.outer_optimizer = outer_optimizer(self.snapshot) if outer_optimizer is not None else None
        self.num_syncs = 0
        self.bytes_sent = 0
        self._error: Optional[Tensor] = None  # error feedback of the compression codec
        self.reset_snapshot()

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
        if self.outer_optimizer is not None:
            for state in self.outer_optimizer.state.values():
                total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))
        return total

    # ------------------------------------------------------------------ sync
    def _buckets(self, numel: int) -> list[tuple[int, int]]:
        per_bucket = max(1, self.bucket_bytes // 4)
        return [(lo, min(lo + per_bucket, numel)) for lo in range(0, numel, per_bucket)] or [(0, 0)]

    @torch.no_grad()
    def sync(self, weight: Optional[float] = None) -> SyncResult:
        """Run one outer step: reduce, pseudo-gradient, outer optimizer, write back. Collective on all ranks.

        Args:
            weight: this group's weight ``w_i`` in the mean (e.g. tokens processed). ``None`` = uniform ``1/G``,
                which sends nothing extra; a weight adds one float to the reduce.
        """
        start = time.perf_counter()
        new_error = None
        if self.compression is not None:
            if weight is not None:
                raise ValueError("weighted syncs (heterogeneous workers) do not support compression yet.")
            mean, sent, new_error = self._compressed_mean()
        else:
            mean, sent = self._reduced_mean(weight)
        return self._outer_step(start, mean, sent, new_error)

    def _reduced_mean(self, weight: Optional[float]) -> tuple[Tensor, int]:
        """The weighted mean of the groups' owned parameters, by bucketed all-reduce over the cross group."""
        weighted = weight is not None
        n = self.owned_numel
        buf = torch.empty(n + (1 if weighted else 0), dtype=torch.float32, device=self.device)
        if n:
            torch.cat([v.float() for v in self._owned_views()], out=buf[:n])
        if weighted:
            buf[:n].mul_(float(weight))
            buf[n] = float(weight)
        # One all-reduce per bucket, all in flight together.
        handles = []
        if self.num_groups > 1:
            for lo, hi in self._buckets(buf.numel()):
                handles.append(dist.all_reduce(buf[lo:hi], op=dist.ReduceOp.SUM, group=self.cross_group, async_op=True))
        for h in handles:
            h.wait()
        sent = buf.numel() * buf.element_size() if self.num_groups > 1 else 0
        buf[:n].div_(buf[n] if weighted else self.num_groups)
        return buf[:n].to(self.state_device), sent

    def _compressed_mean(self) -> tuple[Tensor, int, Tensor]:
        """The mean of the groups' parameters as ``θ_g − mean_i decode(encode(θ_g − θ_i + e_i))``, by all-gather."""
        n = self.owned_numel
        local = torch.cat([v.float().reshape(-1) for v in self._owned_views()]) if n else torch.zeros(0)
        snap = torch.cat([x.view(-1) for x in self.snapshot]).to(self.device) if n else local.clone()
        if self._error is None:
            self._error = torch.zeros(n, dtype=torch.float32, device=self.device)
        d = snap - local + self._error
        payload = encode(d, self.compression)
        new_error = d - decode(payload, self.compression, n)
        if self.num_groups > 1:
            gathered = torch.empty(self.num_groups * payload.numel(), dtype=torch.uint8, device=self.device)
            dist.all_gather_into_tensor(gathered, payload, group=self.cross_group)
        else:
            gathered = payload
        size = payload.numel()
        total = torch.zeros(n, dtype=torch.float32, device=self.device)
        for i in range(self.num_groups):
            total += decode(gathered[i * size : (i + 1) * size], self.compression, n)
        mean = (snap - total / self.num_groups).to(self.state_device)
        sent = size if self.num_groups > 1 else 0
        return mean, sent, new_error

    def _outer_step(self, start: float, mean: Tensor, sent: int, new_error: Optional[Tensor]) -> SyncResult:
        n = self.owned_numel

        # Pseudo-gradient norm over the whole model: the slices of a worker group add their squares.
        flat_snapshot = torch.cat([s.view(-1) for s in self.snapshot]) if n else mean.new_zeros(0)
        delta = flat_snapshot - mean
        sq = delta.double().pow(2).sum().reshape(1).to(self.device)
        if self.norm_group is not None and dist.get_world_size(self.norm_group) > 1:
            dist.all_reduce(sq, group=self.norm_group)
        sq_norm = float(sq.item())

        if not math.isfinite(sq_norm):
            bad = self._nonfinite_groups()
            if self.on_nonfinite == "raise":
                raise NonFinitePseudoGradientError(
                    f"the pseudo-gradient is not finite (worker groups with NaN/inf parameters: {bad}); the global "
                    "parameters were left unchanged, so the last checkpoint is good. Lower the learning rate, enable "
                    "gradient clipping, or pass on_nonfinite='skip' to drop such syncs."
                )
            self._write_back()  # every group restarts from the last good θ_g
            if self._error is not None:
                self._error.zero_()
            return self._finish(start, sent, float("nan"), skipped=True)

        if new_error is not None:
            self._error = new_error

        if self.outer_optimizer is None:
            # Outer SGD with lr 1 and no momentum is the mean itself; copy it to stay exact.
            offset = 0
            for snap in self.snapshot:
                snap.copy_(mean[offset : offset + snap.numel()])
                offset += snap.numel()
        else:
            offset = 0
            for snap in self.snapshot:
                snap.grad = delta[offset : offset + snap.numel()].view_as(snap).clone()
                offset += snap.numel()
            self.outer_optimizer.step()
            for snap in self.snapshot:
                snap.grad = None
        self._write_back()
        sent += self._average_buffers()
        return self._finish(start, sent, math.sqrt(sq_norm))

    def _finish(self, start: float, sent: int, norm: float, skipped: bool = False) -> SyncResult:
        self.num_syncs += 0 if skipped else 1
        self.bytes_sent += sent
        return SyncResult(pseudo_grad_norm=norm, bytes_sent=sent, seconds=time.perf_counter() - start, skipped=skipped)

    def _write_back(self) -> None:
        """Copy ``θ_g`` into the live tensors; with a shard group, all-gather the slices first."""
        if self.shard_count == 1:
            for snap, view in zip(self.snapshot, self._owned_views()):
                view.copy_(snap)
            return
        own_slice = torch.zeros(self.slice_numel, dtype=torch.float32, device=self.device)
        if self.owned_numel:
            torch.cat([s.view(-1).to(self.device) for s in self.snapshot], out=own_slice[: self.owned_numel])
        flat = torch.empty(self.slice_numel * self.shard_count, dtype=torch.float32, device=self.device)
        dist.all_gather_into_tensor(flat, own_slice, group=self.shard_group)
        offset = 0
        for t in self.tensors:
            t.detach().view(-1).copy_(flat[offset : offset + t.numel()])
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

    def _nonfinite_groups(self) -> list[int]:
        """Indices of the worker groups whose local parameters hold NaN/inf (only run on the failure path)."""
        local_bad = any(not bool(torch.isfinite(v).all()) for v in self._owned_views())
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
