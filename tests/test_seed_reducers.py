"""The seed reducers (maelre, apet, threshold, pool) and composition (pipeline)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import tokenprune
from tokenprune.plan import EncoderInfo, Stage
from tokenprune.reducers import apet as apet_mod
from tokenprune.reducers import maelre as maelre_mod
from tokenprune.reducers.pool import GatedCrossAttention, Pool
from tokenprune.state import TokenState

from conftest import tiny_vit

BUDGETS = [0.5, 0.25, 0.1]
CASES = {  # method -> options for the tiny ViT (64 patches, depth 4)
    "maelre": dict(switch_at=40),
    "apet": dict(k=4),
    "threshold": {},
    "pool": {},
    "pool_bilinear": dict(mode="bilinear"),
    "cls_merge": {},
}


def _apply(model, name, budget):
    opts = dict(CASES[name])
    method = {"pool_bilinear": "pool", "cls_merge": ["cls", "merge"]}.get(name, name)
    return tokenprune.apply(model, budget=budget, method=method, **opts)


def _model(cls_token):  # depth 6: bipartite merging (maelre) removes at most half per block
    return tiny_vit(depth=6) if cls_token else tiny_vit(depth=6, class_token=False, global_pool="avg")


@pytest.mark.parametrize("cls_token", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_budget_and_exact_remove(name, cls_token):
    model = _model(cls_token)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    keys = list(model.state_dict())
    classes = [type(m) for m in model.modules()]
    for budget in BUDGETS:
        _apply(model, name, budget)
        with torch.no_grad():
            feats, st = tokenprune.features(model, x)
            logits = model.forward_head(feats, sizes=st.sizes)
        p = model.num_prefix_tokens
        keep = math.floor(budget * 64 + 0.5)
        assert tokenprune.plan(model).num_out == keep  # 8x8 grid: every keep here is a pooled grid
        assert feats.shape[1] - p == keep
        assert torch.isfinite(logits).all()
        # every original patch is accounted for exactly once (sizes sum to the input count)
        if name in ("maelre", "apet", "pool", "pool_bilinear"):  # mergers: every patch counted exactly once
            assert torch.allclose(st.sizes_or_ones()[:, p:].sum(1), torch.full((3,), 64.0))
        tokenprune.remove(model)
        with torch.no_grad():
            assert torch.equal(model(x), ref)
        assert list(model.state_dict()) == keys
        assert [type(m) for m in model.modules()] == classes


# -- errors ----------------------------------------------------------------------------------------
def test_errors_for_nonsense_options():
    model = tiny_vit()
    with pytest.raises(ValueError, match="k=100"):
        tokenprune.apply(model, budget=0.5, method="apet", k=100)
    with pytest.raises(ValueError, match="fewer than the k=10"):
        tokenprune.apply(model, budget=0.1, method="apet")  # 6 kept < 10 basis tokens
    with pytest.raises(ValueError, match="outside"):
        tokenprune.apply(model, budget=0.5, method="threshold", layers=[1, 7])
    with pytest.raises(ValueError, match="init has 1"):
        tokenprune.apply(model, budget=0.5, method="threshold", init=[0.1])
    with pytest.raises(ValueError, match="switch_at"):
        tokenprune.apply(model, budget=0.5, method="maelre", switch_at=-3)
    with pytest.raises(ValueError, match="mode"):
        tokenprune.apply(model, budget=0.5, method="pool", mode="nearest")
    with pytest.raises(TypeError, match="pipeline entries"):
        tokenprune.apply(model, budget=0.5, method=["cls", 3])
    with pytest.raises(ValueError, match="unknown method"):
        tokenprune.apply(model, budget=0.5, method=["cls", "nope"])
    assert not tokenprune.is_applied(model)


def test_pool_without_grid_is_a_clear_error():
    model = tiny_vit()
    with pytest.raises(ValueError, match="grid"):
        tokenprune.plan(model, 0.25, "pool", num_tokens=60)  # 60 tokens form no square grid
    info = EncoderInfo(depth=4, dim=48, num_heads=3, num_prefix=1, num_tokens=64, mlp_hidden=192, grid=None)
    with pytest.raises(ValueError, match="needs the patch grid"):
        Pool().plan(info, 0.25)


# -- maelre ------------------------------------------------------------------------------------------
def _reference_efficient_attention(q, k, v, bias):
    q, k, v = q.double(), k.double(), v.double()
    qe = q.exp() / q.exp().sum(-1, keepdim=True)
    kb = k + bias.double()[:, :, 0, :, None] if bias is not None else k
    ke = kb.exp() / kb.exp().sum(-2, keepdim=True)
    b, h, n, d = q.shape
    out = torch.zeros(b, h, n, v.shape[-1], dtype=torch.float64)
    for i in range(n):  # out_i = sum_e qs[i, e] sum_m ks[m, e] v_m
        out[:, :, i] = torch.einsum("bhe,bhme,bhmc->bhc", qe[:, :, i], ke, v)
    return out


def test_efficient_attention_matches_float64_reference():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8) * 2 for _ in range(3))
    sizes = torch.rand(2, 17) * 3 + 0.5
    sizes[1, 5:8] = 0  # padding keys of sample 1
    bias = sizes.log()[:, None, None, :]
    for bb in (None, bias):
        ref = _reference_efficient_attention(q, k, v, bb)
        out = maelre_mod.efficient_attention(q, k, v, bb)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # a padding key changes nothing: dropping it gives the same result
    keep = torch.ones(17, dtype=torch.bool)
    keep[5:8] = False
    out = maelre_mod.efficient_attention(q[1:], k[1:], v[1:], bias[1:])
    alone = maelre_mod.efficient_attention(q[1:, :, keep], k[1:, :, keep], v[1:, :, keep], bias[1:, ..., keep])
    torch.testing.assert_close(out[:, :, keep], alone, atol=1e-5, rtol=1e-5)


def test_efficient_attention_of_float64_is_float64_and_a_float64_model_gradchecks():
    """A float64 model runs MAELRE's linear attention in float64 (it used to run in float32: outputs off by ~1e-7
    relative and finite-difference gradient checks of the patched model failing), as SDPA does in its blocks."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 8, dtype=torch.float64) for _ in range(3))
    bias = (torch.rand(2, 17, dtype=torch.float64) + 0.5).log()[:, None, None, :]
    for bb in (None, bias):
        out = maelre_mod.efficient_attention(q, k, v, bb)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, _reference_efficient_attention(q, k, v, bb), atol=1e-12, rtol=1e-12)
    model = tiny_vit(img_size=16, embed_dim=12, num_heads=2, num_classes=3).double()
    tokenprune.apply(model, budget=0.5, method="maelre", switch_at=4)
    assert "linear" in tokenprune.plan(model).attention_per_block()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_maelre_switches_exactly_where_n_exceeds_threshold(monkeypatch):
    model = tiny_vit(depth=6)
    x = torch.randn(2, 3, 32, 32)
    switch = 30
    linear_calls, sdpa_calls = [], []
    original_linear, original_sdpa = maelre_mod.efficient_attention, F.scaled_dot_product_attention

    def spy_linear(q, k, v, bias=None):
        linear_calls.append(q.shape[2])
        return original_linear(q, k, v, bias)

    def spy_sdpa(q, *a, **kw):
        sdpa_calls.append(q.shape[2])
        return original_sdpa(q, *a, **kw)

    monkeypatch.setattr(maelre_mod, "efficient_attention", spy_linear)  # before apply: the plan names the kernel
    tokenprune.apply(model, budget=0.2, method="maelre", switch_at=switch)
    plan = tokenprune.plan(model)
    n_in = [n + 1 for n in plan.tokens_per_block()]  # prefix included
    paths = plan.attention_per_block()
    assert paths == ["linear" if n > switch else "sdpa" for n in n_in]
    assert "linear" in paths and "sdpa" in paths

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy_sdpa)
    for blk in model.blocks:
        blk.attn.fused_attn = True
    with torch.no_grad():
        feats, st = tokenprune.features(model, x)
    assert st.tokens_per_block == n_in
    assert linear_calls == [n for n in n_in if n > switch]
    assert sdpa_calls == [n for n in n_in if n <= switch]
    # the linear path really changes the blocks (vs. the same merging with SDPA everywhere)
    tokenprune.apply(model, budget=0.2, method="maelre", switch_at=10_000)
    with torch.no_grad():
        assert not torch.allclose(model.forward_features(x), feats)


