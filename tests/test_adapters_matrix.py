"""Family x reducer x budget matrix for the non-timm adapters (tiny random models, CPU).

For every family and every registered reducer, at budgets 0.5 and 0.25:
the tokens leaving the encoder match ``round(budget * N)``; the outputs are
finite; SDPA runs in every exact-attention block and the family's eager
attention function is never called; ``remove`` restores the model
bit-exactly (outputs, classes, attention implementation, state_dict keys).
Plus: per-sample (padded) reduction gives each sample what it gets alone,
Whisper ``generate`` runs with fewer cross-attention keys, the text towers
are untouched, and unsupported families get an error naming the supported ones.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tokenprune
from tokenprune.plan import keep_count

from conftest import SDPASpy

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")

BUDGETS = [0.5, 0.25]
# options that make a method fit a 16..32-token toy encoder
OPTIONS = {"apet": {"k": 2}}  # pitome's default placement: inside the blocks where the family can, else after them
SKIP = {"pipeline"}  # a composition of the others, needs a list of reducers (tested by its own file)



def _seed():
    torch.manual_seed(0)


# -- tiny models: (model, input, encoder(model, x) -> last tokens, prefix, num_tokens, full forward) --------
def make_open_clip():
    open_clip = pytest.importorskip("open_clip")
    _seed()
    m = open_clip.model.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=4,
                                                           head_width=8, pool_type="avg"),
                             text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=4, layers=1)).eval()
    x = torch.randn(2, 3, 32, 32)

    def tokens(model, x):
        model.visual.output_tokens = True
        try:
            return model.visual(x)[1]  # non-prefix tokens
        finally:
            model.visual.output_tokens = False

    return dict(model=m, x=x, tokens=tokens, prefix=0, n=16, out=lambda model, x: model.encode_image(x),
                eager=None)


def _open_clip_timm(trunk_name, pool, prefix):
    """An open_clip tower that is a timm trunk (``TimmModel``), as ViT-B-16-SigLIP / SigLIP2 (timm ViT with map
    pooling) and PE-Core (timm Eva) are: the tower is built by open_clip, its trunk swapped for a tiny one."""
    open_clip = pytest.importorskip("open_clip")
    import timm

    _seed()
    m = open_clip.model.CLIP(embed_dim=16, vision_cfg=dict(timm_model_name="vit_tiny_patch16_224",
                                                           timm_model_pretrained=False, timm_pool=pool,
                                                           timm_proj="none", image_size=32),
                             text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=4, layers=1)).eval()
    m.visual.trunk = timm.create_model(trunk_name, img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4,
                                       num_classes=16, global_pool=pool).eval()
    return dict(model=m, x=torch.randn(2, 3, 32, 32), tokens=lambda model, x: tokenprune.features(model, x)[0],
                prefix=prefix, n=16, out=lambda model, x: model.encode_image(x), eager=None)


def make_open_clip_siglip():
    return _open_clip_timm("vit_base_patch16_siglip_224", "map", 0)


def make_open_clip_pe():
    return _open_clip_timm("vit_pe_core_tiny_patch16_384", "map", 1)


def _hf_vision_tower(config_cls, model_cls, prefix: int, module: str, layers: int = 4):
    """A tiny Hugging Face vision tower (CLIP / SigLIP): 32 px images, 8 px patches, 16 patch tokens."""
    _seed()
    cfg = config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     image_size=32, patch_size=8)
    m = model_cls(cfg).eval()
    return dict(model=m, x=torch.randn(2, 3, 32, 32), tokens=lambda model, x: model(x).last_hidden_state,
                prefix=prefix, n=16, out=lambda model, x: model(x).pooler_output, eager=module)


def make_hf_clip(layers: int = 4):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return _hf_vision_tower(CLIPVisionConfig, CLIPVisionModel, 1, "transformers.models.clip.modeling_clip", layers)


def make_siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return _hf_vision_tower(SiglipVisionConfig, SiglipVisionModel, 0, "transformers.models.siglip.modeling_siglip")


def _whisper_cfg(layers: int = 4):
    from transformers import WhisperConfig

    return WhisperConfig(vocab_size=60, d_model=32, encoder_layers=layers, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=32,
                         max_target_positions=16, num_mel_bins=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None)


def make_whisper(layers: int = 4):
    from transformers import WhisperForConditionalGeneration

    _seed()
    m = WhisperForConditionalGeneration(_whisper_cfg(layers)).eval()
    x = torch.randn(2, 8, 64)  # 64 mel frames -> 32 encoder tokens
    dec = torch.tensor([[1, 5, 7], [1, 5, 7]])  # same prompt for both rows, so row slices compare

    def out(model, x):
        return model(input_features=x, decoder_input_ids=dec[: x.shape[0]]).logits

    return dict(model=m, x=x, tokens=lambda model, x: model.model.encoder(x).last_hidden_state, prefix=0, n=32,
                out=out, eager="transformers.models.whisper.modeling_whisper")


def make_ast():
    from transformers import ASTConfig, ASTForAudioClassification

    _seed()
    cfg = ASTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, patch_size=4,
                    frequency_stride=4, time_stride=4, num_mel_bins=16, max_length=32, num_labels=5)
    m = ASTForAudioClassification(cfg).eval()
    return dict(model=m, x=torch.randn(2, 32, 16),
                tokens=lambda model, x: model.audio_spectrogram_transformer(x).last_hidden_state, prefix=2, n=32,
                out=lambda model, x: model(x).logits,
                eager="transformers.models.audio_spectrogram_transformer.modeling_audio_spectrogram_transformer")


def make_videomae():
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    _seed()
    cfg = VideoMAEConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         image_size=16, patch_size=4, num_frames=4, tubelet_size=2, num_labels=5)
    m = VideoMAEForVideoClassification(cfg).eval()
    return dict(model=m, x=torch.randn(2, 4, 3, 16, 16), tokens=lambda model, x: model.videomae(x).last_hidden_state,
                prefix=0, n=32, out=lambda model, x: model(x).logits,
                eager="transformers.models.videomae.modeling_videomae")


def make_vivit():
    from transformers import VivitConfig, VivitForVideoClassification

    _seed()
    cfg = VivitConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=16,
                      num_frames=4, tubelet_size=[2, 4, 4], num_labels=5)
    m = VivitForVideoClassification(cfg).eval()
    return dict(model=m, x=torch.randn(2, 4, 3, 16, 16), tokens=lambda model, x: model.vivit(x).last_hidden_state,
                prefix=1, n=32, out=lambda model, x: model(x).logits,
                eager="transformers.models.vivit.modeling_vivit")


def make_timm_naflex():
    """timm NaFlexVit on image input (its NaFlex patch dicts, mixed grids included: tests/test_naflexvit.py)."""
    import timm

    _seed()
    m = timm.create_model("naflexvit_base_patch16_map", pretrained=False, patch_size=4, embed_dim=32, depth=4,
                          num_heads=4, num_classes=10, pos_embed_grid_size=(4, 4)).eval()
    return dict(model=m, x=torch.randn(2, 3, 16, 16), tokens=lambda model, x: tokenprune.features(model, x)[0],
                prefix=1, n=16, out=lambda model, x: model(x), eager=None)


FAMILIES = {"open_clip": make_open_clip, "open_clip_siglip": make_open_clip_siglip, "open_clip_pe": make_open_clip_pe,
            "hf_clip": make_hf_clip, "siglip": make_siglip, "whisper": make_whisper,
            "ast": make_ast, "videomae": make_videomae, "vivit": make_vivit,
            "timm_naflex": make_timm_naflex}


def _methods():
    return [m for m in tokenprune.methods() if m not in SKIP]


def _class_map(model):
    return {name: type(mod) for name, mod in model.named_modules()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_matrix(family, monkeypatch):
    fam = FAMILIES[family]()
    model, x = fam["model"], fam["x"]
    classes, keys = _class_map(model), list(model.state_dict())
    with torch.no_grad():
        ref = fam["out"](model, x)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    spy = SDPASpy(monkeypatch, fam["eager"])
    ran = 0
    for method in _methods():
        for budget in BUDGETS:
            tokenprune.apply(model, budget, method, **OPTIONS.get(method, {}))
            try:
                plan = tokenprune.plan(model)
                k = keep_count(budget, fam["n"])
                assert plan.info.num_tokens == fam["n"] and plan.num_out == k, (method, budget)
                spy.calls = 0
                # grad mode on: nn.MultiheadAttention then takes the python path that calls SDPA
                toks = fam["tokens"](model, x)
                exact_blocks = plan.attention_per_block().count("sdpa")
                assert spy.calls >= exact_blocks, f"{family}/{method}: SDPA ran {spy.calls}x for {exact_blocks} blocks"
                n_out = toks.shape[1] - fam["prefix"]
                if method == "threshold":  # per-sample counts; the budget is a cap
                    assert 1 <= n_out <= k, (method, budget, n_out)
                else:
                    assert n_out == k, f"{family}/{method}@{budget}: {n_out} tokens left the encoder, expected {k}"
                with torch.no_grad():
                    y = fam["out"](model, x)
                assert y.shape == ref.shape and torch.isfinite(y).all(), (family, method, budget)
                ran += 1
            finally:
                tokenprune.remove(model)
    assert ran >= 6  # at least merge, cls, random at both budgets
    # remove() is exact: same classes, same attention implementation, same keys, bit-identical outputs
    assert _class_map(model) == classes
    assert getattr(getattr(model, "config", None), "_attn_implementation", None) == impl
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(fam["out"](model, x), ref)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_budget_one_is_the_unpatched_model(family):
    fam = FAMILIES[family]()
    model, x = fam["model"], fam["x"]
    with torch.no_grad():
        ref = fam["out"](model, x)
        for method in ("merge", "cls"):
            tokenprune.apply(model, 1.0, method)
            try:
                torch.testing.assert_close(fam["out"](model, x), ref, rtol=1e-5, atol=1e-6)
            finally:
                tokenprune.remove(model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_batch_matches_single(family):
    """Per-sample pruning (cls with a score threshold) pads the batch; padding is masked in attention
    (and Whisper's cross-attention) and in pooling, so each sample gets what it gets alone."""
    fam = FAMILIES[family]()
    model, x = fam["model"], fam["x"]
    x = torch.stack([x[0], 4 * x[1].flip(-1)])  # make the samples' score profiles differ
    uniform = 1.0 / (fam["n"] + fam["prefix"])  # random-init attention scores cluster tightly around this
    for t in [f * uniform for f in (1.0, 0.998, 1.002, 0.995, 1.005, 0.99, 1.01, 0.98, 1.02, 0.95, 1.05)]:
        # one pruning stage (after block 1), so the per-sample counts show in the output
        tokenprune.apply(model, 0.75, "cls", threshold=t, layers=[1])
        try:
            with torch.no_grad():
                single_kept = [fam["tokens"](model, x[i:i + 1]).shape[1] for i in range(x.shape[0])]
                if len(set(single_kept)) == 1:
                    continue  # padding not exercised at this threshold; try another
                kept = fam["tokens"](model, x).shape[1]
                both = fam["out"](model, x)
                alone = torch.cat([fam["out"](model, x[i:i + 1]) for i in range(x.shape[0])])
        finally:
            tokenprune.remove(model)
        assert kept == max(single_kept)
        assert torch.allclose(both, alone, atol=1e-5, rtol=1e-4), (family, t, (both - alone).abs().max())
        return
    pytest.skip(f"{family}: no threshold gave the two samples different counts")


def test_merge_bias_reaches_attention_hf():
    """Proportional attention: with merged tokens the HF kernel adds log(size) to SDPA's mask.
    Check against attention recomputed by hand for one layer."""
    from tokenprune.adapters import hf_common

    fam = make_hf_clip()
    model = fam["model"]
    attn = model.encoder.layers[0].self_attn
    hs = torch.randn(2, 5, 32)
    sizes = torch.tensor([[1.0, 2.0, 3.0, 1.0, 1.0], [1.0, 1.0, 1.0, 4.0, 0.0]])
    bias = sizes.log()[:, None, None, :]
    tokenprune.apply(model, 0.5, "merge")
    try:
        with torch.no_grad():
            got = attn(hs, tokenprune=hf_common.KeyBias([attn], bias))[0]
            other = attn(hs, tokenprune=hf_common.KeyBias([], bias))[0]  # the bias is for the listed modules only
            plain = attn(hs)[0]
    finally:
        tokenprune.remove(model)
    assert torch.equal(other, plain) and not torch.allclose(got, plain, atol=1e-3)
    b, n, c = hs.shape
    q = attn.q_proj(hs).view(b, n, 4, 8).transpose(1, 2)
    k = attn.k_proj(hs).view(b, n, 4, 8).transpose(1, 2)
    v = attn.v_proj(hs).view(b, n, 4, 8).transpose(1, 2)
    w = (q @ k.transpose(-1, -2) * 8 ** -0.5 + bias).softmax(-1)
    want = attn.out_proj((w @ v).transpose(1, 2).reshape(b, n, c))
    assert torch.allclose(got, want, atol=1e-5)


def test_merge_bias_reaches_attention_open_clip():
    from tokenprune.adapters import open_clip_vit as oc

    fam = make_open_clip()
    model = fam["model"]
    blk = model.visual.transformer.resblocks[0]
    hs = torch.randn(2, 5, 32)
    sizes = torch.tensor([[1.0, 2.0, 3.0, 1.0, 1.0], [1.0, 1.0, 1.0, 4.0, 0.0]])
    bias = sizes.log()[:, None, None, :]
    from tokenprune.engine import Forward

    tokenprune.apply(model, 0.5, "merge")
    try:
        with torch.no_grad():
            fwd = Forward(tokenprune.get_patch(model))
            fwd.bias = bias
            got = oc._block(blk, hs, fwd)
            fwd.bias, fwd.want_qk = None, True
            oc._block(blk, hs, fwd)
            qk = fwd.qk
    finally:
        tokenprune.remove(model)
    with torch.no_grad():
        h = blk.ln_1(hs)
        w_in, b_in = blk.attn.in_proj_weight, blk.attn.in_proj_bias
        q, k, v = F.linear(h, w_in, b_in).view(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-1, -2) * 8 ** -0.5 + bias).softmax(-1)
        a = blk.attn.out_proj((w @ v).transpose(1, 2).reshape(2, 5, 32))
        x1 = hs + blk.ls_1(a)
        want = x1 + blk.ls_2(blk.mlp(blk.ln_2(x1)))
    assert torch.allclose(got, want, atol=1e-5)
    # the recorded q/k equal the in-projection of the attention's input
    assert torch.allclose(qk.q, q, atol=1e-6) and torch.allclose(qk.k, k, atol=1e-6)


