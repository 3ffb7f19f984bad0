"""`pitome`: energy-protected merging (PiToMe)."""
import pytest
import torch

import tokenprune
from conftest import tiny_vit
from tokenprune.plan import keep_count
from tokenprune.reducers.pitome import energy, protected_merge
from tokenprune.state import TokenState


def _tokens():
    """One prefix token; patches 0-3 nearly the same direction, patches 4-7 orthogonal to everything."""
    e = torch.eye(8)
    patches = torch.stack([e[0], e[0] + 0.01 * e[1], e[0] + 0.02 * e[2], e[0] + 0.03 * e[3], e[4], e[5], e[6], e[7]])
    return torch.cat([torch.full((1, 8), 9.0), patches])[None]


def test_energy_ranks_redundant_tokens_first():
    e = energy(_tokens()[:, 1:], margin=0.9)[0]
    assert e[:4].min() > e[4:].max()


@pytest.mark.parametrize("candidates", [2.0, 4.0])
def test_redundant_tokens_merge_and_isolated_ones_are_kept_exactly(candidates):
    x = _tokens()
    state = protected_merge(TokenState.start(x.clone(), 1), x, 2, 0.9, candidates)
    assert state.x.shape == (1, 7, 8) and torch.equal(state.x[0, 0], x[0, 0])  # prefix untouched
    assert state.sizes.sum().item() == 9 and state.sizes[0, 0] == 1
    for j in range(4, 8):  # the isolated tokens survive bit-exactly, in spatial order, with size 1
        row = (state.x[0] == x[0, 1 + j]).all(-1).nonzero().flatten().tolist()
        assert len(row) == 1 and state.sizes[0, row[0]] == 1
    big = state.sizes[0] > 1
    assert big.any() and (state.x[0, big][:, 0] > 0.99).all()  # merged tokens are the redundant direction
    # every original patch maps to the token that holds it
    for j in range(8):
        t = state.source[0, j]
        assert t >= 1 and (state.sizes[0, t] > 1 if j < 4 and not torch.equal(state.x[0, t], x[0, 1 + j]) else True)


def test_reducer_is_per_sample_with_exact_count():
    """(Compiled with fullgraph=True against eager: test_forward_path.py's test_timm_compiles_fullgraph.)"""
    torch.set_num_threads(1)
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    tokenprune.apply(model, budget=0.25, method="pitome")
    plan = tokenprune.plan(model)
    assert all(s.mid for s in plan.stages) and plan.num_out == 16
    with torch.no_grad():
        toks, state = tokenprune.features(model, x)
        assert toks.shape == (3, 17, 48) and torch.equal(state.sizes.sum(1), torch.full((3,), 65.0))
        for i in range(3):
            torch.testing.assert_close(tokenprune.features(model, x[i:i + 1])[0], toks[i:i + 1], rtol=1e-5, atol=1e-5)


def test_bad_options_are_refused():
    model = tiny_vit()
    for kw, msg in [({"candidates": 1.5}, "candidates must be >= 2"), ({"margin": 2.0}, "margin is a cosine"),
                    ({"placement": "x"}, "placement must be")]:
        with pytest.raises(ValueError, match=msg):
            tokenprune.apply(model, budget=0.5, method="pitome", **kw)


# -- the step's computation: energy and order (kernels.pitome_order), merge in that order (merge_step perm=) ------
import math  # noqa: E402

import torch.nn.functional as F  # noqa: E402

# T: the interpreted Triton kernels
from test_kernels import T, _split_matching, _use_interpreted, gen, qkv_keys, rel  # noqa: E402,F401
from tokenprune import kernels  # noqa: E402
from tokenprune.kernels import reference as R  # noqa: E402


@pytest.mark.parametrize("padded", [False, True])
def test_reference_energy_is_the_papers_equation(padded):
    """reference.pitome_energy, the one PyTorch reference, against the equation written out term by term."""
    g = gen(50)
    b, n, d, margin = 2, 7, 3, 0.4
    m = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    valid = torch.rand(b, n, generator=g) > 0.3 if padded else torch.ones(b, n, dtype=torch.bool)
    out = R.pitome_energy(m, margin, valid if padded else None)
    for s in range(b):
        for i in range(n):
            if not valid[s, i]:
                assert out[s, i] == float("inf")
                continue
            terms = []
            for j in range(n):
                if j == i or not valid[s, j]:
                    continue
                c = float(m[s, i] @ m[s, j]) / (float(m[s, i].norm()) * float(m[s, j].norm()))
                terms.append(c if c >= margin else math.exp(c - margin) - 1.0)
            assert abs(float(out[s, i]) - sum(terms) / max(len(terms), 1)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,p,n,cand,padded,br", [(2, 1, 37, 10, False, 256), (2, 0, 20, 20, True, 256),
                                                  (1, 3, 130, 31, True, 32), (2, 1, 196, 26, False, 64)])
