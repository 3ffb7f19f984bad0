"""The head-mean key folded into the qkv product, on the GPU: same forward as without it.

vit_base_patch16_224, random weights, merge at budget 0.25: at batch 64 the output with the fold against
the output with ``TOKENPRUNE_FOLD=0`` (``k.mean(1)``) in float32 and float16; at batch 1 and 256 (float16,
GEMM stem) the time of both by CUDA-graph replay, three times each, alternating. A few matches may flip between the two in float16 (the metric is rounded once
instead of after 12 head sums), so float16 reports the difference rather than requiring equality.

    PYTHONPATH=. python scripts/gpu_fold.py --out OUT
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import timm
import torch
import triton.testing

import tokenprune
from tokenprune.adapters import timm_vit


def _forward(model, x, fold: str):
    os.environ["TOKENPRUNE_FOLD"] = fold
    tokenprune.remove(model)
    tokenprune.apply(model, budget=0.25, method="merge")
    assert isinstance(model.blocks[0].attn.qkv, timm_vit._FoldedQKV) == (fold == "1")

    def fn():
        with torch.inference_mode():
            return model(x)
    return fn


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(0)
        model = timm.create_model("vit_base_patch16_224", pretrained=False).cuda().to(dtype).eval()
        x = torch.randn(64, 3, 224, 224, device="cuda", dtype=dtype)
        outs = {f: _forward(model, x, f)().float() for f in ("0", "1")}
        rel = float((outs["1"] - outs["0"]).norm() / outs["0"].norm())
        agree = float((outs["1"].argmax(-1) == outs["0"].argmax(-1)).float().mean())
        rows.append({"check": "output", "dtype": str(dtype), "batch": 64, "rel_diff": rel, "argmax_agree": agree})
        print(rows[-1], flush=True)
    tokenprune.fast_patch_embed(model)
    for bs in (1, 256):
        x = torch.randn(bs, 3, 224, 224, device="cuda", dtype=torch.float16)
        ms = {"0": [], "1": []}
        for _ in range(3):  # alternate, so a slow drift of the card hits both alike
            for f in ("0", "1"):
                ms[f].append(triton.testing.do_bench_cudagraph(_forward(model, x, f), rep=50, return_mode="median"))
        rows.append({"check": "time", "dtype": "torch.float16", "batch": bs, "ms_kmean": [round(t, 3) for t in ms["0"]],
                     "ms_fold": [round(t, 3) for t in ms["1"]]})
        print(rows[-1], flush=True)
    os.environ.pop("TOKENPRUNE_FOLD", None)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_fold.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
