"""LLaVA / LLaVA-NeXT: visual tokens pruned between the vision tower and the language model.

Tiny random configs (CLIP 32px/4px patches -> 64 visual tokens, 3 vision layers; Llama 2 layers), CPU.
"""
import copy

import pytest
import torch

import tokenprune
from conftest import cache_kw, cache_of  # transformers' two cache names

torch.set_num_threads(1)

transformers = pytest.importorskip("transformers")
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,  # noqa: E402
                          LlavaNextConfig, LlavaNextForConditionalGeneration)

IMG = 120  # image placeholder id
N = 64  # visual tokens per image (8 x 8 grid, [CLS] dropped by the "default" strategy)
GEN = dict(max_new_tokens=4, do_sample=False)


def _configs(text=None, **vision):
    v = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
             patch_size=4)
    v.update(vision)
    vc = CLIPVisionConfig(**v)
    t = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=1024, pad_token_id=0, initializer_range=0.2)
    t.update(text or {})
    return vc, LlamaConfig(**t)


@pytest.fixture(scope="module")
def llava():
    vc, tc = _configs()
    torch.manual_seed(0)
    m = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG)).eval()
    return m


def _prompt(pre=(1, 5, 6), post=(7, 8, 9), images=1):
    ids = list(pre)
    for i in range(images):
        ids += [IMG] * N + ([11] if i < images - 1 else [])
    return torch.tensor([ids + list(post)])


