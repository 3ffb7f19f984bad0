"""Print the per-block schedule a method and budget give on a model, for the input that will run.

The model is given as for ``eval`` and ``bench`` (timm name, local folder or Hugging Face id; the
same loader). ``--input-size`` is the input the plan is made for: for image models the side of the
square image in pixels (a multiple of the patch size); for speech, audio and video models the
number of non-prefix tokens entering the encoder. Without it, the model's own input size (e.g. 224
px for the assets' ViT-S/14 CIFAR-10 classifier, 518 px for timm's vit_small_patch14_dinov2).
"""
from __future__ import annotations

import json

from ._common import (BUDGET_HELP, UsageError, add_model_source_arguments, budget_arg, check_methods, info,
                      positive_int)

DEFAULT_MODEL = ("vit-s14-cifar10",)


def add_arguments(p):
    add_model_source_arguments(p, "vit-s14-cifar10 in the assets folder (the quickstart's ViT-S/14 at 224 px)")
    p.add_argument("--method", default=None,
                   help="reduction method (tokenprune.methods(); an unknown name is refused with the list) "
                        "(default: merge, or the recipe's)")
    p.add_argument("--budget", type=budget_arg, default=None, help=BUDGET_HELP + " (default: 0.25, or the recipe's)")
    p.add_argument("--recipe", default=None, metavar="NAME_OR_YAML",
                   help="plan a named recipe or a recipe YAML file, as eval / bench run it (a composition: "
                        "method: pipeline with its reducers); --method / --budget override its settings (default: none)")
    p.add_argument("--input-size", type=positive_int, default=None, metavar="N",
                   help="image models: side of the square input image in pixels; speech/audio/video models: "
                        "non-prefix tokens entering the encoder (default: the model's own input size)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON instead of text")


def run(args):
    from .. import api
    from ._common import load_model, random_timm, resolve_model

    if args.method is not None:
        check_methods([args.method])  # before loading anything
    try:  # the recipe's settings under the explicit ones, as tokenprune.plan(recipe=...) takes them
        budget, method, schedule, options, rec = api._with_recipe(args.recipe, args.budget, args.method, None, {})
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    budget = 0.25 if budget is None and schedule is None else budget
    spec, _ = resolve_model(args.model, DEFAULT_MODEL)
    # a random-weight timm model is built on the meta device: the plan needs its shapes only
    lm = load_model(spec, args, what="plan", weights_matter=False, device="meta" if random_timm(spec, args) else None)
    num_tokens, grid, described, fields = _input(lm, args.input_size)
    # planned on the image's patch grid when --input-size gives one, as a forward on it runs (pool needs the grid)
    patch = api._recipe_patch(rec, lm.model, budget, method or "merge", schedule, True, options)
    plan = patch.plan_for(num_tokens, grid)
    if not described:
        described, fields = f"{plan.info.num_tokens} tokens", f"input_tokens={plan.info.num_tokens}"
    info(f"plan for {lm.name}, input {described}")
    if args.json:
        out = {"model": lm.name, "input": described, "input_size": args.input_size or
               (lm.img_size[0] if lm.img_size and lm.modality == "image" else plan.info.num_tokens),
               **plan.to_dict()}
        print(json.dumps(out, indent=1))
    else:
        print(f"model={lm.name} {fields}")
        print(plan.summary())
    return 0


def _patch_size(lm) -> tuple[int, int] | None:
    pe = getattr(lm.model, "patch_embed", None)
    if pe is not None and getattr(pe, "patch_size", None) is not None:
        p = pe.patch_size
        return (int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1]))
    for cfg in (getattr(lm.encoder, "config", None), getattr(getattr(lm.model, "config", None), "vision_config", None)):
        p = getattr(cfg, "patch_size", None)
        if p is not None:
            return (int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1]))
    return None


def _image(side: tuple[int, int], patch: tuple[int, int]) -> tuple[str, str]:
    g = (side[0] // patch[0], side[1] // patch[1])
    return (f"{side[0]}x{side[1]} px ({g[0]}x{g[1]} patches of {patch[0]} px)",
            f"input={side[0]}x{side[1]}px grid={g[0]}x{g[1]} patch={patch[0]}")


def _input(lm, size: int | None) -> tuple[int | None, tuple[int, int] | None, str, str]:
    """``(non-prefix tokens, or None for the model's own; patch grid of an image of another size, else None;
    description; key=value form)`` of the input the plan is for."""
    patch = _patch_size(lm) if lm.modality == "image" else None
    if size is None:
        if lm.img_size and patch:
            return (None, None, *_image(lm.img_size, patch))
        return None, None, "", ""
    if lm.modality != "image":
        return size, None, f"{size} tokens", f"input_tokens={size}"
    if patch is None:
        raise UsageError(f"cannot tell the patch size of {lm.name}, so --input-size {size} px cannot be turned "
                         "into tokens")
    if size % patch[0] or size % patch[1]:
        raise UsageError(f"--input-size {size} px is not a multiple of {lm.name}'s patch size {patch[0]} px")
    grid = (size // patch[0], size // patch[1])
    return grid[0] * grid[1], grid, *_image((size, size), patch)
