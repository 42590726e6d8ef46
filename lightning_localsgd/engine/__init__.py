"""The sync engine of local SGD, on bare ``torch.distributed``: no Lightning import anywhere in this package.

* :mod:`.comm`: the cross-group :class:`Communicator` interface and its ``torch.distributed`` implementation;
* :mod:`.codecs`: compression codecs (registry: :func:`register_codec`);
* :mod:`.presets`: outer-optimizer presets (registry: :func:`register_outer_optimizer`);
* :mod:`.layout`: which elements a rank syncs, streaming fragments;
* :mod:`.reducers`: the fp32 (weighted) all-reduce and the two-phase compressed all-reduce, start / finish;
* :mod:`.fragment`: :class:`FragmentSync`, one fragment's sync state (θ_g view, sync in flight, error feedback, tokens);
* :mod:`.outer`: :class:`OuterSync`, the outer step on a snapshot;
* :mod:`.schedules`: when to sync (registry: :func:`register_schedule`);
* :mod:`.warmup`: the warm-up step's gradient mean across groups (with the members' vote).
"""

from .codecs import (CODECS, Codec, TopKCodec, check_codec, codec_names, decode, encode, get_codec, payload_bytes,
                     register_codec)
from .comm import Communicator, ProcessGroupCommunicator, as_communicator
from .fragment import FragmentSync
from .layout import Fragment, Layout, split_fragments
from .outer import NonFinitePseudoGradientError, OuterSync, SyncResult
from .presets import (OuterOptimizerFactory, OuterOptimizerSpec, check_outer_optimizer_factory, outer_optimizer_name,
                      outer_optimizer_names, register_outer_optimizer, resolve_outer_optimizer)
from .reducers import AllGatherReducer, CompressedReducer, MeanReducer, Reduction
from .schedules import (Action, PeriodicSchedule, StreamingSchedule, SyncSchedule, TimeBasedSchedule,
                        TwoStageSchedule, build_schedule, register_schedule, schedule_names)

__all__ = [
    "CODECS", "Action", "AllGatherReducer", "Codec", "Communicator", "CompressedReducer", "Fragment", "FragmentSync",
    "Layout", "MeanReducer", "NonFinitePseudoGradientError", "OuterOptimizerFactory", "OuterOptimizerSpec", "OuterSync",
    "PeriodicSchedule", "ProcessGroupCommunicator", "Reduction", "StreamingSchedule", "SyncResult", "SyncSchedule",
    "TimeBasedSchedule", "TopKCodec", "TwoStageSchedule", "as_communicator", "build_schedule", "check_codec",
    "check_outer_optimizer_factory", "codec_names", "decode", "encode", "get_codec", "outer_optimizer_name",
    "outer_optimizer_names", "payload_bytes", "register_codec", "register_outer_optimizer", "register_schedule",
    "resolve_outer_optimizer", "schedule_names", "split_fragments",
]
