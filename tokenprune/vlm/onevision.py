"""LLaVA-OneVision (images: AnyRes base crop + tiles; video: frames pooled 2x2) on the shared VLM layer (``core``).

Where: the projected tokens the LM receives, per image and per video, after transformers' own packing: an image
is its base crop's tokens, then (AnyRes) the tiles' tokens unpadded (and resized above ``vision_aspect_ratio``
``anyres_max_N``) with an ``image_newline`` token after every row, or, in a prompt with several images, the base
crop and one newline; a video is its frames' 2x2-pooled tokens, then one newline. ``budget`` = fraction of each
item's visual tokens kept (``K = round_half_up(budget * N)``, newline tokens not counted).

Newline tokens are always kept, at their places: they are the layout the LM was trained to read (the end of a
row of tiles, the end of an image or a video), not image content, and there are few of them (one per row of the
tile grid). In ``core``'s terms they are the item's prefix tokens, standing at their own placeholders
(``Group.places``). A kept row with all its tokens pruned keeps its newline.

Methods: ``cls``, ``random``, ``apet``, ``diverse`` select once per item over all its visual tokens (an image's base crop and
tiles ranked together); ``pool`` needs a grid: an image's base crop and its tile grid are pooled separately, each
to the grid nearest its share of ``K`` (as everywhere, ``pool``'s count is its nearest grid's), a video per frame
on the pooled ``(h/2, w/2)`` grid.

Scoring (``cls``; SigLIP has no [CLS]): the attention each patch RECEIVES (the reducer's ``substitute``, default
``"received"``) at the tower layer the VLM reads (``vision_feature_layer``, default -1: the last layer; for a list
the deepest), from the q/k that layer made on SDPA, per crop / frame. The scores go through the model's own
``pack_image_features`` (unpad, bilinear resize of the tiles) and ``apply_pooling`` (bilinear 2x2 pooling of
video frames), so a token's score is the same mix of patch scores as its features are of patch features. The
scoring layer is fixed at ``apply()`` from the config (a per-call ``vision_feature_layer`` changes the features,
not the scoring layer).

Positions: the LM (Qwen2) has 1D positions; the pruned prompt gets fresh consecutive positions, as if the
processor had written ``K`` placeholders plus the newlines per item (as LLaVA).
"""
from __future__ import annotations

import math

import torch

from ..plan import keep_count
from .core import Group, VLMAdapter, encoder_info, sum_scores

FAMILIES = {"LlavaOnevisionForConditionalGeneration": "llava_onevision"}
CALL_OPTIONS = ("vision_feature_layer", "vision_feature_select_strategy")


