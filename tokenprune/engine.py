"""The one loop every adapter runs: block i -> token state -> reducer -> block i + 1.

Data flows one way and explicitly. An adapter's forward creates one :class:`Forward` per call
and hands it to :func:`run_blocks`, which hands it to the adapter's block function for every
block. Everything about that one forward lives in it: the token state, what the block must
record for the reducer (q/k), the attention kernel the block must use, and where the block may
leave its last residual add. Nothing is kept on modules, in module globals or context variables,
and nothing is attached to tensors, so one patched model can be compiled
(``torch.compile(fullgraph=True)``), captured in a CUDA graph, and called from several threads.

A block function is ``block_fn(block, x, fwd) -> x``. It reads

- ``fwd.bias``: the additive key bias ``[B, 1, 1, N]`` (``log size``; ``None`` while every size is
  1, which keeps SDPA on its unmasked flash path),
- ``fwd.kernel``: an attention kernel ``kernel(q, k, v, bias) -> [B, H, N, d]`` that replaces SDPA
  in this block (MAELRE's linear attention), or ``None``,
- ``fwd.want_qk``: if true, the block stores the q and k its attention computed in ``fwd.qk``
  (a :class:`QK`; references, no copies); :func:`attend` does the attention and this for a written-out block,
- ``fwd.key_mean``: the reducer matches on the keys' head mean (ToMe): where the fused key-bias kernel runs,
  :func:`attend` has its launch average them too (``QK.k_mean``),
- ``fwd.slot``: if true, the block may return the input of its last residual add and put the
  branch in ``fwd.residual`` (the merge that follows adds the two in its row gather),
- ``fwd.mid``: stages to perform inside this block, between attention and MLP (ToMe's placement). A block
  function that supports them calls ``x = fwd.reduce_mid(x, branch)`` with the input of the attention
  residual add and the attention branch (the merge that follows adds them, as with ``fwd.slot``) and runs
  its MLP on the result; the adapter declares
  ``Adapter.mid_block = True``. Adapters that cannot are refused at ``apply()`` (:meth:`Program.build`).
"""
from __future__ import annotations

import itertools
import os
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.nn.modules import module as _module
from torch.utils.hooks import RemovableHandle

from . import kernels
from .kernels.reference import key_mean
from .state import TokenState


@dataclass(eq=False)
class QK:
    """The q and k a block's attention computed, ``[B, H, N, d]``, and what it used with them."""

    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    scale: float = 1.0
    bias: torch.Tensor | None = None
    out: torch.Tensor | None = None  # per-head attention output [B, H, N, d], when the adapter records it
    k_mean: torch.Tensor | None = None  # k.mean(1) [B, N, d], where the attention's launch computed it
    lse: torch.Tensor | None = None  # each query's log-sum-exp [B, H, N(, 1)], where the attention gave it

    def key_mean(self) -> torch.Tensor:
        """The keys averaged over heads, ``[B, N, d]`` (ToMe's matching metric)."""
        return key_mean(self.k) if self.k_mean is None else self.k_mean

    def metric(self) -> torch.Tensor:
        """ToMe's metric as ``ops.bipartite_merge`` takes it: the head mean where the attention's launch made it,
        else the keys per head (the merge kernels average them as they read them)."""
        return self.k if self.k_mean is None else self.k_mean


