"""Network emulation in the worker: count the bytes of every Python collective and add the emulated link's delay.

The latency and byte counts come from the library's cost model (:func:`lightning_localsgd.costmodel.collective_hops`
with ``algorithm="ring"``, the schedule gloo runs, and :func:`~lightning_localsgd.costmodel.wire_bytes`), so the
emulation and the planner share one model. See ``benchmarks/multi_cluster/README.md`` for how the link is emulated.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from lightning_localsgd import costmodel

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "barrier",
               "reduce", "gather", "all_to_all_single")


class NetworkModel:
    """Added delay per collective: ``hops × latency`` (+ ``wire bytes / bandwidth`` in the pure software model).

    ``async_overlap`` (``net["async_overlap"]``): a collective issued with ``async_op=True`` is not delayed before it
    is issued; its work object waits instead, in ``wait()``, until the emulated completion time, so that compute done
    between issue and ``wait()`` hides the emulated latency (and, in the software model, the bandwidth time) as it
    would on a real link. Completion = issue + bytes / rate + hops × latency (software model), or the real
    completion of the collective on the shaped loopback + hops × latency (netns).
    """

    def __init__(self, latency_s: float, bandwidth_bit_s: Optional[float]) -> None:
        self.latency_s = latency_s
        self.bandwidth_bit_s = bandwidth_bit_s  # None: the bandwidth is real (shaped loopback), only latency is added
        self.slept = 0.0

    def delay_for(self, op: str, nbytes: int, n: int) -> float:
        """Seconds the collective ``op`` of ``nbytes`` over ``n`` ranks takes on the emulated link (added part)."""
        t = costmodel.collective_hops(op, n, "ring") * self.latency_s
        if self.bandwidth_bit_s:
            t += costmodel.wire_bytes(op, nbytes, n) * 8 / self.bandwidth_bit_s
        return t

    def sleep(self, t: float) -> None:
        """Sleep ``t`` seconds (if positive) and count them."""
        if t > 0:
            self.slept += t
            time.sleep(t)

    def delay(self, op: str, nbytes: int, n: int) -> None:
        """Block for the emulated time of one collective (before a blocking one is issued)."""
        self.sleep(self.delay_for(op, nbytes, n))


class DelayedWork:
    """An async collective's work whose ``wait()`` ends no earlier than the emulated completion (see NetworkModel)."""

    def __init__(self, work: Any, model: NetworkModel, delay: float, issued: float, real_bandwidth: bool) -> None:
        self._work, self._model, self._delay, self._issued = work, model, delay, issued
        self._done_at: Optional[float] = None
        self._waited = False
        if real_bandwidth:  # netns: the latency comes after the real (shaped) transfer
            try:
                work.get_future().then(lambda fut: setattr(self, "_done_at", time.perf_counter()))
            except Exception:  # noqa: BLE001  (no futures for this backend: completion = time of wait())
                pass

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        """Wait for the real collective, then for the rest of the emulated time (once)."""
        out = self._work.wait(*args, **kwargs)
        if not self._waited:
            self._waited = True
            if self._model.bandwidth_bit_s:
                base = self._issued  # software model: bytes / rate + latency, counted from the issue
            else:
                base = self._done_at if self._done_at is not None else time.perf_counter()
            self._model.sleep(base + self._delay - time.perf_counter())
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _group_size(op: str, args: tuple, kwargs: dict) -> int:
    """The number of ranks of the collective's process group."""
    import torch.distributed as dist

    group = kwargs.get("group")
    if group is None and op in ("all_reduce", "broadcast", "reduce") and len(args) >= 3:
        group = args[2]  # (tensor, op/src/dst, group, ...)
    return dist.get_world_size(group) if group is not None else dist.get_world_size()


def _tensor_bytes(op: str, args: tuple, kwargs: dict) -> int:
    """Bytes of the tensor a collective sends: an all-gather's / reduce-scatter's / all-to-all's input, else arg 0."""
    if op in ("all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"):
        tensor = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("tensor"))
    elif op == "all_to_all_single":
        tensor = args[1] if len(args) > 1 else kwargs.get("input")
    else:
        tensor = args[0] if args else kwargs.get("tensor")
    return tensor.numel() * tensor.element_size() if tensor is not None and hasattr(tensor, "numel") else 0


def _count(counter: dict, op: str, nbytes: int, n: int) -> None:
    """Add one collective to ``counter`` (an all-to-all counts only the (n − 1)/n that leaves the rank)."""
    counted = nbytes * (n - 1) // n if op == "all_to_all_single" else nbytes
    counter["calls"] = counter.get("calls", 0) + 1
    counter["bytes"] = counter.get("bytes", 0) + counted
    ops = counter.setdefault("ops", {})
    ops[op] = ops.get(op, 0) + 1


def _wrap(op: str, fn: Callable, counter: dict, model: Optional[NetworkModel], async_overlap: bool) -> Callable:
    """``fn`` (a ``torch.distributed`` collective) counted and delayed by ``model``."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        n = _group_size(op, args, kwargs)
        if n <= 1:
            return fn(*args, **kwargs)
        nbytes = _tensor_bytes(op, args, kwargs)
        _count(counter, op, nbytes, n)
        if model is not None and async_overlap and kwargs.get("async_op"):
            issued = time.perf_counter()
            work = fn(*args, **kwargs)
            return DelayedWork(work, model, model.delay_for(op, nbytes, n), issued,
                               real_bandwidth=not model.bandwidth_bit_s)
        if model is not None:
            model.delay(op, nbytes, n)
        return fn(*args, **kwargs)

    return wrapped


def network_model(net: Optional[dict]) -> Optional[NetworkModel]:
    """The model for ``net`` (``None``: no emulated latency and real bandwidth, nothing to add)."""
    if not net or not (net.get("latency_s", 0) > 0 or net.get("emulation") == "sleep"):
        return None
    bw = net["bandwidth_bit_s"] if net.get("emulation") == "sleep" else None
    return NetworkModel(float(net.get("latency_s", 0.0)), bw)


def install_network_model(counter: dict, net: Optional[dict]) -> tuple[dict, Optional[NetworkModel]]:
    """Wrap ``torch.distributed``'s Python collectives: count bytes (and calls) and add the emulated delay.

    Returns the original functions (the benchmark's own evaluation uses them: not counted, not delayed) and the model.
    The wrappers resolve ``dist.xxx`` at call time, so they see every collective of the strategy and of Lightning.
    Counted bytes: the tensor handed to the collective (an all-reduce's buffer, an all-gather's input), except for
    ``all_to_all_single``, which counts the (n − 1)/n of its input that goes to the other ranks (its own chunk stays);
    so a compressed sync (all-to-all of G encoded chunks + all-gather of one) counts G chunk payloads, as
    ``OuterSync.bytes_sent`` does.
    """
    import torch.distributed as dist

    model = network_model(net)
    async_overlap = bool(net and net.get("async_overlap"))
    originals = {op: getattr(dist, op) for op in COLLECTIVES if getattr(dist, op, None) is not None}
    for op, fn in originals.items():
        setattr(dist, op, _wrap(op, fn, counter, model, async_overlap))
    return originals, model
