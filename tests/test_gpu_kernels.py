"""The Triton kernels on a GPU against float64 / PyTorch references (from scripts/gpu_kernels.py's checks).

Marked ``gpu`` and skipped without CUDA. On the GPU machine:

    python -m pytest -q -m gpu tests/test_gpu_kernels.py

Every kernel output is poisoned first (NaN / -7: an unwritten element fails), sizes include
non-multiples of the block sizes, dtypes fp16 / bf16 / fp32. Calls go through the public dispatch
(``tokenprune.kernels.*``, ``tokenprune.ops``, the reducers); the PyTorch path is
``kernels.set_kernels_enabled(False)``. Each parametrization holds the GPU shapes and one small shape.

``TOKENPRUNE_GPU_TESTS_ON_CPU=1`` runs the same tests on CPU through Triton's interpreter
(``TRITON_INTERPRET=1``; CPU tensors dispatch to the interpreted kernels), skipping the shapes too large
for the interpreter, bfloat16 (the interpreter has no bf16 matrix product) and CUDA graphs. It checks
these tests, not the GPU (tests/test_kernels.py is the CPU suite of the kernels); run the file on its own
there (triton must be imported after the variable is set):

    TOKENPRUNE_GPU_TESTS_ON_CPU=1 python -m pytest -q tests/test_gpu_kernels.py
"""
from __future__ import annotations

import contextlib
import importlib
import math
import os

import pytest
import torch

ON_CPU = os.environ.get("TOKENPRUNE_GPU_TESTS_ON_CPU") == "1"
if ON_CPU:  # before triton is first imported (importing tokenprune imports it): triton.language's own helpers
    os.environ["TRITON_INTERPRET"] = "1"  # are decorated then, interpreted or compiled
DEV = "cpu" if ON_CPU else "cuda"
CPU_MAX_ELEMENTS = 300_000  # CPU mode: larger inputs are skipped (the interpreter runs a kernel in Python)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(),
                       reason="needs a CUDA device (TOKENPRUNE_GPU_TESTS_ON_CPU=1 runs these tests through "
                              "Triton's interpreter on CPU)"),
]

import tokenprune  # noqa: E402
from tokenprune import kernels, ops  # noqa: E402
from tokenprune.kernels import reference as R  # noqa: E402
from tokenprune.plan import Stage  # noqa: E402
from tokenprune.state import TokenState  # noqa: E402

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
TOL = {F16: 1e-2, BF16: 1e-2, F32: 3e-4}  # rel. error against float64, attention-like kernels
ULP = {F16: 2 ** -10, BF16: 2 ** -7, F32: 2 ** -20}


# -- fixtures and helpers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def T():
    """The Triton module the dispatch calls: compiled on CUDA, interpreted in CPU mode. Another test module
    (tests/test_kernels.py) may have set TRITON_INTERPRET=1 for the session and imported an interpreted copy:
    reload it as needed (a reload keeps the module object the dispatcher holds), and restore the variable."""
    tl = pytest.importorskip("triton.language")
    if (type(tl.zeros).__name__ == "InterpretedFunction") != ON_CPU:
        pytest.skip("triton was imported in another mode (interpreted / compiled) earlier in this process: "
                    "run tests/test_gpu_kernels.py on its own")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if ON_CPU else "0"
    mod = importlib.import_module("tokenprune.kernels.triton_impl")
    if (type(mod._ea_apply).__name__ == "InterpretedFunction") != ON_CPU:
        mod = importlib.reload(mod)
    assert ON_CPU or kernels._impl().merge is mod.merge, "the dispatcher does not reach the Triton kernels"
    yield mod
    mod.POISON = False
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


@pytest.fixture(autouse=True)
def dispatch(T, monkeypatch):
    """Kernels on at the start of each test (restored after); in CPU mode CPU tensors dispatch to the
    interpreted kernels, and ``set_kernels_enabled(False)`` still selects the PyTorch path."""
    if ON_CPU:
        monkeypatch.setattr(kernels, "use_triton", lambda *ts: kernels.kernels_enabled() and not kernels.needs_grad(ts))
        monkeypatch.setattr(kernels, "_impl", lambda: T)
    was = kernels.kernels_enabled()
    kernels.set_kernels_enabled(True)
    yield
    kernels.set_kernels_enabled(was)


kernels_on = kernels.kernels_on


@contextlib.contextmanager
def poisoned(T):
    """Every buffer a kernel writes starts as NaN / -7."""
    T.POISON = True
    try:
        yield
    finally:
        T.POISON = False


def needs(dtype, *shape):
    """Skip, in CPU mode, what the interpreter cannot run (bf16 products) or would take minutes for."""
    if ON_CPU and dtype == BF16:
        pytest.skip("CPU mode: the Triton interpreter has no bfloat16 matrix product")
    if ON_CPU and math.prod(shape) > CPU_MAX_ELEMENTS:
        pytest.skip(f"CPU mode: {shape} is too large for the Triton interpreter")


def gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def randn(*shape, dtype, g):
    return torch.randn(*shape, generator=g, device=DEV, dtype=torch.float32).to(dtype)


def size_bias(b, n, dtype, g, masked=True):
    """The log-size key bias ``[B, 1, 1, N]`` of proportional attention; ``masked``: padding keys (log 0)."""
    s = torch.rand(b, n, generator=g, device=DEV) * 3 + 0.5
    if masked:
        s[:, 2::7] = 0
    return s.log()[:, None, None, :].to(dtype)


def rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in the output (an element was not written?)"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def vit(kind):
    """``tiny``: the CPU tests' ViT (float32); ``base``: vit_base_patch16_224 in fp16 (random weights)."""
    import timm

    from conftest import tiny_vit

    torch.manual_seed(0)
    if kind == "tiny":
        return tiny_vit().to(DEV), F32, 32
    return timm.create_model("vit_base_patch16_224", pretrained=False).to(DEV, F16).eval(), F16, 224


