"""Triton kernels vs their PyTorch references, run by Triton's interpreter on CPU.

``TRITON_INTERPRET=1`` must be set before the kernels are decorated (triton reads
it when ``@triton.jit`` runs), so it is set here before ``triton_impl`` is
imported; a copy imported earlier without it is reloaded. Outputs are poisoned
(NaN / -7) before every launch, so an unwritten element fails the check.
The interpreter has no bfloat16 matrix product, so bf16 is checked on the GPU only
(scripts/gpu_kernels.py).
"""
import importlib
import os
import sys

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from tokenprune import kernels, ops  # noqa: E402
from tokenprune.kernels import reference as R  # noqa: E402
from tokenprune.state import TokenState  # noqa: E402


@pytest.fixture(scope="module")
def T():
    mod = sys.modules.get("tokenprune.kernels.triton_impl")
    mod = importlib.import_module("tokenprune.kernels.triton_impl") if mod is None else mod
    if type(mod._ea_apply).__name__ != "InterpretedFunction":
        mod = importlib.reload(mod)
    mod.POISON = True
    yield mod
    mod.POISON = False


def rel(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in the output (an element was not written?)"
    return ((out - ref).norm() / ref.norm()).item()


def tol(dtype):
    return 1e-5 if dtype == torch.float32 else 5e-3


def gen(seed):
    return torch.Generator().manual_seed(seed)


def size_bias(b, n, g, dtype, masked=True):
    s = torch.rand(b, n, generator=g) * 3 + 0.5
    if masked:
        s[:, 2::5] = 0  # padding keys: log 0 = -inf
    return s.log()[:, None, None, :].to(dtype)


# -- 1. efficient attention -------------------------------------------------------------------
@pytest.mark.parametrize("shape,dtype,bias,split", [
    ((1, 2, 37, 16), torch.float16, False, None),
    ((2, 1, 100, 32), torch.float16, True, 3),  # N split over 3 programs + combine
    ((1, 2, 70, 24), torch.float32, True, 1),  # head dim not a power of two
    ((2, 1, 129, 16), torch.float32, False, 2),
])
def test_efficient_attention(T, shape, dtype, bias, split):
    g = gen(1)
    q, k, v = [torch.randn(*shape, generator=g).to(dtype) for _ in range(3)]
    bb = size_bias(shape[0], shape[2], g, dtype) if bias else None
    out = T.efficient_attention(q, k, v, bb, split=split)
    ref = R.efficient_attention(q.double(), k.double(), v.double(), None if bb is None else bb.double())
    assert out.shape == q.shape and out.dtype == dtype
    assert rel(out, ref) < tol(dtype)


@pytest.mark.parametrize("rows,split,dual,ones_l,dtype", [
    (16, 1, False, False, torch.float16), (16, 3, False, False, torch.float16),
    (64, 1, True, False, torch.float16), (16, 3, True, True, torch.float16), (64, 2, False, True, torch.float32),
])
def test_efficient_attention_pass1_variants(T, monkeypatch, rows, split, dual, ones_l, dtype):
    """Pass-1 variants: ``rows`` of the d x d context per program (the d=128 configuration), two
    interleaved online-softmax chains (``dual``), row sums from a product with ones (``ones_l``)."""
    monkeypatch.setitem(T.EA_CONFIG, "rows1", {64: rows, 128: rows})
    monkeypatch.setitem(T.EA_CONFIG, "dual", dual)
    monkeypatch.setitem(T.EA_CONFIG, "ones_l", ones_l)
    monkeypatch.setitem(T.EA_CONFIG, "pass1", {64: (16, 4), 128: (16, 4)})  # several tiles per chunk
    g = gen(3)
    q, k, v = [torch.randn(2, 2, 90, 40, generator=g).to(dtype) for _ in range(3)]  # d=40 -> 64 padded
    k[0, 0, 70:] += 30  # a late jump of the running max: the rescaling must follow it
    bb = size_bias(2, 90, g, dtype)
    out = T.efficient_attention(q, k, v, bb, split=split)
    ref = R.efficient_attention(q.double(), k.double(), v.double(), bb.double())
    assert rel(out, ref) < tol(dtype)


def test_efficient_attention_strided_input_matches_reducer(T):
    """q/k/v as timm produces them (views into one qkv tensor); same result as maelre's PyTorch version."""
    from tokenprune.reducers.maelre import efficient_attention as maelre_ea

    g = gen(2)
    b, n, h, d = 2, 45, 2, 16
    qkv = torch.randn(b, n, 3, h, d, generator=g).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    bb = size_bias(b, n, g, torch.float32, masked=False)
    out = T.efficient_attention(q, k, v, bb, split=2)
    assert rel(out, maelre_ea(q, k, v, bb)) < 1e-5


# -- 1b. softmax attention with a key bias ----------------------------------------------------------
@pytest.mark.parametrize("shape,dtype,bias", [
    ((2, 3, 37, 16), torch.float16, True),  # one key tile, padding keys (log 0 = -inf)
    ((1, 2, 150, 64), torch.float16, True),  # several key and query tiles, a partial last tile
    ((2, 1, 70, 24), torch.float32, True),  # head dim not a power of two
    ((1, 2, 50, 32), torch.float32, False),
])
def test_biased_attention(T, shape, dtype, bias):
    g = gen(4)
    q, k, v = [torch.randn(*shape, generator=g).to(dtype) for _ in range(3)]
    bb = size_bias(shape[0], shape[2], g, dtype) if bias else None
    out = T.biased_attention(q, k, v, bb)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                           attn_mask=None if bb is None else bb.double())
    assert out.shape == q.shape and out.dtype == dtype
    assert rel(out, ref) < tol(dtype)


