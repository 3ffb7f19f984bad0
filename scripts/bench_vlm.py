"""VLM visual-token pruning on the GPU: Qwen2.5-VL-7B and LLaVA-1.5-7B shapes, time-to-first-token and decode.

Models are built from configs with random weights directly on the GPU in fp16 (no hub), SDPA everywhere:

- ``qwen``: Qwen2.5-VL-7B (ViT 32 blocks x 1280, window 112 px, full attention at 7/15/23/31; LM 28 x 3584,
  GQA 28/4, MLP 18944). Inputs: a 1008x1344 image (72x96 patches -> 1,728 visual tokens) and a 16-frame
  448x448 video (8 temporal steps x 16x16 = 2,048 visual tokens);
- ``llava``: LLaVA-1.5-7B (CLIP ViT-L/14-336, 576 visual tokens; Llama 7B);
- ``onevision``: LLaVA-OneVision-7B (SigLIP-so400m 26 x 1152 at 384 px, 729 tokens per crop; LM Qwen2-7B, 28 x 3584,
  GQA 28/4). Inputs: a 768x1152 image (AnyRes: base crop + 2x3 tiles -> 729 + 54 x 81 = 5,103 visual tokens and 54
  newline tokens, always kept) and a 16-frame 384x384 video (16 x 14 x 14 = 3,136 visual tokens after the 2x2
  pooling, 1 newline). Not in the default ``--models``.

Prompt = the visual tokens + ``--text`` text tokens. For each model, input and batch size (1 and 8): the
unpatched model, ``cls`` at budget 1.0 (patched, nothing pruned: the wrapper's cost), 0.25 and 0.1, and (bs 1)
``random`` / ``pool`` at 0.1. Qwen's ``cls``, ``random`` and ``pool`` reduce INSIDE the vision tower (cls/random
after block 7, the first full-attention block; pool before block 0); bs 1 adds ``cls`` at 0.1 after the last block
(``layers=[31]``: the tokens of pruning between tower and LM, but the tower's attention in one launch per block) and
``cls`` with ``substitute="mean_query"`` (cheap scoring) at 0.1:

- TTFT: ``generate(max_new_tokens=1)`` (vision tower + scoring + LM prefill + first token)
  (``tokenprune.bench.time_fn``; generate() reads its tokens back, so the CUDA events span its wall time);
- decode: ``D`` new tokens after the first, timed inside one ``generate(1 + D)`` (a clock at each step) -> tokens/s
  (all sequences) of the median step;
- both in ``--reps`` interleaved rounds, each configuration once per round after the unpatched model: the value is
  the median over rounds, the speed-up the median of the ratios within a round (the hosts' speed drifts by up to
  2x within a run: run 13's decode rates moved between 28 and 56 tokens/s for one LM length);
- peak memory of the TTFT call (``tokenprune.bench.peak_memory``), and its GPU busy time
  (``tokenprune.bench.device_busy_ms``: the kernels' summed time; TTFT minus it is the host's share);
- the LM prefill FLOP bound (``adapters.llava.prefill_flops``: linear layers + attention of the decoder);
- the vision tower alone, per row: the unpatched tower (transformers' loop over windows / images) for the unpatched
  row, and for the Qwen rows tokenprune's tower pass with that row's in-tower reduction;
- Qwen, once per input and batch: tokenprune's tower pass WITHOUT reduction for each attention layout ("pad",
  "varlen", and at bs 1 "mask"), its time and largest difference from transformers' tower output: how much of the
  speed-up is the one-launch attention alone (budget 1.0 still runs the model untouched).

Writes ``vlm_gpu.json`` and ``vlm_gpu.md`` to ``--out``. ``--smoke``: tiny configs on CPU (checks the script).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python scripts/bench_vlm.py --out $OUT
    PYTHONUNBUFFERED=1 PYTHONPATH=. python scripts/bench_vlm.py --models onevision --out $OUT
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import time
import traceback
from pathlib import Path

import torch
from transformers import LogitsProcessorList

from _common import ROOT  # noqa: F401  (puts the repository on sys.path)

import tokenprune  # noqa: E402
from tokenprune.adapters.llava import prefill_flops  # noqa: E402
from tokenprune.bench import StepClock, device_busy_ms, peak_memory, time_fn  # noqa: E402
from tokenprune.patch import get_patch  # noqa: E402
from tokenprune.vlm.qwen_tower import Reduction, Tower, run  # noqa: E402

IMG_Q, VID_Q, VS_Q, VE_Q = 151655, 151656, 151652, 151653
IMG_L = 32000


def _make(cls, cfg, device, dtype):
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    model = model.to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # always the requested number of tokens
    model.generation_config.pad_token_id = 0
    return model


def build_qwen(smoke, device, dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if smoke:
        vc = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, temporal_patch_size=2,
                  spatial_merge_size=2, window_size=56, out_hidden_size=64, fullatt_block_indexes=[1, 3],
                  tokens_per_second=2)
        tc = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=152064, max_position_embeddings=32768,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    else:
        vc = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                  temporal_patch_size=2, spatial_merge_size=2, window_size=112, out_hidden_size=3584,
                  fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")
        tc = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    cfg = Qwen2_5_VLConfig(vision_config=vc, text_config=tc, image_token_id=IMG_Q, video_token_id=VID_Q,
                           vision_start_token_id=VS_Q, vision_end_token_id=VE_Q)
    return _make(Qwen2_5_VLForConditionalGeneration, cfg, device, dtype)


def build_llava(smoke, device, dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if smoke:
        vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=32)
        tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=32064, max_position_embeddings=4096)
    else:
        vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
        tc = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG_L, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return _make(LlavaForConditionalGeneration, cfg, device, dtype)


def build_onevision(smoke, device, dtype):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    side = 56 if smoke else 384  # crop size; AnyRes pinpoints: 1..6 x 1..6 crops, as the released checkpoints
    if smoke:
        vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
        tc = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    else:
        vc = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16)
        tc = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6)
    vc.update(model_type="siglip_vision_model", image_size=side, patch_size=14, hidden_act="gelu_pytorch_tanh")
    tc.update(model_type="qwen2", vocab_size=152064, max_position_embeddings=32768)
    cfg = LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_id=IMG_Q, video_token_id=VID_Q,
                               image_grid_pinpoints=[[i * side, j * side] for i in range(1, 7) for j in range(1, 7)])
    return _make(LlavaOnevisionForConditionalGeneration, cfg, device, dtype)


def onevision_inputs(model, kind, batch, text, device, dtype, seed=1):
    """``(kwargs for generate, visual tokens per row, newline tokens per row)``: a 768x1152 image (2x3 tiles) or a
    16-frame video (the smoke config: crops of 56 px, 4 frames)."""
    side = model.config.vision_config.image_size
    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        sizes = torch.tensor([[2 * side, 3 * side]] * batch, device=device)
        pv = torch.randn(batch, 7, 3, side, side, generator=g).to(device, dtype)
        with torch.inference_mode():  # the placeholder count, from the model's own packing
            packed = model.model.get_image_features(pv[:1], sizes[:1]).pooler_output[0]
        newlines = int((packed == model.model.image_newline).all(-1).sum())
        total, tok, kw = packed.shape[0], IMG_Q, {"pixel_values": pv, "image_sizes": sizes}
    else:
        frames = 4 if side == 56 else 16
        total, newlines, tok = frames * math.ceil(side // 14 / 2) ** 2 + 1, 1, VID_Q
        kw = {"pixel_values_videos": torch.randn(batch, frames, 3, side, side, generator=g).to(device, dtype)}
    txt = torch.randint(2, 150000, (batch, text), generator=g)
    kw["input_ids"] = torch.cat([txt[:, :5], torch.full((batch, total), tok), txt[:, 5:]], 1).to(device)
    return kw, total - newlines, newlines


BUILD = {"qwen": build_qwen, "llava": build_llava, "onevision": build_onevision}


def qwen_inputs(kind, smoke, batch, text, device, dtype, seed=1):
    """``(kwargs for generate, visual tokens per row)``: an image (1008x1344) or a 16-frame video (448x448)."""
    if kind == "image":
        grid = (1, 8, 12) if smoke else (1, 72, 96)
        tok, pv_key, grid_key = IMG_Q, "pixel_values", "image_grid_thw"
    else:
        grid = (2, 8, 8) if smoke else (8, 32, 32)
        tok, pv_key, grid_key = VID_Q, "pixel_values_videos", "video_grid_thw"
    n = grid[0] * grid[1] * grid[2] // 4
    g = torch.Generator().manual_seed(seed)
    txt = torch.randint(2, 150000, (batch, text), generator=g)
    pre = 5
    ids = torch.cat([txt[:, :pre], torch.full((batch, 1), VS_Q), torch.full((batch, n), tok),
                     torch.full((batch, 1), VE_Q), txt[:, pre:]], 1).to(device)
    pv = torch.randn(batch * grid[0] * grid[1] * grid[2], 3 * 2 * 14 * 14, generator=g).to(device, dtype)
    kw = {"input_ids": ids, pv_key: pv, grid_key: torch.tensor([grid] * batch, device=device),
          "mm_token_type_ids": (ids == tok).int() * (1 if kind == "image" else 2)}
    if kind == "video":
        kw["second_per_grid_ts"] = torch.ones(batch, device=device)
    return kw, n


def llava_inputs(model, batch, text, device, dtype, seed=1):
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    g = torch.Generator().manual_seed(seed)
    txt = torch.randint(2, 31000, (batch, text), generator=g)
    ids = torch.cat([txt[:, :5], torch.full((batch, n), IMG_L), txt[:, 5:]], 1).to(device)
    pv = torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g).to(device, dtype)
    return {"input_ids": ids, "pixel_values": pv}, n


def _qwen_pixels(kw):
    if "pixel_values" in kw and "image_grid_thw" in kw:
        return kw["pixel_values"], kw["image_grid_thw"]
    return kw["pixel_values_videos"], kw["video_grid_thw"]


def tower_fn(model, kw):
    """The unpatched vision tower on the call's pixels; for a model patched with a Qwen in-tower method, the
    adapter's tower pass with the reduction that call gets."""
    if "image_grid_thw" in kw or "video_grid_thw" in kw:
        pv, grid = _qwen_pixels(kw)
        patch = get_patch(model)
        ad = patch.adapter if patch is not None else None
        if ad is None or getattr(ad, "at", None) is None:
            return lambda: model.model.visual(pv, grid_thw=grid)
        m = ad.merge
        grids = [(h // m, w // m) if t == 1 else (t, h // m, w // m) for t, h, w in grid.tolist()]
        items = [(g, ad.kept_count(math.prod(g), g)) for g in grids]
        if all(k >= math.prod(g) for g, k in items):  # nothing pruned: the call runs the model untouched
            return lambda: model.model.visual(pv, grid_thw=grid)
        red = Reduction(ad.reducer, ad.at, items, ad.score_blocks)
        return lambda: run(ad.tower, pv, grid, red, ad.attention)
    pv = kw.get("pixel_values", kw.get("pixel_values_videos"))
    if pv.dim() == 5:  # OneVision: crops / frames of each row
        pv = pv.flatten(0, 1)
    return lambda: model.model.vision_tower(pv, output_hidden_states=True)


def tower_layouts(model, name, kind, kw, bs, args, device, rows):
    """Qwen: tokenprune's tower pass without reduction, per attention layout, against transformers' tower."""
    pv, grid = _qwen_pixels(kw)
    tower = Tower.of(model.model.visual, "qwen2_5_vl")
    with torch.inference_mode():
        ref = model.model.visual(pv, grid_thw=grid).pooler_output.float()
    hf_ms = time_fn(lambda: model.model.visual(pv, grid_thw=grid), device, 1, args.reps).median_ms
    for how in ("pad", "varlen") + (("mask",) if bs == 1 else ()):
        try:
            with torch.inference_mode():
                out = run(tower, pv, grid, None, how)[0].float()
                ms = time_fn(lambda: run(tower, pv, grid, None, how), device, 1, args.reps).median_ms
        except Exception:
            traceback.print_exc()
            rows.append({"model": name, "input": kind, "batch": bs, "layout": how,
                         "error": traceback.format_exc(limit=3)})
            continue
        diff = float((out - ref).abs().max() / ref.abs().max())
        rows.append({"model": name, "input": kind, "batch": bs, "layout": how, "tower_ms": ms, "hf_tower_ms": hf_ms,
                     "rel_max_diff": diff})
        print(f"{name} {kind} bs={bs} tower without reduction, attention {how:>6}: {ms:8.1f} ms (transformers "
              f"{hf_ms:.1f} ms); max |diff| / max |ref| = {diff:.2e}", flush=True)


def lm_len(model, kw) -> int:
    seen = []
    h = model.model.language_model.register_forward_pre_hook(
        lambda mod, a, k: seen.append(k["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        with torch.inference_mode():
            model.generate(**kw, max_new_tokens=1, do_sample=False)
    finally:
        h.remove()
    return seen[0]


def bench(model, name, kind, kw, n, bs, args, device, rows, layout_rows, extra=0):
    runs = [("none", 1.0, {}), ("cls", 1.0, {}), ("cls", 0.25, {}), ("cls", 0.1, {})]
    if bs == 1:
        runs += [("random", 0.1, {}), ("pool", 0.1, {})]
        if name == "qwen":
            runs += [("cls", 0.1, {"layers": [len(model.model.visual.blocks) - 1]}),
                     ("cls", 0.1, {"substitute": "mean_query"})]
    if name == "qwen":
        tower_layouts(model, name, kind, kw, bs, args, device, layout_rows)
    # per configuration once: LM input length, tower time, peak memory (and a warm-up of its generate())
    done = []
    for method, budget, opts in runs:
        try:
            done.append(prepare(model, name, kind, kw, n, bs, args, device, method, budget, opts, extra))
        except Exception:  # one failing configuration must not lose the rest of a GPU run
            traceback.print_exc()
            rows.append({"model": name, "input": kind, "batch": bs, "method": method, "budget": budget,
                         "options": opts, "error": traceback.format_exc(limit=3)})
            if method == "none":
                return
    # TTFT and decode in interleaved rounds (every configuration once per round, the unpatched model first): the
    # hosts' speed drifts by up to 2x within a run, and a ratio taken within one round cancels that drift
    for _ in range(args.reps):
        for row in done:
            row["samples"].append(sample(model, kw, bs, args, device, row))
    base = done[0]["samples"]
    for row in done:
        ttfts, rates = [t for t, _ in row["samples"]], [r for _, r in row["samples"]]
        row.update(ttft_ms=_median(ttfts), decode_tok_s=_median(rates),
                   ttft_speedup=_median([b[0] / t for b, t in zip(base, ttfts)]),
                   decode_speedup=_median([r / b[1] for b, r in zip(base, rates)]))
        del row["apply"], row["samples"]
        rows.append(row)
        print(f"{name} {kind} bs={bs} {row['method']:>6} b={row['budget']:<4} visual {row['visual_kept']:>5}/{n} "
              f"TTFT {row['ttft_ms']:8.1f} ms (x{row['ttft_speedup']:.2f}, LM FLOP bound "
              f"x{row['flop_bound_speedup']:.2f}; tower {row['tower_ms']:.1f} ms; GPU busy {_ms(row['gpu_busy_ms'])}) "
              f"decode {row['decode_tok_s']:8.1f} "
              f"tok/s (x{row['decode_speedup']:.3f}) peak {row['peak_mib'] or 0:.0f} MiB", flush=True)


def _ms(v):
    return "-" if v is None else f"{v:.1f}"


def _median(xs):
    return sorted(xs)[len(xs) // 2]


def prepare(model, name, kind, kw, n, bs, args, device, method, budget, opts, extra):
    """One configuration's fixed facts: LM input length, tower time, peak memory, FLOP bound. ``extra``: prompt
    tokens around the visual ones that pruning keeps (Qwen's <vision_start> / <vision_end>, OneVision's newlines)."""
    tc = model.config.text_config
    if method != "none":
        tokenprune.apply(model, budget=budget, method=method, **opts)
    try:
        length = lm_len(model, kw)
        with torch.inference_mode():
            tower_ms = time_fn(tower_fn(model, kw), device, 1, args.reps).median_ms
        ttft_call = lambda: model.generate(**kw, max_new_tokens=1, do_sample=False)  # noqa: E731
        peak, _ = peak_memory(ttft_call, device)
        busy = device_busy_ms(ttft_call, device)  # the GPU's share of a TTFT: the rest is host time
    finally:
        if method != "none":
            tokenprune.remove(model)
    bound = prefill_flops(tc, args.text + n + extra) / prefill_flops(tc, length)  # per row (rows are alike)
    label = method + "".join(f" {k}={v}" for k, v in opts.items())
    return {"model": name, "input": kind, "batch": bs, "method": label, "budget": budget, "visual_tokens": n,
            "visual_kept": length - args.text - extra, "lm_prefill_tokens": length, "tower_ms": tower_ms,
            "peak_mib": peak, "gpu_busy_ms": busy, "flop_bound_speedup": bound, "apply": (method, budget, opts),
            "samples": []}


def sample(model, kw, bs, args, device, row):
    """One TTFT (``generate(max_new_tokens=1)``) and one decode rate (a clock at every step's logits inside one
    ``generate(1 + D)``, after the first token: a TTFT measured apart would be subtracted, noise and all; the rate of
    the median step)."""
    method, budget, opts = row["apply"]
    if method != "none":
        tokenprune.apply(model, budget=budget, method=method, **opts)
    try:
        ttft = time_fn(lambda: model.generate(**kw, max_new_tokens=1, do_sample=False), device, 0, 1).median_ms
        clock = StepClock(device)
        model.generate(**kw, max_new_tokens=1 + args.decode, min_new_tokens=1 + args.decode, do_sample=False,
                       logits_processor=LogitsProcessorList([clock]))
    finally:
        if method != "none":
            tokenprune.remove(model)
    # the median step, not the mean: in run 15 the mean rate at budget 1.0 (the model untouched) read 0.82x to 1.19x
    # of the unpatched one; a few slow steps (host hiccups) move a mean, not a median. Not yet rerun on a GPU
    return ttft, bs / max(clock.median_step_s(), 1e-9)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny configs on CPU, seconds")
    ap.add_argument("--models", default="qwen,llava", help="of qwen, llava, onevision")
    ap.add_argument("--inputs", default="image,video", help="qwen and onevision inputs")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--decode", type=int, default=32, help="new tokens timed for the decode rate")
    ap.add_argument("--text", type=int, default=40, help="text tokens in the prompt")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    if args.smoke:  # a check of the script, under a minute on CPU
        args.reps, args.decode = min(args.reps, 2), min(args.decode, 4)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    if device == "cpu":
        torch.set_num_threads(1)
    dtype = torch.float16 if device == "cuda" else torch.float32
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "device": device,
           "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype), "smoke": args.smoke}
    print(env, flush=True)
    rows, layout_rows = [], []
    batches = [int(b) for b in args.batches.split(",")]
    for name in args.models.split(","):
        t0 = time.time()
        model = BUILD[name](args.smoke, device, dtype)
        print(f"built {name} in {time.time() - t0:.1f} s", flush=True)
        kinds = ["image"] if name == "llava" else args.inputs.split(",")
        for kind in kinds:
            for bs in batches:
                extra = 2 if name == "qwen" else 0  # <vision_start> / <vision_end>
                if name == "qwen":
                    kw, n = qwen_inputs(kind, args.smoke, bs, args.text, device, dtype)
                elif name == "onevision":
                    kw, n, extra = onevision_inputs(model, kind, bs, args.text, device, dtype)
                else:
                    kw, n = llava_inputs(model, bs, args.text, device, dtype)
                bench(model, name, kind, kw, n, bs, args, device, rows, layout_rows, extra)
                del kw
                Path(args.out).mkdir(parents=True, exist_ok=True)  # partial results after every configuration
                partial = {"env": env, "rows": rows, "layouts": layout_rows}
                (Path(args.out) / "vlm_gpu.partial.json").write_text(json.dumps(partial, indent=1))
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vlm_gpu.json").write_text(json.dumps({"env": env, "args": vars(args), "rows": rows, "layouts": layout_rows},
                                                      indent=1))
    lines = [f"VLM shapes (random weights, {env['dtype']}, SDPA) on {env['gpu']}; torch {env['torch']}, transformers "
             f"{env['transformers']}; {args.text} text tokens; decode = {args.decode} new tokens; median of "
             f"{args.reps}.", "",
             "| model | input | batch | method | budget | visual to LM | tower ms | TTFT ms | GPU busy ms | "
             "TTFT speed-up | LM prefill FLOP bound | decode tok/s | decode speed-up | peak MiB |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['input']} | {r['batch']} | {r['method']} | {r['budget']} | error |")
            continue
        m = "unpatched" if r["method"] == "none" else r["method"]
        lines.append(f"| {r['model']} | {r['input']} | {r['batch']} | {m} | {r['budget']} | {r['visual_kept']}/"
                     f"{r['visual_tokens']} | {r['tower_ms']:.1f} | {r['ttft_ms']:.1f} | {_ms(r['gpu_busy_ms'])} | "
                     f"{r['ttft_speedup']:.2f}x | "
                     f"{r['flop_bound_speedup']:.2f}x | {r['decode_tok_s']:.1f} | {r['decode_speedup']:.3f}x | "
                     f"{r['peak_mib'] or 0:.0f} |")
    if layout_rows:
        lines += ["", "Qwen tower without reduction (tokenprune's pass, one attention launch per block) against "
                  "transformers' tower:", "", "| input | batch | attention | tower ms | transformers ms | "
                  "max abs diff / max abs |", "|---|---:|---|---:|---:|---:|"]
        for r in layout_rows:
            if "error" in r:
                lines.append(f"| {r['input']} | {r['batch']} | {r['layout']} | error | | |")
            else:
                lines.append(f"| {r['input']} | {r['batch']} | {r['layout']} | {r['tower_ms']:.1f} | "
                             f"{r['hf_tower_ms']:.1f} | {r['rel_max_diff']:.1e} |")
    (out / "vlm_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