def whisper_encoder(seed: int, dtype=F32, d_model: int = 128, heads: int = 2):
    """A 4-layer transformers ``WhisperEncoder`` (random weights, SDPA) on the device and one input of 1200 mel frames
    (600 encoder tokens, batch 1) drawn from ``gen(seed)``."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(d_model=d_model, encoder_layers=4, encoder_attention_heads=heads, encoder_ffn_dim=2 * d_model,
                        num_mel_bins=16, max_source_positions=600)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = WhisperEncoder(cfg).to(DEV, dtype).eval()
    return model, torch.randn(1, 16, 1200, device=DEV, generator=gen(seed)).to(dtype)


def dtype_id(v):
    """Test ids: float16 rather than dtype0 (``-k float16`` selects by dtype)."""
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else None


def same_state(a, b) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("x", "sizes", "source"))


# -- attention kernels ---------------------------------------------------------------------------------
@pytest.mark.parametrize("b,h,n,d,dtype,bias", [
    (1, 3, 8192 + 37, 64, F16, False), (2, 2, 1000, 128, BF16, True), (1, 1, 65536, 64, F16, True),
    (3, 5, 333, 64, BF16, False), (2, 3, 4097, 128, F16, True), (1, 2, 777, 64, F32, True),
    (1, 2, 37, 16, F32, True)], ids=dtype_id)
def test_efficient_attention(T, b, h, n, d, dtype, bias):
    needs(dtype, b, h, n, d)
    g = gen(1)
    q, k, v = (randn(b, h, n, d, dtype=dtype, g=g) for _ in range(3))
    bb = size_bias(b, n, dtype, g) if bias else None
    assert kernels.use_triton(q, k, v, bb)
    with poisoned(T):
        out = kernels.efficient_attention(q, k, v, bb)
    ref = R.efficient_attention(q.double(), k.double(), v.double(), None if bb is None else bb.double())
    assert out.shape == q.shape and out.dtype == dtype
    assert rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("b,h,n,d,dtype", [
    (3, 5, 197, 64, F16), (2, 3, 99, 64, BF16), (1, 2, 1000, 64, F16), (4, 3, 257, 128, BF16),
    (2, 2, 50, 80, F16), (1, 2, 333, 64, F32), (1, 2, 37, 16, F32), (1, 16, 729, 72, F16)], ids=dtype_id)
def test_biased_attention(T, monkeypatch, b, h, n, d, dtype):
    needs(dtype, b, h, n, d)
    monkeypatch.setattr(kernels, "BA_MIN_BATCH_EAGER", 1)  # small batches take the kernel too (eager: SDPA)
    g = gen(3)
    q, k, v = (randn(b, h, n, d, dtype=dtype, g=g) for _ in range(3))
    bias = size_bias(b, n, dtype, g)  # with padding keys (log 0)
    assert kernels.biased_attention_applies(bias, n, d)
    with poisoned(T):
        out = kernels.biased_attention(q, k, v, bias)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                           attn_mask=bias.double())
    assert rel(out, ref) < TOL[dtype]


def test_biased_attention_growing_logits_and_masked_keys(T, monkeypatch):
    """Logits growing over the keys (the running max moves far for a third of the rows), one sample's
    first 40 keys masked, one sample with every key masked: zeros, as SDPA gives."""
    monkeypatch.setattr(kernels, "BA_MIN_BATCH_EAGER", 1)
    g = gen(3)
    b, h, n, d = 3, 4, 197, 64
    q, k, v = (torch.randn(b, h, n, d, device=DEV, generator=g) for _ in range(3))
    k = k * torch.linspace(0.1, 3.0, n, device=DEV)[:, None]
    q[:, :, ::3] *= 4
    bias = torch.zeros(b, n, device=DEV)
    bias[1, :40] = float("-inf")
    bias[2] = float("-inf")
    bias[0, 100:] = 3.0
    q, k, v, bb = q.half(), k.half(), v.half(), bias[:, None, None, :].half()
    assert kernels.biased_attention_applies(bb, n, d)
    with poisoned(T):
        out = kernels.biased_attention(q, k, v, bb)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bb.double())
    assert bool((out[2] == 0).all()), "a sample with every key masked must give zeros"
    assert rel(out[:2], ref[:2]) < TOL[F16]


@pytest.mark.parametrize("b,h,n,d,dtype", [(1, 12, 197, 64, F16), (2, 16, 99, 72, BF16), (1, 12, 113, 64, F32)],
                         ids=dtype_id)
def test_biased_attention_key_mean(T, monkeypatch, b, h, n, d, dtype):
    """KEY_MEAN_IN_ATTENTION_MAX_BATCH: the key-bias launch also writes k.mean(1) (the keys a strided view of a
    qkv output): bit for bit in fp16 / bf16 (float32: within an ulp), eager and compiled with fullgraph; the
    attention output the same as without."""
    needs(dtype, b, h, n, d)
    monkeypatch.setattr(kernels, "BA_MIN_BATCH_EAGER", 1)
    monkeypatch.setattr(kernels, "KEY_MEAN_IN_ATTENTION_MAX_BATCH", 2)
    g = gen(6)
    qkv = randn(b, n, 3, h, d, dtype=dtype, g=g)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    bias = size_bias(b, n, dtype, g)
    with poisoned(T):
        out, km = kernels.biased_attention(q, k, v, bias, key_mean=True)
        plain = kernels.biased_attention(q, k, v, bias)
    comp, kmc = torch.compile(lambda *a: kernels.biased_attention(*a, key_mean=True), fullgraph=True)(q, k, v, bias)
    ref = k.mean(1)
    assert torch.equal(out, plain)
    assert rel(comp, plain) < TOL[dtype]  # (the same launch on CUDA; the reference op where the tests run on a CPU)
    for m in (km, kmc):
        if dtype == F32:
            assert torch.allclose(m, ref, rtol=2.5e-7, atol=1e-7)
        else:
            assert torch.equal(m, ref)


@pytest.mark.parametrize("weights", ["none", "bias", "bias+w", "bias+o"])
@pytest.mark.parametrize("b,h,n,d,dtype", [
    (2, 12, 197, 64, F16), (3, 5, 1013, 128, BF16), (1, 4, 65536 + 3, 64, F16), (256, 12, 197, 64, F16),
    (2, 6, 300, 64, F32), (2, 3, 50, 16, F32)], ids=dtype_id)
def test_query_scores(T, b, h, n, d, dtype, weights):
    needs(dtype, b, h, n, d)
    g = gen(2)
    q, k = randn(b, h, n, d, dtype=dtype, g=g), randn(b, h, n, d, dtype=dtype, g=g)
    bias = None if weights == "none" else size_bias(b, n, dtype, g)
    w = torch.rand(b, h, n, device=DEV, generator=g) if weights == "bias+w" else None
    # the heads' attention outputs (threshold's head importance), laid out as the attention kernels write them
    o = randn(b, n, h, d, dtype=dtype, g=g).transpose(1, 2) if weights == "bias+o" else None
    assert kernels.use_triton(q, k, bias, w, o)
    with poisoned(T):
        out = kernels.query_scores(q[:, :, 0], k, d ** -0.5, bias, w, o)
    ref = R.query_scores(q[:, :, 0].double(), k.double(), d ** -0.5, None if bias is None else bias.double(),
                         None if w is None else w.double(), None if o is None else o.double())
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("extra", ["none", "bias", "bias+valid"])
@pytest.mark.parametrize("b,h,n,d,dtype", [
    (1, 20, 1500, 64, F16), (2, 16, 729, 72, BF16), (2, 12, 197, 64, F16), (2, 3, 50, 16, F32)], ids=dtype_id)
def test_received_scores(T, b, h, n, d, dtype, extra):
    """Whisper-large (1500 frames, 20 heads), SigLIP-so400m/14@384 (729 patches, head dim 72), ViT-B, fp32."""
    needs(dtype, b, h, n, n)
    g = gen(3)
    q, k = randn(b, h, n, d, dtype=dtype, g=g), randn(b, h, n, d, dtype=dtype, g=g)
    bias = None if extra == "none" else size_bias(b, n, dtype, g)
    valid = torch.rand(b, n, generator=g, device=DEV) > 0.2 if extra == "bias+valid" else None
    assert kernels.use_triton(q, k, bias, valid)
    with poisoned(T):
        out = kernels.received_scores(q, k, d ** -0.5, bias, valid)
    ref = R.received_scores(q.double(), k.double(), d ** -0.5, None if bias is None else bias.double(), valid)
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_received_scores_on_the_attention_lse(T, backend):
    """The log-sum-exp a fused attention returns (cuDNN's ``[B, H, N, 1]``, flash's ``[B, H, N]``) is the one the
    column pass needs (natural log of the scaled scores' exponentials): Whisper-large's shape, scores equal the
    reference's as with the kernel's own pass."""
    needs(F16, 1, 20, 1500, 1500)
    g = gen(4)
    q, k, v = (randn(1, 20, 1500, 64, dtype=F16, g=g) for _ in range(3))
    scale = 64 ** -0.5
    try:
        if backend == "cudnn":
            lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                     scale=scale)[1]
        else:
            lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[1]
    except (RuntimeError, AttributeError) as e:
        pytest.skip(f"{backend} attention with its log-sum-exp is not available here: {e}")
    want = torch.logsumexp(torch.einsum("bhqd,bhnd->bhqn", q.double(), k.double()) * scale, -1)
    assert (lse.reshape(want.shape).double() - want).abs().max() < 1e-2, "not the natural-log log-sum-exp"
    out = kernels.received_scores(q, k, scale, None, None, lse)
    ref = R.received_scores(q.double(), k.double(), scale, None, None)
    assert rel(out, ref) < 1e-4


# -- merging --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("valid", [False, True])
@pytest.mark.parametrize("b,n,d,dtype", [(256, 196, 64, F16), (2, 16384, 64, F16), (4, 333, 64, F32),
                                         (8, 1001, 64, BF16), (2, 51, 16, F32), (1, 729, 72, F16)], ids=dtype_id)
def test_bipartite_best(T, b, n, d, dtype, valid):
    """The best partner of each A token; a different partner than the reference's only where the two
    similarities tie within 2 ulp of the metric dtype."""
    needs(dtype, b, n, d)
    g = gen(3)
    metric = randn(b, n + 1, d, dtype=dtype, g=g)[:, 1:]  # a strided view, like metric[:, p:]
    vb = (torch.rand(b, n // 2, device=DEV, generator=g) > 0.1) if valid else None
    assert kernels.use_triton(metric, vb)
    with poisoned(T):
        _, idx = kernels.bipartite_best(metric, vb)
    _, ridx = R.bipartite_best(metric, vb)
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    s = (m[:, ::2] @ m[:, 1::2].transpose(-1, -2)).float()
    if vb is not None:
        s = s.masked_fill(~vb[:, None, :], float("-inf"))
    gap = (s.gather(2, ridx[..., None]) - s.gather(2, idx[..., None])).abs().max().item()
    assert gap <= 2 * ULP[dtype], f"partners differ by {gap:.2e} in similarity"


@pytest.mark.parametrize("b,n,c,r,dtype", [
    (64, 196, 768, 13, F32), (256, 196, 768, 13, F16), (2, 16384, 768, 4096, F32), (2, 16384, 768, 4096, F16),
    (128, 196, 768, 48, F16),  # row gather with 128-column fix-up tiles
    (3, 101, 384, 50, F32), (8, 255, 256, 100, BF16), (2, 21, 32, 7, F32),
    (1, 1500, 1280, 24, F32), (2, 728, 1152, 21, F32), (4, 1500, 384, 128, F32),  # long inputs: four launches
    (1, 1500, 1280, 250, F32), (1, 728, 1152, 182, F32),  # three-step merges: the fix-up in tiles (> 128 merged)
], ids=dtype_id)
def test_bipartite_merge_step_kernels_vs_pytorch(T, b, n, c, r, dtype):
    """ops.bipartite_merge, kernels on vs off, on the same sized state. Both break equal scores to the lower
    index, but cuBLAS and the kernels sum the cosines in other orders, which may round a near tie apart
    differently, so per sample: the samples with the same source map (all at ViT sizes in float32, >= 90% in
    fp16 / bf16, >= 50% at 8k x 8k candidates) have the same tokens, sizes and log-size attention bias."""
    needs(dtype, b, n + 1, c)
    g = gen(3)
    x = randn(b, 1 + n, c, dtype=dtype, g=g)
    metric = randn(b, 1 + n, 64, dtype=dtype, g=g)
    sizes = torch.randint(1, 4, (b, 1 + n), device=DEV, generator=g).float()
    outs = {}
    for on in (False, True):
        with kernels_on(on), poisoned(T):
            st = TokenState.start(x, 1)
            st.sizes = sizes
            outs[on] = ops.bipartite_merge(st, metric, r)
    same = (outs[True].source == outs[False].source).all(1)
    need = (1.0 if n <= 256 else 0.5) if dtype == F32 else (0.9 if n <= 256 else 0.5)
    assert float(same.float().mean()) >= need
    assert rel(outs[True].x[same], outs[False].x[same]) < TOL[dtype]
    assert torch.equal(outs[True].sizes[same], outs[False].sizes[same])
    b_on, b_off = outs[True].attn_bias(dtype)[same].float(), outs[False].attn_bias(dtype)[same].float()
    assert torch.allclose(b_on, b_off, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("n,c,h,r,perm", [(1500, 1280, 20, 25, False), (729, 1152, 16, 21, False),
                                           (300, 768, 12, 40, True)])
def test_long_merge_step_in_one_launch_equals_its_four_launches(T, monkeypatch, n, c, h, r, perm):
    """A batch-1 long input's merge step (Whisper-large, SigLIP, a pitome step through its order) as one launch
    (``_merge_long``: its phases wait on counters) gives the bits of its four launches, eagerly (three calls: the
    counters are back at 0 after each) and replayed from a CUDA graph on new tokens."""
    from tokenprune.cuda import graphed
    from tokenprune.kernels import merge as M

    needs(F16, n, c)
    g = gen(5)
    x, y = randn(1, n, c, dtype=F16, g=g), randn(1, n, c, dtype=F16, g=g)
    keys = randn(1, h, n, 64, dtype=F16, g=g)
    sizes = torch.randint(1, 4, (1, n), device=DEV, generator=g).float()
    source = torch.arange(n, device=DEV)[None]
    order = torch.cat([torch.arange(1, device=DEV), 1 + torch.randperm(n - 1, device=DEV, generator=g)])[None]

    def step(x, y, scratch):
        return M.merge_step(x, keys, sizes, source, 1, r, False, n, True, residual=y, perm=order if perm else None,
                            scratch=scratch)

    outs, scratch = {}, {}
    for one in (False, True, True, True):
        monkeypatch.setattr(M, "MERGE_LONG_ONE_LAUNCH", one)
        outs.setdefault(one, []).append([a.clone() for a in step(x, y, scratch)])
    assert any(getattr(p, "fused", False) for p in M._PLANS.values())
    assert int(scratch["_merge_long"].abs().sum()) == 0
    for got in outs[True]:
        assert all(torch.equal(a, b) for a, b in zip(got, outs[False][0]))
    if not ON_CPU:
        run = graphed(lambda x, y: step(x, y, None), x, y)  # one launch (the last setting above)
        x2 = randn(1, n, c, dtype=F16, g=g)
        got = [a.clone() for a in run(x2, y)]
        monkeypatch.setattr(M, "MERGE_LONG_ONE_LAUNCH", False)
        ref = step(x2, y, None)
        assert all(torch.equal(a, b) for a, b in zip(got, ref))


def _head_mean_kernel(m_ptr, o_ptr, N, D, smn, smh, H: tl.constexpr, BN: tl.constexpr, DP: tl.constexpr):
    # the merge kernels' key mean (_metric_rows) of rows pid * BN.. over H heads, stored [N, D]
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, DP)
    mask = (rows[:, None] < N) & (offs_d[None, :] < D)
    tl.store(o_ptr + rows[:, None] * D + offs_d[None, :], _metric_rows(m_ptr, rows, offs_d, mask, smn, smh, H),
             mask=mask)


@pytest.mark.parametrize("h", [2, 3, 12, 16, 20, 64, 72])
@pytest.mark.parametrize("d,dtype", [(64, F16), (72, F16), (64, BF16), (64, F32)], ids=dtype_id)
def test_key_mean_in_the_kernels_is_the_ieee_mean_bit_for_bit(T, h, d, dtype):
    """The key mean the merge kernels take while loading the keys per head (``_metric_rows``) against the reference's
    on the CPU (float32 sums in the kernels' order, 16 heads at a time, then those sums, divided by H as IEEE divides,
    rounded to the keys' dtype): the same bits. On the GPU, up to 64 heads, it divides by H without the division
    instruction (kernels/NOTES.md, session 16); the interpreter and more heads take the division. Zeros, cancelling
    rows and large values included."""
    import types

    import triton
    import triton.language as tl

    from tokenprune.kernels import _triton_common as common

    needs(dtype, h, 300, d)
    # decorated here, in the mode the T fixture checked, with the helper it calls among its globals
    body = types.FunctionType(_head_mean_kernel.__code__, {"tl": tl, "_metric_rows": common._metric_rows})
    body.__annotations__ = dict(_head_mean_kernel.__annotations__)  # the constexpr parameters (not in the code object)
    fn = triton.jit(body)
    g = gen(11)
    k = randn(h, 300, d, dtype=dtype, g=g) * torch.logspace(-6, 4, 300, device=DEV)[:, None].to(dtype)
    k[:, :5] = 0  # exact zeros
    k[1::2, 5:10] = -k[0:(h // 2) * 2:2, 5:10]  # rows whose heads cancel
    out = torch.full((300, d), float("nan"), device=DEV, dtype=dtype)
    fn[(triton.cdiv(300, 64),)](k, out, 300, d, k.stride(1), k.stride(0), H=h, BN=64, DP=triton.next_power_of_2(d))
    assert torch.equal(out.cpu(), R.key_mean(k.cpu()[None])[0])  # the CPU's mean sums in that order and divides


@pytest.mark.parametrize("b,n,h,c,r,dtype", [
    (1, 196, 16, 1024, 13, F16), (256, 196, 12, 768, 13, F16), (64, 196, 12, 768, 48, BF16),
    (8, 196, 16, 1024, 13, F32), (4, 1500, 20, 1280, 24, F16), (4, 728, 16, 1152, 21, BF16), (2, 21, 3, 32, 7, F32),
], ids=dtype_id)
def test_merge_step_on_the_keys_equals_merge_step_on_their_mean(T, b, n, h, c, r, dtype):
    """ops.bipartite_merge given a block's keys [B, H, T, d] (a strided view of a [B, T, 3, H, d] qkv output; the
    kernels average them as they load them) against the same kernels given ``k.mean(1)``: the same step (one launch,
    row gather, three launches). CUDA's mean sums in another float32 order (and multiplies by 1 / H): an ulp of the
    mean may flip a near tie, so per sample as in the test below: >= 90% of the samples (all of them at batch 1),
    >= 50% above 256 tokens, have the same source map, and then the same tokens and sizes."""
    needs(dtype, b, n + 1, c)
    g = gen(5)
    x = randn(b, 1 + n, c, dtype=dtype, g=g)
    k = randn(b, 1 + n, 3, h, 64, dtype=dtype, g=g).permute(2, 0, 3, 1, 4)[1]
    sizes = torch.randint(1, 4, (b, 1 + n), device=DEV, generator=g).float()
    outs = []
    for metric in (k, R.key_mean(k)):
        with poisoned(T):
            st = TokenState.start(x, 1)
            st.sizes = sizes
            outs.append(ops.bipartite_merge(st, metric, r))
    same = (outs[0].source == outs[1].source).all(1)
    assert float(same.float().mean()) >= (0.9 if n <= 256 else 0.5)
    assert torch.equal(outs[0].x[same], outs[1].x[same]) and torch.equal(outs[0].sizes[same], outs[1].sizes[same])


@pytest.mark.parametrize("b,n,c,r,dtype", [
    (256, 196, 768, 13, F16), (128, 196, 768, 48, BF16), (64, 98, 768, 13, F32), (8, 196, 768, 13, F16),
    (2, 21, 32, 7, F32), (1, 1500, 1280, 24, F16)], ids=dtype_id)
def test_bipartite_merge_deferred_residual_is_bit_identical(T, b, n, c, r, dtype):
    """Tokens handed over as x + y (a block's last residual add left to the merge): the same step, bit for
    bit, as merging the stored sum (row gather at bs >= 32; smaller batches add first)."""
    needs(dtype, b, n + 1, c)
    g = gen(3)
    x, y = randn(b, 1 + n, c, dtype=dtype, g=g), randn(b, 1 + n, c, dtype=dtype, g=g)
    metric = randn(b, 1 + n, 64, dtype=dtype, g=g)
    sizes = torch.randint(1, 4, (b, 1 + n), device=DEV, generator=g).float()
    with poisoned(T):
        st = TokenState.start(x + y, 1)
        st.sizes = sizes
        ref = ops.bipartite_merge(st, metric, r)
        st = TokenState.start(x, 1)
        st.sizes, st.residual = sizes, y
        out = ops.bipartite_merge(st, metric, r)
    assert same_state(out, ref)


@pytest.mark.parametrize("b,n,cand,dtype,padded", [
    (256, 196, 26, F16, False), (1, 196, 26, F16, False), (64, 196, 196, F32, True), (4, 576, 40, F16, True),
    (2, 1500, 48, BF16, False), (3, 37, 10, F32, False)], ids=dtype_id)
def test_pitome_order(T, b, n, cand, dtype, padded):
    """PiToMe's energies and step order in one launch against the reference (float32, the N x N matrix):
    float32 energies to rounding and the same order; fp16 / bf16 energies to a few 1e-3 (a cosine that rounds
    across the margin moves f by about the margin), and exactly the order the reference gives those energies."""
    needs(dtype, b, n, n)
    g = gen(31)
    m = randn(b, 1 + n, 64, dtype=dtype, g=g) + randn(b, 1, 64, dtype=dtype, g=g)
    sizes = torch.randint(1, 4, (b, 1 + n), device=DEV, generator=g).float()
    if padded:
        sizes[:, 3::7] = 0
    with poisoned(T):
        e, perm = kernels.pitome_order(m, sizes, 1, cand, 0.6, padded)
    e_ref, perm_ref = R.pitome_order(m, sizes, 1, cand, 0.6, padded)
    fin = torch.isfinite(e_ref)
    assert torch.equal(torch.isfinite(e), fin)
    err = (e[fin] - e_ref[fin]).abs()
    if dtype == F32:
        assert float(err.max()) < 1e-4 and float((perm == perm_ref).all(1).float().mean()) >= 0.9
    else:
        assert float(err.mean()) < 3e-3
    assert torch.equal(perm, R.pitome_perm(e, 1, cand))


@pytest.mark.parametrize("b,n,c,r,dtype,candidates", [
    (256, 196, 768, 13, F16, 2.0), (64, 196, 768, 13, F32, 2.0), (256, 196, 768, 13, F16, float("inf")),
    (1, 196, 768, 13, F16, 2.0), (8, 196, 768, 48, F32, 3.0), (2, 1500, 1280, 24, F16, 2.0), (2, 21, 32, 7, F32, 2.0),
], ids=dtype_id)
def test_pitome_step_kernels_vs_pytorch(T, b, n, c, r, dtype, candidates):
    """One pitome step (order + ToMe's merge step through the order, residual left to it), kernels on vs off.

    The merge through the kernels' order: the same source maps as the PyTorch path (both break exact ties to the
    lower index; >= 90% for the near ties that fp16 products round apart differently), tokens and sizes. The whole
    step with kernels on is exactly that merge through the order of its own energies. Against the whole PyTorch
    step (float32 energies): in float32 the same order too, so >= 90% of the samples have the same source map. In
    fp16 the kernel's energies come from fp16 products: about 1e-4 off the float32 ones, 3e-3 (0.6 / 195) per
    cosine that rounds across the margin, while the closest two of a sample's 196 energies lie about 5e-6 apart,
    and any two adjacent ranks that swap among the candidates change the step. With 2 r candidates the order of
    the top 26 is the same in about 60% of the samples (>= 30% checked at large batches); with every token a
    candidate (candidates=inf) in about 5%, so only the energies' tolerance (test_pitome_order) and the two
    checks above hold there."""
    from tokenprune.reducers.pitome import protected_merge

    needs(dtype, b, n + 1, c)
    g = gen(32)
    x, y = randn(b, 1 + n, c, dtype=dtype, g=g), randn(b, 1 + n, c, dtype=dtype, g=g)
    metric = randn(b, 1 + n, 64, dtype=dtype, g=g) + randn(b, 1, 64, dtype=dtype, g=g)
    cand = min(n, max(2 * r, math.ceil(min(candidates * r, n))))
    energies, order = kernels.pitome_order(metric, None, 1, cand, 0.6, False)
    assert torch.equal(order, R.pitome_perm(energies, 1, cand))

    def step(on, whole):
        st = TokenState.start(x, 1)
        st.residual = y
        with kernels_on(on), poisoned(T):
            return (protected_merge(st, metric, r, 0.6, candidates) if whole else
                    ops.bipartite_merge(st, metric, r, order=order, protect=n - cand))

    def agree(out, ref, need):
        same = (out.source == ref.source).all(1)
        assert float(same.float().mean()) >= need
        if same.any():
            assert rel(out.x[same], ref.x[same]) < TOL[dtype]
            assert torch.equal(out.sizes[same], ref.sizes[same])

    merged = step(True, False)
    agree(merged, step(False, False), 0.9)
    whole = step(True, True)
    assert same_state(whole, merged)
    if dtype == F32:
        agree(whole, step(False, True), 0.9)
    elif b >= 64 and cand < n:
        agree(whole, step(False, True), 0.3)


# -- keeping --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,n,c,k", [(256, 196, 768, 98), (1, 196, 768, 98), (8, 16384, 768, 4096), (2, 64, 32, 20)])
def test_gather_tokens_kernels_vs_pytorch(T, b, n, c, k):
    """cls / random keep step: ops.gather_tokens (kept rows + prefix in one pass) against gather + cat."""
    needs(F16, b, n + 1, c)
    g = gen(6)
    x = randn(b, 1 + n, c, dtype=F16, g=g)
    keep = torch.rand(b, n, device=DEV, generator=g).topk(k, 1).indices.sort(1).values
    outs = {}
    for on in (False, True):
        with kernels_on(on), poisoned(T):
            outs[on] = ops.gather_tokens(TokenState.start(x, 1), keep).x
    assert rel(outs[True], outs[False]) < 1e-12


@pytest.mark.parametrize("b,n,c,k", [(256, 196, 768, 98), (1, 196, 768, 98), (1, 576, 1024, 58),
                                     (16, 576, 1024, 144), (4, 1000, 384, 250), (2, 64, 32, 20),
                                     (1, 1500, 1280, 750), (1, 3000, 64, 1000)])
def test_keep_top_kernels_vs_pytorch(T, b, n, c, k):
    """The whole keep step (top-k in spatial order, gather, sizes, source map; one launch on CUDA):
    identical to topk / sort / gather / cat / scatter (distinct scores)."""
    needs(F16, b, n + 1, c)
    g = gen(6)
    x = randn(b, 1 + n, c, dtype=F16, g=g)
    scores = torch.rand(b, n, device=DEV, generator=g).argsort(1).float() / n
    sizes = torch.randint(1, 4, (b, 1 + n), device=DEV, generator=g).float()
    outs = {}
    for on in (False, True):
        with kernels_on(on), poisoned(T):
            st = TokenState.start(x, 1)
            st.sizes = sizes
            outs[on] = ops.keep_top(st, scores, k)
    assert same_state(outs[True], outs[False])


@pytest.mark.parametrize("n,c,k,th", [(196, 768, 49, "tensor"), (576, 1024, 144, 0.5), (1500, 1280, 750, "tensor"),
                                     (196, 768, 49, 2.0), (64, 32, 20, -1.0)])
def test_keep_above_batch_1_kernels_vs_pytorch(T, n, c, k, th):
    """``ops.keep_above`` at batch 1 (threshold, cls ``threshold=``): one launch and one read of the count on CUDA,
    identical to the counts, their read and ``keep_top`` with the kernels off; theta read on the device or a float;
    none above (keeps one) and all above (keeps the cap)."""
    needs(F16, 1, n + 1, c)
    g = gen(7)
    x = randn(1, 1 + n, c, dtype=F16, g=g)
    scores = torch.rand(1, n, device=DEV, generator=g).argsort(1).float() / n
    sizes = torch.randint(1, 4, (1, 1 + n), device=DEV, generator=g).float()
    thr = torch.tensor([0.6], device=DEV) if th == "tensor" else th
    outs = {}
    for on in (False, True):
        with kernels_on(on), poisoned(T):
            st = TokenState.start(x, 1, track_source=True)
            st.sizes = sizes
            outs[on] = ops.keep_above(st, scores, thr, k)
    (got, kept), (ref, ref_kept) = outs[True], outs[False]
    assert got.x.is_contiguous() and same_state(got, ref) and torch.equal(kept, ref_kept)


# -- ApET -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,n,c,k,dtype", [(256, 196, 768, 10, F16), (3, 1000, 1024, 10, BF16),
                                           (2, 77, 96, 5, F32), (1, 4099, 768, 16, F16), (2, 33, 40, 5, F32)],
                         ids=dtype_id)
def test_apet_errors(T, b, n, c, k, dtype):
    needs(dtype, b, n, c)
    g = gen(4)
    x = randn(b, n, c, dtype=dtype, g=g)
    basis = x[:, :k].clone()
    assert kernels.use_triton(x, basis)
    with poisoned(T):
        out = kernels.apet_errors(x, basis)
    assert rel(out, R.apet_errors(x.double(), basis.double())) < 1e-4


@pytest.mark.parametrize("b,n,c,keep", [(256, 196, 768, 98), (1, 196, 768, 98), (2, 40, 32, 15)])
def test_apet_reduce_step_kernels_vs_pytorch_fp32(T, b, n, c, keep):
    """Apet.reduce with kernels on (fp16) against the PyTorch path on the same tokens in float32: the kernel
    path (Gram matrix in float32) makes its choices in float32, the fp16 PyTorch path breaks near-ties
    differently. >= 90% of the samples keep the same tokens; those have the same merged tokens."""
    from tokenprune.reducers.apet import Apet

    needs(F16, b, n + 1, c)
    g = gen(4)
    x = randn(b, 1 + n, c, dtype=F16, g=g)
    red = Apet()
    with poisoned(T):
        out = red.reduce(TokenState.start(x, 1), Stage(0, keep, "apet"), None)
    with kernels_on(False):
        ref32 = red.reduce(TokenState.start(x.float(), 1), Stage(0, keep, "apet"), None)
    same = (out.source == ref32.source).all(1)
    assert float(same.float().mean()) >= 0.9
    assert rel(out.x[same], ref32.x[same]) < 1e-2


@pytest.mark.parametrize("dtype,n,exact", [(BF16, 700, 256), (F16, 6000, 2048)], ids=dtype_id)
def test_apet_large_batch_sizes_are_exact_counts(T, dtype, n, exact):
    """Above the one-launch merge's batch, Apet.reduce counts the merged sizes with a scatter-add: in float32
    (bf16 atomics stop counting at 256, fp16 at 2048), so every sample's sizes still sum to its token count."""
    from tokenprune.reducers.apet import Apet

    b, c = T.apet.APET_MERGE_MAX_BATCH + 8, 16
    needs(dtype, b, n + 1, c)
    assert not kernels.apet_merge_fits(b) and not kernels.apet_step_fits(b, n, 3, dtype)  # the scatter-add path
    g = gen(5)
    x = randn(b, 1 + n, c, dtype=torch.float32, g=g)
    x[:, 1:] += 4 * randn(b, 1, c, dtype=torch.float32, g=g)  # one shared direction: large groups
    with poisoned(T):
        out = Apet(k=3).reduce(TokenState.start(x.to(dtype), 1), Stage(0, 4, "apet"), None)
    assert out.sizes.dtype == torch.float32 and float(out.sizes[:, 1:].max()) > exact  # past the dtype's counting
    assert torch.equal(out.sizes[:, 1:].sum(1), torch.full((b,), float(n), device=x.device))


@pytest.mark.parametrize("b,n,c,k,dtype", [(256, 196, 768, 98, F16), (1, 196, 768, 98, F16),
                                           (3, 500, 384, 200, BF16), (2, 77, 96, 30, F32)], ids=dtype_id)
def test_apet_merge(T, b, n, c, k, dtype):
    """The one-launch ApET merge on random assignments, sizes and source map: sizes and source exact,
    each kept slot the size-weighted mean of its tokens (float64 reference)."""
    needs(dtype, b, n + 1, c)
    g = gen(4)
    x = randn(b, 1 + n, c, dtype=dtype, g=g)
    sz = torch.randint(1, 4, (b, 1 + n), device=DEV, generator=g).float()
    kidx = torch.rand(b, n, device=DEV, generator=g).topk(k, 1).indices.sort(1).values
    tgt = torch.randint(0, k, (b, n), device=DEV, generator=g)
    tgt.scatter_(1, kidx, torch.arange(k, device=DEV).expand(b, k))
    src = torch.randint(-1, 1 + n, (b, 1 + n + 5), device=DEV, generator=g)
    w = sz[:, 1:].double()
    num = torch.zeros(b, k, c, dtype=torch.float64, device=DEV).scatter_add_(
        1, tgt[..., None].expand(b, n, c), x[:, 1:].double() * w[..., None])
    den = torch.zeros(b, k, dtype=torch.float64, device=DEV).scatter_add_(1, tgt, w)
    ref_x = torch.cat([x[:, :1].double(), num / den[..., None]], 1)
    ref_s = torch.cat([sz[:, :1], den.float()], 1)
    ref_src = ops.remap_source(src, torch.cat([torch.zeros(b, 1, dtype=torch.long, device=DEV), tgt + 1], 1))
    with poisoned(T):
        ox, osz, osrc = kernels.apet_merge(x, sz, tgt, kidx, src, 1, max_size=1 + n)
    assert torch.equal(osz, ref_s) and torch.equal(osrc, ref_src)
    assert rel(ox, ref_x) < TOL[dtype]


@pytest.mark.parametrize("b,n,c,dtype", [(256, 196, 768, F16), (3, 1000, 1024, BF16), (2, 77, 96, F32),
                                         (4, 577, 768, F16), (1, 1030, 384, F16), (2, 37, 40, F32)], ids=dtype_id)
def test_gram(T, b, n, c, dtype):
    """G = X X^T per sample in float32 and its diagonal, on a strided input (x[:, p:])."""
    needs(dtype, b, n + 1, c)
    g = gen(7)
    x = randn(b, 1 + n, c, dtype=dtype, g=g)[:, 1:]
    assert kernels.use_triton(x)
    with poisoned(T):
        gm, sq = kernels.gram(x)
    ref = x.double() @ x.double().transpose(1, 2)
    assert max(rel(gm, ref), rel(sq, ref.diagonal(dim1=1, dim2=2))) < 1e-5


@pytest.mark.parametrize("n,dtype", [(196, F16), (123, BF16), (78, F16)], ids=dtype_id)
def test_gram_of_a_sample_is_the_same_alone_and_in_a_batch(T, n, dtype):
    """Alone, a sample's G comes from 64-row tiles (a 128-row grid would leave the GPU idle), in a batch of 256 from
    128-row ones: the same products summed in the same order, so the same G bit for bit (ApET's and diverse's choices
    do not depend on the batch)."""
    needs(dtype, 256, n, 768)
    x = randn(256, n, 768, dtype=dtype, g=gen(8))
    with poisoned(T):
        alone, batch = kernels.gram(x[:1])[0], kernels.gram(x)[0]
    assert T.apet._gram_config(n, False, 1, x.device)["BM"] == 64
    assert T.apet._gram_config(n, False, 256, x.device)["BM"] == 128
    assert torch.equal(alone[0], batch[0])


@pytest.mark.parametrize("b,n,c,k,dtype,padded", [
    (256, 196, 768, 10, F16, False), (256, 196, 768, 10, F16, True), (16, 577, 1024, 32, BF16, True),
    (8, 1024, 768, 1, F16, True), (4, 101, 96, 7, F32, False), (2, 40, 32, 4, F32, True)], ids=dtype_id)
def test_apet_stage_and_assign(T, b, n, c, k, dtype, padded):
    """From the Gram matrix: the basis equals the float64 reference's in >= 99% of the samples (random
    tokens have no near-ties at float32 precision), errors within 1e-4 of |x|^2 there; the cosine
    assignment picks the reference's slot for >= 99.9% of the tokens."""
    needs(dtype, b, n, max(c, n))
    g = gen(7)
    x = randn(b, n, c, dtype=dtype, g=g)
    valid = (torch.rand(b, n, device=DEV, generator=g) > 0.2) if padded else None
    with poisoned(T):
        gm, _ = kernels.gram(x)
        basis, err = kernels.apet_stage(gm, valid, k)
    g64 = x.double() @ x.double().transpose(1, 2)
    rbasis, rerr = R.apet_stage(g64, valid, k)
    same = (basis == rbasis).all(1)
    assert float(same.float().mean()) >= 0.99
    assert not torch.isnan(err).any()
    e = ((err.double() ** 2 - rerr ** 2).abs() / g64.diagonal(dim1=1, dim2=2).clamp_min(1e-30))[same]
    assert float(e.max()) < 1e-4
    keep = torch.rand(b, n, device=DEV, generator=g).topk(max(k, n // 2), 1).indices.sort(1).values
    with poisoned(T):
        slots = kernels.apet_assign(gm, keep)
    assert float((slots == R.apet_assign(g64, keep)).float().mean()) >= 0.999


# -- DivPrune's selection ---------------------------------------------------------------------------------
@pytest.mark.parametrize("b,n,c,k,dtype,padded,weighted", [
    (256, 196, 768, 123, F16, False, False), (1, 196, 768, 49, F16, True, True), (2, 2048, 3584, 512, BF16, True, True),
    (1, 4096, 64, 100, F32, False, False), (3, 37, 16, 36, F32, True, False)], ids=dtype_id)
def test_max_min_select(T, b, n, c, k, dtype, padded, weighted):
    """The whole greedy loop in one program per sample (``kernels.max_min_select``, the diverse reducer's
    selection) against the reference on the same distances: the same tokens, bit for bit (min, argmax and one
    multiply are exact), at ViT-B bs 256, Qwen2.5-VL's 2048 visual tokens and the one-program limit."""
    needs(dtype, b, n, n)
    g = gen(12)
    gm = kernels.gram(randn(b, n, c, dtype=dtype, g=g))[0]  # the diverse reducer's input
    valid = (torch.rand(b, n, generator=g, device=DEV) > 0.2) if padded else None
    weight = torch.rand(b, n, generator=g, device=DEV) if weighted else None
    with poisoned(T):
        got = kernels.max_min_select(gm, k, valid, weight)
    assert torch.equal(got, R.max_min_select(gm, k, valid, weight))


# -- whole forwards -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,batch,budget,kind", [
    ("merge", 64, 0.25, "base"), ("merge", 8, 0.1, "base"), ("maelre", 64, 0.25, "base"),
    ("merge", 2, 0.25, "tiny"), ("maelre", 2, 0.25, "tiny"), ("pitome", 64, 0.25, "base"), ("pitome", 2, 0.25, "tiny")])
def test_forward_fused_residual_is_bit_identical(T, method, batch, budget, kind):
    """A merged ViT with each merged block's last residual add left to the merge kernels gives the logits,
    bit for bit, of the same model with every block's own add (kernels on; row gather / one-launch step)."""
    if ON_CPU and kind == "base":
        pytest.skip("CPU mode: ViT-B is too large for the Triton interpreter")
    if method not in tokenprune.methods():
        pytest.skip(f"{method} not registered")
    model, dtype, side = vit(kind)
    x = torch.randn(batch, 3, side, side, device=DEV, generator=gen(9)).to(dtype)
    outs = {}
    try:
        with torch.inference_mode():
            for fuse in (False, True):
                tokenprune.engine.set_fuse_residual(fuse)
                tokenprune.apply(model, budget=budget, method=method)  # the plan reads the switch
                outs[fuse] = model(x)
    finally:
        tokenprune.engine.set_fuse_residual(True)
        tokenprune.remove(model)
    assert torch.equal(outs[True], outs[False])


@pytest.fixture(scope="module")
def vit_base_bs1():
    if ON_CPU:
        pytest.skip("CPU mode: CUDA graphs need CUDA")
    model, dtype, side = vit("base")
    yield model, torch.randn(1, 3, side, side, device=DEV, generator=gen(11)).to(dtype)
    tokenprune.remove(model)


@pytest.mark.parametrize("on", [True, False], ids=["kernels", "pytorch"])
@pytest.mark.parametrize("method,budget", [("none", 1.0), ("merge", 0.5), ("merge", 0.25), ("cls", 0.5),
                                           ("cls", 0.25), ("apet", 0.5), ("apet", 0.25), ("pitome", 0.25)])
def test_forward_captures_in_cuda_graph(vit_base_bs1, method, budget, on):
    """vit_base at bs 1, unreduced and reduced, kernels on and off: the forward can be captured in a CUDA
    graph (``tokenprune.cuda.graphed``), and replays on new inputs give the eager logits. The PyTorch path runs
    in float32: in fp16, cuBLAS picking other algorithms while capturing changes the rounding enough to flip
    near-tied merge / ApET selections (a different, equally valid result), which says nothing of the replay."""
    import copy

    from tokenprune.cuda import graphed

    model, x = vit_base_bs1
    tokenprune.remove(model)
    if not on:
        model, x = copy.deepcopy(model).float(), x.float()
    if method != "none":
        tokenprune.apply(model, budget=budget, method=method)
    x2 = torch.randn_like(x)
    try:
        with kernels_on(on), torch.inference_mode():
            ref, ref2 = model(x).clone(), model(x2).clone()
            run = graphed(model, x)
            out = run(x).clone()
            out2 = run(x2).clone()
    finally:
        tokenprune.remove(model)
    # fp16 logits (kernels on) round differently when cuBLAS picks other algorithms under capture; a wrong
    # replay is off by O(1)
    errs = rel(out, ref), rel(out2, ref2)
    assert max(errs) < (3e-3 if on else 1e-4), errs


@pytest.mark.skipif(ON_CPU, reason="CUDA's synchronization check needs CUDA")
@pytest.mark.parametrize("kind,method", [("vit", m) for m in ("merge", "cls", "random", "apet", "pool", "maelre",
                                                             "pitome", "diverse")]
                         + [("whisper", "merge"), ("whisper", "cls")])
def test_eager_forward_never_waits_for_the_gpu(kind, method):
    """A batch-1 eager forward of a reduced model (static plan) issues its kernels without once waiting for the GPU:
    no ``.item()``, no data-dependent shape, no copy to the host. Batch-1 eager forwards are bound by host time, and a
    wait in each step would add the GPU's queue to it. ``whisper``: 600 tokens, over the one-launch merge step's 256
    (the four-launch path) and the received-attention scores (no class token)."""
    if kind == "vit":
        model, dtype, side = vit("base")
        x = torch.randn(1, 3, side, side, device=DEV, generator=gen(12)).to(dtype)
        budget = 0.25
    else:
        model, x = whisper_encoder(12, F16)
        budget = 0.5
    tokenprune.apply(model, budget=budget, method=method)
    try:
        with torch.inference_mode():
            ref = model(x)  # compiles the kernels (the compile may wait)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = model(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        tokenprune.remove(model)
    if kind == "whisper":
        ref, out = ref.last_hidden_state, out.last_hidden_state
    assert rel(out, ref) < 1e-3


@pytest.mark.skipif(ON_CPU, reason="the key-bias kernel's routing under torch.compile needs CUDA")
@pytest.mark.parametrize("min_batch", [1, 2])
def test_compiled_transformers_merge_runs_the_key_bias_kernel(min_batch):
    """Compiled, a merged Whisper encoder (transformers' layers under ``tokenprune_sdpa``) runs the merged tokens' key
    bias through the fused key-bias kernel where ``kernels.biased_attention_applies`` (``BA_MIN_BATCH_COMPILED`` 1:
    batch 1 too), and SDPA with the bias as its mask with the batch floor above 1. Either way the output equals the
    eager forward (written-out layers, SDPA) in float32."""
    model, x = whisper_encoder(14)
    tokenprune.apply(model, budget=0.5, method="merge", layers=[0, 1])
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    old = kernels.BA_MIN_BATCH_COMPILED
    kernels.BA_MIN_BATCH_COMPILED = min_batch
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            ref = model(x).last_hidden_state
            out = torch.compile(model, backend=backend, fullgraph=True)(x).last_hidden_state
    finally:
        kernels.BA_MIN_BATCH_COMPILED = old
        torch._dynamo.reset()
        tokenprune.remove(model)
    calls = sum(g.count("tokenprune.biased_attention") for g in graphs)
    assert calls == (3 if min_batch == 1 else 0), calls  # layers 1-3 follow a merge; layer 0 has no bias
    assert rel(out, ref) < 1e-4


@pytest.mark.skipif(ON_CPU, reason="cuDNN's attention with its log-sum-exp needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_cls_scores_on_the_attention_lse_in_a_forward(compiled):
    """A Whisper encoder (no class token: cls scores by the attention each frame receives) with
    ``LSE_FROM_ATTENTION_MIN_TOKENS`` set: its scored layers run cuDNN's attention with the log-sum-exp and the
    scores take one pass; it keeps the frames the two-pass scores keep (source map), and the output equals the
    switch-off forward's in fp16, eager and compiled."""
    model, x = whisper_encoder(15, F16, d_model=256, heads=4)
    tokenprune.apply(model, budget=0.5, method="cls", layers=[0, 2])
    lse_calls = []
    real = kernels.attention_with_lse

    def counted(*a):
        lse_calls.append(1)
        return real(*a)

    run = torch.compile(model, fullgraph=True) if compiled else model
    old = kernels.LSE_FROM_ATTENTION_MIN_TOKENS
    try:
        with torch.inference_mode():
            ref, ref_state = tokenprune.features(model, x)
            kernels.LSE_FROM_ATTENTION_MIN_TOKENS = 1
            kernels.attention_with_lse = counted
            torch._dynamo.reset()
            out = run(x).last_hidden_state
            _, state = tokenprune.features(model, x)
    finally:
        kernels.LSE_FROM_ATTENTION_MIN_TOKENS = old
        kernels.attention_with_lse = real
        torch._dynamo.reset()
        tokenprune.remove(model)
    assert lse_calls, "no scored layer took the log-sum-exp path"
    assert torch.equal(state.source, ref_state.source), "other frames kept"
    assert rel(out, ref) < 2e-3


# -- the cached launcher ----------------------------------------------------------------------------------
@pytest.mark.skipif(ON_CPU, reason="the interpreter always takes Triton's own launch path")
def test_fast_launch_equals_triton_launch_and_respecializes_on_alignment(T):
    """``_triton_common.fast`` (the cached launcher every launcher uses) gives the same outputs as Triton's own
    launch path, call after call, and a misaligned view (another specialization) takes a new kernel, not the
    cached aligned one."""
    from tokenprune.kernels import _triton_common as tc

    g = torch.Generator(device="cpu").manual_seed(3)

    def tokens(c, offset):  # [2, 197, c] starting ``offset`` elements into a flat buffer
        flat = torch.randn(2 * 197 * c + offset, generator=g).to(DEV, F16)
        return flat[offset:].view(2, 197, c)

    cases = [(tokens(768, 0), tokens(64, 0)), (tokens(768, 1), tokens(64, 1))]  # the second: not 16-aligned
    assert cases[0][0].data_ptr() % 16 == 0 and cases[1][0].data_ptr() % 16 and cases[1][1].data_ptr() % 16
    outs = {}
    try:
        for flag in (False, True):
            tc.FAST_LAUNCH = flag
            outs[flag] = [kernels.merge_step(xi, mi, None, None, 1, 40, False) for _ in range(3) for xi, mi in cases]
    finally:
        tc.FAST_LAUNCH = True
    for a, b in zip(outs[False], outs[True]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    launcher = tc.fast(T.merge._merge_step)
    aligns = {k[5] for k in launcher.cache if len(k) == 6}  # (the tensors' addresses modulo 16)
    assert any(any(a) for a in aligns) and any(not any(a) for a in aligns)  # aligned and misaligned both cached


@pytest.mark.skipif(ON_CPU, reason="CUDA graphs need CUDA")
def test_graphed_refuses_inputs_unlike_the_example():
    """``tokenprune.cuda.graphed``'s replay copies the inputs into the captured buffers: an input of batch 1 for a
    graph captured at batch 4 was broadcast into all 4 rows and the replay returned 4 rows of one sample's result,
    silently; a missing input was skipped (the last call's stayed). Both are refused with the example's shapes."""
    from tokenprune.cuda import graphed

    w = torch.randn(8, 5, device=DEV)
    x = torch.randn(4, 8, device=DEV)
    run = graphed(lambda v: v @ w, x)
    torch.testing.assert_close(run(x), x @ w)
    with pytest.raises(ValueError, match=r"captured for inputs of shapes \[\(4, 8\)\].*\(1, 8\)"):
        run(x[:1])
    with pytest.raises(ValueError, match=r"1 input.*got 0"):
        run()


@pytest.mark.skipif(ON_CPU, reason="CUDA")
def test_attention_lse_applies_only_where_cudnn_attention_runs():
    """The lse path is on by default from ``LSE_FROM_ATTENTION_MIN_TOKENS`` tokens; cuDNN's fused attention needs
    compute capability 8.0, so on an older GPU the switch must stay out of the way (the op raises there), and on a
    newer one serve a Whisper-large-shaped fp16 attention."""
    q = torch.randn(1, 20, 1500, 64, device=DEV, dtype=F16)
    runs = torch.cuda.get_device_capability(q.device) >= (8, 0)
    assert kernels.attention_lse_applies(q, q, q, None) == runs
    assert not kernels.attention_lse_applies(q[:, :, :100], q[:, :, :100], q[:, :, :100], None)  # under the floor
    if runs:
        out, lse = kernels.attention_with_lse(q, q, q, 64 ** -0.5)
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q), atol=2e-3,
                                   rtol=0)
        assert lse.shape == (1, 20, 1500, 1)


@pytest.mark.skipif(ON_CPU, reason="CUDA graphs need CUDA")
def test_graphed_debug_dumps_its_nodes(tmp_path):
    """``graphed(..., debug=True)``: ``run.graph.debug_dump`` writes the captured graph's nodes (what ``bench_forward
    --parts graph_nodes`` counts); the dump names one kernel node per launch, so two matmuls and an add show as such."""
    from tokenprune.cuda import graphed

    w = torch.randn(8, 8, device=DEV)
    x = torch.randn(4, 8, device=DEV)
    run = graphed(lambda v: (v @ w) @ w + 1, x, debug=True)
    torch.testing.assert_close(run(x), (x @ w) @ w + 1)
    path = tmp_path / "g.dot"
    run.graph.debug_dump(str(path))
    assert path.read_text().count("KERNEL") >= 3


@pytest.mark.skipif(ON_CPU, reason="Inductor on the GPU")
@pytest.mark.parametrize("method", ["merge", "cls", ["cls", "merge"]], ids=str)
def test_compiled_patched_timm_model_matches_eager(method):
    """``torch.compile(fullgraph=True)`` of a patched timm model on the GPU (the kernels as custom ops). The CPU suite
    runs the newest torch and the GPU machine the oldest we check: session 14's trace-time hook scan broke every such
    compile on torch 2.11, and no GPU test compiled a timm model, so only a benchmark saw it (run 22)."""
    model, dtype, side = vit("tiny")
    tokenprune.apply(model, budget=0.25, method=method)
    x = torch.randn(2, 3, side, side, device=DEV, generator=gen(5)).to(dtype)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            ref = model(x)
            out = torch.compile(model, fullgraph=True)(x)
        assert rel(out, ref) < 1e-4
    finally:
        torch._dynamo.reset()
        tokenprune.remove(model)


@pytest.mark.skipif(ON_CPU, reason="CUDA graphs")
@pytest.mark.parametrize("method", ["merge", "maelre", "pitome", "cls", "apet"])
def test_reduce_overhead_patched_timm_model_matches_eager(method):
    """``torch.compile(mode="reduce-overhead")`` at batch 1, the mode the README recommends there: the batch-1
    defaults (the keys' mean from the attention's launch, the merge step's side program) inside a CUDA graph, replayed
    on new inputs, equal the eager forward. Benchmarks ran this mode; no test did before."""
    model, dtype, side = vit("tiny")
    tokenprune.apply(model, budget=0.25, method=method)
    xs = torch.randn(3, 1, 3, side, side, device=DEV, generator=gen(6)).to(dtype)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            run = torch.compile(model, mode="reduce-overhead", fullgraph=True)
            for x in list(xs) * 2:  # the later calls replay the graph
                out = run(x).clone()
                assert rel(out, model(x)) < 1e-4
    finally:
        torch._dynamo.reset()
        tokenprune.remove(model)
