"""tokenprune: token reduction between transformer encoder blocks, on the models you already use.

    import tokenprune
    tokenprune.apply(model, budget=0.75, method="merge")   # keep 75% of the non-prefix tokens
    tokenprune.plan(model)                                  # per-block schedule and FLOP ratio
    tokenprune.remove(model)                                # exact restore

``budget`` is the fraction of the input's non-prefix tokens kept (that leave the encoder).

The public names are loaded on first use (PEP 562 ``__getattr__``), so ``import tokenprune``
and the ``tokenprune`` command's argument parsing (``--help``) do not import torch.
``tokenprune.plan`` is the function :func:`tokenprune.api.plan`; the submodule of the same name
is ``sys.modules["tokenprune.plan"]`` (``from tokenprune.plan import Plan`` works as usual).
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "apply": "api", "remove": "api", "applied": "api", "features": "api", "plan": "api", "methods": "api",
    "is_applied": "api", "get_patch": "api",
    "unmerge": "ops",
    "Plan": "plan", "Stage": "plan", "keep_count": "plan",
    "TokenState": "state",
    "fast_patch_embed": "stem",
}
__all__ = ["apply", "remove", "applied", "features", "plan", "methods", "is_applied", "get_patch", "unmerge",
           "Plan", "Stage", "TokenState", "keep_count", "fast_patch_embed", "__version__"]


def __getattr__(name: str):
    source = _EXPORTS.get(name)
    if source is None:  # AttributeError lets `from tokenprune import <submodule>` import the submodule
        raise AttributeError(f"module 'tokenprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{source}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module: importing the submodule ``tokenprune.plan`` does not rebind the
    attribute ``tokenprune.plan``, which stays the function ``plan(model, ...)``."""

    def __setattr__(self, name, value):
        if name == "plan" and isinstance(value, types.ModuleType):
            return  # the import system binds each new submodule on its package; this one keeps the function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