def test_whisper_generate_with_fewer_cross_attention_keys():
    fam = make_whisper()
    model, x = fam["model"], fam["x"]
    seen = []
    hook = model.model.decoder.layers[0].encoder_attn.k_proj.register_forward_hook(
        lambda m, i, o: seen.append(i[0].shape[1]))
    try:
        for method in ("merge", "cls", "random"):
            tokenprune.apply(model, 0.25, method)
            seen.clear()
            ids = model.generate(x, max_new_tokens=4, do_sample=False)
            tokenprune.remove(model)
            assert ids.shape[0] == 2 and ids.shape[1] >= 2
            assert seen and set(seen) == {keep_count(0.25, 32)}, (method, seen)
    finally:
        hook.remove()


def _unpatched_then_at_budget_1(model, run):
    """``(run(), run())``: the unpatched model's result, then the same call with ``model`` patched at budget 1.0
    (merge: nothing reduced), the patch removed after."""
    ref = run()
    tokenprune.apply(model, 1.0, "merge")
    try:
        return ref, run()
    finally:
        tokenprune.remove(model)


def _assert_written_equals_transformers(fam, model, x, monkeypatch, methods):
    """For each ``(method, options)`` at budget 0.5: the Whisper encoder with its layers written out gives the same
    outputs, bit for bit, as with every layer called through transformers (``whisper._layer`` replaced by ``_CALL``)."""
    from tokenprune.adapters import whisper as W

    for method, options in methods:
        tokenprune.apply(model, 0.5, method, **options)
        try:
            got = fam["out"](model, x)
            with monkeypatch.context() as mp:
                mp.setattr(W, "_layer", W._CALL)
                ref = fam["out"](model, x)
        finally:
            tokenprune.remove(model)
        assert torch.equal(got, ref), method


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_whisper_layers_written_out_equal_transformers_layers(dtype, monkeypatch):
    """In eager inference the encoder layers run written out (batch 1 waits on transformers' call chain): the same
    outputs, bit for bit, as the layers called through transformers with tokenprune_sdpa, for every reducer
    (MAELRE's kernel, threshold's padding bias, cls's recorded attention outputs) and in fp16 (the layer's clamp).
    A layer adapted after apply (a wrapped fc1, as LoRA does) or hooked runs through transformers: its hook runs."""
    from tokenprune.adapters import whisper as W

    fam = make_whisper()
    model, x = fam["model"].to(dtype), fam["x"].to(dtype)
    with torch.no_grad():
        _assert_written_equals_transformers(fam, model, x, monkeypatch, [
            (m, {}) for m in ("merge", "cls", "maelre", "threshold", "random", "pool", ["cls", "merge"])])
        tokenprune.apply(model, 0.5, "merge")
        try:
            ran = []
            enc = model.model.encoder
            layer_calls = []
            real_call = W._CALL
            monkeypatch.setattr(W, "_CALL", lambda layer, h, fwd: (layer_calls.append(layer), real_call(layer, h, fwd))[1])
            fam["out"](model, x)
            assert layer_calls == []  # every layer written out
            inner = enc.layers[1].fc1
            enc.layers[1].fc1 = torch.nn.Sequential(inner, torch.nn.Identity())  # same arithmetic, another module
            adapted = fam["out"](model, x)
            assert layer_calls == [enc.layers[1]]
            enc.layers[1].fc1 = inner
            assert torch.equal(adapted, fam["out"](model, x))
            handle = enc.layers[2].register_forward_hook(lambda *a: ran.append(1))
            layer_calls.clear()
            fam["out"](model, x)
            handle.remove()
            assert ran == [1] and len(layer_calls) == len(enc.layers)
        finally:
            tokenprune.remove(model)