def test_maelre_finetune_trains_only_linear_attention():
    from tokenprune.training import finetune_linear_attention, linear_attention_parameters

    model = tiny_vit()
    tokenprune.apply(model, budget=0.25, method="maelre", switch_at=40)
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(0)
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    hist = finetune_linear_attention(model, data, epochs=1, lr=1e-3)
    assert len(hist) == 2
    trained = {id(p) for p in linear_attention_parameters(model)}
    names = {n for n, p in model.named_parameters() if id(p) in trained}
    assert names and all(n.startswith(("blocks.0.attn", "blocks.1.attn")) for n in names)  # linear: blocks 0, 1
    after = model.state_dict()
    for n, v in before.items():
        assert torch.equal(v, after[n]) == (n not in names), n


def test_maelre_finetune_of_a_model_patched_with_another_method_says_so():
    """It used to answer 'every block has N <= switch_at', which sends a user patched with merge after switch_at."""
    from tokenprune.training import finetune_linear_attention, linear_attention_parameters

    model = tiny_vit()
    tokenprune.apply(model, budget=0.25, method="merge")
    data = [(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))]
    for call in (lambda: finetune_linear_attention(model, data), lambda: linear_attention_parameters(model)):
        with pytest.raises(ValueError, match=r"method='maelre'.*patched with 'merge'"):
            call()


