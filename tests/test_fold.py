"""The head-mean key folded into the qkv product (timm adapter, reducers that match on key means)."""
import pytest
import torch

import tokenprune
from tokenprune.adapters import timm_vit
from tokenprune.engine import QK

from conftest import tiny_vit


def _run(model, x, method):
    tokenprune.apply(model, budget=0.25, method=method)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("method", ["merge", "maelre"])
def test_folded_key_mean_gives_the_same_forward(method, monkeypatch):
    """Same output as k.mean(1) (float64: only rounding differs), and the fold really ran."""
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    folded = tiny_vit().double()
    out = _run(folded, x, method)
    qkv = folded.blocks[0].attn.qkv
    assert isinstance(qkv, timm_vit._FoldedQKV) and "_tokenprune_fold" in qkv.__dict__
    plain = tiny_vit().double()
    monkeypatch.setattr(timm_vit, "_foldable", lambda attn: False)
    ref = _run(plain, x, method)
    assert not isinstance(plain.blocks[0].attn.qkv, timm_vit._FoldedQKV)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_folded_metric_equals_head_mean_of_keys():
    """The extra rows of the product are mean_h(k_h) of the keys the block itself computed."""
    model = tiny_vit().double()
    tokenprune.apply(model, budget=0.25, method="merge")
    seen = []
    orig = timm_vit.HookCapture.__call__

    def spy(self, bias):
        cm = orig(self, bias)

        class Wrap:
            def __enter__(s):
                s.qk = cm.__enter__()
                return s.qk

            def __exit__(s, *a):
                seen.append((s.qk.k_mean, s.qk.k))
                return cm.__exit__(*a)
        return Wrap()

    timm_vit.HookCapture.__call__ = spy
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    finally:
        timm_vit.HookCapture.__call__ = orig
    assert seen and all(km is not None for km, _ in seen)
    for km, k in seen:
        torch.testing.assert_close(km, k.mean(1), rtol=1e-12, atol=1e-12)


def test_fold_follows_weight_changes_and_stays_out_of_autograd():
    x = torch.randn(2, 3, 32, 32)
    model, other = tiny_vit(), tiny_vit()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokenprune.apply(model, budget=0.25, method="merge")
    tokenprune.apply(other, budget=0.25, method="merge")
    with torch.no_grad():
        model(x)  # builds the cache for the old weights
        model.load_state_dict(other.state_dict())  # in-place copies: the version counters move
        torch.testing.assert_close(model(x), other(x), rtol=1e-5, atol=1e-5)
    # with autograd recording, the plain product runs (no cached weight in the graph) and grads flow
    model.blocks[0].attn.qkv.__dict__.pop("_tokenprune_fold")
    model(x).sum().backward()
    assert "_tokenprune_fold" not in model.blocks[0].attn.qkv.__dict__
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_no_fold_where_the_key_mean_is_not_linear_or_not_needed():
    qkn = tiny_vit(qk_norm=True)  # a LayerNorm on k: the head mean is not linear in x
    tokenprune.apply(qkn, budget=0.25, method="merge")
    assert not isinstance(qkn.blocks[0].attn.qkv, timm_vit._FoldedQKV)
    cls = tiny_vit()
    tokenprune.apply(cls, budget=0.25, method="cls")  # cls scores do not read the key mean
    assert not isinstance(cls.blocks[0].attn.qkv, timm_vit._FoldedQKV)


def test_qk_key_mean_falls_back_to_the_keys():
    k = torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(QK(k=k).key_mean(), k.mean(1))
    km = torch.randn(2, 5, 4)
    assert QK(k=k, k_mean=km).key_mean() is km
