"""Apply a reducer to a ViT and print the tokens kept per block, the time and the agreement with the
unreduced model.

By default: the real ViT-S/14 CIFAR-10 classifier (``vit-s14-cifar10``) and CIFAR-10 test images
from the assets folder (``--assets``, else ``$TOKENPRUNE_ASSETS``, else ``../shared/assets`` next
to the tokenprune checkout). Without them it runs a RANDOM-weight ViT-S/14 at 224 px and random
images, and says so in a WARNING line on stderr. Progress lines go to stderr, results to stdout.

Timing: each model first runs once over all the images, untimed (the outputs compared, and the
warm-up); then ``--warmup`` more untimed batches and ``--repeats`` timed forwards of one batch
(``--batch-size`` images). Both models are timed the same way, warm; the median and the p10-p90
spread are reported, with the FLOP bound ``1 / flop_ratio`` beside the speed-up and a note when
the measured figure is above it.
"""
# (This docstring is the command's --help.) The timing is tokenprune.bench.time_fn's.
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import (BUDGET_HELP, UsageError, add_model_source_arguments, budget_arg, check_methods, info,
                      nonnegative_int, positive_int, set_threads, warn)

DEFAULT_MODEL = ("vit-s14-cifar10",)
DEFAULT_DATA = ("cifar10", "cifar10_jpeg_test.tar.gz")
FALLBACK = "vit_small_patch14_dinov2"  # the architecture of the assets' model, when its weights are missing


def add_arguments(p):
    add_model_source_arguments(p, "vit-s14-cifar10 in the assets folder; a RANDOM-weight "
                                  f"{FALLBACK} at 224 px if it is missing")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="labelled images: .tar.gz of class folders or ImageFolder dir; 'none' for random images "
                        "(default: the assets' CIFAR-10 test archive; random images if it is missing)")
    p.add_argument("--method", default="merge",
                   help="reduction method (tokenprune.methods(); an unknown name is refused with the list)")
    p.add_argument("--budget", type=budget_arg, default=0.25, help=BUDGET_HELP)
    p.add_argument("--images", type=positive_int, default=64, help="number of images to run")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per forward")
    p.add_argument("--warmup", type=nonnegative_int, default=0,
                   help="untimed batches before timing each model, after its untimed pass over all the images")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="timed forwards of one batch per model; the median and p10-p90 spread are reported")
    p.add_argument("--threads", type=nonnegative_int, default=0, help="torch threads (0: leave torch's default)")


def speed_report(t_ref, t_red, flop_ratio: float, method: str, n_images: int) -> list[str]:
    """Lines comparing two :class:`tokenprune.bench.Timing` of the same batch of ``n_images``: medians, spreads,
    the speed-up and its range against the FLOP bound ``1 / flop_ratio``, and a note when the
    measured speed-up is above that bound."""
    bound = 1.0 / flop_ratio
    speedup = t_ref.median_ms / t_red.median_ms
    low, high = t_ref.p10_ms / t_red.p90_ms, t_ref.p90_ms / t_red.p10_ms
    lines = [f"time per batch of {n_images} images on CPU (median of {t_ref.repeats}, p10-p90 in brackets): unreduced "
             f"{t_ref.median_ms:.0f} ms [{t_ref.p10_ms:.0f}-{t_ref.p90_ms:.0f}], {method} {t_red.median_ms:.0f} ms "
             f"[{t_red.p10_ms:.0f}-{t_red.p90_ms:.0f}]",
             f"speed-up {speedup:.2f}x [{low:.2f}-{high:.2f}]; FLOP bound {bound:.2f}x (1 / FLOP ratio {flop_ratio:.3f})"]
    if speedup > bound:
        lines.append(f"note: the measured speed-up {speedup:.2f}x is above the FLOP bound {bound:.2f}x. The bound "
                     "counts the encoder blocks' matrix products only: a figure above it is timing noise (a busy "
                     "or shared CPU, clock changes) or costs the count leaves out that shrink faster with fewer "
                     "tokens (softmax over n^2 scores, memory traffic). Rerun with more --repeats, or use "
                     "`tokenprune bench` for a careful measurement.")
    return lines


