"""Functional core shared by the reducers: selection, merging, scores, un-merging.

Every function takes and returns plain tensors or a :class:`TokenState`; none
imports a model library. Index conventions: ``keep_idx`` and friends index the
*non-prefix* tokens (0 .. N-1); ``TokenState.source`` indexes all tokens
(prefix included).
"""
from __future__ import annotations

import torch

from . import kernels
from .state import TokenState


# -- source map bookkeeping -------------------------------------------------------
remap_source = kernels.reference.compose_source  # the source map composed with one reduction step


def prefix_map(b: int, p: int, device) -> torch.Tensor:
    return torch.arange(p, device=device).expand(b, p)


# -- pruning: keep a subset ---------------------------------------------------------
def gather_tokens(state: TokenState, keep_idx: torch.Tensor, keep_valid: torch.Tensor | None = None) -> TokenState:
    """Keep the non-prefix tokens ``keep_idx`` ``[B, K]`` (in the given order).

    ``keep_valid`` ``[B, K]`` bool marks slots that are padding (False): the
    sample really keeps fewer tokens; those slots get size 0, so attention
    masks them and pooling ignores them.
    """
    x, p = state.x, state.num_prefix
    b, n_all = x.shape[:2]
    k = keep_idx.shape[1]
    new_x = kernels.gather_rows(x, torch.cat([prefix_map(b, p, x.device), keep_idx + p], 1))  # prefix and kept rows

    new_sizes = None
    if state.sizes is not None or keep_valid is not None:
        sizes = state.sizes_or_ones()
        kept = sizes[:, p:].gather(1, keep_idx)
        if keep_valid is not None:
            kept = kept * keep_valid.to(kept.dtype)
        new_sizes = torch.cat([sizes[:, :p], kept], 1)

    new_source = None
    if state.source is not None:
        targets = torch.arange(p, p + k, device=x.device).expand(b, k)
        if keep_valid is not None:
            targets = targets.masked_fill(~keep_valid, -1)
        old_to_new = torch.full((b, n_all), -1, dtype=torch.long, device=x.device)
        old_to_new[:, :p] = prefix_map(b, p, x.device)
        old_to_new[:, p:].scatter_(1, keep_idx, targets)
        new_source = remap_source(state.source, old_to_new)

    state.x, state.sizes, state.source = new_x, new_sizes, new_source
    state.padded = state.padded or keep_valid is not None
    return state


