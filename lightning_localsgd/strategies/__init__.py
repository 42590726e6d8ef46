"""Lightning strategies: local SGD across worker groups, with DDP (and later FSDP / DeepSpeed) inside a group."""

from .base import LocalSGDMixin
from .ddp import LocalSGDStrategy

__all__ = ["LocalSGDMixin", "LocalSGDStrategy"]
