"""Small tensor utilities shared by the strategies: moving nested state to the CPU, DTensor shards, batch tokens."""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

__all__ = ["batch_tokens", "dtensor_to_local", "local_view", "tensor_bytes", "to_cpu"]


def _map(obj: Any, leaf: Any) -> Any:
    """Apply ``leaf`` to every tensor of a nest of dicts, lists and tuples."""
    if isinstance(obj, Tensor):
        return leaf(obj)
    if isinstance(obj, dict):
        return {k: _map(v, leaf) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, leaf) for v in obj)
    return obj


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nest of mappings, lists and tuples (what a checkpoint part or a healing holds)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def to_cpu(obj: Any) -> Any:
    """Every tensor of a nest of dicts, lists and tuples, detached and on the CPU (checkpoint state)."""
    return _map(obj, lambda t: t.detach().cpu())


def local_view(tensor: Tensor) -> Tensor:
    """The rank's own part of a tensor: the local shard of a DTensor (FSDP2, sharing its storage), else itself."""
    return tensor.detach().to_local() if hasattr(tensor, "to_local") else tensor


def dtensor_to_local(obj: Any) -> Any:
    """Every DTensor of a nest of dicts, lists and tuples replaced by its local shard."""
    return _map(obj, lambda t: t.to_local() if hasattr(t, "to_local") else t)


def batch_tokens(batch: Any) -> int:
    """Tokens in a batch: the elements of its first tensor (the token ids of a language model's input)."""
    if isinstance(batch, Tensor):
        return batch.numel()
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        tokens = batch_tokens(value)
        if tokens:
            return tokens
    return 0