def test_order_kernel_equals_reference(T, monkeypatch, b, p, n, cand, padded, br, dtype):
    """The one-launch energy + order kernel (row tiles of ``br``: one, or several) against the reference: float32
    energies to rounding and the same order; fp16 (cosines of fp16 unit keys) energies to a few 1e-3 -- a cosine
    that rounds across the margin moves f by about ``margin`` -- and the order the reference gives those energies."""
    monkeypatch.setitem(T.pitome.PITOME_ORDER_CONFIG, "br", br)
    monkeypatch.setitem(T.pitome.PITOME_ORDER_CONFIG, "br_f32", min(br, 32))
    g = gen(51)
    m = torch.randn(b, p + n, 24, generator=g).to(dtype)
    sizes = torch.randint(1, 4, (b, p + n), generator=g).float()
    if padded:
        sizes[0, p + 2:p + 9:3] = 0
    e, perm = T.pitome.pitome_order(m, sizes, p, cand, 0.2, padded)
    e_ref, perm_ref = R.pitome_order(m, sizes, p, cand, 0.2, padded)
    fin = torch.isfinite(e_ref)
    assert torch.equal(torch.isfinite(e), fin) and (not padded or not fin.all())
    err = (e[fin] - e_ref[fin]).abs()
    if dtype == torch.float32:
        assert err.max() < 1e-5 and torch.equal(perm, perm_ref)
    else:
        assert err.mean() < 2e-3 and err.max() < 0.2 / (n - 1) * 4 + 2e-3
        assert torch.equal(perm, R.pitome_perm(e, p, cand))
    assert torch.equal(perm.sort(1).values, torch.arange(p + n).expand(b, p + n))  # a permutation


@pytest.mark.parametrize("dtype,heads,padded", [(torch.float32, 20, True), (torch.float16, 3, False),
                                                (torch.float16, 1, True)])
def test_order_kernel_averages_the_keys_over_heads(T, dtype, heads, padded):
    """pitome_order given a block's keys [B, H, T, d] (a strided view of its qkv output) averages them over heads as
    it loads them: energies and order bit for bit those of the same kernel given the reference's mean
    (``reference.key_mean``; 20 heads: a CPU's float32 order of 16 heads at a time), and the reference's order."""
    g = gen(57)
    b, p, n, cand = 2, 1, 45, 16
    k = qkv_keys(b, p + n, heads, 32, g, dtype)  # (d = 24: a CPU's mean sums 20 heads in another order)
    assert not k.is_contiguous() and k.stride(-1) == 1
    sizes = torch.randint(1, 4, (b, p + n), generator=g).float()
    if padded:
        sizes[1, p + 3:p + 11:2] = 0
    e, perm = T.pitome.pitome_order(k, sizes, p, cand, 0.3, padded)
    e_mean, perm_mean = T.pitome.pitome_order(R.key_mean(k.contiguous()), sizes, p, cand, 0.3, padded)
    assert torch.equal(e, e_mean) and torch.equal(perm, perm_mean)
    e_ref, perm_ref = R.pitome_order(k, sizes, p, cand, 0.3, padded)
    if dtype == torch.float32:
        assert torch.equal(perm, perm_ref)
    else:  # fp16 cosines: the order the reference gives the kernel's energies
        assert torch.equal(perm, R.pitome_perm(e, p, cand))


