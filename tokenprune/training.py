"""Training helpers for the reducers that learn something.

- :func:`train_thresholds` -- Adaptive Sparse ViT's budget-aware training of
  the per-stage thresholds of ``method="threshold"`` (optionally of the
  backbone too);
- :func:`finetune_linear_attention` -- MAELRE: fine-tune the attention of the
  blocks that run the linear approximation, distilling from the unreduced model.

Both take a patched model, a loader of ``(inputs, labels)`` batches (labels
may be ``None`` for distillation only), and train in place; both return a
list of per-step records. The teacher is the unreduced model: by default a
copy of ``model`` with the patch removed (pass ``teacher=`` to share one).
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from . import api
from .patch import _inner, _wrapper_kind, unwrap
from .plan import EncoderInfo
from .reducers.maelre import linear_blocks

# -- shared plumbing -------------------------------------------------------------------------


def _teacher(model, teacher):
    if teacher is not None:
        return teacher.eval()
    t = copy.deepcopy(model)
    api.remove(t)
    return t.eval()


def _forward(model, x):
    """``(logits, final tokens [B, T, C] | None, final TokenState | None)``."""
    patched = api.is_applied(model)
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        if not patched:
            feats = model.forward_features(x)
            return model.forward_head(feats), feats, None
        feats, state = api.features(model, x)
        return model.forward_head(feats, sizes=state.sizes), feats, state
    if patched:
        raise TypeError("tokenprune.training needs a model with forward_features / forward_head (timm)")
    out = model(x)
    return (out.logits if hasattr(out, "logits") else out), None, None


def _kl(student_logits, teacher_logits):
    return F.kl_div(student_logits.float().log_softmax(-1), teacher_logits.float().log_softmax(-1),
                    log_target=True, reduction="batchmean")


def _batches(loader, epochs: int, max_steps: int | None):
    step = 0
    for _ in range(epochs):
        for batch in loader:
            if max_steps is not None and step >= max_steps:
                return
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            _check_batch(step, x, y)
            yield step, x, y
            step += 1


def _check_batch(step: int, x, y) -> None:
    """The models trained here are timm image encoders: inputs ``[B, C, H, W]``, labels ``[B]`` (or ``[B, classes]``)."""
    what = "image batches or (inputs, labels) pairs (a DataLoader, or a list [(x, y), ...])"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"tokenprune.training: batch {step} is a {type(x).__name__}; the loader must give {what}")
    if x.dim() != 4:
        hint = "; wrap a single (inputs, labels) pair in a list: [(x, y)]" if x.dim() < 3 else ""
        raise ValueError(f"tokenprune.training: batch {step} has inputs that are a {x.dim()}-D tensor "
                         f"{tuple(x.shape)}, not images [B, C, H, W]; the loader must give {what}{hint}")
    if y is not None and (not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != x.shape[0]):
        got = f"{y.shape[0]} labels" if isinstance(y, torch.Tensor) and y.dim() else f"labels {y!r:.40}"
        raise ValueError(f"tokenprune.training: batch {step}: {got} for {x.shape[0]} inputs; labels must be a tensor "
                         "[B] of class indices (or [B, classes] of probabilities)")


def _trained(model):
    """The module to train: the one a ``torch.compile`` or ``DataParallel`` wrapper runs (as ``apply`` takes them;
    training calls its ``forward_features`` / ``forward_head``). DDP / FSDP are refused: training around their forward
    would skip their gradient synchronisation."""
    m = model
    while m is not None:
        if _wrapper_kind(m) == "distributed":
            name = type(m).__name__
            raise TypeError(f"tokenprune.training does not train through {name}: it runs the model's forward_features / "
                            f"forward_head itself, which would skip {name}'s gradient synchronisation; train the "
                            "model (model.module) in one process, or write the loop around the wrapper yourself")
        m = _inner(m)
    return unwrap(model)


def _patch(model, method: str):
    patch = api.get_patch(model)
    if patch is None:
        raise ValueError(f"model is not patched; call tokenprune.apply(model, method={method!r}, ...) first")
    return patch


# -- Adaptive Sparse ViT ------------------------------------------------------------------------


def flop_ratio_from_counts(info: EncoderInfo, counts: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Per-sample FLOP ratio ``[B]`` of the encoder blocks (``plan.block_flops`` model, SDPA attention)
    when sample b keeps ``counts[j][1][b]`` non-prefix tokens after block ``counts[j][0]``.
    Differentiable in the counts (quadratic attention term included)."""
    d, h, p = info.dim, info.mlp_hidden, info.num_prefix

    def flops(n):
        return 2 * n * (4 * d * d + 2 * d * h) + 4 * n * n * d

    full = info.depth * flops(float(info.num_tokens + p))
    by_block = {b: c for b, c in counts}
    n = None
    total = 0.0
    for i in range(info.depth):
        cur = (torch.tensor(float(info.num_tokens)) if n is None else n) + p
        total = total + flops(cur)
        if i in by_block:
            n = by_block[i].float()
    return total / full


