"""GPU throughput of token reduction on the non-timm adapters (random weights, fp16, SDPA).

    python scripts/gpu_adapters.py --out DIR            # H100: SigLIP-B/16, VideoMAE-B, Whisper tiny.en shapes
    python scripts/gpu_adapters.py --out DIR --smoke    # CPU, tiny sizes, seconds (checks the script runs)

Measured in one run, against the unreduced model on SDPA:
- SigLIP base-patch16-224 vision tower (196 tokens, no [CLS], MAP head) and
  VideoMAE base (16 frames, 1568 tubelet tokens, mean-pooling classifier):
  images|videos per second at batch 1 and a large batch, for each method x
  budget (default merge and cls at 0.5 / 0.25);
- Whisper tiny.en shape (4+4 layers, 384 wide, 1500 encoder tokens): encoder
  time and full ``generate()`` wall time (greedy, a fixed 64 new tokens, so
  every configuration decodes the same length) at 75 / 50 / 25 % of the
  encoder tokens, at batch 1 and 16.
Timing: warm-up, then the median of repeated runs with CUDA events
(``tokenprune.bench.time_fn``; ``generate`` synchronises inside, so the events
span its wall time). Needs torch + CUDA and transformers; no network, no weights.
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


def siglip(smoke: bool):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if smoke:
        cfg = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                 image_size=32, patch_size=8, attn_implementation="sdpa")
    else:  # google/siglip-base-patch16-224
        cfg = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, image_size=224, patch_size=16, attn_implementation="sdpa")
    model = SiglipVisionModel(cfg)
    return model, (lambda b: torch.randn(b, 3, cfg.image_size, cfg.image_size)), (lambda m, x: m(x).pooler_output)


def videomae(smoke: bool):
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    if smoke:
        cfg = VideoMAEConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             image_size=16, patch_size=4, num_frames=4, tubelet_size=2, num_labels=10,
                             attn_implementation="sdpa")
    else:  # MCG-NJU/videomae-base-finetuned-kinetics
        cfg = VideoMAEConfig(num_labels=400, attn_implementation="sdpa")
    model = VideoMAEForVideoClassification(cfg)
    return model, (lambda b: torch.randn(b, cfg.num_frames, 3, cfg.image_size, cfg.image_size)), \
        (lambda m, x: m(x).logits)


def whisper(smoke: bool):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    if smoke:
        cfg = WhisperConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                            max_source_positions=64, max_target_positions=80, num_mel_bins=8, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, attn_implementation="sdpa")
    else:  # openai/whisper-tiny.en
        cfg = WhisperConfig(vocab_size=51864, d_model=384, encoder_layers=4, decoder_layers=4,
                            encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536,
                            decoder_ffn_dim=1536, max_source_positions=1500, max_target_positions=448,
                            num_mel_bins=80, pad_token_id=50256, bos_token_id=50257, eos_token_id=50256,
                            decoder_start_token_id=50257, attn_implementation="sdpa")
    return WhisperForConditionalGeneration(cfg), cfg


def row(table, **kw):
    table.append(kw)
    keys = [k for k in kw if k not in ("family",)]
    print(f"  {kw['family']:<9} " + "  ".join(f"{k}={kw[k]:.4g}" if isinstance(kw[k], float) else f"{k}={kw[k]}"
                                              for k in keys), flush=True)


def bench_vision(name, factory, methods, budgets, batches, device, dtype, warmup, reps, table):
    model, make_input, run = factory
    model = model.to(device=device, dtype=dtype).eval()
    for bs in batches:
        x = make_input(bs).to(device=device, dtype=dtype)
        with torch.inference_mode():
            base = timed(lambda: run(model, x), device, warmup, reps)
        row(table, family=name, method="none", budget=1.0, batch=bs, tokens_out=tokenprune.plan(
            model, 1.0, "merge").info.num_tokens, ms=base, per_s=1e3 * bs / base, speedup=1.0, flop_ratio=1.0)
        for method in methods:
            for budget in budgets:
                try:
                    tokenprune.apply(model, budget, method)
                except Exception as e:  # noqa: BLE001 -- a method that does not fit: record why
                    row(table, family=name, method=method, budget=budget, batch=bs, error=str(e)[:120])
                    continue
                plan = tokenprune.plan(model)
                with torch.inference_mode():
                    ms = timed(lambda: run(model, x), device, warmup, reps)
                tokenprune.remove(model)
                row(table, family=name, method=method, budget=budget, batch=bs, tokens_out=plan.num_out, ms=ms,
                    per_s=1e3 * bs / ms, speedup=base / ms, flop_ratio=plan.flop_ratio)
    del model


def bench_whisper(methods, budgets, batches, device, dtype, smoke, warmup, reps, table):
    from transformers.generation.utils import GenerationMixin

    model, cfg = whisper(smoke)
    model = model.to(device=device, dtype=dtype).eval()
    frames = 2 * cfg.max_source_positions
    new = 8 if smoke else 64
    for bs in batches:
        feats = torch.randn(bs, cfg.num_mel_bins, frames, device=device, dtype=dtype)
        start = torch.full((bs, 1), cfg.decoder_start_token_id, device=device, dtype=torch.long)

        def gen():  # plain greedy decoding of a fixed length (random weights: no EOS, no Whisper prompt logic)
            return GenerationMixin.generate(model, input_features=feats, decoder_input_ids=start,
                                            max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1)

        def enc():
            return model.model.encoder(feats)

        configs = [("none", 1.0)] + [(m, b) for m in methods for b in budgets]
        base_enc = base_gen = None
        for method, budget in configs:
            if method != "none":
                tokenprune.apply(model, budget, method)
            with torch.inference_mode():
                e_ms = timed(enc, device, warmup, reps)
                g_ms = timed(gen, device, 1, max(3, reps // 4))
            out = tokenprune.plan(model).num_out if method != "none" else cfg.max_source_positions
            tokenprune.remove(model)
            if method == "none":
                base_enc, base_gen = e_ms, g_ms
            row(table, family="whisper", method=method, budget=budget, batch=bs, tokens_out=out, encoder_ms=e_ms,
                encoder_speedup=base_enc / e_ms, generate_ms=g_ms, generate_speedup=base_gen / g_ms,
                new_tokens=new)
    del model


def markdown(table, header) -> str:
    lines = [header, ""]
    vis = [r for r in table if r["family"] != "whisper"]
    if vis:
        lines += ["| model | method | budget | batch | tokens out | ms / batch | items/s | speed-up | FLOP ratio |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in vis:
            if "error" in r:
                lines.append(f"| {r['family']} | {r['method']} | {r['budget']} | {r['batch']} | - | - | - | "
                             f"error: {r['error']} | - |")
            else:
                lines.append(f"| {r['family']} | {r['method']} | {r['budget']} | {r['batch']} | {r['tokens_out']} | "
                             f"{r['ms']:.2f} | {r['per_s']:.1f} | {r['speedup']:.2f}x | {r['flop_ratio']:.3f} |")
    wh = [r for r in table if r["family"] == "whisper"]
    if wh:
        lines += ["", "| Whisper | budget | batch | encoder tokens | encoder ms | speed-up | generate ms "
                      "(fixed new tokens) | speed-up |", "|---|---|---|---|---|---|---|---|"]
        for r in wh:
            lines.append(f"| {r['method']} | {r['budget']} | {r['batch']} | {r['tokens_out']} | {r['encoder_ms']:.2f} | "
                         f"{r['encoder_speedup']:.2f}x | {r['generate_ms']:.1f} | {r['generate_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: checks the script in seconds")
    ap.add_argument("--methods", nargs="+", default=["merge", "cls"])
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.25])
    ap.add_argument("--whisper-budgets", nargs="+", type=float, default=[0.75, 0.5, 0.25])
    ap.add_argument("--only", nargs="+", default=["siglip", "videomae", "whisper"])
    args = ap.parse_args()

    if args.smoke:
        device, dtype, warmup, reps = torch.device("cpu"), torch.float32, 1, 3
        torch.set_num_threads(1)
        big = {"siglip": 4, "videomae": 2, "whisper": 2}
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device; use --smoke to check the script on CPU")
        device, dtype, warmup, reps = torch.device("cuda"), torch.float16, 5, 20
        big = {"siglip": 256, "videomae": 16, "whisper": 16}
    torch.manual_seed(0)
    table: list[dict] = []
    t0 = time.time()
    if "siglip" in args.only:
        bench_vision("siglip", siglip(args.smoke), args.methods, args.budgets, [1, big["siglip"]], device, dtype,
                     warmup, reps, table)
    if "videomae" in args.only:
        bench_vision("videomae", videomae(args.smoke), args.methods, args.budgets, [1, big["videomae"]], device,
                     dtype, warmup, reps, table)
    if "whisper" in args.only:
        bench_whisper(args.methods, args.whisper_budgets, [1, big["whisper"]], device, dtype, args.smoke, warmup,
                      reps, table)

    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               dtype=str(dtype), smoke=args.smoke, seconds=round(time.time() - t0, 1))
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_adapters.json").write_text(json.dumps(dict(env=env, results=table), indent=1))
    md = markdown(table, f"Adapters on {env['device']} ({env['dtype']}, SDPA, random weights; torch {env['torch']}, "
                         f"transformers {env.get('transformers')}); median of {reps} runs after {warmup} warm-up")
    (out / "gpu_adapters.md").write_text(md)
    print(md)
    print(f"total {env['seconds']} s")


if __name__ == "__main__":
    main()
