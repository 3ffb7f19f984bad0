"""Core guarantees: budgets, exact remove, fused attention, mass conservation, batching, errors."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenprune
from tokenprune import ops
from tokenprune.state import TokenState

from conftest import tiny_vit

BUDGETS = [1.0, 0.5, 0.25, 0.1]


def out_tokens(model, x):
    feats = model.forward_features(x)
    return feats.shape[1] - model.num_prefix_tokens, feats


# -- budget meaning ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["merge", "cls", "random"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_tokens_leaving_match_budget(method, budget):
    model = tiny_vit(img_size=40)  # 100 patches
    x = torch.randn(2, 3, 40, 40)
    tokenprune.apply(model, budget=budget, method=method)
    with torch.no_grad():
        n, _ = out_tokens(model, x)
    assert n == math.floor(budget * 100 + 0.5)
    assert tokenprune.plan(model).num_out == n


def test_keep_count_rounding_rule():
    assert tokenprune.keep_count(0.25, 196) == 49
    assert tokenprune.keep_count(0.1, 196) == 20  # 19.6 -> 20
    assert tokenprune.keep_count(0.5, 25) == 13  # 12.5 rounds half up
    assert tokenprune.keep_count(1 / 196, 196) == 1


def test_budget_one_reproduces_unreduced_logits():
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        for method in ["merge", "cls", "random"]:
            tokenprune.apply(model, budget=1.0, method=method)
            torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["merge", "cls"])
def test_remove_is_bit_identical_to_never_patched(method):
    model = tiny_vit()
    pristine = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    tokenprune.apply(model, budget=0.25, method=method)
    with torch.no_grad():
        reduced = model(x)
    tokenprune.remove(model)
    with torch.no_grad():
        assert torch.equal(model(x), pristine(x))
        assert not torch.equal(reduced, pristine(x))
    assert type(model) is type(pristine) and type(model.blocks) is type(pristine.blocks)
    assert model.state_dict().keys() == pristine.state_dict().keys()
    assert "_tokenprune_patch" not in model.blocks.__dict__
    for (name, mod), (_, ref_mod) in zip(model.named_modules(), pristine.named_modules()):
        assert type(mod) is type(ref_mod), name
        assert not [k for k in mod.__dict__ if k.startswith("_tokenprune")], name


def test_apply_twice_replaces_never_stacks():
    model = tiny_vit(img_size=40)
    x = torch.randn(1, 3, 40, 40)
    tokenprune.apply(model, budget=0.5, method="merge")
    tokenprune.apply(model, budget=0.25, method="cls")
    with torch.no_grad():
        n, _ = out_tokens(model, x)
    assert n == 25
    assert tokenprune.plan(model).method == "cls"
    tokenprune.remove(model)
    assert type(model.blocks) is torch.nn.Sequential
    assert not tokenprune.is_applied(model)


def test_context_manager_restores_previous_patch():
    model = tiny_vit(img_size=40)
    tokenprune.apply(model, budget=0.5, method="merge")
    with tokenprune.applied(model, budget=0.1, method="cls"):
        assert tokenprune.plan(model).num_out == 10
    assert tokenprune.plan(model).method == "merge" and tokenprune.plan(model).num_out == 50


def test_plan_override_and_flop_ratio():
    model = tiny_vit(img_size=40)
    plan = tokenprune.plan(model, budget=0.25, method="cls")
    assert plan.num_out == 25 and 0 < plan.flop_ratio < 1
    tokenprune.apply(model, budget=0.3, method="cls", schedule={0: 60, 2: 30})
    with torch.no_grad():
        n, _ = out_tokens(model, torch.randn(1, 3, 40, 40))
    assert n == 30 and tokenprune.plan(model).tokens_per_block() == [100, 60, 60, 30]
    # FLOP ratio is the block FLOPs of the kept counts over the full counts
    p = tokenprune.plan(model)
    assert p.flop_ratio < tokenprune.plan(model, budget=1.0, method="cls").flop_ratio == 1.0


@pytest.mark.parametrize("method", ["random", "diverse"])
def test_schedule_before_the_first_block_as_layers_says(method):
    """``schedule={-1: k}`` is ``layers=[-1]`` for reducers that need no attention (-1: before block 0);
    a reducer that scores with a block's attention refuses -1 saying why."""
    model = tiny_vit(img_size=40)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        tokenprune.apply(model, budget=0.3, method=method, layers=[-1])
        by_layers, plan = model.forward_features(x), tokenprune.plan(model)
        tokenprune.apply(model, budget=0.3, method=method, schedule={-1: 30})
        by_schedule = model.forward_features(x)
    assert plan.to_dict() == tokenprune.plan(model).to_dict() and plan.tokens_per_block() == [30, 30, 30, 30]
    torch.testing.assert_close(by_schedule, by_layers, rtol=0, atol=0)
    for other in ("merge", "cls"):
        with pytest.raises(ValueError, match=rf"schedule block -1 \(before the first block\) is not possible for "
                                             rf"{other}.*follow block 0"):
            tokenprune.apply(model, budget=0.3, method=other, schedule={-1: 30})
        assert tokenprune.plan(model).to_dict() == plan.to_dict()  # the failed apply kept the earlier patch
    with pytest.raises(ValueError, match=r"outside the encoder's blocks -1\.\.3 \(-1 = before the first block\)"):
        tokenprune.apply(model, budget=0.3, method=method, schedule={-2: 30})
    tokenprune.remove(model)


