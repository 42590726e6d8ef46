"""The CUDA path, measured on one GPU: ratios against limits and peers measured in the same run.

(a) **Sync local work** (snapshot, pseudo-gradient, norm, outer step, write-back) of one sync at GPT-2 small (124M) and
    1B parameters, on a one-rank process group (the collective carries nothing; what is left is the work every rank
    does on its own), against (i) the memory-bandwidth limit: the fewest bytes a sync must touch over the device copy
    bandwidth measured here, and (ii) torch's ``PeriodicModelAverager`` (averaging only, no snapshot) on the same
    tensors.
(b) **Host-resident outer state** (``outer_state_device="cpu"``): the same sync with θ_g and the outer state in host
    memory, against the bytes that must cross PCIe (the mean down, θ_g up) over the host<->device bandwidth measured here
    (pinned buffers).
(c) **Inner-step overhead** of ``LocalSGDStrategy`` on GPT-2 small (124M, bf16-mixed) against plain Lightning on one
    GPU: interleaved rounds (ABBA), per round the median of the steps that do not sync, then the median of the
    per-round ratios with a bootstrap interval. Target: <= 1.02.
(d) **Codec throughput**: encode + decode of a 256M-element fp32 pseudo-gradient (bf16 / int8 / int4) on the GPU,
    GB/s of fp32 input.

    python benchmarks/gpu/gpu.py                # on a CUDA machine: ~2-3 minutes on one H200
    python benchmarks/gpu/gpu.py --dry-run      # the same pipeline on the CPU at toy sizes (tests its plumbing)

Writes gpu_sync.csv, gpu_inner_step.csv, gpu_codecs.csv, gpu.md and gpu.png to ``--out`` (default
benchmarks/gpu/results/).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import harness as h  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

#: (n_layer, n_embd, vocab) of the GPT shapes whose parameters the sync benchmark uses (tied embeddings, no biases).
SHAPES = {"124M": (12, 768, 50304), "1B": (18, 2048, 50304)}
DRY_SHAPES = {"124M": (2, 64, 512), "1B": (2, 128, 512)}
TARGET = 1.02


def gpt_tensors(n_layer: int, d: int, vocab: int, device: torch.device, block: int = 1024) -> list[torch.Tensor]:
    """Parameters shaped like the example GPT's (random, fp32): embeddings, per block 2 LayerNorms, qkv, proj, MLP."""
    g = torch.Generator(device=device).manual_seed(0)
    shapes = [(vocab, d), (block, d)]
    for _ in range(n_layer):
        shapes += [(d,), (3 * d, d), (d, d), (d,), (4 * d, d), (d, 4 * d)]
    shapes.append((d,))
    return [torch.randn(s, generator=g, device=device) * 0.02 for s in shapes]


