"""`merge` with placement="attn": merging between a block's attention and its MLP (ToMe's placement)."""
import pytest
import torch

import tokenprune
from conftest import tiny_vit
from tokenprune.ops import bipartite_merge
from tokenprune.state import TokenState


def _tome_last_block(model, x, r):
    """Blocks 0..depth-2 as timm runs them; in the last block: attention, merge r tokens on its key mean, MLP."""
    t = model._pos_embed(model.patch_embed(x))
    for blk in model.blocks[:-1]:
        t = blk(t)
    blk = model.blocks[-1]
    a = blk.attn
    h = blk.norm1(t)
    b, n, _ = h.shape
    k = a.qkv(h).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)[1]
    t = t + blk.ls1(a(h))
    state = bipartite_merge(TokenState.start(t, model.num_prefix_tokens), k.mean(1), r)
    t = state.x + blk.ls2(blk.mlp(blk.norm2(state.x)))
    return model.norm(t)


def test_attn_placement_merges_between_attention_and_mlp():
    torch.set_num_threads(1)
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = _tome_last_block(model, x, 20)
        tokenprune.apply(model, budget=44 / 64, method="merge", placement="attn", layers=[3])
        plan = tokenprune.plan(model)
        assert [(s.block, s.keep, s.mid) for s in plan.stages] == [(3, 44, True)]
        got = model.forward_features(x)
        tokenprune.apply(model, budget=44 / 64, method="merge", placement="block", layers=[3])
        after = model.forward_features(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after[:, 1:].sort(1).values, want[:, 1:].sort(1).values, atol=1e-3)


def test_attn_placement_is_exact_when_nothing_is_reduced_and_counts_the_mlp_flops():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        tokenprune.apply(model, budget=1.0, method="merge", placement="attn")
        assert torch.equal(model(x), ref)
        flops = {}
        for pl in ("block", "attn"):
            tokenprune.apply(model, budget=0.5, method="merge", placement=pl, layers=[1])
            flops[pl] = tokenprune.plan(model).flop_ratio
    # the same stage inside block 1 also saves block 1's MLP on the 32 merged tokens: 2 * 32 * 2 * C * H
    info = tokenprune.plan(model).info
    full = info.depth * (2 * 65 * (4 * 48 * 48 + 2 * 48 * 192) + 4 * 65 * 65 * 48)
    assert flops["block"] - flops["attn"] == pytest.approx(2 * 32 * 2 * 48 * 192 / full)
    tokenprune.remove(model)
    assert torch.equal(model(x), ref)


def test_default_attn_schedule_uses_every_block_and_composes():
    model = tiny_vit()
    tokenprune.apply(model, budget=0.25, method="merge", placement="attn")
    plan = tokenprune.plan(model)
    assert [s.block for s in plan.stages] == [0, 1, 2, 3] and all(s.mid for s in plan.stages)
    assert plan.num_out == 16 and "inside block" in plan.summary()
    tokenprune.apply(model, budget=0.25, method=["cls", ("merge", {"placement": "attn"})])
    plan = tokenprune.plan(model)
    assert [s.mid for s in plan.stages] == [False, False, True, True]
    out = model.forward_features(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 17, 48)


def test_bad_placement_and_unsupported_adapter_are_refused():
    model = tiny_vit()
    with pytest.raises(ValueError, match="placement must be"):
        tokenprune.apply(model, budget=0.5, method="merge", placement="mlp")
    from test_adapters_matrix import make_hf_clip

    hf = make_hf_clip()["model"]
    with pytest.raises(ValueError, match="does not support; use placement='block'"):
        tokenprune.apply(hf, budget=0.5, method="merge", placement="attn")
    assert not tokenprune.api.is_applied(hf)


def test_attn_placement_with_and_without_the_fused_residual_add_agree():
    """Inside the block, the merge gets the attention residual add's two halves (TokenState.residual) and adds
    them itself; with the fusion off the block adds them first. Same tokens either way."""
    from tokenprune import engine

    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    outs = []
    try:
        for flag in (True, False):
            engine.set_fuse_residual(flag)
            tokenprune.apply(model, budget=0.25, method="merge", placement="attn")
            prog = tokenprune.api.get_patch(model).program_for()
            assert prog.mid_fuse is flag
            with torch.no_grad():
                outs.append(model(x))
    finally:
        engine.set_fuse_residual(True)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton merge kernels)")
@pytest.mark.parametrize("batch,budget", [(64, 0.25), (8, 0.1), (1, 0.25)])
def test_gpu_attn_placement_fused_add_is_bit_identical_and_close_to_float32(batch, budget):
    """On CUDA the merge kernels add the attention branch in their row gather: the logits equal, bit for bit,
    those of the block adding it itself, and stay close to the float32 CPU model's."""
    import timm

    from tokenprune import engine

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    x = torch.randn(batch, 3, 224, 224)
    tokenprune.apply(model, budget=budget, method="merge", placement="attn")
    with torch.inference_mode():
        ref = model(x)
    gpu = model.cuda().half()
    outs = {}
    try:
        with torch.inference_mode():
            for fuse in (False, True):
                engine.set_fuse_residual(fuse)
                tokenprune.apply(gpu, budget=budget, method="merge", placement="attn")
                outs[fuse] = gpu(x.cuda().half())
    finally:
        engine.set_fuse_residual(True)
    assert torch.equal(outs[True], outs[False])
    cos = torch.nn.functional.cosine_similarity(outs[True].float().cpu(), ref).mean()
    assert cos > 0.95, cos  # fp16 may flip near-tied matches; a wrong merge (or add) would not stay this close
