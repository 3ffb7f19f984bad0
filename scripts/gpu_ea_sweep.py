"""Sweep the block sizes of both passes of the efficient-attention kernel together (issue 6).

    python scripts/gpu_ea_sweep.py --out DIR      # H100: about a minute

For each head dim, every (pass-1, pass-2) pair of (BLOCK_N, warps) is checked against the
PyTorch reference (rel. error) and timed (triton.testing.do_bench, median) at N = 8k, 16k and
64k. Bound = bytes (q, k, v read once, out written once) / measured copy bandwidth.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenprune.kernels import reference  # noqa: E402
from tokenprune.kernels import triton_impl as T  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import triton.testing

    dev = "cuda"
    # copy bandwidth (bytes read + written)
    a = torch.empty(2**29, dtype=torch.uint8, device=dev).random_()
    b = torch.empty_like(a)
    t = triton.testing.do_bench(lambda: b.copy_(a), return_mode="median")
    bw = 2 * a.numel() / (t * 1e-3)
    del a, b
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    shapes = {64: [(4, 12, 8192), (1, 12, 16384), (1, 12, 65536)], 128: [(2, 16, 16384), (1, 16, 65536)]}
    cands = [(32, 4), (64, 4), (64, 8), (128, 4), (128, 8), (256, 8)]
    saved = {k: dict(v) if isinstance(v, dict) else v for k, v in T.EA_CONFIG.items()}
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    for d, shp in shapes.items():
        for p1, p2 in itertools.product(cands, cands):
            T.EA_CONFIG["pass1"][d], T.EA_CONFIG["pass2"][d] = p1, p2
            res = {"d": d, "pass1": p1, "pass2": p2, "us": [], "pct": []}
            try:
                for (bb, h, n) in shp:
                    q, k, v = (torch.randn(bb, h, n, d, device=dev, dtype=torch.float16, generator=g) for _ in range(3))
                    out = T.efficient_attention(q, k, v, None)
                    if n <= 16384:
                        ref = reference.efficient_attention(q.double(), k.double(), v.double(), None)
                        err = float((out.double() - ref).norm() / ref.norm())
                        if not err < 1e-2:
                            raise ValueError(f"rel err {err:.2e}")
                    us = 1e3 * triton.testing.do_bench(lambda: T.efficient_attention(q, k, v, None), return_mode="median")
                    bound = 4 * bb * h * n * d * 2 / bw * 1e6
                    res["us"].append(round(us, 1))
                    res["pct"].append(round(100 * bound / us, 1))
            except Exception as e:  # a config that does not compile / fit
                res["error"] = f"{type(e).__name__}: {str(e)[:80]}"
            rows.append(res)
            print(d, p1, p2, res.get("error") or list(zip(res["us"], res["pct"])), flush=True)
        T.EA_CONFIG["pass1"][d], T.EA_CONFIG["pass2"][d] = saved["pass1"][d], saved["pass2"][d]
    ok = [r for r in rows if "error" not in r]
    best = {}
    for d in shapes:
        cand = [r for r in ok if r["d"] == d]
        best[d] = min(cand, key=lambda r: sum(r["us"]))
        print(f"best d={d}: pass1 {best[d]['pass1']} pass2 {best[d]['pass2']} us {best[d]['us']} % {best[d]['pct']}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ea_sweep.json"), "w") as f:
        json.dump({"bandwidth": bw, "shapes": {str(k): v for k, v in shapes.items()}, "rows": rows,
                   "best": {str(k): v for k, v in best.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
