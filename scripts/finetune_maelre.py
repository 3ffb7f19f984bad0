"""MAELRE accuracy on real data (CPU): linear attention with and without a short fine-tune.

The real ViT-S/14 CIFAR-10 classifier (../shared/assets/vit-s14-cifar10) at a reduced input size (default
112 px = 64 patches + [CLS]). Its token counts never exceed the default switch point (N > D = 384), so the
switch is forced lower (``--switch-at``, default 40): blocks with more tokens run the linear "efficient
attention". Reports top-1 on held-out test images for: the unreduced model; the same merging schedule with
SDPA everywhere (``switch_at`` huge: the cost of merging alone); MAELRE before fine-tuning; MAELRE after
``tokenprune.training.finetune_linear_attention`` (attention weights of the linear blocks only, distilled
from the unreduced model, ``--steps`` batches of training images).

    python scripts/finetune_maelre.py --out runs/maelre
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import tokenprune
from tokenprune.data import default_asset, load_image_folder, to_tensor
from tokenprune.models import load_timm
from tokenprune.training import finetune_linear_attention


@torch.no_grad()
def accuracy(model, x, y, batch=64):
    return sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch)) / len(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/maelre")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--switch-at", type=int, default=40)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--test-images", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = load_timm("vit_small_patch14_dinov2", default_asset("vit-s14-cifar10"), img_size=args.size).eval().float()
    tr_img, tr_y, _ = load_image_folder(default_asset("cifar10", "cifar10_jpeg_train.tar.gz"),
                                        limit=args.steps * args.batch, seed=1)
    te_img, te_y, _ = load_image_folder(default_asset("cifar10", "cifar10_jpeg_test.tar.gz"),
                                        limit=args.test_images, seed=0)
    xtr, ytr = to_tensor(tr_img, args.size), torch.tensor(tr_y)
    perm = torch.randperm(len(xtr))
    xtr, ytr = xtr[perm], ytr[perm]
    xte, yte = to_tensor(te_img, args.size), torch.tensor(te_y)
    loader = [(xtr[i:i + args.batch], ytr[i:i + args.batch]) for i in range(0, len(xtr), args.batch)]

    res = {"args": vars(args), "unreduced": accuracy(model, xte, yte)}
    tokenprune.apply(model, budget=args.budget, method="maelre", switch_at=10**9)
    res["merge_only_sdpa"] = accuracy(model, xte, yte)
    tokenprune.apply(model, budget=args.budget, method="maelre", switch_at=args.switch_at)
    plan = tokenprune.plan(model)
    res["plan"] = plan.to_dict()
    res["linear_blocks"] = [i for i, a in enumerate(plan.attention_per_block()) if a == "linear"]
    res["maelre_before"] = accuracy(model, xte, yte)
    print(plan.summary(), "\n", {k: v for k, v in res.items() if k not in ("plan",)}, flush=True)
    t = time.time()
    hist = finetune_linear_attention(model, loader, epochs=1, lr=args.lr,
                                     callback=lambda r: print(f"step {r['step']} loss {r['loss']:.3f} "
                                                              f"kl {r['kl']:.3f}", flush=True))
    res["finetune_seconds"] = time.time() - t
    res["maelre_after"] = accuracy(model, xte, yte)
    res["history"] = hist
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "maelre_finetune.json").write_text(json.dumps(res, indent=1))
    lines = ["| model | blocks on linear attention | top-1 |", "|---|---|---|",
             f"| unreduced | - | {100 * res['unreduced']:.1f}% |",
             f"| merging only (SDPA everywhere), budget {args.budget} | none | {100 * res['merge_only_sdpa']:.1f}% |",
             f"| maelre, switch_at={args.switch_at}, no fine-tune | {res['linear_blocks']} | "
             f"{100 * res['maelre_before']:.1f}% |",
             f"| maelre after {len(hist)} x {args.batch} fine-tune steps | {res['linear_blocks']} | "
             f"{100 * res['maelre_after']:.1f}% |"]
    (out / "maelre_finetune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
