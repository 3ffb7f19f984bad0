"""Adaptive Sparse ViT -- learnable per-stage thresholds on head-weighted [CLS] attention.

Liu, Gui, Zhang, Xu, Zhang, Hu. "Adaptive Sparse ViT: Towards Learnable
Adaptive Token Pruning by Fully Exploiting Self-Attention", IJCAI 2023.
https://arxiv.org/abs/2209.13802 (methods.md section 5)

Score of patch j at a stage block, from the q, k and per-head attention
outputs ``o`` the block already computed (never the N x N matrix):

    w_{h,j}  = ||o_{h,j}|| / sum_h ||o_{h,j}||          (head importance per token)
    score_j  = sum_h w_{h,j} softmax_j(q_cls k^T * scale + bias)_h

``o`` is the input of the attention's output projection, recorded by the
adapter as ``QK.out``; adapters that do not record it give the plain head
mean (``w = 1/H``). Encoders without a class token use the mean query of
the (size-weighted) patches in place of ``q_cls``, as ``cls`` does.

Thresholds: one learnable ``theta`` per stage (``layers``, default blocks
depth/4, depth/2, 3 depth/4 -- 3, 6, 9 of 12). They live in an ``nn.Module``
(:class:`Thresholds`) that ``tokenprune.apply`` registers on the model as
``model.tokenprune_params`` (so ``state_dict`` saves them as
``tokenprune_params.theta`` and ``load_state_dict`` restores them) and
``tokenprune.remove`` deletes. Initial values ``init`` default to
``1e-3 * (i + 1)`` for stage i (1e-3, 2e-3, 3e-3: the paper's values, on the
scale of a score that sums to 1 over ~200 tokens, so about 1/N per token).

Inference (``module.training`` False or no grad): per sample, keep the
patches with ``score > theta``; samples keep DIFFERENT counts, the batch is
padded to the largest count, and padding slots get size 0, i.e. a ``-inf``
key bias in every later block and zero weight in pooling, so each sample
computes what it computes alone. The cost of padding: the batch runs at its
largest count, and attention needs a mask (SDPA's masked kernel instead of
flash).

Budget: ``budget`` is a CAP. Stage i keeps at most
``round(N * budget ** ((i + 1) / stages))`` tokens per sample (the ``cls``
schedule), so no sample leaves the encoder with more than
``round(budget * N)`` tokens and ``Plan.num_out`` is that cap; thresholds may
drop more. ``budget=1.0`` is the uncapped method of the paper. The training
helper (``tokenprune.training.train_thresholds``) uses the cap plan's FLOP
ratio as its default target ``rho``.

Training (``module.training`` True and grad enabled): nothing is gathered.
The keep decision is ``hard = 1[score > theta]`` with the straight-through
estimator of ``soft = sigmoid((score - theta) / tau)``; the running product
of the masks becomes the token sizes (``1`` kept, ``eps`` dropped), so the
``log size`` key bias masks dropped tokens out of attention in every later
block (and out of size-weighted pooling) while gradients reach ``theta``
through both the attention and the FLOP count (``state.scratch``). ``eps``
(``MASK_EPS``), not 0, on purpose: ``log 0`` makes theta's gradient NaN
(``0 * inf`` in the log's backward) and exact zeros would give dropped tokens
no gradient; with eps the backward is the multiplicative mask's derivative
(docs/methods.md section 5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..ops import keep_above, query_attention
from ..plan import EncoderInfo, Plan, Stage
from ..registry import register
from ..state import TokenState
from .base import Reducer, patch_valid, ratio_schedule, stage_layers

MASK_EPS = 1e-6  # size of a dropped token during training: log(1e-6) = -13.8 in the key bias
COUNTS_KEY = "threshold_counts"  # state.scratch: [(block, kept non-prefix tokens per sample [B])]
MASK_KEY = "threshold_mask"  # state.scratch: running keep mask [B, N] (training)


class Thresholds(nn.Module):
    """The learnable per-stage thresholds (``theta[i]`` for stage i)."""

    def __init__(self, init):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([float(v) for v in init], dtype=torch.float32))

    def extra_repr(self) -> str:
        return "theta=[" + ", ".join(f"{v:.4g}" for v in self.theta.detach().tolist()) + "]"


@register("threshold")
@dataclass
class Threshold(Reducer):
    layers: list[int] | None = None  # stage blocks (default depth/4, depth/2, 3 depth/4)
    init: list[float] | None = None  # initial thresholds (default 1e-3 * (i + 1))
    tau: float = 1e-4  # temperature of the soft mask used for the straight-through gradient
    head_weighting: bool = True  # weight heads by ||o_h|| (else the plain head mean)

    def __post_init__(self):
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        self.module: Thresholds | None = None
        self._has_cls = True
        self._layers: list[int] | None = None
        self._views = None  # (theta's data_ptr, [theta[i] detached]): see _theta

    def check(self, info: EncoderInfo) -> None:
        self._has_cls = info.has_cls
        layers = stage_layers(self.layers, info.depth, "threshold stages (layers)")
        if self._layers is not None and layers != self._layers:
            raise ValueError("threshold: the stage blocks changed between inputs; thresholds are per stage")
        self._layers = layers
        if self.module is None:
            init = self.init if self.init is not None else [1e-3 * (i + 1) for i in range(len(layers))]
            if len(init) != len(layers):
                raise ValueError(f"init has {len(init)} thresholds for {len(layers)} stages (blocks {layers})")
            if not all(math.isfinite(v) for v in init):
                raise ValueError(f"init thresholds must be finite scores, got {init}")
            self.module = Thresholds(init)

    def schedule(self, info: EncoderInfo, keep: int) -> list[Stage]:
        return ratio_schedule(self.name, info, keep, self._layers, every_layer=True)  # caps, one per threshold

    def plan(self, info: EncoderInfo, budget: float, overrides=None) -> Plan:
        plan = super().plan(info, budget, overrides)
        bad = sorted({s.block for s in plan.stages} - set(self._layers))
        if bad:  # a schedule= override after a block that has no threshold
            raise ValueError(f"threshold: schedule= block(s) {bad} are not stage blocks; each stage has its own "
                             f"threshold, at the stage blocks {self._layers} (layers=): give schedule counts for "
                             f"those blocks, or set layers= to the blocks you want")
        return plan

    def qk_blocks(self, plan):
        return {s.block for s in plan.stages}

    # -- scores ------------------------------------------------------------------------
    def scores(self, state: TokenState, qk) -> torch.Tensor:
        """Head-importance-weighted class attention of every non-prefix token ``[B, N]`` (float32)."""
        p = state.num_prefix
        # w_{h,j} from ||o_{h,j}||: the scores kernel reads o itself (the norms and their sum are no extra launches)
        o = qk.out if self.head_weighting else None
        if self._has_cls:
            query = 0
        else:
            w = state.sizes_or_ones()[:, None, p:, None].to(qk.q.dtype)
            query = (qk.q[:, :, p:] * w).sum(2) / w.sum(2).clamp_min(1e-12)
        return query_attention(qk.q, qk.k, qk.scale, query=query, bias=qk.bias, head_values=o)[:, p:]

    def reduce(self, state: TokenState, stage: Stage, qk) -> TokenState:
        i = self._layers.index(stage.block)
        scores = self.scores(state, qk)
        if self.module.training and torch.is_grad_enabled():
            return self._soft(state, scores, self.module.theta[i])
        state, kept = keep_above(state, scores, self._theta(i), stage.keep, patch_valid(state))
        state.scratch.setdefault(COUNTS_KEY, []).append((state.block, kept))
        return state

    def _theta(self, i: int) -> torch.Tensor:
        """``theta[i]`` without autograd, a view made once per storage of theta (batch-1 eager is bound by host time:
        an index and a detach per stage cost microseconds). In-place edits (an optimizer step, ``load_state_dict``,
        ``.data.copy_``) show through the view; a new storage (``model.to()``, ``theta.data = ...``) has another
        address while the old views keep theirs alive, so it rebuilds them. Traced (torch.compile, torch.export:
        fake tensors have no address), the plain index."""
        theta = self.module.theta
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return theta[i].detach()
        views = self._views
        if views is None or views[0] != theta.data_ptr():
            with torch.no_grad():
                d = theta.detach()
                views = self._views = (theta.data_ptr(), [d[j] for j in range(d.shape[0])])
        return views[1][i]

    def _soft(self, state: TokenState, scores: torch.Tensor, theta: torch.Tensor) -> TokenState:
        """Training: mask instead of gather (straight-through estimator), sizes carry the mask."""
        p = state.num_prefix
        soft = torch.sigmoid((scores - theta) / self.tau)
        hard = (scores > theta).to(soft.dtype)
        keep = hard + soft - soft.detach()
        prev = state.scratch.get(MASK_KEY)
        mask = keep if prev is None else prev * keep
        state.scratch[MASK_KEY] = mask
        sizes = state.sizes_or_ones()
        base = state.scratch.setdefault("threshold_base_sizes", sizes[:, p:])  # sizes before the first stage
        patch_sizes = base * (mask + MASK_EPS * (1 - mask).detach())
        state.sizes = torch.cat([sizes[:, :p].to(patch_sizes.dtype), patch_sizes], 1)
        state.scratch.setdefault(COUNTS_KEY, []).append((state.block, mask.sum(1)))
        return state
