"""SigLIP2 NaFlex towers (tiny random models, CPU): padded patch sequences with ``pixel_attention_mask`` and
``spatial_shapes``. Budget 1.0 equals the unpatched model on the real patches; exactly K tokens for merge / cls /
apet / random / pool on the image's own (non-square) grid; ``remove`` bit-identical; eager attention never entered;
a padded per-sample batch equals each sample alone; the classifier's mean is size-weighted; a batch mixing spatial
shapes equals each image alone (its own grid, its own K)."""
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


def test_features_at_budget_one_are_the_last_hidden_state():
    """tokenprune.features: the output tokens with the final norm applied, i.e. the tower's last_hidden_state."""
    model = make_tower()
    inputs = _inputs()
    with torch.no_grad():
        want = model(*inputs).last_hidden_state
        with tokenprune.applied(model, 1.0, "merge"):
            got, state = tokenprune.features(model, *inputs)
    assert got.shape[1] == H * W  # the real patches (the processor's padding slots are left out)
    torch.testing.assert_close(got, want[:, :H * W], atol=1e-5, rtol=1e-5)


def test_classifier_mean_is_size_weighted():
    model = make_classifier()
    inputs = _inputs()
    tokenprune.apply(model, 0.25, "merge")
    try:
        with torch.no_grad():
            got = model(*inputs).logits
            tokens, state = tokenprune.features(model, *inputs)
            full, present = tokenprune.unmerge(tokens, state)  # features: after the post-layernorm
            want = model.classifier(full.mean(1))
            plain = model.classifier(tokens.mean(1))
    finally:
        tokenprune.remove(model)
    assert present.all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-4)


def _mixed(b_grid=(3, 4)):
    """Two images of different shapes in one batch: a 4 x 6 grid and a ``b_grid`` one, padded to L patches."""
    pv, mask, _ = _inputs()
    pv = torch.stack([pv[0], 4 * pv[1].flip(-1)])
    mask = mask.clone()
    mask[1] = 0
    mask[1, : b_grid[0] * b_grid[1]] = 1
    return pv, mask, torch.tensor([[H, W], list(b_grid)])


@pytest.mark.parametrize("maker", [make_tower, make_classifier], ids=["tower", "classifier"])
def test_mixed_shapes_batch_equals_each_alone(maker, monkeypatch):
    """A batch mixing spatial shapes: every image is reduced on its own grid to its own K, exactly as alone, the
    pooling head sees only its tokens; budget 1.0 is the unpatched model; eager attention never runs."""
    model = maker()
    pv, mask, ss = _mixed()
    counts = [H * W, 3 * 4]
    tower = model if maker is make_tower else model.vision_model
    with torch.no_grad():
        ref = _out(model, (pv, mask, ss))
        ref_tokens = tower(pv, mask, ss).last_hidden_state
        tokenprune.apply(model, 1.0, "merge")
        try:
            torch.testing.assert_close(_out(model, (pv, mask, ss)), ref, rtol=1e-5, atol=1e-5)
            out = tower(pv, mask, ss)
            tokens = out.last_hidden_state
            for i, n in enumerate(counts):
                torch.testing.assert_close(tokens[i, :n], ref_tokens[i, :n], rtol=1e-5, atol=1e-5)
            assert out["tokenprune_mask"].sum(1).tolist() == counts  # the real tokens, the input's padding dropped
            torch.testing.assert_close(tokens[out["tokenprune_mask"]], ref_tokens[mask.bool()], rtol=1e-5, atol=1e-5)
            assert len(tower(pv, mask, ss, return_dict=False)) == 2  # HF's tuple: no extra entry
        finally:
            tokenprune.remove(model)
    monkeypatch.setattr(importlib.import_module("transformers.models.siglip2.modeling_siglip2"),
                        "eager_attention_forward", lambda *a, **k: pytest.fail("eager attention was called"))
    for method, kw in METHODS:
        for budget in (0.5, 0.25):
            tokenprune.apply(model, budget, method, **kw)
            try:
                with torch.no_grad():
                    tokens, state = tokenprune.features(model, pv, mask, ss)
                    both = _out(model, (pv, mask, ss))
                    alone = [tokenprune.features(model, pv[i:i + 1], mask[i:i + 1], ss[i:i + 1]) for i in range(2)]
                    alone_out = torch.cat([_out(model, (pv[i:i + 1], mask[i:i + 1], ss[i:i + 1])) for i in range(2)])
                patch = tokenprune.get_patch(model)
                want = [patch.plan_for(n, tuple(g)).num_out for n, g in zip(counts, ss.tolist())]
                if method != "pool":
                    assert want == [keep_count(budget, n) for n in counts]
                assert state.kept_per_sample().tolist() == want, (method, budget)
                assert tokens.shape[1] == max(want)
                with torch.no_grad():
                    assert tower(pv, mask, ss)["tokenprune_mask"].sum(1).tolist() == want, (method, budget)
                for i in range(2):
                    k = want[i]
                    assert alone[i][0].shape[1] == k
                    torch.testing.assert_close(tokens[i, :k], alone[i][0][0], rtol=1e-4, atol=1e-4)
                    torch.testing.assert_close(state.sizes[i, :k], alone[i][1].sizes_or_ones()[0])
                    assert (state.sizes[i, k:] == 0).all()
                    got_src, want_src = state.source[i, : counts[i]], alone[i][1].source[0]
                    assert torch.equal(got_src, want_src) and (state.source[i, counts[i]:] == -1).all()
                torch.testing.assert_close(both, alone_out, rtol=1e-4, atol=1e-4)
            finally:
                tokenprune.remove(model)


