"""GPU throughput of token reduction on RoPE ViTs, HF DINOv2 and NaFlex encoders (random weights, fp16, SDPA).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python scripts/gpu_rope.py --out $OUT          # H200, about 2 minutes
    PYTHONPATH=. python scripts/gpu_rope.py --out /tmp/rope --smoke                # CPU, tiny sizes (checks the script)

Models (default): timm ``eva02_base_patch14_224`` (EVA02-B/14: 256 patches + [CLS], rotary positions, SwiGLU),
timm ``vit_base_patch16_dinov3`` (DINOv3-B: 196 patches + [CLS] + 4 registers, DINOv3 rotary positions) and
transformers ``Dinov2Model`` with the dinov2-base shape (256 patches + [CLS], absolute positions). With ``--only``
also: timm ``naflexvit_base_patch16_map`` on 384 px images (``naflexvit_b16``, 576 patches), and NaFlex batches mixing
image shapes (``naflexvit_b16_mixed``: timm NaFlex patch dicts; ``hf_siglip2_b16_mixed``: transformers
``Siglip2VisionModel``, the siglip2-base-patch16-naflex shape), where half the batch is a 16 x 16 patch grid and half
a 12 x 20 one, padded to 256 patches (each image is reduced on its own grid; ``tokens out`` is the 16 x 16
image's). A mixed batch of one image has one grid: batch 1 is the 16 x 16 image alone. For each: batch 1
and 256, the unreduced model on SDPA, then each method x budget (default merge and cls at 0.5 / 0.25): ms per batch
(median of CUDA-event-timed runs after warm-up, ``tokenprune.bench.time_fn``), items/s, speed-up against the
unreduced model measured in the same process, tokens out and the plan's FLOP ratio. Checks on the way: budget 1.0
gives the unreduced output (fp16 tolerance) and every reduced output is finite; a failed check is recorded in the
row. Writes ``rope.json`` and ``rope.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ms as timed  # noqa: E402  (tokenprune.bench.time_fn, median milliseconds)

import tokenprune  # noqa: E402


def timm_model(name: str, smoke: bool):
    import timm

    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4) if smoke else {}
    m = timm.create_model(name, pretrained=False, num_classes=1000, **kw)
    size = 32 if smoke else m.pretrained_cfg["input_size"][-1]
    return m, (lambda b: torch.randn(b, 3, size, size)), (lambda model, x: model(x))


def _mixed_grids(b: int, smoke: bool):
    """Half the batch a 16 x 16 patch grid, half 12 x 20 (smoke: 4 x 4 and 3 x 5)."""
    big, other = ((4, 4), (3, 5)) if smoke else ((16, 16), (12, 20))
    return [big if i % 2 == 0 else other for i in range(b)], big


def naflex_mixed(smoke: bool):
    """timm NaFlexVit on NaFlex patch dicts (as timm's collator makes them) mixing two grids."""
    import timm

    kw = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4, pos_embed_grid_size=(4, 4)) if smoke else {}
    m = timm.create_model("naflexvit_base_patch16_map", pretrained=False, num_classes=1000, **kw)
    p = m.embeds.patch_size[0]

    def make(b):
        grids, big = _mixed_grids(b, smoke)
        n = big[0] * big[1]
        coord = torch.zeros(b, n, 2, dtype=torch.long)
        valid = torch.zeros(b, n, dtype=torch.bool)
        for i, (h, w) in enumerate(grids):
            yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            coord[i, : h * w] = torch.stack([yy.reshape(-1), xx.reshape(-1)], -1)
            valid[i, : h * w] = True
        return dict(patches=torch.randn(b, n, 3 * p * p), patch_coord=coord, patch_valid=valid)

    big = _mixed_grids(1, smoke)[1]
    return m, make, (lambda model, x: model(x)), (1, 3, big[0] * p, big[1] * p)


