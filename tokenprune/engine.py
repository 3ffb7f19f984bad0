"""The one loop every adapter runs: block i -> token state -> reducer -> block i + 1.

Adapters swap the class of a model's block container so that its forward
calls :func:`run_blocks`; the blocks themselves are the library's own modules,
called with an additive key bias (``None`` when no bias is needed, so SDPA's
flash path stays available).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from .state import TokenState

_SCOPE: contextvars.ContextVar["ForwardScope | None"] = contextvars.ContextVar("tokenprune_scope", default=None)


@dataclass
class ForwardScope:
    """Carries the final token state of one forward from the block loop to the pooling code."""

    state: TokenState | None = None


@contextlib.contextmanager
def forward_scope():
    scope = ForwardScope()
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def current_scope() -> ForwardScope | None:
    return _SCOPE.get()


_KERNEL: contextvars.ContextVar["Callable | None"] = contextvars.ContextVar("tokenprune_kernel", default=None)


@contextlib.contextmanager
def attention_kernel(kernel):
    """Run the enclosed block(s) with ``kernel(q, k, v, bias) -> out`` (all ``[B, H, N, d]``)
    in place of SDPA. Adapters whose reducer sets ``uses_attention_kernel`` install an
    attention subclass that reads this; everything else keeps SDPA."""
    token = _KERNEL.set(kernel)
    try:
        yield
    finally:
        _KERNEL.reset(token)


def current_kernel():
    return _KERNEL.get()


class ResidualSlot:
    """Where a block leaves its last residual branch when the reducer after it does the add itself."""

    y: torch.Tensor | None = None


_RESIDUAL: contextvars.ContextVar["ResidualSlot | None"] = contextvars.ContextVar("tokenprune_residual", default=None)


def residual_slot() -> ResidualSlot | None:
    """For adapters' blocks: a slot while the running block may return its input to the last residual
    add and put the branch in ``slot.y`` (tokens = returned + ``slot.y``); ``None`` otherwise. A block
    that cannot do so just returns its full output and leaves the slot empty."""
    return _RESIDUAL.get()


def fuse_residual_enabled() -> bool:
    """``TOKENPRUNE_FUSE_RESIDUAL=0`` keeps every block's own residual add (for comparisons)."""
    return os.environ.get("TOKENPRUNE_FUSE_RESIDUAL", "1").strip().lower() not in ("0", "off", "false", "no")


STATE_ATTR = "_tokenprune_state"


def attach_state(x: torch.Tensor, state: TokenState | None) -> torch.Tensor:
    """Attach the final state to an encoder output so a later pooling call can weight by size."""
    if state is not None:
        setattr(x, STATE_ATTR, state)
    return x


def attached_state(x: torch.Tensor) -> TokenState | None:
    return getattr(x, STATE_ATTR, None)


@dataclass
class QK:
    """The q and k a block's attention computed, ``[B, H, N, d]``, and what it used with them."""

    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    scale: float = 1.0
    bias: torch.Tensor | None = None
    out: torch.Tensor | None = None  # per-head attention output [B, H, N, d], when an adapter records it
    k_mean: torch.Tensor | None = None  # the keys averaged over heads [B, N, d], when an adapter computed it

    def key_mean(self) -> torch.Tensor:
        """The keys averaged over heads, ``[B, N, d]`` (ToMe's matching metric)."""
        return self.k_mean if self.k_mean is not None else self.k.mean(1)


class HookCapture:
    """Capture q and k through forward hooks on two submodules that output them.

    The hooks exist only while the block runs; the tensors are references
    (no copies) to what the block computed anyway.
    """

    def __init__(self, q_module: torch.nn.Module, k_module: torch.nn.Module, scale: float,
                 to_heads: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 out_module: torch.nn.Module | None = None, num_heads: int | None = None,
                 fold_module: torch.nn.Module | None = None):
        self.q_module, self.k_module, self.scale, self.to_heads = q_module, k_module, scale, to_heads
        # optional: a module whose INPUT is the concatenated per-head attention output [B, N, H*d]
        # (e.g. the output projection); recorded as QK.out [B, H, N, d] (a reference, no copy)
        self.out_module, self.num_heads = out_module, num_heads
        # optional: a qkv projection that can also write the head-mean key (QK.k_mean) while the block runs
        self.fold_module = fold_module

    @contextlib.contextmanager
    def __call__(self, bias):
        qk = QK(scale=self.scale, bias=bias)
        conv = self.to_heads or (lambda t: t)

        def grab_q(_m, _i, out):
            qk.q = conv(out)

        def grab_k(_m, _i, out):
            qk.k = conv(out)

        def grab_out(_m, args):
            o = args[0]
            qk.out = o.reshape(o.shape[0], o.shape[1], self.num_heads, -1).transpose(1, 2)

        hq = self.q_module.register_forward_hook(grab_q)
        hk = self.k_module.register_forward_hook(grab_k)
        ho = None
        if self.out_module is not None and self.num_heads:
            ho = self.out_module.register_forward_pre_hook(grab_out)
        if self.fold_module is not None:
            self.fold_module._tokenprune_qk = qk
        try:
            yield qk
        finally:
            hq.remove()
            hk.remove()
            if ho is not None:
                ho.remove()
            if self.fold_module is not None:
                self.fold_module.__dict__.pop("_tokenprune_qk", None)


def run_blocks(patch, blocks: Iterable[torch.nn.Module], x: torch.Tensor,
               call_block: Callable, capture: Callable, grid=None) -> torch.Tensor:
    """Run ``blocks`` on ``x`` with the patch's reducer between them.

    ``call_block(block, x, bias) -> x`` runs one block; ``capture(block, bias)``
    returns a context manager that yields a :class:`QK` filled while the block runs.
    """
    reducer = patch.reducer
    state = TokenState.start(x, patch.num_prefix, grid, track_source=patch.track_source)
    state.proportional = reducer.proportional
    plan = patch.plan_for(state.num_input, grid)
    stages = plan.stage_at()
    qk_blocks = reducer.qk_blocks(plan)
    attention = plan.attention_per_block()

    for stage in stages.get(-1, ()):
        state = reducer.reduce(state, stage, None)
    # a reducer that takes the tokens as two halves (``fuses_residual``: merge and maelre, whose merge kernels
    # add them) gets the block's last residual add undone, which saves writing the block output and reading it back
    fuse = getattr(reducer, "fuses_residual", False) and fuse_residual_enabled()
    for i, blk in enumerate(blocks):
        state.tokens_per_block.append(state.x.shape[1])
        bias = state.attn_bias(state.x.dtype)
        slot = ResidualSlot() if fuse and i in stages else None
        token = _RESIDUAL.set(slot)
        try:
            if i in qk_blocks:
                with capture(blk, bias) as qk:
                    state.x = reducer.run_block(i, blk, state.x, bias, call_block, attention[i])
            else:
                qk = None
                state.x = reducer.run_block(i, blk, state.x, bias, call_block, attention[i])
        finally:
            _RESIDUAL.reset(token)
        state.residual = slot.y if slot is not None else None
        state.block = i
        reducer.observe(state, i, qk)
        for stage in stages.get(i, ()):
            state = reducer.reduce(state, stage, qk)
        state.materialize()  # a stage that reduced nothing leaves the add to do
    scope = current_scope()
    if scope is not None:
        scope.state = state
    return state.x
