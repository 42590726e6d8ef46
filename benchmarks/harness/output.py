"""Writing results: CSV, markdown tables and the ``<benchmark>/results/<name>.md`` summary with the machine it ran on.

Every benchmark keeps its files in its own folder, ``benchmarks/<benchmark>/results/`` (:func:`results_dir`)."""

from __future__ import annotations

import csv
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional

from .launch import BENCHMARKS


def results_dir(benchmark: str) -> Path:
    """``benchmarks/<benchmark>/results/``: where that benchmark writes its CSV, markdown and plots."""
    return BENCHMARKS / benchmark / "results"


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (or what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory() -> str:
    """Total memory in GiB from /proc/meminfo ('' where unknown)."""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return ""
    return f"{kb / 2**20:.0f} GiB"


def loadavg() -> str:
    """The 1, 5 and 15-minute load averages, as ``uptime`` prints them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info() -> dict:
    """CPU, cores, memory and library versions of this machine (for the README)."""
    import lightning
    import torch

    return dict(cpu=_cpu_name(), cores=os.cpu_count(), memory=_memory(), python=platform.python_version(),
                torch=torch.__version__, lightning=lightning.__version__, loadavg=loadavg())


def _fmt(v: Any) -> Any:
    """Floats with 6 significant digits (CSV cells)."""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def write_csv(path: Path, rows: list[dict], columns: Optional[list[str]] = None) -> None:
    """``rows`` as CSV; ``columns`` default to every key in order of first appearance."""
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k, "")) for k in columns})


def read_csv(path: Path) -> list[dict]:
    """The rows of a CSV written by :func:`write_csv` (values as strings)."""
    with open(path, newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def _cell(v: Any) -> str:
    """A markdown cell: floats with 4 significant digits."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def md_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table: ``columns`` = [(key, header), ...]; floats are printed with 4 significant digits."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_summary(path: Path, text: str, started: float, command: str) -> Path:
    """``path`` (``<benchmark>/results/<name>.md``): the command, its runtime, the machine and ``text`` (tables), for
    the benchmark's README."""
    info = machine_info()
    head = (f"Command: `{command}` — ran {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, "
            f"{(time.time() - started) / 60:.1f} min on {info['cores']} × {info['cpu']} ({info['memory']}), "
            f"Python {info['python']}, torch {info['torch']}, Lightning {info['lightning']}; "
            f"load average at the end {info['loadavg']}.\n\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + text.rstrip() + "\n")
    return path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or ``None`` (with a note) where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return None
    return plt