def _pixels(n=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


class LMInput:
    """Records what the language model receives (inputs_embeds of every call)."""

    def __init__(self, model):
        self.lm = model.model.language_model
        self.seen = []

    def __enter__(self):
        self.h = self.lm.register_forward_pre_hook(
            lambda mod, a, kw: self.seen.append(kw["inputs_embeds"].detach().clone()), with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.h.remove()


def _k(budget, n=N):
    import math
    return max(1, math.floor(budget * n + 0.5))


METHODS = [("cls", {}), ("cls", {"variant": "sum"}), ("random", {}), ("pool", {}), ("apet", {"k": 2})]


@pytest.mark.parametrize("method,opts", METHODS, ids=lambda v: str(v))
@pytest.mark.parametrize("budget", [0.25, 0.1])  # 1.0: test_budget_one_equals_unpatched
def test_generate_runs_and_lm_input_shrinks(llava, method, opts, budget):
    ids, pv = _prompt(), _pixels()
    tokenprune.apply(llava, budget=budget, method=method, **opts)
    try:
        with LMInput(llava) as rec:
            out = llava.generate(input_ids=ids, pixel_values=pv, **GEN)
    finally:
        tokenprune.remove(llava)
    keep = tokenprune.plan(llava, budget=budget, method=method, **opts).num_out
    if method != "pool":
        assert keep == _k(budget)
    # the prompt comes back unchanged, followed by the new tokens
    assert out.shape == (1, ids.shape[1] + GEN["max_new_tokens"])
    assert torch.equal(out[:, :ids.shape[1]], ids)
    # prefill sees the prompt minus the pruned visual tokens; decoding sees one token per step
    assert rec.seen[0].shape[1] == ids.shape[1] - (N - keep)
    assert all(e.shape[1] == 1 for e in rec.seen[1:])


def test_budget_one_equals_unpatched(llava):
    ids, pv = _prompt(), _pixels()
    ref = llava.generate(input_ids=ids, pixel_values=pv, output_scores=True, return_dict_in_generate=True, **GEN)
    for method, opts in METHODS:
        with tokenprune.applied(llava, budget=1.0, method=method, **opts):
            out = llava.generate(input_ids=ids, pixel_values=pv, output_scores=True, return_dict_in_generate=True,
                                 **GEN)
        assert torch.equal(out.sequences, ref.sequences), method
        assert torch.equal(out.scores[0], ref.scores[0]), method


def test_pruning_changes_the_answer_inputs(llava):
    """At budget < 1 the LM really gets different (fewer) image embeddings: first-step logits move."""
    ids, pv = _prompt(), _pixels()
    ref = llava(input_ids=ids, pixel_values=pv).logits[0, -1]
    with tokenprune.applied(llava, budget=0.1, method="cls"):
        out = llava(input_ids=ids, pixel_values=pv).logits
    assert out.shape[1] == ids.shape[1] - (N - _k(0.1))
    assert not torch.allclose(out[0, -1], ref, atol=1e-4)


def test_cls_keeps_top_cls_attention_of_feature_layer(llava):
    """The kept image embeddings are the projector applied to the top-K patches of hidden state -2, ranked by
    the [CLS] attention of the layer producing it -- reference computed with HF's eager attention maps."""
    ids, pv = _prompt(), _pixels()
    budget = 0.25
    ref_model = copy.deepcopy(llava)
    ref_model.model.vision_tower.set_attn_implementation("eager")
    with torch.no_grad():
        vo = ref_model.model.vision_tower(pv, output_attentions=True, output_hidden_states=True)
        scores = vo.attentions[-2][:, :, 0, 1:].mean(1)  # [1, N]
        idx = scores.topk(_k(budget), dim=1).indices.sort(1).values[0]
        expected = ref_model.model.multi_modal_projector(vo.hidden_states[-2][:, 1:][:, idx])[0]
    with tokenprune.applied(llava, budget=budget, method="cls"), LMInput(llava) as rec:
        llava(input_ids=ids, pixel_values=pv)
    got = rec.seen[0][0, 3:3 + _k(budget)]
    assert torch.allclose(got, expected, atol=1e-5)
    # sum over layers (VTC-CLS) ranks by the summed maps of layers 0..feature layer
    with torch.no_grad():
        summed = sum(a[:, :, 0, 1:].mean(1) for a in vo.attentions[:2])
        idx2 = summed.topk(_k(budget), dim=1).indices.sort(1).values[0]
        expected2 = ref_model.model.multi_modal_projector(vo.hidden_states[-2][:, 1:][:, idx2])[0]
    with tokenprune.applied(llava, budget=budget, method="cls", variant="sum"), LMInput(llava) as rec:
        llava(input_ids=ids, pixel_values=pv)
    assert torch.allclose(rec.seen[0][0, 3:3 + _k(budget)], expected2, atol=1e-5)


def test_two_images_in_one_prompt(llava):
    ids, pv = _prompt(images=2), _pixels(2)
    with tokenprune.applied(llava, budget=0.25, method="cls"), LMInput(llava) as rec:
        out = llava.generate(input_ids=ids, pixel_values=pv, **GEN)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    assert rec.seen[0].shape[1] == ids.shape[1] - 2 * (N - _k(0.25))


def test_left_padded_batch_equals_each_prompt_alone(llava):
    a = _prompt(pre=(1, 5, 6, 7, 8, 9), post=(3, 4))
    b = _prompt(pre=(1, 2), post=(3,))
    pad = a.shape[1] - b.shape[1]
    ids = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    pv = torch.cat([_pixels(seed=1), _pixels(seed=2)])
    kw = dict(output_scores=True, return_dict_in_generate=True, **GEN)
    with tokenprune.applied(llava, budget=0.25, method="cls"):
        both = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, **kw)
        one = llava.generate(input_ids=a, pixel_values=pv[:1], **kw)
        two = llava.generate(input_ids=b, pixel_values=pv[1:], **kw)
    assert torch.equal(both.sequences[:, :ids.shape[1]], ids)
    assert torch.equal(both.sequences[0, ids.shape[1]:], one.sequences[0, a.shape[1]:])
    assert torch.equal(both.sequences[1, ids.shape[1]:], two.sequences[0, b.shape[1]:])
    for s_both, s1, s2 in zip(both.scores, one.scores, two.scores):
        assert torch.allclose(s_both[0], s1[0], atol=1e-4)
        assert torch.allclose(s_both[1], s2[0], atol=1e-4)


def test_forward_with_labels_shrinks_consistently(llava):
    ids, pv = _prompt(), _pixels()
    labels = ids.clone()
    labels[ids == IMG] = -100
    with tokenprune.applied(llava, budget=0.25, method="cls"):
        out = llava(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids), labels=labels)
    short = ids.shape[1] - (N - _k(0.25))
    assert out.logits.shape[1] == short
    # the text after the image is unchanged, so its loss terms are the same tokens: loss is finite and positive
    assert torch.isfinite(out.loss) and out.loss > 0