# -- apet ---------------------------------------------------------------------------------------------
def test_apet_reconstruction_error_matches_float64_lstsq():
    torch.manual_seed(0)
    x = torch.randn(2, 30, 16)
    basis = apet_mod.farthest_point_basis(x, 6)
    assert all(len(set(r.tolist())) == 6 for r in basis)
    s = x.gather(1, basis[..., None].expand(2, 6, 16))
    err = apet_mod.reconstruction_error(x, s)
    x64, s64 = x.double(), s.double()
    coef = torch.linalg.lstsq(s64.transpose(1, 2), x64.transpose(1, 2)).solution  # [B, k, N]
    ref = (x64 - (s64.transpose(1, 2) @ coef).transpose(1, 2)).norm(dim=-1)
    torch.testing.assert_close(err.double(), ref, atol=1e-4, rtol=1e-4)
    assert err.gather(1, basis).abs().max() < 1e-3  # basis tokens reconstruct themselves


def test_apet_drops_representable_tokens_first_and_merges_by_mean():
    torch.manual_seed(1)
    n, c, k = 40, 32, 4
    x = torch.randn(1, n, c)
    basis_pos = [3, 11, 22, 35]
    for j, i in enumerate(basis_pos):  # far-away basis tokens: farthest-point sampling picks exactly these
        x[0, i] = 0
        x[0, i, j] = 50.0
    represent = [5, 6, 17, 28, 30, 39]
    for i in represent:  # exactly in the span of the basis
        x[0, i] = 0
        x[0, i, :k] = torch.randn(k) * 3
    state = TokenState.start(torch.cat([torch.zeros(1, 1, c), x], 1), num_prefix=1)
    assert sorted(apet_mod.farthest_point_basis(x, k)[0].tolist()) == basis_pos
    red = apet_mod.Apet(k=k)
    keep = n - len(represent) - 3
    out = red.reduce(state, Stage(0, keep, "apet"), None)
    src = out.source[0] - 1  # slot of every original token
    owners = {}
    for i, s in enumerate(src.tolist()):
        owners.setdefault(s, []).append(i)
    assert len(owners) == keep
    kept_alone = [o for o in owners.values() if not set(o) <= set(represent)]
    assert len(kept_alone) == keep  # no slot is held by representable tokens only: they were dropped
    for bp in basis_pos:  # the basis is kept
        assert any(bp in o for o in owners.values())
    # every slot = mean of the original tokens it holds; sizes = how many
    for s, members in owners.items():
        torch.testing.assert_close(out.x[0, 1 + s], x[0, members].mean(0), atol=1e-5, rtol=1e-5)
        assert out.sizes[0, 1 + s] == len(members)