def hf_siglip2_mixed(smoke: bool):
    """transformers Siglip2VisionModel (NaFlex: pixel_attention_mask, spatial_shapes) mixing two grids."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    if smoke:
        cfg = Siglip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                  patch_size=8, num_patches=16, attn_implementation="sdpa")
    else:  # google/siglip2-base-patch16-naflex
        cfg = Siglip2VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, patch_size=16, num_patches=256, attn_implementation="sdpa")

    def make(b):
        grids, big = _mixed_grids(b, smoke)
        n = big[0] * big[1]
        mask = torch.zeros(b, n, dtype=torch.long)
        for i, (h, w) in enumerate(grids):
            mask[i, : h * w] = 1
        return dict(pixel_values=torch.randn(b, n, 3 * cfg.patch_size ** 2), pixel_attention_mask=mask,
                    spatial_shapes=torch.tensor(grids))

    big = _mixed_grids(1, smoke)[1]
    shape = (1, 3, big[0] * cfg.patch_size, big[1] * cfg.patch_size)
    return Siglip2VisionModel(cfg), make, (lambda model, x: model(**x).pooler_output), shape


def hf_dinov2(smoke: bool):
    from transformers import Dinov2Config, Dinov2Model

    if smoke:
        cfg = Dinov2Config(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=8,
                           attn_implementation="sdpa")
    else:  # facebook/dinov2-base at 224 px
        cfg = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                           patch_size=14, attn_implementation="sdpa")
    size = cfg.image_size
    return Dinov2Model(cfg), (lambda b: torch.randn(b, 3, size, size)), (lambda model, x: model(x).pooler_output)


MODELS = {"eva02_b14": lambda smoke: timm_model("eva02_base_patch14_224", smoke),
          "dinov3_b16": lambda smoke: timm_model("vit_base_patch16_dinov3", smoke),
          "hf_dinov2_b14": hf_dinov2,
          "naflexvit_b16": lambda smoke: timm_model("naflexvit_base_patch16_map", smoke),
          "naflexvit_b16_mixed": naflex_mixed, "hf_siglip2_b16_mixed": hf_siglip2_mixed}
DEFAULT = ["eva02_b14", "dinov3_b16", "hf_dinov2_b14"]


def _to(x, device, dtype):
    """An input (tensor or dict of tensors) on ``device``; floating tensors in ``dtype``."""
    if isinstance(x, dict):
        return {k: _to(v, device, dtype) for k, v in x.items()}
    return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)


def row(table, **kw):
    table.append(kw)
    print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in kw.items()), flush=True)


def bench(name, factory, methods, budgets, batches, device, dtype, warmup, reps, table):
    model, make_input, run, *shape = factory
    model = model.to(device=device, dtype=dtype).eval()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for bs in batches:
        x = _to(make_input(bs), device, dtype)
        planned = dict(input_shape=shape[0] if shape else tuple(x.shape))  # the grid that runs (NaFlex: the 16 x 16)
        with torch.inference_mode():
            ref = run(model, x)
            base = timed(lambda: run(model, x), device, warmup, reps)
            tokenprune.apply(model, 1.0, "merge")
            same = torch.allclose(run(model, x).float(), ref.float(), rtol=tol, atol=tol)
            n_in = tokenprune.plan(model, **planned).info.num_tokens
            tokenprune.remove(model)
        row(table, model=name, method="none", budget=1.0, batch=bs, tokens_out=n_in, ms=base, per_s=1e3 * bs / base,
            speedup=1.0, flop_ratio=1.0, check="ok" if same else "budget 1.0 differs from the unreduced model")
        for method in methods:
            for budget in budgets:
                tokenprune.apply(model, budget, method)
                try:
                    plan = tokenprune.plan(model, **planned)
                    with torch.inference_mode():
                        finite = bool(torch.isfinite(run(model, x)).all())
                        t = timed(lambda: run(model, x), device, warmup, reps)
                finally:
                    tokenprune.remove(model)
                row(table, model=name, method=method, budget=budget, batch=bs, tokens_out=plan.num_out, ms=t,
                    per_s=1e3 * bs / t, speedup=base / t, flop_ratio=plan.flop_ratio,
                    check="ok" if finite else "non-finite output")
    del model


def markdown(table, header) -> str:
    lines = [header, "", "| model | method | budget | batch | tokens out | ms / batch | items/s | speed-up | FLOP ratio "
                         "| check |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['model']} | {r['method']} | {r['budget']} | {r['batch']} | {r['tokens_out']} | "
                     f"{r['ms']:.2f} | {r['per_s']:.1f} | {r['speedup']:.2f}x | {r['flop_ratio']:.3f} | {r['check']} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the script in seconds")
    ap.add_argument("--methods", nargs="+", default=["merge", "cls"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.25])
    ap.add_argument("--only", nargs="+", default=DEFAULT, choices=list(MODELS))
    ap.add_argument("--batch", type=int, default=256, help="the large batch (batch 1 is always timed)")
    args = ap.parse_args()
    if args.smoke:
        device, dtype, warmup, reps, big = torch.device("cpu"), torch.float32, 1, 3, 4
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device; use --smoke to check the script on CPU")
        device, dtype, warmup, reps, big = torch.device("cuda"), torch.float16, 10, 30, args.batch
    torch.manual_seed(0)
    table: list[dict] = []
    t0 = time.time()
    for name in args.only:
        print(name, flush=True)
        bench(name, MODELS[name](args.smoke), args.methods, args.budgets, [1, big], device, dtype, warmup, reps, table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               dtype=str(dtype), smoke=args.smoke, seconds=round(time.time() - t0, 1))
    try:
        import timm
        import transformers
        env.update(timm=timm.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    (out / "rope.json").write_text(json.dumps(dict(env=env, rows=table), indent=1))
    header = (f"RoPE ViTs, HF DINOv2, NaFlex encoders, {env['device']}, {env['dtype']}, random weights, SDPA "
              "(scripts/gpu_rope.py)")
    (out / "rope.md").write_text(markdown(table, header))
    print(markdown(table, header))
    print(f"wrote {out / 'rope.json'} and {out / 'rope.md'} in {env['seconds']} s")


if __name__ == "__main__":
    main()