def test_remove_is_exact(llava):
    ids, pv = _prompt(), _pixels()
    classes = (type(llava), type(llava.model), type(llava.model.multi_modal_projector))
    sd = {k: v.clone() for k, v in llava.state_dict().items()}
    ref = llava.generate(input_ids=ids, pixel_values=pv, **GEN)
    tokenprune.apply(llava, budget=0.1, method="cls")
    assert type(llava) is not classes[0]
    tokenprune.remove(llava)
    assert (type(llava), type(llava.model), type(llava.model.multi_modal_projector)) == classes
    assert not any(k.startswith("_tokenprune") for m in (llava, llava.model, llava.model.multi_modal_projector)
                   for k in m.__dict__)
    assert sd.keys() == llava.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in llava.state_dict().items())
    assert torch.equal(llava.generate(input_ids=ids, pixel_values=pv, **GEN), ref)


def test_lm_keeps_its_attention_and_tower_keeps_sdpa(llava):
    layers = llava.model.vision_tower.encoder.layers
    with tokenprune.applied(llava, budget=0.25, method="cls"):
        assert llava.model.vision_tower.config._attn_implementation == "sdpa"
        assert llava.model.language_model.config._attn_implementation == "sdpa"
        # only the scoring layer (-2 -> layer 1) goes through tokenprune_sdpa (SDPA, recording its q/k)
        assert [la.self_attn.config._attn_implementation for la in layers] == ["sdpa", "tokenprune_sdpa", "sdpa"]
    assert all(la.self_attn.config is llava.model.vision_tower.config for la in layers)


def test_errors(llava):
    with pytest.raises(ValueError, match="rounds to 0"):
        tokenprune.apply(llava, budget=0.005, method="cls")
    with pytest.raises(ValueError, match="not available"):
        tokenprune.apply(llava, budget=0.5, method="merge")
    with pytest.raises(ValueError, match="threshold"):
        tokenprune.apply(llava, budget=0.5, method="cls", threshold=0.01)
    assert not tokenprune.is_applied(llava)
    no_id = copy.deepcopy(llava)
    no_id.config.image_token_id = None
    with pytest.raises(ValueError, match="image_token_id"):
        tokenprune.apply(no_id, budget=0.5, method="cls")
    # wrong number of placeholders: a clear message, not HF's mismatch
    tokenprune.apply(llava, budget=0.5, method="cls")
    try:
        with pytest.raises(ValueError, match="processor"):
            llava.generate(input_ids=_prompt()[:, :-10], pixel_values=_pixels(), **GEN)
    finally:
        tokenprune.remove(llava)


def test_unsupported_vlm_family():
    """A LLaVA relative that is not a subclass of the supported ones (LLaVA-NeXT-Video) is refused."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration, Qwen2Config, \
        SiglipVisionConfig

    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32, patch_size=8)
    tc = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, vocab_size=128)
    m = LlavaNextVideoForConditionalGeneration(LlavaNextVideoConfig(vision_config=vc, text_config=tc,
                                                                     image_token_id=120, video_token_id=121))
    with pytest.raises(TypeError, match="does not support yet"):
        tokenprune.apply(m, budget=0.5, method="cls")


def test_lm_flop_ratio_is_the_prefill_bound():
    from tokenprune.adapters.llava import lm_flop_ratio, prefill_flops

    vc, tc = _configs()
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG)
    assert lm_flop_ratio(cfg, 1.0) == 1.0
    r = lm_flop_ratio(cfg, 0.25, text_tokens=10)
    assert r == pytest.approx(prefill_flops(tc, 10 + 16) / prefill_flops(tc, 10 + 64))
    assert lm_flop_ratio(cfg, 0.1, text_tokens=10) < r < 1


# -- LLaVA-NeXT ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava_next():
    vc, tc = _configs()
    torch.manual_seed(0)
    cfg = LlavaNextConfig(vision_config=vc, text_config=tc, image_token_index=IMG,
                          image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    return LlavaNextForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def next_inputs(llava_next):
    return _next_inputs(llava_next)


def _next_inputs(model):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    sizes = torch.tensor([[40, 60], [64, 30]])
    crops = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, 32) for s in sizes]
    pv = torch.randn(2, max(crops), 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # HF's own packed lengths (base crop + unpadded crops + newline tokens)
        n = [f.shape[0] for f in model.model.get_image_features(pv, sizes).pooler_output]
    width = max(n) + 4
    rows, mask = [], torch.zeros(2, width, dtype=torch.long)
    for i, ni in enumerate(n):
        row = [1, 5] + [IMG] * ni + [7, 8]
        rows.append([0] * (width - len(row)) + row)
        mask[i, width - len(row):] = 1
    return torch.tensor(rows), mask, pv, sizes, n


@pytest.mark.parametrize("method,budget", [("cls", 1.0), ("cls", 0.25), ("random", 0.05), ("apet", 0.25)])
def test_next_generate_with_pruning(llava_next, next_inputs, method, budget):
    ids, mask, pv, sizes, n = next_inputs
    with tokenprune.applied(llava_next, budget=budget, method=method), LMInput(llava_next) as rec:
        out = llava_next.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes, **GEN)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    kept = [_k(budget, ni) for ni in n]
    # old padding is dropped too: the LM gets the longest pruned row
    assert rec.seen[0].shape[1] == 4 + max(kept)
    if budget == 1.0:
        ref = llava_next.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes, **GEN)
        assert torch.equal(out, ref)


def test_next_cls_selects_within_packed_order(llava_next, next_inputs):
    """Kept NeXT embeddings reaching the LM are a subsequence (packed order) of HF's unpruned packed embeddings."""
    ids, mask, pv, sizes, n = next_inputs
    with torch.no_grad():
        full = llava_next.model.get_image_features(pv, sizes).pooler_output
    for i in range(2):
        row = ids[i:i + 1, mask[i].bool()]
        with tokenprune.applied(llava_next, budget=0.25, method="cls"), LMInput(llava_next) as rec, torch.no_grad():
            llava_next(input_ids=row, pixel_values=pv[i:i + 1], image_sizes=sizes[i:i + 1])
        f, ni = full[i], n[i]
        p = rec.seen[0][0, 2:2 + _k(0.25, ni)]
        assert rec.seen[0].shape[1] == row.shape[1] - ni + _k(0.25, ni)
        dist = (p[:, None] - f[None]).abs().amax(-1)  # [kept, packed]: copies (up to batched-matmul rounding)
        assert bool((dist.amin(1) < 1e-5).all())
        pos = dist.argmin(1)
        assert bool((pos[1:] > pos[:-1]).all())


