"""LLaVA-1.5 and LLaVA-NeXT on the shared VLM layer (``tokenprune/vlm/core.py``).

Accepted: ``LlavaForConditionalGeneration`` (any CLIP / SigLIP-style tower) and
``LlavaNextForConditionalGeneration``. ``budget`` is the fraction of each image's visual tokens (after
``vision_feature_select_strategy``) that reaches the language model: ``K = round_half_up(budget * N)`` per
image, ``N = 576`` for LLaVA-1.5. With strategy "full" and a [CLS] token, that token is a prefix token
(always kept, not counted).

Where: LLaVA reduces the projector's input (the selected vision hidden states, ``[images, N, C]``), then
projects the kept tokens; LLaVA-NeXT reduces each image's packed, projected tokens (base crop + unpadded
high-resolution crops + one newline token per row, HF's own packing). Methods: LLaVA ``cls``, ``random``,
``pool`` (2D average pooling of the 24x24 grid to the grid nearest ``K``, CrossLMM's pooling), ``apet``,
``diverse``; LLaVA-NeXT ``cls``, ``random``, ``apet``, ``diverse``.

Scoring (``cls``) uses the vision layer the VLM reads its features from: ``vision_feature_layer`` (default -2;
for a list, the deepest): hidden state ``f`` is the output of encoder layer ``f - 1``, so -2 scores with the
attention inside layer ``L - 2``, FasterVLM's ``attentions[-2]``. Only the [CLS] query row is formed, from the
q/k the layer made on SDPA. ``variant="sum"`` (VTC-CLS) sums layers ``0 .. feature layer``; ``layers=[j]``
picks vision layers. Towers without [CLS] use the reducer's ``substitute``. NeXT crops are scored the same
way and their scores packed like the features; newline tokens score lowest.

Positions: LLaVA's LM has 1D positions; the pruned prompt gets fresh consecutive positions, as if the
processor had written ``K`` placeholders per image (FasterVLM's choice).

:func:`add_cross_attention` (CrossLMM, with ``method="pool"``) adds gated visual-to-visual cross-attention
layers to the LM; :func:`lm_flop_ratio` gives the LM's prefill FLOP ratio.
"""
from __future__ import annotations

import torch

from ..patch import get_patch
from ..plan import keep_count
from ..reducers.pool import GatedCrossAttention
from ..vlm.core import Group, VLMAdapter, encoder_info, sum_scores

FAMILIES = {"LlavaForConditionalGeneration": "llava", "LlavaNextForConditionalGeneration": "llava_next"}
XATTN_NAME = "tokenprune_cross_attention"  # submodule of the inner model holding the CrossLMM add-on


def _image_token_id(config):
    for name in ("image_token_id", "image_token_index"):
        v = getattr(config, name, None)
        if v is not None:
            return v
    return None


