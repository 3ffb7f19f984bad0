"""Hugging Face encoders of the "encoders people use today" issue (tiny random models, CPU).

Families: ViT / DINOv2 / DINOv2-with-registers (their image classifiers, hence their base models too), the
CLIP / SigLIP / Whisper task heads, Wav2Vec2 (post-norm and "stable layer norm") and HuBERT. For each:
budget 1.0 is the unpatched model; budgets 0.5 / 0.25 leave exactly K tokens for merge, cls, apet, random
and pool; ``remove`` restores the model bit-exactly; per-sample pruning pads and every sample gets what it
gets alone; the family's eager attention is never entered; a ``fullgraph`` compile equals eager (merge, cls);
the heads that average tokens weight them by size. WavLM is refused with the reason.
"""
from __future__ import annotations

import re

import pytest
import torch

import tokenprune
from tokenprune.plan import keep_count
from tokenprune.reducers.pool import pooled_grid

from conftest import SDPASpy, compile_cases, compiled_equals_eager

transformers = pytest.importorskip("transformers")

BUDGETS = [0.5, 0.25]
METHODS = [("merge", {}), ("cls", {}), ("apet", {"k": 2}), ("random", {}), ("pool", {})]


def _seed():
    torch.manual_seed(0)


def _mod(name):
    return f"transformers.models.{name}.modeling_{name}"


# -- tiny models: model, input, prefix, n (input tokens), out(model, x), eager modules, head(model, tokens, full) --
_VISION = dict(hidden_size=32, num_attention_heads=4, image_size=32, patch_size=8)


def make_vit(depth=4):
    from transformers import ViTConfig, ViTForImageClassification

    _seed()
    m = ViTForImageClassification(ViTConfig(intermediate_size=64, num_hidden_layers=depth, num_labels=5, **_VISION))
    return dict(model=m.eval(), x=torch.randn(2, 3, 32, 32), prefix=1, n=16, out=lambda m, x: m(x).logits,
                eager=[_mod("vit")], head=None)


def _dino_head(model, tokens, full):
    return model.classifier(torch.cat([tokens[:, 0], full.mean(1)], dim=1))


def make_dinov2(depth=4):
    from transformers import Dinov2Config, Dinov2ForImageClassification

    _seed()
    m = Dinov2ForImageClassification(Dinov2Config(mlp_ratio=2, num_hidden_layers=depth, num_labels=5, **_VISION))
    return dict(model=m.eval(), x=torch.randn(2, 3, 32, 32), prefix=1, n=16, out=lambda m, x: m(x).logits,
                eager=[_mod("dinov2")], head=_dino_head)


def make_dinov2_reg(depth=4):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersForImageClassification

    _seed()
    cfg = Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, num_hidden_layers=depth, num_labels=5,
                                    **_VISION)
    m = Dinov2WithRegistersForImageClassification(cfg)
    with torch.no_grad():  # zero-initialised: make the registers distinct tokens
        m.dinov2_with_registers.embeddings.register_tokens.normal_()
    return dict(model=m.eval(), x=torch.randn(2, 3, 32, 32), prefix=3, n=16, out=lambda m, x: m(x).logits,
                eager=[_mod("dinov2_with_registers")], head=_dino_head)


def make_dinov3(depth=4):
    transformers_dinov3 = pytest.importorskip("transformers.models.dinov3_vit")  # transformers >= 5.17

    _seed()
    cfg = transformers_dinov3.DINOv3ViTConfig(intermediate_size=64, num_hidden_layers=depth, num_register_tokens=2,
                                              **_VISION)
    m = transformers_dinov3.DINOv3ViTModel(cfg)
    return dict(model=m.eval(), x=torch.randn(2, 3, 32, 32), prefix=3, n=16,
                out=lambda m, x: m(x).pooler_output, eager=[_mod("dinov3_vit")], head=None)


