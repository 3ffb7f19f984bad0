"""PyTorch references of the fused kernels: the one PyTorch implementation of each op, the CPU path (and the
path with autograd) of the dispatch functions in ``__init__.py``, and the oracle in tests.

Each function computes exactly what its Triton twin in the family modules (``attention.py``, ``scores.py``,
``merge.py``, ``keep.py``, ``apet.py``, ``pitome.py``, ``select.py``) computes (same arguments, same output shapes
and dtypes), with plain tensor operations and float32 arithmetic. The reducers and ``ops`` call the dispatch
functions, never a PyTorch copy of their own.
"""
from __future__ import annotations

import torch


def biased_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention with an additive per-key bias ``[B, 1, 1, N]`` (log sizes; ``-inf`` = masked
    key): exactly what SDPA computes with ``attn_mask=bias`` (scale ``1/sqrt(d)``)."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def efficient_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Linear-cost attention (softmax-feature factorisation), ``[B, H, N, d]`` in and out (MAELRE).

    ``out = softmax_d(q) @ (softmax_N(k + bias)^T v)``: the token softmax of the
    keys runs per feature column over the N tokens; ``bias`` ``[B, 1, 1, N]``
    (log sizes, ``-inf`` = masked key) is added to every column of the keys
    before it. A column whose keys are all masked gives a zero context row (not
    NaN). Float32 arithmetic (float64 for float64 inputs), the result in ``q``'s dtype; never forms an
    ``N x N`` matrix.
    """
    ct = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = q.to(ct), k.to(ct), v.to(ct)
    if bias is not None:
        kf = kf + bias.to(ct)[:, :, 0, :, None]  # [B, 1, N, 1]
    m = kf.detach().amax(2, keepdim=True)  # a shift per column: the softmax does not change, no gradient through it
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # every key masked: exp(-inf) = 0, a zero row
    e = (kf - m).exp()  # [B, H, N, d]
    denom = e.sum(2)  # [B, H, d]
    ctx = e.transpose(-1, -2) @ vf  # [B, H, d, d]
    ctx = ctx / denom.clamp_min(1e-30)[..., None]
    out = qf.softmax(-1) @ ctx
    return out.to(q.dtype)


def query_scores(q_row: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None = None,
                 head_weights: torch.Tensor | None = None, head_values: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query row per head ``q_row [B, H, d]`` over keys ``k [B, H, N, d]``, mean over heads, or
    weighted by ``head_weights`` (broadcast to ``[B, H, N]``), or by each token's head importance from the heads'
    attention outputs ``head_values [B, H, N, dv]``: ``sum_h |o_h| a_h / max(sum_h |o_h|, 1e-12)`` (Adaptive Sparse
    ViT; the kernel reads ``o`` itself, so the norms and their normalisation are no extra launches). ``[B, N]``
    float32."""
    if head_weights is not None and head_values is not None:
        raise ValueError("query_scores: give head_weights or head_values, not both")
    logits = torch.einsum("bhd,bhnd->bhn", q_row.float(), k.float()) * scale
    if bias is not None:
        logits = logits + bias[:, :, 0].float()
    attn = logits.softmax(-1)
    if head_values is not None:
        norms = torch.linalg.vector_norm(head_values, dim=-1, dtype=torch.promote_types(head_values.dtype, attn.dtype))
        return (attn * norms).sum(1) / norms.sum(1).clamp_min(1e-12)
    if head_weights is not None:
        return (attn * head_weights).sum(1)
    return attn.mean(1)


