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
import torch

from . import reference as R

OPS: dict = {}  # name -> the CustomOpDef
LAUNCH: dict = {}  # name -> the implementation that runs the Triton launcher (CUDA)
CPU: dict = {}  # name -> the reference implementation (CPU)
FAKE: dict = {}  # name -> the fake (meta) implementation


def _t():
    """The Triton kernel modules (``_t().merge.merge_step``), through the package's resolver (which tests may patch)."""
    from . import _impl
    return _impl()


def _define(name: str, schema: str, launch, cpu, fake):
    op = torch.library.custom_op(f"tokenprune::{name}", launch, mutates_args=(), schema=schema)
    op.register_kernel("cpu", cpu)
    op.register_fake(fake)
    OPS[name], LAUNCH[name], CPU[name], FAKE[name] = op, launch, cpu, fake
    return op


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
def _ea_launch(q, k, v, bias):
    return _t().attention.efficient_attention(q, k, v, bias)


def _ea_cpu(q, k, v, bias):
    return _heads_out(q).copy_(R.efficient_attention(q, k, v, bias))


def _ba_launch(q, k, v, bias):
    return _t().attention.biased_attention(q, k, v, bias)


def _ba_cpu(q, k, v, bias):
    return _heads_out(q).copy_(R.biased_attention(q, k, v, bias))


def _attn_fake(q, k, v, bias):
    return _heads_out(q)


_define("efficient_attention", "(Tensor q, Tensor k, Tensor v, Tensor? bias) -> Tensor",
        _ea_launch, _ea_cpu, _attn_fake)
_define("biased_attention", "(Tensor q, Tensor k, Tensor v, Tensor? bias) -> Tensor",
        _ba_launch, _ba_cpu, _attn_fake)


def _qs_launch(q_row, k, scale, bias, head_weights):
    return _t().scores.query_scores(q_row, k, scale, bias, head_weights)


def _qs_cpu(q_row, k, scale, bias, head_weights):
    return R.query_scores(q_row, k, scale, bias, head_weights).float()


def _qs_fake(q_row, k, scale, bias, head_weights):
    return k.new_empty((k.shape[0], k.shape[2]), dtype=torch.float32)


_define("query_scores", "(Tensor q_row, Tensor k, float scale, Tensor? bias, Tensor? head_weights) -> Tensor",
        _qs_launch, _qs_cpu, _qs_fake)


# -- ToMe: matching, merged rows, the one-launch step ----------------------------------------------------------
def _bb_launch(metric, valid_b):
    best, idx = _t().merge.bipartite_best(metric, valid_b)
    return best, idx


def _bb_cpu(metric, valid_b):
    best, idx = R.bipartite_best(metric, valid_b)
    return best, idx


def _bb_fake(metric, valid_b):
    b, n, _ = metric.shape
    na = (n + 1) // 2
    return metric.new_empty((b, na)), metric.new_empty((b, na), dtype=torch.long)


_define("bipartite_best", "(Tensor metric, Tensor? valid_b) -> (Tensor, Tensor)", _bb_launch, _bb_cpu, _bb_fake)


def _mr_launch(x, sizes, prim, members, owner, include_prim):
    return _t().merge.merge_rows(x, sizes, prim, members, owner, include_prim)


def _mr_cpu(x, sizes, prim, members, owner, include_prim):
    return R.merge_rows(x, sizes, prim, members, owner, include_prim)


def _mr_fake(x, sizes, prim, members, owner, include_prim):
    return x.new_empty((x.shape[0], prim.shape[1], x.shape[2]))


_define("merge_rows",
        "(Tensor x, Tensor? sizes, Tensor prim, Tensor? members, Tensor? owner, bool include_prim) -> Tensor",
        _mr_launch, _mr_cpu, _mr_fake)


def _gr_launch(x, rows):
    return _t().merge.gather_rows(x, rows)


def _gr_cpu(x, rows):
    return R.gather_rows(x, rows)


def _gr_fake(x, rows):
    return x.new_empty((x.shape[0], rows.shape[1], x.shape[2]))


_define("gather_rows", "(Tensor x, Tensor rows) -> Tensor", _gr_launch, _gr_cpu, _gr_fake)


def _ms_pack(out, x, log_sizes):
    return out[0], out[1], _or_none(out[2], x), (out[3] if log_sizes else _none(x))


def _ms_launch(x, metric, sizes, source, num_prefix, r, padded, max_size, log_sizes, residual):
    out = _t().merge.merge_step(x, metric, sizes, source, num_prefix, r, padded, max_size, log_sizes, residual)
    return _ms_pack(out, x, log_sizes)


def _ms_cpu(x, metric, sizes, source, num_prefix, r, padded, max_size, log_sizes, residual):
    out = R.merge_step(x, metric, sizes, source, num_prefix, r, padded, max_size, log_sizes, residual)
    return _ms_pack(out, x, log_sizes)


def _ms_fake(x, metric, sizes, source, num_prefix, r, padded, max_size, log_sizes, residual):
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"merge_step: residual {tuple(residual.shape)} {residual.dtype} does not match "
                         f"the tokens {tuple(x.shape)} {x.dtype}")
    b, t, c = x.shape
    n = t - num_prefix
    nout = num_prefix + (n + 1) // 2 - r + n // 2
    src = x.new_empty((b, source.shape[1]), dtype=torch.long) if source is not None else _none(x)
    return (x.new_empty((b, nout, c)), x.new_empty((b, nout), dtype=torch.float32), src,
            x.new_empty((b, nout)) if log_sizes else _none(x))