def attend(fwd: "Forward", q, k, v, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """A written-out block's attention ``[B, H, N, d]`` under ``fwd``: the reducer's kernel (``fwd.kernel``), the
    fused key-bias kernel where it applies (``kernels.biased_attention_applies``; SDPA's masked path is slower) or
    where it also averages the keys for the reducer (``kernels.key_mean_attention_applies``), else SDPA with
    ``fwd.bias``; records ``fwd.qk`` when the reducer wants it."""
    bias, km, lse = fwd.bias, None, None
    if fwd.kernel is not None:
        o = fwd.kernel(q, k, v, bias)
    elif dropout == 0.0 and fwd.want_qk and fwd.lse and kernels.attention_lse_applies(q, k, v, bias):
        o, lse = kernels.attention_with_lse(q, k, v, scale)
    elif dropout == 0.0 and fwd.want_qk and fwd.key_mean and kernels.key_mean_attention_applies(q):
        o, km = kernels.biased_attention(q, k, v, bias, key_mean=True)
    elif dropout == 0.0 and kernels.biased_attention_applies(bias, q.shape[-2], q.shape[-1]):
        o = kernels.biased_attention(q, k, v, bias)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    if fwd.want_qk:
        fwd.qk = QK(q, k, scale, bias, o, km, lse)
    return o


def fuse_residual_enabled() -> bool:
    """Whether a block followed by a merge leaves its last residual add to the merge. On by default;
    ``TOKENPRUNE_FUSE_RESIDUAL=0`` (read at import) or :func:`set_fuse_residual` turns it off for
    comparisons. Read when a plan is built: re-apply after changing it."""
    return _FUSE


def set_fuse_residual(flag: bool) -> None:
    global _FUSE
    _FUSE = bool(flag)


_FUSE = os.environ.get("TOKENPRUNE_FUSE_RESIDUAL", "1").strip().lower() not in ("0", "off", "false", "no")


@dataclass(frozen=True)
class Program:
    """A plan turned into what the loop needs per block (built once per input size, then reused)."""

    plan: object  # the Plan
    before: tuple  # stages before block 0
    stages: tuple  # per block: tuple of stages after it
    want_qk: tuple  # per block: bool
    kernel: tuple  # per block: attention kernel or None
    slot: tuple  # per block: bool, the block may leave its last residual add to the reducer
    mid: tuple = ()  # per block: stages inside it, between attention and MLP
    mid_fuse: bool = False  # the inside stages add the attention branch themselves (like `slot`)
    # per block: (kernel, want_qk, slot, mid, stages), the fields above as one tuple (what run_blocks reads: one
    # unpacking per block is cheaper to run, and for torch.compile to trace, than five lookups)
    steps: tuple = field(init=False, repr=False)

    def __post_init__(self):
        mid = self.mid or ((),) * len(self.stages)
        object.__setattr__(self, "steps", tuple(zip(self.kernel, self.want_qk, self.slot, mid, self.stages)))

    @classmethod
    def build(cls, plan, reducer, mid_block: bool = False) -> "Program":
        depth = plan.info.depth
        at, mid = {}, {}
        for s in plan.stages:
            (mid if s.mid else at).setdefault(s.block, []).append(s)
        if mid and (not mid_block or -1 in mid):
            raise ValueError(f"tokenprune: {plan.method} reduces between attention and MLP (placement='attn'), "
                             f"which this model family's adapter does not support; use placement='block'")
        qk = reducer.qk_blocks(plan)
        fuse = getattr(reducer, "fuses_residual", False) and fuse_residual_enabled()
        paths = plan.attention_per_block()
        stages = tuple(tuple(at.get(i, ())) for i in range(depth))
        want_qk = tuple(i in qk for i in range(depth))
        kernel = tuple(reducer.attention_kernel(p) for p in paths)
        slot = tuple(fuse and i in at for i in range(depth))
        inside = tuple(tuple(mid.get(i, ())) for i in range(depth))
        return cls(plan, tuple(at.get(-1, ())), stages, want_qk, kernel, slot, inside, fuse)


class Forward:
    """Everything about one encoder forward. Created by the adapter's forward, passed explicitly."""

    __slots__ = ("patch", "state", "bias", "kernel", "want_qk", "key_mean", "lse", "slot", "qk", "residual", "mid",
                 "mid_fuse")

    def __init__(self, patch):
        self.patch = patch  # the installed patch: reducer and plans (read-only during the forward)
        self.state: TokenState | None = None  # the token state; the final one after run_blocks
        self.bias: torch.Tensor | None = None
        self.kernel: Callable | None = None
        self.want_qk = False
        self.key_mean = getattr(patch.reducer, "wants_key_mean", False)  # read once per forward
        self.lse = getattr(patch.reducer, "wants_lse", False)  # scores on the attention's log-sum-exp (cls, received)
        self.slot = False
        self.qk: QK | None = None
        self.residual: torch.Tensor | None = None
        self.mid: tuple = ()
        self.mid_fuse = False

    def reduce_mid(self, x: torch.Tensor, branch: torch.Tensor | None = None) -> torch.Tensor:
        """Perform this block's inside stages (``fwd.mid``) on the tokens ``x + branch`` (the attention residual
        add; ``branch`` None: ``x`` holds them), with the q/k that attention recorded; returns the tokens the
        MLP must run on. A reducer that fuses residual adds gets the two halves (``TokenState.residual``)."""
        if not self.mid:
            return x if branch is None else x + branch
        state, reducer = self.state, self.patch.reducer
        state.x, state.residual = x, branch
        if not self.mid_fuse:
            state.materialize()
        for stage in self.mid:
            state = reducer.reduce(state, stage, self.qk)
        self.state = state.materialize()
        return state.x

    @property
    def sizes(self) -> torch.Tensor | None:
        """Sizes of the final tokens ``[B, P + N]`` (None: all ones), for size-weighted pooling."""
        return None if self.state is None else self.state.sizes


def check_depth(depth: int, planned: int) -> None:
    """Refuse a model whose encoder has another number of blocks than the patch was planned for."""
    if depth != planned:
        raise RuntimeError(
            f"tokenprune: this model's encoder now has {depth} blocks, but tokenprune.apply planned {planned} (blocks "
            "were removed or added after apply, e.g. by timm's prune_intermediate_layers or by editing the layer "
            "list); call tokenprune.apply(model, ...) again to plan the model as it is now")


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# hooks that do nothing unless their library asks for what a patched model refuses anyway: transformers 5 installs
# output-capturing hooks on layers and attention modules at the first output_hidden_states / output_attentions call
# and keeps them (inactive without a collector); tokenprune refuses those outputs with their own error
_INERT_HOOKS = ("transformers.utils.output_capturing",)


# global hooks that only track which module runs (torch's ModuleTracker, used by FlopCounterMode): the written-out
# blocks' work is then counted under the module around them, the totals unchanged
_TRACKING_HOOKS = ("torch.utils.module_tracker",)


def _user_hooks(hooks, inert: tuple = _INERT_HOOKS + _TRACKING_HOOKS) -> bool:
    """Whether the hook dict ``hooks`` holds a hook that would matter (not from the modules in ``inert``)."""
    return bool(hooks) and any(getattr(h, "__module__", None) not in inert for h in hooks.values())


def _has_hooks(mod) -> bool:
    """Whether ``mod`` has a module hook of its own that would run (not one of ``_INERT_HOOKS``)."""
    return any(_user_hooks(getattr(mod, d, None), _INERT_HOOKS) for d in _HOOK_DICTS)


def _hooked(patch, blocks):
    """Where a module hook is set on ``blocks`` (``"global"``, ``(None, name)`` for a module holding them that the
    unpatched forward calls (``Adapter.block_holders``), or ``(block index, submodule name)``), or ``None``.
    The scan runs again only when a hook was registered somewhere since the last clean one (torch numbers every hook
    handle: ``RemovableHandle.next_id``); a model found with hooks is scanned every forward until they are gone."""
    stamp = RemovableHandle.next_id
    if patch.hooks_clean_at == stamp:
        return None
    if any(_user_hooks(d) for d in (_module._global_forward_hooks, _module._global_forward_pre_hooks,
                                     _module._global_backward_hooks, _module._global_backward_pre_hooks)):
        return "global"
    for name, mod in patch.adapter.block_holders():
        if _has_hooks(mod):
            return None, name
    for i, blk in enumerate(blocks):
        for name, mod in blk.named_modules():
            if _has_hooks(mod):
                return i, name
    patch.hooks_clean_at = stamp
    return None


def _hooked_when_traced(token: int):
    """:func:`_hooked` of the patch registered under ``token`` (:func:`traced_scan_token`) and its adapter's blocks,
    while torch.compile traces a forward: run as plain Python at trace time, its answer a constant of the graph (a
    hook set then is refused at compile time; like torch.compile itself, which does not guard on module hooks, a hook
    added after compiling is not seen). Marked so by :func:`traced_scan_token`. It takes an int, not the patch:
    torch.compile (2.11) passes only Python constants to such a function."""
    patch = _TRACED_SCANS[token]
    return _hooked(patch, patch.adapter.written_blocks())


# the patches of adapters that write their blocks out, by token (Patch.scan_token), for _hooked_when_traced; weak:
# a removed patch leaves. Per patch, not per forward.
_TRACED_SCANS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_SCAN_TOKENS = itertools.count(1)


def traced_scan_token(patch) -> int:
    """Register ``patch`` for :func:`_hooked_when_traced` and return its token (``Patch.scan_token``). Called when a
    patch of an adapter that writes blocks out is installed or unpickled. The first call marks that function for
    torch.compile (``assume_constant_result``), not the import: the marking imports ``torch._dynamo``, about a
    second (timm has imported it by then anyway)."""
    if not getattr(_hooked_when_traced, "_tokenprune_marked", False):
        torch.compiler.assume_constant_result(_hooked_when_traced)
        _hooked_when_traced._tokenprune_marked = True
    token = next(_SCAN_TOKENS)
    _TRACED_SCANS[token] = patch
    return token


def hooks_free(patch, blocks) -> bool:
    """Whether no module hook is set on ``blocks`` (nor a global one): an adapter that can run a block written out
    or through ``nn.Module.__call__`` writes it out only then (Whisper). Scans as :func:`check_no_hooks`."""
    return _hooked(patch, blocks) is None


def check_no_hooks(patch, blocks) -> None:
    """Refuse module hooks that a written-out block would skip without a word.

    Adapters whose blocks are always written out (``Adapter.writes_blocks``: timm ViT / Eva / NaFlex, open_clip) run a
    block's computation without ``nn.Module.__call__`` on the block, its attention and most of its submodules, so a
    hook registered there (a common way to read intermediate features) would never run. Scanning every submodule
    each forward would cost host time at batch 1, so the scan is cached (:func:`_hooked`). While torch.compile traces,
    the scan runs once at trace time (:func:`_hooked_when_traced`). A block compiled in place (``block.compile()``,
    regional compilation) would run uncompiled the same way: refused too (checked every eager forward: one dict
    lookup per block, no hook handle marks it)."""
    if torch.compiler.is_compiling():
        where = _hooked_when_traced(patch.scan_token)
    else:
        for i, blk in enumerate(blocks):
            if blk.__dict__.get("_compiled_call_impl") is not None:
                raise RuntimeError(
                    f"tokenprune: block {i} was compiled in place (module.compile()); this patched model runs its "
                    "blocks written out (without nn.Module.__call__), so the compiled block would not be used. "
                    "Compile the whole patched model instead (torch.compile(model), or model.compile()), or call "
                    "tokenprune.remove(model) first")
        where = _hooked(patch, blocks)
    if where == "global":
        raise RuntimeError("tokenprune: global module hooks (torch.nn.modules.module.register_module_forward_hook"
                           " / _pre_hook, register_module_full_backward_hook / _pre_hook) are set, and this patched "
                           "model's blocks run without nn.Module.__call__, so they would not run there; remove them, "
                           "or call tokenprune.remove(model) first")
    if where is not None:
        i, name = where
        where = (f"the module holding the blocks ({name})" if i is None
                 else f"block {i}" + (f" ({name})" if name else ""))
        raise RuntimeError(
            f"tokenprune: a module hook is registered on {where}; this patched model runs its blocks "
            "written out (without nn.Module.__call__), so the hook would silently not run. Remove the hook; "
            "for intermediate tokens use tokenprune.features(model, x) or hooks on modules outside the "
            "blocks, or call tokenprune.remove(model) first")


_HOLDER_REFUSALS = (
    ("block_holders", "the module holding the layers ({name}); this patched model runs the layers itself, without "
     "calling that module, so the hook would silently not run. Remove the hook: hook the layers (or the modules "
     "before / after them) instead, use tokenprune.features(model, x) for the output tokens"),
    ("shell_blocks", "the layer {name}; this patched model runs that layer written out (its attention and MLP are "
     "called, the layer module itself is not), so the hook would silently not run. Remove the hook: hook the layer's "
     "attention or mlp (or the modules around the layers) instead, use tokenprune.features(model, x)"),
)


def check_holders(patch) -> None:
    """Refuse module hooks on the modules holding the blocks that the patched forward no longer calls
    (``Adapter.block_holders``), for adapters that call each block through ``nn.Module.__call__`` (transformers'
    layers: hooks on them run as usual, and are not scanned), and on blocks written out around submodules that are
    called (``Adapter.shell_blocks``: the block's own hooks only). A few dict lookups per block and forward (batch 1
    is bound by host time); global hooks run on the layers' submodules and are not refused."""
    for kind, message in _HOLDER_REFUSALS:
        for name, mod in getattr(patch.adapter, kind)():
            if _has_hooks(mod):
                raise RuntimeError(f"tokenprune: a module hook is registered on {message.format(name=name)}, or call "
                                   "tokenprune.remove(model) first")


def check_hooks(patch, blocks) -> None:
    """The hook check of a forward: :func:`check_no_hooks` where the adapter writes its blocks out, else
    :func:`check_holders` (``run_blocks``, ``mixed.run_mixed``)."""
    if patch.adapter.writes_blocks:
        check_no_hooks(patch, blocks)
    else:
        check_holders(patch)


def run_blocks(fwd: Forward, blocks: Iterable[torch.nn.Module], x: torch.Tensor, block_fn: Callable,
               grid=None) -> torch.Tensor:
    """Run ``blocks`` on ``x`` with the patch's reducer between them; the final state is ``fwd.state``."""
    if torch.jit.is_tracing():
        raise RuntimeError("tokenprune: torch.jit.trace cannot record a reduced model (its token selection is data-"
                           "dependent and would be frozen into the trace); use torch.compile, or trace the model "
                           "after tokenprune.remove(model)")
    patch = fwd.patch
    reducer = patch.reducer
    state = TokenState.start(x, patch.num_prefix, grid, track_source=patch.track_source)
    state.proportional = reducer.proportional
    prog = patch.program_for(state.num_input, grid)
    check_depth(len(blocks), len(prog.steps))
    check_hooks(patch, blocks)
    fwd.state, fwd.mid_fuse = state, prog.mid_fuse
    observes = getattr(reducer, "observes", True)
    for stage in prog.before:
        state = reducer.reduce(state, stage, None)
    i = 0
    for blk, (kernel, want_qk, slot, mid, stages) in zip(blocks, prog.steps, strict=True):  # one step per block
        x = state.x
        state.tokens_per_block.append(x.shape[1])
        fwd.bias = state.attn_bias(x.dtype)
        fwd.kernel, fwd.want_qk, fwd.slot, fwd.mid = kernel, want_qk, slot, mid
        x = block_fn(blk, x, fwd)
        state = fwd.state  # a stage inside the block may have replaced it
        qk, state.x, state.residual, state.block = fwd.qk, x, fwd.residual, i
        fwd.qk, fwd.residual = None, None
        if observes:
            reducer.observe(state, i, qk)
        for stage in stages:
            state = reducer.reduce(state, stage, qk)
        fwd.state = state.materialize()  # a stage that reduced nothing leaves the add to do
        i += 1
    fwd.bias, fwd.kernel, fwd.want_qk, fwd.slot, fwd.mid = None, None, False, False, ()
    return state.x
