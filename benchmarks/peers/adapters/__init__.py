"""One adapter per peer behind one interface (:mod:`.interface`): ours, torch's averagers, accelerate, torchft.

:data:`PEERS` lists them in the report's order; :func:`peer_of` finds the adapter of an implementation name
(``"ours_engine_int8"``, ``"torchft_diloco"``, …). The sync, training and feature parts of ``peers.py`` see only
this interface, and a new peer is one more module here.
"""

from __future__ import annotations

from .accelerate_local_sgd import AccelerateLocalSGD
from .interface import FEATURES, Loop, Peer, PlainPeer, SyncImpl
from .ours import Ours
from .torch_averager import TorchAverager
from .torchft_local_sgd import TorchftLocalSGD

PEERS: list[Peer] = [Ours(), TorchAverager(), AccelerateLocalSGD(), TorchftLocalSGD()]
MODES = ("average", "diloco", "compressed")
#: Implementation name -> label in the report.
LABELS = {name: label for peer in PEERS for name, label in peer.labels.items()}
#: Mode -> the implementations of the sync part in the timing order; the first of each is ours (the reference).
SYNC_IMPLS = {mode: [n for peer in PEERS for n in peer.sync_impls.get(mode, [])] for mode in MODES}
#: The training runs (implementation, mode), in the timing order.
TRAIN_RUNS = [(n, mode) for mode in ("average", "diloco") for peer in PEERS for n in peer.train_runs.get(mode, [])]


def peer_of(name: str) -> Peer:
    """The adapter of implementation ``name``."""
    return next(peer for peer in PEERS if name in peer.labels)


def peer_family(family: str) -> Peer:
    """The adapter of peer family ``family`` (``"ours"``, ``"torch_averager"``, ``"accelerate"``, ``"torchft"``)."""
    return next(peer for peer in PEERS if peer.family == family)


__all__ = ["FEATURES", "LABELS", "Loop", "PEERS", "Peer", "PlainPeer", "SYNC_IMPLS", "SyncImpl", "TRAIN_RUNS",
           "peer_family", "peer_of"]
