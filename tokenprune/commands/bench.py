"""Throughput, latency, peak memory and FLOPs of each method and budget, against the unreduced model.

    tokenprune bench --model vit_base_patch16_224 --methods merge,cls,random --budgets 0.5,0.25 \\
        --device cuda --dtype float16 --batch-sizes 1,256 --out results/

Random weights unless ``--weights``/``--pretrained`` (speed does not depend on
them). The unreduced model runs on its fused SDPA attention path in the same
process. ``overhead`` is the time over the FLOP-proportional time (the
unreduced time times the FLOP ratio): what the reduction itself costs, the
GPU's lower efficiency on fewer tokens, and the work outside the encoder
blocks (patch embedding, head), which the FLOP ratio does not count and no
reduction shortens. ``--cuda-graph`` times CUDA-graph replays (no host
launch cost). ``--fast-patch-embed`` runs every configuration, the unreduced
one included, with the patch embedding as one matrix product. Writes
``<name>.json``, ``<name>.csv`` and ``<name>.png`` (speed-up against budget
and against the FLOP bound) under ``--out``.
"""
from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

from ._common import (check_device, check_lists, info, make_out_dir, nonnegative_int, positive_int, set_threads,
                      torch_dtype, warn)
from .eval import add_model_arguments

DEFAULT_MODEL = "vit_base_patch16_224"


def add_arguments(p):
    add_model_arguments(p, default_model=f"{DEFAULT_MODEL} with random weights (speed does not depend on them)")
    p.set_defaults(methods="merge,cls,random", budgets="0.5,0.25")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated; the first is the latency batch, the last the throughput batch "
                        "(default: 1,256 on GPU, 1,8 on CPU)")
    p.add_argument("--warmup", type=nonnegative_int, default=None,
                   help="untimed calls before timing (default: 10 on GPU, 2 on CPU)")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed calls, median reported (default: 30 on GPU, 5 on CPU)")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave torch.backends.cudnn.benchmark off (by default it is on for the run on CUDA, as in "
                        "timm's benchmark script: with fixed input shapes cuDNN may pick faster convolution "
                        "kernels; for ViT-B on an H100 with torch 2.11 it measured no different)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture each forward in a CUDA graph and time its replay (no host launch cost: the "
                        "GPU time a batch-1 server with graphs sees); methods whose kept count depends on "
                        "the data cannot be captured and are reported as such")
    p.add_argument("--compile", choices=["none", "default", "reduce-overhead", "max-autotune"], default="none",
                   help="time every configuration, the unreduced one included, under torch.compile with this mode. "
                        "For throughput (large batches) 'default'; at batch 1 'reduce-overhead' (CUDA graphs: no "
                        "host launch cost), best with cls or a three-step merge (recipe merge-3-stages); "
                        "'max-autotune' compiles for minutes")
    p.add_argument("--fast-patch-embed", action="store_true",
                   help="run the patch-embedding convolution as one matrix product (tokenprune.fast_patch_embed) in "
                        "every configuration, the unreduced one included: the same outputs, and on an H100 ViT-B/16 "
                        "at batch 256 the stem takes 0.23 instead of 2.03 ms")


def run(args):
    import torch

    from .. import evaluate as ev

    budgets = ev.parse_list(args.budgets, float)
    methods = ev.parse_list(args.methods)
    check_lists(methods, budgets, args.recipe)
    configs, notes = ev.build_configs(methods, budgets, args.recipe, baselines=())
    cuda = args.device.startswith("cuda")
    if args.cuda_graph and not cuda:
        raise ValueError("--cuda-graph needs --device cuda (CUDA graphs exist only on NVIDIA GPUs)")
    if args.cuda_graph and args.compile != "none":
        raise ValueError("--cuda-graph and --compile are alternatives (--compile reduce-overhead captures CUDA graphs "
                         "itself); give one of them")
    device = torch.device(check_device(args.device))
    make_out_dir(args.out)
    set_threads(args.threads)
    sizes = ev.parse_list(args.batch_sizes or ("1,256" if cuda else "1,8"), int)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive integers, got {args.batch_sizes!r}")
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    repeats = args.repeats if args.repeats is not None else (30 if cuda else 5)
    if repeats < 1 or warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    dtype = torch_dtype(args.dtype)

    cudnn_benchmark = cuda and not args.no_cudnn_benchmark
    was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        return _run(args, configs, notes, device, cuda, sizes, warmup, repeats, dtype, cudnn_benchmark)
    finally:
        torch.backends.cudnn.benchmark = was


