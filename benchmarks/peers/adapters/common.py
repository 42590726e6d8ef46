"""What every peer's adapter shares on the rank side: the work (model, batches, optimizer), the counters of
collective bytes and calls, memory readings and the default process group."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The size ladder: name -> GPT arguments (total parameters with the byte-level embeddings, block 64).
SIZES: dict[str, dict] = {
    "0.1M": dict(size="micro"),
    "0.8M": dict(size="tiny"),
    "2.8M": dict(size="small"),
    "10M": dict(n_layer=6, n_head=6, n_embd=384),
    "38M": dict(size="large"),
    "85M": dict(size="gpt2"),
}
DILOCO = dict(lr=0.7, momentum=0.9, nesterov=True)
SEED = 1234
WORLD = 2

# ---------------------------------------------------------------------------------------------------- counting
COUNT = {"on": False, "bytes": 0, "calls": 0}


def count_collective(nbytes: int) -> None:
    """Count one collective of ``nbytes`` (while ``COUNT["on"]``)."""
    if COUNT["on"]:
        COUNT["bytes"] += nbytes
        COUNT["calls"] += 1


def install_counters() -> None:
    """Count every torch.distributed collective's payload (bytes of the tensor handed in) while COUNT['on']."""
    import torch.distributed as dist

    def wrap(name: str, size: Callable[..., int]) -> None:
        original = getattr(dist, name)

        def counted(*a: Any, **k: Any) -> Any:
            count_collective(size(*a, **k))
            return original(*a, **k)

        setattr(dist, name, counted)

    nbytes = lambda t, *a, **k: t.numel() * t.element_size()
    wrap("all_reduce", nbytes)
    wrap("broadcast", nbytes)
    wrap("barrier", lambda *a, **k: 0)
    wrap("all_to_all_single", lambda out, inp, *a, **k: inp.numel() * inp.element_size())
    wrap("all_gather_into_tensor", lambda out, inp, *a, **k: inp.numel() * inp.element_size())


# ---------------------------------------------------------------------------------------------------- memory
def rss_mb() -> float:
    """Current resident set size (MiB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_reset() -> None:
    """Reset this process's peak RSS (VmHWM) to the current RSS (Linux ≥ 4.0: ``5 > /proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tensor_bytes(tensors: Any) -> int:
    import torch

    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# ---------------------------------------------------------------------------------------------------- the work
def make_model(job: dict, size: str | None = None) -> Any:
    """The example GPT, seeded, its modules built (same initial weights on every rank and for every peer)."""
    import torch
    from lightning_localsgd.examples.gpt import GPT

    torch.manual_seed(job["seed"])
    model = GPT(block_size=job["block_size"], learning_rate=job.get("learning_rate", 2e-3),
                warmup_steps=job.get("warmup", 8), max_steps=job["steps"], **SIZES[size or job["size"]])
    model.configure_model()
    return model


def make_batches(job: dict, rank: int, steps: int) -> list:
    """This rank's ``steps`` batches in order: a DistributedSampler (seeded) over the builtin corpus's windows."""
    import torch
    from lightning_localsgd.examples.data import TextDataModule
    from torch.utils.data import DistributedSampler

    need = steps * job["batch_size"] * WORLD * job["block_size"]  # one epoch must hold every rank's batches
    dm = TextDataModule(block_size=job["block_size"], batch_size=job["batch_size"],
                        max_tokens=max(1_000_000, int(1.2 * need)), seed=job["seed"])
    dm.setup("fit")
    ds = dm.train_dataset
    sampler = DistributedSampler(ds, num_replicas=WORLD, rank=rank, shuffle=True, seed=job["seed"])
    idx = list(iter(sampler))
    b = job["batch_size"]
    out = []
    for s in range(steps):
        items = [ds[i] for i in idx[s * b:(s + 1) * b]]
        out.append((torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])))
    return out


def optimizers(model: Any) -> tuple[Any, Any]:
    """The GPT's own AdamW and warm-up + cosine LambdaLR (its ``configure_optimizers``)."""
    cfg = model.configure_optimizers()
    return cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]


def flat_params(model: Any) -> Any:
    import torch

    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


def init_default_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=WORLD)


def max_diff(a: Any, b: Any) -> float:
    return float((a - b).abs().max())


def all_equal_across_ranks(model: Any) -> bool:
    """Whether every rank holds the same parameters (max and min of a checksum over the ranks agree)."""
    import torch
    import torch.distributed as dist

    v = flat_params(model).double().sum().reshape(1)
    lo, hi = v.clone(), v.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))
