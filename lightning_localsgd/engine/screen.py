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
* the direction test (``min_cosine`` set), which sees the sign flip the norm screen does not: each judged group the
  norm test kept scores the upper median of its pseudo-gradient's cosines with each other group's; a group scoring
  below ``min_cosine`` is left out while the upper median of the scores is above it (a sync whose groups all disagree
  screens nobody). A median, not the cosine with the others' sum: with three groups a flipped one cancels an honest
  direction in the sum, and a large one would swamp it. This is the cosine test of FLTrust (Cao et al., "FLTrust:
  Byzantine-robust Federated Learning via Trust Bootstrapping", NDSS 2021: an update whose cosine with a trusted
  direction is negative gets no weight) with the other groups' consensus as the trusted direction, as a majority of
  honest groups makes it. The cosines come from a count sketch of each pseudo-gradient (:func:`count_sketch`; Charikar
  et al., "Finding Frequent Items in Data Streams", ICALP 2002; FetchSGD, Rothchild et al., ICML 2020, sends such
  sketches in federated learning), gathered with the norms: :data:`SKETCH_SIZE` numbers per group, no extra round
  trip; its cosines are off by about ``1/sqrt(SKETCH_SIZE)`` (0.03). It needs three groups taking part: with two, each
  is the other's only reference, and who is wrong cannot be told. On the benchmark's clean run a group's score was
  never below 0.16 (median 0.38), while its cosine with the last outer update was negative at 16 of 59 syncs: the
  run's own last step is no reference for one interval's pseudo-gradient (``benchmarks/screen``). The test rests on
  the honest groups agreeing: where they do not (the tests' tiny Lightning task: each rank its own shard, two SGD
  steps) it can leave out an honest group, hence off by default;
