#!/usr/bin/env python
"""Time tokenprune's Triton kernels against their PyTorch paths and the roofline bound.

    python scripts/gpu_kernels.py --out DIR          # on the GPU machine (a few minutes)
    python scripts/gpu_kernels.py --out DIR --smoke  # on CPU: PyTorch paths only, tiny sizes (checks the script)

Writes DIR/gpu_kernels.json (every number) and DIR/gpu_kernels.md (tables), prints a short table last.
Correctness is checked by ``python -m pytest -m gpu tests/test_gpu_kernels.py``; whole forwards are timed by
``tokenprune bench`` (``--cuda-graph``), scripts/bench_forward.py and scripts/gpu_maelre.py.

1. Ceilings of this card: device-to-device copy bandwidth (bytes read + written) and the fp16 / bf16 /
   fp32 (no TF32) matrix-product rates (8192^3 and 4096^3, random data).
2. Per kernel: the median time (``tokenprune.bench.time_fn``: CUDA events around each eager call, so host
   launch time is included where it exceeds the GPU work; no L2 flush between calls, unlike the
   ``triton.testing.do_bench`` of runs up to 41) of the kernel and of the PyTorch path
   (``kernels.set_kernels_enabled(False)``), the bytes / FLOPs the kernel must move / do, the roofline
   bound max(bytes / bandwidth, FLOPs / rate) and the kernel's % of it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import copy_bandwidth, ms  # noqa: E402

from tokenprune import kernels, ops  # noqa: E402
from tokenprune.kernels import reference as R  # noqa: E402
from tokenprune.state import TokenState  # noqa: E402

RESULTS: dict = {"errors": []}
T0 = time.time()
SECTIONS = ("ea", "ba", "qs", "bipartite", "gather", "apet", "apet_stage")
REMOVED = {"kernels": "the correctness checks: tests/test_gpu_kernels.py",
           "e2e": "end to end: tokenprune bench --cuda-graph, scripts/bench_forward.py",
           "long": "maelre at 16k tokens: scripts/gpu_maelre.py"}


kernels_on = kernels.kernels_on


def randn(*shape, dtype, dev, gen):
    return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32).to(dtype)


def size_bias(b, n, dtype, dev, gen):
    s = torch.rand(b, n, generator=gen, device=dev) * 3 + 0.5
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


# -- 1. ceilings --------------------------------------------------------------------------------------
@guard("ceilings")
def ceilings(dev, smoke):
    bw = copy_bandwidth(dev, (1 << 20) if smoke else (1 << 30))
    out = {"bandwidth_Bps": bw}
    gen = torch.Generator(device=dev).manual_seed(0)
    for dt, m in ((torch.float16, 8192), (torch.bfloat16, 8192), (torch.float32, 4096)):
        m = 256 if smoke else m
        if dt == torch.float32 and dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # plain float32 FMA rate (ApET's products run so)
        x, y = randn(m, m, dtype=dt, dev=dev, gen=gen), randn(m, m, dtype=dt, dev=dev, gen=gen)
        out[f"matmul_{str(dt)[6:]}_flops"] = 2 * m ** 3 / (ms(lambda: x @ y, dev) * 1e-3)
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


def on_off(fn, dev, torch_fn=None):
    """``(kernel ms, PyTorch ms)``: ``fn`` with the kernels on, ``torch_fn`` (default ``fn``) with them off."""
    with kernels_on(True):
        t_k = ms(fn, dev)
    with kernels_on(False):
        t_t = ms(torch_fn or fn, dev)
    return t_k, t_t


# -- 2. kernels ---------------------------------------------------------------------------------------------
@guard("efficient_attention")
def time_efficient_attention(dev, smoke, ceil):
    from tokenprune.reducers.maelre import efficient_attention as maelre_ea
    gen = torch.Generator(device=dev).manual_seed(1)
    print("efficient attention (MAELRE linear attention)")
    shapes = ([(1, 2, 256, 16)] if smoke else
              [(4, 12, 8192, 64), (1, 12, 16384, 64), (2, 16, 16384, 128), (1, 12, 65536, 64),
               (1, 16, 65536, 128), (256, 12, 197, 64)])
    for b, h, n, d in shapes:
        for dt in ((torch.float16,) if (b, n) != (1, 65536) or d != 64 else (torch.float16, torch.bfloat16)):
            q, k, v = (randn(b, h, n, d, dtype=dt, dev=dev, gen=gen) for _ in range(3))
            bias = size_bias(b, n, dt, dev, gen)
            e = q.element_size()
            t_k, t_t = on_off(lambda: kernels.efficient_attention(q, k, v, bias), dev, lambda: maelre_ea(q, k, v, bias))
            row("efficient_attention", (b, h, n, d), dt, t_k, t_t, 4 * b * h * n * d * e + 2 * b * n * e,
                4 * b * h * n * d * d + 2 * b * h * n * d, ceil,
                "matmul_bfloat16_flops" if dt == torch.bfloat16 else "matmul_float16_flops")
            del q, k, v


@guard("biased_attention")
def time_biased_attention(dev, smoke, ceil):
    import torch.nn.functional as F
    gen = torch.Generator(device=dev).manual_seed(3)
    print("softmax attention with a per-key bias (proportional attention)")
    saved, kernels.BA_MIN_BATCH_EAGER = kernels.BA_MIN_BATCH_EAGER, 1  # the kernel at every batch (eager: SDPA below 32)
    try:
        for b, h, n, d in ([(1, 2, 64, 16)] if smoke else [(256, 12, 197, 64), (256, 12, 99, 64), (1, 12, 197, 64),
                                                          (64, 16, 577, 64), (32, 16, 257, 128)]):
            q, k, v = (randn(b, h, n, d, dtype=torch.float16, dev=dev, gen=gen) for _ in range(3))
            bias = size_bias(b, n, torch.float16, dev, gen)
            t_k, t_t = on_off(lambda: kernels.biased_attention(q, k, v, bias), dev,
                              lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
            t_flash = ms(lambda: F.scaled_dot_product_attention(q, k, v), dev)
            row("biased_attention", (b, h, n, d), torch.float16, t_k, t_t, 4 * b * h * n * d * 2 + 2 * b * n,
                4 * b * h * n * n * d, ceil, note=f"SDPA without the bias: {t_flash * 1e3:.1f} us")
    finally:
        kernels.BA_MIN_BATCH_EAGER = saved


@guard("query_scores")
def time_query_scores(dev, smoke, ceil):
    gen = torch.Generator(device=dev).manual_seed(2)
    print("query-row scores ([CLS] attention, head mean)")
    shapes = [(2, 3, 64, 16)] if smoke else [(256, 12, 197, 64), (1, 12, 197, 64), (64, 12, 577, 64),
                                             (8, 12, 16384, 64)]
    for b, h, n, d in shapes:
        q, k = (randn(b, h, n, d, dtype=torch.float16, dev=dev, gen=gen) for _ in range(2))
        t_k, t_t = on_off(lambda: kernels.query_scores(q[:, :, 0], k, 0.125), dev,
                          lambda: ops.query_attention(q, k, 0.125, query=0))
        row("query_scores", (b, h, n, d), torch.float16, t_k, t_t, b * h * n * d * 2 + b * n * 4,
            2 * b * h * n * d, ceil, note="bytes: K read once + scores; the kernel also writes/reads fp32 logits "
                                          f"({2 * b * h * n * 4} B)")


@guard("bipartite")
def time_bipartite(dev, smoke, ceil):
    gen = torch.Generator(device=dev).manual_seed(3)
    print("bipartite matching (best partner without the Na x Nb matrix) and the whole merge step")
    for b, n, d in ([(2, 64, 16)] if smoke else [(256, 196, 64), (1, 196, 64), (4, 4096, 64), (1, 16384, 64)]):
        metric = randn(b, n, d, dtype=torch.float16, dev=dev, gen=gen)
        na = (n + 1) // 2
        t_k, t_t = on_off(lambda: kernels.bipartite_best(metric), dev, lambda: R.bipartite_best(metric))
        row("bipartite_best", (b, n, d), torch.float16, t_k, t_t, b * n * d * 2 + b * na * 10,
            2 * b * na * (n // 2) * d, ceil, note=f"PyTorch path writes+reads the {b}x{na}x{n // 2} similarity")
    for b, n, c, r in ([(2, 64, 32, 10)] if smoke else [(256, 196, 768, 13), (256, 196, 768, 48), (1, 196, 768, 13),
                                                        (1, 16384, 768, 4096)]):
        x = randn(b, 1 + n, c, dtype=torch.float16, dev=dev, gen=gen)
        metric = randn(b, 1 + n, 64, dtype=torch.float16, dev=dev, gen=gen)

        def step():
            return ops.bipartite_merge(TokenState.start(x, 1), metric, r)
        t_k, t_t = on_off(step, dev)
        out_rows = 1 + n - r
        nbytes, flops = (b * (1 + n) + b * out_rows) * c * 2, 2 * b * (n // 2) * ((n + 1) // 2) * 64
        one = dev.type == "cuda" and kernels.merge_step_fits(n)
        row("bipartite_merge step", (b, n, c, r), torch.float16, t_k, t_t, nbytes, flops, ceil,
            note=("one launch (merge_step)" if one else "bipartite_best + merge_rows") +
                 "; whole ops.bipartite_merge incl. source map; bytes = tokens read + written once")
        if one:  # the same step through the multi-kernel path, for comparison
            T = kernels._impl()
            saved, T.MERGE_STEP_MAX_A = T.MERGE_STEP_MAX_A, 0
            try:
                with kernels_on(True):
                    t_m = ms(step, dev)
            finally:
                T.MERGE_STEP_MAX_A = saved
            row("bipartite_merge (2 kernels)", (b, n, c, r), torch.float16, t_m, t_t, nbytes, flops, ceil,
                note="bipartite_best + merge_rows + torch glue")


@guard("gather_tokens")
def time_gather(dev, smoke, ceil):
    """cls / random keep step: ops.gather_tokens, and the whole keep step (ops.keep_top)."""
    gen = torch.Generator(device=dev).manual_seed(6)
    print("kept-token gather (ops.gather_tokens) and keep step (ops.keep_top)")
    for b, n, c, k in ([(2, 64, 32, 20)] if smoke else [(256, 196, 768, 98), (1, 196, 768, 98), (8, 16384, 768, 4096)]):
        x = randn(b, 1 + n, c, dtype=torch.float16, dev=dev, gen=gen)
        keep = torch.rand(b, n, device=dev, generator=gen).topk(k, 1).indices.sort(1).values
        t_k, t_t = on_off(lambda: ops.gather_tokens(TokenState.start(x, 1), keep), dev)
        row("gather_tokens step", (b, n, c, k), torch.float16, t_k, t_t, 2 * b * (1 + k) * c * 2, 0, ceil,
            note="whole ops.gather_tokens incl. source map; bytes = kept rows read + written")
    for b, n, c, k in ([(2, 64, 32, 20)] if smoke else [(256, 196, 768, 98), (1, 196, 768, 98), (1, 576, 1024, 58),
                                                        (16, 576, 1024, 144), (4, 1000, 384, 250)]):
        x = randn(b, 1 + n, c, dtype=torch.float16, dev=dev, gen=gen)
        scores = torch.rand(b, n, device=dev, generator=gen).argsort(1).float() / n  # distinct per row
        sizes = torch.randint(1, 4, (b, 1 + n), device=dev, generator=gen).float()

        def step():
            st = TokenState.start(x, 1)
            st.sizes = sizes
            return ops.keep_top(st, scores, k)
        t_k, t_t = on_off(step, dev)
        row("keep_top step", (b, n, c, k), torch.float16, t_k, t_t, 2 * b * (1 + k) * c * 2, 0, ceil,
            note="top-k + gather + sizes + source map in one launch vs topk/sort/gather/cat/scatter")


@guard("apet")
def time_apet(dev, smoke, ceil):
    from tokenprune.plan import Stage
    from tokenprune.reducers.apet import Apet, reconstruction_error
    gen = torch.Generator(device=dev).manual_seed(4)
    print("ApET reconstruction error and reduce step")
    for b, n, c, k in ([(2, 33, 40, 5)] if smoke else [(256, 196, 768, 10), (1, 196, 768, 10), (8, 4096, 768, 10)]):
        x = randn(b, n, c, dtype=torch.float16, dev=dev, gen=gen)
        basis = x[:, :k].clone()
        t_k, t_t = on_off(lambda: kernels.apet_errors(x, basis), dev, lambda: reconstruction_error(x, basis))
        row("apet_errors", (b, n, c, k), torch.float16, t_k, t_t, b * n * c * 2 + b * n * 4, 4 * b * n * c * k, ceil,
            "matmul_float32_flops", note="float32 (ieee) products on the FMA units; FLOPs counted for k, the "
                                         "kernel pads k to 16 (1.6x the work at k=10)")
    for b, n, c, keep in ([(2, 40, 32, 15)] if smoke else [(256, 196, 768, 98), (1, 196, 768, 98)]):
        x = randn(b, 1 + n, c, dtype=torch.float16, dev=dev, gen=gen)
        red = Apet()
        t_k, t_t = on_off(lambda: red.reduce(TokenState.start(x, 1), Stage(0, keep, "apet"), None), dev)
        row("apet reduce step", (b, n, c, keep), torch.float16, t_k, t_t, b * (1 + n) * c * 2 + b * (1 + keep) * c * 2,
            0, ceil, note="whole Apet.reduce; bound = tokens read once + kept written once (the basis search and "
                          "cosine assignment read x more often)")


@guard("apet_stage")
def time_apet_stage(dev, smoke, ceil):
    """Basis + errors of one ApET stage from the Gram matrix against the x-based path (farthest_point_basis +
    reconstruction_error), and the cosine assignment from G against normalise + bmm + argmax."""
    from tokenprune.reducers.apet import farthest_point_basis, reconstruction_error
    gen = torch.Generator(device=dev).manual_seed(7)
    print("ApET stage from the Gram matrix (gram, apet_stage, apet_assign)")
    for b, n, c, k in ([(2, 40, 32, 4)] if smoke else [(256, 196, 768, 10), (1, 196, 768, 10)]):
        x = randn(b, 1 + n, c, dtype=torch.float16, dev=dev, gen=gen)
        xs = x[:, 1:]
        valid = torch.ones(b, n, dtype=torch.bool, device=dev)

        def gram_stage():
            return kernels.apet_stage(kernels.gram(xs)[0], valid, k)

        def x_based():
            basis = farthest_point_basis(xs, k, valid)
            return reconstruction_error(xs, xs.gather(1, basis[..., None].expand(b, k, c)))
        t_k, t_t = on_off(gram_stage, dev, x_based)
        with kernels_on(True):
            t_x = ms(x_based, dev)
        nbytes = b * n * c * 2 + 2 * b * n * n * 4 + b * n * 4
        row("apet stage (Gram + one-program FPS/solve)", (b, n, c, k), torch.float16, t_k, t_t, nbytes,
            2 * b * n * n * c, ceil, note=f"basis + errors; torch = farthest_point_basis + reconstruction_error "
                                          f"(x-based); with the apet_errors kernel {t_x * 1e3:.1f} us; bytes = x read "
                                          f"once + G written and read once")
        keep = torch.rand(b, n, device=dev, generator=gen).topk(n // 2, 1).indices.sort(1).values
        g = kernels.gram(xs)[0]

        def cos_assign():  # what Apet.reduce's x-based path does for the assignment
            xn = xs / xs.float().norm(dim=-1, keepdim=True).clamp_min(1e-6).to(xs.dtype)
            kept_n = xn.gather(1, keep[..., None].expand(b, n // 2, c))
            target = torch.bmm(xn, kept_n.transpose(1, 2)).argmax(-1)
            return target.scatter_(1, keep, torch.arange(n // 2, device=dev).expand(b, n // 2))
        t_a, t_c = on_off(lambda: kernels.apet_assign(g, keep), dev, cos_assign)
        row("apet assign (cos from G)", (b, n, c, n // 2), torch.float16, t_a, t_c, b * n * n * 4 + b * n * 8, 0, ceil,
            note="torch = normalise x, bmm with the kept rows, argmax; bytes = G read once + slots written")


# -- report ---------------------------------------------------------------------------------------------
def markdown() -> str:
    lines = ["# gpu_kernels.py results", "", f"device: {RESULTS.get('device')}; torch {torch.__version__}", ""]
    c = RESULTS.get("ceilings")
    if c:
        lines += [f"copy bandwidth {c['bandwidth_Bps'] / 1e12:.2f} TB/s (read+write), "
                  f"fp16 matmul {c['matmul_float16_flops'] / 1e12:.0f} TFLOP/s, "
                  f"bf16 matmul {c['matmul_bfloat16_flops'] / 1e12:.0f} TFLOP/s, "
                  f"fp32 matmul (no tf32) {c['matmul_float32_flops'] / 1e12:.0f} TFLOP/s", ""]
    if RESULTS.get("timing"):
        lines += ["## Kernels: time vs PyTorch path and roofline bound (eager, tokenprune.bench.time_fn)", "",
                  "| kernel | shape | dtype | kernel us | PyTorch us | speed-up | MB | GFLOP | bound us | % of bound |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in RESULTS["timing"]:
            lines.append(f"| {r['kernel']} | {r['shape']} | {r['dtype']} | {r['t_kernel_ms'] * 1e3:.1f} | "
                         f"{r['t_torch_ms'] * 1e3:.1f} | {r['speedup']:.2f} | {r['bytes'] / 1e6:.1f} | "
                         f"{r['flops'] / 1e9:.2f} | {r['bound_ms'] * 1e3:.1f} | {r['pct_of_bound']:.0f}% |")
        lines.append("")
    if RESULTS["errors"]:
        lines += ["## Errors", ""] + [f"- {e}" for e in RESULTS["errors"]]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_kernels.json and gpu_kernels.md")
    ap.add_argument("--smoke", action="store_true", help="CPU, PyTorch paths only, tiny sizes")
    ap.add_argument("--skip", default="", help=f"comma list of sections to skip: {','.join(SECTIONS)}")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1 if args.smoke else max(1, os.cpu_count() or 1))
    dev = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if dev.type == "cpu" and not args.smoke:
        print("no CUDA device: running the smoke version")
        args.smoke = True
    smoke = args.smoke
    skip = set(filter(None, args.skip.split(",")))
    for name in skip & set(REMOVED):  # sections of earlier versions (BENCHMARKS.md cites `--skip e2e,long`)
        print(f"--skip {name}: no longer here ({REMOVED[name]})")
    RESULTS["device"] = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu"
    RESULTS["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        RESULTS["versions"]["triton"] = triton.__version__
    except Exception:
        pass
    RESULTS["triton_in_use"] = bool(dev.type == "cuda" and kernels._impl())
    ceil = ceilings(dev, smoke)
    parts = {"ea": time_efficient_attention, "ba": time_biased_attention, "qs": time_query_scores,
             "bipartite": time_bipartite, "gather": time_gather, "apet": time_apet, "apet_stage": time_apet_stage}
    for name, fn in parts.items():
        if name not in skip:
            fn(dev, smoke, ceil)
    RESULTS["wall_s"] = time.time() - T0
    (out_dir / "gpu_kernels.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    (out_dir / "gpu_kernels.md").write_text(markdown())
    print("\n=== summary ===")
    for r in RESULTS.get("timing", []):
        print(f"{r['kernel']:<22} {str(r['shape']):<24} {r['t_kernel_ms'] * 1e3:8.1f} us vs torch "
              f"{r['t_torch_ms'] * 1e3:8.1f} us  {r['pct_of_bound']:5.1f}% of bound")
    print(f"errors: {len(RESULTS['errors'])}; wall {RESULTS['wall_s']:.0f} s")
    return 1 if RESULTS["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
