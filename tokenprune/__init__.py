"""tokenprune: token reduction between transformer encoder blocks, on the models you already use.

    import tokenprune
    tokenprune.apply(model, budget=0.25, method="merge")   # 25% of the patch tokens leave the encoder
    tokenprune.plan(model)                                  # per-block schedule and FLOP ratio
    tokenprune.remove(model)                                # exact restore
"""
from .api import applied, apply, features, get_patch, is_applied, methods, plan, remove
from .ops import unmerge
from .plan import Plan, Stage, keep_count
from .state import TokenState
from .stem import fast_patch_embed

__version__ = "0.1.0"
__all__ = ["apply", "remove", "applied", "features", "plan", "methods", "is_applied", "get_patch", "unmerge",
           "Plan", "Stage", "TokenState", "keep_count", "fast_patch_embed", "__version__"]
