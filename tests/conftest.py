"""The tests are grouped by concern in subfolders (engine/, strategies/, features/, reliability/, examples/); the
helpers they share stay here: `_launch` (runs workers/train_tiny.py on N processes), `_forkserver` (starts the worker
processes from a process that has imported torch and Lightning already), `reference` (the single-process hand
reference) and the `workers` package. Put this folder on sys.path so that every subfolder imports them by name."""

from __future__ import annotations

import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import _forkserver  # noqa: E402

_forkserver.BASE_ENV = dict(os.environ)  # the server's environment: the session's, before any test changes it


def pytest_collection_finish(session) -> None:
    """Start the fork server while the first tests run when a collected module launches worker processes."""
    modules = {getattr(item, "module", None) for item in session.items}
    if any(m is not None and ("_forkserver" in vars(m) or "run_tiny" in vars(m)) for m in modules):
        _forkserver.start()


def pytest_terminal_summary(terminalreporter) -> None:
    stats = _forkserver.STATS
    if stats["forked"] or stats["fresh"]:
        reasons = ", ".join(f"{n}: {why}" for why, n in sorted(stats["reasons"].items())) or "-"
        terminalreporter.write_line(f"fork server: {stats['forked']} worker processes forked, {stats['fresh']} "
                                    f"started fresh through it ({reasons})")