class LlavaAdapter(VLMAdapter):
    family = "llava"
    families = FAMILIES
    description = ("transformers LlavaForConditionalGeneration / LlavaNextForConditionalGeneration "
                   "(visual tokens pruned between the vision tower and the language model)")

    def __init__(self, model):
        super().__init__(model)
        if self.kind == "llava_next":
            self.methods = ("cls", "random", "apet", "diverse")  # packed crops + newline tokens: no grid for pool
        cfg = model.config
        tid = _image_token_id(cfg)
        if tid is None:
            raise ValueError(
                "tokenprune: model.config.image_token_id is not set, so the image placeholders in input_ids "
                "cannot be found; set it to the processor's image token id, e.g. model.config.image_token_id = "
                "processor.tokenizer.convert_tokens_to_ids('<image>')")
        self.token_ids = {"image": tid}
        self.inner = model.model
        tower = self.inner.vision_tower
        vm = getattr(tower, "vision_model", tower)
        layers = getattr(getattr(vm, "encoder", None), "layers", None)
        if layers is None or not all(hasattr(lay, "self_attn") and hasattr(lay.self_attn, "q_proj")
                                     for lay in layers):
            raise TypeError(f"tokenprune: the vision tower {type(tower).__name__} is not a CLIP/SigLIP-style "
                            "encoder (encoder.layers[i].self_attn.q_proj); not supported")
        self.attn_layers = [lay.self_attn for lay in layers]
        self.has_cls = getattr(getattr(vm, "embeddings", None), "class_embedding", None) is not None
        self.strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        fl = getattr(cfg, "vision_feature_layer", -2)
        self.feature_layers = [fl] if isinstance(fl, int) else list(fl)
        depth = len(layers)
        deepest = max(f if f >= 0 else depth + 1 + f for f in self.feature_layers)
        self.default_layer = deepest - 1  # encoder layer whose output the VLM reads
        vc = cfg.vision_config
        side = vc.image_size // vc.patch_size
        self.grid = (side, side)
        self.num_prefix = 1 if self.strategy != "default" and self.has_cls else 0
        self.cross_handles: list = []
        self.proj_attention = not self.has_cls  # SigLIP towers

    @property
    def space(self):
        if self.kind == "llava_next":
            return "the packed, projected tokens the language model receives, as wide as its input embeddings"
        return ("the vision tower's hidden states at vision_feature_layer, the projector's input: "
                "vision_config.hidden_size wide, times the number of feature layers")

    def info(self):
        vc = self.model.config.vision_config
        dim = vc.hidden_size * len(self.feature_layers) if self.kind == "llava" else self.lm_width()
        return encoder_info(len(self.attn_layers), dim, vc.num_attention_heads,
                            vc.intermediate_size, self.grid[0] * self.grid[1], self.grid, self.has_cls, self.kind,
                            self.num_prefix)

    def grid_for(self, num_tokens: int):
        return self.grid if num_tokens == self.grid[0] * self.grid[1] else None

    def uninstall(self) -> None:
        remove_cross_attention(self.model)
        super().uninstall()

    @property
    def tokens_per_crop(self) -> int:
        return self.grid[0] * self.grid[1] + self.num_prefix

    # -- the call ---------------------------------------------------------------------------------------------
    def full_counts(self, a):
        pv = a.get("pixel_values")
        if pv is None or pv.shape[0] == 0:
            return {}
        if self.kind == "llava":
            if a.get("image_sizes") is not None:
                raise NotImplementedError("tokenprune: LLaVA with per-image sizes (Pixtral-style towers) is not "
                                          "supported; call tokenprune.remove(model)")
            return {"image": [self.tokens_per_crop] * pv.shape[0]}
        if a.get("image_sizes") is None:
            raise ValueError("tokenprune: LLaVA-NeXT needs image_sizes (from the processor)")
        return {"image": self.next_lengths(a["image_sizes"])}

    def item_grids(self, a, counts):
        return {"image": [self.grid if self.kind == "llava" else None] * len(counts["image"])}

    def kept_count(self, n, grid):
        if self.kind == "llava":
            return super().kept_count(n, grid)
        return keep_count(self.patch.budget, n)

    def _tower(self, pv, sink):
        out = self.inner.vision_tower(pv.to(self.inner.vision_tower.dtype), output_hidden_states=True,
                                      return_dict=True, **({"tokenprune": sink} if sink is not None else {}))
        hs = [out.hidden_states[f] for f in self.feature_layers]
        if self.strategy == "default":
            hs = [h[:, 1:] for h in hs]
        return torch.cat(hs, -1)

    def encode(self, a, sink):
        pv = a["pixel_values"]
        if self.kind == "llava_next":
            return {"image": self.next_groups(pv, a["image_sizes"], sink)}
        feats = self._tower(pv, sink)
        scores = sum_scores(self.reducer, sink.qks, int(self.has_cls)) if sink is not None else None
        return {"image": [Group(feats, self.num_prefix, self.grid, scores)]}

    def project(self, x):
        return self.inner.multi_modal_projector(x) if self.kind == "llava" else x  # NeXT: packed, projected

    def lm_extras(self, groups, extras, new_ids):
        if XATTN_NAME not in self.inner._modules:
            return {}
        g = groups["image"][0]
        full = self.inner.multi_modal_projector(g.x)
        rows, cols = (new_ids == self.token_ids["image"]).nonzero(as_tuple=True)
        return {"tokenprune": CrossContext(full, rows, cols, new_ids.shape[1])}

    # -- LLaVA-NeXT ------------------------------------------------------------------------------------------
    def _crops(self, image_sizes):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        return [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                for s in image_sizes]

    def next_lengths(self, image_sizes) -> list[int]:
        """Packed token count of each image, from HF's own packing (run on 1-channel zeros)."""
        out = []
        for size, crops in zip(image_sizes, self._crops(image_sizes)):
            feats = [torch.zeros(crops, self.tokens_per_crop, 1)]
            _, lens = self.inner.pack_image_features(feats, torch.as_tensor(size)[None], self.strategy,
                                                     image_newline=torch.zeros(1))
            out.append(int(lens[0]))
        return out

    def next_groups(self, pv, image_sizes, sink):
        kw = {"tokenprune": sink} if sink is not None else {}
        packed = self.inner.get_image_features(pv, image_sizes, **kw).pooler_output
        scores = sum_scores(self.reducer, sink.qks, int(self.has_cls)).float() if sink is not None else None
        out, start = [], 0
        for i, (feat, c) in enumerate(zip(packed, self._crops(image_sizes))):
            s = None
            if scores is not None:
                device = feat.device
                index = torch.arange(c * self.tokens_per_crop, device=device, dtype=torch.float32)
                index = index.view(c, self.tokens_per_crop, 1)
                idx, _ = self.inner.pack_image_features([index], image_sizes[i:i + 1], self.strategy,
                                                        image_newline=torch.full((1,), -1.0, device=device))
                idx = idx[0][:, 0].round().long()
                flat = torch.cat([scores.new_full((c, self.num_prefix), float("inf")), scores[start:start + c]],
                                 1).reshape(-1) if self.num_prefix else scores[start:start + c].reshape(-1)
                s = torch.where(idx >= 0, flat[idx.clamp(min=0)], torch.full_like(flat[:1], -float("inf")))[None]
            out.append(Group(feat[None], 0, None, s))
            start += c
        return out