def test_plan_at_another_budget_keeps_the_installed_methods_options():
    """``plan(model, budget=b)`` on a patched model: the installed method as configured (its options, a
    composition's reducers) at budget ``b`` -- what ``apply`` with that budget and the same options gives."""
    model = tiny_vit(depth=12)
    for method, options in [("merge", {"layers": [2, 5, 8]}), (["cls", "merge"], {}),
                            ("cls", {"variant": "sum", "layers": [3, 7]})]:
        tokenprune.apply(model, budget=0.25, method=method, **options)
        got = tokenprune.plan(model, budget=0.5)
        tokenprune.apply(model, budget=0.5, method=method, **options)
        assert got.to_dict() == tokenprune.plan(model).to_dict(), (method, options)
    tokenprune.apply(model, budget=0.25, method="merge", layers=[2, 5, 8])
    assert [s.block for s in tokenprune.plan(model, budget=0.5, method="merge", layers=[4]).stages] == [4]
    assert len(tokenprune.plan(model, budget=0.5, method="cls").stages) == 3  # another method: its own defaults
    tokenprune.remove(model)


# -- fused attention stays fused --------------------------------------------------------------
@pytest.mark.parametrize("method", ["merge", "cls", "random"])
def test_sdpa_only_no_eager_path(method, monkeypatch):
    model = tiny_vit()
    assert all(b.attn.fused_attn for b in model.blocks)
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(k.get("attn_mask"))
        return real(*a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)

    class EagerEntered(torch.nn.Module):  # only the eager branch calls attn_drop (a hook there would be refused)
        def forward(self, x):
            raise AssertionError("eager attention path entered")

    for blk in model.blocks:
        blk.attn.attn_drop = EagerEntered()
    tokenprune.apply(model, budget=0.25, method=method)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert len(calls) == len(model.blocks)
    if method != "merge":  # pruning keeps sizes 1: no mask, so the flash path stays available
        assert all(m is None for m in calls)
    else:  # merging passes proportional attention as an additive float mask
        assert calls[0] is None and all(m is not None and m.dtype.is_floating_point for m in calls[1:])


@pytest.mark.parametrize("b", [1, 3])
def test_key_bias_is_log_size_laid_out_for_sdpa(b):
    """The key bias ``[B, 1, 1, N]`` a state hands the blocks (built from the sizes, or the log sizes a merge kernel
    wrote) holds log(size); at batch 1 every stride but the last is a multiple of 8, as CUDA SDPA's memory-efficient
    kernel wants (it pads a copy of any other bias, in every block); attention with it equals attention with the
    bias built the plain way."""
    g = torch.Generator().manual_seed(0)
    n = 13
    sizes = torch.randint(1, 5, (b, n), generator=g).float()
    plain = sizes.log()[:, None, None, :]
    q = torch.randn(b, 2, n, 4, generator=g)
    made = TokenState(x=torch.randn(b, n, 8), num_prefix=1, num_input=n - 1, sizes=sizes)
    from_kernel = TokenState(x=torch.randn(b, n, 8), num_prefix=1, num_input=n - 1, sizes=sizes)
    from_kernel.set_attn_bias(sizes.log(), torch.float32)
    for bias in (made.attn_bias(torch.float32), from_kernel.attn_bias(torch.float32)):
        assert bias.shape == (b, 1, 1, n) and torch.equal(bias, plain)
        assert bias.stride(-1) == 1 and (b > 1 or all(s % 8 == 0 for s in bias.stride()[:-1]))
        assert torch.equal(F.scaled_dot_product_attention(q, q, q, attn_mask=bias),
                           F.scaled_dot_product_attention(q, q, q, attn_mask=plain))



