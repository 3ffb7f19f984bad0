"""WER of Whisper tiny.en (real weights) with the encoder's tokens reduced, on the 116 labeled utterances.

    python scripts/whisper_wer.py --out results/whisper_wer [--methods merge cls random] [--budgets 0.75 0.5 0.25]
                                  [--limit N] [--threads 1] [--num-beams 1 2]

CPU, fp32; greedy decoding, or beam search for each ``--num-beams`` value (each
decoding gets its own unreduced pass). Audio is padded to 30 s = 1500 encoder
tokens, so a budget applies to all 1500 frames including the padding. Writes
``wer.json`` (per configuration: WER, transcripts changed against the unreduced
pass of the same decoding, wall time, transcripts) and ``wer.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tokenprune  # noqa: E402
from tokenprune.speech import transcribe, wer  # noqa: E402

ASSETS = Path(os.environ.get("TOKENPRUNE_ASSETS", ROOT.parent / "shared" / "assets"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    ap.add_argument("--budgets", nargs="+", type=float, default=[0.75, 0.5, 0.25])
    ap.add_argument("--limit", type=int, default=None, help="first N utterances only")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--num-beams", nargs="+", type=int, default=[1],
                    help="decodings to run: 1 = greedy, k > 1 = beam search with k beams (default: 1)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unreduced pass")
    ap.add_argument("--options", default="{}", help='reducer options as JSON, e.g. \'{"substitute": "received"}\'')
    ap.add_argument("--time-encoder", action="store_true",
                    help="only time the encoder (batch 1, median of 5) for each configuration; no WER")
    ap.add_argument("--tag", default="", help="label for this run's rows (e.g. the options)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model_dir = ASSETS / "whisper-tiny.en"
    data_dir = ASSETS / "speech-hifitts-6097"
    if not model_dir.exists():
        sys.exit(f"no Whisper weights at {model_dir}; set TOKENPRUNE_ASSETS to the shared assets folder")
    proc = WhisperProcessor.from_pretrained(str(model_dir))
    model = WhisperForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32,
                                                            attn_implementation="sdpa").eval()
    rows = [json.loads(line) for line in (data_dir / "manifest.json").read_text().splitlines() if line.strip()]
    if args.limit:
        rows = rows[: args.limit]
    paths = [data_dir / r["audio_filepath"] for r in rows]
    refs = [r["text"] for r in rows]

    methods = args.methods or tokenprune.methods()
    if args.time_encoder:
        return time_encoder(model, methods, args, Path(args.out))
    configs = ([] if args.no_baseline else [("none", 1.0)]) + [(m, b) for m in methods for b in args.budgets]
    configs = [(beams, m, b) for beams in args.num_beams for m, b in configs]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results, unreduced = [], {}
    for beams, method, budget in configs:
        if method != "none":
            try:
                tokenprune.apply(model, budget, method, **json.loads(args.options))
            except Exception as e:  # a method that cannot run on Whisper: record why
                results.append(dict(method=method, budget=budget, num_beams=beams, error=f"{type(e).__name__}: {e}"))
                print(f"{method:>10} {budget:.2f}  skipped: {e}", flush=True)
                continue
        t0 = time.time()  # wall time of the whole transcription (reported beside the WER, not a benchmark)
        try:
            hyps = transcribe(model, proc, paths, batch_size=args.batch_size, num_beams=beams)
        except Exception as e:
            tokenprune.remove(model)
            results.append(dict(method=method, budget=budget, num_beams=beams, error=f"{type(e).__name__}: {e}"))
            print(f"{method:>10} {budget:.2f}  failed: {e}", flush=True)
            continue
        secs = time.time() - t0
        tokenprune.remove(model)
        keep = round(budget * 1500 + 1e-9) if method != "none" else 1500
        if method == "none":
            unreduced[beams] = hyps
        base = unreduced.get(beams)
        changed = None if base is None else sum(a != b for a, b in zip(hyps, base))
        r = dict(method=method + args.tag, budget=budget, num_beams=beams, tokens_out=keep, wer=wer(refs, hyps),
                 changed=changed, seconds=secs, hyps=hyps)
        results.append(r)
        print(f"{method:>10} {budget:.2f}  beams {beams}  tokens {keep:>4}  WER {100 * r['wer']:6.2f}%  "
              f"changed {changed}  {secs:7.1f} s", flush=True)
        (out_dir / "wer.json").write_text(json.dumps(dict(n_utterances=len(refs), threads=args.threads,
                                                          results=results), indent=1))

    lines = [f"Whisper tiny.en, {len(refs)} utterances (hifitts-6097), CPU fp32, {args.threads} thread(s)", "",
             "| decoding | method | budget | encoder tokens out | WER % | transcripts changed vs unreduced | "
             "wall s (CPU) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        dec = "greedy" if r["num_beams"] == 1 else f"{r['num_beams']} beams"
        if "error" in r:
            lines.append(f"| {dec} | {r['method']} | {r['budget']} | - | not applicable: {r['error'][:80]} | - | - |")
        else:
            changed = "-" if r["changed"] is None else f"{r['changed']} / {len(refs)}"
            lines.append(f"| {dec} | {r['method']} | {r['budget']} | {r['tokens_out']} | {100 * r['wer']:.2f} | "
                         f"{changed} | {r['seconds']:.0f} |")
    (out_dir / "wer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def time_encoder(model, methods, args, out_dir: Path):
    from tokenprune.bench import time_fn

    x = torch.randn(1, model.config.num_mel_bins, 2 * model.config.max_source_positions)

    def median_ms():
        return time_fn(lambda: model.model.encoder(x), "cpu", warmup=1, repeats=5).median_ms

    rows = []
    with torch.inference_mode():
        median_ms()
        base = median_ms()
        rows.append(dict(method="none", budget=1.0, encoder_ms=base, speedup=1.0))
        for method in methods:
            for budget in args.budgets:
                tokenprune.apply(model, budget, method, **json.loads(args.options))
                ms = median_ms()
                tokenprune.remove(model)
                rows.append(dict(method=method + args.tag, budget=budget, encoder_ms=ms, speedup=base / ms))
    for r in rows:
        print(f"{r['method']:>16} {r['budget']:.2f}  encoder {r['encoder_ms']:7.1f} ms  {r['speedup']:.2f}x")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "encoder_time.json").write_text(json.dumps(dict(threads=args.threads, results=rows), indent=1))


if __name__ == "__main__":
    main()