@pytest.mark.parametrize("method", ["cls", "random"])
def test_rows_with_different_image_counts_equal_each_alone(llava, method):
    """Row 0 has two images, row 1 one (left padded): rows shrink by different amounts and are re-padded.
    ``random``: an image keeps the same tokens wherever it stands in the batch of images (row 1's image is the
    third image of the batch, the first alone)."""
    r0 = [1, 5] + [IMG] * N + [9] + [IMG] * N + [7]
    pad = len(r0) - (N + 3)
    r1 = [0] * pad + [1, 5] + [IMG] * N + [7]
    ids = torch.tensor([r0, r1])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    pv = torch.cat([_pixels(2, seed=4), _pixels(1, seed=5)])
    with tokenprune.applied(llava, budget=0.25, method=method), LMInput(llava) as rec:
        out = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, **GEN)
        a = llava.generate(input_ids=ids[:1], pixel_values=pv[:2], **GEN)
        b = llava.generate(input_ids=ids[1:, pad:], pixel_values=pv[2:], **GEN)
    assert rec.seen[0].shape[1] == len(r0) - 2 * (N - _k(0.25))
    assert torch.equal(out[0, ids.shape[1]:], a[0, len(r0):])
    assert torch.equal(out[1, ids.shape[1]:], b[0, N + 3:])


@pytest.mark.parametrize("tower", ["clip_full", "siglip_full", "two_layers", "beams"])
def test_config_variants(tower):
    from transformers import SiglipVisionConfig

    vc, tc = _configs()
    extra, gen, n = {}, dict(GEN), N
    if tower == "clip_full":
        extra = dict(vision_feature_select_strategy="full")
        n = N + 1  # [CLS] reaches the LM: a prefix token, always kept, not counted in the budget
    elif tower == "siglip_full":
        vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                image_size=32, patch_size=4)
        extra = dict(vision_feature_select_strategy="full")
    elif tower == "two_layers":
        extra = dict(vision_feature_layer=[-3, -2])
    else:
        gen.update(num_beams=2, num_return_sequences=2)
    torch.manual_seed(0)
    m = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG,
                                                  **extra)).eval()
    ids = torch.tensor([[1, 5] + [IMG] * n + [7]])
    pv = _pixels()
    ref = m.generate(input_ids=ids, pixel_values=pv, **gen)
    with tokenprune.applied(m, budget=1.0, method="cls"):
        assert torch.equal(m.generate(input_ids=ids, pixel_values=pv, **gen), ref)
    with tokenprune.applied(m, budget=0.25, method="cls"), LMInput(m) as rec:
        out = m.generate(input_ids=ids, pixel_values=pv, **gen)
    assert out.shape == ref.shape and torch.equal(out[:, :ids.shape[1]], ids.expand(out.shape[0], -1))
    assert rec.seen[0].shape[1] == ids.shape[1] - (N - _k(0.25))


