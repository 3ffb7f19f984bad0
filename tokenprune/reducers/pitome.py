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
margin keeps the energies spread); the merge placement and schedule are ``merge``'s, with
``placement="attn"`` (ToMe's: inside every block, between attention and MLP) as the default. Output
order: prefix, protected tokens in spatial order, then the B tokens by energy rank. Padding slots
(size 0) get the highest energy, so they are merged first, into other padding where possible.
No host sync, no data-dependent Python: it compiles with ``fullgraph=True``. The ``[N, N]`` cosine
matrix per sample is 4 times ToMe's ``[N/2, N/2]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..plan import EncoderInfo, Stage, spread_schedule
from ..registry import register
from .base import Reducer, check_layers, default_blocks, set_groups


def energy(metric: torch.Tensor, margin: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """PiToMe's energy ``E_i`` ``[B, N]`` of features ``metric`` ``[B, N, d]`` (see the module docstring)."""
    m = F.normalize(metric.float(), dim=-1)
    c = m @ m.transpose(1, 2)
    f = torch.where(c >= margin, c, torch.exp(c - margin) - 1.0)
    n = c.shape[-1]
    f = f.masked_fill(torch.eye(n, dtype=torch.bool, device=c.device), 0.0)
    if valid is None:
        return f.sum(-1) / max(n - 1, 1)
    f = f * valid[:, None, :].to(f.dtype)
    e = f.sum(-1) / (valid.sum(-1, keepdim=True) - 1).clamp_min(1).to(f.dtype)
    return e.masked_fill(~valid, float("inf"))  # padding first


def protected_merge(state, metric: torch.Tensor, r: int, margin: float, candidates: float = 2.0):
    """Remove ``r`` non-prefix tokens: the ``c = candidates * r`` highest-energy ones split into A (even energy
    rank) and B (odd); the ``r`` A tokens with the most similar B partner merge into it (with ``c = 2 r``, as
    PiToMe does, every A token); the rest are kept unchanged."""
    state.materialize()
    x, p = state.x, state.num_prefix
    b, _, c = x.shape
    n = state.num_tokens
    if r <= 0:
        return state
    if 2 * r > n:
        raise ValueError(f"pitome removes at most half the tokens per step ({n // 2} of {n}), asked for {r}")
    sizes = state.sizes_or_ones()
    s = sizes[:, p:]
    valid = None if not state.padded else s > 0
    met = metric[:, p:]
    cand = min(n, max(2 * r, math.ceil(min(candidates * r, n))))
    order = energy(met, margin, valid).argsort(-1, descending=True)  # [B, N]
    a_all, b_idx = order[:, 0:cand:2], order[:, 1:cand:2]  # A: ceil(cand / 2) >= r, B: floor(cand / 2) >= r
    mn = F.normalize(met.float(), dim=-1)
    ma = mn.gather(1, a_all[..., None].expand(b, a_all.shape[1], mn.shape[-1]))
    mb = mn.gather(1, b_idx[..., None].expand(b, b_idx.shape[1], mn.shape[-1]))
    sim = ma @ mb.transpose(1, 2)  # [B, |A|, |B|]
    if valid is not None:  # a real A token never merges into a padding B token
        sim = sim.masked_fill(~valid.gather(1, b_idx)[:, None, :], float("-inf"))
    best, dst = sim.max(-1)  # [B, |A|]: best partner, its position in b_idx
    if valid is not None:  # padding A slots go first
        best = best.masked_fill(~valid.gather(1, a_all), float("inf"))
    edge = best.argsort(-1, descending=True)
    a_idx, dst = a_all.gather(1, edge[:, :r]), dst.gather(1, edge[:, :r])  # the r best-matched A tokens
    keep_idx = torch.cat([order[:, cand:], a_all.gather(1, edge[:, r:])], 1).sort(-1).values  # spatial order
    nb = b_idx.shape[1]
    n_keep = keep_idx.shape[1]
    # group of every old token: protected ones keep a slot each, B tokens the slots after them, A joins its B
    group = torch.empty(b, n, dtype=torch.long, device=x.device)
    group.scatter_(1, keep_idx, torch.arange(n_keep, device=x.device).expand(b, n_keep))
    group.scatter_(1, b_idx, (n_keep + torch.arange(nb, device=x.device)).expand(b, nb))
    group.scatter_(1, a_idx, n_keep + dst)
    counts = torch.zeros(b, n_keep + nb, dtype=s.dtype, device=x.device).scatter_add_(1, group, s)
    w = s[..., None].to(x.dtype)
    summed = torch.zeros(b, n_keep + nb, c, dtype=x.dtype, device=x.device).scatter_add_(
        1, group[..., None].expand(b, n, c), x[:, p:] * w)
    patches = summed / counts.clamp_min(1e-12)[..., None].to(x.dtype)
    kept_x = x[:, p:].gather(1, keep_idx[..., None].expand(b, n_keep, c))
    patches = torch.cat([kept_x, patches[:, n_keep:]], 1)  # protected tokens exactly as they were
    patches = torch.where((counts > 0)[..., None], patches, torch.zeros_like(patches))
    state = set_groups(state, patches, sizes, counts, group)
    state.padded = state.padded or bool(valid is not None)
    return state


@register("pitome")
@dataclass
class PiToMe(Reducer):
    prop_attn: bool = True  # proportional attention (log-size key bias)
    margin: float = 0.9  # energy margin at block 0 (falls linearly to 0 at the last block)
    start: int = 0  # first block that merges
    layers: list[int] | None = None  # merge only in/after these blocks (default: every block from `start`)
    placement: str = "attn"  # "attn": between attention and MLP (ToMe's); "block": after the block
    candidates: float = 2.0  # merge candidates per step, in units of r (2: PiToMe; larger: ToMe's best-r rule
    #                          among them; float("inf"): every token is a candidate, split by energy rank)

    def __post_init__(self):
        if self.placement not in ("block", "attn"):
            raise ValueError(f"pitome: placement must be 'attn' (between attention and MLP) or 'block' (after "
                             f"it), got {self.placement!r}")
        if not self.candidates >= 2.0:
            raise ValueError(f"pitome: candidates must be >= 2 (2 r tokens pair up to remove r), got {self.candidates!r}")
        if not -1.0 <= self.margin <= 1.0:
            raise ValueError(f"pitome: margin is a cosine similarity in [-1, 1], got {self.margin!r}")

    def schedule(self, info: EncoderInfo, keep: int) -> list[Stage]:
        mid = self.placement == "attn"
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
        return protected_merge(state, qk.key_mean(), state.num_tokens - stage.keep, margin, self.candidates)

    def plan(self, info, budget, overrides=None):
        self._depth = info.depth
        return super().plan(info, budget, overrides)