def test_key_bias_of_a_float64_model_is_float64_log_size():
    """A float64 model's proportional attention adds log(size) to float64 precision: the bias was the float32 log
    cast up, 1e-8 off (a float64 ToMe forward written from the equations differed from the patched one by 1e-8)."""
    sizes = torch.tensor([[1.0, 2.0, 3.0, 7.0, 0.0]])  # sizes stay float32, as the reducers keep them
    for padded in (False, True):
        state = TokenState(x=torch.randn(1, 5, 4, dtype=torch.float64), num_prefix=1, num_input=4, sizes=sizes,
                           padded=padded)
        assert torch.equal(state.attn_bias(torch.float64)[0, 0, 0], sizes[0].double().log())
        assert torch.equal(state.attn_bias(torch.float32)[0, 0, 0], sizes[0].log())  # float32 unchanged

# -- merging ------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(2, 40), p=st.integers(0, 2), c=st.integers(1, 8),
       frac=st.floats(0.0, 1.0), seed=st.integers(0, 10_000), rounds=st.integers(1, 3))
def test_merge_conserves_size_weighted_mass(b, n, p, c, frac, seed, rounds):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, p + n, c, generator=g, dtype=torch.float64)
    state = TokenState.start(x, p)
    before = x[:, p:].sum(1)
    for _ in range(rounds):
        nn_ = state.num_tokens
        r = int(frac * (nn_ // 2))
        metric = torch.randn(b, p + nn_, 4, generator=g, dtype=torch.float64)
        state = ops.bipartite_merge(state, metric, r)
        assert state.num_tokens == nn_ - r
    sizes = state.sizes_or_ones().to(torch.float64)
    after = (state.x[:, p:] * sizes[:, p:, None]).sum(1)
    torch.testing.assert_close(after, before)
    assert torch.equal(state.x[:, :p], x[:, :p])
    assert float(sizes[:, p:].sum()) == b * n
    # the source map sends every original token to a token that holds it: un-merging puts the
    # merged features back on the grid, so the grid sum equals the size-weighted sum
    full, present = ops.unmerge(state.x, state)
    assert bool(present.all())
    torch.testing.assert_close(full.sum(1), after)
    counts = torch.zeros(b, p + state.num_tokens, dtype=torch.float64).scatter_add_(
        1, state.source, torch.ones_like(state.source, dtype=torch.float64))
    torch.testing.assert_close(counts[:, p:], sizes[:, p:])


def test_merge_joins_identical_tokens_first():
    # two exact duplicates among distinct tokens: one merge step with r=1 must join them
    x = torch.eye(6, dtype=torch.float64)[None]
    x[0, 3] = x[0, 0]  # token 0 (set A) duplicates token 3 (set B)
    state = ops.bipartite_merge(TokenState.start(x.clone(), 0), x, 1)
    assert state.num_tokens == 5
    assert state.source[0, 0] == state.source[0, 3]
    assert float(state.sizes[0, state.source[0, 0]]) == 2.0


def test_avg_pool_is_size_weighted():
    model = tiny_vit(class_token=False, global_pool="avg", img_size=40)
    x = torch.randn(2, 3, 40, 40)
    tokenprune.apply(model, budget=0.25, method="merge")
    with torch.no_grad():
        feats, state = tokenprune.features(model, x)
        pooled = model.forward_head(feats, pre_logits=True, sizes=state.sizes)
        full, present = tokenprune.unmerge(feats, state)
        with pytest.raises(ValueError, match="sizes"):  # reduced tokens without their sizes: a clear error
            model.forward_head(feats, pre_logits=True)
    assert bool(present.all())
    torch.testing.assert_close(pooled, model.fc_norm(full.mean(1)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,global_pool", [("vit_small_patch16_224", "avg"), ("vit_small_patch16_224", "map"),
                                              ("vit_small_patch16_224", "avgmax"), ("vit_small_patch16_dinov3", "avg")])
def test_pool_method_is_size_weighted_or_refused(name, global_pool):
    """timm's public ``model.pool(tokens)`` (what ``forward_head`` calls) on reduced tokens: with ``sizes=`` it pools
    as the patched forward does; without them a size-weighted pooling refuses, as ``forward_head`` does (it returned
    the unweighted pooling of the reduced tokens, silently). 'token' pooling and pruning without merging (no sizes)
    still run as before."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3,
                              num_classes=10, global_pool=global_pool).eval()
    x = torch.randn(2, 3, 32, 32)
    tokenprune.apply(model, budget=0.25, method="merge")
    with torch.no_grad():
        feats, state = tokenprune.features(model, x)
        full, _ = tokenprune.unmerge(feats, state)
        p = model.num_prefix_tokens
        unpatched = type(model).__dict__["_tokenprune_original_class"]
        want = unpatched.pool(model, torch.cat([feats[:, :p], full], 1))  # the unreduced pooling of the unmerged tokens
        torch.testing.assert_close(model.pool(feats, sizes=state.sizes), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True, sizes=state.sizes),
                                   model.fc_norm(want), rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="sizes"):
            model.pool(feats)
        tokenprune.apply(model, budget=0.25, method="cls")  # pruning: no sizes, the forward pools the kept tokens
        feats, state = tokenprune.features(model, x)
        torch.testing.assert_close(model(x), model.forward_head(feats, sizes=state.sizes))
        model.reset_classifier(10, "token")
        torch.testing.assert_close(model.pool(feats), feats[:, 0])


@pytest.mark.parametrize("global_pool", ["avg", "map"])
def test_forward_head_without_sizes_refused_on_a_larger_input(global_pool):
    """dynamic_img_size: an input larger than the default keeps more tokens than the default grid has; its reduced
    tokens without sizes must still be refused by a size-weighted pooling, not pooled unweighted."""
    model = tiny_vit(class_token=False, global_pool=global_pool, dynamic_img_size=True)  # default: 8 x 8 patches
    tokenprune.apply(model, budget=0.5, method="merge")
    x = torch.randn(2, 3, 48, 48)  # 144 patches -> 72 tokens, more than the default 64
    with torch.no_grad():
        feats, state = tokenprune.features(model, x)
        assert feats.shape[1] == 72 > 64
        torch.testing.assert_close(model.forward_head(feats, sizes=state.sizes), model(x))
        with pytest.raises(ValueError, match="sizes"):
            model.forward_head(feats)


@pytest.mark.parametrize("global_pool", ["avg", "map"])
def test_forward_head_without_sizes_at_budget_one_on_a_smaller_input(global_pool):
    """dynamic_img_size at budget 1.0: an input smaller than the default has fewer tokens than the default grid, yet
    none is reduced, so timm's forward_head(forward_features(x)) runs and equals the unpatched model (it was refused
    as 'reduced tokens without their sizes'). A reducer that drops tokens at budget 1.0 (threshold) still refuses."""
    model = tiny_vit(class_token=False, global_pool=global_pool, dynamic_img_size=True)  # default: 8 x 8 patches
    x = torch.randn(2, 3, 24, 16)  # 6 x 4 patches
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x))
        tokenprune.apply(model, budget=1.0, method="merge")
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.pool(model.forward_features(x)), model.pool(model.forward_features(x),
                                   sizes=None))
        tokenprune.apply(model, budget=1.0, method="threshold")
        with pytest.raises(ValueError, match="sizes"):
            model.forward_head(model.forward_features(x))


def test_unmerge_marks_dropped_patches():
    model = tiny_vit(img_size=40)
    tokenprune.apply(model, budget=0.25, method="cls")
    with torch.no_grad():
        feats, state = tokenprune.features(model, torch.randn(2, 3, 40, 40))
    full, present = tokenprune.unmerge(feats, state)
    assert full.shape == (2, 100, 48) and present.sum(1).tolist() == [25, 25]
    assert float(full[~present].abs().sum()) == 0.0


def test_unmerge_refuses_tokens_that_do_not_belong_to_the_state():
    """The source map indexes the state's tokens (prefix included): other tokens are refused, not gathered from --
    the unreduced model's tokens (longer) would otherwise give a dense map silently, and other shapes an index error."""
    model = tiny_vit(img_size=40)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        unreduced = model.forward_features(x)  # [2, 101, 48]
        tokenprune.apply(model, budget=0.25, method="merge")
        feats, state = tokenprune.features(model, x)  # [2, 26, 48]
    for bad in (unreduced, feats[:, 1:], feats[:1], feats[0]):
        with pytest.raises(ValueError, match="tokenprune.features"):
            tokenprune.unmerge(bad, state)
    for args in ((state, feats), (feats, None)):  # swapped, or no state: a TypeError naming the order
        with pytest.raises(TypeError, match=r"unmerge\(tokens, state\)"):
            tokenprune.unmerge(*args)
    full, present = tokenprune.unmerge(feats, state)
    assert full.shape == (2, 100, 48) and bool(present.all())


def test_unmerge_dense_map_on_the_input_grid_after_pool():
    """The README's dense map: ``full.view(B, *state.input_grid, C)``; ``state.grid`` is the pooled grid after pool."""
    model = tiny_vit(img_size=(32, 48))  # 8 x 12 patches
    tokenprune.apply(model, budget=0.25, method="pool")
    with torch.no_grad():
        feats, state = tokenprune.features(model, torch.randn(2, 3, 32, 48))
    full, present = tokenprune.unmerge(feats, state)
    assert state.input_grid == (8, 12) and state.grid != state.input_grid
    dense = full.view(2, *state.input_grid, 48)
    # every patch of a pooled cell gets that cell's token
    src = state.source.view(2, 8, 12)
    assert torch.equal(dense[1, 3, 5], feats[1, src[1, 3, 5]]) and bool(present.all())


# -- different counts per sample -------------------------------------------------------------------
def test_threshold_batch_equals_each_sample_alone():
    torch.manual_seed(1)
    model = tiny_vit(img_size=40)
    xs = torch.randn(3, 3, 40, 40)
    xs[1] *= 4  # make the samples' score distributions differ
    tokenprune.apply(model, budget=0.5, method="cls", threshold=0.01, layers=[0, 2])
    with torch.no_grad():
        batched, state = tokenprune.features(model, xs)
        kept = state.kept_per_sample()
        logits_b = model.forward_head(batched, sizes=state.sizes)
        alone = [model.forward_features(xs[i:i + 1]) for i in range(3)]
    counts = [a.shape[1] - 1 for a in alone]
    assert kept.tolist() == counts
    assert len(set(counts)) > 1, "test needs samples that keep different counts"
    for i, a in enumerate(alone):
        torch.testing.assert_close(logits_b[i:i + 1], model.forward_head(a), rtol=1e-4, atol=1e-5)
        valid = state.sizes[i] > 0
        torch.testing.assert_close(batched[i][valid], a[0], rtol=1e-4, atol=1e-5)


# -- timm models of current timm -----------------------------------------------------------------
MODELS = [
    ("vit_small_patch16_224", {}),
    ("vit_base_patch16_224", {}),
    ("deit_small_distilled_patch16_224", {}),
    ("vit_small_patch14_reg4_dinov2", {}),
    ("vit_small_patch14_dinov2", {}),
    ("vit_small_patch16_224", {"qk_norm": True}),
    ("vit_small_patch16_224", {"class_token": False, "global_pool": "avg"}),
    ("vit_small_patch16_224", {"class_token": False, "global_pool": "map"}),
]


@pytest.mark.parametrize("name,kw", MODELS, ids=[f"{n}{'-' + '-'.join(k) if k else ''}" for n, k in MODELS])
def test_timm_family(name, kw):
    import timm

    torch.manual_seed(0)
    patch = 14 if "patch14" in name else 16
    size = patch * 6  # 36 patches keeps CPU time small
    kw = dict(kw, img_size=size, num_classes=5, depth=3)  # each family's widths and options; 3 blocks: both reduce
    if "dinov2" in name:
        kw["init_values"] = 1e-5
    model = timm.create_model(name, pretrained=False, **kw).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = model(x)
        for method in ["merge", "cls"]:
            tokenprune.apply(model, budget=1.0, method=method)
            torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
            tokenprune.apply(model, budget=0.25, method=method)
            feats, state = tokenprune.features(model, x)
            assert feats.shape[1] == model.num_prefix_tokens + 9
            out = model.forward_head(feats, sizes=state.sizes)
            torch.testing.assert_close(out, model(x))
            assert out.shape == ref.shape and torch.isfinite(out).all()
        tokenprune.remove(model)
        assert torch.equal(model(x), ref)  # ref: the same model's forward before any patch


@pytest.mark.parametrize("method", ["merge", "pool"])
def test_distilled_deit_reduced_logits_average_both_heads(method):
    """DeiT distilled: timm's head averages the [CLS] head and the distillation head. A reduction with sizes (merge,
    pool) must keep that head, not pool the [CLS] token into ``head`` alone."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_small_distilled_patch16_224", pretrained=False, img_size=32, patch_size=4,
                              embed_dim=48, depth=3, num_heads=3, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    tokenprune.apply(model, budget=0.25, method=method)
    with torch.no_grad():
        feats, state = tokenprune.features(model, x)
        assert state.sizes is not None  # the path that pools with sizes
        own = timm.models.deit.VisionTransformerDistilled.forward_head  # timm's own head on the same tokens
        torch.testing.assert_close(model(x), own(model, feats))
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True, sizes=state.sizes),
                                   own(model, feats, pre_logits=True))


@pytest.mark.parametrize("method", ["merge", "pool"])
@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch16_rope_reg1_gap_256"])
def test_timm_set_input_size_after_apply(name, method):
    """timm's ``model.set_input_size(img_size=...)`` after apply: the forward and ``plan(model)`` use the new grid
    (the adapter read the grid at apply: pool found no grid, and plan() reported the old input)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=3,
                              num_classes=5).eval()  # 8 x 8 patches
    tokenprune.apply(model, budget=0.5, method=method)
    model.set_input_size(img_size=(48, 48))  # 12 x 12
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        feats, state = tokenprune.features(model, x)
    assert state.input_grid == (12, 12)
    plan = tokenprune.plan(model)
    assert plan.info.num_tokens == 144 and feats.shape[1] - model.num_prefix_tokens == plan.num_out