def test_biased_attention_runs_in_reduced_timm_forward(T, monkeypatch):
    """A merged (sized) timm forward routes its biased blocks through the kernel, and gives the
    logits of SDPA with attn_mask; with grad enabled the kernel (no backward) is never used."""
    import tokenprune
    from conftest import tiny_vit

    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=gen(15))
    tokenprune.apply(model, budget=0.5, method="merge")
    with torch.no_grad():
        ref = model(x)
    calls = []
    _use_interpreted(monkeypatch, T)
    real = T.biased_attention
    monkeypatch.setattr(T, "biased_attention", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad():
        out = model(x)
    assert calls, "the biased kernel never ran"
    assert rel(out, ref) < 1e-4
    calls.clear()
    model(x).sum().backward()  # grad on: SDPA and the PyTorch merge, so gradients reach every block
    assert not calls
    assert all(blk.attn.qkv.weight.grad is not None for blk in model.blocks)


# -- 2. query-row scores ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("weights", [None, "full", "per_head"])
def test_query_scores(T, dtype, weights):
    g = gen(3)
    b, h, n, d = 2, 3, 150, 24  # 150 = 2 blocks of 64 + 22
    q = torch.randn(b, h, n, d, generator=g).to(dtype)
    k = torch.randn(b, h, n, d, generator=g).to(dtype)
    bb = size_bias(b, n, g, dtype)
    w = {None: None, "full": torch.rand(b, h, n, generator=g), "per_head": torch.rand(h, 1, generator=g)}[weights]
    for bias in (None, bb):
        out = T.query_scores(q[:, :, 0], k, 0.2, bias, w, block_n=64)
        ref = R.query_scores(q[:, :, 0].double(), k.double(), 0.2, None if bias is None else bias.double(),
                             None if w is None else w.double())
        assert out.shape == (b, n) and out.dtype == torch.float32
        assert rel(out, ref) < 1e-5


# -- 3. bipartite matching and merge rows ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [7, 50, 161])
def test_bipartite_best_same_partners(T, dtype, n):
    g = gen(4)
    metric = torch.randn(2, n + 1, 20, generator=g).to(dtype)[:, 1:]  # a strided view, like metric[:, p:]
    valid_b = torch.rand(2, n // 2, generator=g) > 0.2
    for vb in (None, valid_b):
        best, idx = T.bipartite_best(metric, vb)
        rbest, ridx = R.bipartite_best(metric, vb)
        assert best.dtype == rbest.dtype
        assert torch.equal(idx, ridx)
        assert torch.equal(best, rbest) if dtype == torch.float16 else rel(best, rbest) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_rows(T, dtype):
    g = gen(5)
    b, t, c = 2, 30, 40
    x = torch.randn(b, t, c, generator=g).to(dtype)
    sizes = torch.randint(0, 4, (b, t), generator=g).float()  # zeros: padding
    prim = torch.stack([torch.randperm(t, generator=g)[:12] for _ in range(b)])
    members = torch.stack([torch.randperm(t, generator=g)[:9] for _ in range(b)])
    owner = torch.randint(0, 12, (b, 9), generator=g)
    for sz in (None, sizes):
        out = T.merge_rows(x, sz, prim, members, owner)
        ref = R.merge_rows(x.double(), None if sz is None else sz.double(), prim, members, owner)
        assert rel(out, ref) < tol(dtype)


def _use_interpreted(monkeypatch, T):
    monkeypatch.setattr(kernels, "use_triton", lambda *ts: not kernels.needs_grad(ts))  # any device
    monkeypatch.setattr(kernels, "_impl", lambda: T)


@pytest.mark.parametrize("one_launch", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("padded", [False, True])
def test_bipartite_merge_fused_path_equals_pytorch_path(T, monkeypatch, padded, dtype, one_launch):
    """ops.bipartite_merge through the kernels (one-launch merge_step, or matching + merge_rows)
    gives the same tokens, sizes and source map as its PyTorch path."""
    monkeypatch.setattr(T, "MERGE_STEP_MAX_A", 128 if one_launch else 0)
    g = gen(6)
    b, p, n, c = 2, 1, 21, 32
    x = torch.randn(b, p + n, c, generator=g).to(dtype)
    metric = torch.randn(b, p + n, 16, generator=g).to(dtype)

    def state():
        s = TokenState.start(x.clone(), p)
        if padded:
            sizes = torch.randint(1, 4, (b, p + n), generator=gen(7)).float()
            sizes[0, p + 3:p + 9:2] = 0
            s.sizes, s.padded = sizes, True
        return s

    ref = ops.bipartite_merge(state(), metric, 7)
    _use_interpreted(monkeypatch, T)
    out = ops.bipartite_merge(state(), metric, 7)
    assert torch.equal(out.source, ref.source)
    assert torch.equal(out.sizes, ref.sizes)
    assert rel(out.x, ref.x) < (1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("p,n,r", [(0, 30, 15), (2, 50, 10), (1, 255, 100)])
def test_merge_step_one_launch_shapes(T, monkeypatch, p, n, r):
    """No prefix, several prefix tokens, every A token merged, odd N up to the one-launch limit."""
    g = gen(13)
    x = torch.randn(2, p + n, 40, generator=g).half()
    metric = torch.randn(2, p + n, 24, generator=g).half()
    ref = ops.bipartite_merge(TokenState.start(x.clone(), p), metric, r)
    _use_interpreted(monkeypatch, T)
    assert kernels.merge_step_fits(n)
    out = ops.bipartite_merge(TokenState.start(x.clone(), p), metric, r)
    assert torch.equal(out.source, ref.source) and torch.equal(out.sizes, ref.sizes)
    assert rel(out.x, ref.x) < 1e-3


def test_query_attention_dispatch(T, monkeypatch):
    g = gen(8)
    q, k = torch.randn(2, 3, 40, 16, generator=g), torch.randn(2, 3, 40, 16, generator=g)
    ref = ops.query_attention(q, k, 0.25, query=0)
    _use_interpreted(monkeypatch, T)
    assert rel(ops.query_attention(q, k, 0.25, query=0), ref) < 1e-5


# -- 4. ApET reconstruction error -------------------------------------------------------------------
@pytest.mark.parametrize("n,c,k", [(70, 40, 5), (33, 96, 10)])
def test_apet_errors(T, n, c, k):
    g = gen(9)
    x = torch.randn(2, n, c, generator=g).half()
    basis = x[:, :k].clone() + 0.1 * torch.randn(2, k, c, generator=g).half()
    out = T.apet_errors(x, basis)
    ref = R.apet_errors(x.double(), basis.double())
    assert rel(out, ref) < 1e-5
    from tokenprune.reducers.apet import reconstruction_error
    assert rel(out, reconstruction_error(x, basis)) < 1e-5


# -- dispatcher --------------------------------------------------------------------------------------
def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(R, "efficient_attention", lambda *a: calls.append("ref") or a[0])
    q = torch.randn(1, 1, 4, 8)
    assert kernels.use_triton(q) is False
    kernels.efficient_attention(q, q, q)
    assert calls == ["ref"]


def test_dispatcher_switch(monkeypatch):
    for value, on in (("0", False), ("off", False), ("1", True)):
        monkeypatch.setenv("TOKENPRUNE_KERNELS", value)
        assert kernels.kernels_enabled() is on
    monkeypatch.setenv("TOKENPRUNE_KERNELS", "off")
    fake_cuda = type("FakeCuda", (torch.Tensor,), {"is_cuda": property(lambda self: True)})
    assert kernels.use_triton(torch.zeros(1).as_subclass(fake_cuda)) is False


@pytest.mark.skipif(os.environ.get("TOKENPRUNE_COMPILE_CHECK") != "1",
                    reason="slow (~40 s): set TOKENPRUNE_COMPILE_CHECK=1 to compile every kernel for sm_90")
def test_kernels_compile_for_sm90_without_spills():
    """The interpreter is lenient: compile for a real target (no GPU needed) and read the cubin."""
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json; from tokenprune.kernels.compile_check import check; "
            "print(json.dumps(check(90, verbose=False)))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    # the fp16/bf16 tensor-core paths that matter on the GPU (float32-product variants may spill a little)
    half = [r for r in rows if not r["config"].get("IS_F32") and r["config"].get("LOWP", True)]
    assert all(r.get("stack", 0) == 0 for r in half), [r for r in half if r.get("stack")]
    assert all(r["hgmma"] > 0 for r in half if r["kernel"] in ("_ea_context", "_ea_apply", "_bm_best"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_rows_members_only_and_gather(T, dtype):
    g = gen(10)
    b, t, c = 2, 25, 1100  # C over one 1024-wide column block
    x = torch.randn(b, t, c, generator=g).to(dtype)
    sizes = torch.randint(1, 4, (b, t), generator=g).float()
    prim = torch.stack([torch.randperm(t, generator=g)[:8] for _ in range(b)])
    members = torch.arange(t).expand(b, t)
    owner = torch.randint(0, 8, (b, t), generator=g)
    out = T.merge_rows(x, sizes, prim, members, owner, include_prim=False)
    ref = R.merge_rows(x.double(), sizes.double(), prim, members, owner, include_prim=False)
    assert rel(out, ref) < tol(dtype)
    rows = torch.stack([torch.randperm(t, generator=g)[:11] for _ in range(b)])
    assert torch.equal(T.gather_rows(x, rows), R.gather_rows(x, rows))


def test_gather_tokens_fused_path_equals_pytorch_path(T, monkeypatch):
    g = gen(11)
    x = torch.randn(2, 1 + 30, 24, generator=g)
    keep = torch.stack([torch.randperm(30, generator=g)[:12].sort().values for _ in range(2)])
    ref = ops.gather_tokens(TokenState.start(x.clone(), 1), keep)
    _use_interpreted(monkeypatch, T)
    out = ops.gather_tokens(TokenState.start(x.clone(), 1), keep)
    assert torch.equal(out.x, ref.x) and torch.equal(out.source, ref.source)


@pytest.mark.parametrize("sized", [False, True])
def test_apet_reduce_fused_path_equals_pytorch_path(T, monkeypatch, sized):
    from tokenprune.plan import Stage
    from tokenprune.reducers.apet import Apet

    g = gen(12)
    b, p, n, c = 2, 1, 40, 32
    x = torch.randn(b, p + n, c, generator=g)
    sizes = torch.randint(1, 4, (b, p + n), generator=g).float()

    def state():
        s = TokenState.start(x.clone(), p)
        if sized:
            s.sizes = sizes.clone()
        return s

    red = Apet(k=4)
    ref = red.reduce(state(), Stage(0, 15, "apet"), None)
    _use_interpreted(monkeypatch, T)
    out = red.reduce(state(), Stage(0, 15, "apet"), None)
    assert torch.equal(out.source, ref.source)
    assert rel(out.x, ref.x) < 1e-5


@pytest.mark.parametrize("method,budget", [("merge", 0.25), ("cls", 0.25), ("apet", 0.5), ("maelre", 0.25)])
def test_model_forward_with_kernels_equals_pytorch_path(T, monkeypatch, method, budget):
    """A whole reduced forward (tiny timm ViT) gives the same logits through the kernels."""
    import tokenprune
    from conftest import tiny_vit

    if method not in tokenprune.methods():
        pytest.skip(f"{method} not registered")
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=gen(14))
    tokenprune.apply(model, budget=budget, method=method)
    with torch.no_grad():
        ref = model(x)
        _use_interpreted(monkeypatch, T)
        out = model(x)
    assert rel(out, ref) < 1e-4