@pytest.mark.parametrize("family", ["hf_clip", "siglip", "whisper", "ast", "videomae"])
def test_transformers_layers_key_bias_route_equals_sdpa(family, monkeypatch):
    """Where the fused key-bias kernel applies (compiled on CUDA, or a large batch), transformers' layers under
    ``tokenprune_sdpa`` hand it the merged tokens' key bias, q rescaled to the kernel's d^-0.5 (Whisper pre-scales q
    and passes scaling 1; the others pass their own scaling). Taken here on the CPU (the decision forced, the op's
    PyTorch reference running): the same tokens as SDPA with the bias as its mask, for merge and for cls after merging
    (its scores read the recorded q and scale, unchanged). Whisper's layers run through transformers here as they do
    when compiled (written out only in eager inference)."""
    from tokenprune import kernels
    from tokenprune.adapters import whisper as W

    fam = FAMILIES[family]()
    model, x = fam["model"], fam["x"][:1]
    if family == "whisper":
        monkeypatch.setattr(W, "hooks_free", lambda *a: False)
    for name, mod in model.named_modules():  # logits of several units: cls's ranking depends on their scale
        if name.endswith(("q_proj", "k_proj", "attention.query", "attention.key")) and hasattr(mod, "weight"):
            mod.weight.data.mul_(4.0)
    calls = []
    real = kernels.biased_attention
    for method in ("merge", ["merge", "cls"]):
        tokenprune.apply(model, 0.5, method)
        try:
            with torch.no_grad():
                monkeypatch.setattr(kernels, "biased_attention_applies", lambda bias, n, d: False)
                ref = fam["tokens"](model, x)
                monkeypatch.setattr(kernels, "biased_attention_applies", lambda bias, n, d: bias is not None)
                monkeypatch.setattr(kernels, "biased_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
                out = fam["tokens"](model, x)
                monkeypatch.setattr(kernels, "biased_attention", real)
        finally:
            tokenprune.remove(model)
        assert calls and ref.shape == out.shape
        assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (method, (out - ref).abs().max())
        calls.clear()


def test_whisper_written_out_layer_keeps_a_custom_activation():
    """A layer whose activation is a subclass of transformers' GELUActivation with a forward of its own (its ``act`` is
    still F.gelu) runs that forward: at budget 1.0 the patched model equals the unpatched one."""
    from transformers.activations import GELUActivation

    class ScaledGELU(GELUActivation):
        def forward(self, x):
            return super().forward(x) * 3

    fam = make_whisper()
    model, x = fam["model"], fam["x"]
    model.model.encoder.layers[1].activation_fn = ScaledGELU()
    with torch.no_grad():
        ref, got = _unpatched_then_at_budget_1(model, lambda: fam["out"](model, x))
    assert torch.equal(got, ref)


@pytest.mark.parametrize("wrapped", [False, True])
def test_whisper_written_out_layers_see_a_replaced_class_forward(wrapped, monkeypatch):
    """A forward replaced on transformers' layer class after a first patched call (the check is cached), plain or
    as a functools.wraps wrapper (which copies the original's name and module), runs: at budget 1.0 the patched
    model equals the unpatched one with that forward."""
    import functools

    from transformers.models.whisper import modeling_whisper as MW

    fam = make_whisper()
    model, x = fam["model"], fam["x"]
    orig = MW.WhisperEncoderLayer.forward

    def doubled(self, *args, **kwargs):
        return orig(self, *args, **kwargs) * 2

    with torch.no_grad():
        tokenprune.apply(model, 1.0, "merge")
        try:
            fam["out"](model, x)
            monkeypatch.setattr(MW.WhisperEncoderLayer, "forward", functools.wraps(orig)(doubled) if wrapped else doubled)
            got = fam["out"](model, x)
        finally:
            tokenprune.remove(model)
        ref = fam["out"](model, x)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("where", ["layer", "self_attn", "q_proj", "fc1", "final_layer_norm", "activation_fn"])
def test_whisper_written_out_layers_run_an_instance_forward(where):
    """A forward set on the module instance (as accelerate's device_map / offload hooks do: ``module.forward =
    wrapper``) on a layer, its attention or a submodule runs: at budget 1.0 the patched model equals the unpatched
    one."""
    fam = make_whisper()
    model, x = fam["model"], fam["x"]
    layer = model.model.encoder.layers[1]
    mod = layer.get_submodule({"layer": "", "q_proj": "self_attn.q_proj"}.get(where, where))
    inner = mod.forward

    def doubled(*args, **kwargs):
        out = inner(*args, **kwargs)
        return (out[0] * 2, *out[1:]) if isinstance(out, tuple) else out * 2

    mod.forward = doubled
    with torch.no_grad():
        ref, got = _unpatched_then_at_budget_1(model, lambda: fam["out"](model, x))
    assert torch.equal(got, ref)


@pytest.mark.parametrize("where", ["layer", "self_attn"])
def test_whisper_written_out_layers_keep_a_layer_in_training_mode(where):
    """An encoder in eval mode with one layer (or its attention) switched to training mode (Monte Carlo dropout) runs
    that layer's dropout as transformers does: at budget 1.0 the patched model equals the unpatched one."""
    from transformers import WhisperForConditionalGeneration

    cfg = _whisper_cfg()
    cfg.dropout = cfg.attention_dropout = cfg.activation_dropout = 0.3
    _seed()
    model = WhisperForConditionalGeneration(cfg).eval()
    x = make_whisper()["x"]
    layer = model.model.encoder.layers[1]
    (layer if where == "layer" else layer.self_attn).train()
    dec = torch.tensor([[1, 5, 7], [1, 5, 7]])

    def run():
        torch.manual_seed(1)  # the same dropout masks in both calls
        return model(input_features=x, decoder_input_ids=dec).logits

    with torch.no_grad():
        ref, got = _unpatched_then_at_budget_1(model, run)
    assert torch.equal(got, ref)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: hooks on modules that return a ModelOutput
def test_whisper_global_backward_hooks_run_on_the_layers():
    """A global module backward hook (torch.nn.modules.module.register_module_full_backward_hook, as profilers and
    gradient inspectors set) runs on the encoder layers' modules as in the unpatched model: the layers go through
    transformers while one is set (the written-out layers ran it only on the stem)."""
    from torch.nn.modules import module as nn_module

    fam = make_whisper()
    enc, x = fam["model"].model.encoder, fam["x"]

    def run():
        seen = []
        handle = nn_module.register_module_full_backward_hook(lambda mod, gin, gout: seen.append(id(mod)))
        try:
            inp = x.clone().requires_grad_(True)
            enc(inp).last_hidden_state.sum().backward()
        finally:
            handle.remove()
        return sorted(seen), inp.grad

    ref, got = _unpatched_then_at_budget_1(enc, run)
    assert got[0] == ref[0] and torch.equal(got[1], ref[1])


def test_whisper_layers_compiled_in_place_stay_compiled():
    """Regional compilation (``layer.compile()`` on each encoder layer, as transformers and diffusers recommend) keeps
    working on a patched model: the compiled graphs run (the written-out path ran the layers eagerly, uncompiled)."""
    fam = make_whisper()
    model, x = fam["model"], fam["x"]
    graph_calls = []

    def backend(gm, inputs):  # counts the calls of the compiled graphs
        return lambda *args: graph_calls.append(1) or gm(*args)

    for layer in model.model.encoder.layers:
        layer.compile(backend=backend)
    torch._dynamo.reset()
    try:
        def run():
            graph_calls.clear()  # left with the patched call's graph calls
            return fam["out"](model, x)

        with torch.no_grad():
            ref, got = _unpatched_then_at_budget_1(model, run)
    finally:
        torch._dynamo.reset()
    assert len(graph_calls) >= len(model.model.encoder.layers) and torch.equal(got, ref)


def test_whisper_under_autocast_equals_unpatched_at_budget_1():
    """Under CPU autocast (bf16) the unpatched encoder adds its float32 positions to the bf16 stem output, so its layers
    run on a float32 residual stream; the patched encoder must do the same (it cast the positions to bf16: another
    result at budget 1.0, and a bf16 last_hidden_state)."""
    fam = make_whisper()
    model, x = fam["model"], fam["x"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (ref, ref_enc), (got, got_enc) = _unpatched_then_at_budget_1(
            model, lambda: (fam["out"](model, x), fam["tokens"](model, x)))
    assert got_enc.dtype == ref_enc.dtype and torch.equal(got_enc, ref_enc)
    assert torch.equal(got, ref)


def test_whisper_written_out_layers_under_autocast_equal_transformers_layers(monkeypatch):
    """Under autocast the residual stream is float32 and q bf16: the written-out layer hands the key bias to MAELRE's
    kernel in q's dtype, as tokenprune_sdpa does (it passed the float32 bias: other outputs than the layers called
    through transformers)."""
    fam = make_whisper()
    model, x = fam["model"], fam["x"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_written_equals_transformers(fam, model, x, monkeypatch,
                                            [("maelre", {"switch_at": 0}), ("merge", {}), ("threshold", {})])


def test_whisper_cross_attention_gets_size_bias():
    """The decoder's cross-attention weights merged encoder tokens by their sizes (proportional attention)."""
    from tokenprune.adapters import hf_common

    fam = make_whisper()
    model, x = fam["model"], fam["x"]
    calls = []
    real = hf_common._kernel

    def spy(module, query, key, value, mask, *a, **k):
        if any(module is layer.encoder_attn for layer in model.model.decoder.layers):
            calls.append(mask)
        return real(module, query, key, value, mask, *a, **k)

    tokenprune.apply(model, 0.25, "merge")
    try:
        from transformers.modeling_utils import AttentionInterface
        AttentionInterface.register(hf_common.KERNEL_NAME, spy)
        with torch.no_grad():
            fam["out"](model, x)
    finally:
        AttentionInterface.register(hf_common.KERNEL_NAME, real)
        tokenprune.remove(model)
    assert calls, "cross-attention did not go through the tokenprune kernel"
    # the spy sees the mask before the kernel adds the bias; check the bias the kernel will add instead
    enc = model.model.encoder
    tokenprune.apply(model, 0.25, "merge")
    try:
        with torch.no_grad():
            out = enc(x)
        state = tokenprune.features(model, x)[1]
        assert torch.equal(out["tokenprune_key_bias"], state.attn_bias(out.last_hidden_state.dtype))
        assert state is not None and state.sizes is not None
        assert torch.allclose(state.sizes.sum(1), torch.full((2,), 32.0))
    finally:
        tokenprune.remove(model)


def test_whisper_output_hidden_states_is_refused_not_dropped():
    """``WhisperForConditionalGeneration(..., output_hidden_states=True)``: the encoder's per-layer states cannot be
    given once tokens are reduced between layers; a clear error, not ``encoder_hidden_states=None`` (the decoder's
    states alone would look like a complete answer)."""
    fam = make_whisper()
    model, x = fam["model"], fam["x"]
    dec = torch.tensor([[1, 5, 7], [1, 5, 7]])
    tokenprune.apply(model, 0.5, "merge")
    try:
        with torch.no_grad(), pytest.raises(ValueError, match="output_hidden_states"):
            model(input_features=x, decoder_input_ids=dec, output_hidden_states=True)
    finally:
        tokenprune.remove(model)


def test_whisper_training_keeps_spec_augment():
    """In training, ``WhisperModel`` masks the input features (SpecAugment, ``apply_spec_augment=True``) before its
    encoder; the patched model does too: at budget 1.0 its loss and gradients are the unpatched model's."""
    import numpy as np

    fam = make_whisper()
    model, x = fam["model"], fam["x"]
    model.config.update(dict(apply_spec_augment=True, mask_time_prob=0.3, mask_time_length=4,
                             mask_feature_prob=0.3, mask_feature_length=2))
    model.train()
    dec = torch.tensor([[1, 5, 7], [1, 5, 7]])

    def step():
        np.random.seed(0)  # SpecAugment draws its masks with numpy
        model.zero_grad(set_to_none=True)
        loss = model(input_features=x.clone(), decoder_input_ids=dec, labels=dec).loss
        loss.backward()
        return loss.detach(), model.model.encoder.conv1.weight.grad.clone()

    ref_loss, ref_grad = step()
    np.random.seed(0)
    with torch.no_grad():  # the masks matter here: unmasked features give another loss
        plain = model(input_features=x.clone(), decoder_input_ids=dec, labels=dec).loss
    model.config.apply_spec_augment = False
    with torch.no_grad():
        unmasked = model(input_features=x.clone(), decoder_input_ids=dec, labels=dec).loss
    model.config.apply_spec_augment = True
    assert torch.allclose(plain, ref_loss) and not torch.allclose(unmasked, ref_loss)
    tokenprune.apply(model, 1.0, "merge")
    try:
        loss, grad = step()
    finally:
        tokenprune.remove(model)
        model.eval()
    assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6), (loss - ref_loss).item()
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_attention_switched_away_from_sdpa_while_patched_is_a_clear_error():
    """Whisper's ``generate(return_token_timestamps=True)`` sets ``config._attn_implementation = "eager"`` itself (and
    a user may call ``set_attn_implementation``) on a patched model: its attention then bypasses tokenprune's kernel
    (no size bias, no q/k for the reducer). Every later forward says so and what to do, instead of failing inside a
    reducer ('NoneType' object has no attribute 'k') or running on without the size bias."""
    fam = make_whisper()
    model, x = fam["model"], fam["x"]
    gc = model.generation_config
    gc.no_timestamps_token_id, gc.max_initial_timestamp_index, gc.alignment_heads = 40, 5, [[0, 0], [1, 1]]
    for method in ("merge", "pool"):
        tokenprune.apply(model, 0.5, method)
        try:
            with torch.no_grad(), pytest.raises(RuntimeError, match="return_token_timestamps"):  # refused: eager now
                model.generate(x, max_new_tokens=3, return_token_timestamps=True)
            with torch.no_grad(), pytest.raises(RuntimeError, match="set_attn_implementation\\('sdpa'\\)"):
                fam["out"](model, x)
        finally:
            tokenprune.remove(model)
        model.set_attn_implementation("sdpa")
    tower = make_hf_clip()
    model, x = tower["model"], tower["x"]
    tokenprune.apply(model, 0.5, "random")
    try:
        model.set_attn_implementation("eager")
        with torch.no_grad(), pytest.raises(RuntimeError, match="eager"):
            model(x)
    finally:
        tokenprune.remove(model)


def test_two_models_built_from_one_config_are_patched_and_restored_independently():
    """``m1 = Model(cfg); m2 = Model(cfg)`` share one config object. Patching one must not route the other's attention,
    and removing one must leave the other patched and working (the routing once wrote the shared config: remove(m1)
    switched m2 back to plain SDPA under its patch, and m2's later remove left the config naming tokenprune's
    kernel)."""
    from transformers import CLIPVisionModel, WhisperForConditionalGeneration

    clip = make_hf_clip()
    whisper = make_whisper()
    for fam, cls in ((clip, CLIPVisionModel), (whisper, WhisperForConditionalGeneration)):
        m1, x = fam["model"], fam["x"]
        _seed()
        m2 = cls(m1.config).eval()
        assert m2.config is m1.config
        with torch.no_grad():
            ref1, ref2 = fam["out"](m1, x), fam["out"](m2, x)
            tokenprune.apply(m1, 0.5, "merge")
            assert torch.equal(fam["out"](m2, x), ref2)  # m2 untouched by m1's patch
            tokenprune.apply(m2, 0.5, "merge")
            red2 = fam["out"](m2, x)
            assert not torch.allclose(red2, ref2)
            tokenprune.remove(m1)
            assert torch.equal(fam["out"](m1, x), ref1)
            assert torch.equal(fam["out"](m2, x), red2)  # still patched, still reducing
            tokenprune.remove(m2)
            assert torch.equal(fam["out"](m2, x), ref2)
        assert m1.config._attn_implementation == "sdpa"
        for m in (m1, m2):
            assert all(mod.config is m1.config for mod in m.modules() if hasattr(mod, "config"))


def test_text_towers_untouched():
    from transformers import CLIPConfig, CLIPModel

    _seed()
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, vocab_size=50, max_position_embeddings=8),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, image_size=32, patch_size=8), projection_dim=16)
    m = CLIPModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 8))
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        t0, i0 = m.get_text_features(input_ids=ids), m.get_image_features(pixel_values=px)
        tokenprune.apply(m, 0.25, "merge")
        assert m.config.text_config._attn_implementation == "sdpa"
        t1, i1 = m.get_text_features(input_ids=ids), m.get_image_features(pixel_values=px)
        tokenprune.remove(m)
        t2, i2 = m.get_text_features(input_ids=ids), m.get_image_features(pixel_values=px)
    feats = lambda o: o if torch.is_tensor(o) else o.pooler_output  # noqa: E731
    assert torch.equal(feats(t0), feats(t1)) and torch.equal(feats(t0), feats(t2))
    assert feats(i1).shape == feats(i0).shape and not torch.equal(feats(i0), feats(i1))
    assert torch.equal(feats(i0), feats(i2))