class OneVisionAdapter(VLMAdapter):
    family = "llava_onevision"
    families = FAMILIES
    description = "transformers LlavaOnevisionForConditionalGeneration (images: AnyRes base + tiles; video)"
    proj_attention = True  # SigLIP tower

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.token_ids = {"image": int(cfg.image_token_id), "video": int(cfg.video_token_id)}
        self.inner = model.model
        tower = self.inner.vision_tower
        vm = getattr(tower, "vision_model", tower)
        if getattr(getattr(vm, "embeddings", None), "class_embedding", None) is not None:
            raise TypeError(f"tokenprune: LLaVA-OneVision with a [CLS] tower ({type(tower).__name__}) is not "
                            "supported; its tower is SigLIP")
        self.attn_layers = [lay.self_attn for lay in vm.encoder.layers]
        fl = cfg.vision_feature_layer
        depth = len(self.attn_layers)
        self.default_layer = max(f if f >= 0 else depth + 1 + f for f in ([fl] if isinstance(fl, int) else fl)) - 1
        self.has_cls = False
        vc = cfg.vision_config
        self.side = vc.image_size // vc.patch_size  # patch grid of a crop / frame
        self.pooled = math.ceil(self.side / 2)  # a video frame's grid after the 2x2 pooling

    def info(self):
        vc = self.model.config.vision_config
        return encoder_info(len(self.attn_layers), self.lm_width(), vc.num_attention_heads, vc.intermediate_size,
                            self.side ** 2, (self.side, self.side), False, self.kind)

    def kept_count(self, n, grid):
        return super().kept_count(n, grid) if grid is not None else keep_count(self.patch.budget, n)

    # -- the call ---------------------------------------------------------------------------------------------
    def _crop_tokens(self, a) -> int:
        strategy = a.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        return self.side ** 2 - (strategy == "default")

    def _crops(self, a) -> list[int]:
        """Crops of each image: AnyRes base + tiles, or 1 in a prompt with several images (HF's rule)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        sizes = a.get("image_sizes")
        if sizes is None:
            raise ValueError("tokenprune: LLaVA-OneVision images need image_sizes (from the processor)")
        per = a.get("batch_num_images")
        tiled = [True] * len(sizes) if per is None else [int(n) == 1 for n in per for _ in range(int(n))]
        cfg = self.model.config
        return [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) if t else 1
                for s, t in zip(sizes, tiled)]

    def _pack(self, a, values: list) -> list:
        """Per-crop values ``[crops, tokens, 2]`` of each image packed as the model packs its features, with
        ``(0, 1)`` at the newline tokens: channel 1 marks the newlines."""
        newline = values[0].new_tensor([0.0, 1.0])
        packed, _ = self.inner.pack_image_features(values, a["image_sizes"], image_newline=newline,
                                                   vision_aspect_ratio=self.model.config.vision_aspect_ratio)
        return packed

    def full_counts(self, a):
        out = {}
        pv = a.get("pixel_values")
        if pv is not None and pv.shape[0]:
            t = self._crop_tokens(a)
            out["image"] = [p.shape[0] for p in self._pack(a, [torch.zeros(c, t, 2) for c in self._crops(a)])]
        pvv = a.get("pixel_values_videos")
        if pvv is not None and pvv.shape[0]:
            out["video"] = [pvv.shape[1] * self.pooled ** 2 + 1] * pvv.shape[0]
        return out

    def encode(self, a, sink):
        kw = {"tokenprune": sink} if sink is not None else {}
        kw.update({k: a[k] for k in CALL_OPTIONS if a.get(k) is not None})
        out = {}
        if a.get("pixel_values") is not None:
            feats = self.inner.get_image_features(
                a["pixel_values"].to(self.inner.vision_tower.dtype), a["image_sizes"],
                batch_num_images=a.get("batch_num_images"), **kw).pooler_output  # packed, one [L, D] per image
            crops, t = self._crops(a), self._crop_tokens(a)
            scores = self._scores(sink)
            if scores is None:
                scores = torch.zeros(sum(crops), t, device=feats[0].device)
            values = [torch.stack([s, torch.zeros_like(s)], -1) for s in scores.split(crops)]
            out["image"] = [g for f, pk, c in zip(feats, self._pack(a, values), crops)
                            for g in self._image_groups(f, pk, c, t, sink is not None)]
        if a.get("pixel_values_videos") is not None:
            pvv = a["pixel_values_videos"]
            b, frames = pvv.shape[:2]
            feats = self.inner.get_video_features(pvv.to(self.inner.vision_tower.dtype), **kw).pooler_output
            n = frames * self.pooled ** 2
            if feats.shape[1] == n:  # transformers 5.17 appends the video's newline in forward (5.25: here)
                nl = self.inner.image_newline.to(feats)
                feats = torch.cat([feats, nl[None, None].expand(b, 1, -1)], 1)
            scores = self._scores(sink)
            if scores is not None:  # [b * frames, patches] -> the model's own 2x2 pooling
                scores = self.inner.apply_pooling(scores[..., None]).reshape(b, n)
            order = torch.cat([torch.tensor([n]), torch.arange(n)]).to(feats.device)  # newline first: prefix
            out["video"] = [Group(feats[:, order], 1, (frames, self.pooled, self.pooled), scores, places=order)]
        return out

    def _scores(self, sink):
        if sink is None:
            return None
        s = sum_scores(self.reducer, sink.qks, 0)
        for q in sink.qks.values():
            q.clear()  # the next modality records afresh
        return s

    def _image_groups(self, feat, packed, crops, tokens, scored) -> list:
        """One group for the image; for a grid reducer (``pool``) one for the base crop and one for the tiles.
        ``tokens``: tokens of a crop (its grid when ``side ** 2``)."""
        nl = packed[:, 1] > 0.5
        size = feat.shape[0]
        parts = [(0, size, None)]
        if self.reducer.needs_input_grid:
            base = (self.side, self.side) if tokens == self.side ** 2 else None
            parts = [(0, size, base)]
            if crops > 1:  # the tiles: ``rows`` rows of ``cols`` tokens and a newline
                rows = int(nl[tokens:].sum())
                parts = [(0, tokens, base), (tokens, size, (rows, (size - tokens) // rows - 1))]
        groups = []
        for start, stop, grid in parts:
            seg = nl[start:stop]
            order = torch.cat([seg.nonzero()[:, 0], (~seg).nonzero()[:, 0]])  # newlines first: the prefix
            p = int(seg.sum())
            s = packed[start:stop, 0][order][p:][None] if scored else None
            groups.append(Group(feat[start:stop][order][None], p, grid, s, places=order if p else None))
        return groups
