#!/usr/bin/env python
"""Check and time tokenprune's Triton kernels against their PyTorch paths and the roofline bound.

    python scripts/gpu_kernels.py --out DIR          # on the GPU machine (about 5 minutes)
    python scripts/gpu_kernels.py --out DIR --smoke  # on CPU: PyTorch fallbacks only, tiny sizes, seconds

Writes DIR/gpu_kernels.json (every number) and DIR/gpu_kernels.md (tables), prints a short table last.

1. Ceilings of this card: device-to-device copy bandwidth (bytes read + written) and the fp16 / bf16
   matrix-product rate (8192^3, random data).
2. Per kernel: correctness against a float64 reference on fresh random inputs of several shapes,
   including non-multiples of the block sizes (outputs poisoned with NaN first; rel. error
   ||out - ref|| / ||ref||), then the median time (triton.testing.do_bench) of the kernel and of the
   PyTorch path (TOKENPRUNE_KERNELS=0), the bytes / FLOPs the kernel must move / do, the roofline
   bound max(bytes / bandwidth, FLOPs / rate) and the kernel's % of it.
3. End to end, vit_base_patch16_224 fp16 (random weights: timing only) at batch 256 and 1: unreduced
   (SDPA) vs merge / cls / apet at budgets 0.5 and 0.25, kernels on and off. Reduction overhead
   = t(reduced) - t(unreduced) * flop_ratio (tokenprune.plan(model).flop_ratio). Batch 1 also as a
   CUDA graph replay where the forward can be captured.
4. maelre on a 16k-token input (vit_base at 2048 px, 128 x 128 patches): time and peak memory vs SDPA.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenprune  # noqa: E402
from tokenprune import kernels, ops  # noqa: E402
from tokenprune.kernels import reference as R  # noqa: E402
from tokenprune.state import TokenState  # noqa: E402

RESULTS: dict = {"errors": []}
T0 = time.time()


# -- helpers ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def kernels_on(on: bool):
    from tokenprune import kernels

    old = kernels.kernels_enabled()
    kernels.set_kernels_enabled(on)
    try:
        yield
    finally:
        kernels.set_kernels_enabled(old)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, dev, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn``."""
    if dev.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    fn()
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def randn(*shape, dtype, dev, gen):
    return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)


def size_bias(b, n, dtype, dev, gen, masked=True):
    s = torch.rand(b, n, generator=gen, device=dev) * 3 + 0.5
    if masked:
        s[:, 2::7] = 0
    return s.log()[:, None, None, :].to(dtype)


def guard(name):
    def deco(fn):
        def run(*a, **k):
            try:
                return fn(*a, **k)
            except Exception as e:  # keep going: one broken section must not hide the others
                msg = f"{name}: {type(e).__name__}: {e}"
                print("ERROR", msg)
                traceback.print_exc()
                RESULTS["errors"].append(msg)
                return None
        return run
    return deco


TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 3e-4}


# -- 1. ceilings --------------------------------------------------------------------------------------
@guard("ceilings")
def ceilings(dev, smoke):
    n = (1 << 20) if smoke else (1 << 30)  # bytes per buffer
    a = torch.empty(n // 4, device=dev, dtype=torch.float32).uniform_()
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), dev, 200)
    bw = 2 * n / (t * 1e-3)
    out = {"copy_bytes": 2 * n, "copy_ms": t, "bandwidth_Bps": bw}
    del a, b
    m = 256 if smoke else 8192
    gen = torch.Generator(device=dev).manual_seed(0)
    for dt in (torch.float16, torch.bfloat16):
        x, y = randn(m, m, dtype=dt, dev=dev, gen=gen), randn(m, m, dtype=dt, dev=dev, gen=gen)
        t = bench(lambda: x @ y, dev, 200)
        out[f"matmul_{str(dt)[6:]}_flops"] = 2 * m ** 3 / (t * 1e-3)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # plain float32 FMA rate (ApET's products run so)
    m32 = 256 if smoke else 4096
    x, y = randn(m32, m32, dtype=torch.float32, dev=dev, gen=gen), randn(m32, m32, dtype=torch.float32, dev=dev, gen=gen)
    out["matmul_float32_flops"] = 2 * m32 ** 3 / (bench(lambda: x @ y, dev, 200) * 1e-3)
    RESULTS["ceilings"] = out
    print(f"copy {bw / 1e12:.2f} TB/s  fp16 mm {out['matmul_float16_flops'] / 1e12:.0f} TFLOP/s  "
          f"bf16 mm {out['matmul_bfloat16_flops'] / 1e12:.0f} TFLOP/s  fp32 mm {out['matmul_float32_flops'] / 1e12:.0f} "
          f"TFLOP/s")
    return out


def bound_ms(nbytes, flops, ceil, rate_key="matmul_float16_flops"):
    if not ceil:
        return float("nan")
    return max(nbytes / ceil["bandwidth_Bps"], flops / ceil[rate_key]) * 1e3


def row(kernel, shape, dtype, t_k, t_t, nbytes, flops, ceil, rate_key="matmul_float16_flops", note=""):
    b = bound_ms(nbytes, flops, ceil, rate_key)
    r = {"kernel": kernel, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "t_kernel_ms": t_k,
         "t_torch_ms": t_t, "speedup": t_t / t_k if t_k else float("nan"), "bytes": nbytes, "flops": flops,
         "bound_ms": b, "pct_of_bound": 100 * b / t_k if t_k else float("nan"), "note": note}
    RESULTS.setdefault("timing", []).append(r)
    print(f"  {kernel:<22} {shape!s:<26} {r['dtype']:<9} kernel {t_k * 1e3:9.1f} us  torch {t_t * 1e3:9.1f} us  "
          f"bound {b * 1e3:8.1f} us  {r['pct_of_bound']:5.1f}% of bound  x{r['speedup']:.2f}")
    return r


def check(kernel, shape, dtype, err, tol, extra=None):
    ok = err == err and err < tol
    r = {"kernel": kernel, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "rel_err": err, "tol": tol,
         "ok": bool(ok)}
    if extra:
        r.update(extra)
    RESULTS.setdefault("correctness", []).append(r)
    print(f"  check {kernel:<20} {shape!s:<26} {r['dtype']:<9} rel err {err:.2e} (tol {tol:.0e}) "
          f"{'ok' if ok else 'FAIL'}")
    return ok


INTERPRET = False  # --interpret: smoke sizes on CPU through Triton's interpreter (checks this script's kernel paths)


def impl(dev):
    """The Triton module on CUDA (or under --interpret); on CPU (smoke) the dispatcher, i.e. the references."""
    if (dev.type == "cuda" or INTERPRET) and kernels._impl():
        return kernels._impl()
    return kernels


def poison(dev, on):
    mod = kernels._impl() if dev.type == "cuda" or INTERPRET else None
    if mod:
        mod.POISON = on


