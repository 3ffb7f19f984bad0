"""Diversity-based selection -- DivPrune's max-min diversity.

Alvar, Singh, Akbari, Zhang. "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models." CVPR 2025. https://arxiv.org/abs/2503.02175

DivPrune keeps the subset ``S`` of ``K`` tokens that maximises the smallest pairwise distance inside it
(the max-min diversity problem), with the cosine distance of the tokens' features,

    d(i, j) = 1 - <f_i, f_j> / (|f_i| |f_j|),      S* = argmax_{|S| = K}  min_{i != j in S} d(i, j),

solved greedily: the first token is the one whose nearest other token is farthest away,
``argmax_i min_{j != i} d(i, j)``; then, ``K - 1`` times, the token farthest from everything kept so far,
``argmax_{i not in S} min_{j in S} d(i, j)``, joins ``S``. Only the kept set's distance to every token is
carried between steps (one row of ``d``, worked out from the Gram matrix ``F F^T``, per step), so the loop is a
fixed number of ``min`` / ``argmax`` steps: no host sync, no data-dependent Python. That loop is
``kernels.max_min_select`` (``reference.max_min_select`` in PyTorch; on CUDA one Triton program per sample runs
all ``K`` steps, where PyTorch would launch five kernels per step; one opaque op under ``torch.compile``). Every
operation works per row, so a sample selects the same tokens in a batch as alone.

It needs no attention: the features are the tokens themselves after the stage's block (``f_i = x_i``).
The kept tokens are returned in spatial order.

Conditioning (``text=``, for VLMs): CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing
Conditional Diversity for Token Pruning in MLLMs", NeurIPS 2025) weights diversity by each token's
relevance to the instruction. Here, as a max-min analogue of that idea (our own choice, not CDPruner's
DPP): with ``r_i`` the cosine similarity of token ``i`` to the text embedding, rescaled per sample to
[0, 1], every greedy step maximises ``min_{j in S} d(i, j) * (eps + r_i) ** text_weight``. ``text`` is
``[C]`` or ``[B, C]`` in the space of the tokens being selected (VLMs: one ``[C]`` for all images, in the space
of their hand-off point, ``EncoderInfo.dim`` wide: LLaVA-1.5 the vision tower's output, the others the LM's input).

Schedule: the stages of ``cls`` / ``random`` (the same keep ratio after blocks depth/4, depth/2,
3 depth/4; ``layers=`` to change, -1 = before the first block), so the three compare at equal FLOPs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..ops import keep_top
from ..plan import EncoderInfo, Stage
from ..registry import register
from .base import Reducer, patch_valid, ratio_schedule

_EPS = 1e-3  # relevance floor: a token unrelated to the text still counts a little


def text_relevance(f: torch.Tensor, text: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity of each token to the text embedding, rescaled per sample to [0, 1] ``[B, N]``."""
    t = torch.nn.functional.normalize(text.to(f.device, torch.float32), dim=-1)
    if t.ndim == 1:
        t = t.expand(f.shape[0], -1)
    r = (torch.nn.functional.normalize(f.float(), dim=-1) * t[:, None, :]).sum(-1)
    lo = r if valid is None else r.masked_fill(~valid, float("inf"))
    hi = r if valid is None else r.masked_fill(~valid, float("-inf"))
    lo, hi = lo.min(-1, keepdim=True).values, hi.max(-1, keepdim=True).values
    return (r - lo) / (hi - lo).clamp_min(1e-6)


@register("diverse")
@dataclass
class Diverse(Reducer):
    layers: list[int] | None = None  # blocks after which to select (default: as `cls`); -1 = before block 0
    text: torch.Tensor | None = None  # [C] or [B, C] text embedding to condition on (VLMs); None: plain DivPrune
    text_weight: float = 1.0  # exponent of the relevance weight

    before_first = True  # needs no attention: a stage may come before block 0 (-1)

    def __post_init__(self):
        if self.text is not None:
            if not isinstance(self.text, torch.Tensor) or self.text.ndim not in (1, 2) or self.text.is_complex():
                raise TypeError("diverse: text must be a real torch.Tensor of shape [C] or [B, C] (the text "
                                f"embedding in the tokens' feature space), got {type(self.text).__name__}")
        if not self.text_weight >= 0:
            raise ValueError(f"diverse: text_weight must be >= 0, got {self.text_weight!r}")

    def check(self, info: EncoderInfo) -> None:
        if self.text is not None and self.text.shape[-1] != info.dim:
            raise ValueError(f"diverse: text has {self.text.shape[-1]} features but the tokens have {info.dim}; "
                             f"give an embedding of {info.dim} features, in the space of the tokens being selected")

    def schedule(self, info: EncoderInfo, keep: int) -> list[Stage]:
        return ratio_schedule(self.name, info, keep, self.layers, before_first=self.before_first)

    def reduce(self, state, stage, qk):
        f = state.x[:, state.num_prefix:]
        valid = patch_valid(state)
        weight = None
        if self.text is not None:
            if self.text.ndim == 2 and self.text.shape[0] not in (1, f.shape[0]):
                raise ValueError(f"diverse: text has {self.text.shape[0]} rows for a batch of {f.shape[0]}; "
                                 "give one embedding per sample or one for all")
            weight = (_EPS + text_relevance(f, self.text, valid)) ** self.text_weight
        # the greedy max-min above, on the Gram matrix F F^T (one launch on CUDA): the distances d = 1 - cos are
        # worked out from G inside the selection (reference.cosine_distance), so neither a normalised copy of F nor d
        # is made
        chosen = kernels.max_min_select(kernels.gram(f)[0], stage.keep, valid, weight)
        return keep_top(state, chosen, stage.keep, valid)  # the selection itself: nothing to rank
