"""RoPE encoders: timm ``Eva`` (EVA02, DINOv3, RoPE ViTs incl. mixed RoPE, Perception Encoder, post-norm blocks).

Every token carries a position through pruning and merging (``TokenState.positions``) and each block's rotary
embedding is taken at the kept tokens' positions. Tested: with pruning only, the kept tokens after the next
blocks equal timm's own blocks run on the kept tokens at their original rotary positions (float64); the
position a merged token carries; and the adapter matrix (budget 1.0 = unpatched, exactly K tokens for merge /
cls / apet / random / pool, ``remove`` bit-identical, a padded batch equals each sample alone, timm's own
attention forward (with its unfused eager path) never entered).
"""
from __future__ import annotations

import pytest
import torch

import tokenprune
from tokenprune.plan import keep_count
from tokenprune.state import TokenState

from conftest import SDPASpy, compile_cases, compiled_equals_eager

timm = pytest.importorskip("timm")


pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=5)
# timm name -> what it exercises
EVA = {
    "eva02_tiny_patch14_224": "cat rope, SwiGLU + scale-norm MLP, [CLS], avg pool",
    "vit_small_patch16_dinov3": "DINOv3 rope, 4 registers, LayerScale, token pool",
    "vit_small_patch16_rope_mixed_224": "mixed rope (per block and head tables), AttentionRope",
    "vit_pe_core_tiny_patch16_384": "Perception Encoder: AttentionRope, map pooling",
    "vit_base_patch16_rope_reg1_gap_256": "cat rope, 1 register, no [CLS]... avg pool",
}
METHODS = [("merge", {}), ("cls", {}), ("apet", {"k": 2}), ("random", {}), ("pool", {}),
           ("merge", {"placement": "attn"}), ("pitome", {})]



def make(name, **kw):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, **{**TINY, **kw}).eval()
    with torch.no_grad():  # zero-initialised prefix tokens / LayerScale would hide mistakes
        for p in (getattr(m, "reg_token", None), getattr(m, "cls_token", None)):
            if p is not None:
                p.normal_()
    return m


def make_post_norm():
    from timm.models.eva import Eva

    torch.manual_seed(0)
    return Eva(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, num_classes=5, use_post_norm=True,
               use_rot_pos_emb=True, use_abs_pos_emb=True, ref_feat_shape=(4, 4)).eval()


def _kept(state: TokenState) -> torch.Tensor:
    """``[B, N]`` the input token each current non-prefix token holds (pruning: exactly one)."""
    p, b, n = state.num_prefix, state.x.shape[0], state.num_tokens
    out = torch.full((b, n), -1, dtype=torch.long)
    for i in range(b):
        for j, s in enumerate(state.source[i].tolist()):
            if s >= p:
                assert out[i, s - p] == -1, "pruning only: one input token per token"
                out[i, s - p] = j
    assert (out >= 0).all()
    return out


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_small_patch16_dinov3",
                                  "vit_small_patch16_rope_mixed_224", "post_norm"])
@pytest.mark.parametrize("method", ["cls", "random"])
def test_pruned_tokens_keep_their_rotary_positions(name, method):
    """Prune after block 1; blocks 2 and 3 on the kept tokens equal timm's own blocks run on those tokens with
    their original rotary positions (float64)."""
    m = (make_post_norm() if name == "post_norm" else make(name)).double()
    for buf in ("t_x", "t_y"):  # mixed RoPE's grid buffers stay float32 (timm 1.0.29 computes its table in float32)
        if getattr(getattr(m, "rope", None), buf, None) is not None:
            setattr(m.rope, buf, getattr(m.rope, buf).float())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    p = m.num_prefix_tokens
    torch.manual_seed(0)  # random: seed=None draws per sample (a seed keeps the same positions in every sample)
    tokenprune.apply(m, 0.5, method, layers=[1], **({"seed": None} if method == "random" else {}))
    try:
        with torch.no_grad():
            tokens, state = tokenprune.features(m, x)
    finally:
        tokenprune.remove(m)
    kept = _kept(state)
    assert kept.shape[1] == 8 and not torch.equal(kept[0], kept[1]) or method == "cls"
    with torch.no_grad():
        h, rope = m._pos_embed(m.patch_embed(x))
        h = m.norm_pre(h)
        mixed = getattr(m, "rope_mixed", False)
        for i in range(2):
            h = m.blocks[i](h, rope=rope[i] if mixed else rope)
        idx = torch.cat([torch.arange(p).expand(2, p), kept + p], 1)
        h = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
        for i in range(2, 4):
            table = rope[i] if mixed else rope
            if mixed:  # [H, N0, E] -> [B, H, N, E]
                r = torch.stack([table[:, kept[b]] for b in range(2)])
            else:  # [N0, E] -> [B, 1, N, E]
                r = torch.stack([table[kept[b]] for b in range(2)])[:, None]
            h = m.blocks[i](h, rope=r)
        want = m.norm(h)
    assert tokens.dtype == torch.float64
    torch.testing.assert_close(tokens, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["cls", "random"])
