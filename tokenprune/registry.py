"""Name -> reducer class. Reducers register themselves with :func:`register`.

This module imports nothing from tokenprune: the reducers import it, and ``tokenprune.api`` imports
``tokenprune.reducers`` once, which registers the built-in ones (importing any part of tokenprune
runs the package ``__init__``, which imports ``api``)."""
from __future__ import annotations

import dataclasses

_REDUCERS: dict[str, type] = {}


def register(name: str):
    def deco(cls):
        if name in _REDUCERS and _REDUCERS[name] is not cls:
            raise ValueError(f"a reducer named {name!r} is already registered")
        cls.name = name
        _REDUCERS[name] = cls
        return cls
    return deco


def methods() -> list[str]:
    """Names of the registered reducers."""
    return sorted(_REDUCERS)


def get(name: str) -> type:
    known = methods()
    if not isinstance(name, str) or name not in _REDUCERS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(known)}")
    return _REDUCERS[name]


def make(name, **options):
    if isinstance(name, (list, tuple)):  # a composition: method=["cls", "merge"] -> the "pipeline" reducer
        return make("pipeline", reducers=list(name), **options)
    cls = get(name)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"method {name!r} has no option(s) {', '.join(unknown)}; "
                        f"its options are: {', '.join(sorted(fields)) or '(none)'}")
    return cls(**options)
