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

``layers=[...]`` merges only after those blocks (at most half the tokens per
step, repeated matching rounds are not done): fewer, larger steps mean fewer
kernel launches, which is what limits small batches on a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

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

    fuses_residual = True  # ops.bipartite_merge adds state.residual (in the kernels' row gather on CUDA)

    def schedule(self, info: EncoderInfo, keep: int) -> list[Stage]:
        if self.layers is not None:
            steps = spread_schedule(info.num_tokens, keep, check_layers(self.layers, info.depth), max_fraction=0.5)
            return [Stage(b, k, self.name) for b, k in steps]
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
        return bipartite_merge(state, qk.key_mean(), r)
