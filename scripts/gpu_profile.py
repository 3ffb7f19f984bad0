"""Where the time goes (issue 6): linear-attention variants, SDPA with a key bias, reducer profiles.

    python scripts/gpu_profile.py --out DIR            # H100: about 5 minutes
    python scripts/gpu_profile.py --out DIR --only ea  # one part: ea, ba, sdpa, profile, profile1, am, floor, qs, blockn, fixed, ms, pa, pe, gemmw, foldpad, bast, mres

Parts:
- ``ea``: the efficient (linear) attention kernel per shape, timed two ways -- one eager call from
  Python per repetition (``do_bench``: host launch overhead included when the GPU work is shorter
  than the launches) and replayed from a CUDA graph (``do_bench_cudagraph``: the GPU time alone) --
  with the time of each of its kernels, for a grid of variants (programs per SM, pipelining depth,
  pass-1 tile, context rows per program). Bound = bytes / copy bandwidth measured in the same run.
- ``sdpa``: ViT-B shaped SDPA (B256 H12 d64) without a mask on flash, and with the [B,1,1,N]
  log-size key bias of proportional attention on each backend that accepts it.
- ``profile``: kernel-time tables of vit_base fp16 bs 256 forwards (unreduced, merge, cls, apet).
- ``floor``: the same block sequence at the reduced token counts with a free reduction (keep the
  first K tokens: one slice), at bs 256 and bs 1 (eager and CUDA graph) -- the time a reducer
  with zero cost would take, next to the FLOP-proportional time the overhead target uses.
- ``qs``: query_scores block sizes per shape.
- ``ms``: merge_step at large batch, one launch vs matching + _merge_gather, and ViT-B merge forwards.
- ``fixed``: the unreduced ViT-B's time outside its blocks (patch embedding, head), cudnn.benchmark off/on.
- ``blockn``: one ViT-B block at bs 256 at every token count 20-197 (block, SDPA, MLP, qkv), and the
  schedule floors predicted from it.
- ``pa``: proportional attention as SDPA without a mask on size-weighted values [w v, w] (numerator and
  denominator in one call), against the fused key-bias kernel and FlexAttention.
- ``gemmw``: the qkv product's width (2304, + the folded key mean, + zero rows) and 2304 + ``k.mean(1)``.
- ``foldpad``: ViT-B merge at bs 256 with the key mean from ``k.mean(1)``, folded, and folded with zero rows.
- ``bast``: the key-bias attention kernel's pipelining depth per tile at ViT-B merge token counts.
- ``mres``: one merge step at bs 256 after a block's residual add, against the step that reads the
  two halves of the add itself (``residual=``), and ViT-B merge forwards with and without it.
- ``pe``: the patch-embedding convolution on cuDNN (NCHW, channels-last) against patches + one GEMM, and
  whole ViT-B forwards with each stem.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tokenprune  # noqa: E402
from gpu_kernels import graph_fn, make_vit  # noqa: E402  (same directory)
from tokenprune.kernels import reference  # noqa: E402
from tokenprune.plan import Stage  # noqa: E402
from tokenprune.registry import register  # noqa: E402
from tokenprune.reducers.base import Reducer  # noqa: E402

OUT: dict = {"env": {}, "errors": []}


def log(*a):
    print(*a, flush=True)


def profiled(fn, reps):
    """torch.profiler rows ``(name, launches, total GPU us)`` of ``reps`` calls of ``fn`` (after one warm-up)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            yield e.key, e.count, t


def kernel_times(fn, reps=20):
    """Mean GPU microseconds per call of each CUDA kernel ``fn`` launches (torch.profiler)."""
    rows = {name[:60]: round(t / reps, 2) for name, _, t in profiled(fn, reps)}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]))


