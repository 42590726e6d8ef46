"""The robust screen (``screen_factor``) against a broken worker group, in one command: what the screen costs a sync
(:mod:`screen_cost`) and the final loss with one of four groups broken, with and without it, beside the clean run
(:mod:`screen_broken`). Each leg's method is in its module's docstring; the figures are in this folder's README.

    python benchmarks/screen/screen.py                   # both legs, ~2-3 minutes on 2 CPU cores
    python benchmarks/screen/screen.py --only broken     # one leg (or: python benchmarks/screen/screen_broken.py)
    python benchmarks/screen/screen.py --quick           # smoke run: 1M parameters, 100 steps (*_quick.md)

Writes benchmarks/screen/results/screen_cost.md and screen_broken.md (with ``--quick``: ``*_quick.md``, which git
ignores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the legs
import screen_broken  # noqa: E402
import screen_cost  # noqa: E402

LEGS = {"cost": screen_cost, "broken": screen_broken}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=tuple(LEGS), action="append",
                   help="run only this leg (repeatable; default: both)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1M parameters, 2 rounds x 2 syncs; 100 steps; writes *_quick.md")
    for leg in LEGS.values():
        leg.add_arguments(p)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    command = " ".join(["python benchmarks/screen/screen.py", *argv])
    for name in args.only or LEGS:
        leg = LEGS[name]
        preset = leg.PRESETS["quick" if args.quick else "default"]  # a flag given overrides the preset
        size = argparse.Namespace(**{k: v if getattr(args, k) is None else getattr(args, k) for k, v in preset.items()})
        print(f"wrote {leg.run(size, '_quick' if args.quick else '', command)}", flush=True)


if __name__ == "__main__":
    main()
