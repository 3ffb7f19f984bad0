"""Apply a reducer to a timm ViT and print tokens kept per block, time and agreement with the unreduced model.

Uses the real CIFAR-10 ViT-S/14 and CIFAR-10 test images from the shared assets
folder when they are there, random weights and random images otherwise (said so).
"""
from __future__ import annotations

import time

import torch

from .. import api
from ..data import default_asset, load_image_folder, to_tensor
from ..models import load_timm


def add_arguments(p):
    p.add_argument("--model", default="vit_small_patch14_dinov2", help="timm model name")
    p.add_argument("--weights", default=str(default_asset("vit-s14-cifar10")),
                   help="local weights (file or folder with config.json); 'none' for random weights")
    p.add_argument("--data", default=str(default_asset("cifar10", "cifar10_jpeg_test.tar.gz")),
                   help="labelled images (.tar.gz of class folders or ImageFolder dir); 'none' for random images")
    p.add_argument("--method", default="merge")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")


@torch.no_grad()
def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    from pathlib import Path

    weights = None if args.weights.lower() == "none" or not Path(args.weights).exists() else args.weights
    if weights is None:
        print(f"note: weights {args.weights} not found: using RANDOM weights (agreement is not meaningful)")
    model = load_timm(args.model, weights=weights, img_size=224).eval()
    labels = None
    if args.data.lower() != "none" and Path(args.data).exists():
        images, labels, classes = load_image_folder(args.data, limit=args.images)
        x = to_tensor(images, 224)
        labels = torch.tensor(labels)
        print(f"data: {len(images)} images from {args.data}")
    else:
        print(f"note: data {args.data} not found: using random images")
        x = torch.randn(args.images, 3, 224, 224)

    def run_model():
        outs, t0 = [], time.perf_counter()
        for i in range(0, len(x), args.batch_size):
            outs.append(model(x[i:i + args.batch_size]))
        return torch.cat(outs), time.perf_counter() - t0

    run_model() if len(x) <= args.batch_size else None  # warm-up
    ref, t_ref = run_model()
    api.apply(model, budget=args.budget, method=args.method)
    plan = api.plan(model)
    run_model()
    out, t_red = run_model()
    api.remove(model)

    print(plan.summary())
    print(f"tokens entering each block (non-prefix): {plan.tokens_per_block()}")
    print(f"time for {len(x)} images on CPU: unreduced {t_ref * 1e3:.0f} ms, {args.method} {t_red * 1e3:.0f} ms "
          f"({t_ref / t_red:.2f}x)")
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=1).mean().item()
    print(f"agreement with the unreduced model: top-1 {agree:.1%}, logit cosine {cos:.4f}")
    if labels is not None and weights is not None:
        acc_ref = (ref.argmax(1) == labels).float().mean().item()
        acc = (out.argmax(1) == labels).float().mean().item()
        print(f"top-1 accuracy: unreduced {acc_ref:.1%}, {args.method}@{args.budget} {acc:.1%}")
    return 0
