"""First GPU measurement of the core reducers (issue 2).

vit_base_patch16_224 (random weights), fp16: throughput at a large batch and
latency at batch 1, unreduced on SDPA vs merge / cls / random at several budgets,
with the FLOP-ratio bound of each plan, all in one process.

    PYTHONPATH=. python scripts/gpu_core.py --out OUT_DIR
    PYTHONPATH=. python scripts/gpu_core.py --smoke   # CPU, tiny, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

import torch

import tokenprune
from tokenprune.bench import time_fn


def timed(fn, device, warmup, reps):
    """Median milliseconds of ``fn`` over ``reps`` runs (CUDA events on GPU): tokenprune.bench.time_fn."""
    return time_fn(fn, device, warmup, reps).median_ms

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--methods", default="merge,cls,random")
    ap.add_argument("--budgets", default="0.5,0.25")
    ap.add_argument("--variants", default="", help="extra configs 'method:budget:key=val,key=val;...'")
    ap.add_argument("--graphs", action="store_true", help="also time bs 1 as a captured CUDA graph")
    ap.add_argument("--profile", default="", help="'method:budget' to profile at bs 1 and the big batch")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    import timm

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float16 if device == "cuda" else torch.float32
    kw = dict(img_size=64, depth=2) if args.smoke else {}
    big = 4 if args.smoke else args.batch
    warm, reps = (1, 2) if args.smoke else (10, 30)
    model = timm.create_model(args.model, pretrained=False, **kw).to(device, dtype).eval()
    size = model.patch_embed.img_size[0]
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "timm": timm.__version__, "model": args.model, "dtype": str(dtype), "fused_attn": model.blocks[0].attn.fused_attn}
    print(json.dumps(env))
    rows = []
    configs = [("none", 1.0, {})] + [(m, float(b), {}) for m in args.methods.split(",") for b in args.budgets.split(",")]
    for v in filter(None, args.variants.split(";")):
        m, b, opts = (v.split(":") + [""])[:3]
        kv = {}
        for k, val in re.findall(r"(\w+)=(\[[^\]]*\]|[^,]+)", opts):
            kv[k] = json.loads(val.lower()) if val.lower() in ("true", "false") or val.startswith("[") else val
        configs.append((m, float(b), kv))
    xs = {bs: torch.randn(bs, 3, size, size, device=device, dtype=dtype) for bs in (1, big)}
    base = {}
    with torch.inference_mode():
        for method, budget, opts in configs:
            if method == "none":
                tokenprune.remove(model)
                ratio = 1.0
            else:
                tokenprune.apply(model, budget=budget, method=method, **opts)
                ratio = tokenprune.plan(model).flop_ratio
            label = method + ("[" + ",".join(f"{k}={v}" for k, v in opts.items()) + "]" if opts else "")
            row = {"method": label, "budget": budget, "flop_ratio": ratio}
            for bs, x in xs.items():
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                ms = timed(lambda: model(x), device, warm, reps)
                row[f"ms_bs{bs}"] = ms
                if device == "cuda":
                    row[f"peak_mib_bs{bs}"] = torch.cuda.max_memory_allocated() / 2**20
                if method == "none":
                    base[bs] = ms
                row[f"speedup_bs{bs}"] = base[bs] / ms
                # overhead: time beyond what the FLOP ratio predicts, as a fraction of the reduced time
                row[f"overhead_bs{bs}"] = (ms - base[bs] * ratio) / ms
            if args.graphs and device == "cuda":
                from tokenprune.cuda import graphed

                run = graphed(model, xs[1])
                ms = timed(lambda: run(xs[1]), device, warm, reps * 3)
                row["ms_bs1_graph"] = ms
                if method == "none":
                    base["g"] = ms
                row["speedup_bs1_graph"] = base["g"] / ms
                row["overhead_bs1_graph"] = (ms - base["g"] * ratio) / ms
            row["img_per_s_big"] = big / row[f"ms_bs{big}"] * 1e3
            rows.append(row)
            print(f"{label:>7} b={budget:<5} flops={ratio:.3f}  bs{big}: {row['img_per_s_big']:9.0f} img/s "
                  f"({row[f'speedup_bs{big}']:.2f}x)  bs1: {row['ms_bs1']:6.2f} ms ({row['speedup_bs1']:.2f}x)"
                  + (f"  bs1 graph: {row['ms_bs1_graph']:.2f} ms ({row['speedup_bs1_graph']:.2f}x)" if "ms_bs1_graph" in row else ""),
                  flush=True)
        if args.profile:
            m, b = args.profile.split(":")
            tokenprune.apply(model, budget=float(b), method=m)
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            for bs, x in xs.items():
                for _ in range(3):
                    model(x)
                with profile(activities=acts) as prof:
                    for _ in range(5):
                        model(x)
                    if device == "cuda":
                        torch.cuda.synchronize()
                key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
                table = prof.key_averages().table(sort_by=key, row_limit=25)
                print(f"--- profile {m}@{b} bs{bs} (5 forwards) ---")
                print(table)
                with open(os.path.join(args.out, f"profile_{m}_bs{bs}.txt"), "w") as f:
                    f.write(table)
    tokenprune.remove(model)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "core.json"), "w") as f:
        json.dump({"env": env, "batch": big, "rows": rows}, f, indent=1)
    g = any("ms_bs1_graph" in r for r in rows)
    lines = [f"| method | budget | FLOP ratio (bound) | bs {big} img/s | speed-up | bs 1 ms | speed-up |"
             + (" bs 1 ms, CUDA graph | speed-up |" if g else ""), "|---|---|---|---|---|---|---|" + ("---|---|" if g else "")]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']} | {r['flop_ratio']:.3f} ({1 / r['flop_ratio']:.2f}x) | "
                     f"{r['img_per_s_big']:.0f} | {r[f'speedup_bs{big}']:.2f}x | {r['ms_bs1']:.2f} | {r['speedup_bs1']:.2f}x |"
                     + (f" {r['ms_bs1_graph']:.2f} | {r['speedup_bs1_graph']:.2f}x |" if g else ""))
    with open(os.path.join(args.out, "core.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
