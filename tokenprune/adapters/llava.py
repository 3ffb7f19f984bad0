"""LLaVA-style VLMs in transformers: fewer visual tokens reach the language model.

Accepted: ``LlavaForConditionalGeneration`` (LLaVA-1.5 and any LLaVA with a
CLIP/SigLIP-style vision tower) and ``LlavaNextForConditionalGeneration``
(LLaVA-NeXT, multi-crop "anyres" features). Other transformers VLMs (a config
with ``vision_config``, ``text_config`` and an image-token id) get a clear
"not supported" error instead of the generic "no adapter" one.

Unlike the encoder adapters, nothing changes inside the vision tower or the
language model: the visual tokens are reduced ONCE, between the two
(FasterVLM's placement), and the language model simply receives a shorter
sequence. ``budget`` is the fraction of each image's visual tokens (after
``vision_feature_select_strategy``) that reaches the language model:
``K = round_half_up(budget * N)`` per image, ``N = 576`` for LLaVA-1.5.

Scoring (``method="cls"``) uses the vision layer the VLM reads its features
from: ``vision_feature_layer`` (default -2, the penultimate layer; for a list,
the deepest one). hidden state ``f`` is the output of encoder layer ``f - 1``,
so -2 scores with the attention computed *inside* layer ``L - 2`` -- the same
attention map FasterVLM reads with ``attentions[-2]``. Only the [CLS] query
row is formed (``ops.query_attention``) from the layer's own q/k, which are
read through forward hooks on ``q_proj`` / ``k_proj`` while the tower runs on
its usual SDPA kernel (``output_attentions`` is never used).

- ``variant="single"`` (FasterVLM): that one layer.
- ``variant="sum"`` (VTC-CLS): the [CLS] attention summed over the vision
  layers ``0 .. feature layer`` (or over ``layers=[...]``).
- ``layers=[j, ...]``: score with these vision layers instead (0-based).
- Towers without [CLS] (SigLIP, strategy "full"): the reducer's
  ``substitute`` (mean query by default).

``method="random"``, ``"pool"`` (2D average pooling of the 24x24 grid to the
grid nearest ``K``; CrossLMM's pooling, before the projector) and ``"apet"``
work on LLaVA; LLaVA-NeXT takes ``cls`` and ``random``. For LLaVA the reducers'
own ``reduce`` runs on the projector input ``[images, N, C]`` (when the
strategy drops [CLS], an empty slot stands in for it as the reducer's prefix
token and is removed again); with strategy "full" and a [CLS] token, that
token is a prefix token: always kept, not counted in ``budget``.

LLaVA-NeXT: each image is a base crop plus high-resolution crops that HF
unpads and packs into one sequence with a newline token per row. The scores
of every crop are packed the same way (HF's own ``pack_image_features`` run on
token indices) and the ``K_i = round(budget * n_i)`` best of the ``n_i`` packed
tokens of image ``i`` are kept in packed order; newline tokens score lowest
(they mark rows of a grid that no longer exists), so they are kept only if
``K_i`` exceeds the number of real tokens. Counts differ per image, as the
unpruned ``n_i`` already do.

The language-model side: the processor writes ``n_i`` image placeholders per
image; ``generate`` and ``forward`` are wrapped so ``input_ids`` (and
``attention_mask``, ``position_ids``, ``labels``) carry ``K_i`` placeholders
per image before the model runs -- the first ``K_i`` of each image's
placeholders are kept, the others removed, old padding removed, and rows are
re-padded on the side they were padded on (left for generation) to the longest
new row, with fresh position ids. Every
image of every prompt keeps its own ``K_i`` (LLaVA: the same ``K`` for all, so
a prompt with two images keeps ``2K``). ``generate`` returns the ORIGINAL
prompt ids followed by the new tokens, so ``out[:, inputs.input_ids.shape[1]:]``
still slices the answer. ``forward`` returns logits for the shortened sequence
(``L - sum(n_i - K_i)`` tokens per unpadded row, before re-padding).

Optional CrossLMM path: with ``method="pool"``, :func:`add_cross_attention`
adds gated visual-to-visual cross-attention layers to the language model
(pooled visual tokens attend to all visual tokens of their image); they start
as the identity and need fine-tuning.

FLOPs: :func:`lm_flop_ratio` gives the language model's prefill FLOP ratio
(linear layers + attention); ``tokenprune.plan(model)`` describes the
hand-off only (one "block" = the whole vision tower, which is not reduced, so
its FLOP ratio is 1).
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect

import torch

from ..engine import QK
from ..patch import get_patch
from ..plan import EncoderInfo, keep_count
from ..reducers.base import check_layers, patch_scores
from ..reducers.pool import GatedCrossAttention
from ..state import TokenState
from .base import ORIGINAL, Adapter, class_names, restore_class, swap_class

FAMILIES = {"LlavaForConditionalGeneration": "llava", "LlavaNextForConditionalGeneration": "llava_next"}
METHODS = {"llava": ("cls", "random", "pool", "apet"), "llava_next": ("cls", "random")}
PATCH_KEY = "_tokenprune_patch"

# q/k recorded during one get_image_features call, read by the projector mixin (LLaVA)
_RECORDED: contextvars.ContextVar["dict | None"] = contextvars.ContextVar("tokenprune_llava_qk", default=None)
XATTN_NAME = "tokenprune_cross_attention"  # submodule of the inner model holding the CrossLMM add-on


class _CrossContext:
    """Per-call data of the CrossLMM add-on: the unreduced projected tokens and where the reduced ones sit."""

    def __init__(self):
        self.full: torch.Tensor | None = None  # [images, N, C_lm]: every visual token, projected
        self.rows: torch.Tensor | None = None  # (row, column) of each reduced visual token in the LM input
        self.cols: torch.Tensor | None = None
        self.seq_len = -1


_CROSS: contextvars.ContextVar["_CrossContext | None"] = contextvars.ContextVar("tokenprune_llava_x", default=None)


@contextlib.contextmanager
def _cross_scope(model):
    if XATTN_NAME not in model.model._modules or _CROSS.get() is not None:
        yield
        return
    token = _CROSS.set(_CrossContext())
    try:
        yield
    finally:
        _CROSS.reset(token)


def _is_transformers(model) -> bool:
    return any(m.startswith("transformers.") for m, _ in class_names(model))


def _image_token_id(config):
    for name in ("image_token_id", "image_token_index"):
        v = getattr(config, name, None)
        if v is not None:
            return v
    return None


def is_vlm(model) -> bool:
    """A transformers vision-language model: vision + text configs and an image placeholder token."""
    cfg = getattr(model, "config", None)
    return (_is_transformers(model) and cfg is not None and getattr(cfg, "vision_config", None) is not None
            and getattr(cfg, "text_config", None) is not None
            and any(hasattr(cfg, n) for n in ("image_token_id", "image_token_index")))


def _heads(out: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, c = out.shape
    return out.view(b, n, num_heads, c // num_heads).transpose(1, 2)


# -- language-model input --------------------------------------------------------------------
def shrink_image_tokens(input_ids: torch.Tensor, image_token_id: int, full: list[int], kept: list[int], *,
                        attention_mask=None, position_ids=None, labels=None, pad_id: int = 0):
    """Keep the first ``kept[i]`` of the ``full[i]`` placeholders of image ``i`` (images in row-major
    order of their placeholders, as HF's ``masked_scatter`` fills them) and re-pad the rows.

    Returns ``(input_ids, attention_mask, position_ids, labels)``; the last three are ``None`` where
    they were ``None`` (``attention_mask`` is created when rows end up with different lengths).
    """
    is_img = input_ids == image_token_id
    total = int(is_img.sum())
    if total != sum(full):
        raise ValueError(
            f"tokenprune: input_ids hold {total} image tokens but the {len(full)} image(s) need {sum(full)} "
            f"({full}); build the prompt with the model's processor (one '<image>' per image, expanded by "
            "the processor)")
    full_t = torch.tensor(full, device=input_ids.device)
    kept_t = torch.tensor(kept, device=input_ids.device)
    image_of = torch.repeat_interleave(torch.arange(len(full), device=input_ids.device), full_t)
    start = (full_t.cumsum(0) - full_t)[image_of]
    rank = torch.arange(total, device=input_ids.device) - start
    keep = ~is_img
    keep[is_img] = rank < kept_t[image_of]
    if attention_mask is not None:  # old padding goes too: rows are re-padded to the new longest row
        keep &= attention_mask.bool()

    b, _ = input_ids.shape
    lengths = keep.sum(1)
    width = int(lengths.max())
    right = attention_mask is not None and bool((attention_mask[:, -1] == 0).any()) \
        and not bool((attention_mask[:, 0] == 0).any())
    # destination column of every kept token
    col = keep.long().cumsum(1) - 1
    if not right:
        col = col + (width - lengths)[:, None]
    rows = torch.arange(b, device=input_ids.device)[:, None].expand_as(keep)
    r, c, src_c = rows[keep], col[keep], keep.nonzero()[:, 1]

    def move(t, fill):
        out = torch.full((b, width), fill, dtype=t.dtype, device=t.device)
        out[r, c] = t[r, src_c]
        return out

    new_ids = move(input_ids, pad_id)
    mask_src = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    new_mask = move(mask_src, 0)
    if attention_mask is None and bool((lengths == width).all()):
        new_mask_out = None
    else:
        new_mask_out = new_mask
    new_pos = None
    if position_ids is not None:
        new_pos = (new_mask.long().cumsum(1) - 1).clamp(min=0).masked_fill(new_mask == 0, 1)
        new_pos = new_pos.to(position_ids.dtype)
    new_labels = move(labels, -100) if labels is not None else None
    return new_ids, new_mask_out, new_pos, new_labels


# -- mixins ----------------------------------------------------------------------------------------
class _Generation:
    """Mixin for ``Llava(Next)ForConditionalGeneration``: shorten the prompt's image placeholders."""

    def generate(self, inputs=None, *args, **kwargs):
        adapter = self.__dict__[PATCH_KEY].adapter
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if ids is None or not torch.is_tensor(ids) or ids.dtype not in (torch.long, torch.int):
            if kwargs.get("pixel_values") is not None:
                raise ValueError("tokenprune: a pruned LLaVA model needs input_ids (from the processor) to "
                                 "generate with images; inputs_embeds is not supported")
            return super().generate(inputs, *args, **kwargs)
        lens = adapter.image_lengths(kwargs.get("pixel_values"), kwargs.get("image_sizes"))
        if lens is None or lens[0] == lens[1]:
            return super().generate(inputs, *args, **kwargs)
        kwargs.pop("input_ids", None)
        new_ids, new_mask, _, _ = shrink_image_tokens(ids, adapter.image_token_id, *lens,
                                                      attention_mask=kwargs.get("attention_mask"),
                                                      pad_id=adapter.pad_id)
        kwargs["attention_mask"] = new_mask
        if new_mask is None:
            kwargs.pop("attention_mask")
        with _cross_scope(self):
            out = super().generate(new_ids, *args, **kwargs)
        seq = out if torch.is_tensor(out) else out.sequences
        reps = seq.shape[0] // ids.shape[0]
        prompt = ids.repeat_interleave(reps, 0) if reps > 1 else ids
        full = torch.cat([prompt.to(seq.device), seq[:, new_ids.shape[1]:]], 1)
        if torch.is_tensor(out):
            return full
        out.sequences = full
        return out

    def save_pretrained(self, *args, **kwargs):
        """Save as the original class (HF writes ``type(self).__name__`` into ``config.architectures``).
        The weights are the model's own; an added CrossLMM layer is saved under its own keys."""
        patched = type(self)
        self.__class__ = patched.__dict__.get(ORIGINAL) or patched
        try:
            return self.save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = patched

    def forward(self, *args, **kwargs):
        if not args and kwargs.get("pixel_values") is None and not kwargs.get("mm_encoder_outputs"):
            return super().forward(**kwargs)  # decoding steps: nothing to shorten
        adapter = self.__dict__[PATCH_KEY].adapter
        sig = inspect.signature(super().forward)
        bound = sig.bind_partial(*args, **kwargs)
        a = dict(bound.arguments)
        extra = a.pop("kwargs", {})
        a.update(extra)
        ids = a.get("input_ids")
        if ids is None and a.get("pixel_values") is not None:
            raise ValueError("tokenprune: a pruned LLaVA model needs input_ids (from the processor) with images; "
                             "inputs_embeds cannot be shortened")
        if ids is not None:
            lens = adapter.image_lengths(a.get("pixel_values"), a.get("image_sizes"), a.get("mm_encoder_outputs"))
            if lens is not None:
                full, kept = lens
                count = int((ids == adapter.image_token_id).sum())
                if count == 0:
                    pass  # a step without placeholders (decoding with cached image features)
                elif count == sum(full) and full != kept:
                    a["input_ids"], mask, pos, labels = shrink_image_tokens(
                        ids, adapter.image_token_id, full, kept, attention_mask=a.get("attention_mask"),
                        position_ids=a.get("position_ids"), labels=a.get("labels"), pad_id=adapter.pad_id)
                    for k, v in (("attention_mask", mask), ("position_ids", pos), ("labels", labels)):
                        if a.get(k) is not None or (k == "attention_mask" and v is not None):
                            a[k] = v
                elif count != sum(kept):
                    raise ValueError(
                        f"tokenprune: input_ids hold {count} image tokens; the image(s) need {sum(full)} "
                        f"({full}) before pruning or {sum(kept)} after; build the prompt with the model's processor")
        with _cross_scope(self):
            ctx = _CROSS.get()
            if ctx is not None and a.get("input_ids") is not None:
                pos = (a["input_ids"] == adapter.image_token_id).nonzero()
                ctx.rows, ctx.cols, ctx.seq_len = pos[:, 0], pos[:, 1], a["input_ids"].shape[1]
            try:
                return super().forward(**a)
            finally:
                if ctx is not None:
                    ctx.rows = ctx.cols = None


_GEN_MIXINS: dict[type, type] = {}


def _generation_mixin(orig: type) -> type:
    """``_Generation`` with ``forward`` showing the original signature: ``generate`` inspects it to decide
    which keyword arguments the model accepts."""
    mixin = _GEN_MIXINS.get(orig)
    if mixin is None:
        def forward(self, *args, **kwargs):
            return _Generation.forward(self, *args, **kwargs)

        forward.__signature__ = inspect.signature(orig.forward)
        mixin = type(f"_Generation{orig.__name__}", (_Generation,), {"forward": forward,
                                                                    "__module__": __name__})
        _GEN_MIXINS[orig] = mixin
    return mixin


class _LlavaInner:
    """Mixin for ``LlavaModel``: record the scoring layers' q/k while the vision tower runs."""

    def get_image_features(self, pixel_values, *args, **kwargs):
        adapter = self.__dict__[PATCH_KEY].adapter
        if kwargs.get("image_sizes") is not None:
            raise NotImplementedError("tokenprune: LLaVA with per-image sizes (Pixtral-style towers) is not "
                                      "supported; call tokenprune.remove(model)")
        with adapter.recording() as qks:
            token = _RECORDED.set(qks)
            try:
                return super().get_image_features(pixel_values, *args, **kwargs)
            finally:
                _RECORDED.reset(token)


class _Projector:
    """Mixin for the multimodal projector: reduce the selected vision features before projecting them."""

    def forward(self, image_features):
        qks = _RECORDED.get()
        ctx = _CROSS.get()
        if ctx is not None and qks is not None:
            ctx.full = super().forward(image_features)
        if qks is not None:
            image_features = self.__dict__[PATCH_KEY].adapter.reduce_features(image_features, qks)
        return super().forward(image_features)


class _NextInner:
    """Mixin for ``LlavaNextModel``: prune each image's packed features."""

    def get_image_features(self, pixel_values, image_sizes, *args, **kwargs):
        adapter = self.__dict__[PATCH_KEY].adapter
        want_tuple = kwargs.get("return_dict") is False
        kwargs["return_dict"] = True
        with adapter.recording() as qks:
            out = super().get_image_features(pixel_values, image_sizes, *args, **kwargs)
        out.pooler_output = adapter.reduce_packed(list(out.pooler_output), qks, image_sizes)
        return out.to_tuple() if want_tuple else out


# -- the adapter ---------------------------------------------------------------------------------
class LlavaAdapter(Adapter):
    family = "llava"
    description = ("transformers LlavaForConditionalGeneration / LlavaNextForConditionalGeneration "
                   "(visual tokens pruned between the vision tower and the language model)")

    @classmethod
    def matches(cls, model) -> bool:
        return is_vlm(model)

    def __init__(self, model):
        super().__init__(model)
        names = [c.__name__ for c in type(model).__mro__ if c.__module__.startswith("transformers.")]
        kind = next((FAMILIES[n] for n in names if n in FAMILIES), None)
        if kind is None:
            mt = getattr(model.config, "model_type", "?")
            raise TypeError(
                f"tokenprune: {type(model).__name__} (model_type={mt!r}) is a vision-language model family "
                f"tokenprune does not support yet; supported VLMs: {', '.join(FAMILIES)}. To reduce only its "
                "vision encoder, apply tokenprune to the vision tower module if its family is supported")
        self.kind = kind
        cfg = model.config
        self.image_token_id = _image_token_id(cfg)
        if self.image_token_id is None:
            raise ValueError(
                "tokenprune: model.config.image_token_id is not set, so the image placeholders in input_ids "
                "cannot be found; set it to the processor's image token id, e.g. model.config.image_token_id = "
                "processor.tokenizer.convert_tokens_to_ids('<image>')")
        tc = cfg.text_config
        pad = getattr(cfg, "pad_token_id", None)
        pad = getattr(tc, "pad_token_id", None) if pad is None else pad
        self.pad_id = int(pad) if pad is not None else 0
        inner = model.model
        self.inner = inner
        tower = inner.vision_tower
        vm = getattr(tower, "vision_model", tower)  # transformers 5 merged CLIPVisionTransformer into the model
        layers = getattr(getattr(vm, "encoder", None), "layers", None)
        if layers is None or not all(hasattr(lay, "self_attn") and hasattr(lay.self_attn, "q_proj")
                                     for lay in layers):
            raise TypeError(f"tokenprune: the vision tower {type(tower).__name__} is not a CLIP/SigLIP-style "
                            "encoder (encoder.layers[i].self_attn.q_proj); not supported")
        self.layers = layers
        self.has_cls = getattr(getattr(vm, "embeddings", None), "class_embedding", None) is not None
        self.strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        fl = getattr(cfg, "vision_feature_layer", -2)
        self.num_feature_layers = 1 if isinstance(fl, int) else len(fl)
        depth = len(layers)
        idx = [f if f >= 0 else depth + 1 + f for f in ([fl] if isinstance(fl, int) else fl)]
        self.feature_layer = max(idx) - 1  # encoder layer whose output the VLM reads
        vc = cfg.vision_config
        side = vc.image_size // vc.patch_size
        self.grid = (side, side)
        self.record_layers: list[int] = []
        self.observe_layers: list[int] = []
        self.score_layer: int | None = None
        self.reducer = None
        self.patch = None
        self.cross_handles: list = []

    # tokens per image (LLaVA) / per crop (NeXT) after the select strategy
    @property
    def tokens_per_crop(self) -> int:
        n = self.grid[0] * self.grid[1]
        return n + (1 if self.strategy != "default" and self.has_cls else 0)

    @property
    def num_prefix(self) -> int:
        """Prefix tokens of the projector input: the [CLS] kept by strategy "full"."""
        return 1 if self.strategy != "default" and self.has_cls else 0

    def info(self) -> EncoderInfo:
        vc = self.model.config.vision_config
        return EncoderInfo(depth=1, dim=vc.hidden_size * self.num_feature_layers,
                           num_heads=vc.num_attention_heads, num_prefix=self.num_prefix,
                           num_tokens=self.grid[0] * self.grid[1], mlp_hidden=vc.intermediate_size,
                           grid=self.grid, has_cls=self.has_cls, family=self.kind)

    def grid_for(self, num_tokens: int):
        return self.grid if num_tokens == self.grid[0] * self.grid[1] else None

    def check(self, reducer) -> None:
        name = reducer.name
        allowed = METHODS[self.kind]
        if name not in allowed:
            raise ValueError(
                f"tokenprune: method {name!r} is not available for {self.kind} (visual tokens are reduced once, "
                f"between the vision tower and the language model); use one of: {', '.join(allowed)}")
        self.reducer = reducer
        depth = len(self.layers)
        if name == "cls":
            if reducer.threshold is not None:
                raise ValueError("tokenprune: cls threshold= keeps a different number of tokens per image, which "
                                 "LLaVA's placeholders cannot follow; use a budget instead")
            if reducer.layers is not None:
                layers = check_layers(reducer.layers, depth, "vision layers")
            elif reducer.variant == "sum":
                layers = list(range(0, self.feature_layer + 1))
            else:
                layers = [self.feature_layer]
            if self.feature_layer < 0 and reducer.layers is None:
                raise ValueError("tokenprune: vision_feature_layer reads the patch embeddings (no attention layer "
                                 "before it); give layers=[j] to score with vision layer j")
            self.score_layer = layers[-1]
            self.observe_layers = layers if reducer.variant == "sum" else []
            self.record_layers = layers
            reducer.layers = None  # the plan has one stage: after the (whole) vision tower
        else:
            if getattr(reducer, "layers", None) is not None or getattr(reducer, "block", -1) != -1:
                raise ValueError(f"tokenprune: {name} prunes once, after the vision tower, in a VLM; "
                                 "layers=/block= do not apply")
            self.record_layers, self.observe_layers, self.score_layer = [], [], None

    def install(self, patch) -> None:
        self.patch = patch
        m, inner = self.model, self.inner
        m.__dict__[PATCH_KEY] = patch
        inner.__dict__[PATCH_KEY] = patch
        swap_class(m, _generation_mixin(type(m)))
        if self.kind == "llava":
            proj = inner.multi_modal_projector
            proj.__dict__[PATCH_KEY] = patch
            swap_class(inner, _LlavaInner)
            swap_class(proj, _Projector)
        else:
            swap_class(inner, _NextInner)

    def uninstall(self) -> None:
        m, inner = self.model, self.inner
        remove_cross_attention(m)
        proj = getattr(inner, "multi_modal_projector", None)
        for mod in (m, inner, proj):
            if mod is not None:
                restore_class(mod)
                mod.__dict__.pop(PATCH_KEY, None)

    # -- how many placeholders per image, before and after ------------------------------------------
    def kept_for(self, n: int) -> int:
        """Tokens reaching the LM for an image with ``n`` tokens (LLaVA: prefix included)."""
        if self.kind == "llava":
            p = self.num_prefix
            return p + self.patch.plan_for(n - p, self.grid_for(n - p)).num_out
        return keep_count(self.patch.budget, n)

    def image_lengths(self, pixel_values=None, image_sizes=None, mm_encoder_outputs=None):
        """``(full, kept)`` placeholder counts per image, or ``None`` without images."""
        if pixel_values is not None and pixel_values.shape[0] > 0:
            if self.kind == "llava":
                full = [self.tokens_per_crop] * pixel_values.shape[0]
            else:
                if image_sizes is None:
                    raise ValueError("tokenprune: LLaVA-NeXT needs image_sizes (from the processor)")
                full = self.next_lengths(image_sizes)
            return full, [self.kept_for(n) for n in full]
        enc = (mm_encoder_outputs or {}).get("image")
        if enc is not None:
            kept = [int(f.shape[0]) for f in enc.pooler_output]
            full = getattr(enc, "_tokenprune_full", None) or kept
            return list(full), kept
        return None

    def next_lengths(self, image_sizes) -> list[int]:
        """Packed token count of each LLaVA-NeXT image, from HF's own packing (run on 1-channel zeros)."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        out = []
        for size in image_sizes:
            crops = image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            feats = [torch.zeros(crops, self.tokens_per_crop, 1)]
            _, lens = self.inner.pack_image_features(feats, torch.as_tensor(size)[None], self.strategy,
                                                     image_newline=torch.zeros(1))
            out.append(int(lens[0]))
        return out

    # -- recording the scoring layers' q/k ------------------------------------------------------------
    @contextlib.contextmanager
    def recording(self):
        qks: dict[int, QK] = {}
        handles = []
        for i in self.record_layers:
            attn = self.layers[i].self_attn
            qk = QK(scale=float(attn.scale))
            qks[i] = qk
            h = attn.num_heads

            def grab_q(_m, _i, out, qk=qk, h=h):
                qk.q = _heads(out, h)

            def grab_k(_m, _i, out, qk=qk, h=h):
                qk.k = _heads(out, h)

            handles.append(attn.q_proj.register_forward_hook(grab_q))
            handles.append(attn.k_proj.register_forward_hook(grab_k))
        try:
            yield qks
        finally:
            for hd in handles:
                hd.remove()

    # -- LLaVA: the reducer on the projector input -----------------------------------------------------
    def reduce_features(self, feats: torch.Tensor, qks: dict) -> torch.Tensor:
        """``feats`` ``[images, T, C]`` (after the select strategy) -> ``[images, kept(T), C]``."""
        p_in = self.num_prefix
        n = feats.shape[1] - p_in
        plan = self.patch.plan_for(n, self.grid_for(n))
        if not plan.stages:
            return feats
        stage = plan.stages[-1]
        dummy = self.strategy == "default"  # HF dropped token 0: an empty slot stands for it
        x = torch.cat([feats.new_zeros(feats.shape[0], 1, feats.shape[2]), feats], 1) if dummy else feats
        p = 1 if dummy else p_in
        state = TokenState.start(x, p, self.grid_for(n), track_source=False)
        state.proportional = self.reducer.proportional
        for i in self.observe_layers:
            self.reducer.observe(state, i, qks[i])
        qk = qks.get(self.score_layer) if self.score_layer is not None else None
        state = self.reducer.reduce(state, stage, qk)
        out = state.x[:, 1:] if dummy else state.x
        if out.shape[1] != p_in + plan.num_out:
            raise AssertionError(f"tokenprune: {out.shape[1]} visual tokens after {self.reducer.name}, "
                                 f"expected {p_in + plan.num_out}")
        return out

    # -- LLaVA-NeXT: top-K of each image's packed tokens --------------------------------------------------
    def crop_scores(self, qks: dict, num_crops: int, device) -> torch.Tensor:
        """Score of every token of every crop ``[crops, T]`` (T after the select strategy)."""
        r = self.reducer
        t = self.tokens_per_crop
        if r.name == "random":
            gen = None
            if r.seed is not None:
                gen = torch.Generator(device=device).manual_seed(r.seed)
            return torch.rand((num_crops, t), generator=gen, device=device)
        p = 1 if self.strategy == "default" else 0
        total = None
        for i in (self.observe_layers or [self.score_layer]):
            qk = qks[i]
            state = TokenState(x=qk.q.new_empty(qk.q.shape[0], qk.q.shape[2], 0), num_prefix=p, num_input=t)
            s = patch_scores(state, qk, self.has_cls, r.substitute)
            total = s if total is None else total + s
        return total

    def reduce_packed(self, packed: list, qks: dict, image_sizes) -> list:
        lens = [int(f.shape[0]) for f in packed]
        if all(keep_count(self.patch.budget, n) == n for n in lens):
            return packed
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        crops = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                 for s in image_sizes]
        device = packed[0].device
        scores = self.crop_scores(qks, sum(crops), device).float()
        out, start = [], 0
        t = self.tokens_per_crop
        for i, (feat, c) in enumerate(zip(packed, crops)):
            index = torch.arange(c * t, device=device, dtype=torch.float32).view(c, t, 1)
            packed_idx, _ = self.inner.pack_image_features([index], image_sizes[i:i + 1], self.strategy,
                                                           image_newline=torch.full((1,), -1.0, device=device))
            packed_idx = packed_idx[0][:, 0].round().long()
            flat = scores[start:start + c].reshape(-1)
            s = torch.where(packed_idx >= 0, flat[packed_idx.clamp(min=0)], torch.full_like(flat[:1], -float("inf")))
            k = keep_count(self.patch.budget, feat.shape[0])
            sel = s.topk(k).indices.sort().values
            out.append(feat[sel])
            start += c
        return out


# -- CrossLMM add-on: pooled visual tokens attend back to all visual tokens inside the LM ------------------
def add_cross_attention(model, every: int = 4, num_heads: int | None = None) -> torch.nn.ModuleList:
    """Add CrossLMM's visual-to-visual cross-attention to a LLaVA model patched with ``method="pool"``.

    After every ``every``-th decoder layer of the language model, the hidden states at the (pooled) visual
    positions attend to ALL the visual tokens of their image (the projector's output before pooling) and the
    result is added through a tanh gate (``reducers.pool.GatedCrossAttention``; gates start at 0, so the
    model is unchanged until trained). Only the prefill is affected (decoding reads the visual positions
    from the KV cache). Text-to-visual cross-attention of the paper is not included.

    The layers are new trainable parameters registered under ``model.model.tokenprune_cross_attention``
    (so they are saved with ``state_dict``): they need fine-tuning (the paper pretrains and
    instruction-tunes them) before they help. ``tokenprune.remove(model)`` removes them.
    Returns the added layers (for the optimizer).
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
    def hook(_mod, _args, _kwargs, output):
        ctx = _CROSS.get()
        h = output[0] if isinstance(output, tuple) else output
        if ctx is None or ctx.full is None or ctx.rows is None or h.shape[1] != ctx.seq_len:
            return None  # decoding step, or no image in this call
        images, _, c = ctx.full.shape
        rows, cols = ctx.rows, ctx.cols
        queries = h[rows, cols].view(images, -1, c)
        new = layer(queries, ctx.full.to(h.dtype)).reshape(-1, c)
        h = h.index_put((rows, cols), new)
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