def test_hf_dinov3_pruned_tokens_keep_their_rotary_positions(method):
    """The same for transformers' ``DINOv3ViTModel``: its own layers on the kept tokens at their (cos, sin) rows."""
    dinov3 = pytest.importorskip("transformers.models.dinov3_vit")  # transformers >= 5.17
    torch.manual_seed(0)
    cfg = dinov3.DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                 image_size=32, patch_size=8, num_register_tokens=2)
    m = dinov3.DINOv3ViTModel(cfg).eval().double()
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)  # a 4 x 6 grid
    tokenprune.apply(m, 0.5, method, layers=[1])
    try:
        with torch.no_grad():
            tokens, state = tokenprune.features(m, x)
    finally:
        tokenprune.remove(m)
    kept, p = _kept(state), 3
    assert kept.shape[1] == 12
    with torch.no_grad():
        h = m.embeddings(x)
        cos, sin = m.rope_embeddings(x)
        for i in range(2):
            h = m.model.layer[i](h, position_embeddings=(cos, sin))
        idx = torch.cat([torch.arange(p).expand(2, p), kept + p], 1)
        h = h.gather(1, idx[..., None].expand(-1, -1, h.shape[-1]))
        rows = (torch.stack([cos[kept[b]] for b in range(2)])[:, None], torch.stack([sin[kept[b]] for b in range(2)])[:, None])
        for i in range(2, 4):
            h = m.model.layer[i](h, position_embeddings=rows)
        want = m.norm(h)
    torch.testing.assert_close(tokens, want, rtol=1e-10, atol=1e-10)


def test_position_a_merged_token_carries():
    """Pruned: its own; merged: the held patch nearest the centroid of its patches (ties: lowest index)."""
    grid = (4, 4)
    state = TokenState.start(torch.zeros(1, 17, 2), 1, grid)
    # 16 patches -> 4 tokens: token 0 holds patches {0, 1, 2} (centroid (0, 1): patch 1), token 1 holds {5}
    # (pruned: its own), token 2 holds {10, 11, 14, 15} (centroid (2.5, 2.5): all four tie -> 10), token 3 holds
    # {3, 7} (tie -> 3); the rest were dropped.
    src = torch.full((1, 16), -1)
    for tok, patches in enumerate([[0, 1, 2], [5], [10, 11, 14, 15], [3, 7]]):
        src[0, patches] = 1 + tok
    state.x, state.source = torch.zeros(1, 5, 2), src
    assert state.positions().tolist() == [[1, 5, 10, 3]]
    state.source = src.clone()  # a new source map: computed again, not read from the cache
    src2 = state.source
    src2[0, 14] = -1  # token 2 now holds {10, 11, 15}: centroid (2.33, 2.67), nearest 11
    assert state.positions().tolist() == [[1, 5, 11, 3]]
    fresh = TokenState.start(torch.zeros(1, 17, 2), 1, grid)
    assert fresh.positions() is None  # no reduction yet: the input tokens, in order
    fresh.source = None
    fresh.x = torch.zeros(1, 5, 2)
    with pytest.raises(ValueError, match="track_source=True"):
        fresh.positions()