def test_grids_given_to_grid_aware_reducers():
    ast, vid, wh = make_ast()["model"], make_videomae()["model"], make_whisper()["model"]
    assert tokenprune.plan(ast, 0.5, "merge").info.grid == (4, 8)  # (frequency, time)
    assert tokenprune.plan(vid, 0.5, "merge").info.grid == (2, 4, 4)  # (time, height, width)
    assert tokenprune.plan(wh, 0.5, "merge").info.grid == (1, 32)  # one row of time frames
    assert tokenprune.plan(make_siglip()["model"], 0.5, "merge").info.has_cls is False


def test_sdpa_required_and_errors_are_clear():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=32, patch_size=8, attn_implementation="eager")
    m = SiglipVisionModel(cfg)
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        tokenprune.apply(m, 0.5, "merge")
    fam = make_hf_clip()
    tokenprune.apply(fam["model"], 0.5, "merge")
    with pytest.raises(ValueError, match="output_hidden_states"):
        fam["model"](fam["x"], output_hidden_states=True)
    tokenprune.remove(fam["model"])


def test_unsupported_family_names_supported_ones():
    with pytest.raises(TypeError) as e:
        tokenprune.apply(torch.nn.Linear(4, 4), 0.5, "merge")
    msg = str(e.value)
    for name in ("timm", "open_clip", "CLIP", "Siglip", "Whisper", "AST", "VideoMAE"):
        assert name in msg, name


