"""The private names of other packages the package uses, all behind ``lightning_localsgd/_compat.py``.

(1) every name ``_compat`` declares (``PRIVATE_NAMES``) resolves on the installed versions (deepspeed / torchft skipped
only when not installed), and every private name ``_compat.py``'s code touches is declared; (2) no other module of the
package touches a private name of another package; (3) an installed version other than ``CHECKED_ON`` passes when every
name resolves, with a warning to re-check and update ``CHECKED_ON``.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import pkgutil
import re
import textwrap
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from lightning_localsgd import _compat, _versions
from lightning_localsgd._compat import CHECKED_ON, INHERITED, PRIVATE_NAMES, PrivateName

PACKAGE = Path(_compat.__file__).parent
OPTIONAL = {"deepspeed", "torchft"}  # extras: skipped when not installed; the others are dependencies


def _examples_folder() -> Path:
    """Where ``lightning_localsgd.examples`` lives: the repository's ``examples/`` (mapped by the install, or a
    symlink in the package folder)."""
    import lightning_localsgd.examples

    return Path(lightning_localsgd.examples.__file__).resolve().parent


def package_files() -> list[Path]:
    """Every .py file of the package, ``examples`` included wherever it lives (``Path.rglob`` does not follow a
    symlink, and an editable install maps ``examples/`` without one)."""
    roots = {PACKAGE.resolve(), _examples_folder()}
    return sorted({Path(folder, name).resolve() for root in roots
                   for folder, _dirs, names in os.walk(root, followlinks=True) for name in names if name.endswith(".py")})


# ---------------------------------------------------------------------------------------------------- (1) resolve
def _functions_reaching(entry: PrivateName) -> list[str]:
    return [name for name, fn in vars(_compat).items() if entry in getattr(fn, "__reaches__", ())]


def _owner(entry: PrivateName) -> Any:
    module_name, _, class_path = entry.owner.partition(":")
    owner: Any = importlib.import_module(module_name)
    for part in class_path.split(".") if class_path else []:
        owner = getattr(owner, part)
    return owner


def _sets_on_instances(cls: type, name: str) -> bool:
    """Whether ``cls`` or a base assigns ``self.<name>`` in its source (an attribute set in ``__init__``)."""
    assignment = re.compile(rf"\bself\.{re.escape(name)}\b\s*(:[^=\n]+)?=(?!=)")
    for klass in inspect.getmro(cls):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # a builtin or C extension class: no source
            continue
        if assignment.search(source):
            return True
    return False


def missing(entry: PrivateName) -> Optional[str]:
    """Why ``entry`` does not resolve on the installed versions (naming it and the version), or None when it does."""
    version = _versions.installed_version(entry.package)
    users = ", _compat.".join(_functions_reaching(entry)) or "StrategyRegistry / PATH (type aliases)"
    where = f"{entry.owner}.{entry.name} ({entry.package} {version}; used by _compat.{users})"
    try:
        owner = _owner(entry)
    except (ImportError, AttributeError) as err:
        return f"{where}: its owner {entry.owner} is gone: {err}"
    if hasattr(owner, entry.name):
        return None
    if entry.kind == "instance" and inspect.isclass(owner) and _sets_on_instances(owner, entry.name):
        return None
    return f"{where}: {entry.owner} has no {entry.name} any more; find what replaced it, update _compat.py"


def _skip_unless_installed(package: str) -> None:
    if package in OPTIONAL and importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")


def _older_than_since(entry: PrivateName) -> bool:
    version = _versions.installed_version(entry.package)
    return entry.since is not None and version is not None and \
        _versions._release(version) < _versions._release(entry.since)


@pytest.mark.parametrize("entry", PRIVATE_NAMES, ids=lambda e: f"{e.package}:{e.owner}.{e.name}")
def test_every_private_name_resolves(entry: PrivateName):
    _skip_unless_installed(entry.package)
    if _older_than_since(entry):
        pytest.skip(f"{entry.name} is new in {entry.package} {entry.since}; the caller copes without it")
    problem = missing(entry)
    assert problem is None, problem


def test_a_missing_name_fails_naming_it_and_the_version():
    gone = PrivateName("lightning", "lightning.pytorch.trainer.trainer:Trainer", "_no_such_attribute", kind="instance")
    problem = missing(gone)
    assert problem is not None and "_no_such_attribute" in problem
    assert f"lightning {_versions.installed_version('lightning')}" in problem
    gone_owner = PrivateName("lightning", "lightning.pytorch.no_such_module", "_x")
    assert "lightning.pytorch.no_such_module" in (missing(gone_owner) or "")


def test_every_function_declares_what_it_reaches_and_says_why():
    functions = {name: fn for name, fn in vars(_compat).items()
                 if inspect.isfunction(fn) and fn.__module__ == _compat.__name__ and not name.startswith("_")}
    assert functions
    for name, fn in functions.items():
        assert getattr(fn, "__reaches__", None), f"_compat.{name} declares no private name (@_reaches)"
        assert (fn.__doc__ or "").strip(), f"_compat.{name} has no docstring"
    assert {entry.package for entry in PRIVATE_NAMES} == set(CHECKED_ON)


def test_every_private_name_the_module_touches_is_declared():
    """The scan of (2) run on _compat.py itself: each private name its code touches is one of PRIVATE_NAMES."""
    declared = {entry.name for entry in PRIVATE_NAMES} | {
        part for entry in PRIVATE_NAMES for part in re.split(r"[.:]", entry.owner) if part.startswith("_")}
    touched = {name for name, _line, _what in private_accesses(PACKAGE / "_compat.py", own_names=set())}
    assert touched, "the scan finds nothing in _compat.py: it is broken"
    assert touched <= declared, f"touched in _compat.py but not declared in PRIVATE_NAMES: {sorted(touched - declared)}"


# ---------------------------------------------------------------------------------------------------- (2) scan
def _own_private_names() -> set[str]:
    """Private names the package defines itself: functions, classes, module / class level names, ``self._x``."""
    names: set[str] = set()
    for path in package_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                    and isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
    # a name _compat reaches is another package's, even where one of our classes also sets it on self
    return {n for n in names if n.startswith("_")} - {entry.name for entry in PRIVATE_NAMES}


#: underscored yet public: namedtuple's documented API (the underscore only keeps it apart from the field names)
NAMEDTUPLE_API = {"_fields", "_field_defaults", "_asdict", "_make", "_replace"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) and name not in NAMEDTUPLE_API


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _enclosing_function(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> Optional[str]:
    while node in parents:
        node = parents[node]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return node.name
    return None


def _names_ours(module: Optional[str]) -> bool:
    return (module or "").split(".")[0] == "lightning_localsgd"


def private_accesses(path: Path, own_names: set[str]) -> Iterator[tuple[str, int, str]]:
    """(private name, line, code) for each use in ``path`` of a private name that is not the package's own.

    Allowed: ``self._x`` / ``cls._x``; imports of our modules; a private name in ``own_names``; an override of
    a private Lightning hook calling through (``super()._x()`` inside ``def _x``).
    """
    tree = ast.parse(path.read_text(), str(path))
    parents = _parents(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__" \
                and not _names_ours(node.module):
            parts = node.module.split(".") if node.module else []
            for alias in node.names:
                for name in [p for p in parts if _is_private(p)] + ([alias.name] if _is_private(alias.name) else []):
                    yield name, node.lineno, f"from {node.module} import {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in (a for a in node.names if not _names_ours(a.name)):
                for part in alias.name.split("."):
                    if _is_private(part):
                        yield part, node.lineno, f"import {alias.name}"
        elif isinstance(node, ast.Attribute) and _is_private(node.attr):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super" \
                    and _enclosing_function(node, parents) == node.attr:
                continue
            if node.attr not in own_names:
                yield node.attr, node.lineno, ast.unparse(node)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2:
            target, name = node.args[0], node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and _is_private(name.value) \
                    and not (isinstance(target, ast.Name) and target.id in ("self", "cls")) \
                    and name.value not in own_names:
                yield name.value, node.lineno, ast.unparse(node)


def test_no_module_but_compat_touches_another_package_private_name():
    own = _own_private_names()
    files = package_files()
    assert any(path.parent.name == "examples" for path in files) and len(files) > 30  # the whole package is scanned
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {code}"
             for path in files if path.name != "_compat.py"
             for _name, line, code in private_accesses(path, own)]
    assert not found, ("private names of other packages outside lightning_localsgd/_compat.py (add a function there "
                       "and call it):\n" + "\n".join(found))


def test_the_scan_finds_private_accesses(tmp_path):
    """The scan can fail: each form of private access in a sample is found, each allowed form is not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from lightning.pytorch.loops.utilities import _is_max_limit_reached\n"
        "from torchft._torchft import LighthouseServer\n"
        "import torch._dynamo\n"
        "from .tensors import _map\n"
        "from lightning_localsgd._compat import PATH\n"
        "class S(Base):\n"
        "    def _configure_launcher(self):\n"
        "        super()._configure_launcher()\n"
        "        self._timeout\n"
        "        trainer._signal_connector\n"
        "        getattr(loop, '_broadcast_sigterm_tensor', None)\n"
        "        other._our_own\n"
        "    def setup(self):\n"
        "        super()._setup_distributed()\n"
    )
    found = {(name, line) for name, line, _code in private_accesses(sample, own_names={"_our_own"})}
    assert found == {("_is_max_limit_reached", 1), ("_torchft", 2), ("_dynamo", 3), ("_signal_connector", 10),
                     ("_broadcast_sigterm_tensor", 11), ("_setup_distributed", 14)}


