"""timm NaFlexVit (tiny random models, CPU), NaFlex patch dicts: a batch mixing grids equals each image alone
(its own grid, exactly K_b tokens) for merge / cls / random / apet / pool at budgets 0.5 / 0.25; budget 1.0 equals
the unpatched model; ``remove`` bit-identical; timm's ``Attention`` module (and its eager path) is never called;
``forward_head(**forward_features(...))`` pools with sizes; RoPE configurations (EvaBlock) on one grid per batch.
Image input is in the adapter matrix (``tests/test_adapters_matrix.py``)."""
from __future__ import annotations

import pytest
import torch

import tokenprune
from tokenprune.plan import keep_count

from conftest import compile_cases, compiled_equals_eager

timm = pytest.importorskip("timm")
naflexvit = pytest.importorskip("timm.models.naflexvit")

pytestmark = pytest.mark.usefixtures("one_thread")

L = 28  # patches per row, padding included
METHODS = [("merge", {}), ("cls", {}), ("random", {}), ("apet", {"k": 2}), ("pool", {})]


def make(pool: str = "map", depth: int = 4, **kw):
    torch.manual_seed(0)
    name = "naflexvit_base_patch16_map" if pool == "map" else "naflexvit_base_patch16_gap"
    return timm.create_model(name, pretrained=False, patch_size=4, embed_dim=32, depth=depth, num_heads=4,
                             num_classes=10, pos_embed_grid_size=(4, 4), global_pool=pool, **kw).eval()


def naflex(images, length: int = L) -> dict:
    """A NaFlex batch as timm's Patchify + collator make it: each image's row-major patches, then padding."""
    patches, coords, valid = [], [], []
    for im in images:
        p, (h, w) = naflexvit.batch_patchify(im[None], (4, 4))
        n = h * w
        pp = torch.zeros(length, p.shape[-1])
        pp[:n] = p[0]
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        c = torch.zeros(length, 2, dtype=torch.long)
        c[:n] = torch.stack([yy.reshape(-1), xx.reshape(-1)], -1)
        v = torch.zeros(length, dtype=torch.bool)
        v[:n] = True
        patches.append(pp), coords.append(c), valid.append(v)
    return dict(patches=torch.stack(patches), patch_coord=torch.stack(coords), patch_valid=torch.stack(valid))


def _images():
    torch.manual_seed(3)
    return [torch.randn(3, 16, 24), 4 * torch.randn(3, 12, 16)]  # 4 x 6 and 3 x 4 patch grids


@pytest.mark.parametrize("pool", ["map", "avg"])
def test_mixed_grids_batch_equals_each_alone(pool):
    model = make(pool)
    images = _images()
    batch, counts = naflex(images), [24, 12]
    p = model.num_prefix_tokens  # register tokens: 1 (map) or 4 (gap)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(batch)
        ref_alone = torch.cat([model(naflex([im])) for im in images])
        ref_tokens = model.forward_features(**{"patches": batch["patches"], "patch_coord": batch["patch_coord"],
                                               "patch_valid": batch["patch_valid"]})["patches"]
    torch.testing.assert_close(ref, ref_alone, rtol=1e-4, atol=1e-5)  # timm's own batch is per-sample exact
    with torch.no_grad():
        tokenprune.apply(model, 1.0, "merge")
        try:
            torch.testing.assert_close(model(batch), ref, rtol=1e-5, atol=1e-5)
            tokens, state = tokenprune.features(model, batch)
            for i, n in enumerate(counts):
                torch.testing.assert_close(tokens[i, : p + n], ref_tokens[i, : p + n], rtol=1e-5, atol=1e-5)
        finally:
            tokenprune.remove(model)
    for method, kw in METHODS:
        for budget in (0.5, 0.25):
            tokenprune.apply(model, budget, method, **kw)
            try:
                with torch.no_grad():
                    y = model(batch)
                    tokens, state = tokenprune.features(model, batch)
                    alone = [tokenprune.features(model, naflex([im])) for im in images]
                    y_alone = torch.cat([model(naflex([im])) for im in images])
                patch = tokenprune.get_patch(model)
                want = [patch.plan_for(24, (4, 6)).num_out, patch.plan_for(12, (3, 4)).num_out]
                if method != "pool":
                    assert want == [keep_count(budget, n) for n in counts]
                assert state.kept_per_sample().tolist() == want, (method, budget)
                assert tokens.shape[1] == p + max(want)
                for i, k in enumerate(want):
                    assert alone[i][0].shape[1] == p + k
                    torch.testing.assert_close(tokens[i, : p + k], alone[i][0][0], rtol=1e-4, atol=1e-4)
                    assert (state.sizes[i, p + k:] == 0).all()
                torch.testing.assert_close(y, y_alone, rtol=1e-4, atol=1e-4)
            finally:
                tokenprune.remove(model)
    assert list(model.state_dict()) == keys and type(model) is naflexvit.NaFlexVit
    with torch.no_grad():
        assert torch.equal(model(batch), ref)


