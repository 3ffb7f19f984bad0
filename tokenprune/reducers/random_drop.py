"""Random token dropping -- the baseline every pruning method must beat.

Keeps a uniformly random subset of the non-prefix tokens (spatial order
kept) at the same stages as ``cls`` by default, so the two compare at equal
FLOPs. ``seed`` makes the choice reproducible across calls (and devices):
scores come from an integer hash of (seed, stage, position) computed on the
tokens' device, so no generator is created and the forward can be captured
in a CUDA graph. The sample's place in the batch does not enter: a sample
keeps the same tokens alone, in any batch, and as any image of a VLM prompt
(every sample of a call keeps the same positions; a new seed draws new ones).
``seed=None`` draws from torch's global generator, per sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops import keep_top
from ..plan import EncoderInfo, Stage
from ..registry import register
from .base import Reducer, patch_valid, ratio_schedule


def hash_scores(b: int, n: int, key: int, device) -> torch.Tensor:
    """Deterministic pseudo-random values in [0, 1) of shape [b, n], one row repeated (a 32-bit integer mix in
    int64 of the position and ``key``; the row does not depend on ``b``).

    The position is first xor-ed with the key: a compiler cannot fold an xor into its (32-bit) index
    arithmetic, so every later product is an int64 tensor operation, exact in eager and compiled code."""
    m = (1 << 32) - 1
    h = torch.arange(n, device=device, dtype=torch.int64) ^ (key * 0x85EBCA77 & 0x7FFFFFFF)
    h = (h * 0x9E3779B1) & m
    for mul in (0x85EBCA6B, 0xC2B2AE35):
        h = ((h ^ (h >> 16)) * mul) & m
    h = h ^ (h >> 16)
    return (h.to(torch.float32) / float(1 << 32)).expand(b, n)


@register("random")
@dataclass
class RandomDrop(Reducer):
    layers: list[int] | None = None  # blocks after which to drop (default: as `cls`); -1 = before block 0
    seed: int | None = 0

    before_first = True  # needs no attention: a stage may come before block 0 (-1)

    def __post_init__(self):
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        self._cache: dict = {}

    def _scores(self, b: int, n: int, key: int, device) -> torch.Tensor:
        """The hash scores; eager forwards reuse them per shape (they depend on nothing else, and an eager
        batch-1 forward is bound by host time: the hash is a dozen small ops). Compiled, they are computed
        in the graph."""
        if torch.compiler.is_compiling():
            return hash_scores(b, n, key, device)
        k = (b, n, key, device)
        scores = self._cache.get(k)
        if scores is None:
            if len(self._cache) > 64:
                self._cache.clear()
            scores = self._cache[k] = hash_scores(b, n, key, device)
        return scores

    def schedule(self, info: EncoderInfo, keep: int) -> list[Stage]:
        return ratio_schedule(self.name, info, keep, self.layers, before_first=self.before_first)

    def reduce(self, state, stage, qk):
        b, n = state.x.shape[0], state.num_tokens
        if self.seed is None:
            scores = torch.rand((b, n), device=state.x.device)
        else:
            scores = self._scores(b, n, self.seed * 1_000_003 + stage.block + 1, state.x.device)
        return keep_top(state, scores, stage.keep, patch_valid(state))
