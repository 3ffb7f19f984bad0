"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (images and video) on the shared VLM layer (``vlm/core.py``).

Where: the merged tokens (after the vision tower's 2x2 patch merger, what the LM receives), per image or per
video. ``budget`` = fraction of each item's merged tokens kept. Methods: ``cls``, ``random``, ``pool`` (per
frame, on the merged ``(h/2, w/2)`` grid), ``apet``.

Scoring (``cls``; Qwen's ViT has no [CLS]): the attention each patch RECEIVES (mean over queries and heads,
``substitute="received"``; ``"mean_query"`` is cheaper) at a full-attention layer of the tower (default: the
last one: Qwen2.5-VL ``fullatt_block_indexes[-1]``, Qwen2-VL / Qwen3-VL the last block), from the q/k that
layer made on SDPA, per frame (the layer's own attention span). Patch scores are averaged over each 2x2 merge
group, so a merged token's score is its patches' mean; Qwen2.5-VL's window order is undone with the tower's own
window index. ``layers=[j]`` scores at tower block ``j`` (on Qwen2.5-VL a windowed block scores within windows).

Positions (M-RoPE): the unpruned ``[3, B, L]`` position ids come from the model's own ``get_rope_index`` (with
``mm_token_type_ids`` from the processor, or built from the placeholder ids when absent); every kept token keeps
its (t, h, w) position, text keeps its positions, and ``generate()`` continues from the last prompt position
(its rule for explicit position ids, the same it applies to the unpruned model). A pooled or merged token takes
the position of its first member.

Qwen3-VL's deepstack features (added to the LM's first layers at the visual positions) are reduced with the same
selection (for merged tokens: the mean over the members) and handed to the text model with the call.
"""
from __future__ import annotations

import torch

from ..adapters.base import restore_class, swap_class
from .core import Group, VLMAdapter, encoder_info, sum_scores

FAMILIES = {"Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
            "Qwen3VLForConditionalGeneration": "qwen3_vl"}


class Deepstack:
    """Per-call pruned deepstack features, passed to Qwen3-VL's text model as the keyword ``tokenprune=``."""

    __slots__ = ("mask", "embeds")

    def __init__(self, mask, embeds):
        self.mask, self.embeds = mask, embeds


class _DeepstackText:
    """Mixin for Qwen3-VL's text model: take the visual positions and deepstack features from the call."""

    def forward(self, *args, tokenprune=None, **kwargs):
        if isinstance(tokenprune, Deepstack):
            mask, embeds = tokenprune.mask, tokenprune.embeds
            emb = kwargs.get("inputs_embeds")
            if emb is not None and emb.shape[0] != mask.shape[0]:  # rows expanded by generate (beams, samples)
                r = emb.shape[0] // mask.shape[0]
                counts = mask.sum(1).tolist()
                embeds = [torch.cat([c for c in e.split(counts) for _ in range(r)]) for e in embeds]
                mask = mask.repeat_interleave(r, 0)
            kwargs["visual_pos_masks"] = mask
            kwargs["deepstack_visual_embeds"] = embeds
        return super().forward(*args, **kwargs)


