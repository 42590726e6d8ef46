"""The oldest torch and Lightning the package runs on, checked before either is imported.

``lightning_localsgd/__init__.py`` calls :func:`check_versions` first, so an unsupported install fails with one line
naming the minimum instead of a traceback from deep inside (e.g. ``torch.distributed.tensor`` missing on torch 2.4).
Only the standard library is imported here. The versions run are in ``docs/compatibility.md``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from typing import Optional

#: distribution name -> (import name, oldest supported version); keep in step with pyproject.toml
MINIMUM = {
    "torch": ("torch", (2, 6)),
    "lightning": ("lightning", (2, 4)),
}


def installed_version(dist: str) -> Optional[str]:
    """The installed version string of ``dist``, or ``None`` when its metadata is missing."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """``"2.6.0+cu124"`` -> ``(2, 6, 0)``; ``"2.7.0a0"`` -> ``(2, 7, 0)``: the leading numeric release."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(part) for part in match.group(1).split(".")) if match else ()


def _fmt(minimum: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in minimum)


def check_versions() -> None:
    """Raise a one-line ``ImportError`` naming the minimum when torch or Lightning is too old (or absent)."""
    for dist, (module, minimum) in MINIMUM.items():
        need = f"{dist}>={_fmt(minimum)}"
        version = installed_version(dist)
        if version is None:
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"lightning-localsgd needs {need} (not installed): pip install '{need}'")
            continue  # importable without metadata (a source tree on sys.path): nothing to compare against
        release = _release(version)
        if release and release[: len(minimum)] < minimum:
            raise ImportError(f"lightning-localsgd needs {need} (found {version}): pip install '{need}'")