def test_apet_needs_no_attention():
    assert apet_mod.Apet().qk_blocks(None) == set()


# -- threshold ----------------------------------------------------------------------------------------
def _thresholded(budget=1.0, init=None, **kw):
    """A tiny ViT whose [CLS] attention is peaked enough (q, k weights x4) for thresholds to separate tokens."""
    model = tiny_vit(depth=6, **kw)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[:2 * 48] *= 4
    if init is None:
        init = (0.0135, 0.019, 0.026) if model.num_prefix_tokens else (0.0153, 0.021, 0.03)
    return tokenprune.apply(model, budget=budget, method="threshold", init=list(init))


def test_threshold_batch_with_different_counts_equals_each_sample_alone():
    for kw in ({}, dict(class_token=False, global_pool="avg")):
        model = _thresholded(**kw)
        torch.manual_seed(3)
        x = torch.randn(6, 3, 32, 32)
        with torch.no_grad():
            feats, st = tokenprune.features(model, x)
            logits = model.forward_head(feats, sizes=st.sizes)
            alone = torch.cat([model(x[i:i + 1]) for i in range(6)])
        kept = st.kept_per_sample()
        assert len(set(kept.tolist())) > 1, kept  # the samples really keep different counts
        torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)


def test_keep_above_keeps_each_samples_count_and_pads_only_when_counts_differ(monkeypatch):
    """``ops.keep_above`` (threshold and cls ``threshold=``): each sample keeps its own ``score > 0.5`` tokens, at
    most 4 and at least 1, exactly as ``keep_top`` of that count on the sample alone (tokens, source map), then
    padding at size 0 up to the batch's largest count. Equal counts (always at batch 1) add no padding (no sizes, so
    no mask later); the counts are read on the host once."""
    from tokenprune import ops

    g = torch.Generator().manual_seed(5)
    for scores, valid, counts in (
            (torch.rand(1, 12, generator=g), None, None),  # batch 1
            (torch.tensor([[.9, .1, .8, .2, .7, .3], [.1, .9, .2, .8, .3, .7]]), None, [3, 3]),
            (torch.tensor([[.9, .1, .8, .2, .7, .3], [.1, .1, .2, .8, .3, .7]]), None, [3, 2]),
            (torch.tensor([[.1, .2, .3, .4], [.9, .8, .7, .6]]), None, [1, 4]),  # none above: one; many: the cap
            (torch.rand(3, 12, generator=g), torch.rand(3, 12, generator=g) > 0.3, None)):  # earlier padding
        b, n = scores.shape
        x = torch.randn(b, 1 + n, 4, generator=torch.Generator().manual_seed(1))
        s = scores if valid is None else scores.masked_fill(~valid, float("-inf"))
        want = (s > 0.5).sum(1).clamp(1, 4)
        if counts is not None:
            assert want.tolist() == counts
        reads, tolist = [], torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or tolist(t))
        got, kept = ops.keep_above(TokenState.start(x, 1), scores, 0.5, 4, valid)
        monkeypatch.undo()
        assert len(reads) == 1
        assert kept.dtype == torch.float32 and kept.tolist() == want.tolist() == got.kept_per_sample().tolist()
        width = int(want.max())
        assert got.x.shape == (b, 1 + width, 4)
        for i, c in enumerate(want.tolist()):
            alone = ops.keep_top(TokenState.start(x[i:i + 1], 1), s[i:i + 1], c)
            assert torch.equal(got.x[i, :1 + c], alone.x[0]) and torch.equal(got.source[i], alone.source[0])
            if got.sizes is not None:
                assert (got.sizes[i, :1 + c] == 1).all() and (got.sizes[i, 1 + c:] == 0).all()
        if bool((want == want[0]).all()):
            assert got.sizes is None  # no padding slot: no mask in the later blocks
        else:
            assert got.sizes is not None and (got.sizes == 0).any()