def train_thresholds(model, loader: Iterable, *, epochs: int = 1, target: float | None = None,
                     lr: float = 1e-3, lr_backbone: float = 0.0, teacher=None, flops_weight: float = 2.0,
                     distill_weight: float = 0.5, ce_weight: float = 1.0, max_steps: int | None = None,
                     callback: Callable[[dict], None] | None = None) -> list[dict]:
    """Budget-aware training of Adaptive Sparse ViT thresholds (Liu et al. 2023).

    ``model`` must be patched with ``method="threshold"``. Per batch:

        loss = ce_weight * CE(student, labels)
             + flops_weight * | mean_b FLOPs_b / FLOPs_full - target |
             + distill_weight * (KL(teacher logits || student logits) + KL on the final tokens)

    where FLOPs_b follows the kept counts of sample b (straight-through
    estimator: hard keep decisions forward, sigmoid gradient backward) and
    dropped tokens are masked out of attention (see ``reducers/threshold.py``).
    The token KL compares the softmax over channels of each final token with
    the teacher's, weighted by the student's keep mask. ``target`` (rho)
    defaults to the FLOP ratio of the cap plan at the patch's budget.
    The FLOP term is the spec's ``|FLOPs - rho FLOPs_full|`` divided by
    ``FLOPs_full``: scale-free, so one weight fits every model (docs/methods.md
    section 5 gives the ``flops_weight`` that matches the spec's weighting).

    Trains the thresholds with Adam at ``lr`` (they live on the score scale,
    about 1/N); with ``lr_backbone > 0`` also every model weight (AdamW), in
    train mode; otherwise the backbone is frozen and stays in eval mode.
    Returns one record per step: loss parts, mean FLOP ratio, thresholds.
    """
    model = _trained(model)
    patch = _patch(model, "threshold")
    thresholds = getattr(patch.reducer, "module", None)
    if thresholds is None or not hasattr(thresholds, "theta"):
        raise ValueError("train_thresholds needs a model patched with method='threshold' "
                         "(or a pipeline containing it)")
    teacher = _teacher(model, teacher)
    info = patch.plan_for().info
    rho = patch.plan_for().flop_ratio if target is None else float(target)
    if not 0 < rho <= 1:
        raise ValueError(f"target FLOP ratio must be in (0, 1], got {rho}")

    backbone = [p for n, p in model.named_parameters() if not n.startswith(api.MODULE_ATTR + ".")]
    was_training = model.training
    saved_grad = [p.requires_grad for p in backbone]
    groups = [{"params": list(thresholds.parameters()), "lr": lr}]
    if lr_backbone > 0:
        groups.append({"params": backbone, "lr": lr_backbone, "weight_decay": 0.05})
        model.train()
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
    else:
        for p in backbone:
            p.requires_grad_(False)
        model.eval()
        thresholds.train()
        opt = torch.optim.Adam(groups)
    history: list[dict] = []
    try:
        for step, x, y in _batches(loader, epochs, max_steps):
            with torch.no_grad():
                t_logits, t_feats, _ = _forward(teacher, x)
            logits, feats, state = _forward(model, x)
            counts = state.scratch.get("threshold_counts", []) if state is not None else []
            ratio = flop_ratio_from_counts(info, counts) if counts else torch.ones(x.shape[0])
            flop_loss = (ratio.mean() - rho).abs()
            ce = F.cross_entropy(logits, y) if y is not None and ce_weight else logits.new_zeros(())
            kl_logits = _kl(logits, t_logits)
            kl_tokens = logits.new_zeros(())
            if feats is not None and t_feats is not None and feats.shape == t_feats.shape:
                per_token = F.kl_div(feats.float().log_softmax(-1), t_feats.float().log_softmax(-1),
                                     log_target=True, reduction="none").sum(-1)  # [B, T]
                w = state.sizes_or_ones().clamp(max=1).to(per_token.dtype) if state is not None else None
                kl_tokens = (per_token * w).sum() / w.sum() if w is not None else per_token.mean()
            loss = ce_weight * ce + flops_weight * flop_loss + distill_weight * (kl_logits + kl_tokens)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not history and not any(p.grad is not None and bool(p.grad.any()) for p in thresholds.parameters()):
                warnings.warn(
                    "train_thresholds: the thresholds got no gradient in the first step: every token's score is far "
                    "from its stage's threshold, where the soft mask sigmoid((score - threshold) / tau) is flat, so "
                    f"training cannot move them (scores are about 1/N = {1 / max(info.num_tokens, 1):.2g} here; "
                    f"thresholds {[round(float(t), 6) for t in thresholds.theta.detach()]}, tau "
                    f"{getattr(patch.reducer, 'tau', '?')}). Start them near the scores (apply(..., "
                    "method='threshold', init=[...])) or raise tau", stacklevel=2)
            opt.step()
            rec = {"step": step, "loss": float(loss.detach()), "ce": float(ce.detach()),
                   "flop_ratio": float(ratio.mean().detach()),
                   "target": rho, "kl_logits": float(kl_logits.detach()), "kl_tokens": float(kl_tokens.detach()),
                   "thresholds": thresholds.theta.detach().tolist()}
            history.append(rec)
            if callback is not None:
                callback(rec)
    finally:
        for p, g in zip(backbone, saved_grad):
            p.requires_grad_(g)
        model.train(was_training)
    return history


