"""Lightning strategies: local SGD across worker groups, with DDP, FSDP2 or DeepSpeed ZeRO inside a group."""

from .base import LocalSGDMixin
from .ddp import LocalSGDStrategy
from .deepspeed import LocalSGDDeepSpeedStrategy  # imports no deepspeed: that happens when one is created
from .fsdp import LocalSGDFSDPStrategy, convert_fsdp_checkpoint

__all__ = ["LocalSGDDeepSpeedStrategy", "LocalSGDFSDPStrategy", "LocalSGDMixin", "LocalSGDStrategy",
           "convert_fsdp_checkpoint"]