def _run(args, configs, notes, device, cuda, sizes, warmup, repeats, dtype, cudnn_benchmark):
    import torch

    from .. import api
    from .. import bench as B
    from .. import evaluate as ev
    from ._common import load_model

    lm = load_model(args.model or DEFAULT_MODEL, args, what="timing", weights_matter=False)
    lm.model.to(device=device, dtype=dtype).eval()
    attn = B.prefer_sdpa(lm)
    if args.fast_patch_embed:
        from ..stem import fast_patch_embed

        fast_patch_embed(lm.model)
    stem_kind = "matrix product (fast_patch_embed)" if args.fast_patch_embed else "model default"
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    print(f"bench {lm.name} on {device} ({name}), {args.dtype}, attention {attn}; batch sizes {sizes}; "
          f"{len(configs)} configurations; warm-up {warmup}, median of {repeats}"
          + ("; CUDA graphs" if args.cuda_graph else "") + ("; cudnn.benchmark on" if cudnn_benchmark else "")
          + ("; patch embedding as a matrix product" if args.fast_patch_embed else ""))
    for n in notes:
        print(f"note: {n}")
    info(f"timing {len(configs)} configurations x {len(sizes)} batch sizes")

    from tqdm.auto import tqdm

    rows, ref = [], {}
    bar = tqdm(total=len(configs) * len(sizes), desc="bench", disable=args.no_progress, dynamic_ncols=True)
    t_start = time.perf_counter()
    for cfg in configs:
        try:
            cfg.apply(lm.model)
        except (ValueError, TypeError, NotImplementedError) as e:
            notes.append(f"{cfg.name}: not applicable to this model: {e}")
            print(f"skip {cfg.name}: {e}")
            bar.update(len(sizes))
            continue
        try:
            flops = _flops(lm.model)
            for bs in sizes:
                bar.set_postfix_str(f"{cfg.name} bs {bs}")
                row = {"config": cfg.name, "label": cfg.label, "method": cfg.method, "budget": cfg.budget,
                       "batch_size": bs, **flops}
                try:
                    fn = B.synthetic_forward(lm, bs, device, dtype)
                    if args.cuda_graph:
                        fn = _graphed(fn)
                    elif args.compile != "none":
                        fn = _compiled(fn, args.compile)
                    if isinstance(fn, str):
                        row["error"] = fn
                        rows.append(row)
                        bar.update()
                        continue
                    t = B.time_fn(fn, device, warmup, repeats)
                    peak, act = B.peak_memory(fn, device)
                    del fn
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    row["error"] = "out of memory"
                    rows.append(row)
                    bar.update()
                    continue
                row.update(median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms,
                           samples_per_s=bs * 1e3 / t.median_ms, peak_mem_mib=peak, activation_mem_mib=act)
                if cfg.method is None:
                    ref[bs] = t.median_ms
                row["speedup"] = ref[bs] / t.median_ms if bs in ref else None
                # time over the FLOP-proportional time (unreduced time x FLOP ratio), in % of the latter
                row["overhead_pct"] = (100 * (t.median_ms / (ref[bs] * flops["flop_ratio"]) - 1)
                                       if bs in ref else None)
                rows.append(row)
                bar.update()
                if cuda:
                    torch.cuda.empty_cache()
        finally:
            api.remove(lm.model)
    bar.close()
    drift = (_drift(lm, ref, device, dtype, warmup, repeats, args.cuda_graph, args.compile)
             if ref and len(configs) > 1 else {})
    for bs, d in drift.items():
        if abs(d["drift_pct"]) > 2:
            how = f"{d['drift_pct']:.1f}% longer" if d["drift_pct"] > 0 else f"{-d['drift_pct']:.1f}% less time"
            notes.append(f"the unreduced model at batch {bs} took {how} at the end of the run than at the start "
                         f"(it ran {'slower' if d['drift_pct'] > 0 else 'faster'}): the speed of {device} moved "
                         "(clocks, heat, other work), so ratios carry about that much noise")

    _print_table(rows)
    for bs, d in drift.items():
        print(f"unreduced at batch {bs}: {d['start_ms']:.3f} ms at the start, {d['end_ms']:.3f} ms at the end "
              f"({d['drift_pct']:+.1f}%)")
    stem = args.name or "bench"
    meta = {"command": "tokenprune " + " ".join(sys.argv[1:]), "model": lm.name, "device": str(device),
            "device_name": name, "dtype": args.dtype, "attention": attn, "batch_sizes": sizes, "warmup": warmup,
            "repeats": repeats, "cuda_graph": bool(args.cuda_graph), "compile": args.compile,
            "cudnn_benchmark": cudnn_benchmark, "patch_embed": stem_kind,
            "unreduced_drift": {str(k): v for k, v in drift.items()},
            "torch": torch.__version__, "python": platform.python_version(),
            "seconds": time.perf_counter() - t_start, "notes": notes,
            "memory": "CUDA max_memory_allocated (MiB)" if cuda else "process peak RSS (MiB, coarse)"}
    try:
        import timm

        meta["timm"] = timm.__version__
    except ImportError:
        pass
    out = Path(args.out)
    paths = ev.write_results(rows, meta, out, stem)
    from ..plots import speed_plot

    paths["png"] = speed_plot(rows, out / f"{stem}.png",
                              title=f"{lm.name} on {name}, {args.dtype}"
                              + (", CUDA-graph replay" if args.cuda_graph else "")
                              + (", cudnn.benchmark" if cudnn_benchmark else "")
                              + (", GEMM patch embedding" if args.fast_patch_embed else ""))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if not any("error" not in r for r in rows):
        warn("no configuration ran successfully (see the errors above); the plot says so")
    return 0


