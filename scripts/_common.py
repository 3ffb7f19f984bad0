"""What several scripts share: the ViT they time, timing through ``tokenprune.bench.time_fn`` (eager
calls, or CUDA-graph replays through ``tokenprune.cuda.graphed``) and the device ceilings.

Scripts import it as ``from _common import ...`` (``python scripts/X.py`` puts scripts/ on the path).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as ``python scripts/X.py`` without PYTHONPATH
    sys.path.insert(0, str(ROOT))

from tokenprune.bench import time_fn  # noqa: E402
from tokenprune.cuda import graphed  # noqa: E402


def make_vit(device, smoke: bool = False, img: int | None = None):
    """``(model, dtype)``: vit_base_patch16_224 in fp16 (random weights, seed 0, eval), ``img`` px if given;
    with ``smoke`` a 4-block, 48-wide float32 ViT at 32 px (``img`` px) with 4-px patches (the CPU tests' model)."""
    import timm

    torch.manual_seed(0)
    if smoke:
        kw = dict(img_size=img or 32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    else:
        kw = {"img_size": img} if img else {}
    m = timm.create_model("vit_base_patch16_224", pretrained=False, **kw)
    dt = torch.float32 if smoke else torch.float16
    return m.to(device, dt).eval(), dt


def ms(fn, device, warmup: int = 10, repeats: int = 30) -> float:
    """Median milliseconds of eager calls of ``fn()`` (``time_fn``: CUDA events around each call on GPU, so
    host launch time counts where it exceeds the GPU work)."""
    return time_fn(fn, device, warmup, repeats).median_ms


def graph_ms(fn, warmup: int = 10, repeats: int = 30) -> float:
    """Median milliseconds of CUDA-graph replays of ``fn()`` (``graphed`` + ``time_fn``): GPU time alone.
    Raises when ``fn`` cannot be captured."""
    return time_fn(graphed(fn), "cuda", warmup, repeats).median_ms


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (two ``nbytes`` buffers)."""
    a = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    b = torch.empty_like(a)
    t = ms(lambda: b.copy_(a), device)
    return 2 * nbytes / (t * 1e-3)
