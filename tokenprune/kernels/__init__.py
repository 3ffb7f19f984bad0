"""Fused kernels of the hot paths, each with one PyTorch reference.

Layout: this module dispatches; ``reference.py`` holds the one PyTorch implementation of every op (the CPU
path and the tests' oracle); the Triton kernels and their launchers live by op family in ``attention.py``
(linear and key-bias attention), ``scores.py`` (one query row, attention received), ``match.py`` (ToMe
matching, the long inputs' ranking), ``merge.py`` (merged rows, merge step, row gather), ``keep.py`` (keep the k
best), ``apet.py`` (ApET), ``pitome.py`` (PiToMe's energies and step order) and ``select.py`` (DivPrune's
max-min selection), with shared helpers in ``_triton_common.py``; ``custom_ops.py`` wraps the launchers as
``torch.ops.tokenprune.*`` for ``torch.compile``; ``compile_check.py`` builds every kernel for sm_90 without a GPU.
``triton_impl.py`` is only a compatibility shim for the scripts and the GPU tests.

Dispatch: the Triton kernel runs when every tensor argument is on CUDA, none of them needs a gradient
(the kernels have no backward) or is float64 (the kernels compute in float32 at most; float64 is what a user runs
to check precision, so it gets the reference's float64 arithmetic), ``triton`` imports, and the kernels are on (``TOKENPRUNE_KERNELS`` not
``0`` / ``off`` / ``false`` / ``no`` at import, or :func:`set_kernels_enabled`); otherwise the PyTorch
reference in ``reference.py`` runs (CPU, no Triton, or kernels switched off). How the kernel is called:

- eager: the launcher in the family module directly (a custom-op call would add tens of microseconds of
  dispatcher time per op, and batch-1 latency is launch-bound);
- while ``torch.compile`` / ``torch.export`` traces (``torch.compiler.is_compiling()``): the opaque custom
  op ``torch.ops.tokenprune.<name>`` (``custom_ops.py``), whose CUDA implementation is that launcher and
  whose fake implementation gives the output shapes, so ``fullgraph=True``, Inductor and CUDA graphs work;
- the ops' CPU implementation is the reference (tests check and compile the op path on CPU with
  ``_FORCE_OP_FOR_TESTS``). ``merge_step`` / ``keep_step`` / ``apet_merge`` / ``apet_step`` are CUDA-only in eager
  (their callers check :func:`use_triton`); their references are ``reference.merge_step`` / ``keep_step`` /
  ``apet_merge`` / ``apet_step``.

The decision functions (:func:`use_triton`, the ``*_fits``) read module flags only, so Dynamo traces them
without a graph break. The references are the oracle in ``tests/test_kernels.py``; NOTES.md counts the
bytes and FLOPs of each kernel.

- :func:`efficient_attention` -- MAELRE's linear attention,
  ``softmax_d(q) @ (softmax_N(k + bias)^T v)``, two passes over the tokens.
- :func:`biased_attention` -- softmax attention with the per-key log-size bias of proportional
  attention, for short sequences (SDPA drops to a slower masked kernel when given a bias);
- :func:`query_scores` -- attention of one query row per head, head mean or weighting (given weights, or each
  token's head norms of the heads' attention outputs, read by the kernel).
- :func:`received_scores` -- the attention each key receives over all queries, head mean.
- :func:`bipartite_best` / :func:`merge_rows` -- ToMe matching without the
  Na x Nb similarity matrix in memory, and the size-weighted merge in one pass;
  :func:`merge_step` -- the whole ToMe step (matching, ranking, merge, sizes, source map) in one
  launch for up to 256 tokens, three above (the launch count is what costs at batch 1);
  :func:`gather_rows` -- the kept-token gather (prefix included) in one pass.
- :func:`apet_errors` -- ApET's least-squares reconstruction error per token.
- :func:`gram` / :func:`apet_stage` / :func:`apet_assign` -- one ApET stage from the per-sample
  Gram matrix ``X X^T``: x is read once (the Gram kernel), then one program per sample does the
  farthest-point sampling and the k x k ridge solve (:func:`apet_stage_fits` says when it fits),
  and the cosine assignment to the kept tokens reads G again, not x. :func:`apet_step`: the whole stage (those,
  the selection and :func:`apet_merge`) in four launches, planned once per input signature (batch 1).
- :func:`pitome_order` -- PiToMe's energy of every token without the N x N matrix in memory, the energy
  ranking and the row order in which :func:`merge_step` (``perm``) then merges, in one launch.
- :func:`max_min_select` -- DivPrune's greedy max-min diversity selection on the features' Gram matrix (the cosine
  distances worked out in the kernel), its ``k`` dependent steps in one program per sample (one launch instead of
  ``5 k``); while compiling always the op (on CPU too: Dynamo would otherwise unroll the ``k`` steps into the
  graph).
"""
from __future__ import annotations

