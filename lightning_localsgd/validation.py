"""Small argument checks that fail early with a message naming the owner, the argument and the value.

Used where a wrong *type* would otherwise get through the constructor and fail much later with an unrelated message
(``'<' not supported between instances of 'str' and 'int'``, ``manual_seed expected a long``, ...), often inside the
launched processes.
"""

from __future__ import annotations

import math
import os
from typing import Any

__all__ = ["check_bool", "check_int", "check_number", "check_path", "check_str"]


def _name(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(owner: str, name: str, value: Any, optional: bool = False) -> None:
    """An ``int`` (``bool`` is refused: ``True`` is not a size), or ``None`` when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner} {name} must be an integer{' or None' if optional else ''}, got {_name(value)}.")


def check_number(owner: str, name: str, value: Any) -> None:
    """A finite real number (``int`` or ``float``, not ``bool``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner} {name} must be a finite number, got {_name(value)}.")


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner} {name} must be True or False, got {_name(value)}.")


def check_str(owner: str, name: str, value: Any, optional: bool = False) -> None:
    """A non-empty string, or ``None`` when ``optional``."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise ValueError(
            f"{owner} {name} must be a non-empty string{' or None' if optional else ''}, got {_name(value)}."
        )


def check_path(owner: str, name: str, value: Any) -> None:
    """``None``, or a non-empty ``str`` / ``os.PathLike``."""
    if value is None:
        return
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"{owner} {name} must be a file or folder path (str or pathlib.Path) or None, got "
                         f"{_name(value)}.")
