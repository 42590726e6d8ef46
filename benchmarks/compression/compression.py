"""Compressed syncs: final loss and cross-group bytes for the codecs None / bf16 / int8 / int4 / topk / topk_ef.

The strategy's ``compression=`` option compresses what crosses worker groups at a sync with a two-phase compressed
all-reduce (in ``OuterSync``; codecs in ``lightning_localsgd.engine.codecs``, formerly ``.comm``): each rank
adds the error its codec made at the previous sync to its pseudo-gradient ``θ_g − θ_i`` (error feedback), splits it
into G chunks (G worker groups), encodes them and sends chunk j to rank j of the cross-group (all-to-all); rank j
decodes and averages the G copies of its chunk, re-encodes the mean chunk (with its own error feedback) and the ranks
all-gather the encoded means. Per sync a rank hands over one compressed copy of its values, G chunk payloads
(``G · payload_bytes(codec, ⌈n/G⌉)``), and sends 2(G − 1)/G of that on the wire, like a ring all-reduce of fp32.
``int8`` and ``int4`` carry one fp32 scale per block of 256 values (per chunk), so their payload is slightly more
than ¼ and ⅛ of fp32. ``topk`` (SparseLoCo) sends, per 4096 values, the 64 of largest magnitude as 2-bit codes, 12-bit
indices and one fp32 scale: 116 bytes, 1/141 of fp32 (a chunk's last, shorter block costs as much), with error
feedback decayed by 0.95 at each sync; ``topk_ef`` the same values with Elias-Fano coded indices (84 bytes, 1/195).
Both exchange by all-gather (SparseLoCo's): each rank encodes its pseudo-gradient once and all-gathers the payload
(``payload_bytes(codec, n)``, what the strategy counts; ``(G − 1)`` of them on the wire), and every rank sums the G
decoded payloads itself.

Every run trains the example GPT with the same seed, data order, batch, learning-rate schedule, steps and H, on the
same number of worker groups; only the codec (and, in a second series, the outer optimizer) differs. Reported per run:

* the final validation loss on the fixed held-out windows, its ratio to the uncompressed run of the same outer
  optimizer, and a 95% paired bootstrap interval of that ratio over the held-out windows (evaluation noise only);
* the bytes each rank sent across groups per sync, counted by the strategy (``outer_sync.bytes_sent``: the G encoded
  chunks it hands to the all-to-all, or the fp32 buffer of the all-reduce), their ratio to the uncompressed run's,
  and the size computed from the codec's format (``G · comm.payload_bytes(codec, ⌈n/G⌉)``) as a cross-check;
* the codec's CPU seconds per sync (``codec_seconds``: one rank's encodes and decodes of a sync, measured alone on one
  thread, at the run's size and at 10M values);
* the bytes counted independently on the Python collectives (``cross_bytes``: the all-to-all's chunks for the other
  ranks + the all-gather's input, or the all-reduce's buffer; includes Lightning's 8-byte SIGTERM broadcast before
  each sync step), syncs, training seconds and outer state bytes (the error-feedback buffers add one fp32 copy of
  the rank's parameters and one of its mean chunk).

    python benchmarks/compression/compression.py        # small default: GPT micro, 2 CPU processes, ~5 min
    python benchmarks/compression/compression.py --outer average  # model averaging only (half the runs)
    python benchmarks/compression/compression.py --outer diloco --codecs none int8 --seed 1 \
        --out-name compression_diloco_seed1
    python benchmarks/compression/compression.py --full  # real hardware: GPT small, 2 groups of 4 GPUs, H = 64
    python benchmarks/compression/compression.py --runs none@average none@diloco topk@average topk@diloco \
        topk_recipe@lr=1.4142135623730951 --out-name compression_topk_recipe_final  # chosen (codec, outer) pairs

Writes benchmarks/compression/results/compression.csv (one row per run), compression_curves.csv (every evaluation),
compression.png and compression.md (the table for its README).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
import harness as h  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = Path(__file__).resolve().parent / "variants"  # candidate sparse codecs (its sitecustomize registers them)

CODECS = ["none", "bf16", "int8", "int4", "topk", "topk_ef"]
OUTER_NAMES = {"average": "local SGD", "diloco": "DiLoCo"}
#: The sparse recipe (``compression="topk_recipe"`` with ``outer_optimizer="topk_recipe"``, outer SGD lr √2): one more
#: run of the default command, beside the grid of codecs × outer steps.
RECIPE = ("topk_recipe", "topk_recipe")


def outer_label(outer: str) -> str:
    """How tables name an outer step: ``local SGD`` / ``DiLoCo`` for the presets, ``SGD(lr=2)`` for SGD keywords."""
    if outer == RECIPE[1]:
        return "sparse recipe"
    return OUTER_NAMES.get(outer) or f"SGD({outer})"


def recipe_outer() -> dict:
    """The keywords of the registered ``outer_optimizer="topk_recipe"`` preset (``torch.optim.SGD``'s)."""
    from lightning_localsgd.engine.presets import resolve_outer_optimizer

    return dict(resolve_outer_optimizer(RECIPE[1]).keywords)  # a functools.partial of SGD


def parse_run(spec: str) -> tuple[str, str, Optional[dict]]:
    """``CODEC@OUTER`` of ``--runs``: (codec, outer key, ``torch.optim.SGD`` keywords or ``None`` for a preset).

    ``OUTER``: ``average``, ``diloco``, or SGD keywords ``lr=2`` / ``lr=0.2,momentum=0.9,nesterov=true``."""
    codec, _, outer = spec.partition("@")
    if not codec or not outer:
        raise ValueError(f"--runs {spec!r}: write CODEC@OUTER, e.g. topk@average or topk@lr=2")
    if outer in OUTER_NAMES:
        return codec, outer, None
    kwargs: dict = {}
    for item in outer.split(","):
        key, _, value = item.partition("=")
        if key not in ("lr", "momentum", "nesterov", "dampening") or not value:
            raise ValueError(f"--runs {spec!r}: the outer step is average, diloco or SGD keywords lr=, momentum=, "
                             f"nesterov=, dampening= separated by commas; got {item!r}")
        try:
            kwargs[key] = value.lower() in ("1", "true") if key == "nesterov" else float(value)
        except ValueError:
            raise ValueError(f"--runs {spec!r}: {key}={value!r} is not a number") from None
    return codec, outer, kwargs

PRESETS = {
    "default": dict(size="micro", steps=768, batch_size=16, block_size=128, sync_every=16, eval_every=64,
                    learning_rate=3e-3, warmup=50, devices=2, group_size=1, val_windows=256),
    "full": dict(size="small", steps=8192, batch_size=32, block_size=256, sync_every=64, eval_every=256,
                 learning_rate=1.5e-3, warmup=400, devices=8, group_size=4, val_windows=1024),
}


def main() -> None:  # noqa: C901
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="the real-hardware preset (see PRESETS)")
    p.add_argument("--size", help="GPT size from GPT_SIZES")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--block-size", type=int)
    p.add_argument("--sync-every", type=int, help="H")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (a multiple of H)")
    p.add_argument("--learning-rate", type=float, help="peak AdamW lr")
    p.add_argument("--warmup", type=int, help="learning-rate warm-up steps")
    p.add_argument("--devices", type=int)
    p.add_argument("--group-size", type=int, help="processes per worker group (groups = devices / group size)")
    p.add_argument("--accelerator", default=None, help="cpu (default) or gpu (NCCL)")
    p.add_argument("--outer", nargs="+", default=["average", "diloco"], choices=list(OUTER_NAMES))
    p.add_argument("--codecs", nargs="+", default=CODECS,
                   help=f"codecs run under every --outer (default {' '.join(CODECS)}; any registered codec name)")
    p.add_argument("--runs", nargs="+", metavar="CODEC@OUTER",
                   help="run exactly these (codec, outer step) pairs instead of --codecs × --outer: CODEC none (fp32), "
                        "a codec name or a candidate of variants/sitecustomize.py (topk_senders, topk96_ef, ...); "
                        "OUTER average, diloco, or torch.optim.SGD keywords, e.g. lr=2 or "
                        "lr=0.2,momentum=0.9,nesterov=true (loss ratios of such runs are to local SGD fp32's)")
    p.add_argument("--seed", type=int, default=1234, help="model init and data order (the harness default 1234)")
    p.add_argument("--out-name", default="compression", help="file names under benchmarks/compression/results/")
    p.add_argument("--plot-only", action="store_true", help="redraw <out-name>.png from its CSVs; runs nothing")
    args = p.parse_args()
    if args.plot_only:
        replot(args.out_name)
        return
    cfg = dict(PRESETS["full" if args.full else "default"])
    for key in ("size", "steps", "batch_size", "block_size", "sync_every", "eval_every", "learning_rate", "warmup",
                "devices", "group_size"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    accelerator = args.accelerator or ("gpu" if args.full else "cpu")
    H = cfg["sync_every"]
    if cfg["eval_every"] % H or cfg["steps"] % H:
        p.error(f"--eval-every and --steps must be multiples of H={H}: the workers hold the same model only right "
                "after a sync")
    if cfg["devices"] % cfg["group_size"] or cfg["devices"] // cfg["group_size"] < 2:
        p.error("need at least 2 worker groups (devices / group size)")
    from lightning_localsgd.engine.codecs import codec_names

    spec = importlib.util.spec_from_file_location("compression_variants", VARIANTS / "sitecustomize.py")
    variants = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(variants)  # registers the candidates here; the workers need VARIANTS on PYTHONPATH
    if args.runs:
        try:
            pairs = [parse_run(spec) for spec in args.runs]
        except ValueError as err:
            p.error(str(err))
    else:
        codecs = ["none"] + [c for c in args.codecs if c != "none"]  # the uncompressed run is the reference
        pairs = [(codec, outer, None) for outer in args.outer for codec in codecs]
        if args.codecs == CODECS and args.outer == ["average", "diloco"]:  # the default command: the recipe too
            pairs.append((RECIPE[0], RECIPE[1], recipe_outer()))
    unknown = sorted({c for c, _, _ in pairs if c != "none" and c not in codec_names()})
    if unknown:
        p.error(f"unknown codec(s) {unknown}: use none or one of {codec_names()}")
    if not any(c == "none" and o == "average" for c, o, _ in pairs) and any(k for _, _, k in pairs):
        p.error("runs with SGD keywords are compared with local SGD fp32: add none@average")
    codecs = list(dict.fromkeys(c for c, _, _ in pairs))
    if set(codecs) & set(variants.CANDIDATES):  # the training processes register them at start-up (sitecustomize)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(VARIANTS), os.environ.get("PYTHONPATH")) if p)

    started = time.time()
    model = dict(size=cfg["size"], learning_rate=cfg["learning_rate"], warmup_steps=cfg["warmup"],
                 max_steps=cfg["steps"])
    common = dict(steps=cfg["steps"], model=model, batch_size=cfg["batch_size"], block_size=cfg["block_size"],
                  devices=cfg["devices"], group_size=cfg["group_size"], sync_every=H, eval_every=cfg["eval_every"],
                  val_windows=cfg["val_windows"], accelerator=accelerator, seed=args.seed)
    runs = []
    for codec, outer, sgd in pairs:
        name = f"{outer_label(outer)}, {'fp32' if codec == 'none' else codec}"
        t0 = time.time()
        r = h.launch(h.run_config(name, "average" if sgd else outer, compression=None if codec == "none" else codec,
                                  outer=sgd, **common))
        r.update(outer=outer, codec=codec)
        print(f"{name}: final val loss {r['final_val_loss']:.4f}, {r['bytes_sent'] / max(1, r['num_syncs']):,.0f} "
              f"bytes/sync/rank, train {r['train_seconds']:.1f} s (process {time.time() - t0:.0f} s)", flush=True)
        runs.append(r)

    try:  # the codecs' module is being renamed; both names work
        from lightning_localsgd.engine.codecs import payload_bytes
    except ImportError:
        from lightning_localsgd.comm import payload_bytes

    groups = cfg["devices"] // cfg["group_size"]
    owned_values = -(-runs[0]["params"] // cfg["group_size"])
    seconds = {c: codec_seconds(c, owned_values, groups) for c in codecs}
    seconds_10m = {c: codec_seconds(c, 10_000_000, groups) for c in codecs}
    rows, curves = [], []
    for r in runs:
        ref = next((x for x in runs if x["outer"] == r["outer"] and x["codec"] == "none"), None) or next(
            x for x in runs if x["outer"] == "average" and x["codec"] == "none")  # SGD keywords: local SGD fp32
        per_sync = r["bytes_sent"] / r["num_syncs"]
        ref_per_sync = ref["bytes_sent"] / ref["num_syncs"]
        owned = -(-r["params"] // cfg["group_size"])  # values one rank syncs (its slice of the flat parameters)
        # compressed: G encoded chunks of ⌈owned / G⌉ values (the all-to-all's input, one compressed copy), or the
        # all-gather's input (the sparse codecs): one payload of the owned values
        expected = (4 * owned if r["codec"] == "none" else payload_bytes(r["codec"], owned)
                    if gathers(r["codec"]) else groups * payload_bytes(r["codec"], -(-owned // groups)))
        lo, hi = h.paired_ratio_ci(r["per_window"], ref["per_window"])
        diloco = next((x for x in runs if x["outer"] == "diloco" and x["codec"] == "none"), None)
        rows.append(dict(
            run=r["name"], outer=r["outer"], codec=r["codec"], H=H, groups=groups, steps=r["steps"],
            tokens=r["tokens"], params=r["params"], final_val_loss=r["final_val_loss"],
            loss_ratio=r["final_val_loss"] / ref["final_val_loss"], loss_ratio_ci_lo=lo, loss_ratio_ci_hi=hi,
            loss_ratio_diloco=r["final_val_loss"] / diloco["final_val_loss"] if diloco else float("nan"),
            bytes_per_sync=per_sync, bytes_ratio=per_sync / ref_per_sync, expected_payload_bytes=expected,
            wire_bytes_per_sync=r["cross_bytes"] / r["num_syncs"], syncs=r["num_syncs"],
            train_seconds=r["train_seconds"], outer_state_bytes=r["state_bytes"],
            codec_seconds=seconds[r["codec"]], codec_seconds_10m=seconds_10m[r["codec"]],
        ))
        curves += [dict(run=r["name"], outer=r["outer"], codec=r["codec"], **c) for c in r["curve"]]
    h.write_csv(RESULTS / f"{args.out_name}.csv", rows)
    h.write_csv(RESULTS / f"{args.out_name}_curves.csv", curves)
    plot(runs, rows, args.out_name)

    for row in rows:
        row["ci"] = f"[{row['loss_ratio_ci_lo']:.4f}, {row['loss_ratio_ci_hi']:.4f}]"
        row["loss_ratio_s"] = f"{row['loss_ratio']:.4f}"
        row["loss_diloco_s"] = f"{row['loss_ratio_diloco']:.4f}"
        row["bytes_ratio_s"] = f"{row['bytes_ratio']:.5f}"
        row["bytes_s"] = f"{row['bytes_per_sync']:,.0f}"
        row["state_s"] = f"{row['outer_state_bytes']:,}"
        row["fewer_s"] = f"{1 / row['bytes_ratio']:.1f}×"
        row["codec_s"] = f"{1e3 * row['codec_seconds']:.1f} / {1e3 * row['codec_seconds_10m']:.0f}"
    table = h.md_table(rows, [("run", "run"), ("final_val_loss", "final val loss"),
                              ("loss_ratio_s", "loss / fp32"), ("ci", "95% CI (windows)"),
                              ("loss_diloco_s", "loss / DiLoCo fp32"),
                              ("bytes_s", "bytes/sync/rank"), ("bytes_ratio_s", "bytes / fp32"),
                              ("fewer_s", "fewer bytes"), ("codec_s", "codec ms/sync (run / 10M values)"),
                              ("syncs", "syncs"),
                              ("train_seconds", "train s"), ("state_s", "outer state bytes/rank")])
    verdict = []
    for row in rows:
        if row["codec"] != "int8" or row["outer"] != "average":
            continue
        within = row["loss_ratio"] <= 1.01
        owned = -(-row["params"] // cfg["group_size"])
        chunk = -(-owned // groups)  # values per chunk: ⌈⌈N / S⌉ / G⌉
        verdict.append(
            f"**int8 + error feedback within 1% of the uncompressed final loss at ¼ of the bytes ({row['run']})?** "
            f"{'Yes' if within else 'No'}: loss ratio {row['loss_ratio']:.4f} (95% window-bootstrap interval "
            f"{row['ci']}), bytes ratio {row['bytes_ratio']:.5f} = (1 + 4/256) / 4 plus the padding of each chunk's "
            f"last block: one byte per value and one fp32 scale per block of 256 values, in {groups} chunks, "
            f"{row['bytes_per_sync']:,.0f} of {row['bytes_per_sync'] / row['bytes_ratio']:,.0f} bytes "
            f"= {groups} × payload_bytes('int8', {chunk:,}) per sync per rank.")
    for row in rows:
        if not row["codec"].startswith("topk"):
            continue
        int4 = next((x for x in rows if x["outer"] == row["outer"] and x["codec"] == "int4"), None)
        verdict.append(
            f"**{row['codec']} ({row['run']}): ≥ 100× fewer bytes than fp32 (beat 146×), loss within 2% of DiLoCo "
            f"fp32?** {1 / row['bytes_ratio']:.1f}× fewer bytes ({row['bytes_per_sync']:,.0f} bytes/sync/rank = "
            f"payload_bytes('{row['codec']}', {owned_values:,}), all-gathered: {groups - 1} × that on the wire): "
            f"{'met' if 1 / row['bytes_ratio'] >= 100 else 'missed'} (146×: "
            f"{'beaten' if 1 / row['bytes_ratio'] > 146 else 'not beaten'}); loss {row['loss_ratio_diloco']:.4f}× "
            f"DiLoCo fp32: {'within' if row['loss_ratio_diloco'] <= 1.02 else 'not within'} 2%; "
            f"{row['loss_ratio']:.4f}× the fp32 run of its outer optimizer (95% window-bootstrap interval "
            f"{row['ci']})" + (f"; int4: {int4['loss_ratio']:.4f} at {1 / int4['bytes_ratio']:.1f}× fewer bytes."
                               if int4 else "."))
    first = runs[0]
    text = (f"GPT `{cfg['size']}` ({first['params']:,} parameters), {groups} worker groups × {cfg['group_size']} "
            f"process(es), batch {cfg['batch_size']} × {cfg['block_size']} tokens per process, {cfg['steps']} steps "
            f"= {first['tokens']:,} tokens per run, H = {H}, AdamW lr {cfg['learning_rate']:g} (warm-up "
            f"{cfg['warmup']}, cosine), seed {args.seed} (model init and data order), validation on the same "
            f"{cfg['val_windows']} held-out windows. Ratios are to "
            f"the fp32 (uncompressed) run of the same outer optimizer.\n\n{table}\n\n" + "\n".join(verdict) + "\n")
    command = "python benchmarks/compression/compression.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    print(text)
    h.write_summary(RESULTS / f"{args.out_name}.md", text, started, command)


def gathers(codec: str) -> bool:
    """Whether the codec's payloads are all-gathered (the sparse codecs) rather than reduced in two phases."""
    from lightning_localsgd.engine.codecs import get_codec

    return codec != "none" and get_codec(codec).exchange == "all_gather"


def codec_seconds(codec: str, numel: int, groups: int) -> float:
    """CPU seconds of the codec work of one rank's sync of ``numel`` values over ``groups`` groups, on one thread, best
    of 3. Two-phase: phase 1 encodes G chunks and decodes them (its error feedback), decodes the G received pieces of
    its chunk, encodes the mean and decodes it (error feedback); then decodes the G gathered means. All-gather (the
    sparse codecs): encodes its values once and decodes them (error feedback), then decodes the G gathered payloads."""
    import torch

    from lightning_localsgd.engine.codecs import get_codec

    if codec == "none":
        return 0.0
    c = get_codec(codec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 1e-3
    chunk = -(-numel // groups)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        if gathers(codec):
            q = c.encode(x)
            for _ in range(groups + 1):  # its error feedback, then the G gathered payloads
                c.decode(q, numel)
        else:
            payloads = [c.encode(x[j * chunk : (j + 1) * chunk]) for j in range(groups)]
            for q in payloads + payloads:  # own error feedback, then the received pieces (as many)
                c.decode(q, chunk)
            mean = c.encode(x[:chunk])
            for _ in range(groups + 1):  # its error feedback, then the gathered means
                c.decode(mean, chunk)
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(threads)
    return best


def replot(out_name: str) -> None:
    """Redraw ``<out_name>.png`` from ``<out_name>.csv`` and ``<out_name>_curves.csv`` (as :func:`main` wrote them)."""
    rows = [{k: (v if k in ("run", "outer", "codec") else float(v)) for k, v in r.items()}
            for r in h.read_csv(RESULTS / f"{out_name}.csv")]
    curves = h.read_csv(RESULTS / f"{out_name}_curves.csv")
    runs = [dict(name=r["run"], outer=r["outer"], codec=r["codec"], steps=int(r["steps"]), params=int(r["params"]),
                 sync_every=int(r["H"]), devices=int(r["groups"]), group_size=1,
                 curve=[{k: float(c[k]) for k in ("step", "tokens", "val_loss")} for c in curves
                        if c["run"] == r["run"]]) for r in rows]
    plot(runs, rows, out_name)


def plot(runs: list[dict], rows: list[dict], out_name: str) -> None:
    plt = h.pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    codecs = CODECS + [c for c in dict.fromkeys(r["codec"] for r in rows) if c not in CODECS]
    colors = {c: f"C{i % 10}" for i, c in enumerate(codecs)}
    styles = {"average": "-", "diloco": "--"}
    markers = {"average": "o", "diloco": "s"}
    for i, outer in enumerate(o for o in dict.fromkeys(r["outer"] for r in rows) if o not in styles):
        styles[outer], markers[outer] = [":", "-.", (0, (5, 1, 1, 1, 1, 1))][i % 3], "^v<>DPX*"[i % 8]  # SGD keywords
    lows, highs = [], []
    for r in runs:
        c = r["curve"]
        a.plot([p["tokens"] / 1e6 for p in c], [p["val_loss"] for p in c], ls=styles[r["outer"]],
               color=colors[r["codec"]], lw=1.4, label=r["name"])
        lows.append(min(p["val_loss"] for p in c))
        highs.append(max(p["val_loss"] for p in c if p["step"] >= r["steps"] * 0.15))
    lo, hi = min(lows), max(highs)
    a.set_ylim(lo - 0.03 * (hi - lo), hi + 0.05 * (hi - lo))
    a.set_xlabel("tokens (millions, all workers)")
    a.set_ylabel("validation loss (fixed held-out windows)")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    for outer in dict.fromkeys(r["outer"] for r in rows):
        sel = [r for r in rows if r["outer"] == outer]
        b.plot([r["bytes_per_sync"] for r in sel], [r["loss_ratio"] for r in sel], ls=styles[outer], color="0.6",
               lw=1, zorder=1)
        for r in sel:
            b.errorbar(r["bytes_per_sync"], r["loss_ratio"],
                       yerr=[[r["loss_ratio"] - r["loss_ratio_ci_lo"]], [r["loss_ratio_ci_hi"] - r["loss_ratio"]]],
                       color=colors[r["codec"]], marker=markers[outer], capsize=2, zorder=2,
                       label=f"{r['run']}: {r['final_val_loss']:.4f}")
    # one label per codec (its points of both outer optimizers share the bytes), alternately above its highest point
    # and below its lowest in order of bytes, so that neighbours on the log axis do not overlap
    by_codec = {c: [r for r in rows if r["codec"] == c] for c in dict.fromkeys(r["codec"] for r in rows)}
    placed: dict[bool, tuple[float, float]] = {}  # per side: the last label's bytes and y
    for i, (codec, sel) in enumerate(sorted(by_codec.items(), key=lambda kv: kv[1][0]["bytes_per_sync"])):
        x, above = sel[0]["bytes_per_sync"], i % 2 == 1
        for _ in range(2):  # the other side where a neighbour's label on this side sits at the same height
            y = max(r["loss_ratio_ci_hi"] for r in sel) if above else min(r["loss_ratio_ci_lo"] for r in sel)
            last = placed.get(above)
            if last is None or x / last[0] >= 1.6 or abs(y - last[1]) >= 0.05:
                break
            above = not above
        placed[above] = (x, y)
        b.annotate(f"{'fp32' if codec == 'none' else codec}\n{1 / sel[0]['bytes_ratio']:.1f}× fewer bytes",
                   (x, y), textcoords="offset points", xytext=(0, 6 if above else -6),
                   ha="center", va="bottom" if above else "top", fontsize=7, color=colors[codec])
    b.axhline(1.01, color="k", ls=":", lw=0.8)
    b.text(0.01, 1.01, "+1%", va="bottom", fontsize=7, transform=b.get_yaxis_transform())
    b.set_xscale("log")
    b.margins(x=0.15, y=0.15)  # room for the labels above and below the points
    b.set_xlabel("bytes sent per sync per rank (counted)")
    b.set_ylabel("final val loss / fp32 run of the same outer optimizer")
    b.grid(alpha=0.3, which="both")
    b.legend(fontsize=7, title="run: final val loss", title_fontsize=7)
    r0 = runs[0]
    fig.suptitle(f"compressed syncs: {r0['params']:,} params, {r0['steps']} steps, H={r0['sync_every']}, "
                 f"{r0['devices'] // r0['group_size']} worker groups (error feedback on)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out_name}.png", dpi=100)


if __name__ == "__main__":
    main()
