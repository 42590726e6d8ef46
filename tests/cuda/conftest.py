"""CUDA versions of the tests that can break on a GPU (tests/cuda): skipped, with the reason, where torch sees no GPU.

One GPU is enough: ranks share ``cuda:0`` over gloo (``_gpu.run_on_gpu``). ``scripts/device_check.sh`` runs this
folder on a GPU machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent.parent
for sub in ("", "engine"):  # the hand references of the CPU tests, shared
    if str(TESTS / sub) not in sys.path:
        sys.path.insert(0, str(TESTS / sub))

NO_CUDA = "needs a CUDA GPU: torch.cuda.is_available() is False here (scripts/device_check.sh runs these on a GPU)"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or os.environ.get("LOCALSGD_CUDA_TESTS_ON_CPU") == "1":
        return
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture(autouse=True)
def _fresh_processes(monkeypatch):
    """The ranks of these tests start as fresh interpreters (torch.multiprocessing.spawn, subprocess), as they ran on
    the H200 (docs/gpu.md), not from the tests' fork server: a process that has touched CUDA must never be forked."""
    monkeypatch.setenv("LOCALSGD_TESTS_NO_FORKSERVER", "1")