def ea_variants(d, base, quick):
    """Pass-1 variants per head dim: the online-softmax loop (sub=0) and the max-first loops over
    ``sub`` tiles, with tiles, warps, programs per SM, rows per program and the split policy."""
    if quick == "fixed":  # the defaults, and one fixed shift per row from the first tile (no online rescaling)
        tiles = ((128, 4), (64, 4), (128, 8), (64, 8)) if d == 64 else ((64, 8), (32, 8), (64, 4))
        return [{}] + [{"fixed": True, "sub": 0, "dual": False, "pass1": p1, "ones_l": ol, "programs_per_sm": pps}
                       for p1, ol, pps in itertools.product(tiles, (False, True), (2, 4))]
    if quick == "split":  # the fixed shift: how far N is split (programs per SM, shortest chunk), pass-2 tiles
        pps_all = (1, 2, 3, 4) if d == 64 else (1, 2)
        out = [{}] + [{"programs_per_sm": pps, "min_chunk": mc} for pps, mc in itertools.product(pps_all, (512, 256, 128))
                      if (pps, mc) != (base["programs_per_sm"][d], base["min_chunk"])]
        p2 = ((64, 4), (128, 4), (256, 8), (64, 2)) if d == 64 else ((32, 4), (64, 8), (128, 8), (32, 2))
        return out + [{"pass2": t} for t in p2 if t != base["pass2"][d]]
    if quick == "jump":  # the defaults alone (with the keys that jump, below)
        return [{}]
    if quick == "fixed2":  # the fixed shift: pipelining depth, register cap (more programs per SM) and split
        tile, ol = ((64, 4), False) if d == 64 else ((64, 8), True)
        fx = {"fixed": True, "sub": 0, "dual": False, "pass1": tile, "ones_l": ol}
        caps = (None, 168, 128) if d == 64 else (None, 128)
        return [{}] + [{**fx, "stages": (st, None), "maxnreg1": cap,
                        "programs_per_sm": pps * (1 if cap is None else 65536 // (cap * 32 * tile[1]))}
                       for st, cap, pps in itertools.product((None, 2, 4), caps, (1, 2))
                       if not (cap is not None and pps == 2)]
    if quick == "rows":  # the defaults, and half the context rows per pass-1 program (V read by two programs)
        if d == 64:
            return [{}] + [{"sub": 0, "rows1": 32, "pass1": p1, "ones_l": ol, "programs_per_sm": pps}
                           for p1, ol, pps in (((128, 4), False, 2), ((128, 4), False, 4), ((64, 4), False, 4),
                                               ((128, 8), False, 2), ((128, 8), False, 4), ((64, 4), True, 4))]
        return [{}] + [{"sub": 0, "rows1": 64, "pass1": p1, "ones_l": True, "programs_per_sm": pps}
                       for p1, pps in (((64, 8), 2), ((64, 8), 4), ((128, 8), 2), ((128, 8), 4))]
    if quick:  # the defaults, and the split combine's tile shape
        return [{}] + [{"combine_rows": r, "combine_tile": t} for r, t in ((16, 4096), (4, 16384), (16, 16384))]
    out = []
    if d == 64:
        for pps, fill in itertools.product([2, 3, 4], [False, True]):
            out.append({"sub": 0, "pass1": (128, 4), "programs_per_sm": pps, "split_fill": fill, "ones_l": False})
        for sub, p1, ol, pps in itertools.product([4, 8], [(64, 4), (64, 8), (128, 8)], [False, True], [1, 2]):
            out.append({"sub": sub, "pass1": p1, "ones_l": ol, "programs_per_sm": pps, "split_fill": True})
    else:
        for pps, fill in itertools.product([2, 4], [False, True]):
            out.append({"sub": 0, "pass1": (64, 4), "programs_per_sm": pps, "split_fill": fill, "ones_l": True,
                        "rows1": 128})
        for sub, p1, rows, pps in itertools.product([4, 8], [(64, 4), (64, 8)], [128, 64], [1, 2]):
            out.append({"sub": sub, "pass1": p1, "rows1": rows, "ones_l": True, "programs_per_sm": pps,
                        "split_fill": True})
    return out


def part_ea(bw, quick):
    import triton.testing

    from tokenprune.kernels import triton_impl as T
    base = {k: (dict(v) if isinstance(v, dict) else v) for k, v in T.EA_CONFIG.items()}
    shapes = {64: [(1, 12, 8192), (4, 12, 8192), (1, 12, 16384), (1, 12, 65536)],
              128: [(1, 16, 8192), (2, 16, 16384), (1, 16, 65536)]}
    g = torch.Generator(device="cuda").manual_seed(0)
    res = []
    for d, shp in shapes.items():
        data = []
        for (b, h, n) in shp:
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
            ref = reference.efficient_attention(q.float(), k.float(), v.float(), None) if n <= 16384 else None
            data.append(((b, h, n), q, k, v, ref))
        for var in ea_variants(d, base, quick):
            for kk, vv in var.items():
                T.EA_CONFIG[kk] = {**base[kk], d: vv} if isinstance(base[kk], dict) else vv
            cfg = {"d": d, **var, "shapes": []}
            try:
                for (shape, q, k, v, ref) in data:
                    fn = lambda: T.efficient_attention(q, k, v, None)  # noqa: E731
                    out = fn()
                    err = None if ref is None else float((out.float() - ref).norm() / ref.norm())
                    if err is not None and not err < 1e-2:
                        raise ValueError(f"rel err {err:.2e} at {shape}")
                    graph_us = 1e3 * triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
                    bound = 4 * shape[0] * shape[1] * shape[2] * d * 2 / bw * 1e6
                    cfg["shapes"].append({"shape": shape, "graph_us": round(graph_us, 1),
                                          "bound_us": round(bound, 1), "pct_graph": round(100 * bound / graph_us, 1),
                                          "err": err})
            except Exception as e:
                cfg["error"] = f"{type(e).__name__}: {str(e)[:100]}"
            res.append(cfg)
            for kk in base:
                T.EA_CONFIG[kk] = base[kk]
            log("ea", d, var, cfg.get("error") or
                [(s["shape"][2], s["graph_us"], s["pct_graph"]) for s in cfg["shapes"]])
        for kk in base:
            T.EA_CONFIG[kk] = base[kk]
    # the best variant per d (sum of graph times) and its per-kernel breakdown
    best = {}
    fixed_modes = quick in ("fixed", "fixed2", "jump", "split")
    for d in shapes:
        ok = [r for r in res if r["d"] == d and "error" not in r]
        if fixed_modes:
            ok = [r for r in ok if r.get("fixed", T._cfg(base["fixed"], d))]
        if ok:
            best[d] = max(ok, key=lambda r: min(s["pct_graph"] for s in r["shapes"]))  # best worst case
    for d, r in best.items():
        for kk in base:
            if kk in r:
                T.EA_CONFIG[kk] = {**base[kk], d: r[kk]} if isinstance(base[kk], dict) else r[kk]
        r["kernels"], r["eager_us"] = {}, {}
        if fixed_modes:
            # keys that jump by 20 (exp(20) overflows float16): once after the middle (the one chunk holding it
            # redoes its loop online), and in every other 256 tokens (nearly every chunk redoes it: the worst case)
            for tag, sel in (("jump_once", lambda n: torch.arange(n) >= n // 2 + 100),
                             ("jump_every_256", lambda n: (torch.arange(n) % 512) >= 256)):
                r[tag] = {}
                for (b, h, n) in shapes[d]:
                    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
                    k[:, :, sel(n).cuda()] += 20
                    fn = lambda: T.efficient_attention(q, k, v, None)  # noqa: E731
                    out = fn()
                    row = {"graph_us": round(1e3 * triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median"), 1)}
                    if n <= 16384:
                        ref = reference.efficient_attention(q.float(), k.float(), v.float(), None)
                        row["err"] = float((out.float() - ref).norm() / ref.norm())
                    r[tag][f"B{b} H{h} N{n}"] = row
        for (b, h, n) in shapes[d]:
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
            fn = lambda: T.efficient_attention(q, k, v, None)  # noqa: E731
            r["kernels"][f"B{b} H{h} N{n}"] = kernel_times(fn)
            r["eager_us"][f"B{b} H{h} N{n}"] = round(1e3 * triton.testing.do_bench(fn, rep=50, return_mode="median"), 1)
        for kk in base:
            T.EA_CONFIG[kk] = base[kk]
        log("best d", d, json.dumps(r))
    OUT["ea"] = {"variants": res, "best": {str(k): v for k, v in best.items()}, "defaults": base}  # json.dump writes the int keys as strings


def part_ba():
    """The fused key-bias attention kernel against SDPA (unmasked and masked) at ViT-like shapes."""
    import triton.testing
    import torch.nn.functional as F

    from tokenprune.kernels import triton_impl as T
    rows = []
    base = dict(T.BA_CONFIG)
    for (b, h, n, d) in [(256, 12, 197, 64), (256, 12, 148, 64), (256, 12, 99, 64), (256, 12, 50, 64),
                         (1, 12, 197, 64), (64, 16, 577, 64), (16, 12, 1568, 64), (32, 16, 257, 128)]:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
        s = torch.rand(b, n, device="cuda") * 3 + 1
        s[:, 3::11] = 0  # padding keys
        bias = s.log()[:, None, None, :].half()
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias.double())
        r = {"shape": (b, h, n, d),
             "sdpa_nomask_us": round(1e3 * triton.testing.do_bench_cudagraph(
                 lambda: F.scaled_dot_product_attention(q, k, v), rep=20, return_mode="median"), 1),
             "sdpa_bias_us": round(1e3 * triton.testing.do_bench_cudagraph(
                 lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias), rep=20, return_mode="median"), 1)}
        # (session 4 also tried every key in one tile at N <= 320: slower everywhere, removed;
        # docs/gpu/profile_h100_run5_ba.json)
        variants = [(64, 64, 4), (128, 64, 8), (64, 32, 4), (128, 32, 4), (32, 64, 4)]
        if n <= 320:
            variants += [(64, 128, 4), (64, 128, 8)]
        for bm, bn, w in variants:
            T.BA_CONFIG.update(short=(bm, bn, w), long=(bm, bn, w), wide=None)
            try:
                out = T.biased_attention(q, k, v, bias)
                err = float((out.double() - ref).norm() / ref.norm())
                us = 1e3 * triton.testing.do_bench_cudagraph(lambda: T.biased_attention(q, k, v, bias), rep=20,
                                                             return_mode="median")
                r[f"triton_{bm}x{bn}w{w}_us"] = round(us, 1)
                r[f"triton_{bm}x{bn}w{w}_err"] = err
            except Exception as e:
                r[f"triton_{bm}x{bn}w{w}_error"] = f"{type(e).__name__}: {str(e)[:80]}"
        T.BA_CONFIG.update(base)
        rows.append(r)
        log("ba", r)
    OUT["ba"] = rows


def part_sdpa():
    import triton.testing
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rows = []
    for n in (197, 148, 99):
        q, k, v = (torch.randn(256, 12, n, 64, device="cuda", dtype=torch.float16) for _ in range(3))
        s = torch.rand(256, n, device="cuda") * 3 + 1
        bias = s.log()[:, None, None, :].half()
        bias_full = bias.expand(256, 12, n, n)
        cases = [("default, no mask", None, None), ("flash, no mask", SDPBackend.FLASH_ATTENTION, None),
                 ("cudnn, no mask", SDPBackend.CUDNN_ATTENTION, None),
                 ("default, bias [B,1,1,N]", None, bias), ("efficient, bias", SDPBackend.EFFICIENT_ATTENTION, bias),
                 ("cudnn, bias [B,1,1,N]", SDPBackend.CUDNN_ATTENTION, bias),
                 ("cudnn, bias expanded [B,H,N,N] view", SDPBackend.CUDNN_ATTENTION, bias_full)]
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float())
        for name, be, m in cases:
            def fn():
                if be is None:
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            try:
                out = fn()
                err = float((out.float() - ref).norm() / ref.norm()) if m is not None else None
                us = 1e3 * triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
                rows.append({"n": n, "case": name, "us": round(us, 1), "err_vs_fp32_biased": err})
            except Exception as e:
                rows.append({"n": n, "case": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            log("sdpa", rows[-1])
    OUT["sdpa"] = rows


@register("first_k")
@dataclass
class FirstK(Reducer):
    """Free reduction for the floor measurement: keep the first K tokens (one slice)."""
    layers: list[int] | None = None
    stages_from: str = "cls"

    def schedule(self, info, keep):
        from tokenprune.registry import get
        return [Stage(s.block, s.keep, self.name) for s in get(self.stages_from)().schedule(info, keep)]

    def reduce(self, state, stage, qk):
        p = state.num_prefix
        state.x = state.x[:, :p + stage.keep]
        state.sizes = None if state.sizes is None else state.sizes[:, :p + stage.keep]
        state.source = None
        return state


def vit():
    return make_vit(torch.device("cuda"), smoke=False)[0]  # vit_base_patch16_224, fp16, eval, seed 0


def part_profile():
    model = vit()
    x = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.float16)
    tabs = {}
    with torch.inference_mode():
        for method, opts in [("none", {}), ("merge", {}), ("merge", {"prop_attn": False}), ("cls", {}), ("apet", {})]:
            tokenprune.remove(model)
            if method != "none":
                tokenprune.apply(model, budget=0.25, method=method, **opts)
            key = method + ("[" + ",".join(f"{k}={v}" for k, v in opts.items()) + "]" if opts else "")
            kt = kernel_times(lambda: model(x), reps=3)
            tabs[key] = {"total_us": round(sum(kt.values()), 1), "top": dict(list(kt.items())[:25])}
            log("profile", key, tabs[key]["total_us"], list(kt.items())[:8])
    tokenprune.remove(model)
    OUT["profile"] = tabs


def kernel_table(fn, reps=10):
    """Per CUDA kernel: launches per call and mean GPU microseconds per call (torch.profiler)."""
    rows = {name[:70]: (round(c / reps, 1), round(t / reps, 2)) for name, c, t in profiled(fn, reps) if c >= reps}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1][1]))