def test_threshold_is_a_cap_at_the_budget():
    model = _thresholded(budget=0.25, init=(0.0, 0.0, 0.0))
    with torch.no_grad():
        feats, st = tokenprune.features(model, torch.randn(2, 3, 32, 32))
    assert st.kept_per_sample().tolist() == [16, 16]


def test_threshold_schedule_override_must_name_its_stage_blocks():
    """schedule= for threshold: each stage has its own learned threshold, so an override after a block that is
    not a stage block (layers) is refused at apply() with the stage blocks; it used to be accepted and fail at
    the first forward with "2 is not in list"."""
    model = tiny_vit()  # depth 4: stages after blocks 1, 2, 3
    with pytest.raises(ValueError, match=r"threshold: schedule= block\(s\) \[0\] .*stage blocks \[1, 2, 3\]"):
        tokenprune.apply(model, method="threshold", schedule={0: 40, 2: 16})
    assert not tokenprune.is_applied(model)
    tokenprune.apply(model, method="threshold", schedule={1: 40, 3: 16}, init=[0.0, 0.0, 0.0])  # stage blocks: fine
    with torch.no_grad():
        _, st = tokenprune.features(model, torch.randn(2, 3, 32, 32))
    assert st.kept_per_sample().tolist() == [16, 16] == [tokenprune.plan(model).num_out] * 2


def test_threshold_state_dict_save_load_and_remove():
    model = _thresholded()
    with torch.no_grad():
        model.tokenprune_params.theta.copy_(torch.tensor([0.014, 0.0155, 0.017]))
    sd = copy.deepcopy(model.state_dict())
    assert "tokenprune_params.theta" in sd
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    other = _thresholded()
    assert not torch.equal(other.tokenprune_params.theta, sd["tokenprune_params.theta"])
    other.load_state_dict(sd)
    torch.testing.assert_close(other.tokenprune_params.theta, sd["tokenprune_params.theta"])
    with torch.no_grad():
        torch.testing.assert_close(other(x), ref)
    tokenprune.remove(other)
    assert "tokenprune_params.theta" not in other.state_dict() and not hasattr(other, "tokenprune_params")


def test_threshold_edits_of_theta_show_in_the_next_forward():
    """Every way of changing theta reaches the next forward (the reducer keeps a detached view per stage): an in-place
    ``.data`` edit, an optimizer-style ``copy_``, a new storage through ``theta.data = ...`` and ``model.double()``.
    A theta above every score keeps one token per sample at each stage; below every score, each stage's cap."""
    import tokenprune

    model = _thresholded()
    theta = model.tokenprune_params.theta
    x = torch.randn(2, 3, 32, 32)

    def kept():
        with torch.no_grad():
            _, st = tokenprune.features(model, x)
        return [c.tolist() for _, c in st.scratch["threshold_counts"]]

    theta.data.fill_(-1.0)  # every score is above: each stage keeps its cap
    caps = kept()
    assert all(c[0] > 1 for c in caps)
    theta.data.fill_(2.0)  # scores sum to 1 over the tokens: none above, one token kept per stage
    assert kept() == [[1.0, 1.0]] * len(caps)
    with torch.no_grad():
        theta.copy_(torch.full_like(theta, -1.0))
    assert kept() == caps
    theta.data = torch.full((len(caps),), 2.0)  # a new storage
    assert kept() == [[1.0, 1.0]] * len(caps)
    model.double()
    assert model.tokenprune_params.theta.dtype == torch.float64
    with torch.no_grad():
        model.tokenprune_params.theta.fill_(-1.0)
    x = x.double()
    assert kept() == caps


