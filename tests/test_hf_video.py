"""Hugging Face video encoders beyond VideoMAE: ViViT (tiny random models, CPU) reduced on the input's real tubelet
grid (``pool`` per frame, a non-square frame), its base model's pooler exact at budget 1.0;
TimeSformer refused with the supported families named. The family matrix (exact K, ``remove``, eager attention,
padded batches) has ViViT too (``tests/test_adapters_matrix.py``)."""
from __future__ import annotations

import pytest
import torch

import tokenprune

from conftest import compile_cases, compiled_equals_eager

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_vivit_grid_is_the_inputs():
    from transformers import VivitConfig, VivitModel

    torch.manual_seed(0)
    cfg = VivitConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      image_size=[16, 24], num_frames=4, tubelet_size=[2, 4, 4])
    model = VivitModel(cfg).eval()
    x = torch.randn(2, 4, 3, 16, 24)  # 2 x 4 x 6 tubelets
    with torch.no_grad():
        ref = model(x).pooler_output
        tokenprune.apply(model, 1.0, "merge")
        try:
            torch.testing.assert_close(model(x).pooler_output, ref, rtol=1e-5, atol=1e-6)
        finally:
            tokenprune.remove(model)
        tokenprune.apply(model, 0.25, "pool")
        try:
            tokens, state = tokenprune.features(model, x)
            planned = tokenprune.plan(model, input_shape=x.shape)
            assert state.input_grid == (2, 4, 6) == planned.info.grid == tokenprune.plan(model).info.grid
            assert tokens.shape[1] == 1 + planned.num_out == 1 + 2 * 2 * 3
            assert state.grid == (2, 2, 3)  # pooled per frame, each frame's own 2 x 3 cells
        finally:
            tokenprune.remove(model)


def test_timesformer_is_refused():
    from transformers import TimesformerConfig, TimesformerModel

    model = TimesformerModel(TimesformerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=16, patch_size=4, num_frames=2))
    with pytest.raises(TypeError, match="no adapter for .*Timesformer.*Supported model families"):
        tokenprune.apply(model, 0.5, "merge")
    assert tokenprune.get_patch(model) is None


@pytest.mark.xdist_group("fullgraph-hf_video")
@pytest.mark.parametrize("method", ["merge", "cls", "pool"])
def test_vivit_compiles_fullgraph(method, fullgraph, request):
    compiled_equals_eager(fullgraph, request)


def _compile_case(method):
    from test_adapters_matrix import make_vivit

    fam = make_vivit()
    model = fam["model"]
    tokenprune.apply(model, 0.25, method)
    return (lambda v: model(v).logits), fam["x"]


@pytest.fixture(scope="module")
def fullgraph(request):
    """The selected cases of test_vivit_compiles_fullgraph, compiled with fullgraph=True in one trace (conftest)."""
    return compile_cases(request, {"test_vivit_compiles_fullgraph": _compile_case})
