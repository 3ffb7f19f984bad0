"""The VLM layer every vision-language family shares: visual tokens reduced between the vision tower and the LM.

One call of ``forward`` / ``generate`` with pixel values goes, explicitly and in one direction:

1. the family runs its vision tower, with a :class:`~tokenprune.adapters.hf_common.LayerQK` context passed as
   the keyword ``tokenprune=`` so the attention modules of the scoring layers record the q/k they made (SDPA
   stays the kernel); it returns, per image / video, the tokens at the hand-off point (:class:`Group`);
2. the reducer, through its public interface only (``score_layers`` / ``score_tokens`` / ``select``,
   ``reducers/base.py``), keeps ``K = plan.num_out`` tokens of each item (``budget`` = fraction of the item's
   visual tokens, as everywhere; ``pool`` picks its nearest grid);
3. :func:`shrink` keeps, of each item's placeholders in ``input_ids``, those of the kept tokens, drops the
   others and the old padding, and re-pads the rows on the side they were padded on. ``attention_mask``,
   ``labels`` and position ids follow. A kept token is placed at the placeholder of the original token it
   stands for (for a merged/pooled token: its first member), so with M-RoPE it keeps the exact (t, h, w)
   position it had before pruning (gathered from the unpruned position ids the model itself computes), and
   the text after it keeps its positions; 1D-position families (LLaVA) get fresh consecutive positions, as
   if the prompt had been written with ``K`` placeholders;
4. the model's own forward / ``generate`` runs on ``inputs_embeds`` (the kept features scattered into the
   kept placeholders) without pixel values. ``generate`` continues positions from the last prompt position
   (its own rule for explicit position ids), so decoding steps run the model's unpatched path: no work is
   added after prefill. ``generate`` returns the ORIGINAL prompt ids followed by the new tokens.

Nothing about a call is stored on a module, a tensor or in a global. When no token of any item would be
removed (budget 1.0), the call goes to the model untouched.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from dataclasses import dataclass, field

import torch

from ..adapters.base import Adapter, class_names, restore_class, swap_class
from ..adapters.hf_common import KERNEL_NAME, LayerQK, ProjAttention, SaveAsOriginal, check_sdpa, register_kernel
from ..plan import EncoderInfo
from ..state import TokenState

PATCH_KEY = "_tokenprune_patch"
METHODS = ("cls", "random", "pool", "apet", "diverse")
VISUAL_KWARGS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "image_sizes",
                 "second_per_grid_ts", "mm_token_type_ids", "video_second_per_grid", "mm_encoder_outputs")


@dataclass
class Group:
    """Tokens of ``x.shape[0]`` items of one modality with the same token count, at the hand-off point.

    ``x`` ``[B, P + N, C]``; ``scores`` ``[B, N]`` (summed reducer scores, or None); ``grid`` of the N tokens;
    ``extras``: per-token companions ``[B, N, D]`` that must follow the selection (Qwen3-VL's deepstack);
    ``places`` ``[P + N]``: the placeholder (offset in the item) of each token of ``x`` when ``x`` is not in
    placeholder order (prefix tokens that stand between the others: OneVision's newlines; not with ``extras``).
    ``kept`` ``[B, P + K]``: set by a family that reduced the items itself (Qwen, inside its tower): ``x`` holds the
    kept tokens in placeholder order and ``kept`` the placeholder (offset in the item of ``size`` placeholders) of
    each."""

    x: torch.Tensor
    num_prefix: int = 0
    grid: tuple | None = None
    scores: torch.Tensor | None = None
    extras: list = field(default_factory=list)
    places: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    size: int = 0


def sum_scores(reducer, qks: dict, num_prefix: int) -> torch.Tensor | None:
    """The reducer's scores summed over the recorded layers; each layer's chunks (one per attention call)
    are scored separately and concatenated along the tokens."""
    total = None
    for layer_qks in qks.values():
        parts = []
        for qk in layer_qks:
            state = TokenState(x=qk.q.new_empty(qk.q.shape[0], qk.q.shape[2], 0), num_prefix=num_prefix,
                               num_input=qk.q.shape[2] - num_prefix)
            sc = reducer.score_tokens(state, qk)
            parts.append(sc.to(torch.promote_types(sc.dtype, torch.float32)))  # float64 models: float64
        s = torch.cat(parts, 1)
        total = s if total is None else total + s
    return total


def reduce_group(reducer, group: Group, keep: int):
    """Select ``keep`` tokens of every item of ``group``. Returns per item ``(tokens [P + K, C], kept
    placeholder indices [P + K], extras)``: tokens ordered by the original token they stand for."""
    out = _select(reducer, group, keep)
    if group.places is None:
        return out
    moved = []
    for tokens, places, extras in out:  # to the placeholders' order
        places = group.places.to(places.device)[places]
        order = places.argsort()
        moved.append((tokens[order], places[order], extras))
    return moved


def _select(reducer, group: Group, keep: int):
    x, p = group.x, group.num_prefix
    n = x.shape[1] - p
    if keep >= n:
        idx = torch.arange(x.shape[1], device=x.device)
        return [(x[i], idx, [e[i] for e in group.extras]) for i in range(x.shape[0])]
    state = TokenState.start(x, p, group.grid, track_source=True)
    state.proportional = reducer.proportional
    state = reducer.select(state, keep, group.scores)
    out = []
    ar = torch.arange(n, device=x.device)
    for i in range(x.shape[0]):
        src = state.source[i] - p  # original non-prefix token -> output slot (non-prefix), -1 - p if dropped
        ok = src >= 0
        # a group of original tokens stands at its first member's placeholder
        anchor = torch.full((keep,), n, dtype=torch.long, device=x.device)
        anchor = anchor.scatter_reduce(0, src[ok], ar[ok], "amin")
        order = anchor.argsort()
        tokens = torch.cat([x[i, :p], state.x[i, p:][order]], 0)
        places = torch.cat([torch.arange(p, device=x.device), anchor[order] + p])
        extras = []
        for e in group.extras:  # companions: mean over each output token's members
            ei = e[i]
            acc = ei.new_zeros(keep, ei.shape[-1]).index_add_(0, src[ok], ei[ok])
            cnt = torch.zeros(keep, device=x.device, dtype=ei.dtype).index_add_(0, src[ok], ei.new_ones(int(ok.sum())))
            extras.append((acc / cnt.clamp_min(1)[:, None])[order])
        out.append((tokens, places, extras))
    return out


def shrink(keep: torch.Tensor, attention_mask=None, tensors=(), pad_values=()):
    """Keep the ``keep [B, L]`` columns of each row; rows are re-padded (left unless the mask says the batch
    is right-padded) to the longest new row. ``tensors``: ``[..., B, L]`` each, filled with ``pad_values``.
    Returns ``(new_mask, kept_rows, kept_src_cols, kept_dst_cols, moved tensors)``."""
    if attention_mask is not None:
        keep = keep & attention_mask.bool()
    b = keep.shape[0]
    lengths = keep.sum(1)
    width = int(lengths.max())
    right = attention_mask is not None and bool((attention_mask[:, -1] == 0).any()) \
        and not bool((attention_mask[:, 0] == 0).any())
    col = keep.long().cumsum(1) - 1
    if not right:
        col = col + (width - lengths)[:, None]
    r, src = keep.nonzero(as_tuple=True)
    dst = col[r, src]
    new_mask = torch.zeros(b, width, dtype=torch.long, device=keep.device)
    new_mask[r, dst] = 1
    moved = []
    for t, fill in zip(tensors, pad_values):
        o = torch.full((*t.shape[:-2], b, width), fill, dtype=t.dtype, device=t.device)
        o[..., r, dst] = t[..., r, src]
        moved.append(o)
    return new_mask, r, src, dst, moved


class VLMAdapter(Adapter):
    """Base of the VLM family files. A family sets, in ``__init__``: ``inner`` (the model holding the tower),
    ``token_ids`` (``{"image": id, "video": id}``), ``attn_layers`` (the tower's attention modules, by layer),
    ``default_layer`` (scoring layer), ``has_cls``, and implements ``full_counts``, ``encode``
    (and ``project``, ``positions``, ``lm_extras`` where it needs them). Its ``info().dim`` is the width of the
    tokens the reducer selects from at the hand-off point, which ``space`` names (a reducer's options in feature
    space, such as ``diverse``'s ``text=``, are checked against it)."""

    family = "vlm"
    families: dict = {}  # transformers class name -> kind, of the models the family file serves
    methods = METHODS
    num_prefix = 0  # prefix tokens of every item (always kept, not counted in the budget)
    text_row = False  # generate() position ids carry a leading 1D text row ([4, B, L], Qwen in transformers 5)
    row_kwargs: dict = {}  # per-token call arguments shrunk with input_ids: {name: pad value} (Gemma's token_type_ids)
    proj_attention = False  # the scoring layers' attention does not pass its keyword arguments on (SigLIP's)
    space = "the projected visual tokens the language model receives, as wide as its input embeddings"

    @classmethod
    def matches(cls, model) -> bool:
        return any(m.startswith("transformers.") and n in cls.families for m, n in class_names(model))

    def __init__(self, model):
        super().__init__(model)
        names = [c.__name__ for c in type(model).__mro__ if c.__module__.startswith("transformers.")]
        self.kind = next((self.families[n] for n in names if n in self.families), None)
        self.reducer = None
        self.patch = None
        self.score_at: list[int] = []
        self.configs: list = []  # (attention module, its own config) while installed
        self.swapped: list = []  # modules whose class install() swapped (restored by uninstall())
        cfg = model.config  # the id that fills the re-padded input_ids (the model's, else its LM's, else 0)
        pad = getattr(cfg, "pad_token_id", None)
        pad = getattr(getattr(cfg, "text_config", None), "pad_token_id", None) if pad is None else pad
        self.pad_id = int(pad) if pad is not None else 0

    # -- what a family provides -----------------------------------------------------------------------------
    def full_counts(self, a: dict) -> dict:
        """``{modality: [tokens of each item]}`` of the call's visual inputs (empty without any)."""
        raise NotImplementedError

    def encode(self, a: dict, sink: LayerQK | None) -> dict:
        """``{modality: [Group, ...]}`` in placeholder order, scores filled where the reducer asked."""
        raise NotImplementedError

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def positions(self, a: dict, ids, mask):
        """Unpruned M-RoPE position ids ``[3, B, L]`` (None for 1D-position families)."""
        return None

    def lm_extras(self, groups: dict, extras: dict, new_ids) -> dict:
        """Keyword arguments for the model forward carrying pruned companions (Qwen3-VL deepstack)."""
        return {}

    def lm_width(self) -> int:
        """Width of the language model's input embeddings (what the projected visual tokens have)."""
        return int(self.model.get_input_embeddings().weight.shape[-1])

    def item_grids(self, a: dict, counts: dict) -> dict:
        """``{modality: [grid of each item's non-prefix tokens, or None]}``."""
        return {mod: [None] * len(full) for mod, full in counts.items()}

    # -- Adapter ---------------------------------------------------------------------------------------------
    def check(self, reducer) -> None:
        if reducer.name not in self.methods:
            raise ValueError(
                f"tokenprune: method {reducer.name!r} is not available for {type(self.model).__name__} (visual "
                f"tokens are reduced once, between the vision tower and the language model); use one of: "
                f"{', '.join(self.methods)}")
        text = getattr(reducer, "text", None)
        if torch.is_tensor(text) and text.ndim == 2 and text.shape[0] != 1:
            raise ValueError(
                f"tokenprune: text= has {text.shape[0]} rows; on a VLM it is one embedding [C] for every image of a "
                "call (the tokens are selected per image, not per prompt row): give one, or call each prompt alone")
        try:  # options in feature space are checked against the tokens the reducer selects from
            reducer.check(self.info())
        except ValueError as e:
            raise ValueError(f"{e}; {type(self.model).__name__} selects from {self.space}") from None
        self.score_at = reducer.score_layers(len(self.attn_layers), self.default_layer)
        if self.score_at and self.default_layer < 0 and getattr(reducer, "layers", None) is None:
            raise ValueError("tokenprune: vision_feature_layer reads the patch embeddings (no attention layer "
                             "before it); give layers=[j] to score with vision layer j")
        if self.score_at:  # the scoring layers record their q/k on SDPA
            check_sdpa(self.attn_layers[0].config, f"vision tower of {type(self.model).__name__}")
        self.reducer = reducer

    def install(self, patch) -> None:
        self.patch = patch
        self.model.__dict__[PATCH_KEY] = patch
        swap_class(self.model, model_mixin(type(self.model)))
        # only the scoring layers' attention goes through tokenprune_sdpa (records q/k when a LayerQK context
        # comes with the call): each gets its own copy of the config naming it; the other layers are untouched
        if self.score_at:
            register_kernel()
        for i in self.score_at:
            attn = self.attn_layers[i]
            own = copy.copy(attn.config)
            own.__dict__["_attn_implementation_internal"] = KERNEL_NAME
            self.configs.append((attn, attn.config))
            attn.config = own
            if self.proj_attention:
                self.swap(attn, ProjAttention)

    def swap(self, module, mixin) -> None:
        """Give ``module`` the class ``mixin`` adds to its own until :meth:`uninstall`."""
        swap_class(module, mixin)
        self.swapped.append(module)

    def uninstall(self) -> None:
        for m in self.swapped:
            restore_class(m)
        self.swapped = []
        restore_class(self.model)
        self.model.__dict__.pop(PATCH_KEY, None)
        for attn, cfg in self.configs:
            attn.config = cfg
        self.configs = []

    def kept_count(self, n: int, grid) -> int:
        return self.patch.plan_for(n, grid).num_out

    def sink(self) -> LayerQK | None:
        return LayerQK({i: self.attn_layers[i] for i in self.score_at}) if self.score_at else None

    # -- one call ------------------------------------------------------------------------------------------
    def prepare(self, a: dict, for_generate: bool) -> dict | None:
        """The call's keyword arguments with the visual tokens reduced, or None to leave the call as it is."""
        counts = self.full_counts(a)
        if not any(counts.values()):
            return None
        ids = a.get("input_ids")
        if ids is None:
            raise ValueError("tokenprune: a pruned VLM needs input_ids (from the processor) with images or videos; "
                             "inputs_embeds cannot be shortened")
        for mod, full in counts.items():
            have = int((ids == self.token_ids[mod]).sum())
            if have != sum(full):
                raise ValueError(
                    f"tokenprune: input_ids hold {have} {mod} placeholder tokens but the {len(full)} {mod}(s) need "
                    f"{sum(full)} ({full}); build the prompt with the model's processor")
        grids = self.item_grids(a, counts)
        p = self.num_prefix
        if all(self.kept_count(n - p, g) >= n - p for mod, full in counts.items() for n, g in zip(full, grids[mod])):
            return None  # nothing to prune (budget 1.0): the model's own path, untouched
        with torch.no_grad() if for_generate else contextlib.nullcontext():
            groups = self.encode(a, self.sink())
        mask = a.get("attention_mask")
        pos = self.positions(a, ids, mask)
        keep = torch.ones_like(ids, dtype=torch.bool)
        feats, extras = {}, {}
        for mod, gs in groups.items():
            tid = self.token_ids[mod]
            places, tokens, comp = [], [], []
            base = 0
            for g in gs:
                if g.kept is None:
                    items = reduce_group(self.reducer, g, self.kept_count(g.x.shape[1] - g.num_prefix, g.grid))
                    width = g.x.shape[1]
                else:  # reduced by the family already
                    items = [(g.x[i], g.kept[i], [e[i] for e in g.extras]) for i in range(g.x.shape[0])]
                    width = g.size
                for t, pl, ex in items:
                    places.append(pl + base)
                    tokens.append(t)
                    comp.append(ex)
                    base += width
            is_tok = ids == tid
            flat = torch.zeros(base, dtype=torch.bool, device=ids.device)
            flat[torch.cat(places)] = True
            keep[is_tok] = flat
            feats[mod] = self.project(torch.cat(tokens, 0))
            if comp and comp[0]:
                extras[mod] = [torch.cat([c[j] for c in comp], 0) for j in range(len(comp[0]))]
        rows = [ids, *(t for t in (pos,) if t is not None), *(t for t in (a.get("labels"),) if t is not None)]
        pads = [self.pad_id] + [1] * (pos is not None) + [-100] * (a.get("labels") is not None)
        row_names = [k for k in self.row_kwargs if a.get(k) is not None]
        rows += [a[k] for k in row_names]
        pads += [self.row_kwargs[k] for k in row_names]
        new_mask, _, _, _, moved = shrink(keep, mask, rows, pads)
        moved, named = moved[:len(moved) - len(row_names)], moved[len(moved) - len(row_names):]
        new_ids = moved[0]
        new_pos = moved[1] if pos is not None else None
        labels = moved[-1] if a.get("labels") is not None else None
        table = self.model.get_input_embeddings()
        vocab = getattr(table, "num_embeddings", None)  # a placeholder id past the vocabulary embeds as id 0
        embeds = table(new_ids if vocab is None else new_ids.masked_fill(new_ids >= vocab, 0))
        for mod, f in feats.items():
            m = (new_ids == self.token_ids[mod])[..., None]
            embeds = embeds.masked_scatter(m.to(embeds.device), f.to(embeds.device, embeds.dtype))
        out = {k: v for k, v in a.items() if k not in VISUAL_KWARGS}
        out.update(input_ids=None, inputs_embeds=embeds, attention_mask=new_mask)
        if new_pos is not None:
            text = (new_mask.cumsum(1) - 1).clamp(min=0)[None].to(new_pos.dtype)
            out["position_ids"] = torch.cat([text, new_pos]) if self.text_row else new_pos
        elif a.get("position_ids") is not None:
            out["position_ids"] = (new_mask.cumsum(1) - 1).clamp(min=0).to(a["position_ids"].dtype)
        if labels is not None:
            out["labels"] = labels
        out.update(zip(row_names, named))
        out.update(self.lm_extras(groups, extras, new_ids))
        if for_generate:
            out["input_ids"] = new_ids
        elif a.get("attention_mask") is None and bool(new_mask.all()):
            out["attention_mask"] = None
        return out


class VLMModel(SaveAsOriginal):
    """Mixin for the top-level ``...ForConditionalGeneration``: the visual tokens of calls with pixel values are
    reduced before the model runs; calls without (every decoding step) go straight to the model."""

    def forward(self, *args, **kwargs):
        if not args and kwargs.get("pixel_values") is None and kwargs.get("pixel_values_videos") is None:
            if kwargs.get("tokenprune") is not None and kwargs.get("inputs_embeds") is None:
                kwargs.pop("tokenprune")  # a decoding step after a pruned prefill: the companions are in the cache
            _check_step_mask(kwargs)
            return super().forward(**kwargs)
        adapter = self.__dict__[PATCH_KEY].adapter
        a = _bind(super().forward, args, kwargs)
        new = adapter.prepare(a, for_generate=False)
        return super().forward(**(a if new is None else new))

    def generate(self, inputs=None, *args, **kwargs):
        adapter = self.__dict__[PATCH_KEY].adapter
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if kwargs.get("pixel_values") is None and kwargs.get("pixel_values_videos") is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None and torch.is_tensor(ids) and adapter.patch.budget < 1 \
                    and bool(sum((ids == t).sum() for t in adapter.token_ids.values()) > 0) \
                    and getattr(cache, "get_seq_length", lambda: 0)() > 0:
                raise ValueError(
                    "tokenprune: generate() got a cache and input_ids with image/video placeholders but no pixel "
                    "values; a pruned call's cache holds the PRUNED prompt (the returned sequences hold the original "
                    "one), so the tokens after it cannot be found. Pass the images again (pixel_values and the "
                    "processor's other visual inputs) with the cache: the prompt is pruned the same way and only the "
                    "new tokens run (method='random' needs a fixed seed)")
            return super().generate(inputs, *args, **kwargs)
        if args:
            raise TypeError("tokenprune: pass generate()'s arguments by keyword to a pruned VLM")
        a = dict(kwargs)
        a["input_ids"] = ids
        new = adapter.prepare(a, for_generate=True)
        if new is None:
            return super().generate(inputs, **kwargs)
        shift = ids.shape[1] - new["input_ids"].shape[1]
        for total, fresh in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
            # lengths the user set count the prompt they passed: the LM's prompt is `shift` tokens shorter
            have = self._generation_setting(kwargs, total)
            if shift and have is not None and self._generation_setting(kwargs, fresh) is None:
                new[total] = max(int(have) - shift, 0)
        if shift and new.get("streamer") is not None:
            new["streamer"] = _PromptAsPassed(new["streamer"], ids)
        out = super().generate(**new)
        seq = out if torch.is_tensor(out) else out.sequences
        reps = seq.shape[0] // ids.shape[0]
        prompt = ids.repeat_interleave(reps, 0) if reps > 1 else ids
        full = torch.cat([prompt.to(seq.device), seq[:, new["input_ids"].shape[1]:]], 1)
        if torch.is_tensor(out):
            return full
        out.sequences = full
        return out

    def _generation_setting(self, kwargs, name):
        """``name`` as generate() resolves it: the call's keyword, else its ``generation_config``'s, else the
        model's (None when unset)."""
        if kwargs.get(name) is not None:
            return kwargs[name]
        for gc in (kwargs.get("generation_config"), self.generation_config):
            if getattr(gc, name, None) is not None:
                return getattr(gc, name)
        return None

    def prepare_inputs_for_generation(self, input_ids, *args, inputs_embeds=None, **kwargs):
        """Names ``inputs_embeds`` (PaliGemma's own takes it only through ``**kwargs``, and ``generate`` then
        refuses the pruned prompt's embeddings)."""
        return super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)


class _PromptAsPassed:
    """A ``generate()`` streamer handed the prompt the caller passed: transformers puts the prompt the language model
    runs first (the pruned one), then each new token; the streamer gets the original prompt in its place, as the
    returned sequences hold it."""

    def __init__(self, streamer, prompt: torch.Tensor):
        self.streamer, self.prompt = streamer, prompt

    def put(self, value):
        if self.prompt is not None:
            value, self.prompt = self.prompt.cpu(), None
        self.streamer.put(value)

    def end(self):
        self.streamer.end()


def _check_step_mask(kwargs) -> None:
    """A cached step whose 2D ``attention_mask`` is longer than the cache plus its new tokens: after a pruned
    forward the cache holds the PRUNED prompt, so a mask grown from the original one would be read against the
    wrong positions (transformers reads its first columns, silently masking real tokens of padded rows)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    mask = kwargs.get("attention_mask")
    if cache is None or not torch.is_tensor(mask) or mask.ndim != 2:
        return
    past = getattr(cache, "get_seq_length", lambda: 0)()
    x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if not past or x is None or mask.shape[1] <= past + x.shape[1]:
        return
    raise ValueError(
        f"tokenprune: attention_mask has {mask.shape[1]} columns but the cache holds {past} tokens and this call "
        f"adds {x.shape[1]}; after a pruned forward the cache holds the PRUNED prompt (its visual tokens reduced), "
        "so a mask grown from the original prompt's does not fit it. Use generate() (it keeps track of the pruned "
        "prompt), or run the prefill one prompt at a time without padding and give each step "
        "torch.ones(batch, cache length + new tokens) (or no attention_mask)")


def _bind(fn, args, kwargs) -> dict:
    a = dict(inspect.signature(fn).bind_partial(*args, **kwargs).arguments)
    a.update(a.pop("kwargs", {}))
    return a


_MIXINS: dict[type, type] = {}


def model_mixin(orig: type) -> type:
    """:class:`VLMModel` with ``forward`` showing the original signature (plus ``tokenprune``): ``generate``
    inspects it to decide which keyword arguments the model accepts."""
    mixin = _MIXINS.get(orig)
    if mixin is None:
        def forward(self, *args, **kwargs):
            return VLMModel.forward(self, *args, **kwargs)

        sig = inspect.signature(orig.forward)
        params = list(sig.parameters.values())
        if "tokenprune" not in sig.parameters:
            at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
            params.insert(at, inspect.Parameter("tokenprune", inspect.Parameter.KEYWORD_ONLY, default=None))
        forward.__signature__ = sig.replace(parameters=params)
        mixin = type(f"VLM{orig.__name__}", (VLMModel,), {"forward": forward, "__module__": __name__})
        _MIXINS[orig] = mixin
    return mixin


def encoder_info(depth, dim, heads, mlp, n, grid, has_cls, family, num_prefix=0) -> EncoderInfo:
    return EncoderInfo(depth=depth, dim=dim, num_heads=heads, num_prefix=num_prefix, num_tokens=n, mlp_hidden=mlp,
                       grid=grid, has_cls=has_cls, family=family)
