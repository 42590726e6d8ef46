"""The robust screen of a sync: a worker group whose pseudo-gradient is an outlier is left out of it.

A group whose data loader broke, whose node corrupts memory or whose learning rate blew up sends a pseudo-gradient
``Δ_g = θ_g − θ_i`` that is finite (the non-finite policy does not see it) but far larger than the others'; averaged
in, it moves ``θ_g`` by ``Δ_g / G`` and every group takes it. The screen measures each group's ``‖Δ_g‖`` before the
reduce and gives an outlier weight 0 in the (weighted) mean the reducers already compute, so the sync is the mean of
the other groups, in every mode and with every codec.

The rule (:meth:`PseudoGradientScreen.decide`), on each group's norm per unit of weight (``‖Δ_g‖ / w_g`` for a
token-weighted sync, else ``‖Δ_g‖``):

* with three or more groups taking part, a group is left out when its norm exceeds ``factor`` times the lower median
  of the groups' norms. The median's breakdown point is one half: fewer than half broken groups cannot move it, and
  the lower median of an even count is one of the smaller half. This is the norm screen of robust aggregation:
  clipping or dropping updates by norm against a robust centre (Karimireddy et al., "Learning from History for
  Byzantine Robust Optimization", ICML 2021, centred clipping; Sun et al., "Can You Really Backdoor Federated
  Learning?", 2019, norm bounding), and Templar's Gauntlet (arXiv 2603.08163), which scores each peer's contribution
  before it counts. A norm screen alone does not see a pseudo-gradient of an honest norm in a wrong direction (a sign
  flip): that one's harm is bounded by its weight, as the norm bound keeps it no larger than an honest one;
* with two groups (no majority) each group is held to its own history instead: left out when its norm exceeds
  ``factor`` times the median of its last ``history`` kept norms (once it has :data:`MIN_HISTORY` of them);
* a group left out at two of its last ``history`` syncs is a repeated offender: it is left out of the next
  ``ban_syncs`` syncs it takes part in, whatever its norm.

A group of weight 0 (it did not train the interval) takes no part; a non-finite norm is left to the non-finite policy
(``on_nonfinite``). Every member of the sync decides from the same gathered figures, so all decide alike.

Cost per sync: one pass over the rank's owned elements (``‖θ_g − θ_i‖²``), an all-reduce of one number inside the
worker group and an all-gather of three numbers per group across groups: no model-sized traffic, but one more
latency-bound round trip (on a wide-area link, its round-trip time).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch

from .comm import Communicator

__all__ = ["MIN_HISTORY", "PseudoGradientScreen", "ScreenVerdict", "check_screen_arguments"]

log = logging.getLogger(__name__)

MIN_HISTORY = 3
"""Kept norms a group needs before the two-group bound (its own history) applies to it."""

_STRIKES = 2
"""Exclusions within a group's last ``history`` syncs that make it a repeated offender."""


