"""timm's ``features_only=True`` wrappers (``FeatureGetterNet``, ``FeatureListNet``, ``FeatureDictNet``,
``FeatureHookNet``): refused at ``apply()`` with what works instead.

They return the feature maps of several blocks at the full patch grid, which a reduced model (fewer tokens after
each reducing block) cannot give; the wrapped ViT's ``forward_intermediates`` is refused while patched for the
same reason.
"""
from __future__ import annotations

from .base import Adapter, has_class

_WRAPPERS = ("FeatureGetterNet", "FeatureListNet", "FeatureDictNet", "FeatureHookNet")


class TimmFeaturesRefused(Adapter):
    family = "timm-features"

    @classmethod
    def matches(cls, model) -> bool:
        return has_class(model, "timm.", *_WRAPPERS)

    def __init__(self, model):
        raise TypeError(
            f"tokenprune: {type(model).__name__} is timm's features_only=True wrapper: it returns the feature maps "
            "of several blocks at the full patch grid, which a model with fewer tokens after each reducing block "
            "cannot give. Create the model without features_only and apply tokenprune to it: tokens, state = "
            "tokenprune.features(model, x) gives the final tokens, and full, present = tokenprune.unmerge(tokens, "
            "state) maps them back to every patch (full.view(B, *state.grid, C) for a dense map); or run the "
            "features_only model unpatched")
