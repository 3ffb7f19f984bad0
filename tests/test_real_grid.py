"""``pool`` and ``plan`` use the real grid of the input that ran, never a guess from the token count.

A 32 x 128 image with 8 px patches is a 4 x 16 grid: 64 tokens, a square count, so a guess would say 8 x 8 and
group patches of different rows. For timm ViT (``dynamic_img_size``), timm Eva, and HF DINOv2 / DINOv3 (any input
size): every pooled token holds only neighbouring patches, and ``plan(model, input_shape=...)`` is what ran.
"""
from __future__ import annotations

import pytest
import torch

import tokenprune

SHAPE = (2, 3, 32, 128)
GRID = (4, 16)


def _timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4,
                             num_classes=5, dynamic_img_size=True).eval(), 1


def _timm_eva():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("eva02_tiny_patch14_224", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4,
                             num_classes=5, dynamic_img_size=True).eval(), 1


def _hf_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    return Dinov2Model(Dinov2Config(hidden_size=32, num_attention_heads=4, image_size=32, patch_size=8, mlp_ratio=2,
                                    num_hidden_layers=4)).eval(), 1


def _hf_dinov3():
    dinov3 = pytest.importorskip("transformers.models.dinov3_vit")
    torch.manual_seed(0)
    cfg = dinov3.DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                 image_size=32, patch_size=8, num_register_tokens=2)
    return dinov3.DINOv3ViTModel(cfg).eval(), 3


MAKERS = {"timm_vit": _timm_vit, "timm_eva": _timm_eva, "hf_dinov2": _hf_dinov2, "hf_dinov3": _hf_dinov3}


@pytest.mark.parametrize("family", list(MAKERS))
@pytest.mark.parametrize("method", ["pool", "merge"])
def test_non_square_grid(family, method):
    if family.startswith("hf_"):
        pytest.importorskip("transformers")
    torch.set_num_threads(1)
    model, p = MAKERS[family]()
    x = torch.randn(*SHAPE)
    tokenprune.apply(model, 0.25, method)
    try:
        with torch.no_grad():
            tokens, state = tokenprune.features(model, x)
        planned = tokenprune.plan(model, input_shape=SHAPE)
        hypothetical = tokenprune.plan(model, 0.25, method, input_shape=SHAPE[-2:])
    finally:
        tokenprune.remove(model)
    assert state.input_grid == GRID and state.num_input == 64
    # the plan for this input shape is what ran
    assert planned.info.grid == GRID and planned.info.num_tokens == 64
    assert [n + p for n in planned.tokens_per_block()] == state.tokens_per_block
    assert tokens.shape[1] - p == planned.num_out == hypothetical.num_out
    if method == "pool":
        assert state.grid == (2, 8)  # 16 cells of 2 x 2 patches, not 8 x 8 / 2
        for b in range(SHAPE[0]):
            src = state.source[b] - p
            for tok in src.unique().tolist():
                idx = (src == tok).nonzero().flatten()
                rows, cols = idx // GRID[1], idx % GRID[1]
                assert int(rows.max() - rows.min()) <= 1 and int(cols.max() - cols.min()) <= 1, (tok, idx.tolist())


def test_input_shape_errors():
    model, _ = _timm_vit()
    with pytest.raises(ValueError, match="not both"):
        tokenprune.plan(model, 0.5, "merge", num_tokens=16, input_shape=(32, 32))
    with pytest.raises(ValueError, match="smaller than one"):
        tokenprune.plan(model, 0.5, "merge", input_shape=(4, 4))


def test_input_shape_the_model_cannot_take_is_refused():
    """A timm model without ``dynamic_img_size`` takes its own image size only: a plan for another size would
    describe a forward that cannot run (timm asserts on the size), so ``plan`` says how to get one."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    fixed = timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4,
                              num_classes=5).eval()
    assert tokenprune.plan(fixed, 0.5, "merge", input_shape=(1, 3, 32, 32)).info.grid == (4, 4)
    with pytest.raises(ValueError, match=r"32x32.*dynamic_img_size=True"):
        tokenprune.plan(fixed, 0.5, "merge", input_shape=SHAPE)
    model, _ = _timm_vit()  # dynamic_img_size: any multiple of the patch size, but not a partial patch
    assert tokenprune.plan(model, 0.5, "merge", input_shape=SHAPE).info.grid == GRID
    with pytest.raises(ValueError, match=r"multiple of the patch size.*dynamic_img_pad=True"):
        tokenprune.plan(model, 0.5, "merge", input_shape=(1, 3, 36, 32))