import contextlib
import os
import types

import torch

from . import reference

_OFF = ("0", "off", "false", "no")
_triton = None  # the Triton kernel modules as one namespace (see _impl), False when they cannot be imported


def _env_enabled() -> bool:
    """``TOKENPRUNE_KERNELS`` as a flag (read once, at import, into ``_ENABLED``)."""
    return os.environ.get("TOKENPRUNE_KERNELS", "1").strip().lower() not in _OFF


_ENABLED: bool = _env_enabled()
# tests only: CPU tensors count as kernel tensors and every dispatch goes through the custom op, even in
# eager; the ops' CPU implementation is the reference, so CPU tests exercise the op path (tests/test_kernels.py)
_FORCE_OP_FOR_TESTS: bool = False


def _impl():
    """The Triton kernel modules by family, ``_impl().merge.merge_step`` and so on (``attention``, ``scores``,
    ``match``, ``merge``, ``keep``, ``apet``, ``pitome``, ``select``); False when they cannot be imported. Imported
    on first use only."""
    global _triton
    if _triton is None:
        try:
            from . import apet, attention, keep, match, merge, pitome, scores, select
            _triton = types.SimpleNamespace(attention=attention, scores=scores, match=match, merge=merge, keep=keep,
                                            apet=apet, pitome=pitome, select=select)
        except Exception:  # no triton, or a triton that cannot build for this platform
            _triton = False
    return _triton


def _have_triton() -> bool:
    """Whether the Triton kernel modules import. A constant to torch.compile: a first call while tracing imports it
    in Python (no import, no try / except in the graph, no graph break, also when the import fails)."""
    return bool(_impl())


# what torch.compiler.assume_constant_result(_have_triton) does, without importing torch._dynamo (1.3 s in every
# process that imports tokenprune); the fullgraph tests fail if a torch version stops honouring the mark
_have_triton._dynamo_marked_constant = True


def _via_op() -> bool:
    """Call the custom op (``torch.ops.tokenprune.*``) rather than the launcher: while compiling (Dynamo
    then records one opaque call), and in tests with ``_FORCE_OP_FOR_TESTS``. Eager calls the launcher
    directly: a custom-op call costs tens of microseconds of dispatcher time."""
    return _FORCE_OP_FOR_TESTS or torch.compiler.is_compiling()


def kernels_enabled() -> bool:
    """False when the fused kernels are switched off (``TOKENPRUNE_KERNELS`` at import, or
    :func:`set_kernels_enabled`)."""
    return _ENABLED


def set_kernels_enabled(flag: bool) -> None:
    """Switch the fused kernels on or off for this process. ``TOKENPRUNE_KERNELS`` is read once, at import;
    changing it later has no effect. Compiled functions guard on this flag (they recompile when it changes)."""
    global _ENABLED
    _ENABLED = bool(flag)


@contextlib.contextmanager
def kernels_on(flag: bool):
    """``with kernels.kernels_on(False): ...`` -- :func:`set_kernels_enabled` for a block, restored after."""
    old = _ENABLED
    set_kernels_enabled(flag)
    try:
        yield
    finally:
        set_kernels_enabled(old)


