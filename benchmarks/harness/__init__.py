"""Shared machinery of the paper benchmarks: one training run per subprocess, measured the same way for every mode.

A benchmark script builds run configurations (plain dicts, :func:`run_config`) and calls :func:`launch` for each;
``launch`` starts ``python -m harness CONFIG.json`` in a fresh process (optionally inside a private network
namespace with a shaped loopback, :func:`netns_prefix`); Lightning's popen launcher re-runs that command once per
extra rank, and global rank 0 writes one JSON object that ``launch`` reads back. Wall-clock comparisons run their
configurations interleaved and report median ratios with intervals (:mod:`harness.timing`).

Modules: :mod:`~harness.config` (run configurations), :mod:`~harness.launch` (subprocess, network namespace),
:mod:`~harness.netmodel` (emulated link: byte counting and delays, with the library's cost model),
:mod:`~harness.measure` (the callback: validation loss, training clock, DDP bytes), :mod:`~harness.worker` (one run,
in the subprocess), :mod:`~harness.output` (CSV, markdown, summaries, plots), :mod:`~harness.stats` (loss
intervals), :mod:`~harness.timing` (interleaved repetitions, median ratios). Only the driver side is imported here:
torch and Lightning load in the worker.
"""

from .config import DEFAULT_DATA, run_config, run_label
from .launch import (BENCHMARKS, ROOT, choose_emulation, free_port, launch, netns_available, netns_prefix,
                     worker_env)
from .output import loadavg, machine_info, md_table, pyplot, read_csv, results_dir, write_csv, write_summary
from .stats import paired_ratio_ci
from .timing import Interleaved, RatioEstimate, ratio, ratio_of, round_orders, run_interleaved, timed

__all__ = [
    "BENCHMARKS", "DEFAULT_DATA", "Interleaved", "ROOT", "RatioEstimate", "choose_emulation", "free_port", "launch",
    "loadavg", "machine_info", "md_table", "netns_available", "netns_prefix", "paired_ratio_ci", "pyplot", "ratio",
    "ratio_of", "read_csv", "results_dir", "round_orders", "run_config", "run_label", "run_interleaved", "timed",
    "worker_env", "write_csv", "write_summary",
]
