"""The Triton kernels as opaque PyTorch custom ops, ``torch.ops.tokenprune.<name>``, for ``torch.compile``.

Dynamo records one call of the op instead of tracing the launcher's Python, and Inductor calls the op (so
our launcher) rather than recompiling the Triton code. Each op has three implementations:

- the default one (CUDA): the Triton launcher (``attention.py``, ``merge.py``, ...);
- ``cpu``: the PyTorch reference in ``reference.py``, brought to the kernel's output contract (dtype and
  strides), so the ops can be checked (``torch.library.opcheck``) and compiled in CPU tests;
- the fake one: output shapes, dtypes and strides from the input shapes and the int arguments alone
  (no output shape depends on data).

Custom ops cannot return None and their outputs cannot alias their inputs or each other: an output that
the launcher leaves None (``merge_step``'s source map without one, ...) is an empty long tensor here, and
the dispatch functions in ``__init__.py`` turn it back into None (they know from their arguments when);
``gram`` returns G only, ``diag(G)`` is taken outside the op.
"""
import sys

import torch

from . import reference as R

OPS: dict = {}  # name -> the CustomOpDef
LAUNCH: dict = {}  # name -> the implementation that runs the Triton launcher (CUDA)
CPU: dict = {}  # name -> the reference implementation (CPU)
FAKE: dict = {}  # name -> the fake (meta) implementation


def _t():
    """The Triton kernel modules (``_t().merge.merge_step``), through the package's resolver, looked up on the
    package at call time (tests patch ``kernels._impl``; this module is imported by the package itself)."""
    return sys.modules[__package__]._impl()


def _define(name: str, schema: str, fake, family: str | None = None, launch=None, cpu=None):
    """Register ``torch.ops.tokenprune.<name>`` with its three implementations. ``launch`` (CUDA) defaults to
    the launcher ``<family>.<name>`` and ``cpu`` to ``reference.<name>``, each called with the op's arguments
    as they come (both looked up at call time); ops whose outputs need packing pass their own."""
    if launch is None:
        def launch(*args):
            return getattr(getattr(_t(), family), name)(*args)
    if cpu is None:
        def cpu(*args):
            return getattr(R, name)(*args)
    op = torch.library.custom_op(f"tokenprune::{name}", launch, mutates_args=(), schema=schema)
    op.register_kernel("cpu", cpu)

    def fake_and_fallbacks(*args, **kwargs):
        if not _FALLBACKS_MADE:
            inductor_fallbacks()
        return fake(*args, **kwargs)

    op.register_fake(fake_and_fallbacks)
    OPS[name], LAUNCH[name], CPU[name], FAKE[name] = op, launch, cpu, fake
    return op


_FALLBACKS_MADE = False


def inductor_fallbacks() -> bool:
    """Register every op with Inductor as a fallback kernel (what Inductor does itself at an op's first call in a
    graph it lowers), once ``torch._inductor.lowering`` is imported; True once done. Called by the fake
    implementations, which tracing runs before Inductor lowers the graph.

    Why: Inductor's own registration of an op it has no lowering for formats the op's arguments for a log line first,
    and torch 2.11 formats them eagerly, whatever the log level: each argument's IR printed with everything it was
    computed from. An op first called late in a deep graph prints the graph's DAG as a tree: ViT-B's every-block merge
    at batch 1 under ``reduce-overhead``, whose plain key-bias attention is first called in block 11 after 11 merge
    steps, spent more than 10 minutes there (run 80, H100: every stack sample in ``ir.py``'s ``__str__``; run 57 had
    that attention from block 1 on and compiled). Registered first, no op takes that path. Torch versions without
    these internals keep Inductor's own path."""
    global _FALLBACKS_MADE
    lowering = sys.modules.get("torch._inductor.lowering")
    if lowering is None:
        return False
    _FALLBACKS_MADE = True
    try:
        from torch._library.utils import get_layout_constraint_tag
        for op in OPS.values():
            target = op._opoverload
            if target not in lowering.lowerings:  # the layout constraint Inductor's own path gives a custom op
                constraint = lowering.tag_to_layout_constraint(get_layout_constraint_tag(target, with_default=True))
                lowering.make_fallback(target, layout_constraint=constraint, warn=False)
    except (ImportError, AttributeError, TypeError):  # another torch: Inductor's own path
        return False
    return True


def _none(like: torch.Tensor) -> torch.Tensor:
    """Stands for a None output."""
    return like.new_empty((0,), dtype=torch.long)


def _or_none(t, like):
    return _none(like) if t is None else t


