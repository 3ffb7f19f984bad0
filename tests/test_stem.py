"""``tokenprune.fast_patch_embed``: patchifying convolutions as one matrix product.

Against the convolution itself (float64, random weights, sizes that do not divide the kernel, 2-D and
3-D, with and without bias, gradients), on every model family with such a stem (outputs before and
after, composition with ``apply``, exact restore), and the errors.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import tokenprune
from tokenprune.stem import _is_patchify

from conftest import tiny_vit


@pytest.mark.parametrize("conv, shape", [
    (lambda: nn.Conv2d(3, 24, 8, 8), (2, 3, 37, 29)),  # 37 x 29: trailing rows / columns dropped
    (lambda: nn.Conv2d(5, 16, (4, 6), (4, 6), bias=False), (3, 5, 16, 18)),
    (lambda: nn.Conv2d(3, 8, 4, 4, padding="valid"), (1, 3, 12, 12)),
    (lambda: nn.Conv3d(3, 16, (2, 4, 4), (2, 4, 4)), (2, 3, 5, 17, 12)),
])
def test_matches_convolution_and_its_gradients(conv, shape):
    torch.manual_seed(0)
    ref_conv = conv().double()
    gemm = conv().double()
    gemm.load_state_dict(ref_conv.state_dict())
    tokenprune.fast_patch_embed(nn.Sequential(gemm))
    assert type(gemm).__name__.startswith("TokenPruned")
    x1 = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = ref_conv(x1), gemm(x2)
    assert y1.shape == y2.shape
    torch.testing.assert_close(y2, y1, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gemm.weight.grad, ref_conv.weight.grad, rtol=1e-12, atol=1e-12)
    if ref_conv.bias is not None:
        torch.testing.assert_close(gemm.bias.grad, ref_conv.bias.grad, rtol=1e-12, atol=1e-12)


def test_unbatched_input_and_bfloat16_follow_the_convolution():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 4, 4)
    x = torch.randn(3, 12, 8)
    ref = conv(x)
    xb = torch.randn(2, 3, 12, 8)
    # the reference from the convolution itself, before the swap
    ref16 = torch.nn.functional.conv2d(xb.bfloat16(), conv.weight.bfloat16(), conv.bias.bfloat16(), stride=4).float()
    tokenprune.fast_patch_embed(nn.Sequential(conv))
    torch.testing.assert_close(conv(x), ref)  # unbatched: the convolution's own path
    conv.bfloat16()
    assert type(conv).__name__ == "TokenPrunedConv2d"
    assert conv(xb.bfloat16()).dtype == torch.bfloat16
    torch.testing.assert_close(conv(xb.bfloat16()).float(), ref16, rtol=0.02, atol=0.02)


def test_only_patchifying_convolutions_qualify():
    assert _is_patchify(nn.Conv2d(3, 8, 16, 16))
    assert not _is_patchify(nn.Conv2d(3, 8, 16, 10))  # AST: overlapping windows
    assert not _is_patchify(nn.Conv2d(3, 8, 4, 4, padding=1))
    assert not _is_patchify(nn.Conv2d(4, 8, 4, 4, groups=2))
    assert not _is_patchify(nn.Conv2d(3, 8, 4, 4, dilation=2))
    assert not _is_patchify(nn.Conv1d(3, 8, 3, 1))  # Whisper
    assert not _is_patchify(nn.Conv2d(3, 8, 3, 1, padding=1))


def test_timm_vit_same_outputs_composes_with_apply_and_restores():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        tokenprune.apply(model, budget=0.25, method="merge")
        ref_merge = model(x)
        tokenprune.remove(model)
        assert tokenprune.fast_patch_embed(model) is model
        assert type(model.patch_embed.proj).__name__ == "TokenPrunedConv2d"
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
        tokenprune.apply(model, budget=0.25, method="merge")
        torch.testing.assert_close(model(x), ref_merge, rtol=1e-4, atol=1e-5)
        tokenprune.remove(model)  # the reduction goes; the stem stays until asked
        assert type(model.patch_embed.proj).__name__ == "TokenPrunedConv2d"
        tokenprune.fast_patch_embed(model, enable=False)
        assert type(model.patch_embed.proj) is nn.Conv2d
        assert torch.equal(model(x), ref)
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("family", ["open_clip", "hf_clip", "siglip", "videomae", "ast"])
def test_other_families_same_outputs(family):
    pytest.importorskip("transformers")
    from test_adapters_matrix import FAMILIES

    case = FAMILIES[family]()
    model, x = case["model"], case["x"]
    with torch.no_grad():
        ref = case["out"](model, x)
        tokenprune.fast_patch_embed(model)
        swapped = [m for m in model.modules() if type(m).__name__.startswith("TokenPrunedConv")]
        assert len(swapped) == 1
        torch.testing.assert_close(case["out"](model, x), ref, rtol=1e-4, atol=1e-5)
        tokenprune.fast_patch_embed(model, False)
        assert not any(type(m).__name__.startswith("TokenPrunedConv") for m in model.modules())
        assert torch.equal(case["out"](model, x), ref)


def test_models_without_a_patchifying_stem_are_refused():
    pytest.importorskip("transformers")
    from test_adapters_matrix import FAMILIES
    from transformers import ASTConfig, ASTModel

    # AST's real stem overlaps its windows (16 x 16, stride 10); Whisper's is a Conv1d of width 3
    ast = ASTModel(ASTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             patch_size=4, frequency_stride=2, time_stride=2, num_mel_bins=16, max_length=32))
    for model in (FAMILIES["whisper"]()["model"], ast, nn.Linear(4, 4)):
        with pytest.raises(ValueError, match="no patchifying convolution"):
            tokenprune.fast_patch_embed(model)
