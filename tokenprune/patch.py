"""What one ``tokenprune.apply`` installs on a model, and where it keeps it.

Below :mod:`tokenprune.api` and the adapters: code that needs a model's installed patch (an adapter's
add-on such as LLaVA's cross-attention) reads it with :func:`get_patch` from here, not from ``api``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from .engine import Program, traced_scan_token
from .plan import Plan

PATCH_ATTR = "_tokenprune"
MODULE_ATTR = "tokenprune_params"  # where a reducer's learnable parameters (reducer.module) live on the model


class Patch:
    """Everything one ``apply`` call installed on a model (kept as a plain attribute, not a submodule)."""

    def __init__(self, model, adapter, reducer, budget: float, schedule: Mapping[int, int] | None,
                 track_source: bool):
        self.adapter = adapter
        self.reducer = reducer
        self.budget = budget
        self.schedule = dict(schedule) if schedule else None
        self.track_source = track_source
        self.info = replace(adapter.info(), inside_blocks=adapter.inside_blocks)
        self.num_prefix = self.info.num_prefix
        self._programs: dict[tuple, Program] = {}  # per (input tokens, grid); filled once per input size
        self.hooks_clean_at = None  # engine.check_no_hooks: the hook-handle count at the last scan that found none
        self.scan_token = None  # engine.traced_scan_token (adapters that write blocks out): set when installed

    def __setstate__(self, state):
        # unpickled (torch.load, deepcopy): the hook-handle count is another process's (or of the model as it was then),
        # so the copy scans for hooks again at its first forward, and registers for the scan at trace time
        self.__dict__.update(state)
        self.hooks_clean_at = None
        if self.__dict__.get("scan_token") is not None:
            self.scan_token = traced_scan_token(self)

    def plan_for(self, num_tokens: int | None = None, grid=None) -> Plan:
        return self.program_for(num_tokens, grid).plan

    def program_for(self, num_tokens: int | None = None, grid=None) -> Program:
        n = self.adapter.info().num_tokens if num_tokens is None else num_tokens  # the model's default input now
        if grid is None:
            grid = self.adapter.grid_for(n)
        key = (n, grid)
        prog = self._programs.get(key)
        if prog is None:  # a new input size: plan it (two threads may both do this; the results are equal)
            plan = self.reducer.plan(self.info.with_tokens(n, grid), self.budget, self.schedule)
            prog = Program.build(plan, self.reducer, getattr(self.adapter, "mid_block", False))
            self._programs[key] = prog
        return prog


# torch's wrappers that run their model as ``.module`` (matched by class, subclasses too, without importing them)
_DATA_PARALLEL = {("torch.nn.parallel.data_parallel", "DataParallel")}
_DISTRIBUTED = {("torch.nn.parallel.distributed", "DistributedDataParallel"),
                ("torch.distributed.fsdp.fully_sharded_data_parallel", "FullyShardedDataParallel")}


def _wrapper_kind(model) -> str | None:
    """``"dp"`` for ``torch.nn.DataParallel``, ``"distributed"`` for DDP / FSDP, else None."""
    names = {(c.__module__, c.__name__) for c in type(model).__mro__}
    if "module" not in getattr(model, "_modules", {}):
        return None
    return "dp" if names & _DATA_PARALLEL else "distributed" if names & _DISTRIBUTED else None


def _inner(model):
    """The module one wrapper layer runs: a ``torch.compile`` wrapper's (``OptimizedModule``; matched by name:
    importing ``torch._dynamo`` to check the type costs seconds), DataParallel's, DDP's or FSDP's; else None."""
    if type(model).__name__ == "OptimizedModule" and "_orig_mod" in getattr(model, "_modules", {}):
        return model._orig_mod
    return model.module if _wrapper_kind(model) is not None else None


def unwrap(model):
    """The module a ``torch.compile`` wrapper, ``torch.nn.DataParallel`` or ``DistributedDataParallel`` runs
    (through nested wrappers), which is what tokenprune patches; any other object as it is. DataParallel's
    per-device copies of the module keep its patched class and patch, and compute with their own weights."""
    while (inner := _inner(model)) is not None:
        model = inner
    return model


def check_wrapper_for_apply(model) -> None:
    """DDP / FSDP collect the model's parameters when they wrap it (and a reducer with learned parameters adds
    some at apply): tokenprune is applied to the model before it is wrapped."""
    while model is not None:
        if _wrapper_kind(model) == "distributed":
            name = type(model).__name__
            raise TypeError(
                f"tokenprune: apply tokenprune to the model before wrapping it in {name} "
                f"(tokenprune.apply(model, ...); model = {name}(model, ...)), not to the wrapper or its "
                f"model.module: {name} registers the model's parameters when it wraps it, and a reducer with learned "
                "parameters (threshold) adds some. tokenprune.remove, plan and features take the wrapper")
        model = _inner(model)


def get_patch(model) -> Patch | None:
    """The :class:`Patch` installed on ``model`` by ``tokenprune.apply``, or None."""
    return getattr(unwrap(model), "__dict__", {}).get(PATCH_ATTR)


def is_applied(model) -> bool:
    return get_patch(model) is not None
