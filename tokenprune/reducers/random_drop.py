"""Random token dropping -- the baseline every pruning method must beat.

Keeps a uniformly random subset of the non-prefix tokens (spatial order
kept) at the same stages as ``cls`` by default, so the two compare at equal
FLOPs. ``seed`` makes the choice reproducible across calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import gather_tokens, topk_sorted
from ..plan import EncoderInfo, Stage, spread_schedule
from ..registry import register
from .base import Reducer
from .cls import check_layers, default_layers


@register("random")
@dataclass
class RandomDrop(Reducer):
    layers: list[int] | None = None  # blocks after which to drop (default: as `cls`); -1 = before block 0
    seed: int | None = 0

    def schedule(self, info: EncoderInfo, keep: int) -> list[Stage]:
        if self.layers is not None and list(self.layers) == [-1]:
            layers = [-1]
        else:
            layers = check_layers(self.layers, info.depth) if self.layers is not None else default_layers(info.depth)
        return [Stage(b, k, self.name) for b, k in spread_schedule(info.num_tokens, keep, layers, geometric=True)]

    def reduce(self, state, stage, qk):
        b, n = state.x.shape[0], state.num_tokens
        gen = None
        if self.seed is not None:
            gen = torch.Generator(device=state.x.device).manual_seed(self.seed + 7919 * (stage.block + 1))
        scores = torch.rand((b, n), generator=gen, device=state.x.device)
        valid = state.valid
        idx, ok = topk_sorted(scores, stage.keep, valid[:, state.num_prefix:] if valid is not None else None)
        return gather_tokens(state, idx, ok)