# -- MAELRE -----------------------------------------------------------------------------------------


def _attention_module(block):
    for name in ("attn", "self_attn", "attention"):
        m = getattr(block, name, None)
        if isinstance(m, torch.nn.Module):
            return m
    raise TypeError(f"cannot find the attention module of {type(block).__name__} (looked for attn, self_attn, "
                    "attention)")


def linear_attention_parameters(model) -> list[torch.nn.Parameter]:
    """The attention parameters of the blocks that run the linear approximation under the model's plan."""
    model = _trained(model)
    patch = _patch(model, "maelre")
    if not getattr(patch.reducer, "uses_attention_kernel", False):
        raise ValueError(f"fine-tuning linear attention needs a model patched with method='maelre' (or a pipeline "
                         f"containing it); this one is patched with {getattr(patch, 'method', patch.reducer.name)!r}")
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"tokenprune.training fine-tunes timm image models (model.blocks, forward_features / forward_head); "
                        f"for this {type(model).__name__}, train the attention of the blocks that "
                        "tokenprune.plan(model).attention_per_block() marks 'linear' in a loop of your own")
    idx = linear_blocks(patch.plan_for())
    return [p for i in idx for p in _attention_module(blocks[i]).parameters()]


def finetune_linear_attention(model, loader: Iterable, *, epochs: int = 1, lr: float = 1e-4, teacher=None,
                              ce_weight: float = 1.0, distill_weight: float = 1.0, max_steps: int | None = None,
                              callback: Callable[[dict], None] | None = None) -> list[dict]:
    """Fine-tune the attention weights of MAELRE's linear-attention blocks (all other weights frozen).

    ``loss = ce_weight * CE(labels) + distill_weight * KL(unreduced teacher || model)``, AdamW at ``lr``
    (cosine decay over the run). The blocks are those of ``tokenprune.plan(model)`` at the model's default
    input size. A few hundred steps recover most of what the softmax -> linear swap costs (see
    BENCHMARKS.md); the model stays in eval mode (no dropout) while training.
    """
    model = _trained(model)
    params = linear_attention_parameters(model)
    if not params:
        raise ValueError("no block runs linear attention under this plan (every block has N <= switch_at); "
                         "nothing to fine-tune")
    teacher = _teacher(model, teacher)
    wanted = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved:
        p.requires_grad_(id(p) in wanted)
    total = None
    try:
        total = len(loader) * epochs  # type: ignore[arg-type]
    except TypeError:
        pass
    if max_steps is not None:
        total = min(total, max_steps) if total else max_steps
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)) if total else 1.0)
    was_training = model.training
    model.eval()
    history: list[dict] = []
    try:
        for step, x, y in _batches(loader, epochs, max_steps):
            with torch.no_grad():
                t_logits = _forward(teacher, x)[0]
            logits = _forward(model, x)[0]
            ce = F.cross_entropy(logits, y) if y is not None and ce_weight else logits.new_zeros(())
            kl = _kl(logits, t_logits)
            loss = ce_weight * ce + distill_weight * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            rec = {"step": step, "loss": float(loss.detach()), "ce": float(ce.detach()), "kl": float(kl.detach())}
            history.append(rec)
            if callback is not None:
                callback(rec)
    finally:
        for p, g in saved:
            p.requires_grad_(g)
        model.train(was_training)
    return history
