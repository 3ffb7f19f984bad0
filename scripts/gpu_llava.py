"""LLaVA-1.5-7B-shaped model: time-to-first-token and decode throughput with visual-token pruning.

CLIP ViT-L/14-336 vision tower (577 tokens, 24 layers, width 1024) + a 7B Llama (hidden 4096, 32 layers,
32 heads, MLP 11008; vocab 32064 as llava-hf/llava-1.5-7b-hf, image token 32000), random weights created
directly on the GPU in fp16, SDPA everywhere. The prompt is 576 image tokens + 40 text tokens.

For each batch size (1 and 8): the unreduced model (unpatched), ``method="cls"`` at budget 1.0 (patched,
nothing pruned: the wrapper's overhead), 0.25 / 0.1 / 0.05, and ``random`` / ``pool`` at 0.1:

- TTFT: ``generate(max_new_tokens=1)`` -- vision tower + projector + LM prefill + first token;
- decode: ``generate(max_new_tokens=1 + D)`` minus TTFT, over ``D`` tokens -> tokens/s (all sequences);
- the LM prefill FLOP-ratio bound (linear layers + attention of the 32 decoder layers, 40 text tokens).

Medians over ``--reps`` runs after a warm-up (``tokenprune.bench.time_fn``; ``generate()`` waits for the
GPU inside, so the CUDA events around it span its wall time, host work included). Writes ``llava_gpu.json`` and
``llava_gpu.md`` to ``--out``. ``--smoke``: tiny config on CPU in seconds (checks the script, no numbers).

    python scripts/gpu_llava.py --out results/
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tokenprune  # noqa: E402
from tokenprune.adapters.llava import lm_flop_ratio  # noqa: E402
from tokenprune.bench import time_fn  # noqa: E402

IMAGE_TOKEN = 32000


def build(smoke: bool, device: str, dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if smoke:
        vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=32)
        tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=32064, max_position_embeddings=4096)
    else:
        vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                              hidden_act="quick_gelu")
        tc = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096,
                         rms_norm_eps=1e-5)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # weights are created (and randomly initialised) on the GPU directly
            model = LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(old)
    model = model.to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # always generate the requested number of tokens
    model.generation_config.pad_token_id = 0
    return model


def inputs(model, batch: int, text: int, device: str, dtype):
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    g = torch.Generator().manual_seed(1)
    pre = 5
    txt = torch.randint(2, 31000, (batch, text), generator=g)
    ids = torch.cat([txt[:, :pre], torch.full((batch, n), IMAGE_TOKEN), txt[:, pre:]], 1).to(device)
    pv = torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g).to(device, dtype)
    return ids, pv, n


def timed(fn, device, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` (``time_fn``). ``generate()`` synchronises with the host inside (it reads the new
    tokens back), so on CUDA the events around it span the whole call, host time included: its wall time."""
    return time_fn(fn, device, warmup, reps).median_ms / 1e3


def lm_prefill_len(model, ids, pv) -> int:
    seen = []
    h = model.model.language_model.register_forward_pre_hook(
        lambda mod, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        model.generate(input_ids=ids[:1], pixel_values=pv[:1], max_new_tokens=1, do_sample=False)
    finally:
        h.remove()
    return seen[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU, seconds")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--budgets", default="0.25,0.1,0.05")
    ap.add_argument("--decode", type=int, default=32, help="new tokens timed for the decode rate")
    ap.add_argument("--text", type=int, default=40, help="text tokens in the prompt")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    if device == "cpu":
        torch.set_num_threads(1)
    dtype = torch.float16 if device == "cuda" else torch.float32
    t0 = time.time()
    model = build(args.smoke, device, dtype)
    build_s = time.time() - t0  # how long building the random-weight model took (reported, not a benchmark)
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device,
           "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
           "build_s": round(build_s, 1), "smoke": args.smoke}
    print(env, flush=True)

    budgets = [float(b) for b in args.budgets.split(",")]
    runs = [("none", 1.0), ("cls", 1.0)] + [("cls", b) for b in budgets] + [("random", 0.1), ("pool", 0.1)]
    rows = []
    for bs in [int(b) for b in args.batches.split(",")]:
        ids, pv, n = inputs(model, bs, args.text, device, dtype)
        base_ttft = base_rate = None
        for method, budget in runs:
            if method == "none":
                tokenprune.remove(model)
            else:
                tokenprune.apply(model, budget=budget, method=method)
            try:
                lm_len = lm_prefill_len(model, ids, pv)

                def first():
                    model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=1, do_sample=False)

                def whole():
                    model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=1 + args.decode,
                                   min_new_tokens=1 + args.decode, do_sample=False)

                with torch.inference_mode():
                    ttft = timed(first, device, args.reps)
                    total = timed(whole, device, args.reps)
            finally:
                tokenprune.remove(model)
            decode_s = max(total - ttft, 1e-9)
            rate = bs * args.decode / decode_s
            if method == "none":
                base_ttft, base_rate = ttft, rate
            kept = lm_len - args.text
            row = {"batch": bs, "method": method, "budget": budget, "visual_tokens": kept, "lm_prefill_tokens": lm_len,
                   "ttft_ms": ttft * 1e3, "ttft_speedup": base_ttft / ttft,
                   "decode_tok_s": rate, "decode_speedup": rate / base_rate, "total_ms": total * 1e3,
                   "lm_flop_ratio": lm_flop_ratio(model, budget, text_tokens=args.text, visual_tokens=n),
                   }
            row["flop_bound_speedup"] = 1 / row["lm_flop_ratio"]
            rows.append(row)
            print(f"bs={bs} {method:>6} b={budget:<5} visual={kept:>3} TTFT {ttft * 1e3:8.1f} ms "
                  f"(x{row['ttft_speedup']:.2f}, LM FLOP bound x{row['flop_bound_speedup']:.2f})  "
                  f"decode {rate:8.1f} tok/s (x{row['decode_speedup']:.2f})", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "llava_gpu.json").write_text(json.dumps({"env": env, "args": vars(args), "rows": rows}, indent=1))
    lines = [f"LLaVA-1.5-7B-shaped (random weights, {env['dtype']}, SDPA) on {env['gpu']}; torch {env['torch']}, "
             f"transformers {env['transformers']}; prompt = {args.text} text + {n} image tokens; "
             f"decode = {args.decode} new tokens; median of {args.reps}.",
             "",
             "| batch | method | budget | visual tokens to LM | TTFT ms | TTFT speed-up | LM prefill FLOP bound | "
             "decode tok/s | decode speed-up |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = "unreduced" if r["method"] == "none" else r["method"]
        lines.append(f"| {r['batch']} | {name} | {r['budget']} | {r['visual_tokens']} | {r['ttft_ms']:.1f} | "
                     f"{r['ttft_speedup']:.2f}x | {r['flop_bound_speedup']:.2f}x | {r['decode_tok_s']:.1f} | "
                     f"{r['decode_speedup']:.2f}x |")
    (out / "llava_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
