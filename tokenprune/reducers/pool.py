"""Spatial pooling of the patch grid -- CrossLMM-style, parameter-free.

Yan et al. "CrossLMM: Decoupling Long Video Sequences from LMMs via Dual
Cross-Attention Mechanisms", 2025. https://arxiv.org/abs/2505.17020
(methods.md section 6). Also the "plain spatial downsampling" baseline every
benchmark must include.

The non-prefix tokens must form the patch grid the adapter reports
(``(h, w)`` for images, ``(t, h, w)`` for video: pooled per frame). They are
pooled once, after block ``block`` (default -1: before the first block, the
cheapest place) to an ``(h', w')`` grid:

- ``mode="avg"`` (default): output cell ``(i', j')`` is the size-weighted mean
  of the patches ``(i, j)`` with ``floor(i h' / h) = i'`` and
  ``floor(j w' / w) = j'`` -- a partition of the grid, equal to
  ``adaptive_avg_pool2d`` whenever ``h'`` divides ``h`` and ``w'`` divides ``w``;
- ``mode="bilinear"``: antialiased bilinear resampling of the grid
  (``F.interpolate``); sizes and the source map use the same partition.

Sizes = how many patches each cell holds (they sum to N), and the source map
sends every patch to its cell, so ``unmerge`` and size-weighted pooling work.

Budget: the exact ``round(budget * N)`` is generally not a product of two
grid sides. The pooled grid is the ``(h', w')`` with ``t h' w'`` NEAREST to
``round(budget * N)`` (ties: aspect ratio closest to the input's, then the
larger count); ``Plan.num_out`` is that real count. Give ``size=(h', w')`` to
choose the grid yourself.

:class:`GatedCrossAttention` is the trainable CrossLMM layer (pooled queries
attend to the original tokens, added back through a tanh gate initialised at
0, so it starts as the identity); it is not used by the reducer itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..plan import EncoderInfo, Plan, Stage, keep_count, validate
from ..registry import register
from ..state import TokenState
from .base import Reducer, set_groups


def pooled_grid(grid: tuple[int, ...], target: int) -> tuple[int, ...]:
    """The pooled grid whose token count is nearest ``target`` (frames kept, per-frame ``(h', w')``)."""
    *frames, h, w = grid
    t = math.prod(frames) if frames else 1
    best, best_key = None, None
    for hh in range(1, h + 1):
        for ww in range(1, w + 1):
            count = t * hh * ww
            key = (abs(count - target), abs(math.log((hh / ww) / (h / w))), -count)
            if best_key is None or key < best_key:
                best, best_key = (hh, ww), key
    return (*frames, *best)


def cell_index(grid: tuple[int, ...], out: tuple[int, ...], device=None) -> torch.Tensor:
    """``[N]`` long: the pooled cell (row-major over ``out``) of every patch of ``grid`` (row-major)."""
    *frames, h, w = grid
    hh, ww = out[-2], out[-1]
    t = math.prod(frames) if frames else 1
    rows = torch.arange(h, device=device) * hh // h
    cols = torch.arange(w, device=device) * ww // w
    cell = (rows[:, None] * ww + cols[None, :]).reshape(-1)  # [h*w]
    frame = torch.arange(t, device=device)[:, None] * (hh * ww)
    return (frame + cell[None, :]).reshape(-1)


@register("pool")
@dataclass
class Pool(Reducer):
    block: int = -1  # pool after this block (-1: before the first block)
    mode: str = "avg"  # "avg" or "bilinear"
    size: tuple[int, int] | None = None  # pooled (h', w') per frame; default: nearest to the budget

    needs_input_grid = True

    def __post_init__(self):
        if self.mode not in ("avg", "bilinear"):
            raise ValueError(f"mode must be 'avg' or 'bilinear', got {self.mode!r}")

    def check(self, info: EncoderInfo) -> None:
        if info.grid is None:
            raise ValueError("pool needs the patch grid of the input, and this model/input has none "
                             f"({info.num_tokens} tokens that the adapter cannot arrange in a grid); use a "
                             "grid-shaped input (e.g. a square image for a ViT) or another method")
        if math.prod(info.grid) != info.num_tokens:
            raise ValueError(f"pool: grid {info.grid} does not hold the {info.num_tokens} input tokens")
        if not -1 <= self.block < info.depth:
            raise ValueError(f"block {self.block} is outside -1..{info.depth - 1} (-1 = before the first block)")
        if self.size is not None:
            hh, ww = self.size
            if not (1 <= hh <= info.grid[-2] and 1 <= ww <= info.grid[-1]):
                raise ValueError(f"size {tuple(self.size)} must be between (1, 1) and the grid {info.grid[-2:]}")

    def out_grid(self, info: EncoderInfo, budget: float) -> tuple[int, ...]:
        if self.size is not None:
            return (*info.grid[:-2], int(self.size[0]), int(self.size[1]))
        return pooled_grid(info.grid, keep_count(budget, info.num_tokens))

    def plan(self, info: EncoderInfo, budget: float, overrides: Mapping[int, int] | None = None) -> Plan:
        self.check(info)
        if overrides:
            raise ValueError("pool takes no schedule= override; choose block= and size=(h, w)")
        out = self.out_grid(info, budget)
        count = math.prod(out)
        stages = [Stage(self.block, count, self.name)] if count < info.num_tokens else []
        validate(stages, info)
        return Plan(self.name, budget, info, stages)

    def reduce(self, state: TokenState, stage: Stage, qk) -> TokenState:
        grid = state.grid
        p, n = state.num_prefix, state.num_tokens
        if grid is None or math.prod(grid) != n:
            raise ValueError("pool: the tokens no longer form the patch grid at this block; put pool first "
                             "(block=-1 or before any other reducer)")
        out = pooled_grid(grid, stage.keep) if self.size is None else (*grid[:-2], *self.size)
        x = state.x
        b, _, c = x.shape
        cells = math.prod(out)
        idx = cell_index(grid, out, x.device).expand(b, n)
        sizes = state.sizes_or_ones()
        # sums in float32 (fp16 / bf16 atomics round every add, in whatever order the GPU runs them: two calls
        # differed by 1.5e-3 on a fp16 ViT-B), one rounding to the token dtype at the end
        wide = torch.promote_types(x.dtype, torch.float32)
        s = sizes[:, p:].to(wide)
        den = torch.zeros(b, cells, dtype=wide, device=x.device).scatter_add_(1, idx, s)
        if self.mode == "avg":
            num = torch.zeros(b, cells, c, dtype=wide, device=x.device).scatter_add_(
                1, idx[..., None].expand(b, n, c), x[:, p:].to(wide) * s[..., None])
            pooled = (num / den.clamp_min(1e-12)[..., None]).to(x.dtype)
        else:
            *frames, h, w = grid
            t = math.prod(frames) if frames else 1
            img = x[:, p:].reshape(b * t, h, w, c).permute(0, 3, 1, 2)
            pooled = F.interpolate(img, size=tuple(out[-2:]), mode="bilinear", align_corners=False,
                                   antialias=True)
            pooled = pooled.permute(0, 2, 3, 1).reshape(b, cells, c)
        state = set_groups(state, pooled, sizes, den, idx)
        state.grid = tuple(out)
        return state


class GatedCrossAttention(nn.Module):
    """CrossLMM's visual-to-visual layer: pooled tokens (queries) attend to the original tokens,
    ``q + tanh(gate) * proj(attn(norm(q), norm(ctx)))``, with ``gate`` initialised at 0 (identity at start).

    ``forward(queries [B, M, C], context [B, N, C_ctx], context_sizes [B, N] | None)``: ``context_sizes``
    weights keys by size (log-size bias) and masks size-0 padding. Runs on fused SDPA.
    """

    def __init__(self, dim: int, num_heads: int = 8, context_dim: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        context_dim = dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(context_dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, queries: torch.Tensor, context: torch.Tensor,
                context_sizes: torch.Tensor | None = None) -> torch.Tensor:
        b, m, c = queries.shape
        n = context.shape[1]
        h = self.num_heads
        q = self.q(self.norm_q(queries)).reshape(b, m, h, c // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(context)).reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
        bias = None
        if context_sizes is not None:
            bias = context_sizes.to(q.dtype).log()[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        o = self.proj(o.transpose(1, 2).reshape(b, m, c))
        return queries + torch.tanh(self.gate) * o
