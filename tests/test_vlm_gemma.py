"""PaliGemma / Gemma 3: visual tokens pruned between the SigLIP tower and the LM (vlm/gemma.py on vlm/core.py).

Tiny random configs (2-layer SigLIP of width 32 on 16x16 images with patch 2 = 8x8 patches; PaliGemma gives the
LM 64 tokens per image, Gemma 3 pools them to mm_tokens_per_image = 16; a 2-layer LM of width 32), CPU.
"""
import pytest
import torch

import tokenprune

torch.set_num_threads(1)

transformers = pytest.importorskip("transformers")
from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, PaliGemmaConfig,  # noqa: E402
                          PaliGemmaForConditionalGeneration)

IMG, BOI, EOI = 120, 121, 122
GEN = dict(max_new_tokens=3, do_sample=False)
KINDS = ["paligemma", "gemma3"]
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
              patch_size=2)  # 8x8 patches


def build(kind, lm=32):
    """A tiny Gemma 3 / PaliGemma; ``lm``: the language model's width (the vision tower's is 32)."""
    torch.manual_seed(0)
    text = dict(hidden_size=lm, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, vocab_size=128, pad_token_id=0, bos_token_id=1,
                eos_token_id=None)
    if kind == "gemma3":
        cfg = Gemma3Config(vision_config=dict(VISION), text_config=dict(text, sliding_window=8),
                           mm_tokens_per_image=16, image_token_id=IMG, boi_token_index=BOI, eoi_token_index=EOI)
        m = Gemma3ForConditionalGeneration(cfg)
        with torch.no_grad():  # initialised to zeros: every image token would be the same
            m.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    else:
        cfg = PaliGemmaConfig(vision_config=dict(VISION, projection_dim=lm), text_config=dict(text),
                              image_token_id=IMG, projection_dim=lm)
        m = PaliGemmaForConditionalGeneration(cfg)
    m = m.eval()
    m.generation_config.pad_token_id = 0
    m.generation_config.eos_token_id = None
    return m


@pytest.fixture(scope="module")
def models():
    return {k: build(k) for k in KINDS}


def n_tokens(kind):
    return 16 if kind == "gemma3" else 64


def _inputs(kind, images=1, seed=1, post=(7, 8, 9)):
    n = n_tokens(kind)
    ids, tt = [1, 5], [0, 0]
    for i in range(images):
        if kind == "gemma3":
            ids += [BOI] + [IMG] * n + [EOI]
            tt += [0] + [1] * n + [0]
        else:
            ids += [IMG] * n
            tt += [0] * n
    ids += list(post)
    tt += [0] * len(post)
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([tt]),
                pixel_values=torch.randn(images, 3, 16, 16, generator=g),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long))


def _lm_lengths(model, fn):
    """Sequence lengths the language model receives during ``fn()``."""
    seen = []
    h = model.model.language_model.register_forward_pre_hook(
        lambda mod, args, kw: seen.append((kw.get("inputs_embeds") if kw.get("inputs_embeds") is not None
                                           else args[0]).shape[1]), with_kwargs=True)
    try:
        fn()
    finally:
        h.remove()
    return seen


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["cls", "random", "pool"])
@pytest.mark.parametrize("budget", [1.0, 0.25])
def test_generate_shrinks_lm_input(models, kind, method, budget):
    m = models[kind]
    a = _inputs(kind, images=2)
    ref = m.generate(**a, **GEN)
    full = a["input_ids"].shape[1]
    tokenprune.apply(m, budget=budget, method=method)
    try:
        seen = _lm_lengths(m, lambda: m.generate(**a, **GEN))
        out = m.generate(**a, **GEN)
    finally:
        tokenprune.remove(m)
    n = n_tokens(kind)
    pruned = 2 * (n - round(budget * n))
    assert seen[0] == full - pruned
    assert out.shape == ref.shape and torch.equal(out[:, :full], a["input_ids"])
    if budget == 1.0:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_remove_exact(models, kind):
    m = models[kind]
    a = _inputs(kind)
    ref = m(**a).logits
    state = {k: v.clone() for k, v in m.state_dict().items()}
    tokenprune.apply(m, budget=0.25, method="cls")
    pruned = m(**a).logits
    tokenprune.remove(m)
    assert pruned.shape[1] < ref.shape[1]
    assert torch.equal(m(**a).logits, ref)
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    assert type(m).__name__ == ("Gemma3ForConditionalGeneration" if kind == "gemma3"
                                else "PaliGemmaForConditionalGeneration")