def run(args):
    check_methods([args.method])  # before anything slow
    data_none = args.data is not None and args.data.lower() == "none"
    if args.data is not None and not data_none and not Path(args.data).exists():
        raise UsageError(f"--data {args.data} does not exist")
    set_threads(args.threads)

    import torch

    from .. import api
    from .. import bench as B
    from ..data import assets_dir, assets_source, default_asset, load_image_folder, to_tensor
    from ._common import load_model, resolve_model

    spec, is_default = resolve_model(args.model, DEFAULT_MODEL)
    if is_default and not Path(spec).exists():
        warn(f"no model at {spec} (assets folder {assets_dir()}, from {assets_source()}): running a RANDOM-weight "
             f"{FALLBACK} at 224 px; agreement and accuracy mean nothing. Pass --assets or set $TOKENPRUNE_ASSETS.")
        model_args = {"img_size": 224, "num_classes": 10, **json.loads(args.model_args or "{}")}
        args = argparse.Namespace(**{**vars(args), "model_args": json.dumps(model_args)})
        spec = FALLBACK
    lm = load_model(spec, args, what="quickstart")
    if lm.family != "timm" or lm.modality != "image":
        raise UsageError(f"quickstart runs timm image models; {lm.name} is a {lm.family} {lm.modality} model "
                         "(use `tokenprune eval` or `tokenprune bench`)")
    model = lm.model.eval()
    size = lm.img_size[0] if lm.img_size else 224

    data_path = None if data_none else Path(args.data) if args.data else default_asset(*DEFAULT_DATA)
    labels = None
    if data_path is not None and data_path.exists():
        info(f"reading {args.images} images from {data_path}")
        images, labels, classes = load_image_folder(data_path, limit=args.images)
        x = to_tensor(images, size, lm.mean, lm.std)
        labels = torch.tensor(labels)
        print(f"data: {len(images)} images from {data_path}")
    else:
        if data_path is not None:
            warn(f"no data at {data_path} (assets folder {assets_dir()}, from {assets_source()}): using random images")
        torch.manual_seed(args.seed)
        x = torch.randn(args.images, 3, size, size)
        print(f"data: {len(x)} random images")

    def run_model():
        return torch.cat([model(x[i:i + args.batch_size]) for i in range(0, len(x), args.batch_size)])

    batch = x[:args.batch_size]

    def run_batch():
        return model(batch)

    info(f"evaluating on {len(x)} images: unreduced, then {args.method}@{args.budget:g}; each then timed warm "
         f"on a batch of {len(batch)} ({args.warmup} more warm-up + {args.repeats} timed forwards)")
    with torch.inference_mode():
        ref = run_model()  # untimed: the outputs compared, and the warm-up
        t_ref = B.time_fn(run_batch, "cpu", args.warmup, args.repeats)
        api.apply(model, budget=args.budget, method=args.method)
        try:
            plan = api.plan(model)
            out = run_model()
            t_red = B.time_fn(run_batch, "cpu", args.warmup, args.repeats)
        finally:
            api.remove(model)

    print(plan.summary())
    print(f"tokens entering each block (non-prefix): {plan.tokens_per_block()}")
    for line in speed_report(t_ref, t_red, plan.flop_ratio, args.method, len(batch)):
        print(line)
    agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
    cos = torch.nn.functional.cosine_similarity(out.float(), ref.float(), dim=1).mean().item()
    print(f"agreement with the unreduced model: top-1 {agree:.1%}, logit cosine {cos:.4f}"
          + (" (RANDOM weights: not meaningful)" if lm.random_weights else ""))
    if labels is not None and not lm.random_weights and lm.num_classes == len(classes):
        acc_ref = (ref.argmax(1) == labels).float().mean().item()
        acc = (out.argmax(1) == labels).float().mean().item()
        print(f"top-1 accuracy: unreduced {acc_ref:.1%}, {args.method}@{args.budget:g} {acc:.1%}")
    return 0
