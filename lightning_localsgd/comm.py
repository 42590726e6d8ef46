"""Compression codecs for pseudo-gradients, with per-block scales; torch only.

A codec turns a flat fp32 tensor into a payload (one flat ``uint8`` tensor, so that ranks can all-gather it) and
back. ``int8`` and ``int4`` scale each block of ``block_size`` values by its largest magnitude (symmetric,
round-to-nearest): the error of a value is at most half a quantization step, ``absmax / (2·127)`` for int8 and
``absmax / (2·7)`` for int4. ``bf16`` keeps the sign, exponent and 7 mantissa bits (relative error ≤ 2⁻⁸).

Used by :class:`lightning_localsgd.outer.OuterSync` with error feedback: what the codec loses at one sync is added to
the next sync's pseudo-gradient, so the error does not accumulate over syncs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CODECS = ("bf16", "int8", "int4")
_LEVELS = {"int8": 127, "int4": 7}


def check_codec(name: object) -> None:
    if name is not None and name not in CODECS:
        raise ValueError(f"compression must be one of {CODECS} or None, got {name!r}.")


def payload_bytes(codec: str, numel: int, block_size: int = 256) -> int:
    """Size of the payload of ``numel`` values."""
    if codec == "bf16":
        return 2 * numel
    blocks = math.ceil(numel / block_size)
    values = numel if codec == "int8" else math.ceil(numel / 2)
    return values + 4 * blocks


def encode(x: Tensor, codec: str, block_size: int = 256) -> Tensor:
    """Compress a flat fp32 tensor into a flat uint8 payload."""
    x = x.reshape(-1).float()
    if codec == "bf16":
        return x.to(torch.bfloat16).view(torch.uint8)
    levels = _LEVELS[codec]
    n = x.numel()
    blocks = math.ceil(n / block_size)
    padded = torch.zeros(blocks * block_size, dtype=torch.float32, device=x.device)
    padded[:n] = x
    padded = padded.view(blocks, block_size)
    scale = padded.abs().amax(dim=1) / levels  # fp32, one per block
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(padded / safe[:, None]).clamp_(-levels, levels).to(torch.int8).view(-1)[:n]
    if codec == "int8":
        codes = q.view(torch.uint8)
    else:  # two signed 4-bit values per byte
        u = (q + 8).to(torch.uint8)
        if n % 2:
            u = torch.cat([u, u.new_full((1,), 8)])
        codes = u[0::2] | (u[1::2] << 4)
    return torch.cat([codes, scale.view(torch.uint8)])


def decode(payload: Tensor, codec: str, numel: int, block_size: int = 256) -> Tensor:
    """Inverse of :func:`encode`: a flat fp32 tensor of ``numel`` values."""
    if codec == "bf16":
        return payload.contiguous().clone().view(torch.bfloat16).float()  # clone: a slice may be misaligned
    blocks = math.ceil(numel / block_size)
    n_codes = numel if codec == "int8" else math.ceil(numel / 2)
    codes, scale = payload[:n_codes], payload[n_codes:].clone().view(torch.float32)
    if codec == "int8":
        q = codes.view(torch.int8).float()
    else:
        low = (codes & 0x0F).to(torch.int16) - 8
        high = (codes >> 4).to(torch.int16) - 8
        q = torch.stack([low, high], dim=1).view(-1)[:numel].float()
    padded = torch.zeros(blocks * block_size, dtype=torch.float32, device=payload.device)
    padded[:numel] = q
    return (padded.view(blocks, block_size) * scale[:, None]).view(-1)[:numel]
