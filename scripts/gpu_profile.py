"""Where the GPU time goes: linear attention, the key-bias attention, merge steps, reducer profiles.

    python scripts/gpu_profile.py --out DIR            # ea, sdpa, profile, floor (H100: a few minutes)
    python scripts/gpu_profile.py --out DIR --only ms  # one part: ea, ba, sdpa, profile, profile1, floor, qs, blockn, fixed, ms, mres, pe

Timing: ``tokenprune.bench.time_fn`` (median of CUDA-event timings) of eager calls, or of CUDA-graph replays
through ``tokenprune.cuda.graphed`` (GPU time alone, no host launches) -- scripts/_common.py ``ms`` /
``graph_ms``. Per-kernel times come from ``torch.profiler``.

Parts (the ones behind BENCHMARKS.md's current tables: ea, ms, mres, pe):
- ``ea``: the efficient (linear) attention at its defaults per shape: graph-replay time against the
  bandwidth bound (bytes / copy bandwidth measured in the same run), the time of each of its kernels, the
  eager time, and the time with keys that jump by 20 (chunks redo their loop).
- ``ba``: the key-bias attention kernel's tiles against SDPA (unmasked and masked) at ViT-like shapes.
- ``sdpa``: ViT-B shaped SDPA (B256 H12 d64) without a mask on flash, and with the [B,1,1,N]
  log-size key bias of proportional attention on each backend that accepts it.
- ``profile`` / ``profile1``: kernel-time tables of vit_base fp16 forwards at bs 256 / launches and GPU time
  per forward at bs 1 (unreduced, the reducers, and the free reduction ``first_k``).
- ``floor``: the same block sequence at the reduced token counts with a free reduction (keep the
  first K tokens: one slice), at bs 256 and bs 1 (eager and CUDA graph) -- the time a reducer
  with zero cost would take, next to the FLOP-proportional time the overhead target uses.
- ``qs``: query_scores keys per program per shape.
- ``blockn``: one ViT-B block at bs 256 at every token count 20-197 (block, SDPA, MLP, qkv), and the
  schedule floors predicted from it.
- ``fixed``: the unreduced ViT-B's time outside its blocks (patch embedding, head), cudnn.benchmark off/on.
- ``ms``: merge_step at large batch, one launch vs matching + row gather, and ViT-B merge forwards.
- ``mres``: one merge step at bs 256 after a block's residual add, against the step that reads the
  two halves of the add itself (``residual=``), and ViT-B merge forwards with and without it.
- ``pe``: the patch-embedding convolution on cuDNN (NCHW, channels-last) against patches + one GEMM, and
  whole ViT-B forwards with each stem.

Parts whose experiments lost were removed (docs/history/README.md lists them, with the commit to rerun them at).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import copy_bandwidth, graph_ms, make_vit, ms  # noqa: E402

import tokenprune  # noqa: E402
from tokenprune import kernels  # noqa: E402
from tokenprune.kernels import reference  # noqa: E402
from tokenprune.plan import Stage  # noqa: E402
from tokenprune.registry import register  # noqa: E402
from tokenprune.reducers.base import Reducer  # noqa: E402

OUT: dict = {"env": {}, "errors": []}
REMOVED = {  # part -> why; docs/history/README.md has the commit to rerun it at
    "am": "apet_merge tile sweep (settled)", "gemmw": "qkv product width for the fold (the fold was removed)",
    "foldpad": "the folded key mean (the fold was removed)", "bast": "key-bias pipelining depth (lost)",
    "pa": "proportional attention on weighted values (tried and dropped)", "balazy": "lazy rescale (lost)"}


def log(*a):
    print(*a, flush=True)


def us(fn) -> float:
    """GPU microseconds of ``fn()`` from CUDA-graph replays (median), rounded to 0.1."""
    return round(1e3 * graph_ms(fn), 1)


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


def kernel_table(fn, reps=10):
    """Per CUDA kernel: launches per call and mean GPU microseconds per call (torch.profiler)."""
    rows = {name[:70]: (round(c / reps, 1), round(t / reps, 2)) for name, c, t in profiled(fn, reps) if c >= reps}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1][1]))


def vit():
    return make_vit(torch.device("cuda"))[0]  # vit_base_patch16_224, fp16, eval, seed 0


def part_ea(bw):
    """Linear attention at its defaults (BENCHMARKS.md's table; ``--ea-fixed 3`` of runs 18 and 40)."""
    T = kernels._impl()
    shapes = {64: [(1, 12, 8192), (4, 12, 8192), (1, 12, 16384), (1, 12, 65536)],
              128: [(1, 16, 8192), (2, 16, 16384), (1, 16, 65536)]}
    # keys that jump by 20 (exp(20) overflows float16): once after the middle (the one chunk holding it
    # redoes its loop), and in every other 256 tokens (nearly every chunk redoes it: the worst case)
    jumps = (("jump_once", lambda n: torch.arange(n) >= n // 2 + 100),
             ("jump_every_256", lambda n: (torch.arange(n) % 512) >= 256))
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for d, shp in shapes.items():
        for (b, h, n) in shp:
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
            fn = lambda: kernels.efficient_attention(q, k, v, None)  # noqa: E731
            out = fn()
            err = None
            if n <= 16384:
                ref = reference.efficient_attention(q.float(), k.float(), v.float(), None)
                err = float((out.float() - ref).norm() / ref.norm())
            bound = 4 * b * h * n * d * 2 / bw * 1e6
            t = us(fn)
            r = {"d": d, "shape": (b, h, n), "graph_us": t, "bound_us": round(bound, 1),
                 "pct_graph": round(100 * bound / t, 1), "err": err, "eager_us": round(1e3 * ms(fn, "cuda"), 1),
                 "kernels": kernel_times(fn)}
            if err is not None and not err < 1e-2:
                OUT["errors"].append(f"ea {(b, h, n, d)}: rel err {err:.2e}")
            for tag, sel in jumps:
                kj = k.clone()
                kj[:, :, sel(n).cuda()] += 20
                fj = lambda: kernels.efficient_attention(q, kj, v, None)  # noqa: E731
                out = fj()
                r[tag] = {"graph_us": us(fj)}
                if n <= 16384:
                    ref = reference.efficient_attention(q.float(), kj.float(), v.float(), None)
                    r[tag]["err"] = float((out.float() - ref).norm() / ref.norm())
            rows.append(r)
            log("ea", json.dumps(r))
    OUT["ea"] = {"defaults": {k: (dict(v) if isinstance(v, dict) else v) for k, v in T.EA_CONFIG.items()},
                 "rows": rows}


def part_ba():
    """The fused key-bias attention kernel's tiles against SDPA (unmasked and masked) at ViT-like shapes."""
    import torch.nn.functional as F

    T = kernels._impl()
    rows = []
    base = dict(T.BA_CONFIG)
    for (b, h, n, d) in [(256, 12, 197, 64), (256, 12, 148, 64), (256, 12, 99, 64), (256, 12, 50, 64),
                         (1, 12, 197, 64), (64, 16, 577, 64), (16, 12, 1568, 64), (32, 16, 257, 128)]:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
        s = torch.rand(b, n, device="cuda") * 3 + 1
        s[:, 3::11] = 0  # padding keys
        bias = s.log()[:, None, None, :].half()
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=bias.double())
        r = {"shape": (b, h, n, d), "sdpa_nomask_us": us(lambda: F.scaled_dot_product_attention(q, k, v)),
             "sdpa_bias_us": us(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias))}
        # (every key in one tile at N <= 320 was slower everywhere and was removed: the history's session 4)
        for bm, bn, w in [(64, 64, 4), (128, 64, 8), (64, 32, 4), (128, 32, 4), (32, 64, 4)]:
            T.BA_CONFIG.update(short=(bm, bn, w), long=(bm, bn, w), wide=None)
            try:
                out = T.biased_attention(q, k, v, bias)
                r[f"triton_{bm}x{bn}w{w}_err"] = float((out.double() - ref).norm() / ref.norm())
                r[f"triton_{bm}x{bn}w{w}_us"] = us(lambda: T.biased_attention(q, k, v, bias))
            except Exception as e:
                r[f"triton_{bm}x{bn}w{w}_error"] = f"{type(e).__name__}: {str(e)[:80]}"
        T.BA_CONFIG.update(base)
        rows.append(r)
        log("ba", r)
    OUT["ba"] = rows


