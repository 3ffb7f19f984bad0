"""Shared plumbing of the Hugging Face transformers adapters.

HF attention modules look their kernel up by name on every call
(``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``). On install, the
patched tower's config is switched to ``"tokenprune_sdpa"``: a registered
function that

- adds the token-size key bias (``log size``, ``[B, 1, 1, N]``) as SDPA's
  ``attention_mask`` for the attention module of the block now running (the
  encoder layers never need to accept a mask themselves), and
- runs the reducer's replacement kernel instead of SDPA where one is in
  force (``engine.attention_kernel``: MAELRE's linear blocks), and
- records that block's ``q`` and ``k`` (``[B, H, N, d]``, references to what
  the module computed anyway) and the ``scaling`` it passed,

and then calls the registered ``"sdpa"`` function, so SDPA stays the kernel
(the eager path, ``output_attentions``, is never used). Everything it needs
arrives through a :mod:`contextvars` variable set by :func:`hf_call_block` /
:func:`hf_capture` for the duration of one block; outside that it is exactly
``"sdpa"``. Uninstall puts the config's original value back.

Only models loaded with ``attn_implementation="sdpa"`` (the default in
transformers 5 when torch supports it) are accepted: a clear error says how
to switch otherwise.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

from ..engine import QK, attach_state, current_kernel, current_scope, forward_scope, run_blocks

KERNEL_NAME = "tokenprune_sdpa"
INNER = "sdpa"


@dataclass
class _Call:
    modules: tuple  # attention modules this applies to
    bias: torch.Tensor | None  # [B, 1, 1, N] additive key bias, or None
    qk: QK | None = None  # filled when a reducer wants this block's q/k


_CALL: contextvars.ContextVar["_Call | None"] = contextvars.ContextVar("tokenprune_hf_call", default=None)
_REGISTERED = False


def _kernel(module, query, key, value, attention_mask, *args, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    call = _CALL.get()
    if call is not None and any(module is m for m in call.modules):
        if call.bias is not None:
            bias = call.bias.to(query.dtype)
            if bias.shape[0] != query.shape[0] and query.shape[0] % bias.shape[0] == 0:
                bias = bias.repeat_interleave(query.shape[0] // bias.shape[0], 0)  # beam expansion
            attention_mask = bias if attention_mask is None else attention_mask + bias
        if call.qk is not None:
            scaling = kwargs.get("scaling")
            call.qk.q, call.qk.k = query, key
            call.qk.scale = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
            call.qk.bias = call.bias
    kernel = current_kernel()
    if kernel is not None and (call is None or any(module is m for m in call.modules)):
        # a reducer replaces SDPA in this block (MAELRE's linear attention): the kernel takes q in the
        # standard convention (scores = q k^T / sqrt(d)); Whisper pre-scales q and passes scaling=1
        scaling = kwargs.get("scaling")
        d = query.shape[-1]
        q = query if scaling is None else query * (float(scaling) * d ** 0.5)
        bias = call.bias if call is not None else None
        return kernel(q, key, value, bias).transpose(1, 2).contiguous(), None
    if kwargs.get("output_attentions"):
        raise ValueError("tokenprune: output_attentions=True needs eager attention; a reduced model keeps SDPA. "
                         "Call tokenprune.remove(model) to get attention maps")
    out, weights = ALL_ATTENTION_FUNCTIONS[INNER](module, query, key, value, attention_mask, *args, **kwargs)
    if call is not None and call.qk is not None and any(module is m for m in call.modules):
        call.qk.out = out.transpose(1, 2)  # per-head outputs [B, H, N, d] (a view, for head weighting)
    return out, weights


def register_kernel() -> None:
    """Register ``tokenprune_sdpa`` (attention and mask interfaces) once per process."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(KERNEL_NAME, _kernel)
    try:  # causal/bidirectional mask builders dispatch on the same name (decoders, AST)
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionMaskInterface.register(KERNEL_NAME, ALL_MASK_ATTENTION_FUNCTIONS[INNER])
    except (ImportError, KeyError, AttributeError):
        pass
    _REGISTERED = True