# ---------------------------------------------------------------------------------------------------- (2b) inherited
def _is_ours(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "lightning_localsgd"


def _subclasses_of_other_packages() -> dict[str, type]:
    """Our classes with a base class of another package (a Lightning strategy, module, CLI...), by "module:Class"."""
    found = {}
    infos = [*pkgutil.walk_packages([str(PACKAGE)], "lightning_localsgd."),
             *pkgutil.walk_packages([str(_examples_folder())], "lightning_localsgd.examples.")]
    for info in {i.name: i for i in infos}.values():
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, cls in vars(module).items():
            if inspect.isclass(cls) and cls.__module__ == module.__name__ \
                    and any(not _is_ours(base) and base is not object for base in cls.__mro__[1:]):
                found[f"{module.__name__}:{name}"] = cls
    return found


def _self_private_names(cls: type) -> tuple[set[str], set[str]]:
    """(private names our classes in ``cls``'s MRO use on ``self`` or define as methods, those they define)."""
    used, defined = set(), set()
    for klass in cls.__mro__:
        if not _is_ours(klass):
            continue
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(klass)))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_private(node.name):
                used.add(node.name)
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and _is_private(node.attr) \
                    and isinstance(node.value, ast.Name) and node.value.id == "self":
                used.add(node.attr)
                if isinstance(node.ctx, ast.Store):
                    defined.add(node.attr)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):  # class-level attributes
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                defined.update(t.id for t in targets if isinstance(t, ast.Name))
    return used, defined