def _clip_like(config_cls, model_cls, prefix, name, depth):
    _seed()
    cfg = config_cls(vision_config=dict(intermediate_size=64, num_hidden_layers=depth, **_VISION),
                     text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      vocab_size=50, max_position_embeddings=8, bos_token_id=0, eos_token_id=1),
                     num_labels=5)
    m = model_cls(cfg)
    return dict(model=m.eval(), x=torch.randn(2, 3, 32, 32), prefix=prefix, n=16,
                out=lambda m, x: m(pixel_values=x).logits, eager=[_mod(name)])


def make_clip_cls(depth=4):
    from transformers import CLIPConfig, CLIPForImageClassification

    fam = _clip_like(CLIPConfig, CLIPForImageClassification, 1, "clip", depth)
    fam["head"] = lambda model, tokens, full: model.classifier(full.mean(1))  # features: before post-layernorm
    return fam


def make_siglip_cls(depth=4):
    from transformers import SiglipConfig, SiglipForImageClassification

    fam = _clip_like(SiglipConfig, SiglipForImageClassification, 0, "siglip", depth)
    fam["head"] = lambda model, tokens, full: model.classifier(full.mean(1))  # features: after post-layernorm
    return fam


def make_whisper_cls(depth=4):
    from transformers import WhisperConfig, WhisperForAudioClassification

    _seed()
    cfg = WhisperConfig(vocab_size=60, d_model=32, encoder_layers=depth, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=32,
                        max_target_positions=16, num_mel_bins=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None, num_labels=5,
                        classifier_proj_size=16)
    m = WhisperForAudioClassification(cfg)

    def head(model, tokens, full):  # features: the encoder's final layer norm applied
        return model.classifier(model.projector(full).mean(1))

    return dict(model=m.eval(), x=torch.randn(2, 8, 64), prefix=0, n=32, out=lambda m, x: m(x).logits,
                eager=[_mod("whisper")], head=head)


