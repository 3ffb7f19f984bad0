"""The frozen consumer: what a model trained on ALL of an encoder's output tokens loses when it reads
reduced ones.

A VLM's language model is trained on every visual token and then, with FasterVLM / ApET / DivPrune,
fed a pruned subset it never saw in training. The closest measurable stand-in on an image classifier:
a small transformer readout (:class:`Readout`: a few pre-norm blocks and attention pooling) is trained
on all the encoder's output patch tokens (prefix tokens such as [CLS] left out, as LLaVA does), then
frozen, and fed each method's tokens:

- reduced inside the encoder (the method's own plan), or
- reduced after the encoder (:func:`after_encoder`: one stage after the last block, as FasterVLM and
  ApET prune a VLM's visual tokens; the encoder's compute is unchanged).

The readout sees tokens only: no sizes, no positions beyond what the features carry, exactly what a
language model would see. Its accuracy retained is the metric (``tokenprune eval --task consumer``,
``scripts/accuracy.py``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import api
from .data import to_tensor
from .patch import get_patch
from .plan import keep_count

AFTER_ENCODER = ("cls", "random", "pool", "diverse", "apet", "merge")  # methods that can act once, at the end


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, mask=None):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class Readout(nn.Module):
    """``depth`` pre-norm transformer blocks over any number of tokens, then attention pooling (one learned
    query attends to the tokens) and a linear classifier. ``valid`` ``[B, N]`` bool masks padding slots."""

    def __init__(self, dim: int, num_classes: int, depth: int = 2, heads: int = 6, mlp_ratio: float = 2.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Readout: dim {dim} is not divisible by heads {heads}")
        self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pool_kv = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.heads = heads

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = tokens.shape
        mask = None if valid is None else valid[:, None, None, :]  # True: attend
        x = tokens
        for blk in self.blocks:
            x = blk(x, mask)
        k, v = self.pool_kv(self.norm(x)).view(b, n, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q = self.query.expand(b, -1, -1).view(b, 1, self.heads, c // self.heads).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, c)
        return self.head(pooled)


def output_tokens(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The encoder's final patch tokens ``[B, N, C]`` (prefix left out) of a timm ViT, reduced if the model is
    patched, and ``valid`` (None: no padding slots)."""
    if not hasattr(model, "forward_features") or not hasattr(model, "num_prefix_tokens"):
        raise TypeError("the frozen-consumer evaluation reads a timm VisionTransformer's output tokens; "
                        f"got {type(model).__name__}")
    p = model.num_prefix_tokens
    if get_patch(model) is None:
        return model.forward_features(x)[:, p:], None
    tokens, state = api.features(model, x)
    valid = None if state.sizes is None or not state.padded else state.sizes[:, p:] > 0
    return tokens[:, p:], valid


def after_encoder(method: str, budget: float, depth: int, num_tokens: int) -> tuple[dict, dict | None]:
    """``(options, schedule)`` for ``method`` acting once, after the encoder's last block, so that
    ``round(budget * num_tokens)`` tokens leave it."""
    if method not in AFTER_ENCODER:
        raise ValueError(f"{method!r} has no after-the-encoder form here; use one of {', '.join(AFTER_ENCODER)}")
    if method == "pool":
        return {"block": depth - 1}, None
    return {}, {depth - 1: keep_count(budget, num_tokens)}


def train_readout(tokens: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int = 3,
                  batch_size: int = 512, lr: float = 1e-3, device: str | torch.device = "cpu", seed: int = 0,
                  depth: int = 2, log=None) -> Readout:
    """Train a :class:`Readout` on ``tokens`` ``[M, N, C]`` (any device/dtype; moved per batch) with cross-
    entropy, AdamW and a one-cycle cosine schedule; returned frozen, in eval mode, in float32."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m, _, c = tokens.shape
    heads = 6 if c % 6 == 0 else (4 if c % 4 == 0 else 1)
    ro = Readout(c, num_classes, depth=depth, heads=heads).to(device)
    opt = torch.optim.AdamW(ro.parameters(), lr=lr, weight_decay=0.05)
    steps = max(1, epochs * math.ceil(m / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    cuda = torch.device(device).type == "cuda"
    labels = labels.to(tokens.device)
    ro.train()
    for ep in range(epochs):
        perm = torch.randperm(m, generator=gen).to(tokens.device)
        total, correct, seen = 0.0, 0, 0
        for i in range(0, m, batch_size):
            idx = perm[i:i + batch_size]
            x, y = tokens[idx].to(device, torch.float32), labels[idx].to(device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                logits = ro(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(idx)
        if log is not None:
            log(f"readout epoch {ep + 1}/{epochs}: loss {total / seen:.3f}, train top-1 {correct / seen:.2%}")
    ro.eval().requires_grad_(False)
    return ro


def image_forward(lm, images, readout: Readout, batch_size: int, device, dtype):
    """``fn(j)``: the readout's logits on batch ``j`` of ``images`` (PIL) through ``lm.model``, reduced or not
    (``evaluate.evaluate``'s task ``consumer``)."""
    size = lm.img_size or 224  # (height, width): a model may be built for a non-square input

    def fn(j):
        x = to_tensor(images[j * batch_size:(j + 1) * batch_size], size, lm.mean, lm.std).to(device, dtype)
        return consume(readout, *output_tokens(lm.model, x))

    return fn


@torch.no_grad()
def consume(readout: Readout, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the frozen readout on (reduced) tokens."""
    cuda = tokens.is_cuda
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        return readout(tokens.float(), valid).float()
