"""One broken worker group of four: the final loss with and without the robust screen, beside the clean run, in one run.

Four processes (gloo, one thread each) = four worker groups train a small MLP student on a fixed teacher's regression
task (each group its own data stream), AdamW inside, DiLoCo outside (``OuterSync``, the library's engine), H = 10.
Group 3 is broken in one way per configuration, applied to what it sends at every sync, or to its parameters at every
step:

* ``scaled``: its pseudo-gradient ×100;            * ``sign``: its pseudo-gradient sign-flipped;
* ``noise``: its pseudo-gradient replaced by Gaussian noise of 10× its norm;
* ``bitflip``: the top exponent bit of 4 of its parameters (values below 1 in magnitude: ~1e38, finite) flipped;
* ``noisy_steps``: N(0, 0.05²) added to its parameters at every step (the issue's "a job adding noise").

Each configuration runs without the screen, with ``screen_factor=10`` (the norm screen) and with
``screen_factor=10, screen_min_cosine="chance"`` (norm and direction, a group left out unless it agrees with the
others 3 null spreads above chance; a threshold of 0, used before, is a coin flip for noise); reported: the final
validation loss of ``θ_g`` (the model every group holds after the last sync), and its ratio to the clean run's (four
healthy groups), beside the three healthy groups alone (group 3 at weight 0: what a perfect screen gives), and the
syncs at which group 3 was left out (on the clean runs: the syncs that left out anyone). A run whose loss turned
non-finite reports ``diverged``. The clean run also measures what the direction test rests on, at every sync from
the second: group 0's score (the upper median of its pseudo-gradient's cosines with each other group's, exact here),
beside its cosine with the last outer update (a reference judged and rejected), and every group's significance as
the screen computes it from the count sketches (the upper median of its cosines over their null spreads; left out
below 3).

    python benchmarks/screen/screen.py --only broken          # ~1-2 minutes on 2 CPU cores (or screen_broken.py)
    python benchmarks/screen/screen.py --only broken --quick  # smoke run: 100 steps

Writes benchmarks/screen/results/screen_broken.md (``--quick``: screen_broken_quick.md, which git ignores).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_localsgd.engine import OuterSync, resolve_outer_optimizer
from lightning_localsgd.engine.screen import CHANCE_Z, PseudoGradientScreen, count_sketch, direction_scores

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
import harness as h  # noqa: E402

BROKEN = ("scaled", "sign", "noise", "bitflip", "noisy_steps")
#: The sizes; ``--quick`` replaces the default, any flag given overrides either.
PRESETS = {"default": dict(steps=600, sync_every=10, lr=3e-3), "quick": dict(steps=100, sync_every=10, lr=3e-3)}
DIM, HIDDEN = 32, 64


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, HIDDEN),
                               torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))


def batch(teacher: torch.nn.Module, g: torch.Generator, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, DIM, generator=g)
    with torch.no_grad():
        y = teacher(x) + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


SCREENS = {"off": None, "norm": dict(factor=10.0), "direction": dict(factor=10.0, min_cosine="chance")}


def train(rank: int, args: argparse.Namespace, broken: str | None, screened: str,
          alone: bool = False) -> tuple[float, int, list[list[float]]]:
    """One run: the validation loss of θ_g at the end (nan: diverged), the syncs group 3 was left out of (no group
    broken: the syncs that left out anyone), and (on the clean run with the direction test) this group's score (the
    upper median of its cosines with the others) and its cosine with the last outer update at each sync from the
    second, followed by every group's significance from the sketches. ``screened``: a key of :data:`SCREENS`;
    ``alone``: group 3 sends with weight 0 (the three other groups alone: the best a screen can do)."""
    teacher = make_model(1234)
    model = make_model(0)  # every group starts from the same weights
    params = list(model.parameters())
    engine = OuterSync([p.data for p in params], outer_optimizer=resolve_outer_optimizer("diloco"),
                       on_nonfinite="skip",
                       screen=PseudoGradientScreen(**SCREENS[screened]) if SCREENS[screened] else None)
    left_out, cosines, previous, update = 0, [], None, None
    inner = torch.optim.AdamW(params, lr=args.lr)
    data = torch.Generator().manual_seed(100 + rank)
    noise = torch.Generator().manual_seed(999)
    me_broken = broken is not None and rank == 3
    for step in range(1, args.steps + 1):
        x, y = batch(teacher, data)
        loss = torch.nn.functional.mse_loss(model(x), y)
        inner.zero_grad()
        loss.backward()
        inner.step()
        with torch.no_grad():
            if me_broken and broken == "noisy_steps":
                for p in params:
                    p.add_(torch.randn(p.shape, generator=noise), alpha=0.05)
            if step % args.sync_every == 0:
                if me_broken and broken in ("scaled", "sign", "noise"):
                    thetas = [s.view_as(p) for s, p in zip(engine.snapshot, params)]
                    deltas = [t - p for t, p in zip(thetas, params)]
                    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas))
                    for t, p, d in zip(thetas, params, deltas):
                        if broken == "scaled":
                            p.copy_(t - 100 * d)
                        elif broken == "sign":
                            p.copy_(t + d)
                        else:
                            p.copy_(t - torch.randn(p.shape, generator=noise) * 10 * norm / math.sqrt(
                                sum(q.numel() for q in params)))
                elif me_broken and broken == "bitflip":
                    flat = params[0].data.view(-1)
                    for k in torch.nonzero(flat.abs() < 1)[:4].view(-1).tolist():
                        flat.view(torch.int32)[k] ^= 1 << 30
                if broken is None and screened == "direction":  # measure what the direction test sees
                    delta = torch.cat([(s - p.view(-1)) for s, p in zip(engine.snapshot, params)])
                    every = [torch.empty_like(delta) for _ in range(dist.get_world_size())]
                    dist.all_gather(every, delta)
                    cos = torch.nn.functional.cosine_similarity  # (exact here; the screen uses a sketch)
                    # the test's score: the upper median of the cosines with each other group
                    with_others = sorted(float(cos(delta, d, dim=0)) for k, d in enumerate(every) if k != rank)[1]
                    if update is not None:  # the other reference judged: the last outer update
                        significance = direction_scores([count_sketch([(d, 0)]) for d in every])[1]
                        cosines.append((with_others, float(cos(delta, update, dim=0)), *significance))
                    previous = torch.cat([s.detach().view(-1) for s in engine.snapshot])
                res = engine.sync(weight=float(rank != 3) if alone else None)
                left_out += (3 in res.screened_out) if broken is not None else bool(res.screened_out)
                if previous is not None:
                    update = previous - torch.cat([s.detach().view(-1) for s in engine.snapshot])
    with torch.no_grad():
        for p, s in zip(params, engine.snapshot):
            p.copy_(s.view_as(p))
        x, y = batch(teacher, torch.Generator().manual_seed(7), 4096)
        return float(torch.nn.functional.mse_loss(model(x), y)), left_out, cosines


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {("clean", screened): train(rank, args, None, screened) for screened in SCREENS}
    results[("alone", "off")] = train(rank, args, None, "off", alone=True)
    for broken in BROKEN:
        for screened in SCREENS:
            results[(broken, screened)] = train(rank, args, broken, screened)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """This leg's flags (``screen.py`` declares ``--quick`` and ``--only``)."""
    p.add_argument("--steps", type=int, help=f"inner steps per run (default {PRESETS['default']['steps']})")
    p.add_argument("--sync-every", type=int, help=f"H (default {PRESETS['default']['sync_every']})")
    p.add_argument("--lr", type=float, help=f"AdamW's learning rate (default {PRESETS['default']['lr']})")