def test_threshold_training_mask_equals_inference_and_flops_push_thresholds():
    from tokenprune.training import train_thresholds

    model = _thresholded()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        infer = model(x)
    model.tokenprune_params.train()
    train_logits = model(x)  # grad enabled + training: masks through the size bias, nothing gathered
    torch.testing.assert_close(train_logits, infer, atol=1e-4, rtol=1e-4)
    train_logits.sum().backward()
    assert model.tokenprune_params.theta.grad is not None

    before = model.tokenprune_params.theta.detach().clone()
    data = [(x, torch.randint(0, 10, (4,)))] * 3
    hist = train_thresholds(model, data, target=0.2, lr=1e-3, ce_weight=0, distill_weight=0)
    assert hist[0]["flop_ratio"] > 0.2
    assert (model.tokenprune_params.theta > before).all()  # FLOPs above target -> thresholds go up
    assert hist[-1]["flop_ratio"] < hist[0]["flop_ratio"]
    assert not model.training and not model.tokenprune_params.training


def test_threshold_training_mask_leaks_at_most_eps_and_gives_theta_a_finite_task_gradient():
    # dropped tokens get size MASK_EPS, not 0: log(0) = -inf would make the weight exactly 0 but the backward of
    # the log 0 * inf = NaN, and with a NaN-safe log the dropped tokens would carry no gradient to theta at all
    from tokenprune.reducers import threshold as thr_mod

    model = _thresholded()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        infer = model(x)  # dropped tokens gathered away: weight exactly 0
    model.tokenprune_params.train()
    out = model(x)
    assert thr_mod.MASK_EPS <= 1e-6
    torch.testing.assert_close(out, infer, atol=1e-5, rtol=1e-5)  # the leak of dropped tokens is invisible
    out.logsumexp(-1).sum().backward()  # a task loss only (no FLOP term): the gradient comes through attention
    g = model.tokenprune_params.theta.grad
    assert torch.isfinite(g).all() and (g != 0).all(), g


# -- pool ---------------------------------------------------------------------------------------------
def test_pool_equals_average_pooling_per_frame():
    torch.manual_seed(0)
    red = Pool()
    for grid, out_grid in [((8, 8), (4, 4)), ((2, 4, 6), (2, 2, 3))]:
        n = math.prod(grid)
        x = torch.randn(2, 1 + n, 5)
        st = TokenState.start(x.clone(), num_prefix=1, grid=grid)
        st = red.reduce(st, Stage(-1, math.prod(out_grid), "pool"), None)
        assert st.grid == out_grid
        *fr, h, w = grid
        t = math.prod(fr) if fr else 1
        img = x[:, 1:].reshape(2 * t, h, w, 5).permute(0, 3, 1, 2)
        ref = F.adaptive_avg_pool2d(img, out_grid[-2:]).permute(0, 2, 3, 1).reshape(2, -1, 5)
        torch.testing.assert_close(st.x[:, 1:], ref)
        torch.testing.assert_close(st.x[:, :1], x[:, :1])
        assert torch.equal(st.sizes[:, 1:], torch.full((2, math.prod(out_grid)), n / math.prod(out_grid)))
        # the source map sends each patch to the cell that averaged it
        full, present = tokenprune.unmerge(st.x, st)
        assert present.all() and torch.equal(full.reshape(2, t, h, w, 5)[:, :, 0, 0],
                                             st.x[:, 1:].reshape(2, t, -1, 5)[:, :, 0])