def part_sdpa():
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
                rows.append({"n": n, "case": name, "us": us(fn), "err_vs_fp32_biased": err})
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


def config_key(method, opts):
    return method + ("[" + ",".join(f"{k}={v}" for k, v in opts.items()) + "]" if opts else "")


def part_profile():
    model = vit()
    x = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.float16)
    tabs = {}
    with torch.inference_mode():
        for method, opts in [("none", {}), ("merge", {}), ("merge", {"prop_attn": False}), ("cls", {}), ("apet", {})]:
            tokenprune.remove(model)
            if method != "none":
                tokenprune.apply(model, budget=0.25, method=method, **opts)
            key = config_key(method, opts)
            kt = kernel_times(lambda: model(x), reps=3)
            tabs[key] = {"total_us": round(sum(kt.values()), 1), "top": dict(list(kt.items())[:25])}
            log("profile", key, tabs[key]["total_us"], list(kt.items())[:8])
    tokenprune.remove(model)
    OUT["profile"] = tabs


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
            key = config_key(method, opts)
            kt = kernel_table(lambda: model(x))
            tabs[key] = {"launches": round(sum(c for c, _ in kt.values()), 1),
                         "kernel_us": round(sum(t for _, t in kt.values()), 1), "kernels": kt}
            log("profile1", key, tabs[key]["launches"], tabs[key]["kernel_us"], list(kt.items())[:12])
    tokenprune.remove(model)
    OUT["profile1"] = tabs


