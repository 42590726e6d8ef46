"""Shared machinery of the paper benchmarks: one training run per subprocess, measured the same way for every mode.

A benchmark script builds run configurations (plain dicts, see :func:`run_config`) and calls :func:`launch` for each.
``launch`` starts ``python benchmarks/harness.py CONFIG.json`` in a fresh process (optionally inside a private network
namespace with a shaped loopback, see :func:`netns_prefix`); Lightning's popen launcher re-runs that command once
per extra rank. Global rank 0 writes one JSON object to ``config["out"]``, which ``launch`` reads back.

What a run measures, identically for DDP, local SGD and DiLoCo:

* **validation loss** on a fixed held-out set: the first ``val_windows`` windows of ``TextDataModule``'s validation
  split (the last ``val_fraction`` of the token stream, independent of world size and seed). Periodic evaluations
  split the windows across the ranks and all-reduce the sum; for local SGD they only run right after a sync (every
  worker holds the same model). The final evaluation runs on rank 0 after ``fit`` (after the train-end sync) and keeps
  the loss of every window, for bootstrap intervals.
* **training wall clock**: rank 0's time from the first training batch, minus the time spent in evaluations.
* **bytes**: for DDP, counted in a DDP communication hook (the bytes each rank hands to the gradient all-reduce);
  for local SGD, counted on the Python collectives of the strategy (every one of them crosses worker groups when
  ``group_size == 1``) and reported by the strategy (``outer_sync.bytes_sent``).
* **outer state memory**: ``outer_sync.state_bytes`` (snapshot + outer optimizer state, per rank).

Network emulation (``config["net"]``): see ``benchmarks/README.md`` and :func:`install_network_model`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

DEFAULT_DATA = dict(max_tokens=8_000_000, val_fraction=0.05)


def run_config(
    name: str,
    mode: str,
    steps: int,
    model: dict,
    batch_size: int = 16,
    block_size: int = 128,
    devices: int = 2,
    group_size: int = 1,
    sync_every: int = 16,
    eval_every: int = 0,
    val_windows: int = 256,
    seed: int = 1234,
    net: Optional[dict] = None,
    stop_at_loss: Optional[float] = None,
    outer_state_device: Optional[str] = None,
    data: Optional[dict] = None,
    accelerator: str = "cpu",
    compression: Optional[str] = None,
    local_warmup_steps: int = 0,
    outer: Optional[dict] = None,
    fragments: int = 1,
    overlap_steps: int = 0,
    overlap_mix: float = 0.0,
    step_bytes: bool = False,
) -> dict:
    """A run configuration. ``mode``: ``ddp``, ``average`` (local SGD) or ``diloco``.

    ``eval_every=0`` evaluates at the start and the end only. ``compression`` (local SGD / DiLoCo only): the
    strategy's codec for the sync (``"bf16"``, ``"int8"``, ``"int4"``); ``None`` = fp32 all-reduce.
    ``local_warmup_steps`` (local SGD / DiLoCo only): the strategy's ``warmup_steps``, fully synchronous steps
    (gradients all-reduced across groups) before local SGD starts (post-local SGD). ``outer`` (local SGD / DiLoCo
    only): keyword arguments of ``torch.optim.SGD`` for the outer optimizer, e.g. ``{"lr": 0.7, "momentum": 0.9,
    "nesterov": True}`` (JSON-expressible; replaces the mode's preset; ``None`` = the preset of ``mode``).
    ``fragments``, ``overlap_steps``, ``overlap_mix`` (local SGD / DiLoCo only): the strategy's streaming sync.
    ``step_bytes``: also return the cross-group bytes of every training step (``step_cross_bytes``), their maximum
    (``peak_step_cross_bytes``) and the bytes of the train-end sync (``train_end_cross_bytes``).
    """
    if mode not in ("ddp", "average", "diloco"):
        raise ValueError(f"unknown mode {mode!r}")
    return dict(
        name=name, mode=mode, steps=steps, model=model, batch_size=batch_size, block_size=block_size,
        devices=devices, group_size=group_size, sync_every=sync_every, eval_every=eval_every,
        val_windows=val_windows, seed=seed, net=net, stop_at_loss=stop_at_loss,
        outer_state_device=outer_state_device, data={**DEFAULT_DATA, **(data or {})}, accelerator=accelerator,
        **({"compression": compression} if compression is not None else {}),
        **({"local_warmup_steps": local_warmup_steps} if local_warmup_steps else {}),
        **({"outer": dict(outer)} if outer is not None else {}),
        **({"fragments": fragments} if fragments != 1 else {}),
        **({"overlap_steps": overlap_steps} if overlap_steps else {}),
        **({"overlap_mix": overlap_mix} if overlap_mix else {}),
        **({"step_bytes": True} if step_bytes else {}),
    )


# ---------------------------------------------------------------------------------------------------------- driver
def netns_available() -> tuple[bool, str]:
    """Whether ``unshare -n`` + ``tc ... tbf`` on the namespace's loopback works here (root, kernel, tools)."""
    for tool in ("unshare", "ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` not found"
    cmd = ["unshare", "-n", "sh", "-c",
           "ip link set lo up && tc qdisc add dev lo root tbf rate 100mbit burst 32kb latency 400ms"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except Exception as err:  # noqa: BLE001
        return False, f"{type(err).__name__}: {err}"
    if proc.returncode:
        return False, (proc.stderr or proc.stdout).strip().splitlines()[-1] if (proc.stderr or proc.stdout) else \
            f"exit status {proc.returncode}"
    return True, "unshare -n + tc tbf on lo"


def choose_emulation(requested: str, parser: Any) -> str:
    """Resolve ``--emulation auto|netns|sleep`` (error through ``parser`` if netns is asked for but unusable)."""
    ok, why = netns_available()
    emulation = ("netns" if ok else "sleep") if requested == "auto" else requested
    if emulation == "netns" and not ok:
        parser.error(f"network namespaces / tc are not usable here ({why}); use --emulation sleep")
    if not ok:
        print(f"note: network namespaces / tc are not usable here ({why}): software model (sleep = bytes / rate + "
              "hops × latency per collective)")
    return emulation


def netns_prefix(rate_bit_s: float) -> list[str]:
    """Command prefix: a private network namespace whose loopback is shaped to ``rate_bit_s`` (token bucket).

    MTU 9000 (jumbo frames): with the loopback's 64 KiB MTU a token bucket smaller than a packet drops it, and with a
    1500-byte MTU the Python/gloo sender becomes CPU-bound at 1 Gbit/s. The bucket holds ``max(32 KiB, 1 ms of
    traffic)``, i.e. almost no burst allowance. Nothing leaves the namespace: its only interface is its own ``lo``.
    """
    burst = max(32 * 1024, int(rate_bit_s / 8 * 1e-3))
    setup = (f"ip link set lo mtu 9000 && ip link set lo up && "
             f"tc qdisc add dev lo root tbf rate {int(rate_bit_s)}bit burst {burst} latency 1000ms && exec \"$@\"")
    return ["unshare", "-n", "sh", "-c", setup, "sh"]


def launch(config: dict, prefix: Optional[list[str]] = None, timeout: float = 1800) -> dict:
    """Run one training run in a subprocess (``prefix`` e.g. :func:`netns_prefix`) and return rank 0's result."""
    with tempfile.TemporaryDirectory(prefix="lsgd_bench_") as tmp:
        cfg_path = Path(tmp) / "config.json"
        out_path = Path(tmp) / "result.json"
        cfg_path.write_text(json.dumps({**config, "out": str(out_path)}))
        cmd = list(prefix or []) + [sys.executable, str(Path(__file__).resolve()), str(cfg_path)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
               "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("MASTER_PORT", None)
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=timeout)
        if proc.returncode or not out_path.exists():
            tail = proc.stdout.decode(errors="replace")[-4000:]
            raise RuntimeError(f"run {config['name']!r} failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(out_path.read_text())
        result["process_seconds"] = time.time() - t0
        return result


def machine_info() -> dict:
    """CPU, cores, memory and library versions of this machine (for the README)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    import lightning
    import torch

    return dict(cpu=cpu, cores=os.cpu_count(), memory=mem, python=platform.python_version(), torch=torch.__version__,
                lightning=lightning.__version__, loadavg=" ".join(f"{x:.2f}" for x in os.getloadavg()))


def write_csv(path: Path, rows: list[dict], columns: Optional[list[str]] = None) -> None:
    import csv

    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in columns})


def read_csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def md_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table: ``columns`` = [(key, header), ...]; floats are printed with 4 significant digits."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_summary(name: str, text: str, started: float, command: str) -> Path:
    """``results/<name>.md``: the command, its runtime, the machine and ``text`` (tables), for benchmarks/README.md."""
    info = machine_info()
    head = (f"Command: `{command}` — ran {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, "
            f"{(time.time() - started) / 60:.1f} min on {info['cores']} × {info['cpu']} ({info['memory']}), "
            f"Python {info['python']}, torch {info['torch']}, Lightning {info['lightning']}; "
            f"load average at the end {info['loadavg']}.\n\n")
    path = RESULTS / f"{name}.md"
    path.write_text(head + text.rstrip() + "\n")
    return path


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


# ---------------------------------------------------------------------------------------------------------- worker
def _hops(op: str, n: int) -> int:
    """Message latencies a collective over ``n`` ranks waits for (ring all-reduce: reduce-scatter + all-gather)."""
    if n <= 1:
        return 0
    if op == "all_reduce":
        return 2 * (n - 1)
    if op in ("all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_object",
              "all_to_all_single"):
        return n - 1
    return max(1, (n - 1).bit_length())  # broadcast, reduce, barrier, gather: a tree


def _wire_bytes(op: str, nbytes: int, n: int) -> float:
    """Bytes one rank sends in a bandwidth-optimal (ring) collective over ``n`` ranks.

    ``nbytes``: the tensor of an all-reduce / broadcast, the *input* of an all-gather (one rank's part), of a
    reduce-scatter or of an all-to-all (the whole tensor: one chunk per rank).
    """
    if n <= 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (n - 1) / n * nbytes
    if op in ("all_gather", "all_gather_into_tensor"):
        return (n - 1) * nbytes
    if op in ("reduce_scatter_tensor", "all_to_all_single"):
        return (n - 1) / n * nbytes
    return float(nbytes)


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

    def delay(self, op: str, nbytes: int, n: int) -> None:
        t = _hops(op, n) * self.latency_s
        if self.bandwidth_bit_s:
            t += _wire_bytes(op, nbytes, n) * 8 / self.bandwidth_bit_s
        if t > 0:
            self.slept += t
            time.sleep(t)

    def delay_for(self, op: str, nbytes: int, n: int) -> float:
        t = _hops(op, n) * self.latency_s
        if self.bandwidth_bit_s:
            t += _wire_bytes(op, nbytes, n) * 8 / self.bandwidth_bit_s
        return t


class _DelayedWork:
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
        out = self._work.wait(*args, **kwargs)
        if not self._waited:
            self._waited = True
            if self._model.bandwidth_bit_s:
                base = self._issued  # software model: bytes / rate + latency, counted from the issue
            else:
                base = self._done_at if self._done_at is not None else time.perf_counter()
            t = base + self._delay - time.perf_counter()
            if t > 0:
                self._model.slept += t
                time.sleep(t)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


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

    model = None
    if net and (net.get("latency_s", 0) > 0 or net.get("emulation") == "sleep"):
        bw = net["bandwidth_bit_s"] if net.get("emulation") == "sleep" else None
        model = NetworkModel(float(net.get("latency_s", 0.0)), bw)
    async_overlap = bool(net and net.get("async_overlap"))
    originals = {}
    for op in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "barrier",
               "reduce", "gather", "all_to_all_single"):
        fn = getattr(dist, op, None)
        if fn is None:
            continue
        originals[op] = fn

        def wrapped(*args, __op=op, __fn=fn, **kwargs):
            group = kwargs.get("group")
            if group is None and __op in ("all_reduce", "broadcast", "reduce") and len(args) >= 3:
                group = args[2]  # (tensor, op/src/dst, group, ...)
            n = dist.get_world_size(group) if group is not None else dist.get_world_size()
            if __op in ("all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"):
                tensor = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("tensor"))
            elif __op == "all_to_all_single":
                tensor = args[1] if len(args) > 1 else kwargs.get("input")
            else:
                tensor = args[0] if args else kwargs.get("tensor")
            nbytes = tensor.numel() * tensor.element_size() if tensor is not None and hasattr(tensor, "numel") else 0
            if n > 1:
                counted = nbytes * (n - 1) // n if __op == "all_to_all_single" else nbytes
                counter["calls"] = counter.get("calls", 0) + 1
                counter["bytes"] = counter.get("bytes", 0) + counted
                counter.setdefault("ops", {})[__op] = counter.setdefault("ops", {}).get(__op, 0) + 1
                if model is not None:
                    if async_overlap and kwargs.get("async_op"):
                        issued = time.perf_counter()
                        work = __fn(*args, **kwargs)
                        return _DelayedWork(work, model, model.delay_for(__op, nbytes, n), issued,
                                            real_bandwidth=not model.bandwidth_bit_s)
                    model.delay(__op, nbytes, n)
            return __fn(*args, **kwargs)

        setattr(dist, op, wrapped)
    return originals, model


def worker(cfg: dict) -> None:  # noqa: C901  (one linear script)
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_localsgd import LocalSGDStrategy  # importing the package registers the strategies
    from lightning_localsgd.examples.data import TextDataModule
    from lightning_localsgd.examples.gpt import GPT

    torch.set_num_threads(1)
    counter: dict = {}
    net = cfg.get("net")
    originals, netmodel = install_network_model(counter, net)
    all_reduce = originals["all_reduce"]
    local = cfg["mode"] != "ddp"

    L.seed_everything(cfg["seed"], verbose=False)
    model = GPT(block_size=cfg["block_size"], **cfg["model"])
    data = TextDataModule(block_size=cfg["block_size"], batch_size=cfg["batch_size"], **cfg["data"])
    accelerator = cfg.get("accelerator", "cpu")
    backend = "gloo" if accelerator == "cpu" else "nccl"
    if local:
        outer_optimizer = cfg["mode"]
        if cfg.get("outer") is not None:
            import functools

            outer_optimizer = functools.partial(torch.optim.SGD, **cfg["outer"])
        strategy = LocalSGDStrategy(sync_every=cfg["sync_every"], outer_optimizer=outer_optimizer,
                                    warmup_steps=cfg.get("local_warmup_steps", 0),
                                    group_size=cfg["group_size"], outer_state_device=cfg.get("outer_state_device"),
                                    process_group_backend=backend,
                                    **({"compression": cfg["compression"]} if cfg.get("compression") else {}),
                                    **{k: cfg[k] for k in ("fragments", "overlap_steps", "overlap_mix") if k in cfg})
    else:
        strategy = DDPStrategy(process_group_backend=backend)

    class Measure(Callback):
        """Periodic validation on the fixed held-out windows, training clock without evaluation time, DDP bytes."""

        def __init__(self) -> None:
            self.curve: list[dict] = []
            self.eval_seconds = 0.0
            self.t_start: Optional[float] = None
            self.ddp = {"bytes": 0, "calls": 0, "comm_seconds": 0.0}
            self.stopped_at_target = False
            self.step_bytes: list[int] = []  # cross-group bytes of each training step (cfg["step_bytes"])
            self.train_end_bytes = 0
            self._bytes_mark = 0

        def cross_bytes_now(self) -> int:
            return counter.get("bytes", 0) + self.ddp["bytes"]

        # -- evaluation
        def windows(self, trainer) -> tuple[torch.Tensor, torch.Tensor]:
            if not hasattr(self, "_windows"):
                ds = trainer.datamodule.val_dataset
                n = min(cfg["val_windows"], len(ds))
                xs, ys = zip(*(ds[i] for i in range(n)))
                self._windows = torch.stack(xs), torch.stack(ys)
            return self._windows

        @torch.no_grad()
        def evaluate(self, trainer, pl_module) -> float:
            t0 = time.perf_counter()
            x, y = self.windows(trainer)
            rank, world = trainer.global_rank, trainer.world_size
            x, y = x[rank::world].to(pl_module.device), y[rank::world].to(pl_module.device)
            was_training = pl_module.training
            pl_module.eval()
            total = torch.zeros(2, dtype=torch.float64, device=pl_module.device)
            for i in range(0, len(x), 32):
                logits, _ = pl_module(x[i:i + 32])
                loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y[i:i + 32].reshape(-1),
                                       reduction="sum")
                total[0] += loss.double()
                total[1] += y[i:i + 32].numel()
            pl_module.train(was_training)
            if world > 1:
                all_reduce(total)
            self.eval_seconds += time.perf_counter() - t0
            return float(total[0] / total[1])

        def record(self, trainer, pl_module) -> float:
            step = trainer.global_step
            train_s = 0.0 if self.t_start is None else time.perf_counter() - self.t_start - self.eval_seconds
            loss = self.evaluate(trainer, pl_module)
            tokens = step * cfg["batch_size"] * cfg["block_size"] * trainer.world_size
            self.curve.append(dict(step=step, tokens=tokens, train_seconds=train_s, val_loss=loss))
            return loss

        # -- hooks
        def on_fit_start(self, trainer, pl_module):
            if isinstance(trainer.strategy.model, torch.nn.parallel.DistributedDataParallel):
                self.install_ddp_hook(trainer.strategy.model)
                # Lightning (>= 2.5) broadcasts a SIGTERM flag from rank 0 before every batch. Local SGD keeps it off
                # the cross-group links; for the DDP baseline we drop it too, so DDP pays exactly one collective
                # (the gradient all-reduce) per step: the comparison does not profit from this Lightning detail.
                trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None

        def install_ddp_hook(self, ddp):
            world = dist.get_world_size()
            stats = self.ddp

            def hook(state, bucket):
                t0 = time.perf_counter()
                tensor = bucket.buffer()
                nbytes = tensor.numel() * tensor.element_size()
                stats["bytes"] += nbytes
                stats["calls"] += 1
                if netmodel is not None:
                    netmodel.delay("all_reduce", nbytes, world)
                fut = all_reduce(tensor.div_(world), async_op=True).get_future()

                def done(f):
                    stats["comm_seconds"] += time.perf_counter() - t0
                    return f.value()[0]

                return fut.then(done)

            ddp.register_comm_hook(None, hook)

        def on_train_start(self, trainer, pl_module):
            counter.clear()  # count only the collectives of training (not those of Lightning's setup)
            if netmodel is not None:
                netmodel.slept = 0.0
            self.record(trainer, pl_module)
            self.t_start = time.perf_counter()
            self.eval_seconds = 0.0
            self._bytes_mark = self.cross_bytes_now()  # the evaluation's own all-reduce is not counted anyway

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cfg.get("step_bytes"):  # the strategy's sync ran before (its callback comes first)
                now = self.cross_bytes_now()
                self.step_bytes.append(now - self._bytes_mark)
                self._bytes_mark = now
            every = cfg["eval_every"]
            step = trainer.global_step
            if not every or step % every:
                return
            if local and trainer.strategy.schedule.steps_since_sync != 0:
                return  # between syncs the workers hold different models
            loss = self.record(trainer, pl_module)
            target = cfg.get("stop_at_loss")
            if target is not None and loss <= target:
                self.stopped_at_target = True
                trainer.should_stop = True

        def on_train_end(self, trainer, pl_module):
            self.train_seconds = time.perf_counter() - self.t_start - self.eval_seconds
            if cfg.get("step_bytes"):  # the train-end sync ran before (the strategy's callback comes first)
                self.train_end_bytes = self.cross_bytes_now() - self._bytes_mark

    measure = Measure()
    trainer = L.Trainer(
        accelerator=accelerator, devices=cfg["devices"], strategy=strategy, max_steps=cfg["steps"], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[measure], use_distributed_sampler=True,
    )
    trainer.fit(model, data)
    if trainer.global_rank != 0:
        return

    # Final evaluation on rank 0 after the train-end sync: every rank holds the same model now.
    with torch.no_grad():
        x, y = measure.windows(trainer)
        x, y = x.to(model.device), y.to(model.device)
        model.eval()
        per_window = []
        for i in range(0, len(x), 32):
            logits, _ = model(x[i:i + 32])
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y[i:i + 32].reshape(-1),
                                   reduction="none").view(-1, y.size(1)).mean(1)
            per_window.extend(loss.tolist())
    steps = trainer.global_step
    final_loss = sum(per_window) / len(per_window)
    if not measure.curve or measure.curve[-1]["step"] != steps:  # e.g. the train-end sync of a partial interval
        measure.curve.append(dict(step=steps, tokens=steps * cfg["batch_size"] * cfg["block_size"] * trainer.world_size,
                                  train_seconds=measure.train_seconds, val_loss=final_loss))
    result = dict(
        name=cfg["name"], mode=cfg["mode"], devices=cfg["devices"], group_size=cfg["group_size"],
        sync_every=cfg["sync_every"] if local else 1, steps=steps,
        tokens=steps * cfg["batch_size"] * cfg["block_size"] * trainer.world_size,
        final_val_loss=final_loss, per_window=per_window, curve=measure.curve,
        train_seconds=measure.train_seconds, params=sum(p.numel() for p in model.parameters()),
        non_embedding_params=model.num_non_embedding_params, stopped_at_target=measure.stopped_at_target,
        python_collectives=counter.get("calls", 0), python_collective_bytes=counter.get("bytes", 0),
        python_collective_ops=counter.get("ops", {}), emulated_sleep_seconds=netmodel.slept if netmodel else 0.0,
    )
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if cfg.get("step_bytes"):
        result.update(step_cross_bytes=measure.step_bytes, peak_step_cross_bytes=max(measure.step_bytes, default=0),
                      train_end_cross_bytes=measure.train_end_bytes)
    if local:
        s = trainer.strategy
        result.update(local_warmup_steps=cfg.get("local_warmup_steps", 0), outer=cfg.get("outer"),
                      warmup_bytes=cfg.get("local_warmup_steps", 0) * s.ddp_bytes_per_step)
        if cfg.get("fragments", 1) > 1 or cfg.get("overlap_steps"):
            sizes = [p.numel() for p in s.outer_sync.tensors]
            b = s.outer_sync.fragment_bounds
            result.update(fragments=cfg.get("fragments", 1), overlap_steps=cfg.get("overlap_steps", 0),
                          overlap_mix=cfg.get("overlap_mix", 0.0), fragment_bounds=list(b),
                          fragment_numel=[sum(sizes[b[i]:b[i + 1]]) for i in range(len(b) - 1)])
        result.update(num_syncs=s.outer_sync.num_syncs, bytes_sent=s.outer_sync.bytes_sent,
                      state_bytes=s.outer_sync.state_bytes, ddp_bytes_per_step=s.ddp_bytes_per_step,
                      sync_seconds=s.sync_seconds_total, cross_bytes=counter.get("bytes", 0))
    else:
        result.update(num_syncs=0, bytes_sent=measure.ddp["bytes"], state_bytes=0, ddp_bytes_per_step=grad_bytes,
                      ddp_calls=measure.ddp["calls"], sync_seconds=measure.ddp["comm_seconds"],
                      cross_bytes=measure.ddp["bytes"] + counter.get("bytes", 0))
    with open(cfg["out"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    worker(json.loads(Path(sys.argv[1]).read_text()))
