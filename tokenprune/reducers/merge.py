"""Bipartite soft matching -- ToMe.

Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman. "Token Merging: Your ViT but
Faster." ICLR 2023. https://arxiv.org/abs/2210.09461

After each scheduled block, tokens are split alternately into sets A and B;
every A token is matched to its most similar B token (cosine similarity of
the block's attention keys, averaged over heads) and the ``r`` best-matched
A tokens are merged into their partners with a size-weighted average. Token
sizes enter the next blocks' attention as proportional attention,
``softmax(q k^T / sqrt(d) + log s)``, passed to SDPA as an additive key bias.

Schedule: the same ``r`` after every block from ``start`` on (ToMe's
constant schedule), front-loaded only where ``r <= n/2`` forces it, so that
exactly ``round(budget * N)`` non-prefix tokens leave the encoder. Each step
removes at most half the tokens; a budget that the blocks before the last
cannot reach also merges after the last block, and one that even that cannot
reach is an error naming the limit.

Where: ``placement="block"`` merges after the block (its output tokens); ``placement="attn"`` merges
inside the block, between attention and MLP, as ToMe's own code does (Bolya et al., Sec. 3: "we apply
token merging between the attention and MLP branches of each block"), so that block's MLP already runs
on the fewer tokens. Both use the keys of that block's attention, averaged over heads, as the metric.
With ``"attn"`` the default schedule spreads the steps over every block, the last included (its MLP is
cheaper too). ``"attn"`` needs an adapter whose block function supports it (timm, open_clip); the
others refuse it at ``apply()``.

``layers=[...]`` merges only after those blocks (at most half the tokens per
step, repeated matching rounds are not done): fewer, larger steps mean fewer
kernel launches, which is what limits small batches on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import bipartite_merge
from ..plan import EncoderInfo, Stage, spread_schedule
from ..registry import register
from .base import Reducer, check_layers, default_blocks


@register("merge")
@dataclass
class Merge(Reducer):
    prop_attn: bool = True  # proportional attention (log-size key bias)
    start: int = 0  # first block after which tokens are merged
    layers: list[int] | None = None  # merge only after these blocks (default: every block from `start`)
    placement: str = "block"  # "block": after the block; "attn": between its attention and MLP (ToMe's)

    fuses_residual = True  # ops.bipartite_merge adds state.residual (in the kernels' row gather on CUDA)
    wants_key_mean = True

    def __post_init__(self):
        if self.placement not in ("block", "attn"):
            raise ValueError(f"merge: placement must be 'block' (after the block) or 'attn' (between attention and "
                             f"MLP, ToMe's), got {self.placement!r}")

    def schedule(self, info: EncoderInfo, keep: int) -> list[Stage]:
        mid = self.placement == "attn"
        if self.layers is not None:
            steps = spread_schedule(info.num_tokens, keep, check_layers(self.layers, info.depth), max_fraction=0.5)
            return [Stage(b, k, self.name, mid=mid) for b, k in steps]
        if mid:  # inside every block from `start`, the last included
            blocks = default_blocks(info, self.start, info.depth)
            steps = spread_schedule(info.num_tokens, keep, blocks, max_fraction=0.5)
            return [Stage(b, k, self.name, mid=True) for b, k in steps]
        blocks = default_blocks(info, self.start)
        try:
            steps = spread_schedule(info.num_tokens, keep, blocks, max_fraction=0.5)
        except ValueError:
            if blocks[-1] == info.depth - 1:
                raise
            # too few steps at <= 50% each: also merge after the last block (it saves no compute,
            # but the requested number of tokens leaves the encoder)
            steps = spread_schedule(info.num_tokens, keep, blocks + [info.depth - 1], max_fraction=0.5)
        return [Stage(b, k, self.name) for b, k in steps]

    def qk_blocks(self, plan):
        return {s.block for s in plan.stages}

    def reduce(self, state, stage, qk):
        r = state.num_tokens - stage.keep
        if r <= state.num_tokens // 2:
            return bipartite_merge(state, qk.metric(), r)  # the keys (or their head mean)
        # more than half in one stage (a schedule override, e.g. one merge after the last block): repeated
        # matching rounds of at most half each; the key mean is carried as extra channels of the tokens, so
        # later rounds match on the size-weighted mean key of each merged group
        c = state.materialize().x.shape[-1]
        state.x = torch.cat([state.x, qk.key_mean().to(state.x.dtype)], -1)
        while state.num_tokens > stage.keep:
            n = state.num_tokens
            state = bipartite_merge(state, state.x[..., c:], min(n // 2, n - stage.keep))
        state.x = state.x[..., :c].contiguous()
        return state