def part_am():
    """apet_merge tile variants (slots per tile, programs per SM) at ViT-B sizes, GPU time from graph replay."""
    import triton.testing

    from tokenprune.kernels import triton_impl as T
    base = (T.APET_MERGE_BK, T.APET_MERGE_PROGRAMS_PER_SM)
    rows = []
    for b in (256, 1):
        n, c, k = 196, 768, 98
        x = torch.randn(b, 1 + n, c, device="cuda", dtype=torch.float16)
        sz = torch.randint(1, 4, (b, 1 + n), device="cuda").float()
        kidx = torch.rand(b, n, device="cuda").topk(k, 1).indices.sort(1).values
        tgt = torch.randint(0, k, (b, n), device="cuda")
        tgt.scatter_(1, kidx, torch.arange(k, device="cuda").expand(b, k))
        src = torch.arange(1 + n, device="cuda").expand(b, 1 + n).contiguous()
        for bk, pps in itertools.product((64, 128), (1, 2, 4, 8)):
            T.APET_MERGE_BK, T.APET_MERGE_PROGRAMS_PER_SM = bk, pps
            us = 1e3 * triton.testing.do_bench_cudagraph(lambda: T.apet_merge(x, sz, tgt, kidx, src, 1, 1 + n),
                                                         rep=20, return_mode="median")
            rows.append({"batch": b, "bk": bk, "programs_per_sm": pps, "us": round(us, 1)})
            log("am", rows[-1])
    T.APET_MERGE_BK, T.APET_MERGE_PROGRAMS_PER_SM = base
    OUT["am"] = rows