def _drift(lm, ref, device, dtype, warmup, repeats, cuda_graph, compile_mode="none") -> dict:
    """The unreduced model timed again after every configuration: how far the device's speed moved
    during the run (clocks, heat, other work), per batch size."""
    from .. import bench as B

    out = {}
    for bs, start in ref.items():
        fn = B.synthetic_forward(lm, bs, device, dtype)
        if cuda_graph:
            fn = _graphed(fn)
        elif compile_mode != "none":
            fn = _compiled(fn, compile_mode)
        if isinstance(fn, str):
            continue
        end = B.time_fn(fn, device, warmup, repeats).median_ms
        out[bs] = {"start_ms": start, "end_ms": end, "drift_pct": 100 * (end / start - 1)}
    return out


def _compiled(fn, mode: str):
    """``fn`` under ``torch.compile(mode=...)``, compiled by one call, or a one-line reason it failed. Each
    configuration is its own patch: Dynamo's caches are reset so they never hit its recompile limit."""
    import torch

    torch._dynamo.reset()
    cfn = torch.compile(fn, mode=None if mode == "default" else mode)
    try:
        with torch.inference_mode():
            cfn()
    except Exception as e:  # noqa: BLE001 -- reported in the row, the other configurations still run
        return f"torch.compile({mode}) failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return cfn


def _graphed(fn):
    """``fn`` captured as a CUDA graph, or a one-line reason when its forward cannot be captured."""
    import torch

    from ..cuda import graphed

    try:
        with torch.inference_mode():
            return graphed(fn)
    except RuntimeError as e:
        return str(e).splitlines()[0][:200]  # graphed() says why (e.g. a data-dependent kept count)


def _flops(model) -> dict:
    from .. import api

    try:
        plan = api.plan(model)
    except ValueError:  # unreduced: any method's plan knows the unreduced FLOPs
        plan = api.plan(model, budget=1.0, method="random")
        return {"gflops": plan.flops_unreduced() / 1e9, "flop_ratio": 1.0, "flop_bound": 1.0,
                "tokens_out": plan.info.num_tokens}
    return {"gflops": plan.flops() / 1e9, "flop_ratio": plan.flop_ratio, "flop_bound": 1.0 / plan.flop_ratio,
            "tokens_out": plan.num_out}


def _print_table(rows):
    head = (f"{'config':<24}{'bs':>5}{'ms':>10}{'samples/s':>12}{'speed-up':>10}{'FLOP bound':>12}{'overhead':>10}"
            f"{'peak MiB':>10}")
    print(head)
    for r in rows:
        if "error" in r:
            print(f"{r['config']:<24}{r['batch_size']:>5}  {r['error']}")
            continue
        mem = f"{r['peak_mem_mib']:.0f}" if r.get("peak_mem_mib") is not None else "n/a"
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") else "-"
        ov = f"{r['overhead_pct']:+.1f}%" if r.get("overhead_pct") is not None else "-"
        print(f"{r['config']:<24}{r['batch_size']:>5}{r['median_ms']:>10.2f}{r['samples_per_s']:>12.1f}"
              f"{sp:>10}{r['flop_bound']:>11.2f}x{ov:>10}{mem:>10}")
