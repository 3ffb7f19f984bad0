"""SigLIP2 NaFlex towers (tiny random models, CPU): padded patch sequences with ``pixel_attention_mask`` and
``spatial_shapes``. Budget 1.0 equals the unpatched model on the real patches; exactly K tokens for merge / cls /
apet / random / pool on the image's own (non-square) grid; ``remove`` bit-identical; eager attention never entered;
a padded per-sample batch equals each sample alone; the classifier's mean is size-weighted; mixed shapes refused."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import tokenprune
from tokenprune.plan import keep_count

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.siglip2")

H, W, L = 4, 6, 28  # a 4 x 6 grid padded to 28 patches

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = [("merge", {}), ("cls", {}), ("apet", {"k": 2}), ("random", {}), ("pool", {})]
_CFG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, patch_size=4,
            num_patches=16)



def _inputs(b=2, h=H, w=W):
    torch.manual_seed(1)
    pv = torch.randn(b, L, 3 * 16)
    mask = torch.zeros(b, L, dtype=torch.long)
    mask[:, : h * w] = 1
    return pv, mask, torch.tensor([[h, w]] * b)


def make_tower():
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    torch.manual_seed(0)
    return Siglip2VisionModel(Siglip2VisionConfig(**_CFG)).eval()


def make_classifier():
    from transformers import Siglip2Config, Siglip2ForImageClassification

    torch.manual_seed(0)
    cfg = Siglip2Config(vision_config=_CFG, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                             num_attention_heads=4, vocab_size=50,
                                                             max_position_embeddings=8), num_labels=5)
    return Siglip2ForImageClassification(cfg).eval()


def _out(model, inputs):
    out = model(*inputs)
    return out.logits if hasattr(out, "logits") else out.pooler_output


@pytest.mark.parametrize("maker", [make_tower, make_classifier], ids=["tower", "classifier"])
def test_matrix(maker, monkeypatch):
    model = maker()
    inputs = _inputs()
    classes, keys = {n: type(m) for n, m in model.named_modules()}, list(model.state_dict())
    with torch.no_grad():
        ref = _out(model, inputs)
        ref_tokens = (model if maker is make_tower else model.vision_model)(*inputs).last_hidden_state
        for method in ("merge", "cls"):
            tokenprune.apply(model, 1.0, method)
            try:
                torch.testing.assert_close(_out(model, inputs), ref, rtol=1e-5, atol=1e-6)
                if maker is make_tower:  # the real patches' tokens; the padding slots never entered
                    torch.testing.assert_close(model(*inputs).last_hidden_state, ref_tokens[:, : H * W])
            finally:
                tokenprune.remove(model)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))

    def boom(*a, **k):
        raise AssertionError("eager attention was called")

    monkeypatch.setattr(importlib.import_module("transformers.models.siglip2.modeling_siglip2"),
                        "eager_attention_forward", boom)
    for method, kw in METHODS:
        for budget in (0.5, 0.25):
            tokenprune.apply(model, budget, method, **kw)
            try:
                calls.clear()
                with torch.no_grad():
                    tokens, state = tokenprune.features(model, *inputs)
                    y = _out(model, inputs)
                k = keep_count(budget, H * W)
                assert state.input_grid == (H, W) and state.num_input == H * W
                assert tokens.shape[1] == k, (method, budget, tokens.shape)
                assert len(calls) >= 4 and y.shape == ref.shape and torch.isfinite(y).all()
                assert tokenprune.get_patch(model).plan_for(H * W, (H, W)).num_out == k
            finally:
                tokenprune.remove(model)
    monkeypatch.undo()
    assert {n: type(m) for n, m in model.named_modules()} == classes and list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(_out(model, inputs), ref)


def test_padded_batch_matches_single():
    model = make_tower()
    pv, mask, ss = _inputs()
    pv = torch.stack([pv[0], 4 * pv[1].flip(-1)])
    for t in [f / (H * W) for f in (1.0, 0.998, 1.002, 0.995, 1.005, 0.99, 1.01, 0.98, 1.02, 0.95, 1.05, 0.9, 1.1)]:
        tokenprune.apply(model, 0.75, "cls", threshold=t, layers=[1])
        try:
            with torch.no_grad():
                single = [tokenprune.features(model, pv[i:i + 1], mask[i:i + 1], ss[i:i + 1])[0].shape[1]
                          for i in range(2)]
                if len(set(single)) == 1:
                    continue
                both = model(pv, mask, ss).pooler_output
                alone = torch.cat([model(pv[i:i + 1], mask[i:i + 1], ss[i:i + 1]).pooler_output for i in range(2)])
        finally:
            tokenprune.remove(model)
        torch.testing.assert_close(both, alone, rtol=1e-4, atol=1e-5)
        return
    pytest.fail("no threshold gave the two samples different counts")


def test_classifier_mean_is_size_weighted():
    model = make_classifier()
    inputs = _inputs()
    tokenprune.apply(model, 0.25, "merge")
    try:
        with torch.no_grad():
            got = model(*inputs).logits
            tokens, state = tokenprune.features(model, *inputs)
            full, present = tokenprune.unmerge(model.vision_model.post_layernorm(tokens), state)
            want = model.classifier(full.mean(1))
            plain = model.classifier(model.vision_model.post_layernorm(tokens).mean(1))
    finally:
        tokenprune.remove(model)
    assert present.all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-4)


def test_refusals():
    model = make_tower()
    pv, mask, ss = _inputs()
    tokenprune.apply(model, 0.5, "merge")
    try:
        with pytest.raises(ValueError, match="mixes spatial_shapes"):
            model(pv, mask, torch.tensor([[4, 6], [6, 4]]))
        bad = mask.clone()
        bad[0, 0] = 0
        with pytest.raises(ValueError, match="first h\\*w patches"):
            model(pv, bad, ss)
        with pytest.raises(ValueError, match="output_hidden_states"):
            model(pv, mask, ss, output_hidden_states=True)
    finally:
        tokenprune.remove(model)