def _heads_out(q: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, d]`` laid out as ``[B, N, H, d]``: the attention kernels' output (the caller's
    ``transpose(1, 2).reshape(B, N, H * d)`` is then free)."""
    b, h, n, d = q.shape
    return q.new_empty((b, n, h, d)).transpose(1, 2)


# -- attention ------------------------------------------------------------------------------------------
def _attn_fake(q, k, v, bias):
    return _heads_out(q)


_define("efficient_attention", "(Tensor q, Tensor k, Tensor v, Tensor? bias) -> Tensor", _attn_fake, "attention",
        cpu=lambda q, k, v, bias: _heads_out(q).copy_(R.efficient_attention(q, k, v, bias)))
_define("biased_attention", "(Tensor q, Tensor k, Tensor v, Tensor? bias) -> Tensor", _attn_fake, "attention",
        cpu=lambda q, k, v, bias: _heads_out(q).copy_(R.biased_attention(q, k, v, bias)))
_define("biased_attention_key_mean", "(Tensor q, Tensor k, Tensor v, Tensor? bias) -> (Tensor, Tensor)",
        lambda q, k, v, bias: (_heads_out(q), k.new_empty((k.shape[0], k.shape[2], k.shape[3]))),
        launch=lambda q, k, v, bias: _t().attention.biased_attention(q, k, v, bias, True),
        cpu=lambda q, k, v, bias: (_heads_out(q).copy_(R.biased_attention(q, k, v, bias)), R.key_mean(k)))


def _qs_fake(q_row, k, scale, bias, head_weights, head_values):
    return k.new_empty((k.shape[0], k.shape[2]), dtype=torch.float32)


_define("query_scores", "(Tensor q_row, Tensor k, float scale, Tensor? bias, Tensor? head_weights, "
        "Tensor? head_values) -> Tensor",
        _qs_fake, "scores", cpu=lambda *args: R.query_scores(*args).float())


def _rs_fake(q, k, scale, bias, valid, lse=None):
    return k.new_empty((k.shape[0], k.shape[2]), dtype=torch.float32)


_define("received_scores", "(Tensor q, Tensor k, float scale, Tensor? bias, Tensor? valid, Tensor? lse=None) -> Tensor",
        _rs_fake, "scores", cpu=lambda q, k, scale, bias, valid, lse=None: R.received_scores(q, k, scale, bias, valid))


# -- ToMe: matching, merged rows, the one-launch step ----------------------------------------------------------
def _bb_fake(metric, valid_b):
    b, n, _ = metric.shape
    na = (n + 1) // 2
    return metric.new_empty((b, na)), metric.new_empty((b, na), dtype=torch.long)


_define("bipartite_best", "(Tensor metric, Tensor? valid_b) -> (Tensor, Tensor)", _bb_fake, "match")


def _mr_fake(x, sizes, prim, members, owner, include_prim):
    return x.new_empty((x.shape[0], prim.shape[1], x.shape[2]))


_define("merge_rows",
        "(Tensor x, Tensor? sizes, Tensor prim, Tensor? members, Tensor? owner, bool include_prim) -> Tensor",
        _mr_fake, "merge")


def _gr_fake(x, rows):
    return x.new_empty((x.shape[0], rows.shape[1], x.shape[2]))


_define("gather_rows", "(Tensor x, Tensor rows) -> Tensor", _gr_fake, "merge")


def _source_out(x, source):
    """A fake's new source map: ``[B, N0]`` long like ``source``, or the None stand-in."""
    return x.new_empty((x.shape[0], source.shape[1]), dtype=torch.long) if source is not None else _none(x)


def _merged_out(x, nout, source):
    """A fake's ``(tokens [B, nout, C], sizes [B, nout] float32, source)``: what every merge step returns."""
    b, _, c = x.shape
    return x.new_empty((b, nout, c)), x.new_empty((b, nout), dtype=torch.float32), _source_out(x, source)


def _ms_pack(out, x, log_sizes):
    return out[0], out[1], _or_none(out[2], x), (out[3] if log_sizes else _none(x))


def _ms_launch(x, metric, sizes, source, num_prefix, r, padded, max_size, log_sizes, residual, perm=None):
    out = _t().merge.merge_step(x, metric, sizes, source, num_prefix, r, padded, max_size, log_sizes, residual, perm)
    return _ms_pack(out, x, log_sizes)


def _ms_cpu(x, metric, sizes, source, num_prefix, r, padded, max_size, log_sizes, residual, perm=None):
    out = R.merge_step(x, metric, sizes, source, num_prefix, r, padded, max_size, log_sizes, residual, perm)
    return _ms_pack(out, x, log_sizes)


def _ms_fake(x, metric, sizes, source, num_prefix, r, padded, max_size, log_sizes, residual, perm=None):
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"merge_step: residual {tuple(residual.shape)} {residual.dtype} does not match "
                         f"the tokens {tuple(x.shape)} {x.dtype}")
    n = x.shape[1] - num_prefix
    nout = num_prefix + (n + 1) // 2 - r + n // 2
    return (*_merged_out(x, nout, source), x.new_empty((x.shape[0], nout)) if log_sizes else _none(x))


_define("merge_step",
        "(Tensor x, Tensor metric, Tensor? sizes, Tensor? source, int num_prefix, int r, bool padded, "
        "int? max_size, bool log_sizes, Tensor? residual, Tensor? perm=None) -> (Tensor, Tensor, Tensor, Tensor)",
        _ms_fake, launch=_ms_launch, cpu=_ms_cpu)