def part_profile1():
    """bs 1: what each reducer launches per forward (count, GPU time) next to the free floor."""
    model = vit()
    x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.float16)
    tabs = {}
    with torch.inference_mode():
        for method, opts in [("none", {}), ("first_k", {"stages_from": "cls"}), ("cls", {}), ("random", {}),
                             ("first_k", {"stages_from": "merge"}), ("merge", {}), ("apet", {})]:
            tokenprune.remove(model)
            if method != "none":
                tokenprune.apply(model, budget=0.25, method=method, **opts)
            key = method + ("[" + ",".join(f"{k}={v}" for k, v in opts.items()) + "]" if opts else "")
            kt = kernel_table(lambda: model(x))
            tabs[key] = {"launches": round(sum(c for c, _ in kt.values()), 1),
                         "kernel_us": round(sum(t for _, t in kt.values()), 1), "kernels": kt}
            log("profile1", key, tabs[key]["launches"], tabs[key]["kernel_us"], list(kt.items())[:12])
    tokenprune.remove(model)
    OUT["profile1"] = tabs


def part_floor():
    import triton.testing
    model = vit()
    res = []
    with torch.inference_mode():
        for bs in (256, 1):
            x = torch.randn(bs, 3, 224, 224, device="cuda", dtype=torch.float16)
            cfgs = [("none", {}), ("cls", {}), ("first_k", {"stages_from": "cls"}), ("random", {}),
                    ("merge", {}), ("merge", {"prop_attn": False}), ("first_k", {"stages_from": "merge"}),
                    ("merge", {"kernels": "off"}),
                    ("merge", {"layers": [2, 5, 8]}), ("first_k", {"layers": None, "stages_from": "apet"}), ("apet", {}),
                    ("apet", {"kernels": "off"}), ("cls", {"track_source": False}),
                    ("merge", {"layers": [2, 5, 8], "track_source": False})]
            t0 = None
            for method, opts in cfgs:
                tokenprune.remove(model)
                ratio = 1.0
                os.environ["TOKENPRUNE_KERNELS"] = opts.pop("kernels", "1")
                if method != "none":
                    tokenprune.apply(model, budget=0.25, method=method, **opts)
                    ratio = tokenprune.plan(model).flop_ratio
                if os.environ["TOKENPRUNE_KERNELS"] != "1":
                    opts = dict(opts, kernels=os.environ["TOKENPRUNE_KERNELS"])
                key = method + ("[" + ",".join(f"{k}={v}" for k, v in opts.items()) + "]" if opts else "")
                eager = triton.testing.do_bench(lambda: model(x), rep=300 if bs == 1 else 500, return_mode="median")
                g = graph_fn(model, x) if bs == 1 else None  # a replay callable, or the capture error
                graph = triton.testing.do_bench(g, rep=300, return_mode="median") if callable(g) else None
                if isinstance(g, str):
                    OUT["errors"].append(f"floor graph {key}: {g}")
                if method == "none":
                    t0 = (eager, graph)
                r = {"batch": bs, "method": key, "flop_ratio": round(ratio, 4), "eager_ms": round(eager, 4),
                     "graph_ms": None if graph is None else round(graph, 4),
                     "overhead_eager_pct": round(100 * (eager - t0[0] * ratio) / (t0[0] * ratio), 1)}
                if graph is not None and t0[1]:
                    r["overhead_graph_pct"] = round(100 * (graph - t0[1] * ratio) / (t0[1] * ratio), 1)
                res.append(r)
                log("floor", r)
    tokenprune.remove(model)
    OUT["floor"] = res


def part_qs():
    """query_scores keys per program per shape, GPU time from graph replay; k a strided view of a qkv
    tensor, as in a model. (Session 4 also swept 2-12 heads per program: slower everywhere, removed;
    docs/gpu/profile_h100_run5_qs_blockn.json.)"""
    import triton.testing

    from tokenprune.kernels import triton_impl as T
    base = dict(T.QS_CONFIG)
    rows = []
    for b, h, n in ((256, 12, 197), (1, 12, 197), (64, 12, 577), (16, 16, 577), (8, 12, 16384), (1, 12, 16384)):
        qkv = torch.randn(b, n, 3, h, 64, device="cuda", dtype=torch.float16).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        for bn in (64, 128, 256):
            T.QS_CONFIG.update(short=bn, long_n=1 << 62)
            us = 1e3 * triton.testing.do_bench_cudagraph(lambda: T.query_scores(q[:, :, 0], k, 0.125),
                                                         rep=20, return_mode="median")
            rows.append({"shape": [b, h, n], "block_n": bn, "us": round(us, 1)})
        T.QS_CONFIG.clear()
        T.QS_CONFIG.update(base)
        rows.append({"shape": [b, h, n], "default": True, "us": round(1e3 * triton.testing.do_bench_cudagraph(
            lambda: T.query_scores(q[:, :, 0], k, 0.125), rep=20, return_mode="median"), 1)})
        best = min((r for r in rows if r["shape"] == [b, h, n] and "block_n" in r), key=lambda r: r["us"])
        log("qs", (b, h, n), "best", best, "default", rows[-1]["us"])
    OUT["qs"] = rows


