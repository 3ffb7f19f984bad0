import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when a kernel is decorated: every test module then gets the interpreted kernels,
    # whichever of them imports tokenprune.kernels first (CPU tensors never reach a kernel otherwise)
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ASSETS = Path(os.environ.get("TOKENPRUNE_ASSETS", Path(__file__).resolve().parents[1].parent / "shared" / "assets"))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny models: fastest, and fair on a shared machine); restored after.
    Modules of tiny-model tests use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def assets():
    if not ASSETS.exists():
        pytest.skip(f"shared assets not found at {ASSETS}")
    return ASSETS


def tiny_vit(**kw):
    """A small timm ViT for fast CPU tests (random weights, fixed seed)."""
    import timm

    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    args.update(kw)
    return timm.create_model("vit_small_patch16_224", pretrained=False, **args).eval()
