"""Compression codecs for pseudo-gradients, in a registry: ``compression="name"`` picks one.

A codec turns a flat fp32 tensor into a payload (one flat ``uint8`` tensor, so that ranks can exchange it with
all-to-all and all-gather) and back. The built-in ``int8`` and ``int4`` scale each block of ``block_size`` values by
its largest magnitude (symmetric, round-to-nearest): the error of a value is at most half a quantization step,
``absmax / (2·127)`` for int8 and ``absmax / (2·7)`` for int4. ``bf16`` keeps the sign, exponent and 7 mantissa bits
(relative error ≤ 2⁻⁸).

Add a codec by subclassing :class:`Codec` and calling :func:`register_codec`; every strategy and the planner then
accept its name. The engine adds error feedback around any codec (what it loses at one sync is added to the next).
A codec that encodes blocks of values independently says so with :attr:`Codec.block_numel`: the compressed reduce then
sends it in buckets, a pipeline that overlaps its encoding and decoding with the transfer.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Optional

import torch
from torch import Tensor

__all__ = ["CODECS", "BlockQuantCodec", "Codec", "check_codec", "codec_names", "decode", "encode", "get_codec",
           "payload_bytes", "register_codec"]

#: The built-in codecs (every registered name: :func:`codec_names`).
CODECS = ("bf16", "int8", "int4")


class Codec(ABC):
    """Encode a flat fp32 tensor into a flat ``uint8`` payload whose size depends only on the number of values."""

    #: Values a payload encodes independently of the others, or ``None``: cut the input anywhere at a multiple of it
    #: and the pieces' payloads decode to the same values as the whole one, their sizes adding up to its size. The
    #: compressed reduce then encodes and sends a chunk in buckets (a pipeline) with results identical to one payload;
    #: ``None`` (the default, for a codec that must see all its input) sends each chunk as one payload.
    block_numel: Optional[int] = None

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor:
        """Compress a flat fp32 tensor into a flat uint8 payload of :meth:`payload_bytes` bytes."""

    @abstractmethod
    def decode(self, payload: Tensor, numel: int) -> Tensor:
        """Inverse of :meth:`encode`: a flat fp32 tensor of ``numel`` values."""

    @abstractmethod
    def payload_bytes(self, numel: int) -> int:
        """Size of the payload of ``numel`` values (the planner prices syncs with it)."""


class BF16Codec(Codec):
    """Round to bfloat16: 2 bytes a value."""

    block_numel = 1

    def encode(self, x: Tensor) -> Tensor:
        return x.reshape(-1).float().to(torch.bfloat16).view(torch.uint8)

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        return payload.contiguous().clone().view(torch.bfloat16).float()  # clone: a slice may be misaligned

    def payload_bytes(self, numel: int) -> int:
        return 2 * numel


class BlockQuantCodec(Codec):
    """Symmetric integer quantization with one fp32 scale per block of ``block_size`` values (``bits`` = 8 or 4)."""

    def __init__(self, bits: int, block_size: int = 256) -> None:
        if bits not in (8, 4):
            raise ValueError(f"BlockQuantCodec supports bits=8 or 4, got {bits!r}.")
        self.bits = bits
        self.levels = 127 if bits == 8 else 7
        self.block_size = block_size
        # a block's codes and scale depend on that block's values only; int4 packs two values a byte: cut at even counts
        self.block_numel = block_size if bits == 8 or block_size % 2 == 0 else 2 * block_size

    def _codes(self, numel: int) -> int:
        return numel if self.bits == 8 else math.ceil(numel / 2)

    def payload_bytes(self, numel: int) -> int:
        return self._codes(numel) + 4 * math.ceil(numel / self.block_size)

    def encode(self, x: Tensor) -> Tensor:
        x = x.reshape(-1).float()
        n = x.numel()
        blocks = math.ceil(n / self.block_size)
        if n == blocks * self.block_size:  # whole blocks: no padded copy
            padded = x.view(blocks, self.block_size)
        else:
            padded = torch.zeros(blocks * self.block_size, dtype=torch.float32, device=x.device)
            padded[:n] = x
            padded = padded.view(blocks, self.block_size)
        scale = padded.abs().amax(dim=1) / self.levels  # fp32, one per block
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.div(padded, safe[:, None]).round_().clamp_(-self.levels, self.levels).to(torch.int8).view(-1)[:n]
        n_codes = self._codes(n)
        payload = torch.empty(n_codes + 4 * blocks, dtype=torch.uint8, device=x.device)
        if self.bits == 8:
            payload[:n_codes] = q.view(torch.uint8)
        else:  # two signed 4-bit values per byte, offset by 8 (1..15), the first one in the low half
            u = q.add_(8).view(torch.uint8)
            if n % 2:
                u = torch.cat([u, u.new_full((1,), 8)])
            pairs = u.view(-1, 2)
            torch.bitwise_or(pairs[:, 0], pairs[:, 1] << 4, out=payload[:n_codes])
        payload[n_codes:] = scale.view(torch.uint8)
        return payload

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        blocks = math.ceil(numel / self.block_size)
        n_codes = self._codes(numel)
        codes, scale = payload[:n_codes], payload[n_codes:].clone().view(torch.float32)
        # the codes as fp32 into one buffer of whole blocks (zero-padded), scaled in place
        out = torch.empty(max(blocks * self.block_size, 2 * n_codes), dtype=torch.float32, device=payload.device)
        if self.bits == 8:
            out[:numel] = codes.view(torch.int8)
        else:
            pairs = out[: 2 * n_codes].view(-1, 2)
            pairs[:, 0] = codes & 0x0F
            pairs[:, 1] = codes >> 4
            pairs.sub_(8)
        out[numel:] = 0
        return out[: blocks * self.block_size].view(blocks, self.block_size).mul_(scale[:, None]).view(-1)[:numel]


_REGISTRY: dict[str, Codec] = {"bf16": BF16Codec(), "int8": BlockQuantCodec(8), "int4": BlockQuantCodec(4)}


def register_codec(name: str, codec: Codec, override: bool = False) -> None:
    """Make ``compression=name`` use ``codec`` in every strategy, the engine and the planner.

    Raises:
        ValueError: ``name`` is taken (pass ``override=True`` to replace it) or ``codec`` is not a :class:`Codec`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_codec: the name must be a non-empty string, got {name!r}.")
    if not isinstance(codec, Codec):
        raise ValueError(f"register_codec({name!r}): the codec must be an instance of a Codec subclass, got "
                         f"{type(codec).__name__}.")
    if name in _REGISTRY and not override:
        raise ValueError(f"register_codec: a codec named {name!r} exists already; pass override=True to replace it.")
    _REGISTRY[name] = codec