# -- 2a. efficient attention ----------------------------------------------------------------------------
@guard("efficient_attention")
def kernel_efficient_attention(dev, smoke, ceil):
    from tokenprune.reducers.maelre import efficient_attention as maelre_ea
    K = impl(dev)
    gen = torch.Generator(device=dev).manual_seed(1)
    print("efficient attention (MAELRE linear attention)")
    shapes = ([(1, 2, 37, 16, torch.float32, True)] if smoke else
              [(1, 3, 8192 + 37, 64, torch.float16, False), (2, 2, 1000, 128, torch.bfloat16, True),
               (1, 1, 65536, 64, torch.float16, True), (3, 5, 333, 64, torch.bfloat16, False),
               (2, 3, 4097, 128, torch.float16, True), (1, 2, 777, 64, torch.float32, True)])
    poison(dev, True)
    for b, h, n, d, dt, has_bias in shapes:
        q, k, v = (randn(b, h, n, d, dtype=dt, dev=dev, gen=gen) for _ in range(3))
        bias = size_bias(b, n, dt, dev, gen) if has_bias else None
        out = K.efficient_attention(q, k, v, bias)
        ref = R.efficient_attention(q.double(), k.double(), v.double(), None if bias is None else bias.double())
        check("efficient_attention", (b, h, n, d, "bias" if has_bias else ""), dt, rel(out, ref), TOL[dt])
    poison(dev, False)
    shapes = ([(1, 2, 256, 16)] if smoke else
              [(4, 12, 8192, 64), (1, 12, 16384, 64), (2, 16, 16384, 128), (1, 12, 65536, 64),
               (1, 16, 65536, 128), (256, 12, 197, 64)])
    for b, h, n, d in shapes:
        for dt in ((torch.float16,) if (b, n) != (1, 65536) or d != 64 else (torch.float16, torch.bfloat16)):
            q, k, v = (randn(b, h, n, d, dtype=dt, dev=dev, gen=gen) for _ in range(3))
            bias = size_bias(b, n, dt, dev, gen, masked=False)
            e = q.element_size()
            t_k = bench(lambda: K.efficient_attention(q, k, v, bias), dev)
            with kernels_on(False):
                t_t = bench(lambda: maelre_ea(q, k, v, bias), dev)
            row("efficient_attention", (b, h, n, d), dt, t_k, t_t, 4 * b * h * n * d * e + 2 * b * n * e,
                4 * b * h * n * d * d + 2 * b * h * n * d, ceil,
                "matmul_bfloat16_flops" if dt == torch.bfloat16 else "matmul_float16_flops")
            del q, k, v


@guard("efficient_attention_configs")
def sweep_efficient_attention(dev, smoke, ceil):
    """Block sizes / warps of the two passes at N = 16k; the fastest is what EA_CONFIG should hold."""
    if dev.type != "cuda" or smoke:
        return
    T = kernels._impl()
    gen = torch.Generator(device=dev).manual_seed(5)
    print("efficient attention block-size sweep (N = 16384, fp16)")
    saved = {k: dict(v) if isinstance(v, dict) else v for k, v in T.EA_CONFIG.items()}
    out = []
    for b, h, d in ((2, 12, 64), (2, 16, 128)):
        n = 16384
        q, k, v = (randn(b, h, n, d, dtype=torch.float16, dev=dev, gen=gen) for _ in range(3))
        bias = size_bias(b, n, torch.float16, dev, gen, masked=False)
        ref = R.efficient_attention(q, k, v, bias)
        d1, d2 = saved["pass1"][d], saved["pass2"][d]
        variants = [(p1, d2) for p1 in ((64, 4), (64, 8), (128, 4), (128, 8), (256, 8)) if not (d == 128 and p1[0] == 256)]
        variants += [(d1, p2) for p2 in ((64, 4), (64, 8), (128, 4), (128, 8)) if p2 != d2]
        for p1, p2 in variants:
            if True:
                T.EA_CONFIG["pass1"][d] = p1
                T.EA_CONFIG["pass2"][d] = p2
                try:
                    err = rel(T.efficient_attention(q, k, v, bias), ref)
                    t = bench(lambda: T.efficient_attention(q, k, v, bias), dev)
                except Exception as e:  # e.g. out of shared memory / registers for this shape
                    out.append({"d": d, "pass1": p1, "pass2": p2, "error": str(e)[:200]})
                    continue
                nbytes = 4 * b * h * n * d * 2 + 2 * b * n * 2
                pct = 100 * bound_ms(nbytes, 4 * b * h * n * d * d, ceil) / t
                out.append({"d": d, "shape": (b, h, n, d), "pass1": p1, "pass2": p2, "t_ms": t, "rel_err": err,
                            "pct_of_bound": pct})
                print(f"  d={d} pass1 {p1} pass2 {p2}: {t * 1e3:8.1f} us  {pct:5.1f}% of bound  err {err:.1e}")
        T.EA_CONFIG["pass1"][d], T.EA_CONFIG["pass2"][d] = saved["pass1"][d], saved["pass2"][d]
        del q, k, v
    RESULTS["ea_sweep"] = out


# -- 2a'. softmax attention with a key bias (proportional attention) --------------------------------
@guard("biased_attention")
def kernel_biased_attention(dev, smoke, ceil):
    import torch.nn.functional as F
    K = impl(dev)
    gen = torch.Generator(device=dev).manual_seed(3)
    print("softmax attention with a per-key bias (proportional attention)")
    shapes = ([(1, 2, 37, 16, torch.float32)] if smoke else
              [(3, 5, 197, 64, torch.float16), (2, 3, 99, 64, torch.bfloat16), (1, 2, 1000, 64, torch.float16),
               (4, 3, 257, 128, torch.bfloat16), (2, 2, 50, 80, torch.float16), (1, 2, 333, 64, torch.float32)])
    poison(dev, True)
    for b, h, n, d, dt in shapes:
        q, k, v = (randn(b, h, n, d, dtype=dt, dev=dev, gen=gen) for _ in range(3))
        bias = size_bias(b, n, dt, dev, gen)  # with padding keys (log 0)
        out = K.biased_attention(q, k, v, bias)
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias.double())
        check("biased_attention", (b, h, n, d), dt, rel(out, ref), TOL[dt])
    # logits growing over the keys (the running max moves far for a third of the rows), one sample's first
    # 40 keys masked, one sample with every key masked (SDPA: zeros)
    b, h, n, d = 3, 4, 197, 64
    q, k, v = (torch.randn(b, h, n, d, device=dev, generator=gen) for _ in range(3))
    k = k * torch.linspace(0.1, 3.0, n, device=dev)[:, None]
    q[:, :, ::3] *= 4
    bias = torch.zeros(b, n, device=dev)
    bias[1, :40] = float("-inf")
    bias[2] = float("-inf")
    bias[0, 100:] = 3.0
    q, k, v, bb = q.half(), k.half(), v.half(), bias[:, None, None, :].half()
    out = K.biased_attention(q, k, v, bb)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bb.double())
    zeros = bool((out[2] == 0).all())
    check("biased_attention growing logits", (b, h, n, d), torch.float16,
          rel(out[:2], ref[:2]) if zeros else float("inf"), TOL[torch.float16],
          {"masked_sample_zero": zeros, "sdpa_masked_sample_zero": bool((ref[2] == 0).all())})
    poison(dev, False)
    for b, h, n, d in ([(1, 2, 64, 16)] if smoke else [(256, 12, 197, 64), (256, 12, 99, 64), (1, 12, 197, 64),
                                                      (64, 16, 577, 64), (32, 16, 257, 128)]):
        q, k, v = (randn(b, h, n, d, dtype=torch.float16, dev=dev, gen=gen) for _ in range(3))
        bias = size_bias(b, n, torch.float16, dev, gen, masked=False)
        t_k = bench(lambda: K.biased_attention(q, k, v, bias), dev)
        t_t = bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias), dev)
        t_flash = bench(lambda: F.scaled_dot_product_attention(q, k, v), dev)
        row("biased_attention", (b, h, n, d), torch.float16, t_k, t_t, 4 * b * h * n * d * 2 + 2 * b * n,
            4 * b * h * n * n * d, ceil, note=f"SDPA without the bias: {t_flash * 1e3:.1f} us")


