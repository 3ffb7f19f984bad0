"""ApET -- approximation-error guided token pruning (attention-free).

"ApET: Approximation-Error Guided Token Compression for Efficient VLMs", 2025
(methods.md section 3). Needs nothing from attention, so every block keeps
running on fused SDPA and no q/k is captured.

At each stage, per sample, on the non-prefix tokens ``X`` ``[N, C]``:

1. basis ``S`` ``[k, C]``: farthest-point sampling on the token features
   (first point: the token farthest from the mean of the tokens; then
   repeatedly the token farthest from the chosen set, Euclidean);
2. least-squares reconstruction in float32, ``G = S S^T + eps I`` (eps 1e-5),
   ``C = X S^T G^-1``, ``X_hat = C S``; error ``e_i = ||x_i - x_hat_i||_2``;
3. keep the ``K`` tokens with the LARGEST error (what the basis cannot explain);
   the ``k`` kept slots with the lowest error are given to the basis tokens
   themselves, so kept = basis + the ``K - k`` largest-error other tokens;
4. every other token is merged into its most cosine-similar kept token,
   ``kept <- (s_kept x_kept + sum s_d x_d) / (s_kept + sum s_d)``, which is the
   paper's ``(kept + sum dropped) / (1 + count)`` when all sizes are 1. Sizes
   and the source map follow (merged patches point at their kept token). The
   sizes weight later merges and pooling; they enter later blocks' attention as
   proportional attention only with ``prop_attn=True`` (off by default: ApET
   does not use it, and without it the blocks keep SDPA's unmasked flash path).

On CUDA (Triton kernels on, at most 1024 non-prefix tokens and k <= 32) a stage reads the tokens
once, into the per-sample Gram matrix ``G = X X^T`` (float32), and steps 1, 2 and 4 work on ``G``:
distances ``sq_i - 2 G_ij + sq_j``, errors ``sq_i - 2 c.b + c^T G_S c``, cosines
``G_ij / (|x_i| |x_j|)`` (``kernels.gram`` / ``apet_stage`` / ``apet_assign``; up to batch 32 the whole
stage, merge included, is ``kernels.apet_step``: four launches, nothing between them). Same choices as the
code below except where candidates tie within rounding (this path computes them in float32 from G,
the x-based path rounds its dot products to the token dtype); errors far below a token's norm are
resolved only to ~3e-4 |x_i| (cancellation in float32), which the ranking of the largest does not
need. The code below is the specification and the CPU path.

Kept tokens stay in spatial order. Stages: by default after blocks depth/4,
depth/2, 3 depth/4 with the same keep ratio at each (as ``cls``, so the two
compare at equal FLOPs); ``layers=[j]`` gives one stage (the paper prunes once,
after the vision encoder). Each stage must keep at least ``k`` tokens (checked per input size; an input of
fewer than ``k`` tokens at a budget that keeps all of them is left as it is).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..plan import EncoderInfo, Plan, Stage
from ..registry import register
from ..state import TokenState
from .base import Reducer, patch_valid, ratio_schedule, set_groups


def farthest_point_basis(x: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``[B, k]`` of ``k`` tokens of ``x`` ``[B, N, C]`` chosen by farthest-point sampling.

    Squared distances are ``|x|^2 - 2 x.c + |c|^2``: one matrix-vector product per
    step in the tokens' own dtype (fp32 accumulation), norms in float32, so no
    ``[B, N, C]`` temporary is made per step.
    """
    b, n, c = x.shape
    sq = x.float().pow(2).sum(-1)  # [B, N]
    if valid is None:
        mean = x.float().mean(1)
    else:
        w = valid[..., None].to(x.dtype)
        mean = ((x * w).sum(1) / w.sum(1).clamp_min(1)).float()
    dist = sq - 2 * torch.bmm(x, mean.to(x.dtype)[..., None])[..., 0].float() + mean.pow(2).sum(-1, keepdim=True)
    if valid is not None:
        dist = dist.masked_fill(~valid, float("-inf"))
    chosen = torch.empty(b, k, dtype=torch.long, device=x.device)
    for j in range(k):
        i = dist.argmax(1)  # [B]
        chosen[:, j] = i
        ci = x.gather(1, i[:, None, None].expand(b, 1, c))  # [B, 1, C]
        d = sq - 2 * torch.bmm(x, ci.transpose(1, 2))[..., 0].float() + sq.gather(1, i[:, None])
        dist = d if j == 0 else torch.minimum(dist, d)
        if valid is not None:
            dist = dist.masked_fill(~valid, float("-inf"))
        dist = dist.scatter(1, chosen[:, :j + 1], float("-inf"))  # never pick a basis token twice
    return chosen


