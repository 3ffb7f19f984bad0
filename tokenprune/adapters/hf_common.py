"""Shared plumbing of the Hugging Face transformers adapters.

HF attention modules look their kernel up by name on every call
(``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``) and pass the layer's keyword arguments
through to it. On install, the patched model's attention modules get copies of their configs naming
``"tokenprune_sdpa"``: a registered function that receives the per-forward context as the keyword
``tokenprune=`` (the adapter's block function calls ``layer(x, ..., tokenprune=fwd)``), and then

- adds the context's key bias (``log size``, ``[B, 1, 1, N]``) to SDPA's ``attention_mask``, or, where the fused
  key-bias kernel applies (``kernels.biased_attention_applies``: compiled, or a large batch), runs that kernel,
- runs the reducer's replacement kernel instead of SDPA where the context names one (MAELRE),
- records ``q``, ``k`` and the ``scaling`` into the context when the reducer asked for them,

and otherwise calls the registered ``"sdpa"`` function, so SDPA stays the kernel (the eager path,
``output_attentions``, is never used). Called without ``tokenprune=`` it is exactly ``"sdpa"``.
Nothing is kept between calls: the context travels with the call. Uninstall gives the modules their
own configs back (the model's configs are never written). Only models loaded with
``attn_implementation="sdpa"`` (transformers 5's default) are accepted: a clear error says how to switch otherwise.
"""
from __future__ import annotations

import copy

import torch

from .. import kernels
from ..engine import QK, Forward, run_blocks
from .base import ORIGINAL

KERNEL_NAME = "tokenprune_sdpa"
INNER = "sdpa"
_REGISTERED = False
_FUNCTIONS = None  # transformers' ALL_ATTENTION_FUNCTIONS, where tokenprune_sdpa looks "sdpa" up (set on registering)


class KeyBias:
    """Context for attention calls outside the block loop that read reduced tokens as keys (a decoder's
    cross-attention, a pooling head): the key bias, for the listed attention modules only."""

    __slots__ = ("modules", "bias")

    def __init__(self, modules, bias: torch.Tensor):
        self.modules = tuple(modules)
        self.bias = bias


class LayerQK:
    """Context for an encoder that runs its own layer loop unpatched (a VLM's vision tower): the q/k of the
    listed attention modules are recorded, one :class:`QK` per attention call (towers that attend per
    image or per window call SDPA once per chunk), in call order. Everything else is plain SDPA."""

    __slots__ = ("layers", "qks")

    def __init__(self, modules: dict):
        self.layers = {id(m): i for i, m in modules.items()}  # id(attention module) -> layer index
        self.qks: dict[int, list] = {i: [] for i in modules}


