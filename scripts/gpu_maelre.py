"""MAELRE on long inputs (GPU): time and peak memory of a ViT-B-width encoder at N = 2k .. 16k tokens.

Compares, in the same run and on the same random-weight fp16 model (timm ViT-B/16: 768 wide, 12 blocks,
12 heads; the input image grows with N), at batch 1 and at a large batch (64k tokens per batch):

- ``sdpa``: the unreduced model on PyTorch SDPA (flash on H100) -- the baseline;
- ``maelre``: ``tokenprune.apply(model, budget, method="maelre")`` (default switch at N > D = 768);
- ``linear``: every block on the linear "efficient attention" and no merging (``budget=1.0,
  switch_at=0``) -- the cost of the approximation alone.

Timing: warm-up, then the median of CUDA-event timings. Memory: peak allocated during one forward minus
what was allocated before it (weights and input excluded). Self-contained: torch + timm + tokenprune;
random weights; no network. ``--smoke`` runs a tiny configuration on CPU in seconds.

    python scripts/gpu_maelre.py --out runs/gpu_maelre
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ms as bench  # noqa: E402  (tokenprune.bench.time_fn, median milliseconds)

import tokenprune  # noqa: E402
from tokenprune.bench import peak_memory  # noqa: E402
from tokenprune.cuda import graphed  # noqa: E402


def build(side: int, patch: int, width: int, depth: int, heads: int, device, dtype):
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=side * patch, patch_size=patch,
                          embed_dim=width, depth=depth, num_heads=heads, num_classes=1000)
    return m.to(device=device, dtype=dtype).eval()


def peak_mib(fn, device) -> float | None:
    """Peak MiB allocated during one ``fn()`` above what was allocated before it (CUDA only)."""
    return peak_memory(fn, device)[1] if device.type == "cuda" else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/gpu_maelre")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--sides", default="45,64,90,128", help="patch-grid sides (N = side^2: 2025 .. 16384)")
    ap.add_argument("--tokens-per-batch", type=int, default=65536, help="large batch = this // N")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run (seconds)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="time CUDA-graph replays of each forward (tokenprune.cuda.graphed): GPU time, no host launches")
    args = ap.parse_args()

    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        width, depth, heads, patch = 64, 4, 2, 4
        sides, warmup, reps, tpb = [4, 8], 1, 2, 128
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke for the CPU check")
        device, dtype = torch.device("cuda"), torch.float16
        width, depth, heads, patch = 768, 12, 12, 16
        sides, warmup, reps, tpb = [int(s) for s in args.sides.split(",")], 3, 10, args.tokens_per_batch
        torch.backends.cuda.matmul.allow_tf32 = True

    rows = []
    for side in sides:
        n = side * side
        model = build(side, patch, width, depth, heads, device, dtype)
        for batch in sorted({1, max(1, tpb // n)}):
            x = torch.randn(batch, 3, side * patch, side * patch, device=device, dtype=dtype)
            variants = [("sdpa", None), ("maelre", dict(budget=args.budget)),
                        ("linear", dict(budget=1.0, switch_at=0))]
            for name, cfg in variants:
                tokenprune.remove(model)
                plan = None
                if cfg is not None:
                    tokenprune.apply(model, method="maelre", **cfg)
                    plan = tokenprune.plan(model)

                def fwd():
                    with torch.inference_mode():
                        return model(x)

                try:
                    mem = peak_mib(fwd, device)  # eager: a graph's memory pool is allocated before its replays
                    if args.cuda_graph:
                        ms = bench(graphed(fwd), device, warmup, reps)
                    else:
                        ms = bench(fwd, device, warmup, reps)
                    err = None
                except torch.cuda.OutOfMemoryError as e:  # report, keep going
                    ms, mem, err = None, None, f"OOM: {str(e)[:80]}"
                    torch.cuda.empty_cache()
                paths = plan.attention_per_block() if plan else ["sdpa"] * depth
                rows.append(dict(tokens=n, batch=batch, variant=name, ms=ms, peak_mib=mem,
                                 linear_blocks=paths.count("linear"),
                                 tokens_out=plan.num_out if plan else n,
                                 flop_ratio=plan.flop_ratio if plan else 1.0, error=err))
                r = rows[-1]
                print(f"N={n:6d} B={batch:3d} {name:7s} "
                      f"{'%.2f ms' % ms if ms is not None else err:>12s} "
                      f"{'%.0f MiB' % mem if mem is not None else '-':>10s} linear blocks {r['linear_blocks']:2d} "
                      f"FLOP ratio {r['flop_ratio']:.3f}", flush=True)
            tokenprune.remove(model)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # derived: speed-up and memory relative to sdpa at the same N and batch; memory per token
    base = {(r["tokens"], r["batch"]): r for r in rows if r["variant"] == "sdpa"}
    for r in rows:
        b = base[(r["tokens"], r["batch"])]
        r["speedup"] = b["ms"] / r["ms"] if r["ms"] and b["ms"] else None
        r["kib_per_token"] = (1024 * r["peak_mib"] / (r["tokens"] * r["batch"])) if r["peak_mib"] else None

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)"
    meta = dict(device=dev, torch=torch.__version__, dtype=str(dtype), width=width, depth=depth, heads=heads,
                budget=args.budget, smoke=args.smoke, cuda_graph=args.cuda_graph)
    (out / "gpu_maelre.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    md = [f"MAELRE vs SDPA, {dev}, {dtype}, width {width}, {depth} blocks, random weights, budget {args.budget}"
          + (", CUDA-graph replay" if args.cuda_graph else ""),
          "",
          "| N | batch | variant | linear blocks | FLOP ratio | ms | speed-up | peak MiB | KiB / token |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append("| {n} | {b} | {v} | {lb} | {fr:.3f} | {t} | {sp} | {mem} | {kpt} |".format(
            n=r["tokens"], b=r["batch"], v=r["variant"], lb=r["linear_blocks"], fr=r["flop_ratio"],
            t="%.2f" % r["ms"] if r["ms"] else r["error"],
            sp="%.2fx" % r["speedup"] if r["speedup"] else "-",
            mem="%.0f" % r["peak_mib"] if r["peak_mib"] is not None else "-",
            kpt="%.1f" % r["kib_per_token"] if r["kib_per_token"] else "-"))
    (out / "gpu_maelre.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
