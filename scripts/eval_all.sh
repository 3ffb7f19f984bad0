#!/usr/bin/env bash
# Real-weight accuracy-retention numbers on CPU (docs/results/). Run from the repository root;
# the shared assets are expected at ../shared/assets (or $TOKENPRUNE_ASSETS).
# bfloat16 on CPU, one thread: about 2.5x faster than float32 here; the unreduced rows show the
# bf16 model's own accuracy, so retention is measured at equal precision.
set -euo pipefail
OUT=${OUT:-docs/results}
A=${TOKENPRUNE_ASSETS:-../shared/assets}

# 1. top-1 on the CIFAR-10 ViT-S/14 classifier: 500 test images, every registered method
tokenprune eval --model "$A/vit-s14-cifar10" --data "$A/cifar10/cifar10_jpeg_test.tar.gz" \
  --limit 500 --methods all --budgets 0.5,0.25,0.1 --dtype bfloat16 --threads 1 --batch-size 50 \
  --out "$OUT" --name eval_top1_vit-s14-cifar10 --no-progress

# 2. kNN-20 retention of the same backbone as a feature extractor (head removed):
#    memory bank = 1000 train images, 400 test images; reduced model on both sides
tokenprune eval --model "$A/vit-s14-cifar10" --num-classes 0 --task knn \
  --data "$A/cifar10/cifar10_jpeg_test.tar.gz" --train-data "$A/cifar10/cifar10_jpeg_train.tar.gz" \
  --limit 400 --train-limit 1000 --methods merge,cls --budgets 0.5,0.25,0.1 --dtype bfloat16 --threads 1 \
  --batch-size 50 --out "$OUT" --name eval_knn_vit-s14-cifar10 --no-progress
