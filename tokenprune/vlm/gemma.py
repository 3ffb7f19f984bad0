"""PaliGemma and Gemma 3 on the shared VLM layer (``vlm/core.py``).

Where: the projected tokens, what the language model receives, per image: PaliGemma's ``(S/p)^2`` (one per
SigLIP patch, linear projector), Gemma 3's fixed ``mm_tokens_per_image`` (after the projector's average pool
of the patch grid). ``budget`` = fraction of each image's tokens kept. Methods: ``cls``, ``random``, ``pool``
(2D average pooling of the token grid), ``apet``, ``diverse``.

Scoring (``cls``; SigLIP has no [CLS]): the attention each patch RECEIVES (``substitute="received"``) at the
tower's last layer (``layers=[j]`` picks another), from the q/k that layer made on SDPA; on Gemma 3 the patch
scores are averaged over each pooling window, so a token's score is its patches' mean.

Positions: the LM has 1D positions. The pruned prompt gets fresh consecutive positions, as if the processor
had written ``K`` placeholders per image (no explicit position ids are passed, so transformers 5.17 and 5.25
derive them in prefill and in every ``generate()`` step by their own rule, the same as for an unpruned prompt).
Kept image tokens stay contiguous, so ``token_type_ids`` (Gemma 3: image tokens attend bidirectionally within
their image; PaliGemma: the prefix, image and prompt, attends bidirectionally) is shrunk with ``input_ids``
and keeps its meaning.
"""
from __future__ import annotations

import torch

from .core import Group, VLMAdapter, encoder_info, sum_scores

FAMILIES = {"PaliGemmaForConditionalGeneration": "paligemma", "Gemma3ForConditionalGeneration": "gemma3"}


class GemmaVLAdapter(VLMAdapter):
    family = "gemma_vl"
    families = FAMILIES
    description = "transformers PaliGemmaForConditionalGeneration / Gemma3ForConditionalGeneration (images)"
    row_kwargs = {"token_type_ids": 0}
    proj_attention = True  # SigLIP tower

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        tid = next((v for v in (getattr(cfg, n, None) for n in ("image_token_id", "image_token_index"))
                    if v is not None), None)
        if tid is None:
            raise ValueError("tokenprune: model.config.image_token_id is not set; set it to the processor's image "
                             "token id")
        self.token_ids = {"image": int(tid)}
        self.inner = model.model
        vm = getattr(self.inner.vision_tower, "vision_model", self.inner.vision_tower)
        self.attn_layers = [lay.self_attn for lay in vm.encoder.layers]
        self.default_layer = len(self.attn_layers) - 1
        self.has_cls = False
        vc = cfg.vision_config
        self.patches = vc.image_size // vc.patch_size  # patch grid side
        side = int(round(cfg.mm_tokens_per_image ** 0.5)) if self.kind == "gemma3" else self.patches
        self.grid = (side, side)

    def info(self):
        vc = self.model.config.vision_config
        return encoder_info(len(self.attn_layers), self.lm_width(), vc.num_attention_heads, vc.intermediate_size,
                            self.grid[0] * self.grid[1], self.grid, False, self.kind)

    # -- the call ---------------------------------------------------------------------------------------------
    def full_counts(self, a):
        pv = a.get("pixel_values")
        if pv is None or pv.shape[0] == 0:
            return {}
        return {"image": [self.grid[0] * self.grid[1]] * pv.shape[0]}

    def item_grids(self, a, counts):
        return {"image": [self.grid] * len(counts["image"])}

    def encode(self, a, sink):
        pv = a["pixel_values"]
        kw = {"tokenprune": sink} if sink is not None else {}
        feats = self.inner.get_image_features(pv.to(self.inner.vision_tower.dtype), **kw).pooler_output
        scores = None
        if sink is not None:
            s = sum_scores(self.reducer, sink.qks, 0)  # [images, patches]
            if self.grid[0] != self.patches:  # Gemma 3: the projector's average pool, applied to the scores
                s = s.view(-1, 1, self.patches, self.patches)
                s = torch.nn.functional.avg_pool2d(s, self.patches // self.grid[0]).flatten(1)
            scores = s
        return {"image": [Group(feats, 0, self.grid, scores)]}