def part_floor():
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
                key = config_key(method, opts)
                opts = dict(opts)
                kernels.set_kernels_enabled(opts.pop("kernels", "on") == "on")
                try:
                    if method != "none":
                        tokenprune.apply(model, budget=0.25, method=method, **opts)
                        ratio = tokenprune.plan(model).flop_ratio
                    eager = ms(lambda: model(x), "cuda", repeats=100 if bs == 1 else 30)
                    graph = None
                    if bs == 1:
                        try:
                            graph = graph_ms(lambda: model(x), repeats=100)
                        except RuntimeError as e:
                            OUT["errors"].append(f"floor graph {key}: {str(e).splitlines()[0][:160]}")
                finally:
                    kernels.set_kernels_enabled(True)
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
    T = kernels._impl()
    base = dict(T.QS_CONFIG)
    rows = []
    for b, h, n in ((256, 12, 197), (1, 12, 197), (64, 12, 577), (16, 16, 577), (8, 12, 16384), (1, 12, 16384)):
        qkv = torch.randn(b, n, 3, h, 64, device="cuda", dtype=torch.float16).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        for bn in (64, 128, 256):
            T.QS_CONFIG.update(short=bn, long_n=1 << 62)
            rows.append({"shape": [b, h, n], "block_n": bn, "us": us(lambda: T.query_scores(q[:, :, 0], k, 0.125))})
        T.QS_CONFIG.clear()
        T.QS_CONFIG.update(base)
        rows.append({"shape": [b, h, n], "default": True, "us": us(lambda: T.query_scores(q[:, :, 0], k, 0.125))})
        best = min((r for r in rows if r["shape"] == [b, h, n] and "block_n" in r), key=lambda r: r["us"])
        log("qs", (b, h, n), "best", best, "default", rows[-1]["us"])
    OUT["qs"] = rows


def part_ms():
    """merge_step at large batch: one launch against matching + _merge_gather (two launches), with and
    without the matching's register cap, graph replay, checked against the one-launch output; then ViT-B
    merge forwards at bs 256 with the best split and without."""
    T = kernels._impl()
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
            t = us(lambda: T.merge_step(x, metric, sizes, src, 1, r, False, max_size=197))
            rows.append({"batch": b, "n": n, "r": r, "split": v, "us": t, "matches_one_launch": ok})
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
            t0 = graph_ms(lambda: model(x))
            tokenprune.apply(model, budget=budget, method="merge")
            ratio = tokenprune.plan(model).flop_ratio
            for name, v in (("one launch", None), ("split", pick), ("default", base)):
                T.MERGE_STEP_SPLIT = None if v is None else {**base, **v, "min_batch": 64}
                t = graph_ms(lambda: model(x))
                e2e.append({"budget": budget, "variant": name, "split": v, "ms": round(t, 3),
                            "unreduced_ms": round(t0, 3), "flop_ratio": round(ratio, 4),
                            "overhead_pct": round(100 * (t / (t0 * ratio) - 1), 1)})
                log("ms e2e", e2e[-1])
    T.MERGE_STEP_SPLIT = base
    tokenprune.remove(model)
    OUT["ms"] = {"rows": rows, "e2e": e2e}


def part_mres():
    """bs 256, graph replay: block output written by the residual add and then merged, against the merge
    step that reads both halves of the add (the block output never stored); then ViT-B merge forwards
    with the blocks' own add and with the add left to the merge (``engine.set_fuse_residual``; three
    alternating rounds)."""
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
        row = {"n": n, "r": r, "identical": torch.equal(unfused().x, fused().x), "add_us": us(lambda: x1 + y),
               "add_then_merge_us": us(unfused), "fused_us": us(fused)}
        rows.append(row)
        log("mres", row)
    OUT["mres"] = rows
    model = vit()
    tokenprune.fast_patch_embed(model)
    x = torch.randn(256, 3, 224, 224, device="cuda", dtype=torch.float16)
    variants = (("fuse0", False), ("fuse1", True))
    e2e = []
    try:
        with torch.inference_mode():
            for budget in (0.5, 0.25, 0.1):
                res = {name: [] for name, _ in variants}
                res["unreduced"] = []
                for _ in range(3):
                    tokenprune.remove(model)
                    res["unreduced"].append(graph_ms(lambda: model(x)))
                    for name, fuse in variants:
                        tokenprune.engine.set_fuse_residual(fuse)
                        tokenprune.apply(model, budget=budget, method="merge")  # the plan reads the switch
                        ratio = tokenprune.plan(model).flop_ratio
                        res[name].append(graph_ms(lambda: model(x)))
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
        tokenprune.engine.set_fuse_residual(True)
    OUT["mres_e2e"] = e2e