def test_reducer_hands_the_keys_to_both_kernels(T, monkeypatch):
    """PiToMe.reduce passes the block's keys to pitome_order and to the merge step (no key mean of its own): a reduced
    tiny ViT through the interpreted kernels gives the PyTorch path's logits, and every call got 4-D keys."""
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=gen(58))
    tokenprune.apply(model, budget=0.25, method="pitome")
    with torch.no_grad():
        ref = model(x)
        _use_interpreted(monkeypatch, T)
        seen = []
        order, step = T.pitome.pitome_order, T.merge.merge_step
        monkeypatch.setattr(T.pitome, "pitome_order", lambda m, *a: seen.append(("pitome_order", m.dim())) or order(m, *a))
        monkeypatch.setattr(T.merge, "merge_step", lambda x, m, *a, **kw: seen.append(("merge_step", m.dim())) or
                            step(x, m, *a, **kw))
        out = model(x)
    tokenprune.remove(model)
    assert seen and set(seen) == {("pitome_order", 4), ("merge_step", 4)}
    assert rel(out, ref) < 1e-4


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")
@pytest.mark.parametrize("mode", ["one", "split", "plan", "plan_split"])
@pytest.mark.parametrize("b,p,n,cand,r,padded,residual", [(2, 1, 37, 10, 5, False, False), (2, 0, 20, 20, 7, True, True),
                                                          (1, 3, 70, 31, 12, True, False), (2, 1, 50, 50, 20, False, True)])
def test_merge_step_in_pitome_order_equals_reference(T, monkeypatch, mode, b, p, n, cand, r, padded, residual):
    """ToMe's merge step reading the rows through the order (protected rows as prefix: more than one tile of
    them in the one-launch kernel; the large-batch matching + row gather; the four-launch form for long
    inputs, also with the matching split over B tokens as on a GPU with idle SMs) equals the reference, which
    permutes first: tokens, sizes, their log, the source map."""
    monkeypatch.setattr(T.merge, "MERGE_STEP_MAX_A", 0 if mode.startswith("plan") else 128)
    if mode == "plan_split":
        _split_matching(T, monkeypatch)
    monkeypatch.setattr(T.merge, "MERGE_STEP_SPLIT", {"min_batch": 1, "rb": 4, "gbc": 16, "gwarps": 4, "fbc": 16,
                                                      "fbc_many": 32} if mode == "split" else None)
    g = gen(52)
    x = torch.randn(b, p + n, 40, generator=g).half()
    y = torch.randn(b, p + n, 40, generator=g).half() if residual else None
    m = torch.randn(b, p + n, 24, generator=g).half()
    sizes = torch.randint(1, 4, (b, p + n), generator=g).float()
    if padded:
        sizes[0, p + 2:p + 9:3] = 0
    source = torch.randint(-1, p + n, (b, 60), generator=g)
    perm = R.pitome_order(m, sizes, p, cand, 0.2, padded)[1]
    args = (x, m, sizes, source, p + n - cand, r, padded, None, True, y, perm)
    out, ref = T.merge.merge_step(*args), R.merge_step(*args)
    assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])
    assert torch.equal(out[0], ref[0])
    fin = torch.isfinite(ref[3])
    assert torch.equal(torch.isfinite(out[3]), fin) and torch.allclose(out[3][fin].float(), ref[3][fin].float())


def previous_protected_merge(x, metric, p, r, margin, candidates):
    """The step as tokenprune computed it before the kernels (float32 N x N energies, energy argsort, matching of
    the gathered A and B rows, scatter-add merge), unpadded: ``(tokens, group of each input non-prefix token)``."""
    b, t, c = x.shape
    n = t - p
    mn = F.normalize(metric[:, p:].float(), dim=-1)
    cos = mn @ mn.transpose(1, 2)
    f = torch.where(cos >= margin, cos, torch.exp(cos - margin) - 1.0).masked_fill(torch.eye(n, dtype=torch.bool), 0)
    order = (f.sum(-1) / max(n - 1, 1)).argsort(-1, descending=True)
    cand = min(n, max(2 * r, math.ceil(min(candidates * r, n))))
    a_all, b_idx = order[:, 0:cand:2], order[:, 1:cand:2]
    rows = lambda v, i: v.gather(1, i[..., None].expand(*i.shape, v.shape[-1]))  # noqa: E731
    best, dst = (rows(mn, a_all) @ rows(mn, b_idx).transpose(1, 2)).max(-1)
    edge = best.argsort(-1, descending=True)
    a_idx, dst = a_all.gather(1, edge[:, :r]), dst.gather(1, edge[:, :r])
    keep_idx = torch.cat([order[:, cand:], a_all.gather(1, edge[:, r:])], 1).sort(-1).values
    nk, nb = keep_idx.shape[1], b_idx.shape[1]
    group = torch.empty(b, n, dtype=torch.long)
    group.scatter_(1, keep_idx, torch.arange(nk).expand(b, nk))
    group.scatter_(1, b_idx, (nk + torch.arange(nb)).expand(b, nb))
    group.scatter_(1, a_idx, nk + dst)
    count = torch.zeros(b, nk + nb).scatter_add_(1, group, torch.ones(b, n))
    summed = torch.zeros(b, nk + nb, c).scatter_add_(1, group[..., None].expand(b, n, c), x[:, p:])
    return torch.cat([x[:, :p], summed / count[..., None]], 1), group


