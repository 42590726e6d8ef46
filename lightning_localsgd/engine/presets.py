"""Outer-optimizer presets, in a registry: ``outer_optimizer="name"`` picks one.

``"average"`` is outer SGD with lr 1.0 and no momentum, computed as the exact mean (its factory is ``None``);
``"diloco"`` is outer SGD with Nesterov momentum 0.9 and lr 0.7 (Douillard et al., 2023); ``"topk_recipe"`` is outer
SGD with lr √2 and no momentum, the outer step of the sparse recipe (``compression="topk_recipe"``, whose decayed
residual stands in for momentum; :class:`~lightning_localsgd.engine.codecs.TopKCodec`). Add one with
:func:`register_outer_optimizer`; every strategy then accepts its name (and the CLI, as a string).
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Callable, Iterable, Optional, Union

import torch

__all__ = ["OuterOptimizerFactory", "OuterOptimizerSpec", "check_outer_optimizer_factory", "outer_optimizer_name",
           "outer_optimizer_names", "register_outer_optimizer", "resolve_outer_optimizer"]

OuterOptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]
OuterOptimizerSpec = Union[str, OuterOptimizerFactory, None]

_PRESETS: dict[str, Optional[OuterOptimizerFactory]] = {
    "average": None,
    "diloco": partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True),
    "topk_recipe": partial(torch.optim.SGD, lr=math.sqrt(2)),
}


def register_outer_optimizer(name: str, factory: Optional[OuterOptimizerFactory], override: bool = False) -> None:
    """Make ``outer_optimizer=name`` build the outer optimizer with ``factory`` (``params -> Optimizer``).

    ``factory=None`` means exact averaging. The factory is checked at once on a dummy parameter.

    Raises:
        ValueError: the name is taken (pass ``override=True``), or the factory does not build an optimizer.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_outer_optimizer: the name must be a non-empty string, got {name!r}.")
    if name in _PRESETS and not override:
        raise ValueError(f"register_outer_optimizer: a preset named {name!r} exists already; pass override=True to "
                         "replace it.")
    if factory is not None and not callable(factory):
        raise ValueError(f"register_outer_optimizer({name!r}): the factory must be a callable `params -> "
                         f"torch.optim.Optimizer` or None, got {type(factory).__name__}.")
    check_outer_optimizer_factory(factory)
    _PRESETS[name] = factory


def outer_optimizer_names() -> tuple[str, ...]:
    """Every registered preset name (the built-ins first)."""
    return tuple(_PRESETS)


def resolve_outer_optimizer(spec: OuterOptimizerSpec) -> Optional[OuterOptimizerFactory]:
    """Turn an ``outer_optimizer`` argument into a factory ``params -> Optimizer`` (``None`` means exact averaging).

    Raises:
        ValueError: for an unknown name or a value that is neither a name nor a callable.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec in _PRESETS:
            return _PRESETS[spec]
        raise ValueError(
            f"outer_optimizer={spec!r} is not a known name. Use one of {outer_optimizer_names()} (add one with "
            "lightning_localsgd.register_outer_optimizer) or a callable `params -> torch.optim.Optimizer`, e.g. "
            "`functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)`."
        )
    if not callable(spec):
        raise ValueError(
            f"outer_optimizer must be one of {outer_optimizer_names()} or a callable `params -> "
            f"torch.optim.Optimizer`, got {type(spec).__name__}."
        )
    return spec


def check_outer_optimizer_factory(factory: Optional[OuterOptimizerFactory]) -> None:
    """Call ``factory`` on a dummy parameter and check it returns a ``torch.optim.Optimizer``.

    Run before training so a bad callable fails early with a message that names the parameter.
    """
    if factory is None:
        return
    try:
        optimizer = factory([torch.nn.Parameter(torch.zeros(1))])
    except Exception as err:
        raise ValueError(
            f"outer_optimizer: calling it with a list of parameters failed ({type(err).__name__}: {err}). It must be "
            "a callable `params -> torch.optim.Optimizer`, e.g. `functools.partial(torch.optim.SGD, lr=0.7)`."
        ) from err
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"outer_optimizer must return a torch.optim.Optimizer, but it returned {type(optimizer).__name__}. "
            "Pass a callable `params -> torch.optim.Optimizer`, e.g. `functools.partial(torch.optim.SGD, lr=0.7)`."
        )


def outer_optimizer_name(spec: OuterOptimizerSpec, arguments: bool = True) -> str:
    """A readable name of an ``outer_optimizer`` argument (for logs and checkpoints).

    A preset's name; for a class given with its arguments, ``functools.partial(torch.optim.SGD, lr=0.5)`` or a class
    path in LightningCLI (which jsonargparse wraps as ``partial(<instantiator>, torch.optim.SGD, lr=0.5, ...)``), the
    class and the arguments that differ from its defaults: ``"SGD(lr=0.5)"`` (``arguments=False``: ``"SGD"``); for
    another callable, its name.
    """
    if isinstance(spec, str):
        return spec
    if spec is None:
        return "average"
    target: object = spec
    args: tuple = ()
    kwargs: dict = {}
    if isinstance(spec, partial):
        classes = [i for i, a in enumerate(spec.args) if isinstance(a, type)]
        if classes:  # jsonargparse: partial(call_without_instantiate_context, instantiator, Class, **init_args)
            target, args = spec.args[classes[-1]], spec.args[classes[-1] + 1:]
        else:
            target, args = spec.func, spec.args
        kwargs = dict(spec.keywords)
    name = getattr(target, "__name__", None) or type(target).__name__
    if not arguments:
        return name
    defaults = _defaults(target)
    shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()
                                       if not (k in defaults and _same(defaults[k], v))]
    return f"{name}({', '.join(shown)})" if shown else name


def _defaults(target: object) -> dict[str, object]:
    try:
        params = inspect.signature(target).parameters.values()  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _same(a: object, b: object) -> bool:
    try:
        return isinstance(a, bool) == isinstance(b, bool) and bool(a == b)  # 0 == 0.0, but not False == 0
    except Exception:  # e.g. tensors
        return False