def part_ms():
    """merge_step at large batch: one launch against matching + _merge_gather (two launches), with and
    without the matching's register cap, graph replay, checked against the one-launch output; then ViT-B
    merge forwards at bs 256 with the best split and without."""
    import triton.testing

    from tokenprune.kernels import triton_impl as T
    base = T.MERGE_STEP_SPLIT
    # history: run 13 (session 5) swept _merge_apply, the rows per column tile; run 25 swept the gather's
    # rows (4-32), columns (128-1024), warps (2-8) and fix-up tiles (64 / 128); run 28 timed _merge_apply
    # against the gather: 99.5 / 110.5 / 46.9 / 51.2 / 28.8 / 17.3 us at the shapes below, then removed
    # (docs/gpu/profile_h100_run13_ms.json, profile_h100_run25_ms.json, profile_h100_run28_ms.json)
    variants = [None, {}, {"mmaxnreg": None}, {"mwarps": 4, "mmaxnreg": None}]
    rows, best = [], {}
    for b, n, r in ((256, 196, 13), (256, 196, 48), (256, 98, 13), (128, 196, 13), (64, 196, 13), (32, 196, 13)):
        gen = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(b, 1 + n, 768, device="cuda", dtype=torch.float16, generator=gen)
        metric = torch.randn(b, 1 + n, 64, device="cuda", dtype=torch.float16, generator=gen)
        sizes = torch.randint(1, 4, (b, 1 + n), device="cuda", generator=gen).float()
        src = torch.arange(1 + n, device="cuda").expand(b, 1 + n).contiguous()
        ref = None
        for v in variants:
            T.MERGE_STEP_SPLIT = None if v is None else {**base, **v, "min_batch": 1}
            out = T.merge_step(x, metric, sizes, src, 1, r, False, max_size=197)
            if ref is None:
                ref = out
            ok = all(torch.equal(o, q) if o.dtype != torch.float16 else
                     float((o.float() - q.float()).norm() / q.float().norm()) < 1e-3 for o, q in zip(out, ref))
            us = 1e3 * triton.testing.do_bench_cudagraph(
                lambda: T.merge_step(x, metric, sizes, src, 1, r, False, max_size=197), rep=20, return_mode="median")
            rows.append({"batch": b, "n": n, "r": r, "split": v, "us": round(us, 1), "matches_one_launch": ok})
            log("ms", rows[-1])
        best[(b, n, r)] = min((rw for rw in rows
                               if (rw["batch"], rw["n"], rw["r"]) == (b, n, r) and rw["matches_one_launch"]),
                              key=lambda rw: rw["us"])
    T.MERGE_STEP_SPLIT = base
    # where the default's step time goes, per kernel (profiler, 20 calls)
    kern = {}
    for b, n, r in ((256, 196, 13), (256, 196, 48), (256, 98, 13)):
        x = torch.randn(b, 1 + n, 768, device="cuda", dtype=torch.float16)
        metric = torch.randn(b, 1 + n, 64, device="cuda", dtype=torch.float16)
        sizes = torch.randint(1, 4, (b, 1 + n), device="cuda").float()
        src = torch.arange(1 + n, device="cuda").expand(b, 1 + n).contiguous()
        kern[f"B{b} N{n} r{r}"] = kernel_times(lambda: T.merge_step(x, metric, sizes, src, 1, r, False, max_size=197))
        log("ms kernels", b, n, r, kern[f"B{b} N{n} r{r}"])
    OUT["ms_kernels"] = kern
    pick = best[(256, 196, 13)]["split"]
    e2e = []
    model = vit()
    x = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        for budget in (0.5, 0.25, 0.1):
            tokenprune.remove(model)
            t0 = 1e3 * triton.testing.do_bench_cudagraph(lambda: model(x), rep=200, return_mode="median")
            tokenprune.apply(model, budget=budget, method="merge")
            ratio = tokenprune.plan(model).flop_ratio
            for name, v in (("one launch", None), ("split", pick), ("default", base)):
                T.MERGE_STEP_SPLIT = None if v is None else {**base, **v, "min_batch": 64}
                t = 1e3 * triton.testing.do_bench_cudagraph(lambda: model(x), rep=200, return_mode="median")
                e2e.append({"budget": budget, "variant": name, "split": v, "ms": round(t / 1e3, 3),
                            "unreduced_ms": round(t0 / 1e3, 3), "flop_ratio": round(ratio, 4),
                            "overhead_pct": round(100 * (t / (t0 * ratio) - 1), 1)})
                log("ms e2e", e2e[-1])
    T.MERGE_STEP_SPLIT = base
    tokenprune.remove(model)
    OUT["ms"] = {"rows": rows, "e2e": e2e}


def part_gemmw():
    """The qkv product's width at ViT-B sizes (C=768, bs 256): 2304 columns (q, k, v), 2368 (+ the d=64
    rows of the folded head-mean key), and that padded with zero rows to 2432 / 2496 / 2560; next to the
    2304-wide product plus ``k.mean(1)`` over the strided keys (the unfolded metric). Graph replay."""
    import torch.nn.functional as F
    import triton.testing
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (197, 148, 99, 60):
        x = torch.randn(256 * n, 768, device="cuda", dtype=torch.float16, generator=g)
        r = {"tokens": n}
        for cols in (2304, 2368, 2432, 2496, 2560):
            w = torch.randn(cols, 768, device="cuda", dtype=torch.float16, generator=g) * 0.02
            bias = torch.zeros(cols, device="cuda", dtype=torch.float16)
            r[f"linear_{cols}_us"] = round(1e3 * triton.testing.do_bench_cudagraph(
                lambda: F.linear(x, w, bias), rep=50, return_mode="median"), 1)
        w = torch.randn(2304, 768, device="cuda", dtype=torch.float16, generator=g) * 0.02
        bias = torch.zeros(2304, device="cuda", dtype=torch.float16)

        def kmean():
            qkv = F.linear(x, w, bias).reshape(256, n, 3, 12, 64).permute(2, 0, 3, 1, 4)
            return qkv[1].mean(1)
        r["linear_2304_kmean_us"] = round(1e3 * triton.testing.do_bench_cudagraph(kmean, rep=50,
                                                                                   return_mode="median"), 1)
        rows.append(r)
        log("gemmw", r)
    OUT["gemmw"] = rows


def part_foldpad():
    """ViT-B merge at bs 256 (graph replay, fp16, GEMM stem): the head-mean key from k.mean(1)
    (TOKENPRUNE_FOLD=0), folded into the qkv product (2368 columns), and folded with zero rows up to a
    multiple of 128 / 192 columns; three alternating rounds, each against the unreduced model."""
    import triton.testing

    from tokenprune.adapters import timm_vit
    model = vit()
    tokenprune.fast_patch_embed(model)
    x = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.float16)
    variants = (("kmean", "0", 1), ("fold", "1", 1), ("fold_pad128", "1", 128), ("fold_pad192", "1", 192))
    rows = []
    with torch.inference_mode():
        for budget in (0.5, 0.25, 0.1):
            res = {name: [] for name, _, _ in variants}
            res["unreduced"] = []
            for _ in range(3):
                tokenprune.remove(model)
                res["unreduced"].append(triton.testing.do_bench_cudagraph(lambda: model(x), rep=100,
                                                                          return_mode="median"))
                for name, fold, mult in variants:
                    os.environ["TOKENPRUNE_FOLD"] = fold
                    timm_vit.FOLD_ROWS_MULTIPLE = mult
                    tokenprune.remove(model)
                    tokenprune.apply(model, budget=budget, method="merge")
                    ratio = tokenprune.plan(model).flop_ratio
                    res[name].append(triton.testing.do_bench_cudagraph(lambda: model(x), rep=100,
                                                                       return_mode="median"))
            t0 = min(res["unreduced"])
            row = {"budget": budget, "flop_ratio": round(ratio, 4), "unreduced_ms": [round(t, 3) for t in res["unreduced"]]}
            for name, _, _ in variants:
                row[name + "_ms"] = [round(t, 3) for t in res[name]]
                row[name + "_overhead_pct"] = round(100 * (min(res[name]) / (t0 * ratio) - 1), 1)
            rows.append(row)
            log("foldpad", row)
    os.environ.pop("TOKENPRUNE_FOLD", None)
    timm_vit.FOLD_ROWS_MULTIPLE = 1
    tokenprune.remove(model)
    OUT["foldpad"] = rows