* the direction test against chance (``min_cosine="chance"``). A fixed threshold of 0 is a coin flip for noise: a
  pseudo-gradient independent of the others has a cosine about 0 with each, so it passes at about half the syncs the
  norm bound lets it through. FLTrust weighs each update by its cosine clipped at 0, so noise gets a weight about 0 on
  average; a screen that keeps or drops a group needs a threshold that noise does not reach by chance. Under the null
  hypothesis "this group's pseudo-gradient is noise independent of the others, symmetric about 0", each bucket of its
  sketch is a sum of independent symmetric terms, so its sign is a fair coin independent of its magnitude and of the
  other buckets: the cosine of its unit sketch ``a`` with another group's ``u`` is the Rademacher sum
  ``Σ_b ±u_b·|a_b|``, of mean 0 and standard deviation exactly ``s = sqrt(Σ_b u_b²·a_b²)`` given the magnitudes
  (:func:`direction_scores` computes it for each pair). For vectors spread over the buckets ``s ≈ 1/sqrt(min(n,
  SKETCH_SIZE))`` with ``n`` the elements sketched (fewer elements than buckets fill only ``n`` of them): 0.031 for a
  model of more than 1024 parameters, 0.1 for one of 100; a pseudo-gradient concentrated in a few buckets has a larger
  ``s``. A group's significance is the upper median of ``cos/s`` over the other groups, and it is left out when that
  is below :data:`CHANCE_Z` = 3 (while the groups' upper median is above it): noise passes at about 0.13% of syncs
  (the Gaussian tail of a sum over many buckets; at most ``exp(-3²/2)`` = 1.1% by Hoeffding's inequality, for any
  symmetric noise), while an honest group needs a cosine above about ``3/sqrt(1024)`` = 0.094 with at least half the
  others (the benchmark's clean run: at 2 of 236 group-syncs it had less, and was left out). Agreement can be told
  from chance only for a pseudo-gradient spread over more than ``CHANCE_Z²`` = 9 effective buckets (identical groups
  score ``1/sqrt(Σ_b u_b⁴)``): the tests' 49-parameter model fills about 7 after its first interval, so there it
  screens nobody from then on, even with every group reading the same data;
* a group left out at two of its last ``history`` syncs is a repeated offender: it is left out of the next
  ``ban_syncs`` syncs it takes part in, whatever its norm.

A group of weight 0 (it did not train the interval) takes no part; a non-finite norm is left to the non-finite policy
(``on_nonfinite``). Every member of the sync decides from the same gathered figures, so all decide alike.

Cost per sync: one pass over the rank's owned elements (``‖θ_g − θ_i‖²``), an all-reduce of one number inside the
worker group and an all-gather of two numbers per group across groups: no model-sized traffic, but one more
latency-bound round trip (on a wide-area link, its round-trip time). The direction test adds a pass over the owned
elements (the count sketch: a product, a copy and a sum per element) and :data:`SKETCH_SIZE` float64 numbers per group
to the same two collectives.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence, Union

import torch

from .comm import Communicator

__all__ = ["CHANCE", "CHANCE_Z", "MIN_HISTORY", "SKETCH_SIZE", "PseudoGradientScreen", "ScreenVerdict",
           "check_screen_arguments", "count_sketch", "direction_scores"]

log = logging.getLogger(__name__)

MIN_HISTORY = 3
"""Kept norms a group needs before the two-group bound (its own history) applies to it."""

SKETCH_SIZE = 1024
"""Buckets of the direction test's count sketch (a power of two: the bucket is the hash's low bits)."""

CHANCE = "chance"
"""``min_cosine`` that tests agreement against chance (the module's docstring) instead of a fixed cosine."""

CHANCE_Z = 3.0
"""With ``min_cosine="chance"``: null spreads above chance a group's significance must reach (noise passes about 0.13%
of syncs; an honest group needs a cosine of about ``3/sqrt(SKETCH_SIZE)`` = 0.094 with most others)."""

_SKETCH_CHUNK = 1 << 20
"""Indices per chunk of the count sketch (a multiple of :data:`SKETCH_SIZE`; its sign pattern: 4 MiB per device)."""

_STRIKES = 2
"""Exclusions within a group's last ``history`` syncs that make it a repeated offender."""


def check_screen_arguments(factor: Optional[float], history: int, ban_syncs: int,
                           min_cosine: Optional[Union[float, Literal["chance"]]] = None) -> None:
    """Raise a ``ValueError`` naming the argument for a screen setting that cannot work."""
    if min_cosine is not None and min_cosine != CHANCE and (
            isinstance(min_cosine, bool) or not isinstance(min_cosine, (int, float)) or not -1.0 < min_cosine < 1.0):
        raise ValueError(f"screen_min_cosine must be a number strictly between -1 and 1 (the least cosine between a "
                         f"group's pseudo-gradient and the other groups'; e.g. 0.0 leaves out one pointing against "
                         f"them), {CHANCE!r} (a group must agree with the others {CHANCE_Z:g} null spreads above "
                         f"chance, which leaves out noise too) or None to turn the direction test off, got "
                         f"{min_cosine!r}.")
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
    cosines: list[float] = field(default_factory=list)
    """The direction test: each member's score, the upper median of its cosines with the other judged members (NaN:
    not tested), in member order."""
    significance: list[float] = field(default_factory=list)
    """The direction test: each member's significance, the upper median of its cosines over their null spreads (NaN:
    not tested; see :func:`direction_scores`), in member order."""
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
        min_cosine: the direction test: a member whose cosine with the other members' pseudo-gradients is below this
            is left out (while the groups' upper median is above it); ``"chance"``: one whose significance is below
            :data:`CHANCE_Z` (while the groups' upper median is above it); ``None``: no direction test.
    """

    def __init__(self, factor: float, history: int = 8, ban_syncs: int = 0,
                 min_cosine: Optional[Union[float, Literal["chance"]]] = None) -> None:
        check_screen_arguments(factor, history, ban_syncs, min_cosine)
        self.min_cosine: Optional[Union[float, str]] = (
            None if min_cosine is None else CHANCE if min_cosine == CHANCE else float(min_cosine))
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
    def decide(self, norms: Sequence[float], member_ids: Sequence[int],
               sketches: Optional[Sequence[Sequence[float]]] = None) -> ScreenVerdict:
        """The verdict for one sync from every member's norm per unit of weight (NaN: takes no part) and, for the
        direction test, its pseudo-gradient's :func:`count_sketch`, and update the members' histories, offences and
        bans."""
        verdict = ScreenVerdict(list(map(float, norms)), list(member_ids), cosines=[math.nan] * len(norms),
                                significance=[math.nan] * len(norms))
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
        if sketches is not None:
            self._direction(verdict, judged, sketches)
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

    def _direction(self, verdict: ScreenVerdict, judged: Sequence[int], sketches: Sequence[Sequence[float]]) -> None:
        """The direction test over the judged members the norm test kept (see the module's docstring)."""
        if self.min_cosine is None:
            return
        kept = [i for i in judged if i not in verdict.excluded]
        if len(kept) < 3:
            return
        cosines, significance = direction_scores([sketches[i] for i in kept])
        for i, cosine, z in zip(kept, cosines, significance):
            verdict.cosines[i], verdict.significance[i] = cosine, z
        chance = self.min_cosine == CHANCE
        scores, threshold = (significance, CHANCE_Z) if chance else (cosines, float(self.min_cosine))
        median = statistics.median_high(scores)
        if median <= threshold:
            return
        for i, cosine, score in zip(kept, cosines, scores):
            if score < threshold:
                why = (f"significance {score:.2f} (cosine {cosine:.3f}) with the other {len(kept) - 1} groups' "
                       f"pseudo-gradients (their upper median, in null spreads) < {CHANCE_Z:g} (screen_min_cosine "
                       f"'chance'; the groups' upper median {median:.2f})" if chance else
                       f"cosine {cosine:.3f} with the other {len(kept) - 1} groups' pseudo-gradients (their upper "
                       f"median) < screen_min_cosine {threshold:g} (the groups' upper median {median:.3f})")
                verdict.excluded[i] = f"{why}; norm {verdict.norms[i]:.4g}"

    # ------------------------------------------------------------------ the collective
    def screen(self, cross: Communicator, sharding: Optional[Communicator], squared_norm: float,
               weight: Optional[float], device: torch.device, sketch: Optional[torch.Tensor] = None) -> ScreenVerdict:
        """Gather every member's norm (and sketch) and decide. Collective over ``sharding`` (the ranks holding the
        other parts of this group's pseudo-gradient: their squares and sketches are summed) and then ``cross``.

        ``squared_norm``: ``‖θ_g − θ_i‖²`` over the elements this rank syncs; ``weight``: its weight in the sync
        (``None``: uniform; 0: it takes no part); ``device``: where the collectives' tensors live; ``sketch``: with
        the direction test, :func:`count_sketch` of ``θ_g − θ_i`` over the same elements (every member sends one)."""
        extra = 0 if sketch is None else sketch.numel()
        local = torch.empty(1 + extra, dtype=torch.float64, device=device)
        local[0] = squared_norm
        if sketch is not None:
            local[1:] = sketch.to(device=device, dtype=torch.float64)
        if sharding is not None and sharding.size > 1:
            sharding.all_reduce(local)
        squared = float(local[0].item())
        total = math.sqrt(max(0.0, squared)) if math.isfinite(squared) else math.inf
        if weight is not None and weight == 0:
            value = math.nan
        else:
            value = total / float(weight) if weight is not None else total
        # float64: a member id (32 bits) is exact in it
        mine = torch.cat([torch.tensor([value, float(cross.member_id)], dtype=torch.float64, device=device),
                          local[1:]])
        if cross.size > 1:
            gathered = torch.empty(mine.numel() * cross.size, dtype=torch.float64, device=mine.device)
            cross.all_gather(gathered, mine)
            figures = gathered.cpu().view(cross.size, -1)
        else:
            figures = mine.cpu().view(1, -1)
        return self.decide(figures[:, 0].tolist(), [int(f) for f in figures[:, 1].tolist()],
                           figures[:, 2:].tolist() if sketch is not None else None)


def direction_scores(sketches: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    """Each sketch's score and significance against the others (at least two): the upper median of its cosines with
    each other sketch, and the upper median of those cosines over their null spreads ``s = sqrt(Σ_b u_b²·a_b²)`` (unit
    sketches ``u``, ``a``: the standard deviation of the cosine were one of the two independent symmetric noise; the
    module's docstring). A median, not the cosine with the others' sum: with three groups a flipped one cancels an
    honest direction in the sum, and a large one (noise within the norm bound) would swamp it."""
    units = torch.nn.functional.normalize(torch.tensor([list(k) for k in sketches], dtype=torch.float64), dim=1,
                                          eps=1e-300)
    cosines = units @ units.T
    spread = (units.square() @ units.square().T).sqrt()
    # disjoint supports (s = 0) give a cosine of exactly 0: no evidence either way
    z = torch.where(spread > 0, cosines / spread.clamp_min(1e-300), torch.zeros_like(cosines))
    pairs, zs = cosines.tolist(), z.tolist()
    others = lambda row, k: row[:k] + row[k + 1:]  # noqa: E731
    return ([statistics.median_high(others(row, k)) for k, row in enumerate(pairs)],
            [statistics.median_high(others(row, k)) for k, row in enumerate(zs)])


def count_sketch(pieces: Iterable[tuple[torch.Tensor, int]], size: int = SKETCH_SIZE) -> torch.Tensor:
    """The count sketch (float64, ``size`` buckets, on the pieces' device) of a vector given as ``(values, first
    index)`` pieces: element ``j`` adds ``σ(j)·value`` to one bucket. The same index goes alike in every process, so
    sketches of vectors over the same indices compare (their inner product estimates the vectors'), and sketches of
    disjoint index ranges add up to the whole's.

    Element ``j`` = chunk ``c`` (of :data:`_SKETCH_CHUNK` indices), place ``o``: its sign ``σ(j)`` is ``o``'s in one
    fixed random ±1 pattern of a chunk's length, its bucket ``(o + c·R) mod size`` (``R`` odd: each chunk's buckets
    turned by another amount), so that a chunk costs a product, a copy and a column sum rather than a hash per element.
    Within a chunk the signs are independent (the estimate is unbiased); two elements of the same place in two chunks
    share a sign, and a bucket when their chunks' turns agree (``c ≡ c'`` modulo ``size``, 1 in 1024 chunk pairs)."""
    out: Optional[torch.Tensor] = None
    for values, first in pieces:
        flat = values.reshape(-1)
        if out is None:
            out = torch.zeros(size, dtype=torch.float64, device=flat.device)
        signs = _sketch_signs(flat.device)
        position, end = first, first + flat.numel()
        while position < end:
            chunk, place = divmod(position, _SKETCH_CHUNK)
            n = min(_SKETCH_CHUNK - place, end - position)
            signed = flat[position - first : position - first + n].float() * signs[place : place + n]
            lead = place % size  # pad to whole rows: row r, column t holds place (place - lead) + r·size + t
            signed = torch.nn.functional.pad(signed, (lead, (-(lead + n)) % size))
            column = signed.view(-1, size).sum(0, dtype=torch.float64)
            out += torch.roll(column, (chunk * _SKETCH_TURN) % size)
            position += n
    return out if out is not None else torch.zeros(size, dtype=torch.float64)


_SKETCH_TURN = 0x9E3779B1
"""``R`` of :func:`count_sketch` (odd)."""

_signs: dict[torch.device, torch.Tensor] = {}


def _sketch_signs(device: torch.device) -> torch.Tensor:
    """The fixed ±1 pattern of a chunk (fp32, the same in every process), one copy per device."""
    if device not in _signs:
        pattern = torch.randint(0, 2, (_SKETCH_CHUNK,), generator=torch.Generator().manual_seed(0x5C2EE9))
        _signs[device] = (pattern * 2 - 1).float().to(device)
    return _signs[device]


def log_verdict(verdict: ScreenVerdict, member: int, name: str, sync: int) -> None:
    """One warning per group for each member left out of a sync: the group itself names itself (``name``), the
    others give its index and id."""
    for i, why in verdict.excluded.items():
        who = f"this group ({name})" if i == member else f"worker group {i} (id {verdict.member_ids[i]:#x})"
        log.warning(f"local SGD screen: {who} was left out of sync {sync}: {why}. The sync averages the other "
                    f"groups; every group continues from that mean.")
