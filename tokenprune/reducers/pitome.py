"""Energy-protected merging -- after PiToMe.

Tran, Nguyen, Nguyen, Nguyen, Le, Xie, Sonntag, Zou, Nguyen, Niepert. "Accelerating Transformers with
Spectrum-Preserving Token Merging." NeurIPS 2024. https://arxiv.org/abs/2405.16148

ToMe matches a fixed half of the tokens (every other one) against the other half, so an informative
token that happens to sit in set A can be merged away when its best partner is only mildly similar.
PiToMe first scores every token by an *energy*: how much of the image looks like it,

    c_ij = cos(m_i, m_j)                          m = the block's keys, averaged over heads
    f(c) = c                   if c >= margin      (close neighbours count fully)
           exp(c - margin) - 1  otherwise           (far tokens count slightly negative)
    E_i  = mean_{j != i} f(c_ij)

A high energy means the token lies in a large group of similar ones (background, texture): merging it
loses little. To remove ``r`` tokens, the ``2 r`` highest-energy tokens are the candidates, split
alternately by energy rank into A and B; each A token merges into its most similar B token
(size-weighted average, sizes add up, proportional attention afterwards as in ``merge``); every other
token -- the low-energy, isolated, informative ones -- is protected and kept as it is.

tokenprune's choices (ours, not the paper's exact settings): the margin falls linearly with depth,
``margin = margin_start * (1 - block / depth)`` (later blocks have more similar tokens, so a lower
margin keeps the energies spread); the merge placement and schedule are ``merge``'s; the default
``placement="auto"`` is ToMe's (``"attn"``: inside every block, between attention and MLP) where the model's
adapter can do it for every input (``EncoderInfo.inside_blocks``: timm ViT / Eva, open_clip, HF DINOv3), else
``"block"`` (after the block; every other family, and timm NaFlexVit, whose batches may mix grids). Output
order: prefix, protected tokens in spatial order, the candidates that were not merged (only with
``candidates > 2``; none when every token is a candidate) in spatial order, then the B tokens by energy
rank. Padding slots (size 0) get the highest energy, so they are merged first.

How it runs: ``kernels.pitome_order`` computes the energies and the step's row order (prefix, protected,
then A, B, A, B, ...); ToMe's merge step (``ops.bipartite_merge`` with ``order``) then merges the
candidates, keeping the protected tokens like the prefix. On CUDA these are one launch each (two for the
merge from batch 32): the energy kernel never stores the ``[N, N]`` cosine matrix (``N^2 d`` multiply-adds
per sample, 4 times ToMe's matching, on the tensor cores in the keys' dtype), and the merge kernels read
the rows through the order, so nothing is permuted in memory and the block's last residual add is left to
them as in ``merge``. The energy's reference (the equation above, float32) is
``kernels.reference.pitome_energy``. No host sync, no data-dependent Python: it compiles with
``fullgraph=True``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import kernels
from ..ops import bipartite_merge
from ..plan import EncoderInfo, Stage, spread_schedule
from ..registry import register
from .base import Reducer, check_layers, default_blocks


def energy(metric: torch.Tensor, margin: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """PiToMe's energy ``E_i`` ``[B, N]`` (float32) of features ``metric`` ``[B, N, d]`` (see the module docstring;
    ``valid`` False: padding, energy ``+inf``): the step's own computation, ``kernels.pitome_order``."""
    sizes = None if valid is None else valid.to(torch.float32)
    return kernels.pitome_order(metric, sizes, 0, 0, margin, valid is not None)[0]


def protected_merge(state, metric: torch.Tensor, r: int, margin: float, candidates: float = 2.0):
    """Remove ``r`` non-prefix tokens: the ``c = candidates * r`` highest-energy ones split into A (even energy
    rank) and B (odd); the ``r`` A tokens with the most similar B partner merge into it (with ``c = 2 r``, as
    PiToMe does, every A token); the rest are kept unchanged.

    Two steps, each one launch on CUDA: ``kernels.pitome_order`` scores and ranks the tokens and writes the
    order [prefix, protected, A0, B0, A1, B1, ...]; ToMe's merge step (``ops.bipartite_merge``) then runs on
    the tokens in that order with the protected ones kept like the prefix (its kernels read the rows through
    the order; on CPU the rows are permuted). ``metric``: ``[B, P + N, d]``, or the block's keys ``[B, H, P + N, d]``,
    averaged over heads (the kernels average them as they load them)."""
    p, n = state.num_prefix, state.num_tokens
    if r <= 0:
        return state.materialize()
    if 2 * r > n:
        raise ValueError(f"pitome removes at most half the tokens per step ({n // 2} of {n}), asked for {r}")
    cand = min(n, max(2 * r, math.ceil(min(candidates * r, n))))
    _, order = kernels.pitome_order(metric, state.sizes, p, cand, margin, state.padded)
    return bipartite_merge(state, metric, r, order=order, protect=n - cand)


@register("pitome")
@dataclass
class PiToMe(Reducer):
    fuses_residual = True  # ops.bipartite_merge adds state.residual (in the merge kernels on CUDA)
    wants_key_mean = True  # energies and matching both on the keys' head mean

    prop_attn: bool = True  # proportional attention (log-size key bias)
    margin: float = 0.9  # energy margin at block 0 (falls linearly to 0 at the last block)
    start: int = 0  # first block that merges
    layers: list[int] | None = None  # merge only in/after these blocks (default: every block from `start`)
    # "attn": between attention and MLP (ToMe's); "block": after the block; "auto": "attn" where the model can (timm
    # ViT / Eva, open_clip, HF DINOv3: EncoderInfo.inside_blocks), "block" elsewhere
    placement: str = "auto"
    candidates: float = 2.0  # merge candidates per step, in units of r (2: PiToMe; larger: ToMe's best-r rule
    #                          among them; float("inf"): every token is a candidate, split by energy rank)

    def __post_init__(self):
        if self.placement not in ("auto", "block", "attn"):
            raise ValueError(f"pitome: placement must be 'attn' (between attention and MLP), 'block' (after it) or "
                             f"'auto' (the default: 'attn' where the model can, else 'block'), got {self.placement!r}")
        if not self.candidates >= 2.0:
            raise ValueError(f"pitome: candidates must be >= 2 (2 r tokens pair up to remove r), got {self.candidates!r}")
        if not -1.0 <= self.margin <= 1.0:
            raise ValueError(f"pitome: margin is a cosine similarity in [-1, 1], got {self.margin!r}")

    def schedule(self, info: EncoderInfo, keep: int) -> list[Stage]:
        mid = self.placement == "attn" or (self.placement == "auto" and info.inside_blocks)
        if self.layers is not None:
            blocks = check_layers(self.layers, info.depth)
        else:
            blocks = default_blocks(info, self.start, info.depth if mid else None)
        steps = spread_schedule(info.num_tokens, keep, blocks, max_fraction=0.5)
        return [Stage(b, k, self.name, mid=mid) for b, k in steps]

    def qk_blocks(self, plan):
        return {s.block for s in plan.stages}

    def reduce(self, state, stage, qk):
        depth = max(self._depth, 1)
        margin = self.margin * (1.0 - stage.block / depth)
        return protected_merge(state, qk.metric(), state.num_tokens - stage.keep, margin, self.candidates)

    def plan(self, info, budget, overrides=None):
        self._depth = info.depth
        return super().plan(info, budget, overrides)