def _families():
    fams = {name: (lambda name=name: make(name)) for name in EVA}
    fams["post_norm"] = make_post_norm
    return fams


FAMILIES = _families()


class _Spy(SDPASpy):
    def __init__(self, monkeypatch):
        from timm.layers.attention import AttentionRope
        from timm.models.eva import EvaAttention

        super().__init__(monkeypatch)

        def boom(cls):
            def forward(*a, **k):
                raise AssertionError("timm's own attention forward was entered")
            # keep the name the adapter's check recognises: only entering it fails
            forward.__qualname__, forward.__module__ = cls.forward.__qualname__, cls.forward.__module__
            return forward

        monkeypatch.setattr(EvaAttention, "forward", boom(EvaAttention))
        monkeypatch.setattr(AttentionRope, "forward", boom(AttentionRope))


def _snapshot(model):
    return {n: type(m) for n, m in model.named_modules()}, list(model.state_dict())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_matrix(family, monkeypatch):
    model = FAMILIES[family]()
    x = torch.randn(2, 3, 32, 32)
    p, n = model.num_prefix_tokens, 16
    before = _snapshot(model)
    with torch.no_grad():
        ref, ref_feats = model(x), model.forward_features(x)
        for method in ("merge", "cls"):
            tokenprune.apply(model, 1.0, method)
            try:
                torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(model.forward_features(x), ref_feats, rtol=1e-5, atol=1e-6)
            finally:
                tokenprune.remove(model)
    for fused in {getattr(b.attn, "fused_attn", True) for b in model.blocks}:
        assert fused  # otherwise entering timm's attention would have taken the eager path anyway
    for b in model.blocks:  # make timm's attention take its eager path, should anything call it
        b.attn.fused_attn = False
    spy = _Spy(monkeypatch)
    for method, kw in METHODS:
        for budget in (0.5, 0.25):
            tokenprune.apply(model, budget, method, **kw)
            try:
                plan = tokenprune.plan(model)
                k = keep_count(budget, n)
                assert plan.num_out == k, (family, method, budget, plan.num_out)
                spy.calls = 0
                with torch.no_grad():
                    tokens, state = tokenprune.features(model, x)
                    y = model(x)
                assert spy.calls >= 2 * plan.info.depth, (family, method, spy.calls)
                assert tokens.shape[1] - p == k, f"{family}/{method}@{budget}: {tokens.shape[1] - p} tokens, not {k}"
                assert y.shape == ref.shape and torch.isfinite(y).all()
            finally:
                tokenprune.remove(model)
    monkeypatch.undo()
    for b in model.blocks:
        b.attn.fused_attn = True
    assert _snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("family", ["eva02_tiny_patch14_224", "vit_small_patch16_dinov3",
                                    "vit_small_patch16_rope_mixed_224"])
def test_padded_batch_matches_single(family):
    """``cls`` with a score threshold keeps different counts per sample; each sample gets what it gets alone
    (positions of padding slots are masked keys)."""
    model = FAMILIES[family]()
    x = torch.randn(2, 3, 32, 32)
    x = torch.stack([x[0], 4 * x[1].flip(-1)])
    uniform = 1.0 / (16 + model.num_prefix_tokens)
    for t in [f * uniform for f in (1.0, 0.998, 1.002, 0.995, 1.005, 0.99, 1.01, 0.98, 1.02, 0.95, 1.05, 0.9, 1.1)]:
        tokenprune.apply(model, 0.75, "cls", threshold=t, layers=[1])
        try:
            with torch.no_grad():
                single = [tokenprune.features(model, x[i:i + 1])[0].shape[1] for i in range(2)]
                if len(set(single)) == 1:
                    continue
                tokens, state = tokenprune.features(model, x)
                both = model(x)
                alone = torch.cat([model(x[i:i + 1]) for i in range(2)])
        finally:
            tokenprune.remove(model)
        assert tokens.shape[1] == max(single) and state.padded
        torch.testing.assert_close(both, alone, rtol=1e-4, atol=1e-5)
        return
    pytest.fail(f"{family}: no threshold gave the two samples different counts")