def check_screen_arguments(factor: Optional[float], history: int, ban_syncs: int) -> None:
    """Raise a ``ValueError`` naming the argument for a screen setting that cannot work."""
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                               or not math.isfinite(factor) or factor <= 1.0):
        raise ValueError(f"screen_factor must be a number above 1 (how many times the median norm a group's "
                         f"pseudo-gradient may reach before it is left out of a sync; e.g. 10.0) or None to turn the "
                         f"screen off, got {factor!r}.")
    for name, value, minimum in (("screen_history", history, MIN_HISTORY), ("screen_ban_syncs", ban_syncs, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


@dataclass
class ScreenVerdict:
    """What the screen decided for one sync, the same on every member."""

    norms: list[float]
    """Each member's pseudo-gradient norm per unit of weight, in member order (NaN: it takes no part)."""
    member_ids: list[int]
    """Each member's stable id (:attr:`~.comm.Communicator.member_id`), in member order."""
    excluded: dict[int, str] = field(default_factory=dict)
    """Members left out of the sync (their index) and why, with the figures."""
    rule: str = ""
    """``"median"`` (three or more members took part), ``"history"`` (two or fewer) or ``""`` (none)."""

    def weight(self, member: int, weight: Optional[float]) -> Optional[float]:
        """A member's weight in the sync: 0 when left out; with anyone left out, a uniform sync becomes a weighted
        one of weight 1 (every member knows it, so all send the extra float alike); else ``weight`` as given."""
        if not self.excluded:
            return weight
        if member in self.excluded:
            return 0.0
        return 1.0 if weight is None else weight


class PseudoGradientScreen:
    """Screens each sync's pseudo-gradients (see the module's docstring); keeps each member's recent norms.

    Args:
        factor: a member is left out when its norm exceeds this multiple of the reference (the median of the
            members' norms, or with two members its own recent median).
        history: how many of its kept norms each member's running median covers, and the window for repeated
            offences.
        ban_syncs: syncs a repeated offender is then left out of (0: none, each sync judges it afresh).
    """

    def __init__(self, factor: float, history: int = 8, ban_syncs: int = 0) -> None:
        check_screen_arguments(factor, history, ban_syncs)
        self.factor = float(factor)
        self.history_len = history
        self.ban_syncs = ban_syncs
        self.history: dict[int, deque[float]] = {}
        """Each member's kept norms (syncs it was not left out of), the newest last."""
        self.offences: dict[int, deque[bool]] = {}
        """Each member's last ``history`` verdicts (True: left out as an outlier)."""
        self.banned: dict[int, int] = {}
        """Repeated offenders: syncs they are still left out of."""
        self.excluded_total = 0
        """Exclusions over all syncs screened (a member left out of two syncs counts twice)."""

    # ------------------------------------------------------------------ state (checkpoints and healing)
    def state_dict(self) -> dict[str, Any]:
        """Each member's kept norms, recent verdicts and remaining ban, and the exclusions counted: what a resume
        needs to decide the next syncs as the uninterrupted run would. The same on every member that took part in
        the same syncs (each decides from the same gathered figures), so a healing group takes its peer's."""
        return {"history": {ident: list(norms) for ident, norms in self.history.items()},
                "offences": {ident: list(verdicts) for ident, verdicts in self.offences.items()},
                "banned": dict(self.banned), "excluded_total": self.excluded_total}

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        """Restore :meth:`state_dict` (``None``, a checkpoint from before the screen's state was saved or one saved
        without the screen: start afresh). A ``history`` shorter than the saved one keeps each member's newest."""
        state = state or {}
        self.history = {int(ident): deque(map(float, norms), maxlen=self.history_len)
                        for ident, norms in state.get("history", {}).items()}
        self.offences = {int(ident): deque(map(bool, verdicts), maxlen=self.history_len)
                         for ident, verdicts in state.get("offences", {}).items()}
        self.banned = {int(ident): int(left) for ident, left in state.get("banned", {}).items()}
        self.excluded_total = int(state.get("excluded_total", 0))

    # ------------------------------------------------------------------ the rule (no communication)
    def decide(self, norms: Sequence[float], member_ids: Sequence[int]) -> ScreenVerdict:
        """The verdict for one sync from every member's norm per unit of weight (NaN: takes no part), and update the
        members' histories, offences and bans."""
        verdict = ScreenVerdict(list(map(float, norms)), list(member_ids))
        taking_part = [i for i, n in enumerate(verdict.norms) if not math.isnan(n)]
        finite = [i for i in taking_part if math.isfinite(verdict.norms[i])]  # inf: the non-finite policy's
        judged = []
        for i in finite:
            ident = verdict.member_ids[i]
            left = self.banned.get(ident, 0)
            if left > 0:
                self.banned[ident] = left - 1
                verdict.excluded[i] = (f"a repeated outlier, left out of {self.ban_syncs} syncs ({left - 1} more after "
                                       f"this one); norm {verdict.norms[i]:.4g}")
            else:
                judged.append(i)
        if len(judged) >= 3:
            verdict.rule = "median"
            median = statistics.median_low(verdict.norms[i] for i in judged)
            for i in judged:
                if median > 0 and verdict.norms[i] > self.factor * median:
                    verdict.excluded[i] = (f"norm {verdict.norms[i]:.4g} > {self.factor:g} x the median "
                                           f"{median:.4g} of {len(judged)} groups")
        elif judged:
            verdict.rule = "history"
            for i in judged:
                past = self.history.get(verdict.member_ids[i], ())
                if len(past) >= MIN_HISTORY:
                    median = statistics.median_low(past)
                    if median > 0 and verdict.norms[i] > self.factor * median:
                        verdict.excluded[i] = (f"norm {verdict.norms[i]:.4g} > {self.factor:g} x its own median "
                                               f"{median:.4g} of its last {len(past)} syncs")
        for i in judged:
            ident = verdict.member_ids[i]
            offences = self.offences.setdefault(ident, deque(maxlen=self.history_len))
            offences.append(i in verdict.excluded)
            if i not in verdict.excluded:
                self.history.setdefault(ident, deque(maxlen=self.history_len)).append(verdict.norms[i])
            elif self.ban_syncs and sum(offences) >= _STRIKES:
                self.banned[ident] = self.ban_syncs
                offences.clear()
        self.excluded_total += len(verdict.excluded)
        return verdict

    # ------------------------------------------------------------------ the collective
    def screen(self, cross: Communicator, sharding: Optional[Communicator], squared_norm: float,
               weight: Optional[float], device: torch.device) -> ScreenVerdict:
        """Gather every member's norm and decide. Collective over ``sharding`` (the ranks holding the other parts of
        this group's pseudo-gradient: their squares are summed) and then ``cross``.

        ``squared_norm``: ``‖θ_g − θ_i‖²`` over the elements this rank syncs; ``weight``: its weight in the sync
        (``None``: uniform; 0: it takes no part); ``device``: where the collectives' tensors live."""
        sq = torch.tensor([squared_norm], dtype=torch.float64, device=device)
        if sharding is not None and sharding.size > 1:
            sharding.all_reduce(sq)
        total = math.sqrt(max(0.0, float(sq.item()))) if math.isfinite(float(sq.item())) else math.inf
        if weight is not None and weight == 0:
            value = math.nan
        else:
            value = total / float(weight) if weight is not None else total
        # float64: a member id (32 bits) is exact in it
        mine = torch.tensor([value, float(cross.member_id)], dtype=torch.float64, device=device)
        if cross.size > 1:
            gathered = torch.empty(2 * cross.size, dtype=torch.float64, device=mine.device)
            cross.all_gather(gathered, mine)
            figures = gathered.cpu().view(-1, 2).tolist()
        else:
            figures = [mine.cpu().tolist()]
        return self.decide([f[0] for f in figures], [int(f[1]) for f in figures])


def log_verdict(verdict: ScreenVerdict, member: int, name: str, sync: int) -> None:
    """One warning per group for each member left out of a sync: the group itself names itself (``name``), the
    others give its index and id."""
    for i, why in verdict.excluded.items():
        who = f"this group ({name})" if i == member else f"worker group {i} (id {verdict.member_ids[i]:#x})"
        log.warning(f"local SGD screen: {who} was left out of sync {sync}: {why}. The sync averages the other "
                    f"groups; every group continues from that mean.")