def needs_grad(tensors) -> bool:
    """True when autograd would record through any of ``tensors``: the kernels have no backward,
    so such calls take the PyTorch path (a kernel output would silently cut the gradient)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def use_triton(*tensors) -> bool:
    """Whether the Triton kernel runs for these tensors (see the module docstring). One pass over them (it runs
    several times per reduction step and once per block: batch-1 forwards are bound by such host time, and
    torch.compile traces every call): the device first, so a CPU tensor answers at once, and the grad mode
    only for a tensor that requires grad."""
    if not _ENABLED:
        return False
    for t in tensors:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            if _FORCE_OP_FOR_TESTS:
                continue
            return False
        if not (t.is_cuda or _FORCE_OP_FOR_TESTS) or (t.requires_grad and torch.is_grad_enabled()):
            return False
        if t.dtype is torch.float64:
            return False
    return _have_triton()


_ops = torch.ops.tokenprune  # the custom ops (registered by custom_ops.py, imported below)


def efficient_attention(q, k, v, bias=None):
    """Linear-cost attention ``[B, H, N, d]``; see ``reference.efficient_attention``."""
    if use_triton(q, k, v, bias):
        if _via_op():
            return _ops.efficient_attention(q, k, v, bias)
        return _impl().attention.efficient_attention(q, k, v, bias)
    return reference.efficient_attention(q, k, v, bias)


BA_MIN_BATCH_EAGER = 32  # below this batch an eager forward is bound by host time: SDPA's one op is cheaper to issue
BA_MIN_BATCH_COMPILED = 1  # compiled (no host cost per op): from this batch the kernel, below it SDPA with the bias


def biased_attention_applies(bias, n: int, d: int) -> bool:
    """Whether :func:`biased_attention` runs the Triton kernel for ``n`` tokens of head dim ``d`` (a bias
    on CUDA, kernels on, a sequence short enough: see ``attention.BA_CONFIG``). In eager mode small
    batches keep SDPA with the bias as its mask: a Triton launch costs several times an aten op's host
    time, and at small batches host time is what a forward takes. Compiled, the kernel always applies."""
    return bias is not None and _ba_kernel_applies(bias, n, d)


def _ba_kernel_applies(t, n: int, d: int) -> bool:
    """The key-bias kernel's own conditions for a batch of ``t`` (the bias, or q): the batch (the test first: it
    decides at batch 1 in eager mode, which runs this once per block), Triton for ``t``, the sequence's fit."""
    min_batch = BA_MIN_BATCH_COMPILED if torch.compiler.is_compiling() else BA_MIN_BATCH_EAGER
    return t.shape[0] >= min_batch and use_triton(t) and _impl().attention.biased_attention_fits(n, d)


KEY_MEAN_IN_ATTENTION_MAX_BATCH = 1  # up to this batch, biased_attention(key_mean=True) has the fused kernel's
# launch average the keys over heads too (ToMe's metric for the merge after the block): B more programs per query
# tile, beside the attention's, instead of a mean op (compiled: one Inductor kernel per merge step, run 51, H100) or
# the merge kernel reading every head (eager). Run 57 (H100, bench_forward.py --parts merge_b1_forward,kernels_b_merge):
# ViT-B bs-1 reduce-overhead merge 0.897x -> 0.916x (side program on: 0.907x -> 0.926x); compiled, 137 -> 125 kernels
# and 0.662 -> 0.626 ms of kernel time a forward. Batches 2-8 not timed; 0: never


def key_mean_attention_applies(q) -> bool:
    """Whether :func:`biased_attention` with ``key_mean`` runs the fused kernel, which then averages the keys too,
    also without a bias (where the block would run SDPA: one launch instead of SDPA's and a mean op's):
    ``KEY_MEAN_IN_ATTENTION_MAX_BATCH``, within the batches where the kernel applies at all."""
    return q.shape[0] <= KEY_MEAN_IN_ATTENTION_MAX_BATCH and _ba_kernel_applies(q, q.shape[-2], q.shape[-1])


