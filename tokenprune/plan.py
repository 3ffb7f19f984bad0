"""Budgets, per-block schedules and the FLOP fraction a schedule implies.

``budget`` has one meaning everywhere in tokenprune:

    the fraction of the input's non-prefix tokens kept (that leave the encoder).

Prefix tokens ([CLS], distillation and register tokens) are never removed and
are not counted. For an input with ``N`` non-prefix tokens the encoder emits

    K = round_half_up(budget * N)      (at least 1; an error if that is 0)

non-prefix tokens. Each reducer turns ``K`` into a per-block schedule: after
which blocks it reduces and how many non-prefix tokens remain after each of
those blocks. The schedule is a :class:`Plan`; it is inspectable
(``tokenprune.plan(model)``) and overridable (``schedule={block: keep}``).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Mapping, Sequence


@dataclass(frozen=True)
class EncoderInfo:
    """What a reducer may know about an encoder: no model library types here."""

    depth: int  # number of blocks
    dim: int  # embedding width D
    num_heads: int
    num_prefix: int  # tokens before the patches that are never reduced
    num_tokens: int  # non-prefix tokens at the encoder input (N)
    mlp_hidden: int  # hidden width of each block's MLP
    grid: tuple[int, ...] | None = None  # patch grid of the N tokens, if they form one
    has_cls: bool = True  # whether token 0 is a class token whose attention is meaningful
    family: str = ""
    # the model reduces inside its blocks (between attention and MLP) on every input it takes: where a reducer's
    # placement "auto" (pitome's default) puts its stages; else after the blocks
    inside_blocks: bool = False

    def with_tokens(self, num_tokens: int, grid: tuple[int, ...] | None) -> "EncoderInfo":
        return dataclasses.replace(self, num_tokens=num_tokens, grid=grid)


@dataclass(frozen=True)
class Stage:
    """One reduction: after block ``block`` (``mid``: between that block's attention and its MLP),
    ``keep`` non-prefix tokens remain."""

    block: int
    keep: int
    op: str = ""  # name of the reducer that performs it, for display ("0.cls" in a composition)
    attention: str = "sdpa"  # attention path of the blocks that follow ("sdpa" or "linear")
    owner: int | None = None  # in a composition: the index of the reducer that performs it
    mid: bool = False  # performed inside block ``block``, after its attention, before its MLP (ToMe's placement)


def keep_count(budget: float, num_tokens: int) -> int:
    """The number of non-prefix tokens that leave the encoder for ``budget``.

    Rounding rule: round half up, ``floor(budget * N + 0.5)``. Raises if that
    keeps no token at all.
    """
    check_budget(budget)
    k = math.floor(budget * num_tokens + 0.5)
    if k < 1:
        raise ValueError(
            f"budget={budget} keeps {budget * num_tokens:.3g} of {num_tokens} tokens, which rounds to 0; "
            f"the smallest budget that keeps one token per sample is {0.5 / num_tokens:.4g}")
    return min(k, num_tokens)


def check_budget(budget) -> float:
    """``budget`` as a float, after checking it is a real number in (0, 1].

    Any real number type is accepted: ``int``, ``float``, ``fractions.Fraction``,
    numpy scalars and 0-d arrays, 0-d torch tensors. Raises ``TypeError`` for
    what is not a real number (``bool`` included) and ``ValueError`` for NaN
    and values outside (0, 1].
    """
    value = _real(budget)
    if value is None:
        raise TypeError(f"budget must be a number in (0, 1], got {budget!r}")
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise ValueError(
            "budget must be in (0, 1]: the fraction of the input's non-prefix tokens kept (that leave the "
            f"encoder); got {value:g}")
    return value


def _real(x) -> float | None:
    """``float(x)`` for a real number (numpy scalars and 0-d arrays/tensors included); ``None`` otherwise."""
    dtype = str(getattr(x, "dtype", "")).lower()
    if isinstance(x, bool) or dtype.endswith("bool") or "complex" in dtype:
        return None
    if isinstance(x, numbers.Real):  # int, float, Fraction, numpy integer/floating scalars
        return float(x)
    if dtype and getattr(x, "ndim", None) == 0:  # 0-d numpy array or torch tensor
        try:
            return float(x)
        except (TypeError, ValueError):
            return None
    return None


def block_flops(n: int, info: EncoderInfo, attention: str = "sdpa") -> float:
    """Multiply-add FLOPs (x2) of one transformer block on ``n`` tokens (prefix included)."""
    d, h = info.dim, info.mlp_hidden
    linear = 2 * n * (4 * d * d + 2 * d * h)  # qkv + proj + mlp
    if attention == "linear":  # softmax-feature factorisation: K^T V and Q (K^T V), O(n d_head^2) per head
        head = d // info.num_heads
        attn = 2 * 2 * n * head * d
    else:
        attn = 2 * 2 * n * n * d  # q k^T and attn @ v
    return float(linear + attn)


@dataclass
class Plan:
    """A per-block schedule for one input size."""

    method: str
    budget: float
    info: EncoderInfo
    stages: list[Stage] = field(default_factory=list)

    @property
    def num_out(self) -> int:
        """Non-prefix tokens leaving the encoder."""
        return self.stages[-1].keep if self.stages else self.info.num_tokens

    def stage_at(self) -> dict[int, list[Stage]]:
        out: dict[int, list[Stage]] = {}
        for s in self.stages:
            out.setdefault(s.block, []).append(s)
        return out

    def _per_block(self, start, after_stage) -> list:
        """What holds at the input of each block: ``start``, then ``after_stage(s)`` of the last stage
        ``s`` before it (stages after block -1, e.g. pooling the patch grid, come before block 0)."""
        value, at, out = start, self.stage_at(), []
        for s in at.get(-1, []):
            value = after_stage(s)
        for i in range(self.info.depth):
            out.append(value)
            for s in at.get(i, []):
                value = after_stage(s)
        return out

    def tokens_per_block(self) -> list[int]:
        """Non-prefix tokens entering each block."""
        return self._per_block(self.info.num_tokens, lambda s: s.keep)

    def attention_per_block(self) -> list[str]:
        """Attention path ("sdpa" or "linear") of each block."""
        return self._per_block("sdpa", lambda s: s.attention)

    def flops(self) -> float:
        p, d, h = self.info.num_prefix, self.info.dim, self.info.mlp_hidden
        total = sum(block_flops(n + p, self.info, a)
                    for n, a in zip(self.tokens_per_block(), self.attention_per_block()))
        n = self.info.num_tokens
        for s in self.stages:  # a stage inside a block: that block's MLP already runs on the fewer tokens
            if s.mid:
                total -= 2 * (n - s.keep) * 2 * d * h
            n = s.keep
        return float(total)

    def flops_unreduced(self) -> float:
        return self.info.depth * block_flops(self.info.num_tokens + self.info.num_prefix, self.info)

    @property
    def flop_ratio(self) -> float:
        """FLOPs of the encoder blocks under this plan over the unreduced blocks.

        Counts the blocks' matrix products (the reducers' own scoring and the
        patch embedding are not included). ``1 / flop_ratio`` bounds the
        speed-up a perfect implementation could reach on compute-bound work.
        """
        return self.flops() / self.flops_unreduced()

    def summary(self) -> str:
        lines = [f"method={self.method} budget={self.budget} tokens in={self.info.num_tokens} "
                 f"out={self.num_out} (+{self.info.num_prefix} prefix) FLOP ratio={self.flop_ratio:.3f}"]
        for s in self.stages:
            where = "inside block" if s.mid else " after block"
            lines.append(f" {where} {s.block:>2}: keep {s.keep:>5}  [{s.op}; next blocks: {s.attention}]")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"method": self.method, "budget": self.budget, "num_in": self.info.num_tokens,
                "num_out": self.num_out, "num_prefix": self.info.num_prefix, "flop_ratio": self.flop_ratio,
                "tokens_per_block": self.tokens_per_block(), "attention_per_block": self.attention_per_block(),
                "stages": [s.__dict__ for s in self.stages]}


def spread_schedule(num_tokens: int, keep: int, blocks: Sequence[int], *, max_fraction: float = 1.0,
                    geometric: bool = False, every_block: bool = False) -> list[tuple[int, int]]:
    """Split the removal of ``num_tokens - keep`` tokens over ``blocks``.

    ``geometric``: the same keep *ratio* at every block (EViT-style);
    otherwise the same *count* r at every block (ToMe-style), front-loaded
    where the per-block cap ``max_fraction * n`` forces it. Returns
    ``[(block, keep_after)]`` for the blocks that remove at least one token,
    ending exactly at ``keep``; with ``geometric`` and ``every_block``, for
    every block (a block that removes nothing keeps the count it gets).
    """
    blocks = list(blocks)
    if not blocks or (keep >= num_tokens and not (geometric and every_block)):
        return []
    n = num_tokens
    out: list[tuple[int, int]] = []
    if geometric:
        ratio = (keep / num_tokens) ** (1.0 / len(blocks))
        for j, b in enumerate(blocks):
            target = keep if j == len(blocks) - 1 else max(keep, math.floor(num_tokens * ratio ** (j + 1) + 0.5))
            if target < n or every_block:
                n = min(n, target)
                out.append((b, n))
        return out
    remaining = n - keep
    for j, b in enumerate(blocks):
        left = len(blocks) - j
        cap = math.floor(n * max_fraction)
        # remove at least what the later, smaller steps cannot: front-load when the cap binds
        must = n - _max_start(keep, left - 1, max_fraction)
        r = min(cap, max(math.ceil(remaining / left), must), remaining)
        if r > 0:
            n -= r
            remaining -= r
            out.append((b, n))
    if remaining > 0:
        raise ValueError(
            f"cannot reduce {num_tokens} tokens to {keep} in {len(blocks)} steps (after blocks {blocks}) of at "
            f"most {max_fraction:.0%} each; give more reduction blocks (layers=) or a larger budget")
    return out


def _max_start(keep: int, steps: int, max_fraction: float) -> int:
    """The largest token count that ``steps`` reductions of at most ``max_fraction`` each bring to ``keep``."""
    if max_fraction >= 1.0:
        return 1 << 62
    n = keep
    for _ in range(steps):
        m = math.floor(n / (1.0 - max_fraction)) + 2
        while m - math.floor(m * max_fraction) > n:
            m -= 1
        n = m
    return n


def check_schedule(schedule) -> dict[int, int] | None:
    """``schedule`` as ``{block: keep}`` with int keys and values, after checking its types.

    Raises ``TypeError`` for what is not a mapping of whole numbers (a float keep count such as 6.7
    or 60.0, a string, a bool): keep counts are numbers of tokens, nothing is rounded or parsed; and
    ``ValueError`` for a keep count below 1.
    """
    if schedule is None:
        return None
    if not isinstance(schedule, Mapping):
        raise TypeError(f"schedule must be a dict {{block: keep}} (non-prefix tokens left after that block), "
                        f"got {type(schedule).__name__} {schedule!r:.80}")
    out = {}
    for b, k in schedule.items():
        for what, v in (("block", b), ("keep count", k)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"schedule {what}s must be whole numbers (int), got {v!r} ({type(v).__name__}) in "
                                f"schedule={{{b!r}: {k!r}}}; keep counts are numbers of non-prefix tokens, e.g. "
                                f"{{2: 100, 5: 40}}")
        if k < 1:
            raise ValueError(f"schedule keep counts must be at least 1 (non-prefix tokens left after that block), got "
                             f"{k} after block {b} in schedule={schedule!r}")
        out[int(b)] = int(k)
    return out


def schedule_budget(schedule: Mapping[int, int], num_tokens: int) -> float:
    """The budget a schedule implies for an input of ``num_tokens`` non-prefix tokens: its last keep / N."""
    if not schedule:
        raise ValueError("schedule is empty; give {block: keep} or leave schedule= out")
    return schedule[max(schedule)] / num_tokens


def apply_overrides(stages: list[Stage], overrides: Mapping[int, int] | None, info: EncoderInfo,
                    op: str, before_first: bool = False) -> list[Stage]:
    """Replace a reducer's default schedule by ``{block: keep}`` from the user. ``before_first``: the reducer
    needs no attention, so block -1 (before the first block) is allowed, as in its ``layers=``."""
    if not overrides:
        return stages
    out = []
    lowest = -1 if before_first else 0
    for b, k in sorted(overrides.items()):
        b, k = int(b), int(k)
        if not lowest <= b < info.depth:
            if b == -1:
                raise ValueError(f"schedule block -1 (before the first block) is not possible for {op}: it scores "
                                 f"tokens with a block's attention; the first stage can follow block 0")
            where = " (-1 = before the first block)" if before_first else ""
            raise ValueError(f"schedule block {b} is outside the encoder's blocks {lowest}..{info.depth - 1}{where}")
        out.append(Stage(b, k, op))
    return out


def validate(stages: Sequence[Stage], info: EncoderInfo) -> None:
    n = info.num_tokens
    last_block = -2
    for s in stages:
        if s.block < -1 or s.block >= info.depth:
            raise ValueError(f"stage after block {s.block} is outside the encoder's blocks 0..{info.depth - 1}")
        if s.block < last_block:
            raise ValueError("schedule stages must be in block order")
        if s.keep < 1:
            raise ValueError(f"stage after block {s.block} keeps {s.keep} tokens; at least 1 must remain")
        if s.keep > n:
            raise ValueError(f"stage after block {s.block} keeps {s.keep} tokens but only {n} are there")
        n, last_block = s.keep, s.block