def test_videomae_without_mean_pooling_refused():
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    cfg = VideoMAEConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         image_size=16, patch_size=4, num_frames=4, tubelet_size=2, num_labels=5,
                         use_mean_pooling=False)
    with pytest.raises(TypeError, match="mean-pooling"):
        tokenprune.apply(VideoMAEForVideoClassification(cfg), 0.5, "merge")


def test_budget_rounding_on_whisper_length():
    wh = make_whisper()["model"]
    for b in (0.75, 0.5, 0.25, 0.05):
        assert tokenprune.plan(wh, b, "merge").num_out == max(1, math.floor(b * 32 + 0.5))


@pytest.mark.parametrize("variant", ["ParallelScalingBlock", "ParallelThingsBlock", "prr", "diff"])
@pytest.mark.parametrize("method", ["merge", "maelre"])
def test_timm_variants_refused_at_apply(variant, method):
    """timm ViT variants the adapter cannot run are refused at apply() with the reason, never a raw crash, and the
    model is left unpatched."""
    timm = pytest.importorskip("timm")
    from timm.models import vision_transformer as vt

    tiny = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    if variant in ("ParallelScalingBlock", "ParallelThingsBlock"):
        m, match = vt.VisionTransformer(block_fn=getattr(vt, variant), **tiny), variant
    elif variant == "prr":
        m, match = vt.VisionTransformer(global_pool="prr", **tiny), "AttentionPoolPrr"
    else:
        m, match = timm.create_model("vit_small_patch16_224", attn_layer="diff", **tiny), "DiffAttention"
    with pytest.raises(TypeError, match=match):
        tokenprune.apply(m.eval(), 0.5, method)
    assert not tokenprune.is_applied(m)
    m(torch.randn(1, 3, 32, 32))  # still the plain timm model



