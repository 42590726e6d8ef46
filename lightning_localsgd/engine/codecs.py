"""Compression codecs for pseudo-gradients, in a registry: ``compression="name"`` picks one.

A codec turns a flat fp32 tensor into a payload (one flat ``uint8`` tensor, so that ranks can exchange it with
all-to-all and all-gather) and back. The built-in ``int8`` and ``int4`` scale each block of ``block_size`` values by
its largest magnitude (symmetric, round-to-nearest): the error of a value is at most half a quantization step,
``absmax / (2·127)`` for int8 and ``absmax / (2·7)`` for int4. ``bf16`` keeps the sign, exponent and 7 mantissa bits
(relative error ≤ 2⁻⁸). ``topk`` (:class:`TopKCodec`) is sparse: per 4096 values, the 64 of largest magnitude in 2 bits
each with their 12-bit indices (141× fewer bytes than fp32); ``topk_ef`` decodes to the same values with the indices
Elias-Fano coded (195×); ``topk_recipe`` sends 96 of 4096 with Elias-Fano indices (141×) and averages each value over
the groups that sent it (:class:`TopKCodec`).

A codec's :attr:`Codec.exchange` says how the engine exchanges its payloads (``P``: the payload of one rank's ``n``
values, one compressed copy; ``G``: the number of groups):

* ``"two_phase"`` (the dense codecs; :class:`~.reducers.CompressedReducer`): an all-to-all of each member's encoded
  chunk ``j`` to its owner ``j``, which decodes and averages them and encodes the mean, then an all-gather of the
  encoded means. Each rank sends ``2·(G−1)/G · P`` bytes on the wire per sync (a ring all-reduce's factor) and
  receives as many, whatever ``G``; the mean is encoded twice (error feedback in both phases).
* ``"all_gather"`` (the sparse codecs, SparseLoCo's exchange; :class:`~.reducers.AllGatherReducer`): each member
  encodes its pseudo-gradient once and all-gathers it; every member decodes the ``G`` payloads and sums them itself, in
  member order (the same mean on every rank). A sparse payload is not closed under averaging (the mean of ``G`` top-k
  chunks has up to ``G·k`` entries): gathering applies all of them, where a two-phase mean would be re-sparsified to
  ``k``. Each rank sends ``(G−1) · P`` bytes on the wire (a ring all-gather) and receives as many: the same as the
  two-phase exchange at ``G = 2`` (``P``), ``G/2`` times it above.

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

__all__ = ["AGGREGATES", "CODECS", "EXCHANGES", "BlockQuantCodec", "Codec", "TopKCodec", "check_codec", "codec_names",
           "decode", "encode", "get_codec", "payload_bytes", "register_codec"]

#: The built-in codecs (every registered name: :func:`codec_names`).
CODECS = ("bf16", "int8", "int4", "topk", "topk_ef", "topk_recipe")

#: The exchanges a codec can ask for (:attr:`Codec.exchange`).
EXCHANGES = ("two_phase", "all_gather")

#: How the all-gather exchange can combine the members' payloads (:attr:`Codec.aggregate`).
AGGREGATES = ("mean", "senders")


class Codec(ABC):
    """Encode a flat fp32 tensor into a flat ``uint8`` payload whose size depends only on the number of values."""

    #: Values a payload encodes independently of the others, or ``None``: cut the input anywhere at a multiple of it
    #: and the pieces' payloads decode to the same values as the whole one, their sizes adding up to its size. The
    #: compressed reduce then encodes and sends a chunk in buckets (a pipeline) with results identical to one payload;
    #: ``None`` (the default, for a codec that must see all its input) sends each chunk as one payload.
    block_numel: Optional[int] = None

    #: How the engine exchanges the payloads (module docstring): ``"two_phase"`` (the default: a compressed all-reduce,
    #: the mean re-encoded by its chunk's owner) or ``"all_gather"`` (every member's payload to every member, summed
    #: locally: for codecs whose payloads are not closed under averaging, such as sparse ones).
    exchange: str = "two_phase"

    #: ``β`` of the error feedback the engine runs around the codec: what the codec lost at a sync, times ``β``, is
    #: added to the next sync's values (``e ← β·e + Δ``, in each encoding of the exchange). 1 (the default):
    #: all of it, as plain error feedback; below 1 the residual fades, as SparseLoCo's (:class:`TopKCodec`).
    feedback_decay: float = 1.0

    #: How the all-gather exchange combines the members' decoded payloads (:attr:`exchange` ``"all_gather"`` only):
    #: ``"mean"`` (the default), each value ``Σ d_i / G``, or ``"senders"``, each value the mean over the members that
    #: sent it (decoded non-zero): ``Σ d_i / #{i : d_i ≠ 0}``, 0 where none did. With a sparse codec a value that one
    #: member of ``G`` sent is applied whole, not divided by ``G`` (the reference code of SparseLoCo / DeMo:
    #: ``scatter_reduce(reduce="mean", include_self=False)``). Weighted: ``Σ w_i·d_i / Σ_{d_i ≠ 0} w_i``.
    aggregate: str = "mean"

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


class TopKCodec(Codec):
    """Sparse pseudo-gradients (SparseLoCo): per chunk of ``chunk`` values, the ``k`` of largest magnitude, each sent as
    its index in the chunk and a ``value_bits``-bit code over one fp32 scale per chunk.

    The default, registered as ``"topk"``, is SparseLoCo's setting (arXiv 2508.15706): chunks of 4096 values, the top
    64 of each (1.56%), 2-bit values, indices in 12 bits. A chunk costs ``⌈k·value_bits/8⌉ + ⌈k·index_bits/8⌉ + 4``
    bytes (16 + 96 + 4 = 116 for 4096 fp32 values: 141× fewer bytes in the payload); a last chunk of ``m < chunk``
    values sends ``min(k, m)`` entries, so the payload depends only on the number of values.

    Selection: the ``k`` largest magnitudes, ties broken toward the lower index (deterministic on every device, which
    the members' identical decoding needs). An entry that is exactly 0 (a chunk with fewer than ``k`` non-zero values,
    the zero padding of the engine's last chunk) is not sent: its slot repeats the chunk's largest entry, so zeros
    decode to 0.

    Values: a sign bit and ``value_bits − 1`` magnitude bits, ``j``, over the chunk's scale ``s`` (its largest
    magnitude): ``j`` is the largest integer below ``L = 2^(value_bits−1)`` with ``s·j/L ≤ |v|`` (in fp32), and
    ``|v|`` decodes to ``s·(2j+1)/2^value_bits``, the middle of its bin of ``[0, s]``. 2 bits: ``±s/4`` or ``±3s/4``.
    Why: the sign takes one bit; the other halves ``[0, s]``, the smallest worst-case error a 2-bit code over one scale
    has, ``s/4`` (four levels evenly over ``[−s, s]``, ``{±s/3, ±s}``, give ``s/3``); and the levels are the same on
    every device (``s·(2j+1)`` rounded once, then a power of two). Round trip of a chunk: a sent value is off by at
    most ``s/2^value_bits`` (``s/4`` at 2 bits); an unsent one by itself, at most the ``k``-th largest magnitude. The
    engine's error feedback keeps both for the next sync.

    ``indices``: ``"packed"``, ``⌈log2 chunk⌉`` bits each (12), or ``"elias-fano"``, the same indices, ascending, in
    ``⌊log2(chunk/k)⌋`` low bits each plus the high parts in unary (``k + chunk/2^low`` bits): 8 bits an index at the
    default setting (16 + 64 + 4 = 84 bytes per 4096 values, 195× fewer than fp32), a size that depends only on the
    number of values too; registered as ``"topk_ef"``. Both decode to the same values.

    ``feedback_decay``: ``β`` of SparseLoCo's error feedback, ``e ← β·e + Δ`` (0.95 there and here): the reducer keeps
    ``β`` times what the codec lost at a sync. With sparse updates the residual plays the part of DiLoCo's outer
    momentum (SparseLoCo pairs it with a plain outer step: ``outer_optimizer="average"`` or SGD without momentum).

    ``exchange``: ``"all_gather"`` (the default, SparseLoCo's): each group encodes its error-fed pseudo-gradient once,
    the groups all-gather the payloads and every rank sums the ``G`` decoded payloads itself (up to ``G·k`` entries
    per chunk applied; the residual keeps exactly what the group did not send). Per sync a rank hands over its payload
    ``P`` (what the sync metrics count: ``P`` plus 4 bytes for a weight, 4 for a stop flag) and sends and receives
    ``(G−1)·P`` bytes on the wire: at the default setting ``(G−1)·116`` bytes per 4096 values (``topk``),
    ``(G−1)·84`` (``topk_ef``), against ``2·(G−1)/G·16384`` for an fp32 all-reduce, i.e. ``282/G`` (``topk``) and
    ``390/G`` (``topk_ef``) times fewer bytes on the wire than fp32: the ratio of the payloads (141×, 195×) at
    ``G = 2``. ``"two_phase"``: the dense codecs' exchange, the mean of each chunk re-sparsified by its owner (with
    its own decayed residual): ``2·(G−1)/G·P`` a rank, whatever ``G``, but a sync applies at most ``k`` entries per
    chunk.

    ``aggregate`` (all-gather only; :attr:`Codec.aggregate`): ``"mean"`` (the default), every group's decoded values
    summed and divided by ``G``, as SparseLoCo's paper writes the update (``Δ = (1/R)·Σ Δ̂_r``): a value one group of
    ``G`` sent is applied at ``1/G`` of its size; ``"senders"``, each value divided by the number of groups that sent
    it, as the reference code combines them (``scatter_reduce(reduce="mean", include_self=False)`` in tplr-ai/templar,
    from DeMo's code): a value one group sent is applied whole. Same bytes. On the compression benchmark (GPT micro,
    G = 2, 48 syncs, plain outer step) ``"senders"`` ends at 1.043× / 1.006× uncompressed DiLoCo's loss (seeds 1234 /
    1) against 1.082× / 1.056× for ``"mean"`` (``benchmarks/compression/README.md``).

    The recipe, registered as ``"topk_recipe"`` (pair it with ``outer_optimizer="topk_recipe"``: SGD, lr √2, no
    momentum): ``k = 96`` of 4096 (2.34%) with Elias-Fano indices, which costs what ``topk``'s 64 packed ones do (116
    bytes per 4096 values, 141× fewer than fp32), and ``aggregate="senders"``. On the compression benchmark it ends at
    1.0095× / 0.988× / 1.016× uncompressed DiLoCo's loss (seeds 1234 / 1 / 2; target ≤ 1.02×) at 138.7× fewer bytes,
    where ``topk`` with a plain outer step ends at 1.082× / 1.056× / 1.078×: chosen on seed 1234 among 19 candidates
    (codec options × outer step), seeds 1 and 2 run after the choice; one model size and G = 2 only.
    """

    def __init__(self, chunk: int = 4096, k: int = 64, value_bits: int = 2, feedback_decay: float = 0.95,
                 indices: str = "packed", exchange: str = "all_gather", aggregate: str = "mean") -> None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"TopKCodec: chunk must be an integer >= 1 (values per chunk), got {chunk!r}.")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= chunk:
            raise ValueError(f"TopKCodec: k must be an integer in [1, chunk={chunk}] (entries sent per chunk), "
                             f"got {k!r}.")
        if value_bits not in (1, 2, 4, 8):
            raise ValueError(f"TopKCodec: value_bits must be 1, 2, 4 or 8 (a sign bit and value_bits - 1 magnitude "
                             f"bits), got {value_bits!r}.")
        if not isinstance(feedback_decay, (int, float)) or not 0 < feedback_decay <= 1:
            raise ValueError(f"TopKCodec: feedback_decay must be in (0, 1] (1: no decay), got {feedback_decay!r}.")
        if indices not in ("packed", "elias-fano"):
            raise ValueError(f"TopKCodec: indices must be 'packed' (⌈log2 chunk⌉ bits each) or 'elias-fano', got "
                             f"{indices!r}.")
        if exchange not in EXCHANGES:
            raise ValueError(f"TopKCodec: exchange must be one of {EXCHANGES} (how the groups exchange the payloads), "
                             f"got {exchange!r}.")
        if aggregate not in AGGREGATES or (aggregate != "mean" and exchange != "all_gather"):
            raise ValueError(f"TopKCodec: aggregate must be one of {AGGREGATES} ('senders' with exchange='all_gather' "
                             f"only: the two-phase mean is re-encoded), got {aggregate!r} with exchange={exchange!r}.")
        self.chunk, self.k, self.value_bits, self.indices, self.exchange = chunk, k, value_bits, indices, exchange
        self.aggregate = aggregate
        self.feedback_decay = float(feedback_decay)
        self.index_bits = max(1, (chunk - 1).bit_length())
        self.block_numel = chunk

    def _low_bits(self, k: int, width: int) -> int:
        """Elias-Fano: the low bits of each index sent as they are, ``⌊log2(width/k)⌋``."""
        return max(0, (width // k).bit_length() - 1)

    def _index_bytes(self, k: int, width: int) -> int:
        """Bytes of the ``k`` indices of a chunk of ``width`` values."""
        if self.indices == "packed":
            return math.ceil(k * self.index_bits / 8)
        low = self._low_bits(k, width)
        return math.ceil(k * low / 8) + math.ceil((k + ((width - 1) >> low) + 1) / 8)

    def _chunk_bytes(self, k: int, width: int) -> int:
        """Bytes of one chunk of ``width`` values that sends ``k`` entries: value codes, indices, fp32 scale."""
        return math.ceil(k * self.value_bits / 8) + self._index_bytes(k, width) + 4

    def _chunks(self, numel: int) -> list[tuple[int, int, int]]:
        """``(first value, chunks, values per chunk)`` of the whole chunks, then of the last, shorter one if any."""
        whole, rest = divmod(numel, self.chunk)
        return [(0, whole, self.chunk)] * bool(whole) + [(whole * self.chunk, 1, rest)] * bool(rest)

    def payload_bytes(self, numel: int) -> int:
        return sum(count * self._chunk_bytes(min(self.k, width), width) for _, count, width in self._chunks(numel))

    def encode(self, x: Tensor) -> Tensor:
        x = x.reshape(-1).float()
        parts = [self._encode_chunks(x[start : start + count * width].view(count, width))
                 for start, count, width in self._chunks(x.numel())]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8, device=x.device)

    def decode(self, payload: Tensor, numel: int) -> Tensor:
        out = torch.zeros(numel, dtype=torch.float32, device=payload.device)
        offset = 0
        for start, count, width in self._chunks(numel):
            size = count * self._chunk_bytes(min(self.k, width), width)
            rows = payload[offset : offset + size].view(count, -1)
            self._decode_chunks(rows, out[start : start + count * width].view(count, width))
            offset += size
        return out

    @staticmethod
    def _select(magnitude: Tensor, k: int) -> Tensor:
        """Column indices of the ``k`` largest of each row, ties broken toward the lower index."""
        top, index = magnitude.topk(k, dim=1, sorted=False)
        threshold = top.amin(1, keepdim=True)
        # rows where more than k values reach the k-th largest: topk's choice among the tied ones is unspecified
        tied = (magnitude >= threshold).sum(1) > k
        if bool(tied.any()):
            rows, t = magnitude[tied], threshold[tied]
            equal = rows == t
            room = k - (rows > t).sum(1, keepdim=True)  # the slots left for the tied values, taken in index order
            keep = (rows > t) | (equal & (equal.cumsum(1) <= room))
            index[tied] = keep.nonzero()[:, 1].view(-1, k)
        return index

    def _encode_chunks(self, x: Tensor) -> Tensor:
        k = min(self.k, x.shape[1])
        magnitude = x.abs()
        index = self._select(magnitude, k)
        values = x.gather(1, index)
        size = magnitude.gather(1, index)
        largest = size.argmax(1, keepdim=True)
        scale = size.gather(1, largest)  # the chunk's largest magnitude
        levels = 1 << (self.value_bits - 1)
        j = torch.zeros_like(size, dtype=torch.int64)
        for step in range(1, levels):  # j = #{step : fl(s·step)/L ≤ |v|}, in fp32
            j += (scale * step / levels <= size).long()
        codes = (values < 0).long() << (self.value_bits - 1) | j
        zero = values == 0  # not sent: the slot repeats the largest entry
        index = torch.where(zero, index.gather(1, largest), index)
        codes = torch.where(zero, codes.gather(1, largest), codes)
        if self.indices == "packed":
            packed = _pack_bits(index, self.index_bits)
        else:  # Elias-Fano of the ascending indices: low bits as they are, the high parts in unary
            index, order = index.sort(1)
            codes = codes.gather(1, order)
            low = self._low_bits(k, x.shape[1])
            unary = torch.zeros(x.shape[0], k + ((x.shape[1] - 1) >> low) + 1, dtype=torch.int64, device=x.device)
            unary.scatter_(1, (index >> low) + torch.arange(k, device=x.device), 1)
            packed = torch.cat([_pack_bits(index & ((1 << low) - 1), low), _pack_bits(unary, 1)], 1)
        return torch.cat([_pack_bits(codes, self.value_bits), packed, scale.contiguous().view(torch.uint8)], 1).view(-1)

    def _decode_chunks(self, rows: Tensor, out: Tensor) -> None:
        k, width = min(self.k, out.shape[1]), out.shape[1]
        value_bytes, index_bytes = math.ceil(k * self.value_bits / 8), self._index_bytes(k, width)
        codes = _unpack_bits(rows[:, :value_bytes], self.value_bits, k)
        packed = rows[:, value_bytes : value_bytes + index_bytes]
        if self.indices == "packed":
            index = _unpack_bits(packed, self.index_bits, k)
        else:  # the i-th set bit of the unary part is at high_i + i
            low = self._low_bits(k, width)
            low_bytes = math.ceil(k * low / 8)
            unary = _unpack_bits(packed[:, low_bytes:], 1, k + ((width - 1) >> low) + 1)
            high = unary.nonzero()[:, 1].view(-1, k) - torch.arange(k, device=rows.device)
            index = high << low | _unpack_bits(packed[:, :low_bytes], low, k)
        scale = rows[:, value_bytes + index_bytes :].clone(memory_format=torch.contiguous_format).view(torch.float32)
        j = codes & ((1 << (self.value_bits - 1)) - 1)
        values = scale * (2 * j + 1).float() * 2.0 ** -self.value_bits  # s·(2j+1) rounded once, then exact
        values = torch.where((codes >> (self.value_bits - 1)).bool(), -values, values)
        out.scatter_(1, index, values)  # a repeated slot writes the same value again


def _pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Each row of non-negative integer ``codes`` (< 2^bits), ``bits`` each, little-endian, in ``⌈k·bits/8⌉`` bytes."""
    rows, k = codes.shape
    if bits == 0:
        return torch.zeros(rows, 0, dtype=torch.uint8, device=codes.device)
    shifts = torch.arange(bits, device=codes.device)
    flat = ((codes.unsqueeze(-1) >> shifts) & 1).view(rows, k * bits)
    flat = torch.nn.functional.pad(flat, (0, (-k * bits) % 8)).view(rows, -1, 8)
    return (flat << torch.arange(8, device=codes.device)).sum(-1).to(torch.uint8)


