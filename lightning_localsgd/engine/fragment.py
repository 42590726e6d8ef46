"""One streaming fragment's sync as one object (as torchft's ``_StreamingDiLoCoFragment``).

:class:`FragmentSync` holds what belongs to the sync of one fragment of :class:`~.outer.OuterSync`'s owned elements: its
ranges (:class:`~.layout.Fragment`), its view of ``θ_g`` and the snapshot parameters over it (so its outer-optimizer
state is ``optimizer.state[p]`` of those), the reduce in flight (and the screen's verdict on it), the error feedback of
a compressed sync (the phase-1 residual a view of the reducer's flat one, the phase-2 residual and the membership that
made it), and what a transport across jobs keeps of it (when its last committed sync started, the attempt in flight),
and what a time-based schedule counts for it (:class:`FragmentTokens`: the tokens since its last sync, the weight of its
sync in flight). The sync of every parameter (``index`` ``None``) is one more such object; its ranges overlap every
fragment's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

from .layout import Fragment
from .reducers import Reduction

if TYPE_CHECKING:
    from .reducers import CompressedReducer
    from .screen import ScreenVerdict

__all__ = ["FragmentSync", "FragmentTokens", "PendingSyncs"]


class FragmentTokens:
    """What a time-based streaming schedule counts for one fragment (the schedule's own until it is bound to the
    engine's fragments: :meth:`~.schedules.SyncSchedule.bind_fragments`)."""

    def __init__(self) -> None:
        self.tokens = 0
        """Tokens this group processed since the fragment's last sync started."""
        self.weight_in_flight: Optional[float] = None
        """This group's weight in the fragment's sync started and not applied yet (``None``: none in flight)."""


class FragmentSync(FragmentTokens):
    """The sync state of one fragment (``index`` ``None``: every parameter).

    Args:
        fragment: its ranges in the layout.
        theta: its ``θ_g``, a view of the flat snapshot (write into it only to change ``θ_g``).
        snapshot: the snapshot parameters over its pieces (views of the same flat snapshot).
        residuals: the compressed reducer whose flat phase-1 residual :attr:`error` views (``None``: no compression).
    """

    def __init__(self, fragment: Fragment, theta: Tensor, snapshot: Sequence[torch.nn.Parameter],
                 residuals: Optional["CompressedReducer"] = None) -> None:
        super().__init__()
        self.fragment = fragment
        self.theta = theta
        self.snapshot = list(snapshot)
        self._residuals = residuals
        self.pending: Optional[Reduction] = None
        """Its sync started and not yet finished."""
        self.verdict: Optional["ScreenVerdict"] = None
        """The robust screen's verdict on that sync, when it left groups out."""
        self.mean_error: Optional[Tensor] = None
        """Compressed sync: the phase-2 residual of the mean chunk this rank encoded at its last sync."""
        self.mean_error_owner: Optional[tuple[int, int]] = None
        """``(members, rank)`` of the sync that made :attr:`mean_error` (``None``: any, as a checkpoint's)."""
        self.synced_at = 0
        """A transport across jobs: its group's inner steps when its last committed sync started (a sync of every
        parameter sets every fragment's)."""
        self.attempt: Any = None
        """A transport across jobs: its sync attempt in flight (its quorum's record, what a redo needs)."""

    @property
    def index(self) -> Optional[int]:
        return self.fragment.index

    @property
    def owned(self) -> tuple[int, int]:
        """Its range in the rank's owned elements."""
        return self.fragment.owned

    @property
    def numel(self) -> int:
        return self.fragment.numel

    @property
    def is_last(self) -> bool:
        return self.fragment.is_last

    @property
    def error(self) -> Optional[Tensor]:
        """Compressed sync: the phase-1 residual of its elements, a view of the reducer's flat one (``None`` before
        the first compressed sync)."""
        flat = self._residuals.error if self._residuals is not None else None
        return flat[self.owned[0] : self.owned[1]] if flat is not None else None

    def forget_error(self) -> None:
        """Drop its phase-2 residual (the phase-1 one is the reducer's to zero)."""
        self.mean_error = self.mean_error_owner = None


class PendingSyncs(Mapping[Optional[int], Reduction]):
    """The syncs in flight, by fragment index (``None``: every parameter), read from the fragments: read-only."""

    def __init__(self, syncs: Mapping[Optional[int], FragmentSync]) -> None:
        self._syncs = syncs

    def __getitem__(self, index: Optional[int]) -> Reduction:
        sync = self._syncs.get(index)
        if sync is None or sync.pending is None:
            raise KeyError(index)
        return sync.pending

    def __iter__(self) -> Iterator[Optional[int]]:
        return (i for i, s in self._syncs.items() if s.pending is not None)

    def __len__(self) -> int:
        return sum(s.pending is not None for s in self._syncs.values())