def _on_other_package_base(cls: type, name: str) -> bool:
    return any(hasattr(base, name) or _sets_on_instances(base, name)
               for base in cls.__mro__[1:] if not _is_ours(base) and base is not object)


@pytest.mark.parametrize("class_path", sorted(INHERITED))
def test_inherited_private_names_resolve(class_path: str):
    """A private hook we override or an attribute we use through ``self`` still exists on the Lightning base: a
    renamed hook would otherwise be silently no longer called."""
    module_name, _, name = class_path.partition(":")
    cls = getattr(importlib.import_module(module_name), name)
    gone = [n for n in INHERITED[class_path] if not _on_other_package_base(cls, n)]
    assert not gone, (f"{class_path}: its bases of lightning {_versions.installed_version('lightning')} have no "
                      f"{gone}: find what replaced them and update the subclass and _compat.INHERITED")


#: self._x reads that no class defines: bugs, reported; remove an entry when it is fixed
KNOWN_UNDEFINED: set[tuple[str, str]] = set()


def test_inherited_list_is_complete_and_no_self_name_is_undefined():
    classes = _subclasses_of_other_packages()
    assert {"lightning_localsgd.strategies.ddp:LocalSGDStrategy", "lightning_localsgd.examples.gpt:GPT"} <= set(classes)
    unlisted, undefined = [], set()
    for class_path, cls in classes.items():
        used, defined = _self_private_names(cls)
        inherited = {n for n in used if _on_other_package_base(cls, n)}
        unlisted += [f"{class_path}: {n}" for n in sorted(inherited - set(INHERITED.get(class_path, ())))]
        undefined |= {(class_path, n) for n in used - defined - inherited}
    assert not unlisted, "add to _compat.INHERITED (Lightning private names a subclass uses):\n" + "\n".join(unlisted)
    assert undefined == KNOWN_UNDEFINED, f"self._x read but defined by no class: {sorted(undefined - KNOWN_UNDEFINED)}"


# ---------------------------------------------------------------------------------------------------- (3) CHECKED_ON
def check_against_checked_on(installed: dict[str, Optional[str]]) -> list[str]:
    """Fail on a name that does not resolve; warn (and return the warnings) for each version other than CHECKED_ON."""
    messages = []
    for package, checked in sorted(CHECKED_ON.items()):
        version = installed.get(package)
        if version is None or _versions._release(version) == _versions._release(checked):
            continue
        entries = [e for e in PRIVATE_NAMES if e.package == package and not _older_than_since(e)]
        problems = [p for p in map(missing, entries) if p is not None]
        assert not problems, "\n".join(problems)
        message = (f"{package} {version} is installed, lightning_localsgd/_compat.py was checked on {checked}: its "
                   f"{len(entries)} private {package} names resolve, but re-check that they still do what _compat "
                   f"expects and update _compat.CHECKED_ON")
        warnings.warn(message, UserWarning, stacklevel=2)
        messages.append(message)
    return messages


def _installed() -> dict[str, Optional[str]]:
    return {package: _versions.installed_version(package) if importlib.util.find_spec(package) else None
            for package in CHECKED_ON}


def test_installed_versions_against_checked_on():
    check_against_checked_on(_installed())  # warns (does not fail) where a version differs and every name resolves


def test_another_version_warns_to_update_checked_on():
    installed = {package: version for package, version in _installed().items() if package not in OPTIONAL}
    installed["lightning"] = "99.0.0"  # a version the names were not checked on; they resolve (the real install)
    with pytest.warns(UserWarning, match=r"lightning 99\.0\.0 is installed.*checked on .*update _compat\.CHECKED_ON"):
        messages = check_against_checked_on(installed)
    assert len(messages) == 1 + sum(_versions._release(v or "") != _versions._release(CHECKED_ON[p])
                                    for p, v in installed.items() if p != "lightning" and v is not None)