def run(size: argparse.Namespace, suffix: str, command: str) -> Path:
    """Every configuration; writes and returns ``results/screen_broken[_quick].md``."""
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.pt")
        mp.spawn(_worker, args=(4, h.free_port(), size, out), nprocs=4)
        results = torch.load(out)
    clean = results[("clean", "off")][0]
    syncs = size.steps // size.sync_every

    def cell(result: tuple[float, int, list], screened: bool = True) -> str:
        loss, left_out = result[0], result[1]
        text = "diverged" if not math.isfinite(loss) else f"{loss:.4f} ({loss / clean:.3f}x)"
        return f"{text}, out {left_out}/{syncs}" if screened else text

    # [syncs - 1, 6]: rank 0's score (upper median of its cosines with the others), its cosine with the last update,
    # each group's significance (sketched, as the screen computes it)
    cos = torch.tensor(results[("clean", "direction")][2])

    def spread(c: torch.Tensor, below: float, digits: int = 3) -> str:
        q = torch.quantile(c, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])).tolist()
        return (f"min {q[0]:.{digits}f}, quartiles {q[1]:.{digits}f} / {q[2]:.{digits}f} / {q[3]:.{digits}f}, max "
                f"{q[4]:.{digits}f}, below {below:g} at {int((c < below).sum())} of {c.numel()}")

    lines = [f"# One broken group of four: final validation loss (MLP student/teacher, DiLoCo, H={size.sync_every}, "
             f"{size.steps} steps; ratio to the clean run; out k/{syncs}: syncs group 3 was left out of, on the clean "
             f"run syncs that left out any group)", "",
             f"clean run (four healthy groups): {clean:.4f} without the screen, {cell(results[('clean', 'norm')])} "
             f"with the norm screen, {cell(results[('clean', 'direction')])} with norm and direction; the three "
             f"healthy groups alone (the best a screen can do): {cell(results[('alone', 'off')], False)}", "",
             f"clean run, group 0 at each of syncs 2-{syncs} ({cos.shape[0]}), exact: its score, the upper median "
             f"of its cosines with the other groups (what the direction test sketches) {spread(cos[:, 0], 0.0)}; with "
             f"the last outer update (rejected as the reference) {spread(cos[:, 1], 0.0)}", "",
             f"clean run, every group at each of syncs 2-{syncs}, from the count sketches as the screen computes it: "
             f"its significance (the upper median of its cosines over their null spreads; screen_min_cosine='chance' "
             f"leaves a group out below {CHANCE_Z:g}) {spread(cos[:, 2:].reshape(-1), CHANCE_Z, 2)}", "",
             "| group 3 broken by | without the screen | screen_factor=10 | screen_factor=10, "
             "screen_min_cosine='chance' |",
             "|---|---|---|---|"]
    for broken in BROKEN:
        lines.append(f"| {broken} | {cell(results[(broken, 'off')], False)} | {cell(results[(broken, 'norm')])} | "
                     f"{cell(results[(broken, 'direction')])} |")
    text = "\n".join(lines) + "\n"
    print(text)
    return h.write_summary(h.results_dir("screen") / f"screen_broken{suffix}.md", text, started, command)


if __name__ == "__main__":
    import screen

    screen.main(["--only", "broken", *sys.argv[1:]])
