"""Name -> reducer class. Reducers register themselves with :func:`register`.

This module imports nothing from tokenprune at import time: the reducers import it. The built-in
reducers register themselves when ``tokenprune.reducers`` is imported, which ``tokenprune.api`` does,
and so does the first lookup here (:func:`methods`, :func:`get`): the package imports lazily, so
code that starts with ``tokenprune.recipes`` or this module would otherwise find no methods.

:func:`make` checks options before the reducer exists: unknown names, and values that do not have
the type the reducer's dataclass field declares (``layers: list[int] | None`` takes a list or tuple
of integers or None). What a type cannot say (ranges, choices) the reducer checks itself, in
``__post_init__`` or, against the encoder, in ``check`` -- both run inside ``tokenprune.apply``.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import numbers
import types
import typing

_REDUCERS: dict[str, type] = {}


def register(name: str):
    def deco(cls):
        if name in _REDUCERS and _REDUCERS[name] is not cls:
            raise ValueError(f"a reducer named {name!r} is already registered")
        cls.name = name
        _REDUCERS[name] = cls
        return cls
    return deco


def _load_builtins() -> None:
    importlib.import_module(f"{__package__}.reducers")  # registers the built-in reducers (once)


def methods() -> list[str]:
    """Names of the registered reducers."""
    _load_builtins()
    return sorted(_REDUCERS)


def get(name: str) -> type:
    known = methods()
    if not isinstance(name, str) or name not in _REDUCERS:
        raise ValueError(f"unknown method {name!r}; {_did_you_mean(name, known)}known methods: {', '.join(known)}")
    return _REDUCERS[name]


# papers' names of the built-in methods (docs/methods.md), for the hint in an unknown-method error
_PAPER_NAMES = {"tome": "merge", "fastervlm": "cls", "vtc-cls": "cls", "divprune": "diverse", "crosslmm": "pool",
                "asvit": "threshold", "as-vit": "threshold"}


def _did_you_mean(name, known) -> str:
    """``"did you mean 'merge'? "`` for a near miss of one of ``known`` (case ignored), else ``""``."""
    if not isinstance(name, str):
        return ""
    alias = _PAPER_NAMES.get(name.lower().replace("_", "-"))
    if alias in known:
        return f"did you mean {alias!r}? "
    lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower(), list(lower), n=1, cutoff=0.7)
    return f"did you mean {lower[close[0]]!r}? " if close else ""


def make(name, **options):
    if isinstance(name, (list, tuple)):  # a composition: method=["cls", "merge"] -> the "pipeline" reducer
        return make("pipeline", reducers=list(name), **options)
    cls = get(name)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"method {name!r} has no option(s) {', '.join(unknown)}; {_did_you_mean(unknown[0], fields)}"
                        f"its options are: {', '.join(sorted(fields)) or '(none)'}")
    check_option_types(cls, options)
    return cls(**options)


def check_option_types(cls: type, options: typing.Mapping) -> None:
    """A TypeError naming the option, its value and the type its field declares, for the first value
    of ``options`` that does not have it."""
    hints = typing.get_type_hints(cls)
    for key, value in options.items():
        hint = hints.get(key)
        if hint is not None and not _fits(value, hint):
            raise TypeError(f"method {cls.name!r}: option {key}={value!r} must be {_describe(hint)}")
        if any(isinstance(v, numbers.Real) and math.isnan(v)  # a NaN from a config would pass every comparison
               for v in (value if isinstance(value, (list, tuple)) else [value])):
            raise ValueError(f"method {cls.name!r}: option {key}={value!r} is NaN; give a number")


def _fits(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple, range)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    return True  # other annotations are the reducer's to check


_NOUNS = {type(None): ("None", "None"), bool: ("True or False", "booleans"), int: ("an integer", "integers"),
          float: ("a number", "numbers"), str: ("a string", "strings")}


def _describe(hint, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in args)
    if origin in (list, tuple) and args:
        if origin is tuple and args[-1] is not Ellipsis and len(set(args)) == 1:
            return f"a list of {len(args)} {_describe(args[0], True)}"
        if origin is tuple and args[-1] is not Ellipsis:
            return f"a list ({', '.join(_describe(a) for a in args)})"
        return f"a list of {_describe(args[0], True)}"
    if hint in (list, tuple):
        return "lists" if plural else "a list"
    noun = _NOUNS.get(hint)
    return noun[plural] if noun else getattr(hint, "__name__", str(hint))