def _left_pad(rows, pad=0):
    width = max(r["input_ids"].shape[1] for r in rows)
    out = {}
    for k, fill in (("input_ids", pad), ("token_type_ids", 0), ("attention_mask", 0)):
        out[k] = torch.cat([torch.cat([torch.full((1, width - r[k].shape[1]), fill, dtype=r[k].dtype), r[k]], 1)
                            for r in rows])
    out["pixel_values"] = torch.cat([r["pixel_values"] for r in rows])
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["cls", "pool"])
def test_left_padded_batch_equals_alone(models, kind, method):
    m = models[kind]
    a = _inputs(kind, seed=1, post=(7, 8, 9, 10, 11))
    b = _inputs(kind, seed=2, post=(9,))
    batch = _left_pad([a, b])
    tokenprune.apply(m, budget=0.25, method=method)
    try:
        out = m.generate(**batch, **GEN)
        alone = [m.generate(**x, **GEN) for x in (a, b)]
        logits = m(**batch).logits
        logits_alone = [m(**x).logits for x in (a, b)]
    finally:
        tokenprune.remove(m)
    for i, x in enumerate(alone):
        assert torch.equal(out[i, -GEN["max_new_tokens"]:], x[0, -GEN["max_new_tokens"]:])
        assert torch.allclose(logits[i, -1], logits_alone[i][0, -1], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_token_type_ids_follow(models, kind):
    """The shrunk token_type_ids mark exactly the kept image tokens (Gemma 3) / the kept prefix (PaliGemma)."""
    m = models[kind]
    a = _inputs(kind, images=2)
    tokenprune.apply(m, budget=0.25, method="cls")
    try:
        new = m.__dict__["_tokenprune_patch"].adapter.prepare(dict(a), for_generate=True)
    finally:
        tokenprune.remove(m)
    ids, tt = new["input_ids"], new["token_type_ids"]
    assert tt.shape == ids.shape
    assert int((ids == IMG).sum()) == 2 * round(0.25 * n_tokens(kind))
    if kind == "gemma3":
        assert torch.equal(tt == 1, ids == IMG)
    else:
        assert not bool(tt.any())


@pytest.mark.parametrize("kind", KINDS)
def test_apet_runs(models, kind):
    m = models[kind]
    a = _inputs(kind)
    tokenprune.apply(m, budget=0.25, method="apet", k=2)
    try:
        out = m.generate(**a, **GEN)
    finally:
        tokenprune.remove(m)
    assert out.shape[1] == a["input_ids"].shape[1] + GEN["max_new_tokens"]


@pytest.mark.parametrize("kind", KINDS)
def test_placeholder_mismatch_is_clear(models, kind):
    m = models[kind]
    a = _inputs(kind)
    a["input_ids"] = a["input_ids"].clone()
    a["input_ids"][0, 3] = 5  # one placeholder fewer than the image needs
    tokenprune.apply(m, budget=0.25, method="cls")
    try:
        with pytest.raises(ValueError, match="placeholder tokens but the 1 image"):
            m.generate(**a, **GEN)
    finally:
        tokenprune.remove(m)


@pytest.mark.parametrize("kind", KINDS)
def test_cls_keeps_most_received(kind):
    """``cls`` keeps the tokens that receive the most attention at the tower's last layer (reference: the
    eager attention weights; on Gemma 3 averaged over each pooling window)."""
    m = build(kind)
    a = _inputs(kind)
    vt = m.model.vision_tower
    attn = getattr(vt, "vision_model", vt).encoder.layers[-1].self_attn
    attn.config._attn_implementation = "eager"
    with torch.no_grad():
        received = vt(a["pixel_values"], output_attentions=True).attentions[-1].mean((1, 2))[0]
    attn.config._attn_implementation = "sdpa"
    if kind == "gemma3":
        received = torch.nn.functional.avg_pool2d(received.view(1, 1, 8, 8), 2).flatten()
    k = round(0.25 * n_tokens(kind))
    with torch.no_grad():
        feats = m.model.get_image_features(a["pixel_values"]).pooler_output[0]
    tokenprune.apply(m, budget=0.25, method="cls")
    new = m.__dict__["_tokenprune_patch"].adapter.prepare(dict(a), for_generate=True)
    tokenprune.remove(m)
    kept = new["inputs_embeds"][0][new["input_ids"][0] == IMG]
    kept_idx = torch.cdist(kept.float(), feats.float()).argmin(1)
    assert torch.equal(kept_idx, received.topk(k).indices.sort().values)  # in original order


@pytest.mark.parametrize("kind", KINDS)
def test_labels_and_beams(models, kind):
    """labels shrink with the prompt (loss over the text targets unchanged in count); beam search expands the
    pruned prompt and its token_type_ids."""
    m = models[kind]
    a = _inputs(kind)
    labels = torch.where(a["input_ids"] == IMG, -100, a["input_ids"])
    with tokenprune.applied(m, budget=0.25, method="cls"):
        out = m(**a, labels=labels)
        beams = m.generate(**a, max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False)
    with pytest.raises(ValueError, match="rounds to 0"):  # keeps 0.32 / 0.08 of an image's tokens
        tokenprune.apply(m, budget=0.005, method="cls")
    assert not tokenprune.is_applied(m)
    assert out.logits.shape[1] == a["input_ids"].shape[1] - (n_tokens(kind) - round(0.25 * n_tokens(kind)))
    assert torch.isfinite(out.loss)
    assert beams.shape == (2, a["input_ids"].shape[1] + 2)


@pytest.mark.parametrize("kind", KINDS)
def test_pruned_call_is_a_prompt_with_k_placeholders(models, kind):
    """Positions renumbered: the pruned forward equals the unpatched model run on the pruned prompt's embeddings
    with token_type_ids built afresh for it (default, consecutive positions)."""
    m = models[kind]
    a = _inputs(kind, images=2)
    with tokenprune.applied(m, budget=0.25, method="cls"):
        new = m.__dict__["_tokenprune_patch"].adapter.prepare(dict(a), for_generate=True)
        pruned = m(**a).logits
    ids = new["input_ids"]
    tt = (ids == IMG).long() if kind == "gemma3" else torch.zeros_like(ids)
    ref = m(inputs_embeds=new["inputs_embeds"], attention_mask=new["attention_mask"], token_type_ids=tt).logits
    assert torch.allclose(pruned, ref, atol=1e-5)
