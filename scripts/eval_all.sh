#!/usr/bin/env bash
# Real-weight accuracy retention on CPU -> docs/results/ (the tables of BENCHMARKS.md's accuracy section).
# Run from the repository root; the shared assets are expected at ../shared/assets (or $TOKENPRUNE_ASSETS).
# Images run in bfloat16 on CPU; the unreduced row is the bf16 model itself, so retention compares equal
# precision. The published files were built in steps as methods were added (docs/history); one run of
# the commands below gives the same rows, since every configuration is evaluated on the same data.
set -euo pipefail
OUT=${OUT:-docs/results}
A=${TOKENPRUNE_ASSETS:-../shared/assets}

# 1. top-1 of the CIFAR-10 ViT-S/14 classifier: 500 test images (50 per class), every method at 3 budgets,
#    and the merge-3-stages recipe
tokenprune eval --model "$A/vit-s14-cifar10" --data "$A/cifar10/cifar10_jpeg_test.tar.gz" \
  --limit 500 --methods all --budgets 0.5,0.25,0.1 --recipe merge-3-stages --dtype bfloat16 --threads 1 \
  --batch-size 50 --out "$OUT" --name eval_top1_vit-s14-cifar10 --no-progress

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