def biased_attention(q, k, v, bias=None, key_mean: bool = False):
    """``softmax(q k^T / sqrt(d) + bias) v`` ``[B, H, N, d]``, bias ``[B, 1, 1, N]``: the fused kernel where
    :func:`biased_attention_applies`, else SDPA with ``attn_mask`` (``reference.biased_attention``).
    ``key_mean``: returns ``(out, k.mean(1) or None)``: the keys' head mean ``[B, N, d]`` from the fused kernel's
    launch where :func:`key_mean_attention_applies` (with or without a bias; the merge kernels' own mean: ``k.mean(1)``
    in fp16 / bf16, within an ulp in float32), else None (the caller averages them where it needs them)."""
    if key_mean and key_mean_attention_applies(q) and use_triton(k, v, bias):
        if _via_op():
            return _ops.biased_attention_key_mean(q, k, v, bias)
        return _impl().attention.biased_attention(q, k, v, bias, True)
    if biased_attention_applies(bias, q.shape[-2], q.shape[-1]) and use_triton(q, k, v):
        out = _ops.biased_attention(q, k, v, bias) if _via_op() else _impl().attention.biased_attention(q, k, v, bias)
    else:
        out = reference.biased_attention(q, k, v, bias)
    return (out, None) if key_mean else out


def query_scores(q_row, k, scale, bias=None, head_weights=None, head_values=None):
    """One query row per head ``[B, H, d]`` against ``k [B, H, N, d]`` -> ``[B, N]`` float32; heads weighted by
    ``head_weights`` or by the norms of ``head_values`` (see ``reference.query_scores``)."""
    if head_weights is not None and head_values is not None:
        raise ValueError("query_scores: give head_weights or head_values, not both")
    if use_triton(q_row, k, bias, head_weights, head_values):
        if _via_op():
            return _ops.query_scores(q_row, k, float(scale), bias, head_weights, head_values)
        return _impl().scores.query_scores(q_row, k, scale, bias, head_weights, head_values)
    return reference.query_scores(q_row, k, scale, bias, head_weights, head_values)


LSE_FROM_ATTENTION_MIN_TOKENS: int | None = 900  # from this many tokens, a block whose q/k a reducer scores by the
# attention each key receives (cls without a class token) runs cuDNN's attention asked for its log-sum-exp too, and
# received_scores skips its own pass over the scores. Run 92 (H100, Whisper-large's shapes, 20 heads of 64, bs 1,
# graph replay, bench_forward --parts received_lse): per scored layer the lse costs the attention +4.9 / -1.1 / +5.6
# us at 1500 / 1191 / 945 tokens and saves received_scores 39.1 / 23.1 / 20.2 us; run 93 (--parts long_sched_lse):
# Whisper-large bs 1 reduce-overhead cls @1,5,9 median 6.258 ms against 6.371 without (1.376x / 1.302x by the best
# round). The saving shrinks with the tokens and was not measured below 945: 900. None: off.


def attention_lse_applies(q, k, v, bias) -> bool:
    """Whether :func:`attention_with_lse` serves this attention: ``LSE_FROM_ATTENTION_MIN_TOKENS`` reached, no bias,
    self-attention on CUDA in fp16 / bf16 without autograd, head dim a multiple of 8 up to 128, and the op there on
    a GPU that runs it (compute capability 8.0 or newer)."""
    n = LSE_FROM_ATTENTION_MIN_TOKENS
    return (n is not None and bias is None and q.shape[-2] >= n and q.is_cuda and q.dtype in (torch.float16,
            torch.bfloat16) and q.shape == k.shape == v.shape and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention")
            and _cudnn_attention_runs(q.device.index))


def _cudnn_attention_runs(index: int) -> bool:
    """Whether cuDNN's fused attention runs on CUDA device ``index``: Ampere (compute capability 8.0) or newer; on a
    T4 or V100 the op raises. A constant to torch.compile, marked as ``_have_triton`` is."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


_cudnn_attention_runs._dynamo_marked_constant = True


def attention_with_lse(q, k, v, scale: float):
    """``softmax(q k^T * scale) v`` ``[B, H, N, d]`` and each query's log-sum-exp of its scaled scores ``[B, H, N, 1]``
    (natural log), from one cuDNN attention launch (``torch.ops.aten._scaled_dot_product_cudnn_attention``), where
    :func:`attention_lse_applies`."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
    return out[0], out[1]


