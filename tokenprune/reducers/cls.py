"""[CLS]-attention pruning -- FasterVLM (single layer) and VTC-CLS (sum over layers).

Zhang et al. "[CLS] Attention is All You Need for Training-Free Visual Token
Pruning: Make VLM Inference Faster" (FasterVLM), 2024. https://arxiv.org/abs/2412.01818
Wang et al. "[CLS] Token Tells Everything Needed for Training-free Efficient
MLLMs" (VTC-CLS), 2024. https://arxiv.org/abs/2412.05819

Each patch is scored by the attention the [CLS] query pays to it, averaged
over heads, ``a_j = mean_h softmax(q_cls k^T / sqrt(d) + bias)_j``
(``base.patch_scores``, which the LLaVA adapter shares). Only the
ONE query row is computed, from the q and k the block already produced, so
the block itself keeps running on fused SDPA. The top-K patches are kept in
their original spatial order; prefix tokens are always kept.

``variant="single"`` scores with the block right before each pruning stage;
``variant="sum"`` sums the scores of every block since the previous stage
(VTC-CLS's layer ensemble).

Stages: by default after blocks ``depth*1//4, depth*2//4, depth*3//4`` with
the same keep ratio at each (EViT-style), ending at ``round(budget * N)``.
``layers=[j]`` gives FasterVLM's single pruning point.

Encoders without a class token: ``substitute="received"`` (default) scores
each token by the exact mean attention it receives over all queries (one
extra attention pass per scored block, chunked; the block itself stays on
SDPA); ``substitute="mean_query"`` uses the attention of the mean query
(O(N d), cheap). Measured on Whisper tiny.en (116 utterances, WER 8.2%
unreduced): "received" 8.3 / 8.2 / 7.9% at budgets 0.75 / 0.5 / 0.25,
"mean_query" 12.4 / 13.5 / 12.2% -- hence the default.

``threshold``: additionally drop tokens whose score is at most ``threshold``,
per sample. Samples then keep different counts (never more than the budget's
count, at least one); the batch is padded and padding is masked out of
attention, so every sample gets what it would get alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..ops import keep_above, keep_top
from ..plan import EncoderInfo, Stage
from ..registry import register
from .base import Reducer, check_layers, patch_scores, patch_valid, ratio_schedule


@register("cls")
@dataclass
class ClsPrune(Reducer):
    layers: list[int] | None = None  # blocks after which to prune (default: depth/4, depth/2, 3 depth/4)
    variant: str = "single"  # "single" (FasterVLM) or "sum" (VTC-CLS)
    threshold: float | None = None  # per-sample score threshold (different kept counts per sample)
    substitute: str = "received"  # scoring without a class token: "received" or "mean_query" (cheaper)

    def __post_init__(self):
        if self.variant not in ("single", "sum"):
            raise ValueError(f"variant must be 'single' or 'sum', got {self.variant!r}")
        if self.substitute not in ("mean_query", "received"):
            raise ValueError(f"substitute must be 'mean_query' or 'received', got {self.substitute!r}")
        if self.threshold is not None and not math.isfinite(self.threshold):  # +inf would keep one token a sample
            raise ValueError(f"threshold must be a finite score (or None), got {self.threshold!r}")
        self._has_cls = True

    @property
    def wants_lse(self) -> bool:
        """Scores by the attention each token receives (no class token): the scored block's attention may hand its
        queries' log-sum-exp over (``kernels.LSE_FROM_ATTENTION_MIN_TOKENS``)."""
        return self.substitute == "received" and not self._has_cls

    def check(self, info: EncoderInfo) -> None:
        self._has_cls = info.has_cls
        if self.layers is not None:
            check_layers(self.layers, info.depth)

    def schedule(self, info: EncoderInfo, keep: int) -> list[Stage]:
        return ratio_schedule(self.name, info, keep, self.layers)

    def qk_blocks(self, plan):
        stage_blocks = sorted({s.block for s in plan.stages})
        if self.variant == "single":
            return set(stage_blocks)
        out, prev = set(), -1
        for b in stage_blocks:
            out.update(range(prev + 1, b + 1))
            prev = b
        return out

    def observe(self, state, block, qk):
        if self.variant == "sum" and qk is not None:
            s = patch_scores(state, qk, self._has_cls, self.substitute)
            acc = state.scratch.get("cls_sum")
            state.scratch["cls_sum"] = s if acc is None else acc + s

    def score_layers(self, depth, default):
        if self.threshold is not None:
            raise ValueError("cls threshold= keeps a different number of tokens per sample; a single reduction "
                             "to a fixed count (a VLM's visual tokens) needs a budget instead")
        layers = check_layers(self.layers, depth) if self.layers is not None else None
        if self.variant == "sum":
            return layers if layers is not None else list(range(default + 1))
        return [layers[-1]] if layers is not None else [default]

    def score_tokens(self, state, qk):
        return patch_scores(state, qk, self._has_cls, self.substitute)

    def select(self, state, keep, scores=None):
        return keep_top(state, scores, keep, patch_valid(state))

    def reduce(self, state, stage, qk):
        if self.variant == "sum":
            scores = state.scratch.pop("cls_sum")
        else:
            scores = patch_scores(state, qk, self._has_cls, self.substitute)
        valid = patch_valid(state)
        if self.threshold is not None:
            return keep_above(state, scores, self.threshold, stage.keep, valid)[0]
        return keep_top(state, scores, stage.keep, valid)