def test_mixed_shapes_same_count():
    """Two grids with the same number of patches (4 x 6 and 6 x 4): no padding slot, each image on its own grid
    (pool groups each image's own neighbours)."""
    model = make_tower()
    pv, mask, ss = _mixed((6, 4))
    for method in ("pool", "merge"):
        tokenprune.apply(model, 0.25, method)
        try:
            with torch.no_grad():
                both = model(pv, mask, ss).pooler_output
                alone = torch.cat([model(pv[i:i + 1], mask[i:i + 1], ss[i:i + 1]).pooler_output for i in range(2)])
        finally:
            tokenprune.remove(model)
        torch.testing.assert_close(both, alone, rtol=1e-4, atol=1e-4)


def test_refusals():
    model = make_tower()
    pv, mask, ss = _inputs()
    tokenprune.apply(model, 0.5, "merge")
    try:
        bad = mask.clone()
        bad[0, 0] = 0
        with pytest.raises(ValueError, match="first h\\*w patches"):
            model(pv, bad, ss)
        with pytest.raises(ValueError, match="more than the 28 patches"):
            model(pv, mask, torch.tensor([[4, 6], [6, 6]]))
        with pytest.raises(ValueError, match="output_hidden_states"):
            model(pv, mask, ss, output_hidden_states=True)
    finally:
        tokenprune.remove(model)
    tokenprune.apply(model, 0.5, "maelre", switch_at=16)
    try:
        with pytest.raises(ValueError, match="switch attention kernels"):
            model(*_mixed())
    finally:
        tokenprune.remove(model)


def test_apet_default_k_on_an_image_of_fewer_tokens():
    """apet's basis (k=10 by default) bounds what a stage may keep, not the input: at budget 1.0 a batch mixing a
    4 x 6 image with a 2 x 4 one (8 patches < k) runs and reduces nothing (the unpatched model's tokens)."""
    model = make_tower()
    pv, mask, ss = _mixed((2, 4))
    with torch.no_grad():
        ref = model(pv, mask, ss).last_hidden_state
        tokenprune.apply(model, 1.0, "apet")
        try:
            got = model(pv, mask, ss).last_hidden_state
        finally:
            tokenprune.remove(model)
    for i, n in enumerate([H * W, 8]):
        torch.testing.assert_close(got[i, :n], ref[i, :n], rtol=1e-5, atol=1e-5)


def test_apet_default_k_is_checked_per_input():
    """SigLIP2's default grid (num_patches, the position table) is a placeholder: apply() with apet's default
    basis (k=10) at budget 0.5 is not refused for it; the 4 x 6 image runs, and a batch with a 2 x 4 image (which
    would have to keep 4 < k tokens) gets an error naming that input's size and what to do."""
    model = make_tower()
    pv, mask, ss = _mixed((2, 4))
    tokenprune.apply(model, 0.5, "apet")
    try:
        with torch.no_grad():
            tokens, state = tokenprune.features(model, pv[:1], mask[:1], ss[:1])
            assert tokens.shape[1] == H * W // 2
            with pytest.raises(ValueError, match=r"input of 8 tokens.*k=10.*use k <= 4 or a larger budget"):
                model(pv, mask, ss)
    finally:
        tokenprune.remove(model)


def test_fullgraph_compile_is_a_clear_refusal_and_compiles_with_breaks():
    """The unpatched tower compiles with fullgraph=True; the patched one reads the grids on the host, and Dynamo's
    "Could not guard on data-dependent expression" pointing at a tokenprune line read like a bug there. It says what
    it is and what to do; without fullgraph the compiled forward equals eager."""
    model = make_tower()
    tokenprune.apply(model, 0.25, "merge")
    inputs = _inputs()
    fn = lambda *a: model(*a).last_hidden_state  # noqa: E731
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            ref = fn(*inputs)
            with pytest.raises(Exception, match=r"tokenprune: torch\.compile\(fullgraph=True\) .*SigLIP2.*read on "
                                                r"the host.*without fullgraph=True"):
                torch.compile(fn, fullgraph=True, backend="eager")(*inputs)
            torch._dynamo.reset()
            torch.testing.assert_close(torch.compile(fn, backend="eager")(*inputs), ref, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
