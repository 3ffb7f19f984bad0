"""Compatibility shim for the scripts under ``scripts/`` and ``tests/test_gpu_kernels.py`` (its ``T``); nothing in
the package uses it.

The Triton kernels used to live in this one module. They are now split by op family: ``attention.py``,
``scores.py``, ``match.py``, ``merge.py``, ``keep.py``, ``apet.py``, ``pitome.py``, ``select.py``, with shared
helpers in ``_triton_common.py``. New code imports those modules. Here ``T.name`` reads ``name`` from the module
that defines it (for example ``T.EA_CONFIG``, ``T.merge_step``). ``T.name = value`` assigns it in that module too,
so that the scripts' ``T.MERGE_STEP_SPLIT = ...`` still changes what the launcher reads.
"""
import sys
import types

from . import _triton_common, apet, attention, keep, match, merge, pitome, scores, select

_FAMILIES = (attention, scores, match, merge, keep, apet, pitome, select, _triton_common)


def _owner(name: str):
    for mod in _FAMILIES:
        if name in vars(mod):
            return mod
    return None


class _Shim(types.ModuleType):
    def __getattr__(self, name):  # only names this module does not define itself
        mod = _owner(name)
        if mod is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        return getattr(mod, name)

    def __setattr__(self, name, value):
        mod = _owner(name)
        if mod is None:
            super().__setattr__(name, value)
        else:
            setattr(mod, name, value)


sys.modules[__name__].__class__ = _Shim
