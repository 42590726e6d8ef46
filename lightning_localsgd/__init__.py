"""lightning-localsgd: local SGD and DiLoCo for PyTorch Lightning.

Importing the package registers the strategy names with Lightning, so ``Trainer(strategy="local_sgd")`` and
``Trainer(strategy="diloco")`` work::

    import lightning as L
    import lightning_localsgd  # noqa: F401  (registers the strategies)

    trainer = L.Trainer(strategy="local_sgd", devices=4)
"""

from ._versions import check_versions as _check_versions

_check_versions()  # first: an unsupported torch / Lightning fails here with one line naming the minimum

from lightning.pytorch.strategies import StrategyRegistry  # noqa: E402

from .checkpoint import convert_checkpoint, read_checkpoint
from .checkpoint_io import AtomicCheckpointIO
from .config import LocalSGDConfig
from .data import ResumableDataLoader, ResumableSampler
from .controller import LocalSGDController
from .state import TrainingState
from .engine import (Action, Codec, Communicator, NonFinitePseudoGradientError, OuterSync, ProcessGroupCommunicator,
                     SyncResult, SyncSchedule, TopKCodec, register_codec, register_outer_optimizer,
                     register_schedule, resolve_outer_optimizer)
from .planner import Plan, plan
from .reliability import SyncFailedError
from .strategies import (LocalSGDDeepSpeedStrategy, LocalSGDFSDPStrategy, LocalSGDMixin, LocalSGDStrategy,
                         convert_fsdp_checkpoint)
from .topology import Topology, build_mesh_topology, build_topology

__version__ = "0.1.0"

LocalSGDStrategy.register_strategies(StrategyRegistry)
LocalSGDFSDPStrategy.register_strategies(StrategyRegistry)
LocalSGDDeepSpeedStrategy.register_strategies(StrategyRegistry)  # names only: deepspeed is imported on use

__all__ = [
    "Action",
    "AtomicCheckpointIO",
    "Codec",
    "Communicator",
    "LocalSGDConfig",
    "LocalSGDController",
    "ProcessGroupCommunicator",
    "build_mesh_topology",
    "register_codec",
    "register_outer_optimizer",
    "register_schedule",
    "SyncFailedError",
    "TopKCodec",
    "LocalSGDDeepSpeedStrategy",
    "LocalSGDFSDPStrategy",
    "LocalSGDMixin",
    "LocalSGDStrategy",
    "NonFinitePseudoGradientError",
    "OuterSync",
    "Plan",
    "SyncResult",
    "SyncSchedule",
    "Topology",
    "TrainingState",
    "build_topology",
    "convert_checkpoint",
    "convert_fsdp_checkpoint",
    "plan",
    "read_checkpoint",
    "ResumableDataLoader",
    "ResumableSampler",
    "resolve_outer_optimizer",
]