class QwenVLAdapter(VLMAdapter):
    family = "qwen_vl"
    families = FAMILIES
    description = "transformers Qwen2VL / Qwen2_5_VL / Qwen3VLForConditionalGeneration (images and video)"
    text_row = True

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.token_ids = {"image": cfg.image_token_id, "video": cfg.video_token_id}
        pad = getattr(cfg, "pad_token_id", None)
        pad = getattr(cfg.text_config, "pad_token_id", None) if pad is None else pad
        self.pad_id = int(pad) if pad is not None else 0
        self.inner = model.model
        self.visual = self.inner.visual
        self.attn_layers = [blk.attn for blk in self.visual.blocks]
        vc = cfg.vision_config
        self.merge = vc.spatial_merge_size
        full = getattr(vc, "fullatt_block_indexes", None)
        self.windowed = bool(full) and self.kind == "qwen2_5_vl"
        self.default_layer = full[-1] if self.windowed else len(self.attn_layers) - 1
        self.has_cls = False
        self.deepstack = self.kind == "qwen3_vl"
        self.swapped: list = []

    def info(self):
        vc = self.model.config.vision_config
        dim = self.attn_layers[0].qkv.in_features
        mlp = getattr(vc, "intermediate_size", None) or int(dim * getattr(vc, "mlp_ratio", 4))
        return encoder_info(len(self.attn_layers), dim, vc.num_heads, mlp, 16 * 16, (16, 16), False, self.kind)

    def install(self, patch) -> None:
        super().install(patch)
        if self.deepstack:
            swap_class(self.inner.language_model, _DeepstackText)
            self.swapped.append(self.inner.language_model)

    def uninstall(self) -> None:
        for m in self.swapped:
            restore_class(m)
        self.swapped = []
        super().uninstall()

    # -- the call ---------------------------------------------------------------------------------------------
    def _grids(self, a):
        out = {}
        for mod, pv, grid in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos",
                                                                            "video_grid_thw")):
            if a.get(pv) is not None:
                if a.get(grid) is None:
                    raise ValueError(f"tokenprune: {pv} needs {grid} (from the processor)")
                out[mod] = a[grid]
        return out

    def full_counts(self, a):
        m2 = self.merge ** 2
        return {mod: [int(t * h * w) // m2 for t, h, w in g.tolist()] for mod, g in self._grids(a).items()}

    def item_grids(self, a, counts):
        m = self.merge
        return {mod: [(h // m, w // m) if t == 1 else (t, h // m, w // m) for t, h, w in g.tolist()]
                for mod, g in self._grids(a).items()}

    def encode(self, a, sink):
        out = {}
        for mod, grid in self._grids(a).items():
            pv = a["pixel_values" if mod == "image" else "pixel_values_videos"]
            kw = {"tokenprune": sink} if sink is not None else {}
            vo = self.visual(pv.type(self.visual.dtype), grid_thw=grid, **kw)
            feats = vo.pooler_output
            deep = list(getattr(vo, "deepstack_features", None) or []) if self.deepstack else []
            scores = None
            if sink is not None:
                scores = self.merged_scores(sink, grid)
                for q in sink.qks.values():
                    q.clear()  # the next modality records afresh
            m = self.merge
            counts = [int(t * h * w) // m ** 2 for t, h, w in grid.tolist()]
            groups, start = [], 0
            for g, n in zip(self.item_grids(a, None)[mod], counts):
                sl = slice(start, start + n)
                groups.append(Group(feats[sl][None], 0, g, None if scores is None else scores[sl][None],
                                    [d[sl][None] for d in deep]))
                start += n
            out[mod] = groups
        return out

    def merged_scores(self, sink, grid) -> torch.Tensor:
        """Score of every merged token ``[total]`` (tower order undone): the patch scores of each 2x2 group
        averaged."""
        s = sum_scores(self.reducer, sink.qks, 0)[0]  # chunks concatenated: every patch, in the tower's order
        s = s.view(-1, self.merge ** 2).mean(1)
        if self.windowed:
            from transformers.vision_utils import get_vision_window_index

            vc = self.model.config.vision_config
            window_index, _ = get_vision_window_index(grid, spatial_merge_size=self.merge,
                                                      window_size=vc.window_size, patch_size=vc.patch_size)
            s = s[torch.argsort(window_index.to(s.device))]
        return s

    def positions(self, a, ids, mask):
        tt = a.get("mm_token_type_ids")
        if tt is None:
            tt = torch.zeros_like(ids, dtype=torch.int)
            tt[ids == self.token_ids["image"]] = 1
            tt[ids == self.token_ids["video"]] = 2
        kw = {k: a.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
        pos, _ = self.inner.get_rope_index(ids, mm_token_type_ids=tt, attention_mask=mask, **kw)
        return pos

    def lm_extras(self, groups, extras, new_ids):
        if not self.deepstack or not extras:
            return {}
        masks = {mod: new_ids == self.token_ids[mod] for mod in extras}
        visual = torch.zeros_like(new_ids, dtype=torch.bool)
        for m in masks.values():
            visual |= m
        layers = len(next(iter(extras.values())))
        embeds = []
        for j in range(layers):
            ref = next(iter(extras.values()))[j]
            joint = ref.new_zeros(int(visual.sum()), ref.shape[-1])
            for mod, e in extras.items():
                joint[masks[mod][visual]] = e[j].to(joint.dtype)
            embeds.append(joint)
        return {"tokenprune": Deepstack(visual, embeds)}