def received_scores(q, k, scale, bias=None, valid=None, lse=None):
    """The attention each key receives, mean over the (valid) queries and the heads: ``q, k [B, H, N, d]`` ->
    ``[B, N]`` float32 (float64 for float64 inputs). The kernel takes a key bias (``[B or 1, 1, 1, N]``) or none;
    another bias, the reference. ``lse``: each query's log-sum-exp over its scaled, biased scores where the block's
    attention returned it (``[B, H, N]`` or ``[B, H, N, 1]``, natural log): the kernel then skips its own pass over
    them (the reference computes its softmax whole and needs none)."""
    key_bias = bias is None or (bias.dim() == 4 and bias.shape[1] == bias.shape[2] == 1)
    if key_bias and q.shape == k.shape and use_triton(q, k, bias, valid, lse):
        if _via_op():
            return _ops.received_scores(q, k, float(scale), bias, valid, lse)
        return _impl().scores.received_scores(q, k, scale, bias, valid, lse)
    return reference.received_scores(q, k, scale, bias, valid)


def bipartite_best(metric, valid_b=None):
    """Best B partner of every A token; see ``reference.bipartite_best``."""
    if use_triton(metric, valid_b):
        if _via_op():
            return _ops.bipartite_best(metric, valid_b)
        return _impl().match.bipartite_best(metric, valid_b)
    return reference.bipartite_best(metric, valid_b)


def merge_rows(x, sizes, prim, members=None, owner=None, include_prim: bool = True):
    """Size-weighted merge of member rows into their owner rows; see ``reference.merge_rows``."""
    if use_triton(x, sizes, prim, members, owner):
        if _via_op():
            return _ops.merge_rows(x, sizes, prim, members, owner, bool(include_prim))
        return _impl().merge.merge_rows(x, sizes, prim, members, owner, include_prim)
    return reference.merge_rows(x, sizes, prim, members, owner, include_prim)


def merge_step_fits(n: int, r: int = 0) -> bool:
    """Whether :func:`merge_step` handles ``n`` non-prefix tokens with ``r`` of them merged away (one program per
    sample up to 256 tokens; above, four launches for up to 16k tokens and 512 merged per step)."""
    return _have_triton() and _impl().merge.merge_step_fits(n, r)


# ToMe's key mean (metric = keys per head [B, H, T, d]): read by the merge kernels in eager calls, one op before them
# while compiling. Inside, a step has one aten op, one allocation and one launch fewer (host time: a merge step
# 75.7 -> 22.7 us on the CPU harness, bench_forward.py --parts dryhost), which eager batch 1 is bound by. But the
# matching then reads H times the metric's bytes: on an H200 (2026-12-05, --parts keymean and kernels_b) the ViT-B
# bs-1 merge step took 19.0 us of GPU time against ~12.7 with the mean first, and reduce-overhead merge ran 1.093 vs
# 1.079 ms (bs 256 eager: 17.41 vs 17.39 ms). Under CUDA graphs host time is free, so compiled calls take the op.
# With the head loop unrolled (session 8) reading the keys per head in compiled calls still lost: ViT-B bs-1
# reduce-overhead merge 1.014 vs 0.982 ms (run 15, H200, --parts keymean); that switch was removed.
# False: the op everywhere (for the comparison).
KEY_MEAN_IN_KERNEL = True
# Above this many tokens the mean is one op in eager calls too: the matching of a long input (_bm_best, four-launch
# merge step; pitome's one-program order) has each of its programs read every B key of every head: H x the bytes.
# One mean op reads the keys once. Run 11 (H200, Whisper-large bs 1, keys per head, the head loads then serial): 16.4
# ms of GPU time per merged forward against 8.0 unreduced; run 14 (H100, loads unrolled): one step 64.1 us per head
# against 51.4 with the op. 256: the one-launch merge step's bound (2 x merge.MERGE_STEP_MAX_A; that module needs
# Triton, this one does not).
KEY_MEAN_IN_KERNEL_MAX_TOKENS = 256
# ... except at batch 1 (up to this batch): an eager batch-1 forward waits on the host, and the op is one more launch
# per step (the kernels' extra reads cost GPU time the host hides there). Run 19 (H100, Whisper-large bs 1 eager, layers
# written out): merge 0.928x of the unreduced model with the op, 0.994x with the keys per head. Larger batches are
# bound by the GPU, where the op's single read pays.
KEY_MEAN_IN_KERNEL_LONG_MAX_BATCH = 1
# Compiled calls always take the op: CUDA graphs hide its launch, and reading the keys per head there gained nothing
# (run 30, H100, ViT-B bs 1 reduce-overhead merge @0.25: 0.889x per head, 0.894x with the op; kernels/NOTES.md).