def test_crosslmm_addon_identity_at_init_trainable_and_removed(llava):
    from tokenprune.adapters.llava import add_cross_attention

    ids, pv = _prompt(), _pixels()
    with pytest.raises(ValueError, match="method='pool'"):
        with tokenprune.applied(llava, budget=0.25, method="cls"):
            add_cross_attention(llava)
    keys = set(llava.state_dict())
    tokenprune.apply(llava, budget=0.25, method="pool")
    try:
        ref = llava(input_ids=ids, pixel_values=pv).logits
        mods = add_cross_attention(llava, every=1)
        assert len(mods) == 2 and any("tokenprune_cross_attention" in k for k in llava.state_dict())
        seen = []
        hook = mods[0].register_forward_hook(lambda m, a, o: seen.append((a[0].shape, a[1].shape)))
        assert torch.allclose(llava(input_ids=ids, pixel_values=pv).logits, ref, atol=1e-6)  # gates start at 0
        # pooled visual tokens (16) attend to all 64 projected visual tokens of their image
        assert seen == [(torch.Size([1, _k(0.25), 32]), torch.Size([1, N, 32]))]
        llava.generate(input_ids=ids, pixel_values=pv, **GEN)  # prefill only: decoding steps skip it
        assert len(seen) == 2
        hook.remove()
        loss = llava(input_ids=ids, pixel_values=pv, labels=ids).loss
        loss.backward()
        assert all(m.gate.grad is not None and m.gate.grad.abs() > 0 for m in mods)
        with torch.no_grad():
            for m in mods:
                m.gate.fill_(0.5)
        assert not torch.allclose(llava(input_ids=ids, pixel_values=pv).logits, ref, atol=1e-4)
    finally:
        llava.zero_grad(set_to_none=True)
        tokenprune.remove(llava)
    assert set(llava.state_dict()) == keys
    assert not any(layer._forward_hooks for layer in llava.model.language_model.layers)


def test_save_pretrained_while_patched_writes_the_original_architecture(llava, tmp_path):
    with tokenprune.applied(llava, budget=0.25, method="cls"):
        patched = type(llava)
        llava.save_pretrained(tmp_path)
        assert type(llava) is patched
    import json
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, pv = _prompt(), _pixels()
    assert torch.equal(loaded.generate(input_ids=ids, pixel_values=pv, **GEN),
                       llava.generate(input_ids=ids, pixel_values=pv, **GEN))