@pytest.mark.parametrize("name,feature_cls", [("vit_small_patch16_224", "getter"), ("eva02_tiny_patch14_224", "getter"),
                                              ("vit_small_patch16_224", "hook")])
def test_timm_features_only_refused_with_what_works(name, feature_cls):
    """``timm.create_model(name, features_only=True)`` (FeatureGetterNet, FeatureHookNet) got "no adapter for
    FeatureGetterNet": its per-block feature maps at the full grid are what a reduced model cannot give. The refusal
    says so and names what works: the model without features_only, tokenprune.features and unmerge."""
    timm = pytest.importorskip("timm")
    m = timm.create_model(name, pretrained=False, features_only=True, feature_cls=feature_cls, img_size=32,
                          patch_size=8, embed_dim=32, depth=3, num_heads=4).eval()
    with pytest.raises(TypeError, match=r"features_only=True.*without features_only.*tokenprune\.features\(model, x\)"
                                        r".*tokenprune\.unmerge"):
        tokenprune.apply(m, 0.5, "merge")
    assert not any(tokenprune.is_applied(mod) for mod in m.modules())
    m(torch.randn(1, 3, 32, 32))  # still the plain timm feature extractor

@pytest.mark.parametrize("family", ["open_clip", "open_clip_siglip", "open_clip_pe"])
def test_open_clip_plan_for_an_input_shape(family):
    """``plan(model, input_shape=...)`` on open_clip towers (own ViT, and timm trunks through the timm adapters)."""
    fam = FAMILIES[family]()
    plan = tokenprune.plan(fam["model"], 0.5, "pool", input_shape=tuple(fam["x"].shape))
    assert plan.info.grid == (4, 4) and plan.num_out == keep_count(0.5, 16)