_SPEECH = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16), conv_kernel=(10, 3),
               conv_stride=(5, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


def _speech(config_cls, model_cls, name, depth, **kw):
    _seed()
    m = model_cls(config_cls(num_hidden_layers=depth, **_SPEECH, **kw))
    return dict(model=m.eval(), x=torch.randn(2, 330), prefix=0, n=32,  # 330 samples -> 32 frames
                out=lambda m, x: m(x).last_hidden_state, eager=[_mod(name)], head=None, seq=True)


def make_wav2vec2(depth=4):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    return _speech(Wav2Vec2Config, Wav2Vec2Model, "wav2vec2", depth)


def make_wav2vec2_stable(depth=4):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    return _speech(Wav2Vec2Config, Wav2Vec2Model, "wav2vec2", depth, do_stable_layer_norm=True,
                   feat_extract_norm="layer")


def make_hubert(depth=4):
    from transformers import HubertConfig, HubertModel

    return _speech(HubertConfig, HubertModel, "hubert", depth)


FAMILIES = {"vit": make_vit, "dinov2": make_dinov2, "dinov2_reg": make_dinov2_reg, "dinov3": make_dinov3, "clip_cls": make_clip_cls,
            "siglip_cls": make_siglip_cls, "whisper_cls": make_whisper_cls, "wav2vec2": make_wav2vec2,
            "wav2vec2_stable": make_wav2vec2_stable, "hubert": make_hubert}
HEADS = [f for f in FAMILIES if f not in ("vit", "dinov3", "wav2vec2", "wav2vec2_stable", "hubert")]


def _snapshot(model):
    classes = {name: type(mod) for name, mod in model.named_modules()}
    impls = {name: mod.config.__dict__.get("_attn_implementation_internal")
             for name, mod in model.named_modules() if hasattr(mod, "config")}
    return classes, impls, list(model.state_dict())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_budget_one_is_the_unpatched_model(family):
    fam = FAMILIES[family]()
    model, x = fam["model"], fam["x"]
    with torch.no_grad():
        ref = fam["out"](model, x)
        for method in ("merge", "cls"):
            tokenprune.apply(model, 1.0, method)
            try:
                assert torch.allclose(fam["out"](model, x), ref, rtol=1e-4, atol=1e-6), (family, method)
            finally:
                tokenprune.remove(model)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_counts_sdpa_and_exact_remove(family, monkeypatch):
    fam = FAMILIES[family]()
    model, x, p, n = fam["model"], fam["x"], fam["prefix"], fam["n"]
    before = _snapshot(model)
    with torch.no_grad():
        ref = fam["out"](model, x)
    spy = SDPASpy(monkeypatch, fam["eager"])
    for method, kw in METHODS:
        for budget in BUDGETS:
            tokenprune.apply(model, budget, method, **kw)
            try:
                plan = tokenprune.plan(model, num_tokens=n)
                k = keep_count(budget, n)
                if method == "pool":  # the pooled grid nearest K; exactly K on these grids
                    assert plan.info.grid is not None and plan.num_out == k, (family, plan.info.grid, plan.num_out)
                spy.calls = 0
                with torch.no_grad():
                    tokens, state = tokenprune.features(model, x)
                    y = fam["out"](model, x)
                assert spy.calls >= plan.info.depth, (family, method, spy.calls)
                assert tokens.shape[1] - p == k, f"{family}/{method}@{budget}: {tokens.shape[1] - p} tokens, not {k}"
                assert state.num_prefix == p and state.num_input == n
                want = (ref.shape[0], p + k, ref.shape[2]) if fam.get("seq") else ref.shape  # encoders: the tokens
                assert y.shape == want and torch.isfinite(y).all(), (family, method, budget)
            finally:
                tokenprune.remove(model)
    assert _snapshot(model) == before
    with torch.no_grad():
        assert torch.equal(fam["out"](model, x), ref)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_batch_matches_single(family):
    """``cls`` with a score threshold keeps different counts per sample: padded slots are masked in attention and
    pooling, so each sample of a batch gets what it gets alone."""
    fam = FAMILIES[family]()
    model, x, out = fam["model"], fam["x"], fam["out"]
    x = torch.stack([x[0], 4 * x[1].flip(-1)])
    uniform = 1.0 / (fam["n"] + fam["prefix"])
    for t in [f * uniform for f in (1.0, 0.998, 1.002, 0.995, 1.005, 0.99, 1.01, 0.98, 1.02, 0.95, 1.05, 0.9, 1.1)]:
        tokenprune.apply(model, 0.75, "cls", threshold=t, layers=[1])
        try:
            with torch.no_grad():
                single = [tokenprune.features(model, x[i:i + 1])[0].shape[1] for i in range(2)]
                if len(set(single)) == 1:
                    continue
                tokens, state = tokenprune.features(model, x)
                both = out(model, x)
                alone = [out(model, x[i:i + 1]) for i in range(2)]
        finally:
            tokenprune.remove(model)
        assert tokens.shape[1] == max(single) and state.padded
        if fam.get("seq"):  # encoders: each sample's real tokens, in order, without the padding slots
            both = torch.cat([both[i][state.valid[i]] for i in range(2)])
            alone = [a[0] for a in alone]
        alone = torch.cat(alone)
        assert torch.allclose(both, alone, atol=1e-5, rtol=1e-4), (family, t, (both - alone).abs().max())
        return
    pytest.fail(f"{family}: no threshold gave the two samples different counts")


@pytest.mark.xdist_group("fullgraph-hf_encoders")
@pytest.mark.parametrize("method", ["merge", "cls"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiles_fullgraph(family, method, fullgraph, request):
    compiled_equals_eager(fullgraph, request)


def _compile_case(family, method):
    fam = FAMILIES[family](depth=2)  # Dynamo's tracing time grows with depth; two blocks cover the loop
    model = fam["model"]
    tokenprune.apply(model, 0.25, method)
    return (lambda v: fam["out"](model, v)), fam["x"]


@pytest.fixture(scope="module")
def fullgraph(request):
    """The selected cases of test_compiles_fullgraph, compiled with fullgraph=True in one trace (conftest)."""
    return compile_cases(request, {"test_compiles_fullgraph": _compile_case})


def make_ast_cls(depth=4):
    from transformers import ASTConfig, ASTForAudioClassification

    _seed()
    cfg = ASTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=depth, num_attention_heads=4, patch_size=4,
                    frequency_stride=4, time_stride=4, num_mel_bins=16, max_length=32, num_labels=5)
    return dict(model=ASTForAudioClassification(cfg).eval(), x=torch.randn(2, 32, 16))


# the unpatched model's own last_hidden_state (its final norm applied, as transformers gives it)
_LAST_HIDDEN = {
    "vit": lambda m, x: m.vit(x).last_hidden_state, "dinov2": lambda m, x: m.dinov2(x).last_hidden_state,
    "dinov3": lambda m, x: m(x).last_hidden_state, "clip_cls": lambda m, x: m.vision_model(x).last_hidden_state,
    "siglip_cls": lambda m, x: m.vision_model(x).last_hidden_state,
    "whisper_cls": lambda m, x: m.encoder(x).last_hidden_state, "wav2vec2": lambda m, x: m(x).last_hidden_state,
    "wav2vec2_stable": lambda m, x: m(x).last_hidden_state,
    "ast": lambda m, x: m.audio_spectrogram_transformer(x).last_hidden_state,
}


@pytest.mark.parametrize("family", list(_LAST_HIDDEN))
def test_features_at_budget_one_are_the_last_hidden_state(family):
    """tokenprune.features returns the output tokens with the encoder's final norm applied, as its documentation
    says: at budget 1 exactly the unpatched model's last_hidden_state (SigLIP's post-layernorm, Whisper's and AST's
    final layer norm included; CLIP's post-layernorm is for the pooled output only, and so is left out as in CLIP)."""
    fam = make_ast_cls() if family == "ast" else FAMILIES[family]()
    model, x = fam["model"], fam["x"]
    with torch.no_grad():
        want = _LAST_HIDDEN[family](model, x)
        with tokenprune.applied(model, 1.0, "merge"):
            got, state = tokenprune.features(model, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", HEADS)
def test_head_pools_by_size(family):
    """The pooled output of a merged model equals the head applied to the plain mean of the un-merged full grid."""
    fam = FAMILIES[family]()
    model, x, p = fam["model"], fam["x"], fam["prefix"]
    tokenprune.apply(model, 0.25, "merge")
    try:
        with torch.no_grad():
            got = fam["out"](model, x)
            tokens, state = tokenprune.features(model, x)
            full, present = tokenprune.unmerge(tokens, state)
            want = fam["head"](model, tokens, full)
            # the test can fail: the plain mean over the merged tokens is not the mean over the patches
            plain = fam["head"](model, tokens, tokens[:, p:])
    finally:
        tokenprune.remove(model)
    assert present.all() and state.sizes is not None and full.shape[1] == fam["n"]
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert not torch.allclose(got, plain, atol=1e-4)


@pytest.mark.parametrize("maker", [make_vit, make_dinov2, make_dinov2_reg], ids=["vit", "dinov2", "dinov2_reg"])
def test_base_models(maker):
    """``ViTModel`` / ``Dinov2Model`` / ``Dinov2WithRegistersModel`` on their own: exact at budget 1, K tokens out."""
    fam = maker()
    base, x, p = fam["model"].base_model, fam["x"], fam["prefix"]
    with torch.no_grad():
        ref = base(x)
        for budget in (1.0, 0.5):
            tokenprune.apply(base, budget, "merge")
            try:
                out = base(x)
            finally:
                tokenprune.remove(base)
            assert out.last_hidden_state.shape[1] == p + keep_count(budget, 16)
            if budget == 1.0:
                assert torch.allclose(out.last_hidden_state, ref.last_hidden_state, rtol=1e-4, atol=1e-6)
                if ref.pooler_output is not None:
                    assert torch.allclose(out.pooler_output, ref.pooler_output, rtol=1e-4, atol=1e-6)
        assert torch.equal(base(x).last_hidden_state, ref.last_hidden_state)


@pytest.mark.parametrize("maker,kw", [(make_vit, {"interpolate_pos_encoding": True}), (make_dinov2, {}),
                                      (make_dinov3, {})], ids=["vit", "dinov2", "dinov3"])
def test_grid_is_read_from_the_input(maker, kw):
    """Non-square inputs: the grid is (H / patch, W / patch) of the pixels, never guessed from the token count."""
    fam = maker()
    model, p = fam["model"], fam["prefix"]
    model = model if maker is make_dinov3 else model.base_model  # DINOv3ViTModel's base_model is its encoder
    for shape, grid in (((32, 48), (4, 6)), ((48, 32), (6, 4))):
        x = torch.randn(2, 3, *shape)
        with torch.no_grad():
            ref = model(x, **kw).last_hidden_state
            tokenprune.apply(model, 1.0, "merge")
            try:
                same = model(x, **kw).last_hidden_state
                tokens, state = tokenprune.features(model, x, **kw)
            finally:
                tokenprune.remove(model)
            assert state.grid == grid and state.num_input == 24
            assert torch.allclose(same, ref, rtol=1e-4, atol=1e-6)
            tokenprune.apply(model, 0.5, "pool")
            try:
                tokens, state = tokenprune.features(model, x, **kw)
                plan = tokenprune.get_patch(model).plan_for(24, grid)
            finally:
                tokenprune.remove(model)
        pooled = pooled_grid(grid, keep_count(0.5, 24))
        assert state.grid == pooled and tokens.shape[1] == p + pooled[0] * pooled[1] == p + plan.num_out


def test_wavlm_is_refused_with_the_reason():
    from transformers import WavLMConfig, WavLMModel

    m = WavLMModel(WavLMConfig(num_hidden_layers=2, **_SPEECH))
    with pytest.raises(TypeError, match="relative position bias") as e:
        tokenprune.apply(m, 0.5, "merge")
    assert "Wav2Vec2Model" in str(e.value) and not tokenprune.is_applied(m)


def test_unsupported_model_lists_the_new_families():
    with pytest.raises(TypeError) as e:
        tokenprune.apply(torch.nn.Linear(4, 4), 0.5, "merge")
    for name in ("ViTModel", "Dinov2", "Wav2Vec2Model", "HubertModel", "CLIP", "Whisper"):
        assert name in str(e.value), name


def test_refused_configurations_and_inputs():
    from transformers import Wav2Vec2Config, Wav2Vec2Model, WhisperForAudioClassification

    wh = make_whisper_cls()["model"]
    cfg = wh.config
    cfg.use_weighted_layer_sum = True
    with pytest.raises(TypeError, match="use_weighted_layer_sum"):
        tokenprune.apply(WhisperForAudioClassification(cfg), 0.5, "merge")
    with pytest.raises(TypeError, match="add_adapter"):
        tokenprune.apply(Wav2Vec2Model(Wav2Vec2Config(num_hidden_layers=2, add_adapter=True, **_SPEECH)), 0.5)
    fam = make_wav2vec2()
    model, x = fam["model"], fam["x"]
    tokenprune.apply(model, 0.5, "merge")
    try:
        # a mask with padding is refused; an all-ones one (what a stable-layer-norm processor returns for one
        # utterance) masks nothing and is accepted: the same output as without it
        pad = torch.ones_like(x, dtype=torch.long)
        pad[-1, -x.shape[1] // 4:] = 0
        with pytest.raises(ValueError, match="attention_mask"):
            model(x, attention_mask=pad)
        with torch.no_grad():
            ones = model(x, attention_mask=torch.ones_like(x, dtype=torch.long)).last_hidden_state
            assert torch.equal(ones, model(x).last_hidden_state)
    finally:
        tokenprune.remove(model)
    fam = make_dinov2()
    tokenprune.apply(fam["model"], 0.5, "merge")
    try:
        with pytest.raises(ValueError, match="output_hidden_states"):
            fam["model"](fam["x"], output_hidden_states=True)
    finally:
        tokenprune.remove(fam["model"])


def _return_dict_cases():
    """(model, positional inputs) of every patched transformers forward: bases, heads and bare encoders."""
    import test_adapters_matrix as mx
    import test_siglip2 as s2

    fams = {k: FAMILIES[k]() for k in ("vit", "dinov2", "dinov3", "clip_cls", "siglip_cls", "whisper_cls", "wav2vec2",
                                       "hubert")}
    cases = {k: (f["model"], (f["x"],)) for k, f in fams.items()}
    cases["vit_base"] = (fams["vit"]["model"].base_model, (fams["vit"]["x"],))
    cases["dinov2_base"] = (fams["dinov2"]["model"].base_model, (fams["dinov2"]["x"],))
    for k, maker in (("clip_tower", mx.make_hf_clip), ("siglip_tower", mx.make_siglip),
                     ("videomae_cls", mx.make_videomae), ("vivit_cls", mx.make_vivit), ("ast_cls", mx.make_ast)):
        f = maker()
        cases[k] = (f["model"], (f["x"],))
    cases["videomae_base"] = (cases["videomae_cls"][0].videomae, cases["videomae_cls"][1])
    cases["vivit_base"] = (cases["vivit_cls"][0].vivit, cases["vivit_cls"][1])
    cases["ast_base"] = (cases["ast_cls"][0].audio_spectrogram_transformer, cases["ast_cls"][1])
    wh = mx.make_whisper()
    cases["whisper_encoder"] = (wh["model"].model.encoder, (wh["x"],))
    cases["siglip2_tower"] = (s2.make_tower(), s2._inputs())
    cases["siglip2_cls"] = (s2.make_classifier(), s2._inputs())
    return cases


def test_return_dict_false_gives_hf_tuples():
    """``return_dict=False`` (the keyword, or the config's) returns what transformers returns: a tuple, not a
    ModelOutput (whose iteration yields its keys: ``hidden, pooled = model(x, return_dict=False)`` would unpack
    two strings). At budget 1.0 the tuple equals the unpatched one; reduced, it has the same entries."""
    for name, (model, args) in _return_dict_cases().items():
        with torch.no_grad():
            ref = model(*args, return_dict=False)
            assert isinstance(ref, tuple), name
            for budget in (1.0, 0.5):
                tokenprune.apply(model, budget, "merge")
                try:
                    out = model(*args, return_dict=False)
                finally:
                    tokenprune.remove(model)
                assert isinstance(out, tuple) and len(out) == len(ref), (name, budget, type(out).__name__)
                if budget == 1.0:
                    for a, b in zip(out, ref):
                        b = b[:, : a.shape[1]] if name == "siglip2_tower" and b.dim() == 3 else b  # padding dropped
                        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), name
    tower, args = _return_dict_cases()["clip_tower"]
    tower.config.return_dict = False  # the config's default, as transformers reads it
    with torch.no_grad():
        ref = tower(*args)
        tokenprune.apply(tower, 1.0, "merge")
        try:
            out = tower(*args)
        finally:
            tokenprune.remove(tower)
    assert isinstance(out, tuple) and all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(out, ref))


def test_whisper_reduced_tuple_encoder_outputs_are_refused_not_decoded_without_sizes():
    """The encoder's ``return_dict=False`` tuple has no size bias: handed back as ``encoder_outputs`` its reduced
    frames would be decoded without it (logits off by 1e-3-1e-2, silently); refused with what to pass instead. The
    dict form decodes as the model's own forward does; unreduced (budget 1.0) tuples still pass."""
    import test_adapters_matrix as mx

    wh = mx.make_whisper()
    model, x, dec = wh["model"], wh["x"], torch.tensor([[1, 5, 7], [1, 5, 7]])
    with torch.no_grad():
        for budget in (0.5, 1.0):
            tokenprune.apply(model, budget, "merge")
            try:
                ref = model(input_features=x, decoder_input_ids=dec).logits
                as_dict = model.model.encoder(x)
                assert torch.equal(model(encoder_outputs=as_dict, decoder_input_ids=dec).logits, ref)
                as_tuple = model.model.encoder(x, return_dict=False)
                if budget == 1.0:
                    assert torch.equal(model(encoder_outputs=as_tuple, decoder_input_ids=dec).logits, ref)
                else:
                    with pytest.raises(ValueError, match="return_dict=True"):
                        model(encoder_outputs=as_tuple, decoder_input_ids=dec)
            finally:
                tokenprune.remove(model)


def test_save_pretrained_while_patched_saves_the_original_model(tmp_path):
    """A patched model saves as itself unpatched: the original class in ``config.architectures`` (transformers writes
    ``type(model).__name__``; inference servers pick the class by it), the original weights, and a model that
    ``from_pretrained`` loads to the same outputs; the patch stays on."""
    import json

    for name, (model, args) in _return_dict_cases().items():
        cls = type(model)
        with torch.no_grad():
            ref = model(*args, return_dict=False)[0]
        tokenprune.apply(model, 0.5, "merge")
        try:
            patched = type(model)
            model.save_pretrained(tmp_path / name)
            assert type(model) is patched and tokenprune.is_applied(model), name
        finally:
            tokenprune.remove(model)
        assert json.loads((tmp_path / name / "config.json").read_text())["architectures"] == [cls.__name__], name
        loaded = cls.from_pretrained(tmp_path / name).eval()
        with torch.no_grad():
            assert torch.equal(loaded(*args, return_dict=False)[0], ref), name


def test_output_hidden_states_from_the_config_is_refused():
    """``config.output_hidden_states = True`` asks transformers for every layer's states as the keyword does; a patched
    model refuses it as it refuses the keyword (it returned ``hidden_states=None`` silently). An explicit
    ``output_hidden_states=False`` still runs."""
    for name, (model, args) in _return_dict_cases().items():
        configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
        for c in configs.values():
            c.output_hidden_states = True
        with torch.no_grad():
            assert model(*args).hidden_states is not None, name  # what transformers does with that config
            tokenprune.apply(model, 0.5, "merge")
            try:
                with pytest.raises(ValueError, match="output_hidden_states"):
                    model(*args)
                model(*args, output_hidden_states=False)
            finally:
                tokenprune.remove(model)


def _siglip2(classifier: bool):
    import test_siglip2 as s2

    model = (s2.make_classifier if classifier else s2.make_tower)()
    pv, mask, shapes = s2._inputs()
    mask[1, 16:] = 0  # row 1: a 4 x 4 grid (two grids in one batch: the mixed-grid loop)
    shapes[1] = torch.tensor([4, 4])
    return dict(model=model, x=(pv, mask, shapes))


def _matrix(name):
    def make():
        import test_adapters_matrix as m

        return getattr(m, name)()
    return make


# family: (tiny model, the modules holding the layers that the unpatched forward calls (outermost first), whether the
# patched forward writes the layers out (hooks then go on a submodule of the layer, which still runs))
_HOLDERS = {
    "hf_clip": (_matrix("make_hf_clip"), ["encoder"], False),
    "siglip": (_matrix("make_siglip"), ["encoder"], False),
    "clip_cls": (make_clip_cls, ["vision_model", "vision_model.encoder"], False),
    "siglip_cls": (make_siglip_cls, ["vision_model", "vision_model.encoder"], False),
    "siglip2": (lambda: _siglip2(False), ["encoder"], False),
    "siglip2_cls": (lambda: _siglip2(True), ["vision_model", "vision_model.encoder"], False),
    "whisper_cls": (make_whisper_cls, ["encoder"], False),
    "dinov2": (make_dinov2, ["dinov2.encoder"], True),
    "dinov2_reg": (make_dinov2_reg, ["dinov2_with_registers.encoder"], True),
    "dinov3": (make_dinov3, ["model"], True),
    "wav2vec2": (make_wav2vec2, ["encoder"], False),
    "hubert": (make_hubert, ["encoder"], False),
    "videomae": (_matrix("make_videomae"), ["videomae.encoder"], False),
}


@pytest.mark.parametrize("family", list(_HOLDERS))
def test_hooks_on_the_module_holding_the_layers_are_a_clear_error(family):
    """The patched forward runs the layers itself, without calling the module that holds them in transformers (the
    encoder; a classifier's vision tower): a forward hook there ran unpatched and was silently skipped patched. It is
    refused with what to do; a hook on a layer runs as before, and the model runs again once the hook is removed."""
    maker, holders, written = _HOLDERS[family]
    fam = maker()
    model, x = fam["model"], fam["x"]
    args = x if isinstance(x, tuple) else (x,)
    mods = dict(model.named_modules())
    layer = next(n for n in mods if re.fullmatch(re.escape(holders[-1]) + r"\.layers?\.1", n))
    layer += ".mlp" if written else ""
    with torch.no_grad():
        for name in holders:  # the unpatched forward calls each of them: its hook runs
            ran = []
            h = mods[name].register_forward_hook(lambda *a: ran.append(1))
            model(*args)
            h.remove()
            assert ran == [1], name
        tokenprune.apply(model, 0.5, "merge")
        ref = model(*args)[0]
        for name in holders:
            h = mods[name].register_forward_hook(lambda *a: None)
            with pytest.raises(RuntimeError, match=rf"hook is registered on the module holding the layers "
                                                   rf"\({re.escape(name)}\).*would silently not run.*remove"):
                model(*args)
            h.remove()
        ran = []
        h = mods[layer].register_forward_hook(lambda *a: ran.append(1))
        out = model(*args)[0]
        h.remove()
        assert ran == [1] and torch.equal(out, ref)
        assert torch.equal(model(*args)[0], ref)
    tokenprune.remove(model)


@pytest.mark.parametrize("maker", [make_vit, make_dinov2, make_dinov2_reg, make_dinov3],
                         ids=["vit", "dinov2", "dinov2_reg", "dinov3"])
def test_hooks_on_written_out_hf_layers_are_a_clear_error(maker):
    """HF ViT / DINOv2 / DINOv3 layers run written out (their attention and MLP are called, the layer module is not):
    a forward or pre-hook on a layer ran unpatched and was silently skipped patched. It is refused with what to do;
    a hook on the layer's mlp still runs, and the model runs again once the hook is removed."""
    fam = maker()
    model, x = fam["model"], fam["x"]
    mods = dict(model.named_modules())
    layer = next(n for n in mods if re.fullmatch(r"(.*\.)?layers?\.1", n))
    with torch.no_grad():
        ran = []
        h = mods[layer].register_forward_hook(lambda *a: ran.append(1))
        model(x)
        h.remove()
        assert ran == [1]  # the unpatched forward calls the layer
        tokenprune.apply(model, 0.5, "merge")
        ref = model(x)[0]
        for register in (mods[layer].register_forward_hook, mods[layer].register_forward_pre_hook):
            h = register(lambda *a: None)
            with pytest.raises(RuntimeError, match=rf"hook is registered on the layer {re.escape(layer)}.*"
                                                   r"silently not run"):
                model(x)
            h.remove()
        ran = []
        h = mods[layer + ".mlp"].register_forward_hook(lambda *a: ran.append(1))
        assert torch.equal(model(x)[0], ref) and ran == [1]
        h.remove()
        assert torch.equal(model(x)[0], ref)
    tokenprune.remove(model)


@pytest.mark.parametrize("maker", [make_vit, make_dinov2], ids=["vit", "dinov2"])
def test_transformers_output_capturing_hooks_are_not_user_hooks(maker):
    """transformers 5 installs output-capturing forward hooks on layers and attention modules at the first call with
    output_hidden_states and keeps them (inactive without a collector). They are not a user's hooks: a model once
    asked for its hidden states is patched and runs as any other (it was refused as 'a module hook is registered')."""
    fam = maker()
    model, x = fam["model"], fam["x"]
    with torch.no_grad():
        model(x, output_hidden_states=True)
        kept = [n for n, m in model.named_modules() if m._forward_hooks]
        tokenprune.apply(model, 0.5, "merge")
        try:
            model(x)
            assert tokenprune.features(model, x)[0].shape[1] == fam["prefix"] + 8  # reduced: 16 patches at 0.5
            user = dict(model.named_modules())[kept[0]].register_forward_hook(lambda *a: None) if kept else None
            if user is not None and re.fullmatch(r"(.*\.)?layers?\.\d+", kept[0]):
                with pytest.raises(RuntimeError, match="hook is registered"):
                    model(x)
                user.remove()
        finally:
            tokenprune.remove(model)