@pytest.mark.parametrize("path", ["pytorch", "kernels"])
@pytest.mark.parametrize("candidates", [2.0, 3.0, float("inf")])
def test_selections_equal_the_previous_code(T, monkeypatch, path, candidates):
    """On float32 inputs (ViT-B/16's 196 patches, keys of 64 dims) the step groups the same tokens as the code
    before the kernels did, into the same merged tokens; with candidates 2 (PiToMe) and inf in the same output
    order too (for the values between, the unmerged candidates now follow the protected tokens)."""
    g = gen(53)
    b, p, n, r, margin = 3, 1, 196, 13, 0.45
    x = torch.randn(b, p + n, 32, generator=g)
    metric = torch.randn(b, p + n, 64, generator=g) + 0.5 * torch.randn(b, 1, 64, generator=g)  # correlated keys
    ref_x, ref_group = previous_protected_merge(x, metric, p, r, margin, candidates)
    if path == "kernels":
        _use_interpreted(monkeypatch, T)
    state = protected_merge(TokenState.start(x.clone(), p), metric, r, margin, candidates)
    group = state.source - p
    for s in range(b):  # the same partition of the input tokens (one-to-one between old and new groups)
        pairs = set(zip(ref_group[s].tolist(), group[s].tolist()))
        assert len(pairs) == len(set(ref_group[s].tolist())) == len(set(group[s].tolist())) == n - r
    if candidates != 3.0:
        assert torch.equal(group, ref_group)
    held = lambda v, gr: v[:, p:].gather(1, gr[..., None].expand(b, n, v.shape[-1]))  # noqa: E731
    assert torch.allclose(held(state.x, group), held(ref_x, ref_group), atol=1e-6)
    assert torch.equal(state.x[:, :p], x[:, :p]) and torch.equal(state.sizes.sum(1), torch.full((b,), p + n + 0.0))


@pytest.mark.parametrize("candidates", [2.0, float("inf")])
def test_model_through_the_kernels_equals_pytorch_path(T, monkeypatch, candidates):
    """A reduced tiny ViT (pitome inside the blocks, the attention residual add left to the merge kernels) gives
    the PyTorch path's logits and source map through the interpreted kernels."""
    torch.set_num_threads(1)
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=gen(54))
    tokenprune.apply(model, budget=0.25, method="pitome", candidates=candidates)
    with torch.no_grad():
        ref, ref_state = tokenprune.features(model, x)
        _use_interpreted(monkeypatch, T)
        out, state = tokenprune.features(model, x)
    assert torch.equal(state.source, ref_state.source) and rel(out, ref) < 1e-5


def test_default_placement_is_inside_the_blocks_where_the_model_can_else_after_them():
    """pitome's default (placement='auto'): ToMe's place (between attention and MLP) on timm ViT, after the block on a
    Hugging Face family, whose layers cannot reduce inside; the plan's summary says which. An explicit
    placement='attn' there is still refused with the way out."""
    torch.set_num_threads(1)
    from test_adapters_matrix import make_hf_clip

    fam = make_hf_clip()
    hf, x = fam["model"], fam["x"]
    tokenprune.apply(hf, budget=0.25, method="pitome")
    try:
        plan = tokenprune.plan(hf)
        assert plan.stages and not any(s.mid for s in plan.stages) and "inside" not in plan.summary()
        with torch.no_grad():
            assert hf(x).last_hidden_state.shape[1] == 1 + keep_count(0.25, fam["n"])
    finally:
        tokenprune.remove(hf)
    with pytest.raises(ValueError, match="use placement='block'"):
        tokenprune.apply(hf, budget=0.25, method="pitome", placement="attn")
    vit = tiny_vit()
    tokenprune.apply(vit, budget=0.25, method="pitome")
    plan = tokenprune.plan(vit)
    assert all(s.mid for s in plan.stages) and "inside block" in plan.summary()
    tokenprune.apply(vit, budget=0.25, method="pitome", placement="block")
    assert not any(s.mid for s in tokenprune.plan(vit).stages)