# -- pruning: keep the k best -------------------------------------------------------------------------------
def _ks_pack(out, x):
    return out[0], _or_none(out[1], x), _or_none(out[2], x)


def _ks_fake(x, scores, sizes, source, num_prefix, k):
    b, _, c = x.shape
    return (x.new_empty((b, num_prefix + k, c)),
            sizes.new_empty((b, num_prefix + k)) if sizes is not None else _none(x), _source_out(x, source))


_define("keep_step",
        "(Tensor x, Tensor scores, Tensor? sizes, Tensor? source, int num_prefix, int k) -> (Tensor, Tensor, Tensor)",
        _ks_fake, launch=lambda x, *args: _ks_pack(_t().keep.keep_step(x, *args), x),
        cpu=lambda x, *args: _ks_pack(R.keep_step(x, *args), x))


def _tk_fake(scores, k):
    return scores.new_empty((scores.shape[0], k), dtype=torch.long)


_define("topk_sorted", "(Tensor scores, int k) -> Tensor", _tk_fake, "keep")


# -- ApET ------------------------------------------------------------------------------------------------
def _am_pack(out, x):
    return out[0], out[1], _or_none(out[2], x)


def _am_fake(x, sizes, target, keep_idx, source, num_prefix, max_size):
    return _merged_out(x, num_prefix + keep_idx.shape[1], source)


_define("apet_merge",
        "(Tensor x, Tensor? sizes, Tensor target, Tensor keep_idx, Tensor? source, int num_prefix, int? max_size) "
        "-> (Tensor, Tensor, Tensor)",
        _am_fake, launch=lambda x, *args: _am_pack(_t().apet.apet_merge(x, *args), x),
        cpu=lambda x, *args: _am_pack(R.apet_merge(x, *args), x))


def _ap_fake(x, sizes, source, num_prefix, k, keep, eps, padded, max_size):
    return _merged_out(x, num_prefix + keep, source)


_define("apet_step",
        "(Tensor x, Tensor? sizes, Tensor? source, int num_prefix, int k, int keep, float eps, bool padded, int? max_size) "
        "-> (Tensor, Tensor, Tensor)",
        _ap_fake, launch=lambda x, *args: _am_pack(_t().apet.apet_step(x, *args), x),
        cpu=lambda x, *args: _am_pack(R.apet_step(x, *args), x))


def _ae_fake(x, basis, eps):
    return x.new_empty(x.shape[:2], dtype=torch.float32)


_define("apet_errors", "(Tensor x, Tensor basis, float eps) -> Tensor", _ae_fake, "apet",
        cpu=lambda *args: R.apet_errors(*args).float())


def _gram_fake(x):
    b, n, _ = x.shape
    return x.new_empty((b, n, n), dtype=torch.float32)


_define("gram", "(Tensor x) -> Tensor", _gram_fake, launch=lambda x: _t().apet.gram(x)[0],
        cpu=lambda x: R.gram(x)[0].float())


def _as_fake(g, valid, k, eps):
    b, n, _ = g.shape
    return g.new_empty((b, k), dtype=torch.long), g.new_empty((b, n), dtype=torch.float32)


def _as_cpu(g, valid, k, eps):
    basis, err = R.apet_stage(g, valid, k, eps)
    return basis, err.float()


_define("apet_stage", "(Tensor g, Tensor? valid, int k, float eps) -> (Tensor, Tensor)", _as_fake, "apet", cpu=_as_cpu)


def _aa_fake(g, keep_idx):
    return g.new_empty(g.shape[:2], dtype=torch.long)


_define("apet_assign", "(Tensor g, Tensor keep_idx) -> Tensor", _aa_fake, "apet")


# -- PiToMe ----------------------------------------------------------------------------------------------
def _po_fake(metric, sizes, num_prefix, cand, margin, padded):
    b, t = metric.shape[0], metric.shape[-2]
    return (metric.new_empty((b, t - num_prefix), dtype=torch.float32), metric.new_empty((b, t), dtype=torch.long))


_define("pitome_order", "(Tensor metric, Tensor? sizes, int num_prefix, int cand, float margin, bool padded) "
        "-> (Tensor, Tensor)", _po_fake, "pitome")


def _mm_launch(gram, k, valid, weight):
    """CUDA: the kernel where it runs (kernels on, Triton importable, N fits), else the reference: every compiled
    call of the dispatch takes this op, on any device and with the kernels on or off (the selection has no
    gradient), so it cannot assume the kernel applies."""
    if sys.modules[__package__].kernels_enabled() and _t() and _t().select.max_min_select_fits(gram.shape[1]):
        return _t().select.max_min_select(gram, k, valid, weight)
    return R.max_min_select(gram, k, valid, weight)


def _mm_fake(gram, k, valid, weight):
    return gram.new_empty(gram.shape[:2], dtype=torch.bool)


_define("max_min_select", "(Tensor gram, int k, Tensor? valid, Tensor? weight) -> Tensor", _mm_fake,
        launch=_mm_launch)
