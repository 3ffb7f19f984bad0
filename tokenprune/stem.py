"""Patch embeddings run as one matrix product (``tokenprune.fast_patch_embed``).

A patchifying convolution -- kernel size equal to its stride, no padding, dilation 1, one group, as in
the stem of every ViT, CLIP / SigLIP vision tower and VideoMAE -- is a matrix product: cut the input
into patches, flatten each patch in the order of the weight (channels, then the window) and multiply by
the flattened weight. cuDNN runs ViT-B/16's 3-channel stem slowly on an H100: 2.03 ms at batch 256 in
fp16, 8% of the whole unreduced forward, because 3 input channels fit its tensor-core layouts badly.
As a reshape copy plus one cuBLAS GEMM it takes 0.23 ms (BENCHMARKS.md, "Patch embedding").

This is a speed-up of the model itself, not a token reduction: it helps the unreduced model as much as a
reduced one, and it composes with :func:`tokenprune.apply`. The swapped module keeps its class's
parameters, so ``state_dict`` keys, fine-tuning and ``model.to()`` are unaffected;
``fast_patch_embed(model, False)`` restores the original classes exactly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .adapters.base import restore_class, swap_class


class _ConvAsGemm:
    """Mixin for ``nn.Conv2d`` / ``nn.Conv3d`` whose kernel equals its stride (checked before swapping)."""

    def forward(self, x):
        nd = len(self.kernel_size)
        if x.dim() != nd + 2:  # unbatched input: leave it to the convolution
            return super().forward(x)
        b, c = x.shape[:2]
        grid = [s // k for s, k in zip(x.shape[2:], self.kernel_size)]
        if any(g * k != s for g, k, s in zip(grid, self.kernel_size, x.shape[2:])):
            # a strided convolution ignores the trailing rows / columns that do not fill a window
            x = x[(...,) + tuple(slice(0, g * k) for g, k in zip(grid, self.kernel_size))]
        # [B, C, g1, k1, g2, k2, ...] -> [B, g1, g2, ..., C, k1, k2, ...]: one row per patch
        x = x.reshape(b, c, *[v for gk in zip(grid, self.kernel_size) for v in gk])
        x = x.permute(0, *range(2, 2 + 2 * nd, 2), 1, *range(3, 3 + 2 * nd, 2))
        x = x.reshape(b * math.prod(grid), c * math.prod(self.kernel_size))
        y = F.linear(x, self.weight.reshape(self.out_channels, -1), self.bias)
        # the convolution's [B, C_out, g1, g2, ...] shape, channels-last in memory: the usual
        # flatten(2).transpose(1, 2) that follows is then free
        return y.view(b, *grid, self.out_channels).permute(0, nd + 1, *range(1, nd + 1))


def _is_patchify(m: torch.nn.Module) -> bool:
    if type(m) not in (torch.nn.Conv2d, torch.nn.Conv3d):  # subclasses may change forward
        return False
    no_pad = m.padding == "valid" or all(p == 0 for p in m.padding)
    return (tuple(m.kernel_size) == tuple(m.stride) and no_pad and all(d == 1 for d in m.dilation)
            and m.groups == 1)


def fast_patch_embed(model: torch.nn.Module, enable: bool = True) -> torch.nn.Module:
    """Run every patchifying ``Conv2d`` / ``Conv3d`` of ``model`` (kernel size == stride, no padding,
    dilation 1, one group) as a reshape plus one matrix product; ``enable=False`` restores them.

    The result equals the convolution's up to float rounding, in every dtype and under autograd.
    Returns ``model``. Raises ``ValueError`` if ``model`` has no such convolution (e.g. Whisper's or
    AST's overlapping-window stems), so a typo in the model does not silently do nothing.
    """
    if not enable:
        for m in model.modules():
            if isinstance(m, _ConvAsGemm):
                restore_class(m)
        return model
    convs = [m for m in model.modules() if isinstance(m, _ConvAsGemm) or _is_patchify(m)]
    if not convs:
        raise ValueError(
            f"fast_patch_embed: {type(model).__name__} has no patchifying convolution (an nn.Conv2d / nn.Conv3d "
            "with kernel_size == stride, no padding, dilation 1, groups 1). Its input embedding is not a "
            "product of non-overlapping patches (Whisper: 1-D convolutions; AST: overlapping windows), so there "
            "is nothing to replace: leave fast_patch_embed / --fast-patch-embed out for this model")
    for m in convs:
        if not isinstance(m, _ConvAsGemm):
            swap_class(m, _ConvAsGemm)
    return model
