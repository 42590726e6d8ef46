"""pyproject.toml lists every subpackage, so a non-editable install (a wheel) holds all of the library."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_subpackage_is_packaged():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lightning_localsgd").rglob("__init__.py")}
    assert found - listed == set(), f"subpackages missing from [tool.setuptools] packages: {sorted(found - listed)}"