_define("merge_step",
        "(Tensor x, Tensor metric, Tensor? sizes, Tensor? source, int num_prefix, int r, bool padded, "
        "int? max_size, bool log_sizes, Tensor? residual) -> (Tensor, Tensor, Tensor, Tensor)",
        _ms_launch, _ms_cpu, _ms_fake)


# -- pruning: keep the k best -------------------------------------------------------------------------------
def _ks_pack(out, x):
    return out[0], _or_none(out[1], x), _or_none(out[2], x)


def _ks_launch(x, scores, sizes, source, num_prefix, k):
    return _ks_pack(_t().keep.keep_step(x, scores, sizes, source, num_prefix, k), x)


def _ks_cpu(x, scores, sizes, source, num_prefix, k):
    return _ks_pack(R.keep_step(x, scores, sizes, source, num_prefix, k), x)


def _ks_fake(x, scores, sizes, source, num_prefix, k):
    b, _, c = x.shape
    return (x.new_empty((b, num_prefix + k, c)),
            sizes.new_empty((b, num_prefix + k)) if sizes is not None else _none(x),
            x.new_empty((b, source.shape[1]), dtype=torch.long) if source is not None else _none(x))


_define("keep_step",
        "(Tensor x, Tensor scores, Tensor? sizes, Tensor? source, int num_prefix, int k) -> (Tensor, Tensor, Tensor)",
        _ks_launch, _ks_cpu, _ks_fake)


def _tk_launch(scores, k):
    return _t().keep.topk_sorted(scores, k)


def _tk_cpu(scores, k):
    return R.topk_sorted(scores, k)


def _tk_fake(scores, k):
    return scores.new_empty((scores.shape[0], k), dtype=torch.long)


_define("topk_sorted", "(Tensor scores, int k) -> Tensor", _tk_launch, _tk_cpu, _tk_fake)


# -- ApET ------------------------------------------------------------------------------------------------
def _am_pack(out, x):
    return out[0], out[1], _or_none(out[2], x)


def _am_launch(x, sizes, target, keep_idx, source, num_prefix, max_size):
    return _am_pack(_t().apet.apet_merge(x, sizes, target, keep_idx, source, num_prefix, max_size), x)


def _am_cpu(x, sizes, target, keep_idx, source, num_prefix, max_size):
    return _am_pack(R.apet_merge(x, sizes, target, keep_idx, source, num_prefix, max_size), x)


def _am_fake(x, sizes, target, keep_idx, source, num_prefix, max_size):
    b, _, c = x.shape
    nout = num_prefix + keep_idx.shape[1]
    return (x.new_empty((b, nout, c)), x.new_empty((b, nout), dtype=torch.float32),
            x.new_empty((b, source.shape[1]), dtype=torch.long) if source is not None else _none(x))


_define("apet_merge",
        "(Tensor x, Tensor? sizes, Tensor target, Tensor keep_idx, Tensor? source, int num_prefix, int? max_size) "
        "-> (Tensor, Tensor, Tensor)",
        _am_launch, _am_cpu, _am_fake)


def _ae_launch(x, basis, eps):
    return _t().apet.apet_errors(x, basis, eps)


def _ae_cpu(x, basis, eps):
    return R.apet_errors(x, basis, eps).float()


def _ae_fake(x, basis, eps):
    return x.new_empty(x.shape[:2], dtype=torch.float32)


_define("apet_errors", "(Tensor x, Tensor basis, float eps) -> Tensor", _ae_launch, _ae_cpu, _ae_fake)


def _gram_launch(x):
    return _t().apet.gram(x)[0]


def _gram_cpu(x):
    return R.gram(x)[0].float()


def _gram_fake(x):
    b, n, _ = x.shape
    return x.new_empty((b, n, n), dtype=torch.float32)


_define("gram", "(Tensor x) -> Tensor", _gram_launch, _gram_cpu, _gram_fake)


def _as_launch(g, valid, k, eps):
    basis, err = _t().apet.apet_stage(g, valid, k, eps)
    return basis, err


def _as_cpu(g, valid, k, eps):
    basis, err = R.apet_stage(g, valid, k, eps)
    return basis, err.float()


def _as_fake(g, valid, k, eps):
    b, n, _ = g.shape
    return g.new_empty((b, k), dtype=torch.long), g.new_empty((b, n), dtype=torch.float32)


_define("apet_stage", "(Tensor g, Tensor? valid, int k, float eps) -> (Tensor, Tensor)", _as_launch, _as_cpu, _as_fake)


def _aa_launch(g, keep_idx):
    return _t().apet.apet_assign(g, keep_idx)


def _aa_cpu(g, keep_idx):
    return R.apet_assign(g, keep_idx)


def _aa_fake(g, keep_idx):
    return g.new_empty(g.shape[:2], dtype=torch.long)


_define("apet_assign", "(Tensor g, Tensor keep_idx) -> Tensor", _aa_launch, _aa_cpu, _aa_fake)
