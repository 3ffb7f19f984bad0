"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (images and video) on the shared VLM layer (``vlm/core.py``).

``budget`` = fraction of each image's / video's merged tokens (what the LM receives) kept. Where each method acts:

- ``cls``, ``random``, ``pool``: INSIDE the vision tower (``vlm/qwen_tower.py``), once, after block ``L``, in units
  of the 2x2 merge group, so the later blocks, the merger (and Qwen3-VL's later deepstack mergers) run on the kept
  groups only. ``L``: ``cls`` the last of ``layers=`` (default: the first full-attention block of Qwen2.5-VL,
  ``fullatt_block_indexes[0]``; Qwen2-VL / Qwen3-VL, whose blocks all attend fully, ``depth // 4 - 1``: block 7 of
  32); ``random`` the last of ``layers=`` (same default; -1 = before the first block); ``pool`` its ``block=``
  (default -1: the patch embeddings are pooled, per frame, on the merged grid). ``layers=[depth - 1]`` prunes after
  the last block: the same tokens as pruning after the tower;
- ``apet``, ``diverse``: after the tower, on the merged tokens (they need the final features).

The tower runs through ``qwen_tower.run`` whenever tokens are pruned, with every block's attention in one fused
launch (``adapter.attention``: ``"pad"`` default, ``"mask"``, ``"varlen"``); at budget 1.0 the call goes to the
model untouched.

Scoring (``cls``; Qwen's ViT has no [CLS]): the attention each patch RECEIVES (mean over queries and heads,
``substitute="received"``; ``"mean_query"`` is cheaper) at block ``L`` (``variant="sum"``: summed over blocks 0..L),
from the q/k that block made, each image / frame (full attention) or window (windowed blocks) on its own; the
patch scores are averaged over each 2x2 merge group.

Positions (M-RoPE): the unpruned ``[3, B, L]`` position ids come from the model's own ``get_rope_index`` (with
``mm_token_type_ids`` from the processor, or built from the placeholder ids when absent); every kept token keeps
its (t, h, w) position, text keeps its positions, and ``generate()`` continues from the last prompt position
(its rule for explicit position ids, the same it applies to the unpruned model). A pooled or merged token takes
the position of its first member (in the tower too: that member's rotary rows and window).

Qwen3-VL's deepstack features (added to the LM's first layers at the visual positions) follow the selection (taps
before the reduction: the mean over each kept token's members; after it: computed on the kept groups) and are
handed to the text model with the call.
"""
from __future__ import annotations

import math

import torch

from .core import Group, VLMAdapter, encoder_info
from .qwen_tower import ATTENTION, Reduction, Tower, run

IN_TOWER = ("cls", "random", "pool")  # reduced inside the tower; the others after it
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
            if emb is not None and emb.shape[1] < mask.shape[1]:  # generate() dropped the cached prefix
                tail = torch.zeros_like(mask)
                tail[:, mask.shape[1] - emb.shape[1]:] = True
                take = tail[mask]
                embeds = [e[take.to(e.device)] for e in embeds]
                mask = mask[:, mask.shape[1] - emb.shape[1]:]
            kwargs["visual_pos_masks"] = mask
            kwargs["deepstack_visual_embeds"] = embeds
        return super().forward(*args, **kwargs)


class QwenVLAdapter(VLMAdapter):
    family = "qwen_vl"
    families = FAMILIES
    description = "transformers Qwen2VL / Qwen2_5_VL / Qwen3VLForConditionalGeneration (images and video)"
    text_row = True
    space = "the merged tokens the language model receives (after the merger), as wide as its input embeddings"

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.token_ids = {"image": cfg.image_token_id, "video": cfg.video_token_id}
        self.inner = model.model
        self.visual = self.inner.visual
        self.attn_layers = [blk.attn for blk in self.visual.blocks]
        self.merge = cfg.vision_config.spatial_merge_size
        self.tower = Tower.of(self.visual, self.kind)
        full = sorted(self.tower.full_blocks)
        self.default_layer = full[0] if self.tower.windowed else max(0, self.tower.depth // 4 - 1)
        self.has_cls = False
        self.deepstack = self.kind == "qwen3_vl"
        self.at: int | None = None  # the block after which the tower reduces (None: after the tower)
        self.score_blocks: tuple = ()
        self.attention = "pad"  # how the tower's blocks run attention over windows / images (qwen_tower.ATTENTION)

    def info(self):
        vc = self.model.config.vision_config
        dim = self.attn_layers[0].qkv.in_features
        mlp = getattr(vc, "intermediate_size", None) or int(dim * getattr(vc, "mlp_ratio", 4))
        # dim: the merged tokens' (those after the tower: apet, diverse select from them)
        return encoder_info(len(self.attn_layers), self.lm_width(), vc.num_heads, mlp, 16 * 16, (16, 16), False,
                            self.kind)

    def check(self, reducer) -> None:
        super().check(reducer)
        if self.attention not in ATTENTION:
            raise ValueError(f"tokenprune: attention {self.attention!r} is not one of {ATTENTION}")
        self.at, self.score_blocks = None, ()
        if reducer.name in IN_TOWER:
            if self.score_at:  # cls: the blocks it scores with; it prunes after the last of them
                self.at, self.score_blocks = max(self.score_at), tuple(self.score_at)
            elif getattr(reducer, "layers", None):  # random (checked by its own schedule at apply)
                self.at = max(int(b) for b in reducer.layers)
            elif reducer.name == "pool":
                self.at = int(reducer.block)  # checked by pool (-1 .. depth - 1)
            else:
                self.at = self.default_layer
        self.score_at = []  # the tower is run by qwen_tower: no attention module is routed

    def install(self, patch) -> None:
        super().install(patch)
        if self.deepstack:
            self.swap(self.inner.language_model, _DeepstackText)

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
            grids = self.item_grids(a, None)[mod]
            counts = [math.prod(g) for g in grids]
            red = None
            if self.at is not None:
                red = Reduction(self.reducer, self.at, [(g, self.kept_count(n, g)) for g, n in zip(grids, counts)],
                                self.score_blocks)
            feats, anchor, deep = run(self.tower, pv.type(self.visual.dtype), grid, red, self.attention)
            groups, start, first = [], 0, 0
            for g, n in zip(grids, counts):
                k = red.items[len(groups)][1] if red is not None else n  # pool: its plan's count is the grid's
                sl = slice(start, start + k)
                groups.append(Group(feats[sl][None], 0, g, extras=[d[sl][None] for d in deep],
                                    kept=(anchor[sl] - first)[None] if red is not None else None, size=n))
                start, first = start + k, first + n
            out[mod] = groups
        return out

    def positions(self, a, ids, mask):
        tt = a.get("mm_token_type_ids")
        if tt is None:
            tt = torch.zeros_like(ids, dtype=torch.int)
            tt[ids == self.token_ids["image"]] = 1
            tt[ids == self.token_ids["video"]] = 2
        kw = {k: a.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
        pos, _ = self.inner.get_rope_index(ids, mm_token_type_ids=tt, attention_mask=mask, **kw)
        return pos

    def prepare(self, a, for_generate):
        out = super().prepare(a, for_generate)
        if out is not None:
            # the model keeps rope_deltas (last position + 1 - prompt length) from its prefill for later cached steps
            # without position ids; the pruned prompt is shorter than its positions, so give the model its deltas
            pos, mask = out["position_ids"][-3:], out["attention_mask"]
            valid = torch.ones_like(pos[0], dtype=torch.bool) if mask is None else mask.bool()
            last = pos.masked_fill(~valid[None], torch.iinfo(pos.dtype).min).amax((0, 2))
            self.inner.rope_deltas = (last + 1 - valid.sum(1)).to(torch.long)[:, None]
        return out

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