def _unpack_bits(packed: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of :func:`_pack_bits`: ``k`` integers of ``bits`` bits from each row of ``packed`` (int64)."""
    rows = packed.shape[0]
    if bits == 0:
        return torch.zeros(rows, k, dtype=torch.int64, device=packed.device)
    flat = ((packed.long().unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1).view(rows, -1)
    return (flat[:, : k * bits].view(rows, k, bits) << torch.arange(bits, device=packed.device)).sum(-1)


_REGISTRY: dict[str, Codec] = {"bf16": BF16Codec(), "int8": BlockQuantCodec(8), "int4": BlockQuantCodec(4),
                               "topk": TopKCodec(), "topk_ef": TopKCodec(indices="elias-fano"),
                               # the recipe (with outer_optimizer="topk_recipe"): TopKCodec's docstring
                               "topk_recipe": TopKCodec(k=96, indices="elias-fano", aggregate="senders")}


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
    if getattr(codec, "exchange", None) not in EXCHANGES:
        raise ValueError(f"register_codec({name!r}): the codec's exchange must be one of {EXCHANGES}, got "
                         f"{getattr(codec, 'exchange', None)!r}.")
    aggregate = getattr(codec, "aggregate", None)
    if aggregate not in AGGREGATES or (aggregate != "mean" and codec.exchange != "all_gather"):
        raise ValueError(f"register_codec({name!r}): the codec's aggregate must be one of {AGGREGATES} ('senders' "
                         f"with the 'all_gather' exchange only), got {aggregate!r} with exchange={codec.exchange!r}.")
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