def part_bast():
    """The key-bias attention kernel's software-pipelining depth per tile, at the token counts of a
    ViT-B merge schedule (B256 H12 d64), graph replay, against SDPA without a mask (flash)."""
    import torch.nn.functional as F
    import triton.testing

    from tokenprune.kernels import triton_impl as T
    base = dict(T.BA_CONFIG)
    rows = []
    for n in (197, 148, 99, 50):
        q, k, v = (torch.randn(256, 12, n, 64, device="cuda", dtype=torch.float16) for _ in range(3))
        bias = (torch.rand(256, n, device="cuda") * 3 + 1).log()[:, None, None, :].half()
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float())
        r = {"n": n, "sdpa_nomask_us": round(1e3 * triton.testing.do_bench_cudagraph(
            lambda: F.scaled_dot_product_attention(q, k, v), rep=20, return_mode="median"), 1)}
        for (bm, bn, w), st in itertools.product(((64, 32, 4), (64, 64, 4), (128, 32, 8), (32, 32, 2)), (None, 1, 2, 3, 4)):
            T.BA_CONFIG.update(short=(bm, bn, w), long=(bm, bn, w), stages=st, wide=None)
            key = f"{bm}x{bn}w{w}s{st}"
            try:
                out = T.biased_attention(q, k, v, bias)
                err = float((out.float() - ref).norm() / ref.norm())
                if not err < 1e-2:
                    raise ValueError(f"rel err {err:.2e}")
                r[key] = round(1e3 * triton.testing.do_bench_cudagraph(lambda: T.biased_attention(q, k, v, bias),
                                                                       rep=20, return_mode="median"), 1)
            except Exception as e:
                r[key + "_error"] = f"{type(e).__name__}: {str(e)[:80]}"
        T.BA_CONFIG.clear()
        T.BA_CONFIG.update(base)
        rows.append(r)
        log("bast", r)
    OUT["bast"] = rows
    # 64- against 128-query tiles at every token count of a ViT-B schedule (and the default's choice)
    rows = []
    for n in list(range(20, 200, 6)) + [197, 224, 257, 288, 320]:
        q, k, v = (torch.randn(256, 12, n, 64, device="cuda", dtype=torch.float16) for _ in range(3))
        bias = (torch.rand(256, n, device="cuda") * 3 + 1).log()[:, None, None, :].half()
        r = {"n": n}
        for name, cfg in (("m64", dict(base, wide=None)), ("m128", dict(base, short=base["wide"], wide=None)),
                          ("default", base)):
            T.BA_CONFIG.clear()
            T.BA_CONFIG.update(cfg)
            r[name] = round(1e3 * triton.testing.do_bench_cudagraph(lambda: T.biased_attention(q, k, v, bias),
                                                                    rep=20, return_mode="median"), 1)
        T.BA_CONFIG.clear()
        T.BA_CONFIG.update(base)
        rows.append(r)
        log("bastn", r)
    OUT["bastn"] = rows


def part_mres():
    """bs 256, graph replay: block output written by the residual add and then merged, against the merge
    step that reads both halves of the add (the block output never stored); then ViT-B merge forwards
    with TOKENPRUNE_FUSE_RESIDUAL=0 / 1 (two passes each, alternating)."""
    import triton.testing

    from tokenprune import ops
    from tokenprune.state import TokenState
    rows = []
    for n, r in ((196, 13), (196, 48), (98, 13), (49, 13)):
        x1, y = (torch.randn(256, 1 + n, 768, device="cuda", dtype=torch.float16) for _ in range(2))
        metric = torch.randn(256, 1 + n, 64, device="cuda", dtype=torch.float16)

        def unfused():
            return ops.bipartite_merge(TokenState.start(x1 + y, 1), metric, r)

        def fused():
            st = TokenState.start(x1, 1)
            st.residual = y
            return ops.bipartite_merge(st, metric, r)
        same = torch.equal(unfused().x, fused().x)
        row = {"n": n, "r": r, "identical": same,
               "add_us": round(1e3 * triton.testing.do_bench_cudagraph(lambda: x1 + y, rep=20, return_mode="median"), 1),
               "add_then_merge_us": round(1e3 * triton.testing.do_bench_cudagraph(unfused, rep=20,
                                                                                  return_mode="median"), 1),
               "fused_us": round(1e3 * triton.testing.do_bench_cudagraph(fused, rep=20, return_mode="median"), 1)}
        rows.append(row)
        log("mres", row)
    OUT["mres"] = rows
    # ViT-B merge forwards, GEMM stem, graph replay: the block's own add (fuse0), the add left to the merge's
    # row gather (fuse1); three alternating rounds
    model = vit()
    tokenprune.fast_patch_embed(model)
    x = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.float16)
    variants = (("fuse0", "0"), ("fuse1", "1"))
    e2e = []
    try:
        with torch.inference_mode():
            for budget in (0.5, 0.25, 0.1):
                res = {name: [] for name, _ in variants}
                res["unreduced"] = []
                for _ in range(3):
                    tokenprune.remove(model)
                    res["unreduced"].append(triton.testing.do_bench_cudagraph(lambda: model(x), rep=100,
                                                                              return_mode="median"))
                    tokenprune.apply(model, budget=budget, method="merge")
                    ratio = tokenprune.plan(model).flop_ratio
                    for name, fuse in variants:
                        os.environ["TOKENPRUNE_FUSE_RESIDUAL"] = fuse
                        res[name].append(triton.testing.do_bench_cudagraph(lambda: model(x), rep=100,
                                                                           return_mode="median"))
                    tokenprune.remove(model)
                t0 = min(res["unreduced"])
                row = {"budget": budget, "flop_ratio": round(ratio, 4),
                       "unreduced_ms": [round(t, 3) for t in res["unreduced"]]}
                for name, _ in variants:
                    row[name + "_ms"] = [round(t, 3) for t in res[name]]
                    row[name + "_overhead_pct"] = round(100 * (min(res[name]) / (t0 * ratio) - 1), 2)
                e2e.append(row)
                log("mres_e2e", row)
    finally:
        os.environ.pop("TOKENPRUNE_FUSE_RESIDUAL", None)
    OUT["mres_e2e"] = e2e