def test_pool_grid_nearest_to_budget_and_gated_cross_attention():
    from tokenprune.reducers.pool import pooled_grid

    assert pooled_grid((16, 16), 26) == (2, 13)  # the nearest count first (26 = 2 x 13 exactly) ...
    assert pooled_grid((8, 8), 17) == (4, 4)  # ... then the aspect ratio: 16 = 4 x 4 beats 18 = 3 x 6
    assert pooled_grid((16, 16), 25) == (5, 5)
    assert pooled_grid((4, 16, 16), 64) == (4, 4, 4)
    layer = GatedCrossAttention(48, num_heads=4)
    q, ctx = torch.randn(2, 5, 48), torch.randn(2, 20, 48)
    out = layer(q, ctx)
    assert torch.equal(out, q)  # tanh(0) = 0: identity at initialisation
    out.sum().backward()
    assert layer.gate.grad is not None and layer.gate.grad.abs() > 0


# -- composition -------------------------------------------------------------------------------------
def test_pipeline_stages_in_own_ranges_with_geometric_split():
    model = tiny_vit(depth=8)
    tokenprune.apply(model, budget=0.25, method=["cls", ("merge", {"prop_attn": False})])
    plan = tokenprune.plan(model)
    cls_stages = [s for s in plan.stages if s.op == "0.cls"]
    merge_stages = [s for s in plan.stages if s.op == "1.merge"]
    assert cls_stages and merge_stages
    assert all(0 <= s.block < 4 for s in cls_stages) and all(4 <= s.block < 8 for s in merge_stages)
    assert cls_stages[-1].keep == math.floor(64 * 0.25 ** 0.5 + 0.5)  # each gets budget ** (1/2)
    assert plan.num_out == 16
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x)
    assert feats.shape[1] == 17
    assert not tokenprune.get_patch(model).reducer.proportional
    with pytest.raises(ValueError, match="ranges"):
        tokenprune.apply(model, budget=0.25, method=["cls", "merge"], ranges=[(0, 5), (3, 8)])


def test_apet_farthest_point_basis_matches_direct_definition():
    # the fast form (|x|^2 - 2 x.c + |c|^2, no per-step temporaries) picks the same tokens as the
    # direct definition: start farthest from the (valid) mean, then farthest from the chosen set
    from tokenprune.reducers.apet import farthest_point_basis

    torch.manual_seed(0)
    x = torch.randn(3, 57, 16, dtype=torch.float64)
    valid = torch.rand(3, 57) > 0.2

    def direct(xb, v, k):
        d = ((xb - xb[v].mean(0)) ** 2).sum(-1).masked_fill(~v, float("-inf"))
        chosen = []
        for j in range(k):
            i = int(d.argmax())
            chosen.append(i)
            di = ((xb - xb[i]) ** 2).sum(-1)
            d = di if j == 0 else torch.minimum(d, di)
            d = d.masked_fill(~v, float("-inf"))
            d[chosen] = float("-inf")
        return chosen

    got = farthest_point_basis(x, 8, valid)
    assert got.tolist() == [direct(x[b], valid[b], 8) for b in range(3)]
    ones = torch.ones_like(valid)
    assert farthest_point_basis(x, 8).tolist() == [direct(x[b], ones[b], 8) for b in range(3)]


def test_train_thresholds_warns_when_the_thresholds_get_no_gradient():
    """At the default thresholds (1e-3, 2e-3, 3e-3) a tiny ViT's scores (about 1/N) sit far above them, where the
    soft mask is flat: training would report losses and change nothing. It says so after the first step; thresholds
    started near the scores train without the warning."""
    import warnings

    from tokenprune.training import train_thresholds

    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    data = [(x, torch.randint(0, 10, (4,)))] * 2
    flat = tiny_vit()
    tokenprune.apply(flat, budget=0.5, method="threshold")
    with pytest.warns(UserWarning, match="no gradient"):
        train_thresholds(flat, data, target=0.2, ce_weight=0, distill_weight=0)
    near = _thresholded()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_thresholds(near, data, target=0.2, ce_weight=0, distill_weight=0)