def received_scores(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None = None,
                    valid: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """The attention each key receives, averaged over the queries and the heads: ``q, k [B, H, N, d]`` ->
    ``[B, N]`` float32 (float64 for float64 inputs: near ties between tokens are then ranked as the model's own
    float64 attention ranks them). ``bias`` an additive key bias broadcast to ``[B, 1, 1, N]`` (log sizes, ``-inf`` =
    masked key); ``valid [B, N]`` False leaves a query out (padding). Computed in query chunks, so at most
    ``[B, H, chunk, N]`` exists at a time (the kernel keeps no N x N tile in memory at all)."""
    b, h, n, _ = q.shape
    ct = torch.promote_types(q.dtype, torch.float32)
    total = torch.zeros(b, h, n, dtype=ct, device=q.device)
    kf = k.to(ct)
    for s in range(0, n, chunk):
        logits = torch.einsum("bhqd,bhnd->bhqn", q[:, :, s:s + chunk].to(ct), kf) * scale
        if bias is not None:
            logits = logits + bias.to(ct)
        a = logits.softmax(-1)
        if valid is not None:
            a = a * valid[:, None, s:s + chunk, None]
        total += a.sum(2)
    count = valid.sum(1).clamp(min=1)[:, None, None] if valid is not None else n
    return (total / count).mean(1)


def key_mean(k: torch.Tensor) -> torch.Tensor:
    """The keys ``[B, H, N, d]`` averaged over heads, ``[B, N, d]`` in their dtype: ToMe's matching metric
    (``merge_step`` and ``ops.bipartite_merge`` take the keys themselves; the merge kernels average while loading)."""
    return k.mean(1)


def bipartite_best(metric: torch.Tensor, valid_b: torch.Tensor | None = None):
    """Best B partner of every A token (ToMe's matching), ``metric [B, N, d]`` over the non-prefix tokens.

    A = even tokens, B = odd tokens, cosine similarity computed in the metric's
    dtype (as ``ops.bipartite_merge`` always did). ``valid_b [B, Nb]`` False
    excludes a B token (padding). Returns ``(best [B, Na] metric dtype, best_b [B, Na] long)``.
    """
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    ma, mb = m[:, ::2], m[:, 1::2]
    sim = ma @ mb.transpose(-1, -2)
    if valid_b is not None:
        sim = sim.masked_fill(~valid_b[:, None, :], float("-inf"))
    return sim.max(-1)


def merge_rows(x: torch.Tensor, sizes: torch.Tensor | None, prim: torch.Tensor, members: torch.Tensor | None = None,
               owner: torch.Tensor | None = None, include_prim: bool = True) -> torch.Tensor:
    """Build merged tokens row by row (the scatter half of bipartite merging).

    ``out[b, o]`` is the size-weighted mean of token ``x[b, prim[b, o]]`` and of every
    token ``x[b, members[b, i]]`` with ``owner[b, i] == o``. Rows nothing is merged
    into copy ``x[b, prim[b, o]]``; so does a row whose sizes sum to 0 (padding).
    ``sizes`` ``[B, T]`` (None = all ones); indices are long. Accumulates in float32 (float64 inputs: float64).
    ``include_prim=False``: rows with members are the mean of their members only
    (``prim`` is then just the fallback row). No members: a plain row gather.
    """
    b, n_out = prim.shape
    c = x.shape[-1]
    ct = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64
    xf = x.to(ct)
    s = sizes.to(ct) if sizes is not None else torch.ones(x.shape[:2], device=x.device, dtype=ct)
    prim_x = xf.gather(1, prim[..., None].expand(b, n_out, c))
    tot = s.gather(1, prim) if include_prim else torch.zeros((b, n_out), device=x.device, dtype=s.dtype)
    acc = prim_x * tot[..., None]
    count = torch.zeros((b, n_out), device=x.device, dtype=s.dtype)
    r = 0 if members is None else members.shape[1]
    if r:
        sm = s.gather(1, members)
        contrib = xf.gather(1, members[..., None].expand(b, r, c)) * sm[..., None]
        acc = acc.scatter_add(1, owner[..., None].expand(b, r, c), contrib)
        tot = tot.scatter_add(1, owner, sm)
        count = count.scatter_add(1, owner, torch.ones_like(sm))
    merged = (count > 0) & (tot > 0)
    out = torch.where(merged[..., None], acc / tot.clamp_min(1e-30)[..., None], prim_x)
    return out.to(x.dtype)


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[b, o] = x[b, rows[b, o]]``."""
    return x.gather(1, rows[..., None].expand(*rows.shape, x.shape[-1]))


def apet_errors(x: torch.Tensor, basis: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Least-squares reconstruction error of every token from a small basis, float32.

    ``x [B, N, C]``, ``basis [B, k, C]``: ``G = S S^T + eps I``, coefficients
    ``c_i = G^-1 S x_i``, ``e_i = ||x_i - S^T c_i||``. Returns ``[B, N]``.
    """
    if torch.is_autocast_enabled(x.device.type):  # float32 throughout: autocast would hand LU half precision
        with torch.autocast(x.device.type, enabled=False):
            return apet_errors(x, basis, eps)
    xf, s = x.float(), basis.float()
    g = s @ s.transpose(-1, -2)
    g = g + eps * torch.eye(g.shape[-1], device=g.device, dtype=g.dtype)
    t = xf @ s.transpose(-1, -2)  # [B, N, k]
    coef = torch.linalg.solve_ex(g, t.transpose(-1, -2))[0].transpose(-1, -2)
    return (xf - coef @ s).norm(dim=-1)


def gram(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Gram matrix ``G = X X^T`` ``[B, N, N]`` of ``x [B, N, C]`` and its diagonal ``sq [B, N]``
    (squared token norms, a view of ``G``). Float32 (float64 for a float64 ``x``)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    g = xf @ xf.transpose(-1, -2)
    return g, g.diagonal(dim1=-2, dim2=-1)


def apet_stage(g: torch.Tensor, valid: torch.Tensor | None, k: int, eps: float = 1e-5):
    """ApET's basis and errors from the Gram matrix ``g [B, N, N]`` alone (no token features).

    Farthest-point sampling as ``reducers.apet.farthest_point_basis``, with every distance
    written through ``G``: first point = the valid token farthest from the mean of the valid
    tokens, ``sq_i - 2/n_v sum_j G_ij + 1/n_v^2 sum_jk G_jk`` (valid j, k); then repeatedly the
    valid, not yet chosen token farthest from the chosen set, ``min_c sq_i - 2 G_ic + sq_c``
    (argmax ties: the lowest index). Then the ridge least-squares error of every token from the k
    basis tokens: ``G_S = G[S][:, S] + eps I``, ``b_i = G[i, S]``, ``c_i = G_S^-1 b_i``,
    ``e_i^2 = sq_i - 2 c_i.b_i + c_i^T (G_S - eps I) c_i`` (= ``||x_i - c_i S||^2``).
    ``valid [B, N]`` bool (None: all valid). Returns ``(basis [B, k] long, err [B, N])`` in
    ``g``'s precision (at least float32).
    """
    g = g.to(torch.promote_types(g.dtype, torch.float32))
    b, n, _ = g.shape
    sq = g.diagonal(dim1=-2, dim2=-1)
    v = torch.ones(b, n, dtype=torch.bool, device=g.device) if valid is None else valid.bool()
    w = v.to(g.dtype)
    nv = w.sum(1).clamp_min(1)
    r = (g * w[:, None, :]).sum(-1)  # [B, N]: sum over the valid j of G_ij
    s = (r * w).sum(1)
    dist = (sq - 2 * r / nv[:, None] + (s / nv ** 2)[:, None]).masked_fill(~v, float("-inf"))
    rows = torch.arange(b, device=g.device)
    chosen = torch.empty(b, k, dtype=torch.long, device=g.device)
    for j in range(k):
        i = dist.argmax(1)
        chosen[:, j] = i
        d = sq - 2 * g[rows, i] + sq[rows, i][:, None]
        dist = d if j == 0 else torch.minimum(dist, d)
        dist = dist.masked_fill(~v, float("-inf")).scatter(1, chosen[:, :j + 1], float("-inf"))
    bm = g.gather(2, chosen[:, None, :].expand(b, n, k))  # [B, N, k]: b_i = G[i, S]
    g0 = bm.gather(1, chosen[..., None].expand(b, k, k))  # [B, k, k]: G[S][:, S]
    gs = g0 + eps * torch.eye(k, device=g.device, dtype=g.dtype)
    c = torch.linalg.solve_ex(gs, bm.transpose(1, 2))[0].transpose(1, 2)  # [B, N, k]
    e2 = sq - 2 * (c * bm).sum(-1) + ((c @ g0) * c).sum(-1)
    return chosen, e2.clamp_min(0).sqrt()


def apet_assign(g: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """Slot ``[B, N]`` long of the most cosine-similar kept token of every token, from ``g [B, N, N]``.

    ``cos_ij = G_ij / (max(|x_i|, 1e-6) max(|x_j|, 1e-6))`` at the kept columns ``keep_idx [B, K]``,
    argmax over the K slots (ties: the lowest slot); a kept token maps to its own slot.
    """
    b, n, _ = g.shape
    kk = keep_idx.shape[1]
    inv = 1 / g.diagonal(dim1=-2, dim2=-1).sqrt().clamp_min(1e-6)  # [B, N]
    cos = g.gather(2, keep_idx[:, None, :].expand(b, n, kk)) * inv[..., None] * inv.gather(1, keep_idx)[:, None, :]
    target = cos.argmax(-1)
    return target.scatter(1, keep_idx, torch.arange(kk, device=g.device).expand(b, kk))


# -- PiToMe: energy and the order of the merge step ----------------------------------------------------
def pitome_energy(metric: torch.Tensor, margin: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """PiToMe's energy ``E`` ``[B, N]`` float32 of features ``metric`` ``[B, N, d]`` (Tran et al., NeurIPS 2024):

        c_ij = cos(m_i, m_j)
        f(c) = c if c >= margin, else exp(c - margin) - 1
        E_i  = mean over the valid j != i of f(c_ij)

    ``valid [B, N]`` bool marks real tokens (None: all); a padding token's energy is ``+inf`` (merged first).
    Rows are scaled to unit norm (norm clamped at 1e-6, as in the matching); float32 arithmetic (float64 for
    float64 input), the whole ``[B, N, N]`` matrix formed."""
    m = metric.to(torch.promote_types(metric.dtype, torch.float32))
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    c = m @ m.transpose(-1, -2)
    f = torch.where(c >= margin, c, torch.exp(c - margin) - 1.0)
    b, n, _ = c.shape
    pair = ~torch.eye(n, dtype=torch.bool, device=c.device).expand(b, n, n)  # j != i
    if valid is not None:
        pair = pair & valid[:, None, :]
    e = (f * pair).sum(-1) / pair.sum(-1).clamp_min(1)
    if valid is not None:
        e = e.masked_fill(~valid, float("inf"))
    return e.to(torch.promote_types(metric.dtype, torch.float32))


def pitome_order(metric: torch.Tensor, sizes: torch.Tensor | None, p: int, cand: int, margin: float,
                 padded: bool):
    """The energies and the row order of one PiToMe step (``reducers.pitome``), over the non-prefix tokens of
    ``metric`` ``[B, P + N, d]``: ``(energy [B, N] float32, perm [B, P + N] long)``; :func:`pitome_energy`
    (``sizes`` 0 is padding when ``padded``), then :func:`pitome_perm`. ``metric`` may be a block's keys
    ``[B, H, P + N, d]``: their :func:`key_mean`."""
    if metric.dim() == 4:
        metric = key_mean(metric)
    valid = (sizes[:, p:] > 0) if padded and sizes is not None else None
    e = pitome_energy(metric[:, p:], margin, valid).float()
    return e, pitome_perm(e, p, cand)


def pitome_perm(energy: torch.Tensor, p: int, cand: int) -> torch.Tensor:
    """The row order ``[B, P + N]`` long of a PiToMe step from the energies ``[B, N]`` of the non-prefix tokens.

    Tokens are ranked by energy, highest first (ties: the lower index). The ``cand`` first are the merge
    candidates: even ranks form A, odd ranks B. The order lists the rows for :func:`merge_step` with
    ``p + N - cand`` kept prefix rows: the prefix, the protected tokens (ranks ``>= cand``) in spatial order,
    then the candidates alternating A, B, A, B, ... with A in spatial order and B in energy order
    (``perm[b, v]`` is the row that goes to place ``v``)."""
    b, n = energy.shape
    dev = energy.device
    order = energy.sort(dim=-1, descending=True, stable=True).indices  # energy rank -> token
    ab = torch.empty((b, cand), dtype=torch.long, device=dev)
    ab[:, 0::2], ab[:, 1::2] = order[:, 0:cand:2].sort(-1).values, order[:, 1:cand:2]
    return torch.cat([torch.arange(p, device=dev).expand(b, p), p + order[:, cand:].sort(-1).values, p + ab], 1)


# -- the one-launch steps: their PyTorch specification (the CPU implementation of the custom ops) --------
def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[B, k]`` of the ``k`` best scores per row, ascending; ties go to the lower index (as in the
    kernel, which ranks by (score desc, index asc) in float32)."""
    best = scores.float().sort(dim=1, descending=True, stable=True).indices[:, :k]
    return best.sort(1).values


def compose_source(source: torch.Tensor | None, old_to_new: torch.Tensor) -> torch.Tensor | None:
    """The source map after one step: ``old_to_new[source]`` (``old_to_new`` ``[B, P + N_old]``, each old token's new
    index or -1 where it was dropped); ``-1`` stays ``-1``."""
    if source is None:
        return None
    return old_to_new.gather(1, source.clamp(min=0)).masked_fill(source < 0, -1)


def keep_step(x: torch.Tensor, scores: torch.Tensor, sizes: torch.Tensor | None, source: torch.Tensor | None,
              p: int, k: int):
    """Keep the prefix and the ``k`` best-scored non-prefix tokens (``scores [B, N]``) in spatial order, with
    their sizes and the composed source map: ``(x [B, P + k, C], sizes | None, source | None, idx [B, k])``."""
    b, t, _ = x.shape
    idx = topk_sorted(scores, k)
    rows = torch.cat([torch.arange(p, device=x.device).expand(b, p), idx + p], 1)
    new_sizes = sizes.gather(1, rows) if sizes is not None else None
    old_to_new = torch.full((b, t), -1, dtype=torch.long, device=x.device)
    old_to_new.scatter_(1, rows, torch.arange(p + k, device=x.device).expand(b, p + k))
    return gather_rows(x, rows), new_sizes, compose_source(source, old_to_new), idx


def inverse_order(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` ``[B, T]`` with ``inv[b, perm[b, v]] = v``: the inverse of a per-sample row permutation."""
    b, t = perm.shape
    return torch.empty_like(perm).scatter_(1, perm, torch.arange(t, device=perm.device).expand(b, t))


def permute_rows(perm: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor | None:
    """``x[b, perm[b, v]]`` for every row ``v`` of ``x`` ``[B, T]`` or ``[B, T, C]`` (None stays None)."""
    if x is None:
        return None
    return x.gather(1, perm) if x.dim() == 2 else gather_rows(x, perm)


def merge_step(x: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor | None, source: torch.Tensor | None,
               p: int, r: int, padded: bool, max_size: int | None = None, log_sizes: bool = False,
               residual: torch.Tensor | None = None, perm: torch.Tensor | None = None, best=None, rows=None):
    """ToMe's whole merge step (``ops.bipartite_merge``) on plain tensors: A = even, B = odd non-prefix
    tokens; the ``r`` A tokens with the most similar B partner (ties: the lower index; padding A tokens,
    size 0, first when ``padded``) are merged into it, size-weighted; output rows: prefix, kept A tokens
    (spatial order), B tokens. Returns ``(x, sizes float32, source | None)`` and, with ``log_sizes``,
    ``log(sizes)`` in ``x``'s dtype. ``residual``: the tokens are ``x + residual`` rounded to ``x``'s dtype.
    ``max_size`` only lets the kernel choose exact low-precision products; the result does not depend on it.
    ``perm`` ``[B, T]`` long (a permutation of each sample's rows): the step runs on the rows in that order
    (``x[b, perm[b, v]]`` is row ``v``; sizes, metric and residual alike, the source map follows), so its
    first ``p`` rows are the kept prefix and the rest alternate into A and B (``pitome``'s protected tokens
    and energy-ranked candidates). ``metric`` may be a block's keys ``[B, H, T, d]``: their :func:`key_mean`.
    ``best`` / ``rows``: the matching and the row merge to use (default: this module's :func:`bipartite_best` and
    :func:`merge_rows`; ``ops.bipartite_merge`` passes the kernels' dispatching ones where the one-launch step does
    not fit)."""
    best_fn, rows_fn = best or bipartite_best, rows or merge_rows
    if metric.dim() == 4:
        metric = key_mean(metric)
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"merge_step: residual {tuple(residual.shape)} {residual.dtype} does not match "
                             f"the tokens {tuple(x.shape)} {x.dtype}")
        ct = torch.promote_types(x.dtype, torch.float32)
        x = (x.to(ct) + residual.to(ct)).to(x.dtype)
    if perm is not None:
        x, metric, sizes = permute_rows(perm, x), permute_rows(perm, metric), permute_rows(perm, sizes)
        source = compose_source(source, inverse_order(perm))
    b, t, _ = x.shape
    dev = x.device
    s = sizes.float() if sizes is not None else torch.ones((b, t), dtype=torch.float32, device=dev)
    sa, sb = s[:, p::2], s[:, p + 1::2]
    na, nb = sa.shape[1], sb.shape[1]
    best, best_b = best_fn(metric[:, p:], (sb > 0) if padded else None)
    best = best.to(torch.promote_types(best.dtype, torch.float32))
    if padded:
        best = best.masked_fill(sa <= 0, float("inf"))
    edge = best.sort(dim=-1, descending=True, stable=True).indices
    src_idx, unm_idx = edge[:, :r], edge[:, r:].sort(-1).values
    dst_idx = best_b.gather(1, src_idx)
    n_unm = na - r
    prim = torch.cat([torch.arange(p, device=dev).expand(b, p), p + 2 * unm_idx,
                      (p + 1 + 2 * torch.arange(nb, device=dev)).expand(b, nb)], 1)
    new_x = rows_fn(x, sizes, prim, p + 2 * src_idx, p + n_unm + dst_idx)
    new_sb = sb.scatter_add(1, dst_idx, sa.gather(1, src_idx))
    new_sizes = torch.cat([s[:, :p], sa.gather(1, unm_idx), new_sb], 1)
    new_source = None
    if source is not None:
        a_new = torch.empty((b, na), dtype=torch.long, device=dev)
        a_new.scatter_(1, unm_idx, torch.arange(p, p + n_unm, device=dev).expand(b, n_unm))
        a_new.scatter_(1, src_idx, p + n_unm + dst_idx)
        old_to_new = torch.empty((b, t), dtype=torch.long, device=dev)
        old_to_new[:, :p] = torch.arange(p, device=dev)
        old_to_new[:, p::2] = a_new
        old_to_new[:, p + 1::2] = torch.arange(p + n_unm, p + n_unm + nb, device=dev)
        new_source = compose_source(source, old_to_new)
    if log_sizes:
        return new_x, new_sizes, new_source, new_sizes.log().to(x.dtype)
    return new_x, new_sizes, new_source


def apet_merge(x: torch.Tensor, sizes: torch.Tensor | None, target: torch.Tensor, keep_idx: torch.Tensor,
               source: torch.Tensor | None, p: int, max_size: int | None = None):
    """ApET's merge (the PyTorch path of ``Apet.reduce``): kept slot ``j`` becomes the size-weighted mean
    of the non-prefix tokens with ``target == j`` (its own kept token where those sizes sum to 0).
    Returns ``(x [B, P + K, C], sizes [B, P + K] float32, source | None)``; ``max_size`` as in
    :func:`merge_step`."""
    b, t, c = x.shape
    n, k = t - p, keep_idx.shape[1]
    s = sizes.float() if sizes is not None else torch.ones((b, t), dtype=torch.float32, device=x.device)
    xs, sn = x[:, p:].float(), s[:, p:]
    den = torch.zeros((b, k), dtype=torch.float32, device=x.device).scatter_add(1, target, sn)
    num = torch.zeros((b, k, c), dtype=torch.float32, device=x.device).scatter_add(
        1, target[..., None].expand(b, n, c), xs * sn[..., None])
    kept = xs.gather(1, keep_idx[..., None].expand(b, k, c))
    merged = torch.where(den[..., None] > 0, num / den.clamp_min(1e-30)[..., None], kept).to(x.dtype)
    new_x = torch.cat([x[:, :p], merged], 1)
    old_to_new = torch.cat([torch.arange(p, device=x.device).expand(b, p), target + p], 1)
    return new_x, torch.cat([s[:, :p], den], 1), compose_source(source, old_to_new)


def apet_step(x: torch.Tensor, sizes: torch.Tensor | None, source: torch.Tensor | None, p: int, k: int, keep: int,
              eps: float = 1e-5, padded: bool = False, max_size: int | None = None):
    """One ApET stage from the Gram matrix (``Apet.reduce``'s GPU path, which ``kernels.apet_step`` runs in four
    launches): :func:`gram` of the non-prefix tokens, :func:`apet_stage` (padding slots, size 0 with ``padded``,
    masked), selection scores = the errors with padding at -inf and the basis at +inf, the ``keep`` best
    (:func:`topk_sorted`), :func:`apet_assign`, :func:`apet_merge`. Returns ``(x, sizes float32, source | None)``."""
    g = gram(x[:, p:])[0]
    valid = sizes[:, p:] > 0 if padded and sizes is not None else None
    basis, err = apet_stage(g, valid, k, eps)
    if valid is not None:
        err = err.masked_fill(~valid, float("-inf"))
    keep_idx = topk_sorted(err.scatter(1, basis, float("inf")), keep)
    return apet_merge(x, sizes, apet_assign(g, keep_idx), keep_idx, source, p, max_size)


def cosine_distance(gram: torch.Tensor) -> torch.Tensor:
    """``1 - cos(f_i, f_j)`` ``[B, N, N]`` from the features' Gram matrix ``gram = F F^T`` (float32):
    ``1 - (G_ij r_i) r_j`` with ``r_i = 1 / max(sqrt(G_ii), 1e-12)`` (``F.normalize``'s eps), in this order of
    operations, which ``select._max_min`` repeats bit for bit."""
    r = 1.0 / gram.diagonal(dim1=-2, dim2=-1).sqrt().clamp_min(1e-12)
    return 1.0 - (gram * r[..., :, None]) * r[..., None, :]


def max_min_select(gram: torch.Tensor, k: int, valid: torch.Tensor | None = None,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy max-min diversity (DivPrune; ``reducers/diverse.py``): ``[B, N]`` bool, ``k`` tokens chosen per row
    (fewer real ones where a row has fewer ``valid`` tokens), with the cosine distances of the features whose Gram
    matrix is ``gram`` ``[B, N, N]`` float32 (:func:`cosine_distance`); ``weight`` ``[B, N]`` multiplies each
    candidate's distance to the chosen set (conditioning). The first pick is the token whose nearest other valid
    token is farthest (a lone token counts 1), then each step the candidate farthest from the chosen set (ties: the
    lower index); the chosen set's distance to every token is the only state carried between steps."""
    dist = cosine_distance(gram)
    b, n, _ = dist.shape
    eye = torch.eye(n, dtype=torch.bool, device=dist.device)
    d = dist.masked_fill(eye, float("inf"))
    if valid is not None:  # padding slots are neither neighbours nor candidates
        d = d.masked_fill(~valid[:, None, :], float("inf"))
    blocked = torch.zeros(b, n, dtype=torch.bool, device=dist.device) if valid is None else ~valid
    nearest = d.min(-1).values  # first pick: the token whose nearest other token is farthest
    nearest = torch.where(torch.isinf(nearest), torch.ones_like(nearest), nearest)  # a lone token: distance 1
    taken = blocked.clone()  # chosen or padding: never a candidate (five ops a step: the loop runs k times)
    for step in range(k):
        score = nearest if weight is None else nearest * weight
        pick = score.masked_fill(taken, float("-inf")).argmax(-1, keepdim=True)  # [B, 1]
        taken.scatter_(1, pick, True)  # (a row with no candidate left picks index 0: chosen or padding already)
        row = dist.gather(1, pick[..., None].expand(b, 1, n))[:, 0]  # distance of the new pick to every token
        nearest = row if step == 0 else torch.minimum(nearest, row)
    return taken & ~blocked