def test_dynamic_size_non_square_grid_pools_neighbours():
    """A 32x128 input on a dynamic-size Eva is a 4x16 grid (a square count, 64): ``pool`` groups neighbours."""
    model = make("eva02_tiny_patch14_224", dynamic_img_size=True)
    x = torch.randn(1, 3, 32, 128)
    tokenprune.apply(model, 0.25, "pool")
    try:
        with torch.no_grad():
            tokens, state = tokenprune.features(model, x)
    finally:
        tokenprune.remove(model)
    assert state.input_grid == (4, 16) and state.num_input == 64
    src = state.source[0] - model.num_prefix_tokens
    for tok in src.unique().tolist():
        rows, cols = [], []
        for i in (src == tok).nonzero().flatten().tolist():
            rows.append(i // 16)
            cols.append(i % 16)
        assert max(rows) - min(rows) <= 2 and max(cols) - min(cols) <= 2, (tok, rows, cols)


def test_refusals():
    m = make("eva02_tiny_patch14_224")
    with pytest.raises(ValueError, match="track_source=True"):
        tokenprune.apply(m, 0.5, "merge", track_source=False)
    assert not tokenprune.is_applied(m)
    tokenprune.apply(m, 0.5, "merge")
    try:
        with pytest.raises(ValueError, match="attn_mask"):
            m(torch.randn(1, 3, 32, 32), attn_mask=torch.zeros(1, 1, 17, 17))
        with pytest.raises(NotImplementedError, match="forward_intermediates"):
            m.forward_intermediates(torch.randn(1, 3, 32, 32))
        m.set_grad_checkpointing(True)
        with pytest.raises(RuntimeError, match="reduced timm Eva model.*set_grad_checkpointing"):
            m(torch.randn(1, 3, 32, 32))
        m.set_grad_checkpointing(False)
        tokens, state = tokenprune.features(m, torch.randn(1, 3, 32, 32))
        with pytest.raises(ValueError, match="sizes"):
            m.forward_head(tokens)
        assert m.forward_head(tokens, sizes=state.sizes).shape == (1, 5)
    finally:
        tokenprune.remove(m)


@pytest.mark.xdist_group("fullgraph-rope_encoders")
@pytest.mark.parametrize("method", ["merge", "cls", "random", "pool", "maelre"])
def test_compiles_fullgraph(method, fullgraph, request):
    """Positions are derived without host syncs: a reduced RoPE model compiles with no graph break."""
    compiled_equals_eager(fullgraph, request)


def _compile_case(method):
    model = make("eva02_tiny_patch14_224", depth=2)
    tokenprune.apply(model, 0.5, method)  # maelre merges at most half per step: one step in two blocks
    return model, torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def fullgraph(request):
    """The selected cases of test_compiles_fullgraph, compiled with fullgraph=True in one trace (conftest)."""
    return compile_cases(request, {"test_compiles_fullgraph": _compile_case})


def test_hf_dinov3_merges_between_attention_and_mlp():
    """placement='attn' (ToMe's) on HF DINOv3: the layer performs the merge between attention and MLP."""
    dinov3 = pytest.importorskip("transformers.models.dinov3_vit")
    torch.manual_seed(0)
    cfg = dinov3.DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                 image_size=32, patch_size=8, num_register_tokens=2)
    m = dinov3.DINOv3ViTModel(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        block = None
        for placement in ("block", "attn"):
            tokenprune.apply(m, 0.25, "merge", placement=placement)
            try:
                tokens, state = tokenprune.features(m, x)
                plan = tokenprune.plan(m)
            finally:
                tokenprune.remove(m)
            assert tokens.shape[1] == 3 + keep_count(0.25, 16) and torch.isfinite(tokens).all()
            assert all(s.mid == (placement == "attn") for s in plan.stages)
            if block is None:
                block = tokens
        assert not torch.allclose(tokens, block, atol=1e-4)  # a different placement, a different computation