def test_training_loaders_of_the_wrong_shape_are_clear_errors():
    """A loader must give image batches or (images, labels) pairs. Giving one (x, y) pair as the loader, a tensor of
    images, or dict batches used to fail inside the model ('not enough values to unpack', 'dict' has no 'shape')."""
    from tokenprune.training import finetune_linear_attention, train_thresholds

    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    thr = _thresholded()
    lin = tiny_vit()
    tokenprune.apply(lin, budget=0.25, method="maelre", switch_at=40)
    for train, model in ((train_thresholds, thr), (finetune_linear_attention, lin)):
        for loader, match in (((x, y), r"batch 1 .*1-D tensor.*wrap a single \(inputs, labels\) pair in a list"),
                              (x, r"batch 0 .*3-D tensor.*\[B, C, H, W\]"),
                              ([{"pixel_values": x, "labels": y}], r"batch 0 .*dict.*\(inputs, labels\)"),
                              ([(x, y[:1])], r"batch 0: 1 labels for 2 inputs")):
            with pytest.raises((TypeError, ValueError), match=match):
                train(model, loader, ce_weight=0)


def test_training_takes_the_compiled_or_data_parallel_wrapper_as_apply_does(tmp_path):
    """``apply`` / ``remove`` / ``plan`` / ``features`` take a ``torch.compile`` or ``DataParallel`` wrapper; the training
    helpers did not: ``train_thresholds(torch.compile(model))`` froze the thresholds with the backbone (their names
    carry the wrapper's ``_orig_mod.`` prefix) and failed in backward with "element 0 of tensors does not require
    grad", and a DataParallel model was refused as not timm / "cannot find the encoder blocks". They train the module
    the wrapper runs, as on the model itself. DistributedDataParallel is refused clearly (training around its forward
    would skip its gradient synchronisation)."""
    import torch.distributed as dist

    from tokenprune.training import finetune_linear_attention, train_thresholds

    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    data = [(x, torch.randint(0, 10, (4,)))] * 2
    for wrap in (torch.compile, torch.nn.DataParallel):
        plain, wrapped = _thresholded(), _thresholded()
        want = train_thresholds(plain, data, target=0.2, ce_weight=0)
        got = train_thresholds(wrap(wrapped), data, target=0.2, ce_weight=0)
        assert [r["thresholds"] for r in got] == [r["thresholds"] for r in want], wrap
        torch.testing.assert_close(wrapped.tokenprune_params.theta, plain.tokenprune_params.theta, rtol=0, atol=0)
        assert all(p.requires_grad for p in wrapped.parameters())
        plain, wrapped = tiny_vit(), tiny_vit()
        for m in (plain, wrapped):
            tokenprune.apply(m, budget=0.25, method="maelre", switch_at=40)
        want = finetune_linear_attention(plain, data, lr=1e-2)
        got = finetune_linear_attention(wrap(wrapped), data, lr=1e-2)
        assert [r["loss"] for r in got] == [r["loss"] for r in want], wrap
        for (n, p), q in zip(wrapped.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(_thresholded())
        with pytest.raises(TypeError, match="DistributedDataParallel.*gradient"):
            train_thresholds(ddp, data)
    finally:
        dist.destroy_process_group()


def test_linear_attention_fine_tuning_outside_timm_is_a_clear_error():
    """README advised ``finetune_linear_attention`` for Whisper's MAELRE WER, but the helper runs timm's
    ``forward_features`` / ``forward_head`` on image batches: on Whisper it failed with "cannot find the encoder blocks
    of this model to fine-tune", which says nothing of what to do. The error says which models it takes and where the
    linear blocks are listed for a loop of one's own."""
    from test_adapters_matrix import make_whisper

    from tokenprune.training import finetune_linear_attention, linear_attention_parameters

    w = make_whisper()
    model = tokenprune.apply(w["model"], budget=0.25, method="maelre", switch_at=8)
    assert "linear" in tokenprune.plan(model).attention_per_block()
    for call in (lambda: linear_attention_parameters(model),
                 lambda: finetune_linear_attention(model, [(w["x"], None)])):
        with pytest.raises(TypeError, match=r"timm .*WhisperForConditionalGeneration.*attention_per_block\(\)"):
            call()