# -- 2b. query-row scores -------------------------------------------------------------------------------
@guard("query_scores")
def kernel_query_scores(dev, smoke, ceil):
    K = impl(dev)
    gen = torch.Generator(device=dev).manual_seed(2)
    print("query-row scores ([CLS] attention, head mean / weighting)")
    shapes = ([(2, 3, 50, 16, torch.float32)] if smoke else
              [(2, 12, 197, 64, torch.float16), (3, 5, 1013, 128, torch.bfloat16), (1, 4, 65536 + 3, 64, torch.float16),
               (256, 12, 197, 64, torch.float16), (2, 6, 300, 64, torch.float32)])
    poison(dev, True)
    for b, h, n, d, dt in shapes:
        q, k = randn(b, h, n, d, dtype=dt, dev=dev, gen=gen), randn(b, h, n, d, dtype=dt, dev=dev, gen=gen)
        for bias, w in ((None, None), (size_bias(b, n, dt, dev, gen), None),
                        (size_bias(b, n, dt, dev, gen), torch.rand(b, h, n, device=dev, generator=gen))):
            out = K.query_scores(q[:, :, 0], k, d ** -0.5, bias, w)
            ref = R.query_scores(q[:, :, 0].double(), k.double(), d ** -0.5, None if bias is None else bias.double(),
                                 None if w is None else w.double())
            check("query_scores", (b, h, n, d, "bias" if bias is not None else "", "w" if w is not None else ""),
                  dt, rel(out, ref), 1e-5)
    poison(dev, False)
    shapes = [(2, 3, 64, 16)] if smoke else [(256, 12, 197, 64), (1, 12, 197, 64), (64, 12, 577, 64),
                                             (8, 12, 16384, 64)]
    for b, h, n, d in shapes:
        q, k = randn(b, h, n, d, dtype=torch.float16, dev=dev, gen=gen), randn(b, h, n, d, dtype=torch.float16,
                                                                               dev=dev, gen=gen)
        t_k = bench(lambda: K.query_scores(q[:, :, 0], k, 0.125), dev)
        with kernels_on(False):
            t_t = bench(lambda: ops.query_attention(q, k, 0.125, query=0), dev)
        row("query_scores", (b, h, n, d), torch.float16, t_k, t_t, b * h * n * d * 2 + b * n * 4,
            2 * b * h * n * d, ceil, note="bytes: K read once + scores; the kernel also writes/reads fp32 logits "
                                          f"({2 * b * h * n * 4} B)")