def keep_top(state: TokenState, scores: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> TokenState:
    """Keep the ``k`` best-scored non-prefix tokens (``scores [B, N]``) in spatial order:
    :func:`topk_sorted` then :func:`gather_tokens`; on CUDA without padding, one kernel launch. ``scores`` may be a
    bool selection with exactly ``k`` True per row (among the valid tokens): then nothing is ranked on CUDA."""
    if valid is None and kernels.use_triton(state.x, scores) and kernels.keep_step_fits(scores.shape[1]):
        state.x, state.sizes, state.source = kernels.keep_step(state.x, scores, state.sizes, state.source,
                                                               state.num_prefix, k)
        return state
    idx, ok = topk_sorted(scores.float() if scores.dtype == torch.bool else scores, k, valid)
    return gather_tokens(state, idx, ok)


def topk_sorted(scores: torch.Tensor, k: int, valid: torch.Tensor | None = None):
    """Indices of the ``k`` best scores per row, in ascending (spatial) order.

    Returns ``(idx [B, k], idx_valid [B, k] | None)``; padding slots never win
    over real tokens.
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    idx = kernels.topk_sorted(scores, k)
    return idx, (valid.gather(1, idx) if valid is not None else None)


def _width_depends_on_data() -> None:
    """Refuse torch.export and ``fullgraph=True``, or break the graph (torch.compile), before a selection whose
    output width depends on the data (a score threshold)."""
    exporting = torch.compiler.is_exporting()
    if exporting and not torch.compiler.is_dynamo_compiling():  # torch.export's default (non-strict): no Dynamo
        raise RuntimeError("tokenprune: torch.export cannot record this reducer: the number of tokens it keeps "
                           "depends on the data (a score threshold). Export a method with a fixed count (e.g. "
                           "method='cls' without threshold=), use torch.compile, or export after "
                           "tokenprune.remove(model)")
    if torch.compiler.is_compiling():
        if exporting:  # strict export, or any torch.compile on torch 2.11 (its Dynamo answers True there): one message
            raise RuntimeError("tokenprune: torch.compile(fullgraph=True) and torch.export cannot trace this reducer "
                               "whole: the number of tokens it keeps depends on the data (a score threshold). Compile "
                               "it without fullgraph=True (a graph break here), or use a method with a fixed count "
                               "(e.g. method='cls' without threshold=), which also exports")
        # the documented break; its message is fullgraph=True's error
        torch._dynamo.graph_break(msg="tokenprune: torch.compile(fullgraph=True) cannot trace this reducer without a "
                                  "graph break: the number of tokens it keeps depends on the data (a score "
                                  "threshold). Compile it without fullgraph=True, or use a method with a fixed count "
                                  "(e.g. method='cls' without threshold=)")


def keep_above(state: TokenState, scores: torch.Tensor, threshold, k_max: int,
               valid: torch.Tensor | None = None) -> tuple[TokenState, torch.Tensor]:
    """Keep, per sample, the non-prefix tokens with ``score > threshold``: at most ``k_max`` (the best) and at least
    one, in spatial order. Returns the new state and each sample's kept count ``[B]`` (float32). Samples that keep
    different counts are padded to the largest (rectangular), the padding slots at size 0, so attention masks them
    and pooling ignores them. The counts are read on the host once (one sync: the output width depends on them). When
    every sample keeps the same count (always at batch 1) no slot is padding, so no mask follows the tokens; without
    earlier padding that is :func:`keep_top` of that count. At batch 1 on CUDA the count, the selection and the
    gather are one launch (``kernels.keep_above_step``, the threshold read on the device when it is a tensor), then
    the one read of the count cuts the rows."""
    _width_depends_on_data()
    if valid is None and scores.shape[0] == 1:  # batch 1 on CUDA: count, select and gather in one launch
        out = kernels.keep_above_step(state.x, scores, state.sizes, state.source, state.num_prefix, k_max, threshold)
        if out is not None:
            x, sizes, state.source, kept = out
            n = state.num_prefix + int(kept.item())  # the one host read: the width
            state.x, state.sizes = x[:, :n], (sizes[:, :n] if sizes is not None else None)
            return state, kept
    s = scores if valid is None else scores.masked_fill(~valid, float("-inf"))
    kept = (s > threshold).sum(1).clamp(min=1, max=k_max)
    if kept.numel() == 1:  # batch 1: the count itself (two ops fewer; batch-1 eager is bound by host time)
        lo = hi = kept.tolist()[0]
    elif kept.numel():
        lo, hi = torch.stack(kept.aminmax()).tolist()
    else:  # an empty batch keeps the cap
        lo = hi = max(min(k_max, s.shape[1]), 1)
    if lo == hi and valid is None:
        return keep_top(state, s, hi), kept.float()
    order = s.topk(hi, dim=1).indices  # best first
    rank_ok = torch.arange(hi, device=s.device)[None, :] < kept[:, None]
    # sort the chosen slots back into spatial order, padding slots last
    perm = torch.where(rank_ok, order, order + s.shape[1]).argsort(1)
    return gather_tokens(state, order.gather(1, perm), None if lo == hi else rank_ok.gather(1, perm)), kept.float()


# -- merging: bipartite soft matching ----------------------------------------------------
def bipartite_merge(state: TokenState, metric: torch.Tensor, r: int, order: torch.Tensor | None = None,
                    protect: int = 0) -> TokenState:
    """Merge ``r`` non-prefix tokens into others (ToMe's bipartite soft matching).

    ``metric`` ``[B, P + N, d]`` is the similarity feature, or the block's keys ``[B, H, P + N, d]``, whose
    head mean (``reference.key_mean``) it then is: the kernels average them as they read them. Non-prefix
    tokens alternate into sets A (even) and B (odd); each A token finds its most cosine-similar B token; the
    ``r`` A tokens with the highest similarity (ties: the lower index, as the kernels) are merged into their
    partner with a size-weighted average; the rest of A is kept in spatial order. Output order: prefix, kept
    A tokens, B tokens. Padding slots (size 0) are merged first.

    ``order`` ``[B, P + N]`` long (a permutation of each sample's rows, prefix first) with ``protect``:
    the same step on the tokens taken in that order, its first ``protect`` non-prefix tokens kept as they
    are (after the prefix, in that order) and the rest alternating into A and B (``pitome``). On CUDA the
    kernels read the rows through ``order``; nothing is permuted in memory.
    """
    x, p = state.x, state.num_prefix
    n = x.shape[1] - p - protect
    if r <= 0:
        return state.materialize()
    if r > n // 2:
        raise ValueError(f"bipartite merging removes at most half the tokens per step ({n // 2} of {n}), asked for {r}")
    if kernels.use_triton(x, state.residual, order) and kernels.merge_step_fits(n, r):  # CUDA: one to four launches
        # a deferred residual add (state.residual) goes into the kernel that writes the rows
        out = kernels.merge_step(x, metric, state.sizes, state.source, p + protect, r, state.padded,
                                 max_size=p + state.num_input, log_sizes=state.proportional,
                                 residual=state.take_residual(), perm=order, scratch=state.scratch)
        state.x, state.sizes, state.source = out[:3]
        if state.proportional:  # the kernel wrote log(size) too: the next blocks' bias, no extra launches
            state.set_attn_bias(out[3], x.dtype)
        return state

    # otherwise (CPU, autograd, float64, or a step the one-launch kernels do not take) the step's reference, with the
    # matching and the row merge dispatched (kernels on CUDA, their references elsewhere)
    out = kernels.reference.merge_step(state.materialize().x, metric, state.sizes, state.source, p + protect, r,
                                       state.padded, perm=order, best=kernels.bipartite_best, rows=kernels.merge_rows)
    state.x, state.sizes, state.source = out
    return state


# -- scores from one query row ----------------------------------------------------------
def query_attention(q: torch.Tensor, k: torch.Tensor, scale: float, *, query: int | torch.Tensor = 0,
                    bias: torch.Tensor | None = None, head_weights: torch.Tensor | None = None,
                    head_values: torch.Tensor | None = None) -> torch.Tensor:
    """Attention paid by ONE query row to every key, averaged over heads (or weighted: ``head_weights``
    ``[B, H, N]``, or each token's heads by the norms of their attention outputs ``head_values [B, H, N, dv]``,
    ``reference.query_scores``).

    ``q``, ``k``: ``[B, H, N, d]``. ``query``: a token index, or a ``[B, H, d]``
    query vector. ``bias``: the additive key bias the block used (``[B, 1, 1, N]``).
    Costs O(N d) per head: the N x N matrix is never formed, so the block itself
    stays on fused SDPA. Returns ``[B, N]`` (float32) over all tokens.
    """
    if isinstance(query, int):
        qr = q.select(2, query)  # (q[:, :, query] costs 0.7 us more of host time)
    else:
        qr = query
    return kernels.query_scores(qr, k, scale, bias, head_weights, head_values)  # fused on CUDA (K read once)


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, *, bias: torch.Tensor | None = None,
                       valid: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Mean attention each key receives over all queries (column mean), averaged over heads ``[B, N]``.

    For encoders without a class token. Exact; costs two attention passes' FLOPs and no N x N matrix in
    memory on CUDA (``kernels.received_scores``; one pass where the block's attention gave each query's
    log-sum-exp, ``lse``). Padding queries (``valid`` False) are left out.
    """
    return kernels.received_scores(q, k, scale, bias, valid, lse)


# -- un-merging -------------------------------------------------------------------------------
def unmerge(x: torch.Tensor, state: TokenState, fill: float = 0.0):
    """Map reduced tokens ``[B, P + N, C]`` back to the original patch grid.

    Returns ``(full [B, N0, C], present [B, N0] bool)``: each original patch
    gets the features of the token that holds it (merged patches share their
    token's features); dropped patches get ``fill`` and ``present = False``.
    ``full`` is reshaped by the caller with ``state.grid`` when a dense map is needed.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(state, TokenState):
        raise TypeError(f"unmerge(tokens, state) takes the tokens and the state that tokenprune.features(model, x) "
                        f"returns, in that order; got ({type(x).__name__}, {type(state).__name__})")
    if state.source is None:
        raise ValueError("this forward ran without source tracking; apply with track_source=True to un-merge")
    src = state.source
    b, n0 = src.shape
    want = (b, state.x.shape[1])  # the state's tokens, prefix included: what the source map indexes
    if x.dim() != 3 or tuple(x.shape[:2]) != want:
        raise ValueError(f"unmerge: the tokens must be the [B, P + N, C] = [{want[0]}, {want[1]}, C] tokens of this "
                         f"state (prefix included), got shape {tuple(x.shape)}; pass the tokens that "
                         "tokenprune.features(model, x) returned with it")
    c = x.shape[-1]
    full = x.gather(1, src.clamp(min=0)[..., None].expand(b, n0, c))
    present = src >= 0
    if not bool(present.all()):
        full = full.masked_fill(~present[..., None], fill)
    return full, present


def weighted_mean(x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Size-weighted mean over tokens: equals the mean over the original tokens they stand for."""
    w = sizes.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp_min(1e-12)


def masked_max(x: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    return x.masked_fill((sizes <= 0)[..., None], float("-inf")).amax(1)



# -- positions inside attention (RoPE) ----------------------------------------------------------
def position_rows(table: torch.Tensor | None, positions: torch.Tensor | None) -> torch.Tensor | None:
    """Rows ``positions`` (``[B, N]``, from :meth:`TokenState.positions`) of a per-position table ``[(H,) N0, E]``
    whose token axis is second to last (a rotary cos / sin table): ``[B, 1, N, E]`` (``[B, H, N, E]`` for a
    per-head table), which broadcasts against ``[B, H, N, E]`` queries and keys. ``positions=None`` (the input
    tokens, in order) returns the table itself."""
    if table is None or positions is None:
        return table
    b, n = positions.shape
    lead = table.shape[:-2]
    t = table.unsqueeze(0).expand(b, *table.shape)
    index = positions.view(b, *(1,) * len(lead), n, 1).expand(b, *lead, n, table.shape[-1])
    out = t.gather(-2, index)
    return out if lead else out.unsqueeze(1)
