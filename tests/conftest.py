"""The tests are grouped by concern in subfolders (engine/, strategies/, features/, reliability/, examples/); the
helpers they share stay here: `_launch` (runs workers/train_tiny.py on N processes), `reference` (the single-process
hand reference) and the `workers` package. Put this folder on sys.path so that every subfolder imports them by name."""

from __future__ import annotations

import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