def bias_for(bias: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """The context's key bias as an attention call on ``query`` takes it: in q's dtype (the state's bias is in the
    tokens' dtype; autocast's q may not be) and repeated over beams of an encoder output not expanded with them."""
    if bias.dtype != query.dtype:
        bias = bias.to(query.dtype)
    if bias.shape[0] != query.shape[0]:
        bias = bias.repeat_interleave(query.shape[0] // bias.shape[0], 0)
    return bias


def _standard_q(query, scaling):
    """``query`` for a kernel that scales the scores by ``d ** -0.5`` itself (scores = q k^T / sqrt(d)): the layer's
    own ``scaling`` folded in (Whisper pre-scales q and passes scaling=1)."""
    return query if scaling is None else query * (float(scaling) * query.shape[-1] ** 0.5)


def _plain(module, kwargs) -> bool:
    """An attention call our own kernels may serve instead of transformers' function: no attention weights asked for,
    no dropout in training, not causal."""
    return not (kwargs.get("output_attentions") or (module.training and kwargs.get("dropout"))
                or getattr(module, "is_causal", False))


def _kernel(module, query, key, value, attention_mask, *args, tokenprune=None, **kwargs):
    # runs in every attention call (batch 1 is bound by host time): no import, no op that would change nothing
    ctx = tokenprune
    bias, kernel = None, None
    if isinstance(ctx, Forward):
        bias, kernel = ctx.bias, ctx.kernel
    elif isinstance(ctx, KeyBias) and any(module is m for m in ctx.modules):
        bias = ctx.bias
    if bias is not None:
        bias = bias_for(bias, query)
        attention_mask = bias if attention_mask is None else attention_mask + bias
    scaling = kwargs.get("scaling")
    lse = None
    if kernel is not None:
        # a reducer replaces SDPA in this block (MAELRE's linear attention)
        heads = kernel(_standard_q(query, scaling), key, value, bias)
        out, weights = heads.transpose(1, 2).contiguous(), None
    elif (isinstance(ctx, Forward) and ctx.want_qk and ctx.lse and attention_mask is None
          and _plain(module, kwargs) and kernels.attention_lse_applies(query, key, value, None)):
        # a scored block whose reducer takes the attention's log-sum-exp (cls's received scores): cuDNN gives both
        heads, lse = kernels.attention_with_lse(query, key, value,
                                                float(query.shape[-1] ** -0.5 if scaling is None else scaling))
        out, weights = heads.transpose(1, 2), None
    elif (bias is not None and attention_mask is bias and key.shape == query.shape and value.shape == query.shape
          and _plain(module, kwargs) and kernels.biased_attention_applies(bias, query.shape[-2], query.shape[-1])):
        # merged tokens' key bias alone (compiled, or a large batch): the fused key-bias kernel, which takes as many
        # keys as queries and as many key heads as query heads (a decoder's cross-attention or a pooling head, whose
        # queries are not the keys, keeps SDPA)
        heads = kernels.biased_attention(_standard_q(query, scaling), key, value, bias)
        out, weights = heads.transpose(1, 2), None  # laid out [B, N, H, d]: the caller's reshape is free
    else:
        if kwargs.get("output_attentions"):
            raise ValueError("tokenprune: output_attentions=True needs eager attention; a reduced model keeps SDPA. "
                             "Call tokenprune.remove(model) to get attention maps")
        out, weights = _FUNCTIONS[INNER](module, query, key, value, attention_mask, *args, **kwargs)
        heads = None
    if isinstance(ctx, Forward) and ctx.want_qk:
        scale = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
        ctx.qk = QK(query, key, scale, ctx.bias, out.transpose(1, 2) if heads is None else heads, lse=lse)
    elif isinstance(ctx, LayerQK) and id(module) in ctx.layers:
        scale = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
        ctx.qks[ctx.layers[id(module)]].append(QK(query, key, scale))
    return out, weights


def register_kernel() -> None:
    """Register ``tokenprune_sdpa`` (attention and mask interfaces) once per process."""
    global _REGISTERED, _FUNCTIONS
    if _REGISTERED:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    _FUNCTIONS = ALL_ATTENTION_FUNCTIONS
    AttentionInterface.register(KERNEL_NAME, _kernel)
    try:  # causal/bidirectional mask builders dispatch on the same name (decoders, AST)
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionMaskInterface.register(KERNEL_NAME, ALL_MASK_ATTENTION_FUNCTIONS[INNER])
    except (ImportError, KeyError, AttributeError):
        pass
    _REGISTERED = True


def check_sdpa(config, what: str) -> None:
    impl = getattr(config, "_attn_implementation", None)
    if impl not in (INNER, KERNEL_NAME):  # KERNEL_NAME: routed by the patch already on the model (apply again, plan)
        raise ValueError(
            f"tokenprune: the {what} uses attn_implementation={impl!r}; token reduction keeps fused SDPA and needs "
            f"'sdpa'. Load with from_pretrained(..., attn_implementation='sdpa') or call "
            f"model.set_attn_implementation('sdpa') before tokenprune.apply")


class AttentionRouting:
    """Route a model's attention modules through ``tokenprune_sdpa`` and back, exactly.

    ``modules``: the attention modules whose kernel lookup must go through ``tokenprune_sdpa``. Each gets its own
    copy of its config naming the kernel (modules that shared one config share one copy); the model's configs are
    never written, so two models built from one config object are patched and restored independently, and a config
    switched away from SDPA while patched (``set_attn_implementation``) is still seen (:func:`no_extra_kwargs`).
    """

    def __init__(self, modules, what: str):
        self.modules = list(modules)
        self.what = what
        self._saved: list = []  # (module, its own config) while routed

    def __setstate__(self, state):  # unpickled in a new process: the copies name tokenprune_sdpa
        self.__dict__.update(state)
        if self._saved:
            register_kernel()

    def check(self) -> None:
        seen = []
        for m in self.modules:
            if not any(m.config is c for c in seen):
                seen.append(m.config)
                check_sdpa(m.config, self.what)

    def on(self) -> None:
        register_kernel()
        copies: dict = {}
        self._saved = []
        for m in self.modules:
            own = copies.get(id(m.config))
            if own is None:
                own = copies[id(m.config)] = copy.copy(m.config)
                own.__dict__["_attn_implementation_internal"] = KERNEL_NAME
            self._saved.append((m, m.config))
            m.config = own

    def off(self) -> None:
        for m, config in self._saved:
            m.config = config
        self._saved = []


class SaveAsOriginal:
    """Base of the mixins swapped onto transformers models: ``save_pretrained`` saves the model as its original class
    (transformers writes ``type(self).__name__`` into ``config.architectures``; the weights are the original ones)."""

    def save_pretrained(self, *args, **kwargs):
        patched = type(self)
        self.__class__ = patched.__dict__.get(ORIGINAL) or patched
        try:
            return self.save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = patched


class ProjAttention:
    """Mixin for HF attention modules with ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` whose forward
    does not pass its keyword arguments on to the attention function (SigLIP): the same forward, with the
    context handed to it."""

    def forward(self, hidden_states, attention_mask=None, tokenprune=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if tokenprune is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        out, weights = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation](
            self, q, k, v, attention_mask, is_causal=False, scaling=self.scale,
            dropout=0.0 if not self.training else self.dropout, tokenprune=tokenprune)
        return self.out_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


def block_fn(*extra):
    """A block function for ``run_blocks``: the HF layer runs as usual (``layer(x, *extra)``, e.g.
    ``extra=(None,)`` for layers whose ``attention_mask`` argument is required) with the context passed
    as ``tokenprune=``, which the layer hands to its attention function.

    Under transformers' gradient checkpointing (a layer in training with ``gradient_checkpointing`` set) the backward
    reruns the layer's forward, after the loop has moved ``fwd`` on to later blocks: the layer then gets a context
    of its own with this block's key bias and kernel, and the q/k it records are handed on to ``fwd``."""

    def call(layer, x, fwd):
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            if fwd.bias is not None and fwd.bias.requires_grad and _reentrant(layer):
                raise RuntimeError(
                    "tokenprune: this model uses reentrant gradient checkpointing (use_reentrant=True), which passes "
                    "gradients only through a layer's positional tensors; the reducer's soft token mask (method="
                    "'threshold' in training) reaches the layers as a key bias in the context, so its gradient "
                    "would be lost. Call model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                    "{'use_reentrant': False}) (or turn checkpointing off)")
            ctx = Forward(fwd.patch)
            ctx.bias, ctx.kernel, ctx.want_qk = fwd.bias, fwd.kernel, fwd.want_qk
            out = layer(x, *extra, tokenprune=ctx)
            fwd.qk = ctx.qk
        else:
            out = layer(x, *extra, tokenprune=fwd)
        return out[0] if isinstance(out, tuple) else out

    return call


def _reentrant(layer) -> bool:
    """Whether transformers checkpoints ``layer`` with ``use_reentrant=True`` (its ``_gradient_checkpointing_func``
    is a ``partial`` of ``torch.utils.checkpoint.checkpoint`` with the user's keyword arguments)."""
    func = getattr(layer, "_gradient_checkpointing_func", None)
    return getattr(func, "keywords", {}).get("use_reentrant") is True


def run(fwd: Forward, layers, x, grid=None, extra: tuple = ()):
    """``run_blocks`` over HF layers."""
    return run_blocks(fwd, layers, x, block_fn(*extra), grid)


def returns_dict(module, return_dict) -> bool:
    """Whether a transformers forward returns its ModelOutput: ``return_dict`` as passed, else the config's."""
    return return_dict if return_dict is not None else getattr(module.config, "return_dict", True)


def returned(module, out, return_dict):
    """What a transformers forward returns (its ``can_return_tuple``): ``out``, or ``out.to_tuple()`` when
    ``return_dict=False`` is passed, or is the config's and none is passed."""
    return out if returns_dict(module, return_dict) else out.to_tuple()


def no_extra_kwargs(kwargs, what: str, config=None) -> None:
    """Refuse the per-layer outputs and masks; ``output_hidden_states`` / ``output_attentions`` not passed (or None)
    are read from ``config`` as transformers does. Also refuse a ``config`` whose attention was switched away from
    ``tokenprune_sdpa`` while patched: its layers would bypass the kernel (no size bias, no q/k for the reducer)."""
    if config is not None:
        impl = getattr(config, "_attn_implementation", None)
        if impl not in (INNER, KERNEL_NAME):  # the attention modules' own copies name KERNEL_NAME (AttentionRouting)
            raise RuntimeError(
                f"tokenprune: the {what}'s attention implementation was switched to {impl!r} while the model is patched "
                "(model.set_attn_implementation, or transformers itself: Whisper's generate(return_token_timestamps="
                "True) switches to 'eager'); token reduction runs on SDPA. Call tokenprune.remove(model), "
                "model.set_attn_implementation('sdpa'), then tokenprune.apply again")
        kwargs = {**{k: getattr(config, k, None) for k in ("output_attentions", "output_hidden_states")},
                  **{k: v for k, v in kwargs.items() if v is not None}}
    bad = [k for k, v in kwargs.items() if v is not None and v is not False  # a tensor mask too
           and k in ("output_attentions", "output_hidden_states", "attention_mask", "head_mask")]
    if bad:
        raise ValueError(f"tokenprune: {', '.join(bad)} cannot be combined with token reduction in the {what} "
                         "(the token count changes between layers); call tokenprune.remove(model) first")