def _mean_first(metric):
    """``metric`` for the merge kernels: the keys per head as they are in eager calls (the kernels average them),
    their mean (one op) while compiling, above ``KEY_MEAN_IN_KERNEL_MAX_TOKENS`` tokens at batches over
    ``KEY_MEAN_IN_KERNEL_LONG_MAX_BATCH``, or with ``KEY_MEAN_IN_KERNEL`` off. (A zero-padded mean at head dims off a
    power of two was tried and removed: run 18, kernels/NOTES.md.)"""
    if metric.dim() == 4 and (not KEY_MEAN_IN_KERNEL or torch.compiler.is_compiling()
                              or (metric.shape[-2] > KEY_MEAN_IN_KERNEL_MAX_TOKENS
                                  and metric.shape[0] > KEY_MEAN_IN_KERNEL_LONG_MAX_BATCH)):
        return reference.key_mean(metric)
    return metric


def merge_step(x, metric, sizes, source, num_prefix: int, r: int, padded: bool, max_size: int | None = None,
               log_sizes: bool = False, residual=None, perm=None, scratch: dict | None = None):
    """The whole of ``ops.bipartite_merge`` in one Triton launch (CUDA only; the PyTorch path of
    ``ops.bipartite_merge`` is its reference, ``reference.merge_step`` the same on plain tensors). Returns
    ``(new_x, new_sizes, new_source)``, plus ``log(new_sizes)`` in ``x``'s dtype with ``log_sizes`` (the next
    blocks' attention bias: no separate log and cast launches). ``metric``: ``[B, T, d]``, or a block's keys
    ``[B, H, T, d]`` (a strided view is fine), averaged over heads as the kernels read them (``reference.key_mean``:
    no mean launch). ``max_size``: an upper bound on any token size
    (the encoder's input token count); small bounds let the kernel take exact fp16/bf16 tensor-core products.
    ``residual``: the tokens are ``x + residual`` rounded to ``x``'s dtype (a block's final residual add
    left to the merge, which then reads both and never stores the sum; see ``engine.run_blocks``). ``perm``
    ``[B, T]`` long: the step runs on the rows in that order, read through it (``pitome``; see
    ``reference.merge_step``). ``scratch``: the caller's dict for one forward (``TokenState.scratch``), where the
    eager launcher keeps its scratch buffers from one step to the next (allocated once per forward, not per step)."""
    metric = _mean_first(metric)
    if _via_op():
        out = _ops.merge_step(x, metric, sizes, source, num_prefix, r, bool(padded), max_size, bool(log_sizes),
                              residual, perm)
        new_source = out[2] if source is not None else None
        return (out[0], out[1], new_source, out[3]) if log_sizes else (out[0], out[1], new_source)
    return _impl().merge.merge_step(x, metric, sizes, source, num_prefix, r, padded, max_size, log_sizes, residual,
                                    perm, scratch)


def keep_step_fits(n: int) -> bool:
    """Whether :func:`keep_step` / :func:`topk_sorted` rank ``n`` tokens in one program."""
    return _have_triton() and _impl().keep.keep_step_fits(n)


def keep_step(x, scores, sizes, source, num_prefix: int, k: int):
    """``ops.topk_sorted`` + ``ops.gather_tokens`` (no padding) in one Triton launch (CUDA only; those
    two are its reference, ``reference.keep_step`` the same on plain tensors): keep the ``k`` best-scored
    non-prefix tokens in spatial order, with their sizes and the composed source map. Ties go to the lower
    index. ``scores`` may be the selection itself, bool with exactly ``k`` True per row: nothing is ranked then.
    Returns ``(x, sizes, source)``."""
    if _via_op():
        nx, ns, nsrc = _ops.keep_step(x, scores, sizes, source, num_prefix, k)
        return nx, (ns if sizes is not None else None), (nsrc if source is not None else None)
    return _impl().keep.keep_step(x, scores, sizes, source, num_prefix, k)[:3]


