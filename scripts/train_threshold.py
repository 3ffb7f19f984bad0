"""Short Adaptive Sparse ViT threshold training on real data (CPU), and the matched-FLOPs comparison.

Model: the real ViT-S/14 fine-tuned on CIFAR-10 (../shared/assets/vit-s14-cifar10), run at a reduced
input size (default 112 px = 8x8 patches + [CLS]) so a CPU run takes minutes; data: CIFAR-10 JPEGs
(../shared/assets/cifar10). Steps:

1. patch with ``method="threshold"`` (``budget=1.0``: no cap, thresholds alone decide), initial
   thresholds 1e-3, 2e-3, 3e-3 at blocks 3, 6, 9;
2. train the three thresholds with ``tokenprune.training.train_thresholds`` toward the FLOP ratio
   ``--target`` (backbone frozen, or also fine-tuned with ``--lr-backbone``), logging mean FLOP ratio
   and thresholds per step;
3. on held-out test images: accuracy and mean FLOP ratio of the unreduced model, the initial
   thresholds, the learned thresholds, and the initial thresholds uniformly SCALED (bisection on one
   factor, original weights) to the learned model's FLOP ratio -- the matched-FLOPs baseline.

    python scripts/train_threshold.py --out runs/threshold

Writes ``threshold_train.json`` and ``threshold_train.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time
from pathlib import Path

import torch

import tokenprune
from tokenprune.data import default_asset, load_image_folder, to_tensor
from tokenprune.models import load_timm
from tokenprune.training import flop_ratio_from_counts, train_thresholds


@torch.no_grad()
def evaluate(model, x, y, batch=64):
    """(top-1 accuracy, mean FLOP ratio, mean kept tokens at the output) of a threshold-patched model."""
    patch = tokenprune.get_patch(model)
    info = patch.plan_for().info if patch is not None else None
    correct, ratios, kept = 0, [], []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        if patch is None:  # the unreduced model (features() needs a patched one)
            feats, st = model.forward_features(xb), None
            logits = model.forward_head(feats)
        else:
            feats, st = tokenprune.features(model, xb)
            logits = model.forward_head(feats, sizes=st.sizes)
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
        counts = st.scratch.get("threshold_counts", []) if st is not None else []
        if counts:
            ratios.append(flop_ratio_from_counts(info, counts))
            kept.append(st.kept_per_sample().float())
        else:
            ratios.append(torch.ones(len(xb)))
            kept.append(torch.full((len(xb),), float(xb.shape[-1] // 14) ** 2))
    return correct / len(x), float(torch.cat(ratios).mean()), float(torch.cat(kept).mean())


def set_thresholds(model, values):
    with torch.no_grad():
        model.tokenprune_params.theta.copy_(torch.tensor(values))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/threshold")
    ap.add_argument("--size", type=int, default=112, help="input size in px (224 = the model's own)")
    ap.add_argument("--train-images", type=int, default=1280)
    ap.add_argument("--test-images", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--target", type=float, default=0.6, help="target FLOP ratio rho")
    ap.add_argument("--lr", type=float, default=2e-3, help="Adam lr of the thresholds")
    ap.add_argument("--flops-weight", type=float, default=20.0,
                    help="weight of |FLOPs - rho| (the paper's 2 is for 30 epochs of full fine-tuning; with "
                         "thresholds alone and a few dozen steps it loses to the task loss)")
    ap.add_argument("--lr-backbone", type=float, default=0.0,
                    help="> 0: also fine-tune every model weight (AdamW) -- the paper's setting")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    model = load_timm("vit_small_patch14_dinov2", default_asset("vit-s14-cifar10"), img_size=args.size).eval().float()
    tr_img, tr_y, _ = load_image_folder(default_asset("cifar10", "cifar10_jpeg_train.tar.gz"),
                                        limit=args.train_images, seed=args.seed)
    te_img, te_y, _ = load_image_folder(default_asset("cifar10", "cifar10_jpeg_test.tar.gz"),
                                        limit=args.test_images, seed=args.seed)
    xtr, ytr = to_tensor(tr_img, args.size), torch.tensor(tr_y)
    xte, yte = to_tensor(te_img, args.size), torch.tensor(te_y)
    order = list(range(len(xtr)))
    random.Random(args.seed).shuffle(order)
    xtr, ytr = xtr[order], ytr[order]
    loader = [(xtr[i:i + args.batch], ytr[i:i + args.batch]) for i in range(0, len(xtr), args.batch)]
    print(f"data + model: {time.time() - t0:.0f}s; train {len(xtr)}, test {len(xte)} images at {args.size}px")

    res = {"args": vars(args)}
    res["unreduced"] = dict(zip(("acc", "flop_ratio", "kept"), evaluate(model, xte, yte)))
    tokenprune.apply(model, budget=1.0, method="threshold")
    init = model.tokenprune_params.theta.detach().tolist()
    res["initial"] = dict(zip(("acc", "flop_ratio", "kept"), evaluate(model, xte, yte)), thresholds=init)
    print("unreduced", res["unreduced"], "\ninitial", res["initial"])

    original = copy.deepcopy(model.state_dict())
    t1 = time.time()
    hist = train_thresholds(model, loader, epochs=args.epochs, target=args.target, lr=args.lr,
                            flops_weight=args.flops_weight, lr_backbone=args.lr_backbone,
                            callback=lambda r: print(f"step {r['step']:3d} loss {r['loss']:.3f} ce {r['ce']:.3f} "
                                                     f"FLOPs {r['flop_ratio']:.3f} -> {r['target']} theta "
                                                     + ", ".join(f"{v:.4f}" for v in r["thresholds"]),
                                                     flush=True))
    res["train_seconds"] = time.time() - t1
    res["history"] = hist
    learned = model.tokenprune_params.theta.detach().tolist()
    res["learned"] = dict(zip(("acc", "flop_ratio", "kept"), evaluate(model, xte, yte)), thresholds=learned)
    print("learned", res["learned"])
    trained = copy.deepcopy(model.state_dict())
    if args.lr_backbone > 0:  # the thresholds alone, on the original weights
        model.load_state_dict({**original, "tokenprune_params.theta": trained["tokenprune_params.theta"]})
        res["learned_thresholds_original_weights"] = dict(
            zip(("acc", "flop_ratio", "kept"), evaluate(model, xte, yte)), thresholds=learned)
        print("learned thresholds on the original weights", res["learned_thresholds_original_weights"])
    model.load_state_dict(original)  # the matched-FLOPs baseline runs on the original weights

    # matched FLOPs: scale the initial thresholds by one factor until their FLOP ratio on the test
    # images equals the learned thresholds' (bisection in log space)
    goal = res["learned"]["flop_ratio"]
    lo, hi = 0.01, 100.0
    for _ in range(10):
        mid = (lo * hi) ** 0.5
        set_thresholds(model, [v * mid for v in init])
        r = evaluate(model, xte, yte)[1]
        lo, hi = (mid, hi) if r > goal else (lo, mid)
    scale = (lo * hi) ** 0.5
    set_thresholds(model, [v * scale for v in init])
    res["initial_scaled"] = dict(zip(("acc", "flop_ratio", "kept"), evaluate(model, xte, yte)),
                                 thresholds=[v * scale for v in init], scale=scale)
    model.load_state_dict(trained)
    print("initial scaled to matched FLOPs", res["initial_scaled"])

    (out / "threshold_train.json").write_text(json.dumps(res, indent=1))
    rows = [("unreduced", res["unreduced"]), ("initial thresholds", res["initial"]),
            ("initial x %.2f (matched FLOPs)" % scale, res["initial_scaled"])]
    if "learned_thresholds_original_weights" in res:
        rows.append(("learned thresholds, original weights", res["learned_thresholds_original_weights"]))
    rows.append(("learned" + (" thresholds + fine-tuned weights" if args.lr_backbone > 0 else " thresholds"),
                 res["learned"]))
    md = ["| thresholds | theta (blocks 3, 6, 9) | mean FLOP ratio | mean tokens out | top-1 |", "|---|---|---|---|---|"]
    for name, r in rows:
        th = ", ".join(f"{v:.4f}" for v in r.get("thresholds", [])) or "-"
        md.append(f"| {name} | {th} | {r['flop_ratio']:.3f} | {r['kept']:.1f} | {100 * r['acc']:.1f}% |")
    md.append("")
    md.append(f"Training: {len(hist)} steps x {args.batch} images, target rho={args.target}, "
              f"FLOP ratio {hist[0]['flop_ratio']:.3f} (first step) -> {hist[-1]['flop_ratio']:.3f} (last step), "
              f"{res['train_seconds']:.0f}s on {args.threads} CPU thread(s).")
    (out / "threshold_train.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