def test_timm_attention_never_runs():
    """The patched blocks compute attention from the module's weights on SDPA: timm's ``Attention`` module (whose
    forward has the eager path) is never called."""
    model = make()
    batch = naflex(_images())

    def boom(*a, **k):
        raise AssertionError("timm's Attention module was called")

    # the module's forward replaced on the instance, not a hook (a hook on a patched block is refused)
    for blk in model.blocks:
        blk.attn.forward = boom
    try:
        for method, kw in METHODS:
            tokenprune.apply(model, 0.25, method, **kw)
            try:
                with torch.no_grad():
                    assert torch.isfinite(model(batch)).all()
                    assert torch.isfinite(model(torch.randn(2, 3, 16, 16))).all()
            finally:
                tokenprune.remove(model)
        with pytest.raises(AssertionError, match="Attention module was called"):
            model(batch)  # the unpatched model does call it: the spy works
    finally:
        for blk in model.blocks:
            del blk.attn.forward


def test_forward_features_dict_and_head():
    model = make("avg")
    batch = naflex(_images())
    tokenprune.apply(model, 0.25, "merge")
    try:
        with torch.no_grad():
            feats = model.forward_features(batch["patches"], batch["patch_coord"], batch["patch_valid"])
            torch.testing.assert_close(model.forward_head(**feats), model(batch))
            assert feats["patch_valid"].sum(1).tolist() == [6, 3]
            with pytest.raises(ValueError, match="without their sizes"):
                model.forward_head(feats["patches"])
            plain = model.head(model.fc_norm(feats["patches"][:, 4:].sum(1) / feats["patch_valid"].sum(1, True)))
            assert not torch.allclose(model.forward_head(**feats), plain, atol=1e-4)  # sizes matter
    finally:
        tokenprune.remove(model)