def keep_above_step(x, scores, sizes, source, num_prefix: int, k_max: int, threshold):
    """``ops.keep_above`` without padding in one Triton launch, or None where it does not apply (CPU, a grad-mode
    input, too many tokens, or torch.compile / export tracing, which take ``keep_above``'s ops): each sample keeps
    its ``clamp(#{score > threshold}, 1, k_max)`` best non-prefix tokens in spatial order (``threshold``: a float or
    a one-element tensor, read on the device; a tensor of several, which the ops broadcast, takes the ops). Returns
    ``(x, sizes, source, counts)``: ``x`` and ``sizes`` still ``P + k_max`` rows wide, the rows past a sample's count
    unwritten, ``counts`` ``[B]`` float32 (the caller reads them and cuts the rows)."""
    th = threshold if isinstance(threshold, torch.Tensor) else None
    if (_via_op() or (th is not None and th.numel() != 1)
            or not (use_triton(x, scores, th) and keep_step_fits(scores.shape[1]))):
        return None
    nx, ns, nsrc, _, counts = _impl().keep.keep_step(x, scores, sizes, source, num_prefix, k_max, threshold=threshold)
    return nx, ns, nsrc, counts


def topk_sorted(scores, k: int):
    """Indices of the ``k`` best scores per row, ascending; one launch on CUDA (ties: lower index)."""
    if use_triton(scores) and keep_step_fits(scores.shape[1]):
        if _via_op():
            return _ops.topk_sorted(scores, k)
        return _impl().keep.topk_sorted(scores, k)
    return scores.topk(k, dim=1, sorted=False).indices.sort(1).values


def apet_merge_fits(batch: int) -> bool:
    """Whether :func:`apet_merge` is the faster path at this batch size (it pays at small batches)."""
    return _have_triton() and _impl().apet.apet_merge_fits(batch)


def apet_merge(x, sizes, target, keep_idx, source, num_prefix: int, max_size: int | None = None):
    """ApET's merge in one Triton launch (CUDA only; the PyTorch path of ``Apet.reduce`` is its
    reference, ``reference.apet_merge`` the same on plain tensors): each kept slot becomes the size-weighted
    mean of the tokens assigned to it (``target [B, N]``); returns ``(x, sizes, source)``."""
    if _via_op():
        nx, ns, nsrc = _ops.apet_merge(x, sizes, target, keep_idx, source, num_prefix, max_size)
        return nx, ns, (nsrc if source is not None else None)
    return _impl().apet.apet_merge(x, sizes, target, keep_idx, source, num_prefix, max_size)


def apet_step_fits(batch: int, n: int, k: int, dtype) -> bool:
    """Whether :func:`apet_step` runs a stage of ``batch`` samples, ``n`` non-prefix tokens, ``k`` basis tokens."""
    return _have_triton() and _impl().apet.apet_step_fits(batch, n, k, dtype)


def apet_step(x, sizes, source, num_prefix: int, k: int, keep: int, eps: float = 1e-5, padded: bool = False,
              max_size: int | None = None):
    """One ApET stage from the Gram matrix in four Triton launches (CUDA only, small batches: :func:`apet_step_fits`;
    reference ``reference.apet_step``): keep ``keep`` tokens, merge the others into them; returns
    ``(x, sizes, source)``."""
    if _via_op():
        nx, ns, nsrc = _ops.apet_step(x, sizes, source, num_prefix, k, keep, float(eps), padded, max_size)
        return nx, ns, (nsrc if source is not None else None)
    return _impl().apet.apet_step(x, sizes, source, num_prefix, k, keep, eps, padded, max_size)