# -- errors ---------------------------------------------------------------------------------------------
def test_registry_and_recipes_know_the_built_in_methods_on_their_own():
    """``tokenprune.recipes`` / ``tokenprune.registry`` used first in a fresh interpreter (the package imports
    lazily): the built-in methods are registered, not an empty list making every recipe "not registered"."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("from tokenprune.recipes import load_recipe\n"
            "assert load_recipe('default-vit').apply_kwargs()['method'] == 'merge'\n"
            "from tokenprune import registry\n"
            "assert 'merge' in registry.methods() and registry.make('cls').name == 'cls'\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_clear_errors():
    model = tiny_vit()
    for bad in [0, -0.1, 1.5, float("nan")]:
        with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
            tokenprune.apply(model, budget=bad)
    with pytest.raises(TypeError, match="budget must be a number"):
        tokenprune.apply(model, budget="half")
    with pytest.raises(ValueError, match="rounds to 0"):
        tokenprune.apply(model, budget=0.001)
    with pytest.raises(ValueError, match="unknown method 'tome'.*known methods: .*merge"):
        tokenprune.apply(model, budget=0.5, method="tome")
    with pytest.raises(TypeError, match="no option.*ratio.*its options are"):
        tokenprune.apply(model, budget=0.5, method="merge", ratio=3)
    for typo, meant in [("mrege", "merge"), ("MERGE", "merge"), ("tome", "merge"), ("ToMe", "merge"), ("divprune", "diverse"), ("treshold", "threshold"), ("ranom", "random")]:
        with pytest.raises(ValueError, match=f"unknown method '{typo}'; did you mean '{meant}'\\?"):
            tokenprune.apply(model, budget=0.5, method=typo)
    with pytest.raises(TypeError, match="no option.*layres; did you mean 'layers'\\?"):
        tokenprune.apply(model, budget=0.5, method="merge", layres=[1])
    with pytest.raises(TypeError, match="no adapter for .*Linear.*Supported model families: timm"):
        tokenprune.apply(torch.nn.Linear(2, 2), budget=0.5)
    for flag in ["no", 0, None]:  # a string is truthy: "no" was track_source=True
        with pytest.raises(TypeError, match="track_source must be True or False"):
            tokenprune.apply(model, budget=0.5, track_source=flag)
    assert not tokenprune.is_applied(model)
    with pytest.raises(ValueError, match="outside the encoder's blocks"):
        tokenprune.apply(model, budget=0.5, method="cls", layers=[7])
    assert not tokenprune.is_applied(model)
    tokenprune.apply(model, budget=0.5)
    with pytest.raises(ValueError, match="attn_mask"):
        model.forward_features(torch.randn(1, 3, 32, 32), attn_mask=torch.zeros(1, 1, 65, 65))
    with pytest.raises(NotImplementedError, match="forward_intermediates"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("dynamic", [False, True])
def test_timm_patch_dropout_in_training_refused(dynamic):
    """timm's patch dropout keeps a random subset of the patches in training: they no longer form the grid (with
    dynamic_img_size the adapter read the full grid for them). Refused as for Eva / NaFlexVit; eval is unaffected."""
    model = tiny_vit(patch_drop_rate=0.5, dynamic_img_size=dynamic)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    tokenprune.apply(model, budget=1.0, method="merge")
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)  # eval: patch dropout is off
    model.train()
    for method in ["merge", "pool"]:
        tokenprune.apply(model, budget=0.5, method=method)
        with pytest.raises(RuntimeError, match="patch dropout"):
            model(x)


# -- the real pretrained classifier from the shared assets ---------------------------------------
@pytest.mark.slow
@pytest.mark.xdist_group("real-vit-s14")  # shares the loaded model with test_real_weights_hf.py
def test_real_vit_s14_cifar10(real_vit_s14, one_thread):
    model, x, ref = copy.deepcopy(real_vit_s14.model), real_vit_s14.x, real_vit_s14.ref  # ref: model(x), unpatched
    assert (ref.argmax(1) == real_vit_s14.labels).float().mean() >= 0.75  # the weights really loaded
    with torch.no_grad():
        for budget in BUDGETS:
            tokenprune.apply(model, budget=budget, method="merge")
            n, feats = out_tokens(model, x)
            assert n == math.floor(budget * 256 + 0.5)
            if budget == 1.0:
                torch.testing.assert_close(model.forward_head(feats), ref, rtol=1e-5, atol=1e-5)
        tokenprune.remove(model)
        assert torch.equal(model(x), ref)  # the same weights' forward before any patch


@pytest.mark.parametrize("method,init_values,drop_path", [("merge", 0.5, 0.0), ("merge", None, 0.2),
                                                          ("maelre", 0.5, 0.0)])
def test_merge_leaves_the_last_residual_add_to_the_merge(monkeypatch, method, init_values, drop_path):
    """Blocks followed by a merge hand over their input to the last residual add and the MLP branch;
    the merge adds them. Same logits as with every block's own add (TOKENPRUNE_FUSE_RESIDUAL=0), with
    LayerScale, with DropPath in eval mode, and for MAELRE (linear attention in the early blocks)."""
    import importlib

    merge_mod = importlib.import_module(f"tokenprune.reducers.{method}")
    model = tiny_vit(init_values=init_values, drop_path_rate=drop_path)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    deferred = []
    real = merge_mod.bipartite_merge

    def spy(state, metric, r):
        deferred.append(state.residual is not None)
        out = real(state, metric, r)
        assert out.residual is None
        return out

    monkeypatch.setattr(merge_mod, "bipartite_merge", spy)
    outs = {}
    for fuse in ("1", "0"):
        monkeypatch.setattr(tokenprune.engine, "_FUSE", fuse == "1")
        tokenprune.apply(model, budget=0.25, method=method)
        deferred.clear()
        with torch.no_grad():
            outs[fuse] = model(x)
        assert deferred and all(d == (fuse == "1") for d in deferred)
    assert torch.equal(outs["1"], outs["0"])


@pytest.mark.parametrize("pool", ["map"])
def test_attention_pool_of_a_float64_model_takes_a_float64_log_size(pool):
    """The attention pool's key bias is log(size); a float64 model takes the log in float64 (the sizes are float32:
    a float32 log cast up is off by about 1e-8)."""
    model = tiny_vit(global_pool=pool).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    tokenprune.apply(model, budget=0.3, method="merge")
    tokens, state = tokenprune.features(model, x)
    p = model.num_prefix_tokens
    xs, sizes = (tokens, state.sizes) if model.pool_include_prefix else (tokens[:, p:], state.sizes[:, p:])
    want = model.attn_pool(xs, attn_mask=sizes.double().log()[:, None, None, :])
    got = model.forward_head(tokens, pre_logits=True, sizes=state.sizes)
    assert not torch.equal(sizes.double().log(), sizes.log().double())  # the two logs differ on these sizes
    torch.testing.assert_close(got, model.fc_norm(want), rtol=0, atol=1e-14)