def part_fixed():
    """bs 256, graph replay: the whole unreduced ViT-B, its patch embedding + position embedding, its 12
    blocks and its head alone, with cudnn.benchmark off and on. The work outside the blocks is a fixed
    cost no reduction touches; the FLOP ratio counts only the blocks."""
    import triton.testing
    model = vit()
    x = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.float16)
    was = torch.backends.cudnn.benchmark
    rows = []
    with torch.inference_mode():
        for flag in (False, True):
            torch.backends.cudnn.benchmark = flag

            def embed():
                return model.norm_pre(model._pos_embed(model.patch_embed(x)))
            tok = embed()

            def t(f):
                f()  # eager first: cuDNN's benchmarking cannot run inside a capture
                torch.cuda.synchronize()
                return round(1e3 * triton.testing.do_bench_cudagraph(f, rep=50, return_mode="median"), 3)
            r = {"cudnn_benchmark": flag, "model_ms": t(lambda: model(x)), "embed_ms": t(embed),
                 "patch_conv_ms": t(lambda: model.patch_embed.proj(x)),
                 "blocks_ms": t(lambda: model.blocks(tok)),
                 "head_ms": t(lambda: model.forward_head(model.norm(tok)))}
            rows.append(r)
            log("fixed", r)
    torch.backends.cudnn.benchmark = was
    OUT["fixed"] = rows


def part_pa():
    """Proportional attention without a score bias: softmax(s + log w) v = (sum_j e^s_j w_j v_j) / (sum_j e^s_j w_j),
    so SDPA with no mask on V' = [w v, w, 0...] (head dim d + 8) gives the numerator and the denominator in
    one call; the output is o'[:d] / o'[d]. Timed (graph replay) against the fused key-bias kernel, each
    including the reshape to [B, N, C] the block does next; also FlexAttention with a score_mod bias."""
    import torch.nn.functional as F
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tokenprune.kernels import triton_impl as T
    rows = []

    def t(f):
        f()
        torch.cuda.synchronize()
        return round(1e3 * triton.testing.do_bench_cudagraph(f, rep=20, return_mode="median"), 1)
    for (b, n) in [(256, 197), (256, 148), (256, 99), (256, 50), (64, 577), (1, 197)]:
        h, d = 12, 64
        qkv = torch.randn(b, n, 3, h, d, device="cuda", dtype=torch.float16).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        s = torch.randint(1, 12, (b, n), device="cuda").float()
        s[:, 5::13] = 0  # padding keys
        bias = s.log()[:, None, None, :].half()
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias.double())
        ref = ref.transpose(1, 2).reshape(b, n, h * d)
        r = {"shape": (b, h, n, d)}

        def triton_ba():
            return T.biased_attention(q, k, v, bias).transpose(1, 2).reshape(b, n, h * d)

        def plain():
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, h * d)

        def wv(backend, dv):
            def f():
                w = bias.exp().reshape(b, 1, n, 1)
                vp = torch.empty(b, h, n, dv, device="cuda", dtype=v.dtype)
                torch.mul(v, w, out=vp[..., :d])
                vp[..., d:d + 1] = w
                vp[..., d + 1:] = 0
                if backend is None:
                    o = F.scaled_dot_product_attention(q, k, vp)
                else:
                    with sdpa_kernel([backend]):
                        o = F.scaled_dot_product_attention(q, k, vp)
                return (o[..., :d] / o[..., d:d + 1]).transpose(1, 2).reshape(b, n, h * d)
            return f
        cases = {"triton_ba": triton_ba, "sdpa_nomask": plain, "wv_default_72": wv(None, 72),
                 "wv_cudnn_72": wv(SDPBackend.CUDNN_ATTENTION, 72), "wv_eff_72": wv(SDPBackend.EFFICIENT_ATTENTION, 72),
                 "wv_flash_72": wv(SDPBackend.FLASH_ATTENTION, 72), "wv_default_80": wv(None, 80)}
        for name, f in cases.items():
            try:
                out = f()
                if name != "sdpa_nomask":
                    r[name + "_err"] = float((out.double() - ref).norm() / ref.norm())
                r[name + "_us"] = t(f)
            except Exception as e:
                r[name + "_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("default", None)):
            vp = torch.randn(b, h, n, 72, device="cuda", dtype=torch.float16)

            def sd():
                if be is None:
                    return F.scaled_dot_product_attention(q, k, vp)
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, k, vp)
            try:
                r[f"sdpa_only_{name}_dv72_us"] = t(sd)
                r[f"sdpa_only_{name}_dv72_kernels"] = list(kernel_times(sd, 5))[:3]
            except Exception as e:
                r[f"sdpa_only_{name}_dv72_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        try:
            from torch.nn.attention.flex_attention import flex_attention
            bflat = bias.reshape(b, n).contiguous()

            def score_mod(score, bi, hi, qi, ki):
                return score + bflat[bi, ki]
            fa = torch.compile(flex_attention, dynamic=False)

            def flex():
                return fa(q, k, v, score_mod=score_mod).transpose(1, 2).reshape(b, n, h * d)
            out = flex()
            r["flex_err"] = float((out.double() - ref).norm() / ref.norm())
            r["flex_us"] = t(flex)
        except Exception as e:
            r["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
        rows.append(r)
        log("pa", r)
    OUT["pa"] = rows


def part_pe():
    """The patch embedding (a 16x16 stride-16 Conv2d) three ways at bs 256 / 64 / 1, fp16, graph replay:
    cuDNN on NCHW input, cuDNN channels-last, and patches + one GEMM (``tokenprune.fast_patch_embed``: a
    reshape/permute copy of the image, then F.linear with the conv weight flattened). Then the whole
    unreduced ViT-B with each stem. (Run 12 timed the same ops written out in this script.)"""
    import torch.nn.functional as F
    import triton.testing
    from tokenprune.stem import fast_patch_embed
    model = vit()
    conv = model.patch_embed.proj
    gemm = torch.nn.Sequential(torch.nn.Conv2d(3, 768, 16, 16).cuda().half())  # the library's GEMM stem
    gemm[0].load_state_dict(conv.state_dict())
    fast_patch_embed(gemm)
    rows = []

    def t(f, rep=50):
        f()
        torch.cuda.synchronize()
        return round(1e3 * triton.testing.do_bench_cudagraph(f, rep=rep, return_mode="median"), 2)

    with torch.inference_mode():
        for bs in (256, 64, 1):
            x = torch.randn(bs, 3, 224, 224, device="cuda", dtype=torch.float16)
            xcl = x.contiguous(memory_format=torch.channels_last)
            ref = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), stride=16)
            conv_cl = torch.nn.Conv2d(3, 768, 16, 16).cuda().half().to(memory_format=torch.channels_last)
            conv_cl.load_state_dict(conv.state_dict())
            r = {"bs": bs, "conv_us": t(lambda: conv(x)), "conv_cl_us": t(lambda: conv_cl(xcl)),
                 "conv_cl_incl_convert_us": t(lambda: conv_cl(x.contiguous(memory_format=torch.channels_last))),
                 "linear_us": t(lambda: gemm(x)),
                 "linear_err": float((gemm(x).float() - ref).norm() / ref.norm()),
                 "conv_err": float((conv(x).float() - ref).norm() / ref.norm()),
                 "gemm_only_us": t(lambda: F.linear(x.reshape(bs * 196, 768), conv.weight.reshape(768, -1), conv.bias)),
                 "conv_kernels": list(kernel_times(lambda: conv(x), 5).items())[:3],
                 "linear_kernels": list(kernel_times(lambda: gemm(x), 5).items())[:3]}
            log("pe", r)
            rows.append(r)
        e2e = []
        for bs in (256, 1):
            x = torch.randn(bs, 3, 224, 224, device="cuda", dtype=torch.float16)
            row = {"bs": bs, "model_conv_ms": t(lambda: model(x), 100) / 1e3}
            fast_patch_embed(model)
            row["model_linear_ms"] = t(lambda: model(x), 100) / 1e3
            for budget, method in ((0.25, "merge"), (0.25, "cls"), (0.1, "apet")):
                tokenprune.apply(model, budget=budget, method=method)
                ratio = tokenprune.plan(model).flop_ratio
                row[f"{method}@{budget}_linear_ms"] = tl_ = t(lambda: model(x), 100) / 1e3
                row[f"{method}@{budget}_linear_overhead_pct"] = round(100 * (tl_ / (row["model_linear_ms"] * ratio) - 1), 1)
                fast_patch_embed(model, False)
                row[f"{method}@{budget}_conv_ms"] = tc = t(lambda: model(x), 100) / 1e3
                row[f"{method}@{budget}_conv_overhead_pct"] = round(100 * (tc / (row["model_conv_ms"] * ratio) - 1), 1)
                fast_patch_embed(model)
                tokenprune.remove(model)
            fast_patch_embed(model, False)
            log("pe e2e", row)
            e2e.append(row)
    OUT["pe"] = {"rows": rows, "e2e": e2e}


