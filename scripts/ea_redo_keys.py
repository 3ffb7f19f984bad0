"""How often the linear attention's fixed-shift pass 1 would redo a chunk on real keys (CPU, real weights).

Pass 1 shifts every key feature by the max of its chunk's first 64-token tile; a float16 exponential
overflows when a later key of the chunk is more than ln(65504) = 11.09 above it, and then the chunk is
redone with its own max (slower, still exact). This script runs real models on real inputs, splits each
block's keys [B, H, N, d] into chunks the way the kernel does on an H100 (132 SMs, 2 programs per SM at
d = 64), and counts the programs that would redo their chunk and the largest gap seen:

- ViT-S/14 (DINOv2 architecture, the CIFAR-10 classifier in ../shared/assets) at 518 and 896 px
  (1370 and 4097 tokens) on CIFAR-10 test images;
- Whisper tiny.en's encoder (1500 tokens) on four of the transcribed utterances.

    python scripts/ea_redo_keys.py --out docs/results/ea_redo_keys.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenprune import data  # noqa: E402
from tokenprune.kernels import triton_impl as T  # noqa: E402
from tokenprune.models import load_timm  # noqa: E402

LIMIT = math.log(65504.0)  # float16's largest finite value


def chunks(n: int, bh: int, d: int = 64, sms: int = 132):
    """The pass-1 chunks of ``efficient_attention`` for ``bh`` heads of ``n`` tokens (its split rule)."""
    bn = T._cfg(T.EA_CONFIG["pass1"], d)[0]
    slots = T._cfg(T.EA_CONFIG["programs_per_sm"], d) * sms
    split = max(1, min(max(1, slots // bh), n // T.EA_CONFIG["min_chunk"]))
    chunk = math.ceil(math.ceil(n / split) / bn) * bn
    return bn, [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def redo_stats(k: torch.Tensor, where: str) -> dict:
    b, h, n, d = k.shape
    bn, parts = chunks(n, b * h, d)
    programs = redo = 0
    gap_max = 0.0
    for s, e in parts:
        gap = k[:, :, s:e].amax(2) - k[:, :, s:min(s + bn, e)].amax(2)  # [B, H, d]
        programs += b * h
        redo += int((gap > LIMIT).any(-1).sum())
        gap_max = max(gap_max, float(gap.max()))
    return {"where": where, "tokens": n, "programs": programs, "redo": redo, "largest_gap": round(gap_max, 2)}


def vit_keys(sizes, images: int):
    m = load_timm("vit_small_patch14_dinov2", weights=data.default_asset("vit-s14-cifar10", "model.safetensors"),
                  num_classes=10, img_size=224, dynamic_img_size=True).eval()
    imgs, _, _ = data.load_image_folder(data.default_asset("cifar10", "cifar10_jpeg_test.tar.gz"), limit=images)
    keys = []

    def hook(mod, inp, _out):
        x = inp[0]
        b, n, c = x.shape
        keys.append(mod.qkv(x).reshape(b, n, 3, mod.num_heads, c // mod.num_heads)[:, :, 1].transpose(1, 2).float())

    hooks = [blk.attn.register_forward_hook(hook) for blk in m.blocks]
    for size in sizes:
        keys.clear()
        with torch.no_grad():
            m(data.to_tensor(imgs, size=size))
        for i, k in enumerate(keys):
            yield redo_stats(k, f"vit-s14 {size}px block {i}")
    for hk in hooks:
        hk.remove()


def whisper_keys(utterances: int):
    import soundfile as sf
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    d = data.default_asset("whisper-tiny.en")
    proc = WhisperProcessor.from_pretrained(d)
    wm = WhisperForConditionalGeneration.from_pretrained(d).float().eval()
    items = data.load_speech_manifest(data.default_asset("speech-hifitts-6097"), limit=utterances)
    heads = wm.config.encoder_attention_heads
    keys = []

    def hook(mod, args, kwargs, _out):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        b, n, c = hs.shape
        keys.append(mod.k_proj(hs).reshape(b, n, heads, c // heads).transpose(1, 2).float())

    for layer in wm.model.encoder.layers:
        layer.self_attn.register_forward_hook(hook, with_kwargs=True)
    feats = proc([sf.read(str(p))[0] for p, _ in items], sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        wm.model.encoder(feats)
    for i, k in enumerate(keys):
        yield redo_stats(k, f"whisper tiny.en block {i}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/ea_redo_keys.json")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--utterances", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(4)
    rows = list(vit_keys((518, 896), args.images)) + list(whisper_keys(args.utterances))
    for r in rows:
        print(f"{r['where']:<28} N {r['tokens']:5d}  redo {r['redo']:3d} / {r['programs']:3d}  "
              f"largest gap {r['largest_gap']:.2f} (limit {LIMIT:.2f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"limit": LIMIT, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