def part_fixed():
    """bs 256, graph replay: the whole unreduced ViT-B, its patch embedding + position embedding, its 12
    blocks and its head alone, with cudnn.benchmark off and on. The work outside the blocks is a fixed
    cost no reduction touches; the FLOP ratio counts only the blocks."""
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
                return round(graph_ms(f), 3)
            r = {"cudnn_benchmark": flag, "model_ms": t(lambda: model(x)), "embed_ms": t(embed),
                 "patch_conv_ms": t(lambda: model.patch_embed.proj(x)),
                 "blocks_ms": t(lambda: model.blocks(tok)),
                 "head_ms": t(lambda: model.forward_head(model.norm(tok)))}
            rows.append(r)
            log("fixed", r)
    torch.backends.cudnn.benchmark = was
    OUT["fixed"] = rows


def part_pe():
    """The patch embedding (a 16x16 stride-16 Conv2d) three ways at bs 256 / 64 / 1, fp16, graph replay:
    cuDNN on NCHW input, cuDNN channels-last, and patches + one GEMM (``tokenprune.fast_patch_embed``: a
    reshape/permute copy of the image, then F.linear with the conv weight flattened). Then the whole
    unreduced ViT-B with each stem. (Run 12 timed the same ops written out in this script.)"""
    import torch.nn.functional as F
    from tokenprune.stem import fast_patch_embed
    model = vit()
    conv = model.patch_embed.proj
    gemm = torch.nn.Sequential(torch.nn.Conv2d(3, 768, 16, 16).cuda().half())  # the library's GEMM stem
    gemm[0].load_state_dict(conv.state_dict())
    fast_patch_embed(gemm)
    rows = []

    def t(f, digits=2):
        f()
        torch.cuda.synchronize()
        return round(1e3 * graph_ms(f), digits)

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
            row = {"bs": bs, "model_conv_ms": t(lambda: model(x), 5) / 1e3}
            fast_patch_embed(model)
            row["model_linear_ms"] = t(lambda: model(x), 5) / 1e3
            for budget, method in ((0.25, "merge"), (0.25, "cls"), (0.1, "apet")):
                tokenprune.apply(model, budget=budget, method=method)
                ratio = tokenprune.plan(model).flop_ratio
                row[f"{method}@{budget}_linear_ms"] = tl_ = t(lambda: model(x), 5) / 1e3
                row[f"{method}@{budget}_linear_overhead_pct"] = round(100 * (tl_ / (row["model_linear_ms"] * ratio) - 1), 1)
                fast_patch_embed(model, False)
                row[f"{method}@{budget}_conv_ms"] = tc = t(lambda: model(x), 5) / 1e3
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

    model = vit()
    blk = model.blocks[0]
    bs, c = 256, 768
    rows = {}

    def t(f):
        return round(1e3 * graph_ms(f, repeats=10), 2)
    with torch.inference_mode():
        for n in range(20, 198):
            x = torch.randn(bs, n, c, device="cuda", dtype=torch.float16)
            q, k, v = blk.attn.qkv(x).reshape(bs, n, 3, 12, 64).permute(2, 0, 3, 1, 4).unbind(0)
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


PARTS = {"ea": None, "ba": part_ba, "sdpa": part_sdpa, "profile": part_profile, "profile1": part_profile1,
         "floor": part_floor, "qs": part_qs, "blockn": part_blockn, "fixed": part_fixed, "ms": part_ms,
         "mres": part_mres, "pe": part_pe}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default="ea,sdpa,profile,floor", help="comma list of parts: " + ",".join(PARTS))
    ap.add_argument("--ea-fixed", type=int, choices=(3,), default=3,
                    help="accepted for the commands BENCHMARKS.md cites: 3 (the defaults and the jump keys) is the "
                         "only ea mode left")
    ap.add_argument("--no-cudnn-benchmark", action="store_true",
                    help="leave cudnn.benchmark off (on by default, as in `tokenprune bench`)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    import timm
    import triton
    OUT["env"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                  "timm": timm.__version__, "command": " ".join(sys.argv),
                  "cudnn_benchmark": torch.backends.cudnn.benchmark}
    bw = copy_bandwidth("cuda", 1 << 29)
    OUT["env"]["copy_bw_TBs"] = round(bw / 1e12, 3)
    log(OUT["env"])
    os.makedirs(args.out, exist_ok=True)
    parts = dict(PARTS, ea=lambda: part_ea(bw))
    for name in args.only.split(","):
        if name not in parts:
            msg = f"{name}: removed ({REMOVED[name]})" if name in REMOVED else f"{name}: no such part"
            OUT["errors"].append(msg)
            log("SKIP", msg)
            continue
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