def pitome_order(metric, sizes, num_prefix: int, cand: int, margin: float, padded: bool):
    """PiToMe's energies ``[B, N]`` float32 and the row order ``[B, P + N]`` long of one step; see
    ``reference.pitome_order`` (one launch on CUDA). ``metric``: ``[B, T, d]``, or a block's keys ``[B, H, T, d]``
    averaged over heads as the kernel reads them (as :func:`merge_step`)."""
    metric = _mean_first(metric)
    if use_triton(metric, sizes if padded else None):
        if _via_op():
            return _ops.pitome_order(metric, sizes if padded else None, num_prefix, cand, float(margin), bool(padded))
        return _impl().pitome.pitome_order(metric, sizes, num_prefix, cand, margin, padded)
    return reference.pitome_order(metric, sizes, num_prefix, cand, margin, padded)


def gather_rows(x, rows):
    """``x[b, rows[b, o]]`` for every output row, ``rows [B, K]`` long (prefix rows included)."""
    if use_triton(x, rows):
        if _via_op():
            return _ops.gather_rows(x, rows)
        return _impl().merge.gather_rows(x, rows)
    return reference.gather_rows(x, rows)


def apet_errors(x, basis, eps: float = 1e-5):
    """Reconstruction error of every token from the basis, ``[B, N]`` float32."""
    if use_triton(x, basis):
        if _via_op():
            return _ops.apet_errors(x, basis, float(eps))
        return _impl().apet.apet_errors(x, basis, eps)
    return reference.apet_errors(x, basis, eps)


def gram(x):
    """``(G [B, N, N], sq [B, N])``: ``G = X X^T`` per sample in float32, ``sq = diag(G)``."""
    if use_triton(x):
        if _via_op():
            g = _ops.gram(x)
            return g, g.diagonal(dim1=1, dim2=2)
        return _impl().apet.gram(x)
    return reference.gram(x)


def apet_stage_fits(n: int, k: int) -> bool:
    """Whether :func:`apet_stage` (one Triton program per sample) handles ``n`` tokens and ``k`` basis tokens."""
    return _have_triton() and _impl().apet.apet_stage_fits(n, k)


def apet_stage(g, valid, k: int, eps: float = 1e-5):
    """ApET basis ``[B, k]`` long and errors ``[B, N]`` float32 from the Gram matrix; see ``reference.apet_stage``."""
    if use_triton(g, valid):
        if _via_op():
            return _ops.apet_stage(g, valid, k, float(eps))
        return _impl().apet.apet_stage(g, valid, k, eps)
    return reference.apet_stage(g, valid, k, eps)


def apet_assign(g, keep_idx):
    """Slot ``[B, N]`` of every token's most cosine-similar kept token, from ``g``; see ``reference.apet_assign``."""
    if use_triton(g, keep_idx):
        if _via_op():
            return _ops.apet_assign(g, keep_idx)
        return _impl().apet.apet_assign(g, keep_idx)
    return reference.apet_assign(g, keep_idx)


def max_min_select(gram, k: int, valid=None, weight=None):
    """``[B, N]`` bool: ``k`` tokens per sample by greedy max-min cosine diversity, from the features' Gram matrix
    ``gram [B, N, N]`` (float32; :func:`gram`), with optional ``valid [B, N]`` bool and ``weight [B, N]``; see
    ``reference.max_min_select``."""
    if _via_op():
        return _ops.max_min_select(gram, k, valid, weight)
    if use_triton(gram, valid, weight) and _impl().select.max_min_select_fits(gram.shape[1]):
        return _impl().select.max_min_select(gram, k, valid, weight)
    return reference.max_min_select(gram, k, valid, weight)


from . import custom_ops  # noqa: E402  (registers torch.ops.tokenprune.*; needs _impl above)

__all__ = ["efficient_attention", "biased_attention", "biased_attention_applies", "query_scores", "received_scores",
           "bipartite_best", "merge_rows", "merge_step", "gather_rows", "keep_step", "keep_step_fits", "topk_sorted",
           "apet_merge", "apet_merge_fits", "apet_step", "apet_step_fits", "apet_errors", "gram", "apet_stage",
           "apet_stage_fits", "apet_assign", "pitome_order", "max_min_select", "use_triton", "needs_grad",
           "kernels_enabled", "set_kernels_enabled", "kernels_on", "reference"]
