"""The version check at the top of ``lightning_localsgd/__init__.py``: an unsupported torch or Lightning gives one
line naming the minimum, raised before torch or Lightning is imported (see docs/compatibility.md)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from lightning_localsgd import _versions


def test_current_install_passes():
    _versions.check_versions()


# every (package, version) pair where the version is older than that package's minimum
TOO_OLD = [(dist, found) for dist in sorted(_versions.MINIMUM) for found in ("2.4.1", "2.3.0+cu121", "1.13.1", "0.9")
           if _versions._release(found) < _versions.MINIMUM[dist][1]]


@pytest.mark.parametrize("dist,found", TOO_OLD)
def test_too_old_is_one_line_naming_the_minimum(monkeypatch, dist, found):
    minimum = ".".join(map(str, _versions.MINIMUM[dist][1]))
    real = _versions.installed_version
    monkeypatch.setattr(_versions, "installed_version", lambda name: found if name == dist else real(name))
    with pytest.raises(ImportError) as info:
        _versions.check_versions()
    message = str(info.value)
    assert "\n" not in message
    assert message == f"lightning-localsgd needs {dist}>={minimum} (found {found}): pip install '{dist}>={minimum}'"


@pytest.mark.parametrize("found", ["2.6.0", "2.6.0+cu124", "2.6.1", "2.15.0", "3.0.0rc1", "10.0"])
def test_new_enough_passes(monkeypatch, found):
    monkeypatch.setattr(_versions, "MINIMUM", {"torch": ("torch", (2, 6))})
    monkeypatch.setattr(_versions, "installed_version", lambda name: found)
    _versions.check_versions()


def test_not_installed(monkeypatch):
    monkeypatch.setattr(_versions, "MINIMUM", {"torch": ("torch", (2, 6))})
    monkeypatch.setattr(_versions, "installed_version", lambda name: None)
    monkeypatch.setattr(_versions.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"^lightning-localsgd needs torch>=2\.6 \(not installed\): "
                                          r"pip install 'torch>=2\.6'$"):
        _versions.check_versions()


def test_minimum_matches_pyproject():
    """The bounds in pyproject.toml and the ones the import checks are the same."""
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("not a source checkout")
    text = pyproject.read_text()
    for dist, (_, minimum) in _versions.MINIMUM.items():
        assert f'"{dist}>={".".join(map(str, minimum))}"' in text, dist


def test_import_fails_first_with_one_line():
    """End to end, in a fresh interpreter: with torch reported as 2.4.1 ``import lightning_localsgd`` raises the one
    line, and neither torch nor Lightning has been imported by then."""
    script = textwrap.dedent(
        """
        import importlib.metadata, sys
        real = importlib.metadata.version
        importlib.metadata.version = lambda name: "2.4.1" if name == "torch" else real(name)
        try:
            import lightning_localsgd
        except ImportError as err:
            print("ERROR:" + str(err))
        print("IMPORTED:" + ",".join(m for m in ("torch", "lightning") if m in sys.modules))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "ERROR:lightning-localsgd needs torch>=2.6 (found 2.4.1): pip install 'torch>=2.6'" in lines, proc.stdout
    assert "IMPORTED:" in lines, proc.stdout
