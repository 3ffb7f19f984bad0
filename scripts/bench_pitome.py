"""PiToMe's speed against ToMe's merge and the unreduced model, and the checks behind it (issue 24).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python scripts/bench_pitome.py --out $OUT                  # H200, ~2 min
    PYTHONUNBUFFERED=1 PYTHONPATH=. python scripts/bench_pitome.py --parts compiled --out $OUT  # + reduce-overhead
    PYTHONPATH=. python scripts/bench_pitome.py --smoke --out /tmp/bench_pitome                # CPU plumbing, < 1 min

Parts (``--parts``, comma-separated; default ``checks,step,forward``):

- ``checks``: one pitome step on ViT-B shapes (bs 64, 1 + 196 tokens, C 768, keys of 64, r 13; fp16 and fp32),
  kernels on against the PyTorch path (``kernels.kernels_on(False)``: the float32 reference energy, the rows
  permuted, ToMe's PyTorch merge): energies, the share of samples with the same source map, their tokens; then a
  reduced ViT-B forward (bs 8, pitome at 0.25): logits kernels on vs off.
- ``step``: ms of one step on those inputs at bs 256 and 1 -- ``kernels.pitome_order`` alone, the whole pitome
  step (order + merge), kernels on and off, and ToMe's step (``ops.bipartite_merge``) for comparison.
- ``forward``: ms per eager forward of ViT-B/16 (random weights, fp16, SDPA) at bs 256 and 1, budget 0.25:
  unreduced, ``merge`` (after the block), ``merge`` with ``placement="attn"`` (ToMe's place, as pitome), ``pitome``,
  ``pitome-all`` (``candidates=inf``), and ``merge`` attn / ``pitome`` with 3 steps (``layers`` at 1/4, 1/2, 3/4 of the depth); every
  variant timed in 3 interleaved rounds, lowest median kept
  (``scripts/_common.ms``: CUDA events, median of 30 after 10 warm-up calls); at bs 1 also the host time to issue
  one forward.
- ``compiled``: the same variants at bs 1 under ``torch.compile(mode="reduce-overhead", fullgraph=True)``.

Writes ``bench_pitome.json`` and ``bench_pitome.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_vit, ms  # noqa: E402

import tokenprune  # noqa: E402
from tokenprune import kernels, ops  # noqa: E402
from tokenprune.bench import host_time_ms  # noqa: E402
from tokenprune.reducers.pitome import protected_merge  # noqa: E402
from tokenprune.state import TokenState  # noqa: E402

VARIANTS = [("unreduced", None, {}), ("merge", "merge", {}), ("merge attn", "merge", {"placement": "attn"}),
            ("pitome", "pitome", {}), ("pitome-all", "pitome", {"candidates": float("inf")}),
            # fewer, larger steps (launches are what a bs-1 eager forward waits on)
            ("merge attn 3 steps", "merge", {"placement": "attn", "layers": "quarters"}),
            ("pitome 3 steps", "pitome", {"layers": "quarters"})]
ROWS: list[dict] = []


def record(**row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def step_inputs(b, dtype, device, n=196, c=768, d=64, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(b, 1 + n, c, generator=g).to(device, dtype)
    y = torch.randn(b, 1 + n, c, generator=g).to(device, dtype)  # the attention branch: the deferred residual add
    keys = torch.randn(b, 1 + n, d, generator=g) + 0.7 * torch.randn(b, 1, d, generator=g)  # correlated, like keys
    return x, y, keys.to(device, dtype)


def pitome_step(x, y, metric, r, margin=0.6, candidates=2.0):
    st = TokenState.start(x, 1)
    st.residual = y
    return protected_merge(st, metric, r, margin, candidates)


def tome_step(x, y, metric, r):
    st = TokenState.start(x, 1)
    st.residual = y
    return ops.bipartite_merge(st, metric, r)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def checks(device, smoke):
    for dtype in (torch.float16, torch.float32) if device.type == "cuda" else (torch.float32,):
        x, y, metric = step_inputs(8 if smoke else 64, dtype, device)
        outs = {}
        for on in (True, False):
            with kernels.kernels_on(on), torch.inference_mode():
                e = kernels.pitome_order(metric, None, 1, 26, 0.6, False)[0]
                outs[on] = (e, pitome_step(x, y, metric, 13))
        same = (outs[True][1].source == outs[False][1].source).all(1)
        e_err = float((outs[True][0] - outs[False][0]).abs().max())
        record(part="checks", what="step", dtype=str(dtype), energy_max_abs_err=e_err,
               same_source_share=float(same.float().mean()),
               tokens_rel_err_same=rel(outs[True][1].x[same], outs[False][1].x[same]) if same.any() else None,
               sizes_equal_same=bool(torch.equal(outs[True][1].sizes[same], outs[False][1].sizes[same])))
    model, dt = make_vit(device, smoke=smoke)
    xin = torch.randn(8, 3, 32 if smoke else 224, 32 if smoke else 224, generator=torch.Generator().manual_seed(1))
    xin = xin.to(device, dt)
    tokenprune.apply(model, budget=0.25, method="pitome")
    with torch.inference_mode():
        with kernels.kernels_on(True):
            on = model(xin).float()
        with kernels.kernels_on(False):
            off = model(xin).float()
    tokenprune.remove(model)
    record(part="checks", what="vit forward bs 8", logits_rel_err=rel(on, off),
           top1_agreement=float((on.argmax(-1) == off.argmax(-1)).float().mean()))


def step(device, smoke):
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    for b in (8, 1) if smoke else (256, 1):
        x, y, metric = step_inputs(b, dtype, device)
        for on in ((True, False) if device.type == "cuda" else (False,)):
            with kernels.kernels_on(on):
                t_order = ms(lambda: kernels.pitome_order(metric, None, 1, 26, 0.6, False), device)
                t_pitome = ms(lambda: pitome_step(x, y, metric, 13), device)
                t_all = ms(lambda: pitome_step(x, y, metric, 13, candidates=float("inf")), device)
                t_tome = ms(lambda: tome_step(x, y, metric, 13), device)
            record(part="step", batch=b, kernels=on, pitome_order_ms=round(t_order, 4),
                   pitome_step_ms=round(t_pitome, 4), pitome_all_step_ms=round(t_all, 4), tome_step_ms=round(t_tome, 4))


def forward(device, smoke, mode="eager", rounds=3):
    import copy

    base_model, dt = make_vit(device, smoke=smoke)
    side = 32 if smoke else 224
    runs = []  # (label, callable, plan): each variant on its own copy, compiled once
    for label, method, opts in VARIANTS:
        m, plan = base_model, None
        if method:
            m = copy.deepcopy(base_model)
            if opts.get("layers") == "quarters":
                depth = len(m.blocks)
                opts = {**opts, "layers": [depth // 4, depth // 2, 3 * depth // 4]}
            tokenprune.apply(m, budget=0.25, method=method, **opts)
            plan = tokenprune.plan(m)
        runs.append((label, m if mode == "eager" else torch.compile(m, mode=mode, fullgraph=True), plan))
    for b in (((4, 1) if smoke else (256, 1)) if mode == "eager" else (1,)):
        x = torch.randn(b, 3, side, side, generator=torch.Generator().manual_seed(2)).to(device, dt)
        times = {label: [] for label, _, _ in runs}
        hosts = {}
        for rnd in range(rounds):
            for label, fn, _ in runs:
                with torch.inference_mode():
                    times[label].append(ms(lambda: fn(x), device))
                    if rnd == 0 and b == 1 and mode == "eager":
                        hosts[label] = host_time_ms(lambda: fn(x), device)
        base = min(times["unreduced"])
        for label, _, plan in runs:
            t = min(times[label])
            record(part="forward", mode=mode, batch=b, variant=label, ms=round(t, 4),
                   rounds_ms=[round(v, 4) for v in times[label]], speedup=round(base / t, 3),
                   host_ms=None if label not in hosts else round(hosts[label], 4),
                   stages=None if plan is None else len(plan.stages),
                   flop_ratio=None if plan is None else round(plan.flop_ratio, 4))
    del runs
    if mode != "eager":
        torch._dynamo.reset()


def write(out: Path, device):
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    (out / "bench_pitome.json").write_text(json.dumps({"meta": meta, "rows": ROWS}, indent=1))
    lines = [f"# pitome speed ({meta['device']}, torch {meta['torch']})", ""]
    fw = [r for r in ROWS if r["part"] == "forward"]
    if fw:
        lines += ["| mode | batch | variant | ms | speed-up | host ms | stages |", "|---|---|---|---|---|---|---|"]
        blank = lambda v: "" if v is None else v  # noqa: E731
        lines += [f"| {r['mode']} | {r['batch']} | {r['variant']} | {r['ms']:.3f} | {r['speedup']:.3f}x | "
                  f"{blank(r['host_ms'])} | {blank(r['stages'])} |" for r in fw]
    for r in ROWS:
        if r["part"] != "forward":
            lines.append("- " + json.dumps(r))
    (out / "bench_pitome.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_pitome_results"))
    ap.add_argument("--parts", default="checks,step,forward")
    ap.add_argument("--smoke", action="store_true", help="CPU plumbing check: the 4-block float32 test ViT")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        torch.set_num_threads(1)
    parts = [p for p in args.parts.split(",") if p]
    try:
        for part in parts:
            if part == "checks":
                checks(device, args.smoke)
            elif part == "step":
                step(device, args.smoke)
            elif part == "forward":
                forward(device, args.smoke)
            elif part == "compiled":
                forward(device, args.smoke, mode="reduce-overhead", rounds=1 if args.smoke else 2)
            else:
                raise SystemExit(f"unknown part {part!r}: checks, step, forward, compiled")
    finally:
        write(Path(args.out), device)


if __name__ == "__main__":
    main()