def codec_names() -> tuple[str, ...]:
    """Every registered codec name (the built-ins first)."""
    return tuple(_REGISTRY)


def check_codec(name: object) -> None:
    """Raise a ``ValueError`` naming ``compression`` unless ``name`` is ``None`` or a registered codec."""
    if name is not None and (not isinstance(name, str) or name not in _REGISTRY):
        raise ValueError(f"compression must be one of {codec_names()} or None, got {name!r}. Register your own "
                         "codec with lightning_localsgd.register_codec(name, codec).")


def get_codec(name: str, block_size: Optional[int] = None) -> Codec:
    """The codec registered as ``name`` (a built-in block codec with another ``block_size`` if given)."""
    check_codec(name)
    codec = _REGISTRY[name]
    if block_size is not None and isinstance(codec, BlockQuantCodec) and block_size != codec.block_size:
        return BlockQuantCodec(codec.bits, block_size)
    return codec


def encode(x: Tensor, codec: str, block_size: int = 256) -> Tensor:
    """Compress a flat fp32 tensor into a flat uint8 payload with the codec named ``codec``."""
    return get_codec(codec, block_size).encode(x)


def decode(payload: Tensor, codec: str, numel: int, block_size: int = 256) -> Tensor:
    """Inverse of :func:`encode`: a flat fp32 tensor of ``numel`` values."""
    return get_codec(codec, block_size).decode(payload, numel)


def payload_bytes(codec: str, numel: int, block_size: int = 256) -> int:
    """Size of the payload of ``numel`` values."""
    return get_codec(codec, block_size).payload_bytes(numel)
