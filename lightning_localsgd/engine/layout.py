"""Which elements of the parameters a rank syncs, and how they split into streaming fragments; computed once.

``slice_count = S > 1``: the ``S`` ranks of a worker group hold identical replicas (DDP inside the group). The
flattened parameters are cut in ``S`` equal slices and rank ``k`` of the group owns slice ``k``: it reduces that slice
with rank ``k`` of every other group and the group all-gathers the slices afterwards. With ``S = 1`` the rank owns
all of its tensors (one rank per group, or FSDP / ZeRO shards that are local already).

Fragments (streaming sync) are contiguous runs of whole tensors, the same on every rank; a :class:`Fragment` holds
its ranges in the owned pieces, in the owned elements and in the flattened replica.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from torch import Tensor

__all__ = ["Fragment", "Layout", "Piece", "split_fragments"]


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


@dataclass(frozen=True)
class Piece:
    """The part ``[start, stop)`` of ``tensors[index].view(-1)`` that this rank owns."""

    index: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Fragment:
    """One fragment's ranges. ``index`` is ``None`` for the whole model (a plain, non-streaming sync)."""

    index: Optional[int]
    pieces: tuple[int, int]
    """Range in :attr:`Layout.pieces` (and in the snapshot, one tensor per piece)."""
    owned: tuple[int, int]
    """Range in the rank's owned elements (its pieces concatenated)."""
    flat: tuple[int, int]
    """Range in the flattened parameters of the whole replica."""
    is_last: bool
    """The whole model or the last fragment: buffers are averaged with it and it completes a sync."""

    @property
    def numel(self) -> int:
        """Elements of the fragment this rank owns."""
        return self.owned[1] - self.owned[0]


class Layout:
    """Pieces owned by slice ``slice_index`` of ``slice_count`` and the fragments, for tensors of ``numels``.

    Args:
        numels: the elements of each tensor, in the same order on every rank.
        slice_count / slice_index: the slices of a DDP group (1 / 0: the rank owns everything).
        fragments: number of streaming fragments (1: one).
        fragment_sizes: sizes to balance the fragments by (default ``numels``); FSDP passes the full parameters'
            sizes so every shard of a group cuts the model at the same tensors.
    """

    def __init__(self, numels: Sequence[int], slice_count: int = 1, slice_index: int = 0, fragments: int = 1,
                 fragment_sizes: Optional[Sequence[int]] = None) -> None:
        self.numels = [int(n) for n in numels]
        self.slice_count, self.slice_index = slice_count, slice_index
        self.total_numel = sum(self.numels)
        self.slice_numel = math.ceil(self.total_numel / slice_count)
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        own_start = slice_index * self.slice_numel
        own_stop = min(own_start + self.slice_numel, self.total_numel)
        self.pieces = [Piece(i, max(own_start, lo) - lo, min(own_stop, hi) - lo)
                       for i, (lo, hi) in enumerate(zip(self.offsets, self.offsets[1:]))
                       if max(own_start, lo) < min(own_stop, hi)]
        self.owned_numel = sum(p.numel for p in self.pieces)

        sizes = list(fragment_sizes) if fragment_sizes is not None else self.numels
        if len(sizes) != len(self.numels):
            raise ValueError(f"fragment_sizes has {len(sizes)} entries for {len(self.numels)} tensors.")
        self.num_fragments = fragments
        self.fragment_bounds = split_fragments(sizes, fragments)
        piece_bounds, owned_bounds = [], []
        for first_tensor in self.fragment_bounds:
            idx = next((i for i, p in enumerate(self.pieces) if p.index >= first_tensor), len(self.pieces))
            piece_bounds.append(idx)
            owned_bounds.append(sum(p.numel for p in self.pieces[:idx]))
        self._fragments = [
            Fragment(f, (piece_bounds[f], piece_bounds[f + 1]), (owned_bounds[f], owned_bounds[f + 1]),
                     (self.offsets[self.fragment_bounds[f]], self.offsets[self.fragment_bounds[f + 1]]),
                     is_last=f == fragments - 1)
            for f in range(fragments)
        ]
        self._whole = Fragment(None, (0, len(self.pieces)), (0, self.owned_numel), (0, self.total_numel), True)

    def fragment(self, index: Optional[int]) -> Fragment:
        """Fragment ``index`` (``None``: all parameters)."""
        if index is None:
            return self._whole
        if not isinstance(index, int) or not 0 <= index < self.num_fragments:
            raise ValueError(f"fragment must be None or in [0, {self.num_fragments}), got {index!r}.")
        return self._fragments[index]

    def owned_views(self, tensors: Sequence[Tensor], fragment: Optional[Fragment] = None) -> list[Tensor]:
        """Flat views of the pieces of ``tensors`` this rank owns (of ``fragment``'s only, if given), in piece order:
        their concatenation is the rank's owned elements. ``tensors`` is any list laid out like the numels (the
        parameters, or copies of them)."""
        lo, hi = fragment.pieces if fragment is not None else (0, len(self.pieces))
        return [tensors[p.index].detach().view(-1)[p.start : p.stop] for p in self.pieces[lo:hi]]

    def slice_counts(self, fragment: Fragment) -> list[int]:
        """Elements of ``fragment`` each shard of the group owns (rank ``k`` owns ``[k·L, (k+1)·L)``)."""
        a, b = fragment.flat
        L = self.slice_numel
        return [max(0, min(b, (k + 1) * L) - max(a, k * L)) for k in range(self.slice_count)]