def sync_point(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2,
                   before: Callable[[], Any] | None = None) -> float:
    """Median wall time of ``fn`` (device synchronized around it); ``before`` runs untimed before each call."""
    times = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        sync_point(device)
        t0 = time.perf_counter()
        fn()
        sync_point(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Device copy bandwidth, bytes read + written per second (a large ``copy_``)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = median_seconds(lambda: dst.copy_(src), device, repeats=10)
    return 2 * nbytes / t


def host_bandwidth(device: torch.device, nbytes: int) -> tuple[float, float]:
    """(host->device, device->host) bytes per second through pinned host buffers."""
    pin = device.type == "cuda"
    host = torch.randn(nbytes // 4).pin_memory() if pin else torch.randn(nbytes // 4)
    dev = torch.empty(nbytes // 4, device=device)
    up = median_seconds(lambda: dev.copy_(host, non_blocking=True), device, repeats=5)
    down = median_seconds(lambda: host.copy_(dev, non_blocking=True), device, repeats=5)
    return nbytes / up, nbytes / down


def init_one_rank_group(device: torch.device) -> None:
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(h.free_port()))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def bench_sync(size: str, shape: tuple, device: torch.device, copy_bw: float, up_bw: float, down_bw: float,
               repeats: int) -> list[dict]:
    """(a) and (b) for one model size: our sync (averaging, DiLoCo; state on the device and on the host) and torch's
    averager, against their byte limits."""
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    from lightning_localsgd.engine import OuterSync, resolve_outer_optimizer

    params = gpt_tensors(*shape, device=device)
    n = sum(p.numel() for p in params)
    noise = [torch.randn_like(p) * 1e-3 for p in params]
    flip = [1.0]

    def drift() -> None:  # every sync sees a nonzero pseudo-gradient (never time on zeros)
        flip[0] = -flip[0]
        for p, e in zip(params, noise):
            p.add_(e, alpha=flip[0])

    rows = []
    # bytes a sync must touch at least (fp32): averaging reads θ_i, writes θ_g and θ_i; DiLoCo also reads θ_g and
    # reads + writes the momentum
    min_bytes = {"average": 12 * n, "diloco": 24 * n}
    for outer in ("average", "diloco"):
        for where in ("device", "host"):
            engine = OuterSync(params, outer_optimizer=resolve_outer_optimizer(outer),
                               state_device="cpu" if where == "host" else None)
            reps = repeats if where == "device" else max(2, repeats // 3)
            t = median_seconds(lambda: engine.sync(), device, reps, before=drift)
            row = {"size": size, "params": n, "impl": f"local_sgd {outer}", "state": where, "seconds": t,
                   "min_bytes": min_bytes[outer], "state_bytes": engine.state_bytes}
            if where == "device":
                row["limit_seconds"] = min_bytes[outer] / copy_bw
            else:  # the mean goes down, θ_g comes back up: 4 bytes each way per parameter
                row["limit_seconds"] = 4 * n / down_bw + 4 * n / up_bw
            row["ratio_to_limit"] = t / row["limit_seconds"]
            rows.append(row)
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
    # torch's averager takes nn.Parameters and averages only those with a gradient
    averaged = [torch.nn.Parameter(p, requires_grad=False) for p in params]
    for q in averaged:
        q.grad = torch.zeros_like(q)
    averager = PeriodicModelAverager(period=1, warmup_steps=0)
    t = median_seconds(lambda: averager.average_parameters(averaged), device, repeats, before=drift)
    del averaged
    rows.append({"size": size, "params": n, "impl": "torch PeriodicModelAverager", "state": "device", "seconds": t,
                 "min_bytes": 8 * n, "limit_seconds": 8 * n / copy_bw, "ratio_to_limit": t / (8 * n / copy_bw)})
    ours = next(r["seconds"] for r in rows if r["impl"] == "local_sgd average" and r["state"] == "device")
    for r in rows:
        r["ratio_to_torch_averager"] = r["seconds"] / t if r["impl"] == "local_sgd average" else ""
    print(f"(a) {size} ({n / 1e6:.0f}M): ours average {ours * 1e3:.2f} ms, torch averager {t * 1e3:.2f} ms")
    del params, noise
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def bench_codecs(device: torch.device, numel: int, repeats: int) -> list[dict]:
    """(d): encode and decode throughput per codec, GB/s of fp32 input."""
    from lightning_localsgd.engine.codecs import CODECS, decode, encode

    x = torch.randn(numel, device=device) * 1e-2
    rows = []
    for codec in CODECS:
        payload = encode(x, codec)
        enc = median_seconds(lambda: encode(x, codec), device, repeats)
        dec = median_seconds(lambda: decode(payload, codec, numel), device, repeats)
        rows.append({"codec": codec, "numel": numel, "encode_s": enc, "decode_s": dec,
                     "encode_GBps": 4 * numel / enc / 1e9, "decode_GBps": 4 * numel / dec / 1e9,
                     "payload_bytes": payload.numel()})
        print(f"(d) {codec}: encode {4 * numel / enc / 1e9:.0f} GB/s, decode {4 * numel / dec / 1e9:.0f} GB/s")
    return rows


def bench_inner_step(device: torch.device, dry: bool, rounds: int, steps: int) -> tuple[list[dict], Any]:
    """(c): GPT-2 small, bf16-mixed, one GPU: plain Lightning vs LocalSGDStrategy, interleaved rounds."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, Dataset

    from lightning_localsgd import LocalSGDStrategy
    from lightning_localsgd.examples.gpt import GPT

    size, block, batch = ("nano", 64, 4) if dry else ("gpt2", 1024, 8)

    class Tokens(Dataset):
        def __init__(self) -> None:
            g = torch.Generator().manual_seed(0)
            self.data = torch.randint(0, 50304 if not dry else 256, (batch * steps, block + 1), generator=g)

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self.data[i, :-1], self.data[i, 1:]

    class StepTimes(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            sync_point(device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            sync_point(device)
            self.times.append(time.perf_counter() - self.t0)

    def run(mode: str) -> float:
        torch.manual_seed(0)
        model = GPT(size=size, block_size=block, vocab_size=50304 if not dry else 256, warmup_steps=0)
        timer = StepTimes()
        # sync_every beyond the run: every measured step is an inner step (the sync is measured in (a))
        strategy = LocalSGDStrategy(sync_every=10 * steps) if mode == "local_sgd" else "auto"
        trainer = L.Trainer(accelerator=device.type, devices=1, strategy=strategy, max_steps=steps,
                            precision="bf16-mixed", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                            num_sanity_val_steps=0)
        trainer.fit(model, DataLoader(Tokens(), batch_size=batch, num_workers=0, pin_memory=device.type == "cuda"))
        del trainer, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return statistics.median(timer.times[max(1, steps // 5):])  # drop the first steps (allocator, kernels)

    for mode in ("plain", "local_sgd"):  # one untimed run each: CUDA context, kernels, allocator, imports
        run(mode)
    measured = h.run_interleaved({"plain": lambda: run("plain"), "local_sgd": lambda: run("local_sgd")}, rounds)
    est = h.ratio(measured, "local_sgd", "plain")
    rows = [{"round": r, "plain_step_s": rnd["plain"].result, "local_sgd_step_s": rnd["local_sgd"].result,
             "ratio": rnd["local_sgd"].result / rnd["plain"].result} for r, rnd in enumerate(measured.rounds)]
    print(f"(c) inner step local_sgd / plain: {est.text()} -> target <= {TARGET}: {est.verdict(TARGET)}")
    return rows, est


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="run the pipeline on the CPU at toy sizes")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV / markdown / PNG results")
    p.add_argument("--sizes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=10, help="timed syncs / codec calls per configuration")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds of the inner-step comparison")
    p.add_argument("--steps", type=int, default=40, help="training steps per inner-step run")
    p.add_argument("--skip", nargs="*", default=[], choices=["sync", "inner", "codecs"])
    args = p.parse_args()
    started = time.time()
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device is visible; run on a GPU machine, or pass --dry-run to check the pipeline on the CPU")
    device = torch.device("cpu" if args.dry_run else "cuda:0")
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (dry run)"
    print(f"device: {name}; torch {torch.__version__}")

    sync_rows: list[dict] = []
    copy_bw = up_bw = down_bw = float("nan")
    if "sync" not in args.skip:
        init_one_rank_group(device)
        copy_bw = copy_bandwidth(device, (2 << 30) if not args.dry_run else (8 << 20))
        up_bw, down_bw = host_bandwidth(device, (1 << 30) if not args.dry_run else (8 << 20))
        print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write); host->device {up_bw / 1e9:.1f} GB/s, "
              f"device->host {down_bw / 1e9:.1f} GB/s (pinned)")
        for size in args.sizes:
            sync_rows += bench_sync(size, shapes[size], device, copy_bw, up_bw, down_bw, args.repeats)
        h.write_csv(args.out / "gpu_sync.csv", sync_rows)
    codec_rows = [] if "codecs" in args.skip else bench_codecs(device, (1 << 28) if not args.dry_run else (1 << 16),
                                                               args.repeats)
    if codec_rows:
        h.write_csv(args.out / "gpu_codecs.csv", codec_rows)
    inner_rows, est = ([], None) if "inner" in args.skip else bench_inner_step(device, args.dry_run, args.rounds,
                                                                               args.steps)
    if inner_rows:
        h.write_csv(args.out / "gpu_inner_step.csv", inner_rows)

    text = [f"Device: {name}; torch {torch.__version__}. Copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write), "
            f"host->device {up_bw / 1e9:.1f} GB/s, device->host {down_bw / 1e9:.1f} GB/s (pinned).", ""]
    if sync_rows:
        text += ["## (a) sync local work, (b) host-resident state", "",
                 h.md_table(sync_rows, [("size", "size"), ("impl", "implementation"), ("state", "θ_g / state on"),
                                        ("seconds", "s per sync"), ("limit_seconds", "limit s"),
                                        ("ratio_to_limit", "/ limit"), ("ratio_to_torch_averager", "/ torch")]), ""]
    if est is not None:
        text += ["## (c) inner step, local_sgd / plain Lightning (bf16-mixed)", "",
                 f"{est.text()}; target <= {TARGET}: {est.verdict(TARGET)}", ""]
    if codec_rows:
        text += ["## (d) codecs", "", h.md_table(codec_rows, [("codec", "codec"), ("encode_GBps", "encode GB/s"),
                                                             ("decode_GBps", "decode GB/s")]), ""]
    (args.out / "gpu.md").write_text(f"Command: `python benchmarks/gpu/gpu.py{' --dry-run' if args.dry_run else ''}` "
                                     f"({(time.time() - started) / 60:.1f} min)\n\n" + "\n".join(text))
    plt = h.pyplot()
    if plt is not None and sync_rows:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{r['size']}\n{r['impl'].replace('local_sgd ', '')}\n{r['state']}" for r in sync_rows]
        ax.bar(range(len(sync_rows)), [r["ratio_to_limit"] for r in sync_rows])
        ax.set_xticks(range(len(sync_rows)), labels, fontsize=6)
        ax.set_ylabel("time / byte limit")
        ax.set_title(f"sync local work on {name}")
        fig.tight_layout()
        fig.savefig(args.out / "gpu.png", dpi=120)
    print("\n".join(text))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