def check_sdpa(config, what: str) -> None:
    impl = getattr(config, "_attn_implementation", None)
    if impl != INNER:
        raise ValueError(
            f"tokenprune: the {what} uses attn_implementation={impl!r}; token reduction keeps fused SDPA and needs "
            f"'sdpa'. Load with from_pretrained(..., attn_implementation='sdpa') or call "
            f"model.set_attn_implementation('sdpa') before tokenprune.apply")


class ConfigSwitch:
    """Switch one config object's attention implementation to ``tokenprune_sdpa`` and back, exactly."""

    def __init__(self, config):
        self.config = config
        self.saved = None

    def on(self) -> None:
        register_kernel()
        d = self.config.__dict__
        self.saved = d.get("_attn_implementation_internal", None)
        d["_attn_implementation_internal"] = KERNEL_NAME

    def off(self) -> None:
        d = self.config.__dict__
        if d.get("_attn_implementation_internal") == KERNEL_NAME:
            d["_attn_implementation_internal"] = self.saved


class AttentionRouting:
    """Route a model's attention modules through ``tokenprune_sdpa`` and back.

    ``modules``: the attention modules whose kernel lookup must go through the recorder
    (several may share one config object; each config is switched once).
    """

    def __init__(self, modules, what: str):
        self.configs = []
        for m in modules:
            if not any(m.config is c for c in self.configs):
                self.configs.append(m.config)
        self.what = what
        self._switches: list[ConfigSwitch] = []

    def check(self) -> None:
        for c in self.configs:
            check_sdpa(c, self.what)

    def on(self) -> None:
        self._switches = [ConfigSwitch(c) for c in self.configs]
        for s in self._switches:
            s.on()

    def off(self) -> None:
        for s in self._switches:
            s.off()
        self._switches = []


def hf_call_block(attn_of, extra: tuple = ()):
    """``call_block`` for ``run_blocks``: the layer runs as usual (``layer(x, *extra)``, e.g.
    ``extra=(None,)`` for layers whose ``attention_mask`` argument is required), and its attention
    module gets the key bias through the registered kernel."""

    def call(block, x, bias):
        outer = _CALL.get()
        attn = attn_of(block)
        qk = outer.qk if outer is not None and any(attn is m for m in outer.modules) else None
        if bias is None and qk is None:
            return _unwrap(block(x, *extra))
        token = _CALL.set(_Call((attn,), bias, qk))
        try:
            return _unwrap(block(x, *extra))
        finally:
            _CALL.reset(token)

    return call


def hf_capture(attn_of):
    """``capture`` for ``run_blocks``: yields a :class:`QK` filled by the kernel while the block runs."""

    @contextlib.contextmanager
    def capture(block, bias):
        qk = QK(bias=bias)
        token = _CALL.set(_Call((attn_of(block),), bias, qk))
        try:
            yield qk
        finally:
            _CALL.reset(token)

    return capture


def _unwrap(out):
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def key_bias(modules, bias):
    """Give ``bias`` to the attention calls of ``modules`` (e.g. a decoder's cross-attention) while inside."""
    if bias is None:
        yield
        return
    token = _CALL.set(_Call(tuple(modules), bias))
    try:
        yield
    finally:
        _CALL.reset(token)


def run_and_attach(patch, layers, x, call_block, capture, grid=None):
    """``run_blocks`` inside its own scope; the final state also goes to an enclosing scope and rides
    on the returned tensor (for pooling code that runs later)."""
    outer = current_scope()
    with forward_scope() as scope:
        out = run_blocks(patch, layers, x, call_block, capture, grid)
    if outer is not None:
        outer.state = scope.state
    return attach_state(out, scope.state)


def no_extra_kwargs(kwargs, what: str) -> None:
    bad = [k for k, v in kwargs.items() if v not in (None, False)
           and k in ("output_attentions", "output_hidden_states", "attention_mask", "head_mask")]
    if bad:
        raise ValueError(f"tokenprune: {', '.join(bad)} cannot be combined with token reduction in the {what} "
                         "(the token count changes between layers); call tokenprune.remove(model) first")