# -- CrossLMM add-on: pooled visual tokens attend back to all visual tokens inside the LM ------------------
class CrossContext:
    """Per-call data of the CrossLMM add-on, passed to the LM layers as the keyword ``tokenprune=``: every
    visual token projected (``full [images, N, C]``) and where the reduced ones sit in the LM input."""

    __slots__ = ("full", "rows", "cols", "seq_len")

    def __init__(self, full, rows, cols, seq_len):
        self.full, self.rows, self.cols, self.seq_len = full, rows, cols, seq_len


def add_cross_attention(model, every: int = 4, num_heads: int | None = None) -> torch.nn.ModuleList:
    """Add CrossLMM's visual-to-visual cross-attention to a LLaVA model patched with ``method="pool"``.

    After every ``every``-th decoder layer of the language model, the hidden states at the (pooled) visual
    positions attend to ALL the visual tokens of their image (the projector's output before pooling) and the
    result is added through a tanh gate (``reducers.pool.GatedCrossAttention``; gates start at 0, so the
    model is unchanged until trained). Only the prefill is affected. The layers are new trainable parameters
    under ``model.model.tokenprune_cross_attention`` (saved with ``state_dict``); they need fine-tuning.
    ``tokenprune.remove(model)`` removes them. Returns the added layers (for the optimizer).
    """
    patch = get_patch(model)
    if patch is None or not isinstance(patch.adapter, LlavaAdapter) or patch.adapter.kind != "llava" \
            or patch.reducer.name != "pool":
        raise ValueError("tokenprune: add_cross_attention needs a LlavaForConditionalGeneration patched with "
                         "tokenprune.apply(model, budget, method='pool') first")
    remove_cross_attention(model)
    lm = model.model.language_model
    layers = getattr(lm, "layers", None)
    if layers is None:
        raise TypeError("tokenprune: the language model has no `layers` list of decoder layers")
    if isinstance(every, bool) or not isinstance(every, int) or not 1 <= every <= len(layers):
        raise ValueError(f"every must be an integer in 1..{len(layers)}, got {every!r}")
    tc = model.config.text_config
    heads = num_heads or tc.num_attention_heads
    ref = next(lm.parameters())
    at = list(range(every - 1, len(layers), every))
    mods = torch.nn.ModuleList(GatedCrossAttention(tc.hidden_size, heads) for _ in at).to(ref.device, ref.dtype)
    model.model.add_module(XATTN_NAME, mods)
    handles = [layers[i].register_forward_hook(_cross_hook(mod), with_kwargs=True) for i, mod in zip(at, mods)]
    patch.adapter.cross_handles = handles
    return mods


def remove_cross_attention(model) -> None:
    """Remove the add-on of :func:`add_cross_attention` (no-op without one)."""
    patch = get_patch(model)
    for h in getattr(getattr(patch, "adapter", None), "cross_handles", []) or []:
        h.remove()
    if patch is not None:
        patch.adapter.cross_handles = []
    inner = getattr(model, "model", None)
    if inner is not None and XATTN_NAME in inner._modules:
        del inner._modules[XATTN_NAME]


def _cross_hook(layer: torch.nn.Module):
    def hook(_mod, _args, kwargs, output):
        ctx = kwargs.get("tokenprune")
        h = output[0] if isinstance(output, tuple) else output
        if not isinstance(ctx, CrossContext) or h.shape[1] != ctx.seq_len:
            return None  # decoding step, or no image in this call
        images, _, c = ctx.full.shape
        queries = h[ctx.rows, ctx.cols].view(images, -1, c)
        new = layer(queries, ctx.full.to(h.dtype)).reshape(-1, c)
        h = h.index_put((ctx.rows, ctx.cols), new)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return hook


# -- FLOPs of the language model's prefill ----------------------------------------------------------------
def prefill_flops(text_config, num_tokens: int) -> float:
    """Multiply-add FLOPs (x2) of the decoder layers on a ``num_tokens`` prompt (no LM head): q/k/v/o and
    gated-MLP projections plus the two attention products (full ``n x n``, as ``plan.block_flops``)."""
    d = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    inter = text_config.intermediate_size
    n = num_tokens
    linear = 2 * n * (d * heads * head_dim * 2 + 2 * d * kv * head_dim + 3 * d * inter)
    attn = 2 * 2 * n * n * heads * head_dim
    return float(text_config.num_hidden_layers * (linear + attn))


def lm_flop_ratio(model_or_config, budget: float, text_tokens: int = 40, num_images: int = 1,
                  visual_tokens: int | None = None) -> float:
    """Prefill FLOPs of the language model with ``round(budget * N)`` visual tokens per image over
    those with all ``N`` (plus ``text_tokens`` of text): the speed-up bound of pruning on prefill."""
    cfg = getattr(model_or_config, "config", model_or_config)
    if visual_tokens is None:
        vc = cfg.vision_config
        visual_tokens = (vc.image_size // vc.patch_size) ** 2
    k = keep_count(budget, visual_tokens)
    full = prefill_flops(cfg.text_config, text_tokens + num_images * visual_tokens)
    return prefill_flops(cfg.text_config, text_tokens + num_images * k) / full
