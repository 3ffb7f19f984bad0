"""Composition: several reducers, one after another, each in its own range of blocks.

    tokenprune.apply(model, budget=0.25, method=["cls", "merge"])
    tokenprune.apply(model, budget=0.25, method=[("pool", {}), ("merge", {"prop_attn": False})],
                     ranges=[(0, 1), (1, 12)], split=[0.3, 0.7])

Block ranges: reducer i owns the blocks ``ranges[i] = (start, stop)`` (after
which it may act; -1 = "before block 0" belongs to the first reducer);
by default the encoder's blocks are cut into ``len(reducers)`` equal,
consecutive ranges. Each reducer plans on its range as if it were a whole
encoder of ``stop - start`` blocks (its ``layers`` options are relative to
its range) starting from the tokens the previous reducers left.

Budget split (geometric): reducer i gets the fraction
``budget ** split[i]`` of the tokens it receives, with ``split`` summing to 1
(default: equal, so each of n reducers gets ``budget ** (1/n)``). Counts are
``round(N * budget ** (split[0] + ... + split[i]))``, and the last reducer
ends exactly at ``round(budget * N)`` -- except after a reducer that can only
hit the budget approximately (``pool``), whose real count the next one starts
from. ``schedule=`` overrides are not supported: set each reducer's own options.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from torch import nn

from .. import registry
from ..plan import EncoderInfo, Plan, Stage, check_budget, keep_count, validate
from .base import Reducer


@registry.register("pipeline")
@dataclass
class Pipeline(Reducer):
    reducers: list = field(default_factory=list)  # names, (name, options) pairs, or Reducer instances
    ranges: list | None = None  # [(start, stop)] block range of each reducer (default: equal cuts)
    split: list[float] | None = None  # share of the budget (in log space) of each reducer (default: equal)

    def __post_init__(self):
        subs = []
        for r in self.reducers:
            if isinstance(r, Reducer):
                registry.check_option_types(type(r), {f.name: getattr(r, f.name) for f in fields(r) if f.init})
                subs.append(r)
            elif isinstance(r, str):
                subs.append(registry.make(r))
            elif isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str) and isinstance(r[1], dict):
                subs.append(registry.make(r[0], **r[1]))
            else:
                raise TypeError(f"pipeline entries must be method names, (name, options) pairs or reducers; "
                                f"got {r!r}")
        if len(subs) < 1:
            raise ValueError("a pipeline needs at least one reducer, e.g. method=['cls', 'merge']")
        if any(isinstance(s, Pipeline) for s in subs):
            raise ValueError("pipelines cannot be nested; list all reducers in one pipeline")
        late = [i for i, s in enumerate(subs) if i > 0 and s.needs_input_grid]
        if late:
            i, names = late[0], [s.name for s in subs]
            first = [names[i], *names[:i], *names[i + 1:]]
            raise ValueError(f"{names[i]} must be the first reducer in a composition: it needs the untouched patch "
                             f"grid, which the reducers before it change; e.g. method={first!r}")
        self.subs: list[Reducer] = subs
        if self.split is not None:
            if len(self.split) != len(subs) or any(not w >= 0 for w in self.split) or not sum(self.split) > 0:
                raise ValueError(f"split must give one non-negative weight per reducer ({len(subs)}), "
                                 f"not all zero; got {self.split!r}")
        if self.ranges is not None and len(self.ranges) != len(subs):
            raise ValueError(f"ranges must give one (start, stop) per reducer ({len(subs)}); got {self.ranges!r}")
        self.uses_attention_kernel = any(getattr(s, "uses_attention_kernel", False) for s in subs)
        self._plans: dict = {}
        self._module = None

    @property
    def proportional(self) -> bool:
        return all(s.proportional for s in self.subs)

    @property
    def module(self):
        """Learnable parameters of the sub-reducers (e.g. thresholds), registered by ``apply``."""
        mods = [(i, s.module) for i, s in enumerate(self.subs) if getattr(s, "module", None) is not None]
        if not mods:
            return None
        if len(mods) == 1:
            return mods[0][1]
        if self._module is None:
            self._module = nn.ModuleDict({f"{i}_{self.subs[i].name}": m for i, m in mods})
        return self._module

    # -- planning -----------------------------------------------------------------------
    def block_ranges(self, depth: int) -> list[tuple[int, int]]:
        n = len(self.subs)
        if self.ranges is None:
            if depth < n:
                raise ValueError(f"{n} reducers need at least {n} blocks; the encoder has {depth}")
            cuts = [round(depth * i / n) for i in range(n + 1)]
            return [(cuts[i], cuts[i + 1]) for i in range(n)]
        out = [(int(a), int(b)) for a, b in self.ranges]
        prev = 0
        for a, b in out:
            if not (prev <= a < b <= depth):
                raise ValueError(f"ranges {self.ranges!r} must be consecutive, non-overlapping (start, stop) "
                                 f"pairs within 0..{depth}")
            prev = b
        return out

    def plan(self, info: EncoderInfo, budget: float, overrides=None) -> Plan:
        if overrides:
            raise ValueError("schedule= overrides are not supported for a pipeline; set each reducer's options")
        check_budget(budget)
        self._depth = info.depth
        key = (info, float(budget))
        if key in self._plans:
            return self._plans[key][0]
        keep = keep_count(budget, info.num_tokens)
        weights = self.split or [1.0] * len(self.subs)
        total = sum(weights)
        ranges = self.block_ranges(info.depth)
        stages, subplans = [], []
        n, grid, acc = info.num_tokens, info.grid, 0.0
        for i, (sub, (a, b)) in enumerate(zip(self.subs, ranges)):
            acc += weights[i] / total
            last = i == len(self.subs) - 1
            target = keep if last else max(keep, math.floor(info.num_tokens * budget ** acc + 0.5))
            target = min(target, n)
            sub_info = replace(info, depth=b - a, num_tokens=n, grid=grid)
            sub_plan = sub.plan(sub_info, target / n)
            subplans.append((a, sub_plan))
            for s in sub_plan.stages:
                stages.append(Stage(s.block + a, s.keep, f"{i}.{sub.name}", s.attention, owner=i, mid=s.mid))
            if sub_plan.num_out != n:
                grid = None
            n = sub_plan.num_out
        validate(stages, info)
        plan = Plan(self.name, budget, info, stages)
        self._plans[key] = (plan, subplans)
        return plan

    def _subplans(self, plan: Plan):
        self.plan(plan.info, plan.budget)  # cached
        return self._plans[(plan.info, float(plan.budget))][1]

    # -- running ------------------------------------------------------------------------
    def qk_blocks(self, plan):
        out = set()
        for sub, (a, sub_plan) in zip(self.subs, self._subplans(plan)):
            out |= {blk + a for blk in sub.qk_blocks(sub_plan)}
        return out

    def observe(self, state, block, qk):
        depth = self._depth
        for sub, (a, b) in zip(self.subs, self.block_ranges(depth)):
            if a <= block < b:
                sub.observe(state, block - a, qk)

    def reduce(self, state, stage, qk):
        sub = self.subs[stage.owner]
        a = self.block_ranges(self._depth)[stage.owner][0]
        return sub.reduce(state, Stage(stage.block - a, stage.keep, sub.name, stage.attention, mid=stage.mid), qk)

    def attention_kernel(self, path):
        for sub in self.subs:  # a path is named by the one reducer that sets it (maelre's "linear")
            kernel = sub.attention_kernel(path)
            if kernel is not None:
                return kernel
        return None