# -- 2c. bipartite matching + merge ------------------------------------------------------------------------
@guard("bipartite")
def kernel_bipartite(dev, smoke, ceil):
    K = impl(dev)
    gen = torch.Generator(device=dev).manual_seed(3)
    print("bipartite matching (best partner without the Na x Nb matrix) and merge rows")
    shapes = ([(2, 51, 16, torch.float32)] if smoke else
              [(256, 196, 64, torch.float16), (2, 16384, 64, torch.float16), (4, 333, 64, torch.float32),
               (8, 1001, 64, torch.bfloat16)])
    poison(dev, True)
    for b, n, d, dt in shapes:
        metric = randn(b, n + 1, d, dtype=dt, dev=dev, gen=gen)[:, 1:]
        valid_b = torch.rand(b, n // 2, device=dev, generator=gen) > 0.1
        for vb in (None, valid_b):
            best, idx = K.bipartite_best(metric, vb)
            rbest, ridx = R.bipartite_best(metric, vb)
            same = float((idx == ridx).float().mean())
            # a different partner is fine only where the two similarities tie in the metric dtype
            m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
            s_full = (m[:, ::2] @ m[:, 1::2].transpose(-1, -2)).float()
            if vb is not None:
                s_full = s_full.masked_fill(~vb[:, None, :], float("-inf"))
            gap = (s_full.gather(2, ridx[..., None]) - s_full.gather(2, idx[..., None])).abs().max().item()
            ulp = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 2 ** -20}[dt]
            check("bipartite_best", (b, n, d, "valid" if vb is not None else ""), dt,
                  0.0 if gap <= 2 * ulp else gap, 2 * ulp + 1e-12, {"same_partner": same, "sim_gap": gap})
    # the whole merge step: fused path vs PyTorch path on the same state. float32: the same tokens
    # exactly. fp16 / bf16: equal scores (ties after rounding) may be broken differently by the two
    # paths (the PyTorch argsort is unstable), so per sample: same source map -> compare tokens;
    # the fraction of samples with the same choice is reported and must be >= 90%.
    for b, n, c, r, dt in ([(2, 21, 32, 7, torch.float32)] if smoke else
                           [(64, 196, 768, 13, torch.float32), (256, 196, 768, 13, torch.float16),
                            (2, 16384, 768, 4096, torch.float32), (2, 16384, 768, 4096, torch.float16),
                            (128, 196, 768, 48, torch.float16),  # row gather with 128-column fix-up tiles
                            (3, 101, 384, 50, torch.float32), (8, 255, 256, 100, torch.bfloat16)]):
        x = randn(b, 1 + n, c, dtype=dt, dev=dev, gen=gen)
        metric = randn(b, 1 + n, 64, dtype=dt, dev=dev, gen=gen)
        sizes = torch.randint(1, 4, (b, 1 + n), device=dev, generator=gen).float()
        outs = {}
        for on in (False, True):
            with kernels_on(on):
                st = TokenState.start(x, 1)
                st.sizes = sizes
                outs[on] = ops.bipartite_merge(st, metric, r)
        same = (outs[True].source == outs[False].source).all(1)
        frac = float(same.float().mean())
        if bool(same.any()):
            err = rel(outs[True].x[same], outs[False].x[same])
            same_sizes = bool(torch.equal(outs[True].sizes[same], outs[False].sizes[same]))
            # the attention bias the kernel wrote with the sizes (log size) against the PyTorch one
            b_on, b_off = outs[True].attn_bias(dt)[same].float(), outs[False].attn_bias(dt)[same].float()
            same_sizes = same_sizes and bool(torch.allclose(b_on, b_off, rtol=1e-3, atol=1e-6))
        else:
            err, same_sizes = float("inf"), False
        # float32 at ViT sizes: the same choice everywhere; at 8k x 8k candidates a near-tie within float32
        # rounding can flip one partner of a sample, so half the samples must agree there
        need = (1.0 if n <= 256 else 0.5) if dt == torch.float32 else (0.9 if n <= 256 else 0.5)
        check("bipartite_merge step", (b, n, c, r), dt, err if (frac >= need and same_sizes) else float("inf"),
              TOL[dt], {"same_choice_fraction": frac, "same_sizes": same_sizes,
                        "path": "merge_step" if (dev.type == "cuda" or INTERPRET) and kernels.merge_step_fits(n)
                        else "bipartite_best + merge_rows"})
    # the tokens handed over as x + y (a block's last residual add left to the merge): the same step, bit
    # for bit, as merging the stored sum (row gather at bs >= 32; smaller batches add first)
    for b, n, c, r, dt in ([(2, 21, 32, 7, torch.float32)] if smoke else
                           [(256, 196, 768, 13, torch.float16), (128, 196, 768, 48, torch.bfloat16),
                            (64, 98, 768, 13, torch.float32), (8, 196, 768, 13, torch.float16)]):
        x = randn(b, 1 + n, c, dtype=dt, dev=dev, gen=gen)
        y = randn(b, 1 + n, c, dtype=dt, dev=dev, gen=gen)
        metric = randn(b, 1 + n, 64, dtype=dt, dev=dev, gen=gen)
        sizes = torch.randint(1, 4, (b, 1 + n), device=dev, generator=gen).float()
        with kernels_on(True):
            st = TokenState.start(x + y, 1)
            st.sizes = sizes
            ref_st = ops.bipartite_merge(st, metric, r)
            st = TokenState.start(x, 1)
            st.sizes, st.residual = sizes, y
            out_st = ops.bipartite_merge(st, metric, r)
        same = (torch.equal(out_st.x, ref_st.x) and torch.equal(out_st.sizes, ref_st.sizes)
                and torch.equal(out_st.source, ref_st.source))
        check("bipartite_merge step, deferred residual", (b, n, c, r), dt, 0.0 if same else float("inf"), 1e-12,
              {"identical": same})
    poison(dev, False)
    # timing: matching alone, merge rows alone, the whole merge step
    for b, n, d in ([(2, 64, 16)] if smoke else [(256, 196, 64), (1, 196, 64), (4, 4096, 64), (1, 16384, 64)]):
        metric = randn(b, n, d, dtype=torch.float16, dev=dev, gen=gen)
        na = (n + 1) // 2
        t_k = bench(lambda: K.bipartite_best(metric), dev)
        t_t = bench(lambda: R.bipartite_best(metric), dev)
        row("bipartite_best", (b, n, d), torch.float16, t_k, t_t, b * n * d * 2 + b * na * 10,
            2 * b * na * (n // 2) * d, ceil, note=f"PyTorch path writes+reads the {b}x{na}x{n // 2} similarity")
    for b, n, c, r in ([(2, 64, 32, 10)] if smoke else [(256, 196, 768, 13), (256, 196, 768, 48), (1, 196, 768, 13),
                                                        (1, 16384, 768, 4096)]):
        x = randn(b, 1 + n, c, dtype=torch.float16, dev=dev, gen=gen)
        metric = randn(b, 1 + n, 64, dtype=torch.float16, dev=dev, gen=gen)

        def step():
            s = TokenState.start(x, 1)
            return ops.bipartite_merge(s, metric, r)
        with kernels_on(True):
            t_k = bench(step, dev)
        with kernels_on(False):
            t_t = bench(step, dev)
        out_rows = 1 + n - r
        nbytes, flops = (b * (1 + n) + b * out_rows) * c * 2, 2 * b * (n // 2) * ((n + 1) // 2) * 64
        one = kernels.merge_step_fits(n) if (dev.type == "cuda" or INTERPRET) else False
        row("bipartite_merge step", (b, n, c, r), torch.float16, t_k, t_t, nbytes, flops, ceil,
            note=("one launch (merge_step)" if one else "bipartite_best + merge_rows") +
                 "; whole ops.bipartite_merge incl. source map; bytes = tokens read + written once")
        if one:  # the same step through the multi-kernel path, for comparison
            T = kernels._impl()
            saved, T.MERGE_STEP_MAX_A = T.MERGE_STEP_MAX_A, 0
            try:
                with kernels_on(True):
                    t_m = bench(step, dev)
            finally:
                T.MERGE_STEP_MAX_A = saved
            row("bipartite_merge (2 kernels)", (b, n, c, r), torch.float16, t_m, t_t, nbytes, flops, ceil,
                note="bipartite_best + merge_rows + torch glue")


@guard("gather_tokens")
def kernel_gather(dev, smoke, ceil):
    """cls/random keep step: ops.gather_tokens (kept rows + prefix) in one pass vs gather + cat."""
    gen = torch.Generator(device=dev).manual_seed(6)
    print("kept-token gather (ops.gather_tokens)")
    for b, n, c, k in ([(2, 64, 32, 20)] if smoke else [(256, 196, 768, 98), (1, 196, 768, 98), (8, 16384, 768, 4096)]):
        x = randn(b, 1 + n, c, dtype=torch.float16, dev=dev, gen=gen)
        keep = torch.rand(b, n, device=dev, generator=gen).topk(k, 1).indices.sort(1).values
        outs = {}
        for on in (False, True):
            with kernels_on(on):
                outs[on] = ops.gather_tokens(TokenState.start(x, 1), keep).x
        check("gather_tokens", (b, n, c, k), torch.float16, rel(outs[True], outs[False]), 1e-12)

        def step():
            return ops.gather_tokens(TokenState.start(x, 1), keep)
        with kernels_on(True):
            t_k = bench(step, dev)
        with kernels_on(False):
            t_t = bench(step, dev)
        row("gather_tokens step", (b, n, c, k), torch.float16, t_k, t_t, 2 * b * (1 + k) * c * 2, 0, ceil,
            note="whole ops.gather_tokens incl. source map; bytes = kept rows read + written")
    # the whole keep step (top-k in spatial order + gather + sizes + source map): one launch on CUDA
    for b, n, c, k in ([(2, 64, 32, 20)] if smoke else [(256, 196, 768, 98), (1, 196, 768, 98), (1, 576, 1024, 58),
                                                        (16, 576, 1024, 144), (4, 1000, 384, 250)]):
        x = randn(b, 1 + n, c, dtype=torch.float16, dev=dev, gen=gen)
        scores = torch.rand(b, n, device=dev, generator=gen).argsort(1).float() / n  # distinct per row
        sizes = torch.randint(1, 4, (b, 1 + n), device=dev, generator=gen).float()

        def step():
            st = TokenState.start(x, 1)
            st.sizes = sizes
            return ops.keep_top(st, scores, k)
        poison(dev, True)
        outs = {}
        for on in (False, True):
            with kernels_on(on):
                outs[on] = step()
        poison(dev, False)
        same = all(torch.equal(getattr(outs[True], a), getattr(outs[False], a)) for a in ("x", "sizes", "source"))
        check("keep_top (keep_step)", (b, n, c, k), torch.float16, 0.0 if same else float("inf"), 1e-12)
        with kernels_on(True):
            t_k = bench(step, dev)
        with kernels_on(False):
            t_t = bench(step, dev)
        row("keep_top step", (b, n, c, k), torch.float16, t_k, t_t, 2 * b * (1 + k) * c * 2, 0, ceil,
            note="top-k + gather + sizes + source map in one launch vs topk/sort/gather/cat/scatter")


# -- 2d. ApET errors ----------------------------------------------------------------------------------------
@guard("apet_errors")
def kernel_apet(dev, smoke, ceil):
    from tokenprune.reducers.apet import reconstruction_error
    K = impl(dev)
    gen = torch.Generator(device=dev).manual_seed(4)
    print("ApET reconstruction error")
    poison(dev, True)
    for b, n, c, k, dt in ([(2, 33, 40, 5, torch.float32)] if smoke else
                           [(256, 196, 768, 10, torch.float16), (3, 1000, 1024, 10, torch.bfloat16),
                            (2, 77, 96, 5, torch.float32), (1, 4099, 768, 16, torch.float16)]):
        x = randn(b, n, c, dtype=dt, dev=dev, gen=gen)
        basis = x[:, :k].clone()
        out = K.apet_errors(x, basis)
        ref = R.apet_errors(x.double(), basis.double())
        check("apet_errors", (b, n, c, k), dt, rel(out, ref), 1e-4)
    poison(dev, False)
    for b, n, c, k in ([(2, 33, 40, 5)] if smoke else [(256, 196, 768, 10), (1, 196, 768, 10), (8, 4096, 768, 10)]):
        x = randn(b, n, c, dtype=torch.float16, dev=dev, gen=gen)
        basis = x[:, :k].clone()
        t_k = bench(lambda: K.apet_errors(x, basis), dev)
        with kernels_on(False):
            t_t = bench(lambda: reconstruction_error(x, basis), dev)
        row("apet_errors", (b, n, c, k), torch.float16, t_k, t_t, b * n * c * 2 + b * n * 4, 4 * b * n * c * k, ceil,
            "matmul_float32_flops", note="float32 (ieee) products on the FMA units; FLOPs counted for k, the "
                                         "kernel pads k to 16 (1.6x the work at k=10)")
    # the whole ApET stage (basis, errors, top-k, cosine assignment, merge) with kernels on / off
    from tokenprune.plan import Stage
    from tokenprune.reducers.apet import Apet
    for b, n, c, keep in ([(2, 40, 32, 15)] if smoke else [(256, 196, 768, 98), (1, 196, 768, 98)]):
        x = randn(b, 1 + n, c, dtype=torch.float16, dev=dev, gen=gen)
        red = Apet()
        outs = {}
        for on in (False, True):
            with kernels_on(on):
                outs[on] = red.reduce(TokenState.start(x, 1), Stage(0, keep, "apet"), None)
        # the PyTorch path on the same tokens in float32: the kernel path (Gram matrix in float32) makes its
        # choices in float32 too, while the fp16 PyTorch path rounds its FPS / cosine dot products to fp16 and
        # so breaks near-ties differently (reported, not checked). Compared per sample (same source map).
        with kernels_on(False):
            ref32 = red.reduce(TokenState.start(x.float(), 1), Stage(0, keep, "apet"), None)
        same = (outs[True].source == ref32.source).all(1)
        frac = float(same.float().mean())
        frac16 = float((outs[True].source == outs[False].source).all(1).float().mean())
        err = rel(outs[True].x[same], ref32.x[same]) if bool(same.any()) else float("inf")
        check("apet reduce step", (b, n, c, keep), torch.float16, err if frac >= 0.9 else float("inf"), 1e-2,
              {"same_choice_fraction": frac, "same_choice_fraction_vs_fp16_torch": frac16,
               "path": "gram + apet_stage + apet_assign" if (dev.type == "cuda" or INTERPRET)
               and kernels.apet_stage_fits(n, red.k) else "x-based"})

        if not smoke and b == 1:  # the one-launch merge (apet_merge) alone (once), random assignments, sizes, source
            for bb, nn, cc, kk, dt in [(256, 196, 768, 98, torch.float16), (1, 196, 768, 98, torch.float16),
                                       (3, 500, 384, 200, torch.bfloat16), (2, 77, 96, 30, torch.float32)]:
                xx = randn(bb, 1 + nn, cc, dtype=dt, dev=dev, gen=gen)
                sz = torch.randint(1, 4, (bb, 1 + nn), device=dev, generator=gen).float()
                kidx = torch.rand(bb, nn, device=dev, generator=gen).topk(kk, 1).indices.sort(1).values
                tgt = torch.randint(0, kk, (bb, nn), device=dev, generator=gen)
                tgt.scatter_(1, kidx, torch.arange(kk, device=dev).expand(bb, kk))
                src = torch.randint(-1, 1 + nn, (bb, 1 + nn + 5), device=dev, generator=gen)
                w = sz[:, 1:].double()
                num = torch.zeros(bb, kk, cc, dtype=torch.float64, device=dev).scatter_add_(
                    1, tgt[..., None].expand(bb, nn, cc), xx[:, 1:].double() * w[..., None])
                den = torch.zeros(bb, kk, dtype=torch.float64, device=dev).scatter_add_(1, tgt, w)
                ref_x = torch.cat([xx[:, :1].double(), num / den[..., None]], 1)
                ref_s = torch.cat([sz[:, :1], den.float()], 1)
                ref_src = ops.remap_source(src, torch.cat([torch.zeros(bb, 1, dtype=torch.long, device=dev), tgt + 1], 1))
                poison(dev, True)
                ox, osz, osrc = K.apet_merge(xx, sz, tgt, kidx, src, 1, max_size=1 + nn)
                poison(dev, False)
                ok = torch.equal(osz, ref_s) and torch.equal(osrc, ref_src)
                check("apet_merge", (bb, nn, cc, kk), dt, rel(ox, ref_x) if ok else float("inf"), TOL[dt])

        def step():
            return red.reduce(TokenState.start(x, 1), Stage(0, keep, "apet"), None)
        with kernels_on(True):
            t_k = bench(step, dev)
        with kernels_on(False):
            t_t = bench(step, dev)
        row("apet reduce step", (b, n, c, keep), torch.float16, t_k, t_t, b * (1 + n) * c * 2 + b * (1 + keep) * c * 2,
            0, ceil, note="whole Apet.reduce; bound = tokens read once + kept written once (the basis search and "
                          "cosine assignment read x more often)")


@guard("apet_stage")
def kernel_apet_stage(dev, smoke, ceil):
    """ApET stage from the Gram matrix: gram / apet_stage / apet_assign against float64 references, and
    the basis + errors of one stage timed against the x-based path (farthest_point_basis + errors)."""
    from tokenprune.reducers.apet import farthest_point_basis, reconstruction_error
    K = impl(dev)
    gen = torch.Generator(device=dev).manual_seed(7)
    print("ApET stage from the Gram matrix (gram, apet_stage, apet_assign)")
    poison(dev, True)
    # Gram: strided inputs (x[:, p:] of the token tensor), odd N, every dtype
    for b, n, c, dt in ([(2, 37, 40, torch.float32)] if smoke else
                        [(256, 196, 768, torch.float16), (3, 1000, 1024, torch.bfloat16), (2, 77, 96, torch.float32),
                         (4, 577, 768, torch.float16), (1, 1030, 384, torch.float16)]):
        x = randn(b, 1 + n, c, dtype=dt, dev=dev, gen=gen)[:, 1:]
        g, sq = K.gram(x)
        ref = x.double() @ x.double().transpose(1, 2)
        check("gram", (b, n, c), dt, max(rel(g, ref), rel(sq, ref.diagonal(dim1=1, dim2=2))), 1e-5)
    # stage: basis indices equal to the float64 reference on the same G (per sample; random tokens have no
    # near-ties at float32 precision, so all should agree), errors: max |e^2 - e_ref^2| / |x|^2
    for b, n, c, k, dt, padded in ([(2, 40, 32, 4, torch.float32, True)] if smoke else
                                   [(256, 196, 768, 10, torch.float16, False), (256, 196, 768, 10, torch.float16, True),
                                    (16, 577, 1024, 32, torch.bfloat16, True), (8, 1024, 768, 1, torch.float16, True),
                                    (4, 101, 96, 7, torch.float32, False)]):
        x = randn(b, n, c, dtype=dt, dev=dev, gen=gen)
        valid = (torch.rand(b, n, device=dev, generator=gen) > 0.2) if padded else None
        g, sq = K.gram(x)
        basis, err = K.apet_stage(g, valid, k)
        g64 = x.double() @ x.double().transpose(1, 2)
        rbasis, rerr = R.apet_stage(g64, valid, k)
        same = (basis == rbasis).all(1)
        frac = float(same.float().mean())
        e = ((err.double() ** 2 - rerr ** 2).abs() / g64.diagonal(dim1=1, dim2=2).clamp_min(1e-30))[same]
        e = float(e.max()) if e.numel() and not torch.isnan(err).any() else float("nan")
        check("apet_stage", (b, n, c, k, "valid" if padded else ""), dt, e if frac >= 0.99 else float("inf"), 1e-4,
              {"same_basis_fraction": frac,
               "x_based_same_basis": float((farthest_point_basis(x.double(), k, valid) == rbasis).all(1).float().mean())})
        keep = torch.rand(b, n, device=dev, generator=gen).topk(max(k, n // 2), 1).indices.sort(1).values
        t = K.apet_assign(g, keep)
        rt = R.apet_assign(g64, keep)
        frac_a = float((t == rt).float().mean())
        check("apet_assign", (b, n, c, keep.shape[1]), dt, 0.0 if frac_a >= 0.999 else 1 - frac_a, 1e-3,
              {"same_slot_fraction": frac_a})
    poison(dev, False)
    # timing: basis + errors of one stage, Gram path vs the x-based path (kernels off = PyTorch; kernels on =
    # PyTorch FPS + the apet_errors kernel, i.e. the CUDA path before the Gram kernels)
    for b, n, c, k in ([(2, 40, 32, 4)] if smoke else [(256, 196, 768, 10), (1, 196, 768, 10)]):
        x = randn(b, 1 + n, c, dtype=torch.float16, dev=dev, gen=gen)
        xs = x[:, 1:]
        valid = torch.ones(b, n, dtype=torch.bool, device=dev)

        def gram_stage():
            return K.apet_stage(K.gram(xs)[0], valid, k)

        def x_based():
            basis = farthest_point_basis(xs, k, valid)
            return reconstruction_error(xs, xs.gather(1, basis[..., None].expand(b, k, c)))
        t_k = bench(gram_stage, dev)
        with kernels_on(False):
            t_t = bench(x_based, dev)
        with kernels_on(True):
            t_x = bench(x_based, dev)
        nbytes = b * n * c * 2 + 2 * b * n * n * 4 + b * n * 4
        row("apet stage (Gram + one-program FPS/solve)", (b, n, c, k), torch.float16, t_k, t_t, nbytes,
            2 * b * n * n * c, ceil, note=f"basis + errors; torch = farthest_point_basis + reconstruction_error "
                                          f"(x-based); with the apet_errors kernel {t_x * 1e3:.1f} us; bytes = x read "
                                          f"once + G written and read once")
        keep = torch.rand(b, n, device=dev, generator=gen).topk(n // 2, 1).indices.sort(1).values
        g = K.gram(xs)[0]
        t_a = bench(lambda: K.apet_assign(g, keep), dev)

        def cos_assign():  # what Apet.reduce's x-based path does for the assignment
            xn = xs / xs.float().norm(dim=-1, keepdim=True).clamp_min(1e-6).to(xs.dtype)
            kept_n = xn.gather(1, keep[..., None].expand(b, n // 2, c))
            target = torch.bmm(xn, kept_n.transpose(1, 2)).argmax(-1)
            return target.scatter_(1, keep, torch.arange(n // 2, device=dev).expand(b, n // 2))
        t_c = bench(cos_assign, dev)
        row("apet assign (cos from G)", (b, n, c, n // 2), torch.float16, t_a, t_c, b * n * n * 4 + b * n * 8, 0, ceil,
            note="torch = normalise x, bmm with the kept rows, argmax; bytes = G read once + slots written")


@guard("fused residual forward")
def model_fused_residual(dev, smoke):
    """A merged ViT (this machine's timm; merge and MAELRE) with each merged block's last residual add left
    to the merge kernels, against the same model with every block's own add: the same logits, bit for bit."""
    import os

    import tokenprune
    print("merge forward, the blocks' last residual add in the merge (TOKENPRUNE_FUSE_RESIDUAL 1 vs 0)")
    model, dt = make_vit(dev, smoke)
    gen = torch.Generator(device=dev).manual_seed(9)
    # row gather / one-launch step; MAELRE (linear attention in the early blocks, the same merges)
    for method, b, budget in ([("merge", 2, 0.25), ("maelre", 2, 0.25)] if smoke else
                              [("merge", 64, 0.25), ("merge", 8, 0.1), ("maelre", 64, 0.25)]):
        x = torch.randn(b, 3, *((32, 32) if smoke else (224, 224)), device=dev, generator=gen).to(dt)
        outs = {}
        try:
            with torch.inference_mode(), kernels_on(True):
                for fuse in ("0", "1"):
                    tokenprune.engine.set_fuse_residual(fuse == "1")
                    tokenprune.apply(model, budget=budget, method=method)  # the plan reads the switch
                    outs[fuse] = model(x)
        finally:
            tokenprune.engine.set_fuse_residual(True)
            tokenprune.remove(model)
        same = bool(torch.equal(outs["0"], outs["1"]))
        check(f"{method} forward, fused residual", (b, budget), dt, 0.0 if same else rel(outs["1"], outs["0"]), 1e-12,
              {"identical": same})


# -- 3. end to end -----------------------------------------------------------------------------------------
def make_vit(dev, smoke, img=None):
    import timm
    torch.manual_seed(0)
    if smoke:
        kw = dict(img_size=img or 32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)
        m = timm.create_model("vit_small_patch16_224", pretrained=False, **kw)
    else:
        kw = {"img_size": img} if img else {}
        m = timm.create_model("vit_base_patch16_224", pretrained=False, **kw)
    dt = torch.float32 if smoke else torch.float16
    return m.to(dev, dt).eval(), dt


def graph_fn(model, x):
    """A CUDA-graph replay of model(x), or None when the forward cannot be captured."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            model(x)
        return g.replay
    except Exception as e:
        torch.cuda.synchronize()
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


@guard("end_to_end")
def end_to_end(dev, smoke, budget_s):
    print("end to end: vit_base_patch16_224 fp16 (random weights)")
    model, dt = make_vit(dev, smoke)
    methods = [m for m in ("merge", "cls", "apet") if m in tokenprune.methods()]
    out = []
    for bs in ((4, 1) if smoke else (256, 1)):
        x = torch.randn(bs, 3, 32 if smoke else 224, 32 if smoke else 224, device=dev, dtype=dt)
        with torch.no_grad():
            t0 = bench(lambda: model(x), dev, 300)
            g0 = graph_fn(model, x) if dev.type == "cuda" and bs == 1 else None
            t0g = bench(g0, dev, 300) if callable(g0) else None
            base = {"batch": bs, "method": "none", "budget": 1.0, "flop_ratio": 1.0, "t_on_ms": t0, "t_off_ms": t0,
                    "graph_on_ms": t0g, "graph_off_ms": t0g}
            out.append(base)
            print(f"  bs {bs:>3} unreduced {t0:8.3f} ms" + (f"  graph {t0g:8.3f} ms" if t0g else ""))
            for method in methods:
                for budget in (0.5, 0.25):
                    if time.time() - T0 > budget_s:
                        RESULTS["errors"].append(f"end_to_end: time budget reached before {method} {budget} bs {bs}")
                        continue
                    tokenprune.apply(model, budget=budget, method=method)
                    ratio = tokenprune.plan(model).flop_ratio
                    r = {"batch": bs, "method": method, "budget": budget, "flop_ratio": ratio}
                    for on in (True, False):
                        key = "on" if on else "off"
                        with kernels_on(on):
                            r[f"t_{key}_ms"] = bench(lambda: model(x), dev, 300)
                            if dev.type == "cuda" and bs == 1:
                                g = graph_fn(model, x)
                                r[f"graph_{key}_ms"] = bench(g, dev, 300) if callable(g) else None
                                if not callable(g):
                                    r["graph_error"] = g
                                del g
                    tokenprune.remove(model)
                    for key in ("on", "off"):
                        ideal = t0 * ratio
                        r[f"overhead_{key}_ms"] = r[f"t_{key}_ms"] - ideal
                        r[f"overhead_{key}_pct"] = 100 * (r[f"t_{key}_ms"] - ideal) / ideal
                        if r.get(f"graph_{key}_ms") and t0g:
                            gi = t0g * ratio
                            r[f"graph_overhead_{key}_pct"] = 100 * (r[f"graph_{key}_ms"] - gi) / gi
                    out.append(r)
                    print(f"  bs {bs:>3} {method:<6} b={budget:<5} flop ratio {ratio:.3f}  kernels on {r['t_on_ms']:8.3f} ms "
                          f"({r['overhead_on_pct']:+6.1f}%)  off {r['t_off_ms']:8.3f} ms ({r['overhead_off_pct']:+6.1f}%)"
                          + (f"  graph on {r['graph_on_ms']:.3f} ms ({r.get('graph_overhead_on_pct', float('nan')):+.1f}%)"
                             if r.get("graph_on_ms") else ""))
        del x
    RESULTS["end_to_end"] = out
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()


@guard("maelre_16k")
def maelre_long(dev, smoke, budget_s):
    if "maelre" not in tokenprune.methods():
        return
    img = 64 if smoke else 2048  # 2048 px / 16 = 128 x 128 = 16384 patches
    print(f"maelre on a long input ({(img // (4 if smoke else 16)) ** 2} tokens)")
    model, dt = make_vit(dev, smoke, img)
    x = torch.randn(1, 3, img, img, device=dev, dtype=dt)
    out = []

    def measure(label, **extra):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with torch.no_grad():
            model(x)
            sync(dev)
            peak = (torch.cuda.max_memory_allocated() - before) if dev.type == "cuda" else float("nan")
            t = bench(lambda: model(x), dev, 300)
        r = {"config": label, "t_ms": t, "peak_extra_bytes": peak, **extra}
        out.append(r)
        print(f"  {label:<34} {t:9.2f} ms  peak activations {peak / 2 ** 20:9.1f} MiB")

    measure("unreduced SDPA")
    for budget in (0.5, 0.25):
        if time.time() - T0 > budget_s:
            break
        tokenprune.apply(model, budget=budget, method="maelre")
        ratio = tokenprune.plan(model).flop_ratio
        for on in (True, False):
            with kernels_on(on):
                measure(f"maelre b={budget} kernels {'on' if on else 'off'}", flop_ratio=ratio, budget=budget)
        tokenprune.remove(model)
    RESULTS["maelre_long"] = out
    del model


# -- report ---------------------------------------------------------------------------------------------
def markdown() -> str:
    lines = [f"# gpu_kernels.py results", "", f"device: {RESULTS.get('device')}; torch {torch.__version__}", ""]
    c = RESULTS.get("ceilings")
    if c:
        lines += [f"copy bandwidth {c['bandwidth_Bps'] / 1e12:.2f} TB/s (read+write), "
                  f"fp16 matmul {c['matmul_float16_flops'] / 1e12:.0f} TFLOP/s, "
                  f"bf16 matmul {c['matmul_bfloat16_flops'] / 1e12:.0f} TFLOP/s, "
                  f"fp32 matmul (no tf32) {c['matmul_float32_flops'] / 1e12:.0f} TFLOP/s", ""]
    if RESULTS.get("correctness"):
        lines += ["## Correctness (rel. error vs float64 reference, outputs poisoned first)", "",
                  "| kernel | shape | dtype | rel err | tol | ok |", "|---|---|---|---|---|---|"]
        for r in RESULTS["correctness"]:
            lines.append(f"| {r['kernel']} | {r['shape']} | {r['dtype']} | {r['rel_err']:.2e} | {r['tol']:.0e} | "
                         f"{'yes' if r['ok'] else 'NO'} |")
        lines.append("")
    if RESULTS.get("timing"):
        lines += ["## Kernels: time vs PyTorch path and roofline bound", "",
                  "| kernel | shape | dtype | kernel us | PyTorch us | speed-up | MB | GFLOP | bound us | % of bound |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in RESULTS["timing"]:
            lines.append(f"| {r['kernel']} | {r['shape']} | {r['dtype']} | {r['t_kernel_ms'] * 1e3:.1f} | "
                         f"{r['t_torch_ms'] * 1e3:.1f} | {r['speedup']:.2f} | {r['bytes'] / 1e6:.1f} | "
                         f"{r['flops'] / 1e9:.2f} | {r['bound_ms'] * 1e3:.1f} | {r['pct_of_bound']:.0f}% |")
        lines.append("")
    if RESULTS.get("end_to_end"):
        lines += ["## End to end, vit_base_patch16_224 fp16", "",
                  "overhead = t(reduced) - t(unreduced) x flop_ratio, in % of t(unreduced) x flop_ratio", "",
                  "| batch | method | budget | FLOP ratio | kernels on ms | overhead on | kernels off ms | overhead off "
                  "| graph on ms | graph overhead on | graph off ms | graph overhead off |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        f = lambda v, s="{:.3f}": "-" if v is None else s.format(v)  # noqa: E731
        for r in RESULTS["end_to_end"]:
            lines.append(f"| {r['batch']} | {r['method']} | {r['budget']} | {r['flop_ratio']:.3f} | {f(r['t_on_ms'])} | "
                         f"{f(r.get('overhead_on_pct'), '{:+.1f}%')} | {f(r['t_off_ms'])} | "
                         f"{f(r.get('overhead_off_pct'), '{:+.1f}%')} | {f(r.get('graph_on_ms'))} | "
                         f"{f(r.get('graph_overhead_on_pct'), '{:+.1f}%')} | {f(r.get('graph_off_ms'))} | "
                         f"{f(r.get('graph_overhead_off_pct'), '{:+.1f}%')} |")
        errs = {r.get("graph_error") for r in RESULTS["end_to_end"] if r.get("graph_error")}
        for e in errs:
            lines.append(f"\ngraph capture failed: {e}")
        lines.append("")
    if RESULTS.get("maelre_long"):
        lines += ["## maelre on a 16k-token input (vit_base at 2048 px, bs 1, fp16)", "",
                  "| config | ms | peak activation MiB |", "|---|---|---|"]
        for r in RESULTS["maelre_long"]:
            lines.append(f"| {r['config']} | {r['t_ms']:.2f} | {r['peak_extra_bytes'] / 2 ** 20:.1f} |")
        lines.append("")
    if RESULTS.get("ea_sweep"):
        lines += ["## efficient attention block sizes (BLOCK_N, warps) at N = 16384, fp16", "",
                  "| d | pass 1 | pass 2 | us | % of bound |", "|---|---|---|---|---|"]
        for r in RESULTS["ea_sweep"]:
            if "t_ms" in r:
                lines.append(f"| {r['d']} | {r['pass1']} | {r['pass2']} | {r['t_ms'] * 1e3:.1f} | {r['pct_of_bound']:.0f}% |")
            else:
                lines.append(f"| {r['d']} | {r['pass1']} | {r['pass2']} | failed: {r['error'][:60]} | |")
        lines.append("")
    if RESULTS["errors"]:
        lines += ["## Errors", ""] + [f"- {e}" for e in RESULTS["errors"]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_kernels.json and gpu_kernels.md")
    ap.add_argument("--smoke", action="store_true", help="CPU, PyTorch fallbacks only, tiny sizes")
    ap.add_argument("--budget-s", type=float, default=270.0, help="skip later end-to-end rows after this many seconds")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: kernels,e2e,long")
    ap.add_argument("--interpret", action="store_true",
                    help="with --smoke: run the Triton kernels on CPU through TRITON_INTERPRET=1 (slow, tiny sizes)")
    args = ap.parse_args()
    if args.interpret:
        global INTERPRET
        INTERPRET = True
        args.smoke = True
        os.environ["TRITON_INTERPRET"] = "1"  # before triton_impl is imported (kernels import it lazily)
        _real_use = kernels.use_triton
        kernels.use_triton = lambda *ts: kernels.kernels_enabled() and bool(kernels._impl())  # noqa: E731
        del _real_use
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1 if args.smoke else max(1, os.cpu_count() or 1))
    dev = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if dev.type == "cpu" and not args.smoke:
        print("no CUDA device: running the smoke version")
        args.smoke = True
    smoke = args.smoke
    RESULTS["device"] = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu"
    RESULTS["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        RESULTS["versions"]["triton"] = triton.__version__
    except Exception:
        pass
    RESULTS["triton_in_use"] = bool(dev.type == "cuda" and kernels._impl())
    skip = set(filter(None, args.skip.split(",")))
    ceil = ceilings(dev, smoke)
    if "kernels" not in skip:
        kernel_efficient_attention(dev, smoke, ceil)
        sweep_efficient_attention(dev, smoke, ceil)
        kernel_biased_attention(dev, smoke, ceil)
        kernel_query_scores(dev, smoke, ceil)
        kernel_bipartite(dev, smoke, ceil)
        kernel_gather(dev, smoke, ceil)
        kernel_apet(dev, smoke, ceil)
        kernel_apet_stage(dev, smoke, ceil)
        model_fused_residual(dev, smoke)
    if "e2e" not in skip:
        end_to_end(dev, smoke, args.budget_s)
    if "long" not in skip:
        maelre_long(dev, smoke, args.budget_s + 30)
    RESULTS["wall_s"] = time.time() - T0
    (out_dir / "gpu_kernels.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    md = markdown()
    (out_dir / "gpu_kernels.md").write_text(md)
    # short table last
    print("\n=== summary ===")
    for r in RESULTS.get("timing", []):
        print(f"{r['kernel']:<22} {str(r['shape']):<24} {r['t_kernel_ms'] * 1e3:8.1f} us vs torch "
              f"{r['t_torch_ms'] * 1e3:8.1f} us  {r['pct_of_bound']:5.1f}% of bound")
    for r in RESULTS.get("end_to_end", []):
        if r["method"] != "none":
            print(f"bs {r['batch']:>3} {r['method']:<6} {r['budget']:<5} overhead on {r['overhead_on_pct']:+6.1f}% "
                  f"off {r['overhead_off_pct']:+6.1f}%" + (f" graph on {r['graph_overhead_on_pct']:+6.1f}%"
                                                           if r.get("graph_overhead_on_pct") is not None else ""))
    bad = [r for r in RESULTS.get("correctness", []) if not r["ok"]]
    print(f"correctness: {len(RESULTS.get('correctness', [])) - len(bad)} ok, {len(bad)} failed; "
          f"errors: {len(RESULTS['errors'])}; wall {RESULTS['wall_s']:.0f} s")
    return 1 if bad or RESULTS["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