def reconstruction_error(x: torch.Tensor, basis: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``||x_i - x_hat_i||`` ``[B, N]`` of the ridge least-squares reconstruction of ``x`` ``[B, N, C]``
    from ``basis`` ``[B, k, C]``, in float32: ``G = S S^T + eps I``, ``x_hat = x S^T G^-1 S``."""
    return kernels.apet_errors(x, basis, eps)  # fused on CUDA (x read once, x_hat never stored); else the reference


@register("apet")
@dataclass
class Apet(Reducer):
    k: int = 10  # basis tokens per stage (farthest-point sampling)
    layers: list[int] | None = None  # blocks after which to prune (default: depth/4, depth/2, 3 depth/4)
    eps: float = 1e-5  # ridge term of the least-squares Gram matrix
    prop_attn: bool = False  # add log(size) of merged tokens to later attention (off: blocks keep flash SDPA)

    def check(self, info: EncoderInfo) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k (basis tokens) must be a positive integer, got {self.k!r}")
        if not self.eps > 0:
            raise ValueError(f"eps (the ridge term of the Gram matrix) must be > 0, got {self.eps!r}")
        # k against the input's size: per input, where a stage must keep fewer than k (plan / reduce); an input
        # of fewer than k tokens at a budget that keeps all of them is left as it is

    def schedule(self, info: EncoderInfo, keep: int) -> list[Stage]:
        return ratio_schedule(self.name, info, keep, self.layers)

    def plan(self, info, budget, overrides=None) -> Plan:
        plan = super().plan(info, budget, overrides)
        small = [s for s in plan.stages if s.keep < self.k]
        if small:
            last = small[-1]  # the fewest: use k <= that
            self._too_few(info.num_tokens, last.keep, f"the stage after block {last.block}")
        return plan

    def _too_few(self, n: int, keep: int, where: str):
        raise ValueError(f"apet: on an input of {n} tokens, {where} keeps {keep} tokens, fewer than the k={self.k} "
                         f"basis tokens it must keep; use k <= {keep} or a larger budget (one that keeps every token "
                         f"of this input, e.g. 1.0, leaves it as it is)")

    def reduce(self, state: TokenState, stage: Stage, qk) -> TokenState:
        x, p = state.x, state.num_prefix
        b, n_all, c = x.shape
        n, keep = n_all - p, stage.keep
        if keep >= n:
            return state
        if keep < self.k:  # planned stages never are (plan); a single selection (VLMs: select) is checked here
            self._too_few(n, keep, "the selection")
        if kernels.use_triton(x) and kernels.apet_step_fits(b, n, self.k, x.dtype):
            # small GPU batches: the stage below on the Gram path (gram, apet_stage with the selection, apet_assign,
            # apet_merge) in four launches and no other op (batch 1 is bound by host time)
            state.x, state.sizes, state.source = kernels.apet_step(x, state.sizes, state.source, p, self.k, keep,
                                                                   self.eps, state.padded, p + state.num_input)
            return state
        xs = x[:, p:]
        # GPU: x is read once, into the per-sample Gram matrix G = X X^T (float32); the basis search,
        # the errors and the cosine assignment then work on G (tokenprune/kernels, section 5)
        g = kernels.gram(xs)[0] if kernels.use_triton(x) and kernels.apet_stage_fits(n, self.k) else None
        if g is not None:
            valid = patch_valid(state)  # None without padding slots: the kernel masks nothing, as if all were valid
            basis, err = kernels.apet_stage(g, valid, self.k, self.eps)
        else:
            valid = state.sizes_or_ones()[:, p:] > 0
            basis = farthest_point_basis(xs, self.k, valid)
            err = reconstruction_error(xs, xs.gather(1, basis[..., None].expand(b, self.k, c)), self.eps)
        if valid is not None:
            err = err.masked_fill(~valid, float("-inf"))  # padding is never kept over a real token
        err = err.scatter(1, basis, float("inf"))  # the basis is always kept
        keep_idx = kernels.topk_sorted(err, keep)  # [B, K], spatial order

        # every non-kept token goes to its most cosine-similar kept token
        if g is not None:
            target = kernels.apet_assign(g, keep_idx)  # cos from G at the kept columns; kept map to self
        else:
            xn = xs / xs.float().norm(dim=-1, keepdim=True).clamp_min(1e-6).to(xs.dtype)
            kept_n = xn.gather(1, keep_idx[..., None].expand(b, keep, c))
            target = torch.bmm(xn, kept_n.transpose(1, 2)).argmax(-1)  # [B, N] -> slot in 0..K-1
            target.scatter_(1, keep_idx, torch.arange(keep, device=x.device).expand(b, keep))  # kept map to self

        if kernels.use_triton(x) and kernels.apet_merge_fits(b):
            # small batches: rows, sizes and source map in one launch (tokenprune/kernels, section 5b)
            state.x, state.sizes, state.source = kernels.apet_merge(x, state.sizes, target, keep_idx, state.source, p,
                                                                    max_size=p + state.num_input)
            return state
        sizes = state.sizes_or_ones()
        wide = torch.promote_types(x.dtype, torch.float32)  # sizes are counts: summed exactly (bf16 stops at 256)
        s = sizes[:, p:].to(wide)
        den = torch.zeros(b, keep, dtype=wide, device=x.device).scatter_add_(1, target, s)
        new_patches = None
        if kernels.use_triton(x):  # one pass: each kept row averages the tokens mapped to it (tokenprune/kernels)
            rows = torch.cat([torch.arange(p, device=x.device).expand(b, p), keep_idx + p], 1)
            members = torch.arange(p, n_all, device=x.device).expand(b, n)
            state.x = kernels.merge_rows(x, state.sizes, rows, members, target + p, include_prim=False)
        else:
            num = torch.zeros(b, keep, c, dtype=wide, device=x.device).scatter_add_(
                1, target[..., None].expand(b, n, c), xs.to(wide) * s[..., None])
            kept_x = xs.gather(1, keep_idx[..., None].expand(b, keep, c))
            new_patches = torch.where(den[..., None] > 0, (num / den.clamp_min(1e-12)[..., None]).to(x.dtype), kept_x)
        # sizes always set (no host sync, so the forward can be captured in a CUDA graph); with
        # prop_attn=False they weight later merges and pooling but add no attention bias
        return set_groups(state, new_patches, sizes, den, target)
