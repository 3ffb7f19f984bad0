"""MAELRE -- progressive token merging with a linear-to-exact attention switch.

"Token Merging with Attention Switching for long inputs" (MAELRE). The paper's
exact merging schedule and linear approximation are not public; what is built
here follows ``docs/methods.md`` section 2 and says where it chooses.

Merging: ToMe's bipartite soft matching (``ops.bipartite_merge``, keys of the
block as similarity, size-weighted averages, proportional attention) after
the blocks in ``layers`` (default: every block but the last). ``geometric``
(default) removes the same *fraction* at every stage, so most tokens go early,
where long inputs cost the most; ``geometric=False`` removes the same *count*
(ToMe). Each stage removes at most half the tokens (bipartite limit). The
schedule ends exactly at ``round(budget * N)`` tokens and can be overridden
(``schedule={block: keep}``).

Attention switch: a block whose INPUT token count ``n`` (prefix included)
exceeds ``switch_at`` (default: the embedding width D) runs the linear-cost
"efficient attention" factorisation (Shen et al., "Efficient Attention:
Attention with Linear Complexities", WACV 2021, https://arxiv.org/abs/1812.01243)

    out = softmax_d(Q) @ (softmax_N(K + log s)^T @ V)          per head,

O(n d^2) time and O(n d + d^2) memory per head, no new parameters. The key
softmax runs over the token axis with the token-size bias ``log s`` added
(proportional attention; size-0 padding slots get weight 0). Once merging
brings ``n <= switch_at`` the block runs exact softmax attention (SDPA). The
path of every block is in the plan: ``Stage.attention`` names the path of the
blocks after that stage, and a no-op stage after block -1 sets the path of
block 0 (``Plan.attention_per_block()``, ``Plan.summary()``).

A softmax-pretrained model loses accuracy when its attention is replaced:
``tokenprune.training.finetune_linear_attention`` trains the attention
weights of the linear blocks only, distilling from the unreduced model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from .. import kernels
from ..ops import bipartite_merge
from ..plan import EncoderInfo, Plan, Stage, spread_schedule
from ..registry import register
from .base import Reducer, check_layers, default_blocks


# MAELRE's linear attention ``softmax_d(q) @ (softmax_N(k + bias)^T @ v)``: the fused two-pass Triton kernel on
# CUDA, else its one PyTorch implementation (``kernels/reference.py``). Kept under this name: the plan names it
# as the linear blocks' attention kernel (``Maelre.attention_kernel``).
efficient_attention = kernels.efficient_attention


@register("maelre")
@dataclass
class Maelre(Reducer):
    switch_at: int | None = None  # blocks with more input tokens (prefix incl.) run linear attention; None = D
    layers: list[int] | None = None  # blocks after which to merge (default: every block but the last)
    geometric: bool = True  # same keep ratio at every stage (else the same count, ToMe)
    prop_attn: bool = True  # proportional attention (log-size key bias) in both attention paths

    uses_attention_kernel = True
    fuses_residual = True  # ops.bipartite_merge adds state.residual (in the merge kernels on CUDA)
    wants_key_mean = True

    def check(self, info: EncoderInfo) -> None:
        if self.switch_at is not None and (isinstance(self.switch_at, bool) or not isinstance(self.switch_at, int)
                                           or self.switch_at < 0):
            raise ValueError(f"switch_at must be a token count >= 0 (0: every block linear; None: the width D), "
                             f"got {self.switch_at!r}")
        if self.layers is not None:
            check_layers(self.layers, info.depth)

    def threshold(self, info: EncoderInfo) -> int:
        return info.dim if self.switch_at is None else int(self.switch_at)

    def schedule(self, info: EncoderInfo, keep: int) -> list[Stage]:
        blocks = check_layers(self.layers, info.depth) if self.layers is not None else default_blocks(info)
        # geometric stages may ask for more than half the tokens in one step: fall back to the
        # count schedule (which front-loads within the 1/2 cap) when that happens
        stages = spread_schedule(info.num_tokens, keep, blocks, geometric=self.geometric)
        n = info.num_tokens
        ok = True
        for _, k in stages:
            ok &= (n - k) <= n // 2
            n = k
        if not ok:
            stages = spread_schedule(info.num_tokens, keep, blocks, max_fraction=0.5)
        return [Stage(b, k, self.name) for b, k in stages]

    def plan(self, info: EncoderInfo, budget: float, overrides: Mapping[int, int] | None = None) -> Plan:
        """The merging plan, each stage annotated with the attention path of the blocks after it."""
        base = super().plan(info, budget, overrides)
        limit, p = self.threshold(info), info.num_prefix
        path = lambda n: "linear" if n + p > limit else "sdpa"  # noqa: E731
        stages = [Stage(-1, info.num_tokens, self.name, path(info.num_tokens))]
        stages += [Stage(s.block, s.keep, self.name, path(s.keep)) for s in base.stages]
        if stages[0].attention == "sdpa":
            stages = stages[1:]  # nothing to switch before block 0
        return Plan(self.name, budget, info, stages)

    def qk_blocks(self, plan):
        return {s.block for s in plan.stages if s.block >= 0}

    def reduce(self, state, stage, qk):
        r = state.num_tokens - stage.keep
        if r <= 0:
            return state  # the attention-switch marker before block 0
        return bipartite_merge(state, qk.metric(), r)  # the keys (or their head mean)

    def attention_kernel(self, path):
        return efficient_attention if path == "linear" else None


def linear_blocks(plan: Plan) -> list[int]:
    """Indices of the blocks that run the linear approximation under ``plan``."""
    return [i for i, a in enumerate(plan.attention_per_block()) if a == "linear"]

