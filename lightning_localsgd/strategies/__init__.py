"""Lightning strategies: local SGD across worker groups, with DDP (and later FSDP / DeepSpeed) inside a group."""

from .base import LocalSGDMixin
from .ddp import LocalSGDStrategy
from .fsdp import LocalSGDFSDPStrategy

__all__ = ["LocalSGDFSDPStrategy", "LocalSGDMixin", "LocalSGDStrategy"]