def test_patch_dict_fullgraph_compile_is_a_clear_refusal_and_compiles_with_breaks():
    """NaFlex patch dicts: the grids are read on the host. fullgraph=True says so and what to do (it raised Dynamo's
    "Could not guard on data-dependent expression" at a tokenprune line); without fullgraph it equals eager."""
    model = make(depth=2)
    batch = naflex([_images()[0]])
    tokenprune.apply(model, 0.25, "merge")
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            ref = model(batch)
            with pytest.raises(Exception, match=r"tokenprune: torch\.compile\(fullgraph=True\) .*NaFlex patch dicts"
                                                r".*read on the host.*without fullgraph=True"):
                torch.compile(model, fullgraph=True, backend="eager")(batch)
            torch._dynamo.reset()
            torch.testing.assert_close(torch.compile(model, backend="eager")(batch), ref, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
        tokenprune.remove(model)


@pytest.mark.parametrize("rope", [dict(rope_type="axial"), dict(rope_type="mixed"),
                                  dict(rope_type="dinov3", rope_rotate_half=True)], ids=["axial", "mixed", "dinov3"])
def test_rope_one_grid(rope):
    """EvaBlock NaFlexVit (RoPE): exact at budget 1.0, K tokens, image input equals the same image as NaFlex patches;
    a batch mixing grids is refused with the reason."""
    model = make("avg", **rope)
    assert type(model.blocks[0]).__name__ == "EvaBlock"
    img = torch.randn(2, 3, 16, 24)
    batch = naflex(list(img))
    with torch.no_grad():
        ref = model(img)  # (timm 1.0.29's own NaFlex path fails with mixed RoPE: the image input is the reference)
        tokenprune.apply(model, 1.0, "merge")
        try:
            torch.testing.assert_close(model(img), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model(batch), ref, rtol=1e-5, atol=1e-5)
        finally:
            tokenprune.remove(model)
        for method in ("merge", "cls", "pool"):
            tokenprune.apply(model, 0.25, method)
            try:
                tokens, state = tokenprune.features(model, batch)
                assert state.kept_per_sample().tolist() == [tokenprune.plan(model, input_shape=(16, 24)).num_out] * 2 \
                    if method == "pool" else [keep_count(0.25, 24)] * 2
                torch.testing.assert_close(model(batch), model(img), rtol=1e-4, atol=1e-5)
                with pytest.raises(ValueError, match="one patch grid per batch"):
                    model(naflex(_images()))
            finally:
                tokenprune.remove(model)
    with torch.no_grad():
        assert torch.equal(model(img), ref)


def test_refusals():
    model = make()
    batch = naflex(_images())
    tokenprune.apply(model, 0.5, "merge")
    try:
        bad = dict(batch, patch_valid=batch["patch_valid"].roll(1, 1))
        with pytest.raises(ValueError, match="row-major grid of patches first"):
            model(bad)
        with pytest.raises(ValueError, match="attn_mask"):
            model(dict(batch, attn_mask=torch.zeros(2, 1, 29, 29)))
        with pytest.raises(NotImplementedError, match="forward_intermediates"):
            model.forward_intermediates(torch.randn(1, 3, 16, 16))
    finally:
        tokenprune.remove(model)
    tokenprune.apply(model, 0.5, "merge", placement="attn")
    try:
        model(naflex(_images()[:1]))  # one grid: inside the block is fine
        with pytest.raises(ValueError, match="placement='block'"):
            model(batch)
    finally:
        tokenprune.remove(model)


def test_hooks_on_the_blocks_are_refused_on_a_batch_mixing_grids():
    """The blocks run written out on a batch mixing grids too (its own loop), so a hook on one would not run: it is
    refused there as on one grid (the mixed-grid loop skipped the scan and ran without the hook, silently)."""
    model = make()
    batch = naflex(_images())
    tokenprune.apply(model, 0.5, "merge")
    try:
        with torch.no_grad():
            ref = model(batch)
            h = model.blocks[1].mlp.fc1.register_forward_hook(lambda *a: None)
            with pytest.raises(RuntimeError, match="hook is registered on block 1 \\(mlp.fc1\\)"):
                model(batch)
            h.remove()
            torch.testing.assert_close(model(batch), ref, rtol=0, atol=0)
    finally:
        tokenprune.remove(model)


@pytest.mark.xdist_group("fullgraph-naflexvit")
@pytest.mark.parametrize("method", ["merge", "cls", "pool"])
def test_image_input_compiles_fullgraph(method, fullgraph, request):
    """Image input has one grid, known from the shape: no host sync, so the patched forward compiles whole."""
    compiled_equals_eager(fullgraph, request)


def _compile_case(method):
    model = make(depth=3)
    tokenprune.apply(model, 0.25, method)
    return model, torch.randn(2, 3, 16, 16)


@pytest.fixture(scope="module")
def fullgraph(request):
    """The selected cases of test_image_input_compiles_fullgraph, compiled with fullgraph=True in one trace."""
    return compile_cases(request, {"test_image_input_compiles_fullgraph": _compile_case})


def test_default_grid_is_a_placeholder_options_are_checked_per_input():
    """This NaFlexVit's default grid (4 x 4, its position table; no img_size given) is a placeholder: apply() does
    not refuse apet's default basis (k=10) at budget 0.5 because 16 tokens would be too few; each input is checked
    at its forward, with an error naming its size. Options wrong for every input are still refused at apply()."""
    model = make()
    tokenprune.apply(model, 0.5, "apet")
    try:
        with torch.no_grad():
            img = torch.randn(2, 3, 32, 40)  # 8 x 10 patches
            tokens, _ = tokenprune.features(model, img)
            assert tokens.shape[1] - model.num_prefix_tokens == keep_count(0.5, 80)
            tokens, _ = tokenprune.features(model, naflex(_images()[:1]))  # a NaFlex dict: 4 x 6 patches
            assert tokens.shape[1] - model.num_prefix_tokens == 12
            with pytest.raises(ValueError, match=r"input of 12 tokens.*k=10.*use k <= \d+ or a larger budget"):
                model(naflex(_images()[1:]))  # 3 x 4 patches
    finally:
        tokenprune.remove(model)
    with pytest.raises(ValueError, match=r"outside the encoder's blocks"):
        tokenprune.apply(model, 0.5, "apet", layers=[9])
    with pytest.raises(ValueError, match="k \\(basis tokens\\) must be a positive integer"):
        tokenprune.apply(model, 0.5, "apet", k=0)
    assert not tokenprune.is_applied(model)
    with pytest.raises(ValueError, match=r"input of 16 tokens.*k=10"):
        tokenprune.plan(model, 0.5, "apet")  # planning the default input itself says why it does not fit


def test_pitome_default_runs_on_a_batch_mixing_grids():
    """pitome's default placement on NaFlexVit is after the block (inside it is not available for a batch mixing
    grids, and an image must get what it gets alone): a mixed batch equals each image alone, with its own K_b."""
    model = make()
    batch = naflex(_images())
    tokenprune.apply(model, 0.5, "pitome")
    try:
        assert not any(s.mid for s in tokenprune.plan(model).stages)
        with torch.no_grad():
            tokens, state = tokenprune.features(model, batch)
            alone = [tokenprune.features(model, naflex([im]))[0] for im in _images()]
        p = model.num_prefix_tokens
        for i, n in enumerate([24, 12]):
            k = keep_count(0.5, n)
            assert alone[i].shape[1] == p + k
            torch.testing.assert_close(tokens[i, :p + k], alone[i][0], rtol=1e-4, atol=1e-4)
    finally:
        tokenprune.remove(model)
