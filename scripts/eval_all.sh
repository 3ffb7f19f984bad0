#!/usr/bin/env bash
# Real-weight accuracy retention on CPU -> docs/results/. Run from the repository root; the
# shared assets are expected at ../shared/assets (or $TOKENPRUNE_ASSETS). These are the exact
# commands behind docs/results/*.json|csv|png (2 shared CPU cores, one thread each).
# Images run in bfloat16 on CPU (about 2.5x faster than float32 here); the unreduced row is the
# bf16 model itself, so retention compares equal precision.
set -euo pipefail
OUT=${OUT:-docs/results}
A=${TOKENPRUNE_ASSETS:-../shared/assets}

# 1. top-1 of the CIFAR-10 ViT-S/14 classifier: 500 test images (50 per class), every method
#    registered at the time (apet, cls, maelre, merge, pool, random) at 3 budgets + unreduced.
tokenprune eval --model "$A/vit-s14-cifar10" --data "$A/cifar10/cifar10_jpeg_test.tar.gz" \
  --limit 500 --methods all --budgets 0.5,0.25,0.1 --dtype bfloat16 --threads 1 --batch-size 50 \
  --out "$OUT" --name eval_top1_vit-s14-cifar10 --no-progress
#    methods registered later (threshold) are added to the same results, reusing the rows above
cp "$OUT/eval_top1_vit-s14-cifar10.json" /tmp/eval_top1_first.json
tokenprune eval --model "$A/vit-s14-cifar10" --data "$A/cifar10/cifar10_jpeg_test.tar.gz" \
  --limit 500 --methods threshold --budgets 0.5,0.25,0.1 --dtype bfloat16 --threads 1 --batch-size 50 \
  --reuse /tmp/eval_top1_first.json --out "$OUT" --name eval_top1_vit-s14-cifar10 --no-progress

# 2. kNN-20 retention of the same backbone as a feature extractor (head removed, [CLS] features):
#    memory bank = 1000 train images, 500 test images; the reduced model computes both.
tokenprune eval --model "$A/vit-s14-cifar10" --num-classes 0 --task knn \
  --data "$A/cifar10/cifar10_jpeg_test.tar.gz" --train-data "$A/cifar10/cifar10_jpeg_train.tar.gz" \
  --limit 500 --train-limit 1000 --methods merge,cls --budgets 0.5,0.25 --dtype bfloat16 --threads 1 \
  --batch-size 50 --out "$OUT" --name eval_knn_vit-s14-cifar10 --no-progress

# 3. WER of Whisper tiny.en (greedy) on all 116 labelled utterances (--limit 0), float32
tokenprune eval --model "$A/whisper-tiny.en" --task wer --data "$A/speech-hifitts-6097" --limit 0 \
  --methods merge,cls,maelre --budgets 0.5,0.25 --batch-size 10 --threads 1 \
  --out "$OUT" --name eval_wer_whisper-tiny-en --no-progress

# 4. apet re-run after its default changed to prop_attn=False (no proportional attention): the
#    earlier apet rows are removed from the results file first, the other rows are reused
python3 - "$OUT/eval_top1_vit-s14-cifar10.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
d["rows"] = [r for r in d["rows"] if r["method"] != "apet"]
json.dump(d, open("/tmp/eval_top1_noapet.json", "w"))
PY
tokenprune eval --model "$A/vit-s14-cifar10" --data "$A/cifar10/cifar10_jpeg_test.tar.gz" \
  --limit 500 --methods apet --budgets 0.5,0.25,0.1 --dtype bfloat16 --threads 1 --batch-size 50 \
  --reuse /tmp/eval_top1_noapet.json --out "$OUT" --name eval_top1_vit-s14-cifar10 --no-progress

# 5. the merge-3-stages recipe (merge after blocks 2, 5, 8 only) at budget 0.25, other rows reused
cp "$OUT/eval_top1_vit-s14-cifar10.json" /tmp/eval_top1_cur.json
tokenprune eval --model "$A/vit-s14-cifar10" --data "$A/cifar10/cifar10_jpeg_test.tar.gz" \
  --limit 500 --methods merge --budgets 0.25 --recipe merge-3-stages --dtype bfloat16 --threads 2 \
  --batch-size 50 --reuse /tmp/eval_top1_cur.json --out "$OUT" --name eval_top1_vit-s14-cifar10 --no-progress
