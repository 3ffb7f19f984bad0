"""Print the per-block schedule a method and budget give on a model."""
from __future__ import annotations

import json

from .. import api
from ..models import load_timm


def add_arguments(p):
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name")
    p.add_argument("--method", default="merge")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args):
    import torch

    with torch.device("meta"):
        model = load_timm(args.model)
    plan = api.plan(model, args.budget, args.method)
    print(json.dumps(plan.to_dict(), indent=1) if args.json else plan.summary())
    return 0
