"""Several short fits of train_tiny.py one after another in the same processes: one launch pays the start-up once.

    python tests/workers/train_tiny_runs.py --devices 4 --out DIR --runs '{"name": {"strategy": "fsdp", ...}, ...}'

Each run is train_tiny.py's ``main`` with its options (``--key value`` as in ``_launch.worker_flags``) and its own
Trainer, strategy and model; they share the processes and the default process group. Run ``name`` writes
``DIR/name/rank{r}.pt``; at the end every rank writes ``DIR/rank{r}.pt`` = ``{"runs": {name: that rank's dump}}``.

Registers the schedule ``"growing_test"`` for ``sync_schedule=``: after the warm-up, intervals of ``sync_every``,
``sync_every + 1``, ``sync_every + 2``, ... steps (with ``sync_every=2``: syncs after local steps 2, 5, 9, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_tiny  # noqa: E402
from _launch import worker_flags  # noqa: E402

from lightning_localsgd import register_schedule  # noqa: E402
from tiny import GrowingSchedule  # noqa: E402

SCHEDULE = "growing_test"


register_schedule(SCHEDULE, lambda config: GrowingSchedule(config.sync_every, config.warmup_steps), override=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--runs", required=True, help="JSON object: run name -> train_tiny.py options")
    args = p.parse_args()
    runs = json.loads(args.runs)
    for name, options in runs.items():
        os.makedirs(os.path.join(args.out, name), exist_ok=True)
        train_tiny.main(["--devices", str(args.devices), "--out", os.path.join(args.out, name),
                         *worker_flags(options)])
    rank = dist.get_rank()  # the default process group lives on after the fits (until exit)
    dumps = {name: torch.load(os.path.join(args.out, name, f"rank{rank}.pt"), weights_only=False) for name in runs}
    torch.save({"runs": dumps}, os.path.join(args.out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