def part_blockn():
    """bs 256: one ViT-B block's GPU time (graph replay) at every token count from 20 to 197, with its
    SDPA (the block's strided q/k/v), MLP and qkv projection alone: how the time per FLOP moves with N,
    which sets the floor of a reduction schedule. Also the floors of the cls / merge / apet schedules at
    budget 0.25 predicted from these block times."""
    import torch.nn.functional as F
    import triton.testing

    from tokenprune import plan as P
    model = vit()
    blk = model.blocks[0]
    bs, c = 256, 768
    rows = {}
    with torch.inference_mode():
        for n in range(20, 198):
            x = torch.randn(bs, n, c, device="cuda", dtype=torch.float16)
            q, k, v = blk.attn.qkv(x).reshape(bs, n, 3, 12, 64).permute(2, 0, 3, 1, 4).unbind(0)

            def t(f):
                return round(1e3 * triton.testing.do_bench_cudagraph(f, rep=10, return_mode="median"), 2)
            rows[n] = {"n": n, "block_us": t(lambda: blk(x)), "sdpa_us": t(lambda: F.scaled_dot_product_attention(q, k, v)),
                       "mlp_us": t(lambda: blk.mlp(x)), "qkv_us": t(lambda: blk.attn.qkv(x)),
                       "gflop": round(bs * (2 * n * (4 * c * c + 2 * c * 4 * c) + 4 * n * n * c) / 1e9, 2)}
            if n % 10 == 0 or n == 197:
                log("blockn", rows[n])
        pred = {}
        for method in ("cls", "merge", "apet"):
            tokenprune.apply(model, budget=0.25, method=method)
            pl = tokenprune.plan(model)
            ns = [m + pl.info.num_prefix for m in pl.tokens_per_block()]
            tokenprune.remove(model)
            t_red = sum(rows[n]["block_us"] for n in ns)
            t_full = len(ns) * rows[197]["block_us"]
            pred[method] = {"tokens": ns, "flop_ratio": round(pl.flop_ratio, 4), "blocks_us": round(t_red, 1),
                            "blocks_full_us": round(t_full, 1),
                            "blocks_over_flop_prop_pct": round(100 * (t_red / (t_full * pl.flop_ratio) - 1), 1)}
            log("blockn floor", method, pred[method])
    OUT["blockn"] = {"rows": list(rows.values()), "pred": pred}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="ea,sdpa,profile,floor")
    ap.add_argument("--quick", action="store_true", help="ea: the defaults and the combine tile shapes only")
    ap.add_argument("--ea-rows", action="store_true", help="ea: the defaults and half the context rows per program")
    ap.add_argument("--ea-fixed", type=int, default=0, help="ea: the defaults and the fixed-shift pass 1 (1: tiles, 2: stages, register cap, 3: the defaults "
                         "alone, 4: how far N is split and the pass-2 tile)")
    ap.add_argument("--no-cudnn-benchmark", action="store_true",
                    help="leave cudnn.benchmark off (on by default, as in `tokenprune bench`)")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    import timm
    import triton
    import triton.testing
    OUT["env"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "timm": timm.__version__, "command": " ".join(sys.argv),
                  "cudnn_benchmark": torch.backends.cudnn.benchmark}
    a = torch.empty(2**29, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    bw = 2 * a.numel() / (triton.testing.do_bench(lambda: b.copy_(a), return_mode="median") * 1e-3)
    del a, b
    OUT["env"]["copy_bw_TBs"] = round(bw / 1e12, 3)
    log(OUT["env"])
    os.makedirs(args.out, exist_ok=True)
    parts = {"ea": lambda: part_ea(bw, {1: "fixed", 2: "fixed2", 3: "jump", 4: "split"}.get(args.ea_fixed) or ("rows" if args.ea_rows else args.quick)), "ba": part_ba, "sdpa": part_sdpa, "profile": part_profile,
             "profile1": part_profile1, "am": part_am, "floor": part_floor,
             "qs": part_qs, "blockn": part_blockn, "fixed": part_fixed, "ms": part_ms,
             "pa": part_pa, "pe": part_pe, "gemmw": part_gemmw, "foldpad": part_foldpad, "bast": part_bast,
             "mres": part_mres}
    for name in args.only.split(","):
        t = time.time()
        try:
            parts[name]()
        except Exception as e:
            OUT["errors"].append(f"{name}: {type(e).__name__}: {e}")
            log("ERROR", name, e)
        log(f"part {name} took {time.time() - t:.0f} s")
        with open(os.path.join(args.out, "profile.json"), "w") as f:
            json.dump(OUT, f, indent=1, default=str)


if __name__ == "__main__":
    main()