def test_open_clip_plan_for_an_input_shape_the_tower_cannot_take_is_refused():
    """open_clip's own ViT tower adds a fixed positional embedding (no interpolation at the forward): a plan for
    another grid describes a forward that cannot run (it fails in ``_embeds``), so ``plan`` refuses it and names the
    size it takes, as for a timm model without ``dynamic_img_size`` (it returned a plan for the other grid)."""
    fam = make_open_clip()
    with pytest.raises(ValueError, match=r"32x32.*not 48x64"):
        tokenprune.plan(fam["model"], 0.5, "merge", input_shape=(1, 3, 48, 64))
    assert tokenprune.plan(fam["model"], 0.5, "merge", input_shape=(1, 3, 35, 33)).info.grid == (4, 4)  # conv floors


def test_open_clip_patch_dropout_in_training_refused():
    """open_clip's ``patch_dropout`` keeps a random subset of patches in training, which is no grid of patches (the
    source map then indexes the subset, ``pool`` found no grid): refused with what to do, as the timm adapters refuse
    timm's patch dropout (it ran, or failed in ``pool`` with an error about the image shape). Eval is unaffected."""
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    m = open_clip.model.CLIP(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=4,
                                                           head_width=8, patch_dropout=0.5),
                             text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=4, layers=1)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m.encode_image(x)
    for method in ("merge", "pool"):
        tokenprune.apply(m, 0.5, method)
        m.train()
        with pytest.raises(RuntimeError, match="patch dropout.*model.eval()"):
            m.encode_image(x)
        with pytest.raises(RuntimeError, match="patch dropout"):
            tokenprune.features(m, x)
        m.eval()
        tokenprune.apply(m, 1.0, method)
        with torch.no_grad():
            torch.testing.assert_close(m.encode_image(x), ref, rtol=1e-5, atol=1e-6)
        tokenprune.remove(m)


