"""Inputs at the edges: an empty batch, tracing, beam search."""
import pytest
import torch

import tokenprune
from conftest import tiny_vit

METHODS = [("merge", {}), ("cls", {}), ("random", {}), ("apet", {"k": 4}), ("pool", {}), ("maelre", {}),
           ("threshold", {}), (["cls", "merge"], {}), ("cls", {"threshold": 0.01})]


@pytest.mark.parametrize("method,kw", METHODS, ids=[f"{m}{kw}" for m, kw in METHODS])
def test_empty_batch_gives_an_empty_batch(method, kw):
    model = tiny_vit()
    x = torch.randn(0, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        tokenprune.apply(model, budget=0.25, method=method, **kw)
        out = model(x)
        tokens, state = tokenprune.features(model, x)
        one, _ = tokenprune.features(model, torch.randn(1, 3, 32, 32))
    assert out.shape == want.shape == (0, 10)
    assert tokens.shape == (0, *one.shape[1:])  # the same token count a one-image batch leaves with


def test_jit_trace_is_refused_clearly():
    model = tiny_vit()
    tokenprune.apply(model, budget=0.25, method="merge")
    with pytest.raises(RuntimeError, match="torch.jit.trace cannot record a reduced model"):
        torch.jit.trace(model, torch.randn(1, 3, 32, 32))
    tokenprune.remove(model)
    torch.jit.trace(model, torch.randn(1, 3, 32, 32))  # the unpatched model still traces


def test_whisper_beam_search_keeps_the_token_sizes():
    """Beam search expands the encoder output per beam; the size bias must reach every cross-attention call
    with the beams' batch (before, the bias rode on the encoder tensor and beam expansion dropped it)."""
    from test_adapters_matrix import make_whisper
    from tokenprune.adapters import hf_common

    fam = make_whisper()
    model, x = fam["model"], fam["x"]
    cross = {id(layer.encoder_attn) for layer in model.model.decoder.layers}
    seen = []
    real = hf_common._kernel

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        if id(module) in cross:
            ctx = kwargs.get("tokenprune")
            bias = getattr(ctx, "bias", None)
            seen.append(None if bias is None else (bias.shape[0], query.shape[0], bias.shape[-1], key.shape[-2]))
        return real(module, query, key, value, attention_mask, *args, **kwargs)

    tokenprune.apply(model, budget=0.5, method="merge")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS[hf_common.KERNEL_NAME] = spy
    try:
        with torch.no_grad():
            out = model.generate(input_features=x, num_beams=2, max_new_tokens=3, do_sample=False)
    finally:
        ALL_ATTENTION_FUNCTIONS[hf_common.KERNEL_NAME] = real
    assert out.shape[0] == x.shape[0] and seen
    assert all(s is not None and s[0] == s[1] and s[2] == s[3] for s in seen), seen[:4]
    assert any(s[1] == 2 * x.shape[0] for s in seen)  # the beams' batch, with its own bias rows