def test_processor_usual_call(llava):
    """``model.generate(**processor(images=..., text=..., padding=True))`` with an offline tokenizer."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "<s>", "USER:", "ASSISTANT:", "what", "is", "this", "?"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<image>"] = IMG
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ftok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   extra_special_tokens={"image_token": "<image>"})
    ftok.padding_side = "left"
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32}),
                          tokenizer=ftok, patch_size=4, vision_feature_select_strategy="default",
                          image_token="<image>", num_additional_image_tokens=1)
    imgs = [np.random.RandomState(i).randint(0, 255, (40, 48, 3), dtype=np.uint8) for i in range(2)]
    inputs = proc(images=imgs, text=["USER: <image> what is this ? ASSISTANT:", "USER: <image> ? ASSISTANT:"],
                  return_tensors="pt", padding=True)
    assert (inputs.input_ids == IMG).sum(1).tolist() == [N, N]
    with tokenprune.applied(llava, budget=0.1, method="cls"), LMInput(llava) as rec:
        out = llava.generate(**inputs, **GEN)
    assert torch.equal(out[:, :inputs.input_ids.shape[1]], inputs.input_ids)
    assert rec.seen[0].shape[1] == inputs.input_ids.shape[1] - (N - _k(0.1))


def test_continuing_generate_from_a_pruned_cache(llava):
    """The cache of a pruned generate() holds the PRUNED prompt while the returned sequences hold the original one:
    continuing from it with text only would feed the LM misaligned tokens. It is refused, and the advised call (the
    images again, with the cache) gives the tokens of a fresh generate() on the whole conversation."""
    ids, pv = _prompt(), _pixels()
    with tokenprune.applied(llava, budget=0.25, method="cls"):
        out = llava.generate(input_ids=ids, pixel_values=pv, return_dict_in_generate=True, **GEN)
        turn = torch.cat([out.sequences, torch.tensor([[20, 21, 22]])], 1)
        with pytest.raises(ValueError, match="pixel_values"):
            llava.generate(input_ids=turn, **cache_kw(out), **GEN)
        fresh = llava.generate(input_ids=turn, pixel_values=pv, **GEN)
        again = llava.generate(input_ids=turn, pixel_values=pv, **cache_kw(out), **GEN)
        # text-only prompts with a cache are the model's own path
        text = torch.tensor([[1, 5, 6, 7]])
        t1 = llava.generate(input_ids=text, return_dict_in_generate=True, **GEN)
        t2 = llava.generate(input_ids=torch.cat([t1.sequences, text], 1), **cache_kw(t1), **GEN)
    assert torch.equal(again, fresh)
    assert t2.shape[1] == 2 * text.shape[1] + 2 * GEN["max_new_tokens"]


def test_max_length_and_min_length_count_the_prompt_the_user_passed(llava):
    """generate()'s max_length / min_length count the prompt as passed (with all its placeholders), not the pruned
    prompt the LM sees: the pruned model returns as many tokens as the unpatched one."""
    from transformers import GenerationConfig

    ids, pv = _prompt(), _pixels()
    length = ids.shape[1]
    with tokenprune.applied(llava, budget=0.25, method="cls"):
        out = llava.generate(input_ids=ids, pixel_values=pv, max_length=length + 5, do_sample=False)
        assert out.shape == (1, length + 5)
        out = llava.generate(input_ids=ids, pixel_values=pv,
                             generation_config=GenerationConfig(max_length=length + 3, do_sample=False))
        assert out.shape == (1, length + 3)
        first = int(llava.generate(input_ids=ids, pixel_values=pv, max_new_tokens=1, do_sample=False)[0, -1])
        # min_length: the first token is EOS, held back until the sequence has length + 3 tokens (= 3 new ones)
        kw = dict(input_ids=ids, pixel_values=pv, max_new_tokens=6, eos_token_id=first, do_sample=False)
        out = llava.generate(min_length=length + 3, **kw)
        assert torch.equal(out, llava.generate(min_new_tokens=3, **kw))


def test_bare_model_without_lm_head_says_which_model_to_patch():
    """LlavaModel / Qwen2VLModel / Gemma3Model are supported families without the LM head: the error names the
    ...ForConditionalGeneration class to patch, not "not supported yet"."""
    from test_vlm_gemma import build as gemma
    from test_vlm_qwen import build as qwen
    from transformers import LlavaModel

    vc, tc = _configs()
    for m, want in ((LlavaModel(LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG)),
                     "LlavaForConditionalGeneration"),
                    (qwen("qwen2_vl").model, "Qwen2VLForConditionalGeneration"),
                    (gemma("gemma3").model, "Gemma3ForConditionalGeneration")):
        with pytest.raises(TypeError, match=f"patch the {want}") as e:
            tokenprune.apply(m, budget=0.5, method="cls")
        assert "not support yet" not in str(e.value)
        assert not tokenprune.is_applied(m)


def test_cached_step_with_a_mask_grown_from_the_original_prompt_is_refused(llava):
    """A pruned forward (prefill) of a left-padded batch drops the old padding, so its cache holds the pruned rows;
    a step mask grown from the original mask (what a hand-written decoding loop does) would mask real tokens of the
    cache (transformers reads its first columns): refused with what to do. A mask that fits the cache runs."""
    ids, pv = _prompt(), _pixels()
    rows = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1).repeat(2, 1)
    mask = torch.ones_like(rows)
    mask[:, :3] = 0
    with tokenprune.applied(llava, budget=0.25, method="cls"):
        gen = llava.generate(input_ids=ids, pixel_values=pv, max_new_tokens=2, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        out = llava(input_ids=rows, pixel_values=pv.repeat(2, 1, 1, 1), attention_mask=mask, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        with pytest.raises(ValueError, match="PRUNED prompt"):
            llava(input_ids=nxt, **cache_kw(out), attention_mask=torch.cat([mask, torch.ones(2, 1).long()], 1))
        past = cache_of(out).get_seq_length()
        step = llava(input_ids=nxt, **cache_kw(out), attention_mask=torch.ones(2, past + 1).long())
    assert torch.allclose(step.logits[:, -1], gen.scores[1][0].expand(2, -1), atol=1e-5)