@pytest.mark.parametrize("family", ["hf_clip", "siglip"])
def test_hf_clip_siglip_plan_for_an_input_shape(family):
    """``plan(model, input_shape=...)`` on HF CLIP / SigLIP towers: the grid of another image size, which a forward
    with ``interpolate_pos_encoding=True`` runs (its plan, its token count)."""
    fam = FAMILIES[family]()
    model, shape = fam["model"], (2, 3, 48, 64)  # 8 px patches: a 6 x 8 grid
    plan = tokenprune.plan(model, 0.5, "pool", input_shape=shape)
    assert plan.info.grid == (6, 8) and plan.num_out == 24
    tokenprune.apply(model, 0.25, "cls")
    try:
        planned = tokenprune.plan(model, input_shape=shape)
        assert planned.info.num_tokens == 48 and planned.num_out == keep_count(0.25, 48)
        with torch.no_grad():
            out = model(torch.randn(shape), interpolate_pos_encoding=True).last_hidden_state
        assert out.shape[1] == fam["prefix"] + planned.num_out
    finally:
        tokenprune.remove(model)


@pytest.mark.parametrize("method,kw", [("merge", {}), ("threshold", {}), ("cls", {"threshold": 0.05})],
                         ids=["merge", "threshold", "cls-threshold"])
@pytest.mark.parametrize("family", ["hf_clip", "siglip", "whisper", "ast", "videomae"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_hf_gradient_checkpointing_in_training_gives_the_gradients_without_it(family, method, kw, reentrant):
    """transformers' gradient checkpointing reruns each layer's forward in the backward. The rerun must see the
    context of its own block (its key bias, its kernel), not the one the forward left behind: it used to get the
    last block's, and the backward failed with torch's CheckpointError (or could compute other gradients).
    Reentrant checkpointing passes gradients only through a layer's positional tensors: hard selections (merge, cls)
    give the same gradients; threshold's soft mask (a key bias that needs its gradient) is refused with what to do
    (it failed in the backward with 'Trying to backward through the graph a second time')."""
    import warnings

    fam = FAMILIES[family]()
    model, x = fam["model"], fam["x"]
    tokenprune.apply(model, 0.5, method, **kw)
    model.train()

    def grads():
        model.zero_grad(set_to_none=True)
        fam["out"](model, x).float().pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = grads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable: a deprecated alias in 5.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant and method == "threshold":
        with pytest.raises(RuntimeError, match="use_reentrant': False"):
            grads()
        return
    got = grads()
    assert got.keys() == ref.keys() and len(ref) > 10
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)
