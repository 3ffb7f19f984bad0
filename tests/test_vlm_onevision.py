"""LLaVA-OneVision: visual tokens pruned between the SigLIP tower and the LM (vlm/onevision.py on vlm/core.py).

Tiny random config: a 2-layer SigLIP of width 32 on 16x16 crops with patch 2 (8x8 = 64 tokens per crop, a video
frame pooled to 4x4 = 16), AnyRes pinpoints up to 2x2 tiles, a 2-layer Qwen2 LM of width 32; CPU. Expected counts
come from the unpatched model: an image's placeholders are the length of HF's packed features, its newline
tokens the rows equal to ``image_newline``.
"""
import math

import pytest
import torch

import tokenprune
from tokenprune.reducers.pool import pooled_grid

torch.set_num_threads(1)

transformers = pytest.importorskip("transformers")
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration  # noqa: E402
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches  # noqa: E402
from test_llava import LMInput  # noqa: E402  (records what the language model receives)

IMG, VID = 120, 121
GEN = dict(max_new_tokens=3, do_sample=False)
METHODS = [("cls", {}), ("random", {}), ("pool", {}), ("apet", {"k": 2})]
SIZES = [[20, 30], [32, 32], [30, 12]]  # 1x2 tiles unpadded to 10 rows; 2x2 tiles, 16 rows; 2x1 tiles


def build(lm=32):
    """A tiny LLaVA-OneVision; ``lm``: the language model's width (heads of 16; the vision tower's is 32)."""
    torch.manual_seed(0)
    vc = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, image_size=16, patch_size=2)
    tc = dict(model_type="qwen2", hidden_size=lm, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=lm // 16, num_key_value_heads=1, vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=None)
    cfg = LlavaOnevisionConfig(vision_config=vc, text_config=tc, image_token_id=IMG, video_token_id=VID,
                               image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]])
    m = LlavaOnevisionForConditionalGeneration(cfg).eval()
    m.generation_config.pad_token_id = 0
    m.generation_config.eos_token_id = None
    return m


@pytest.fixture(scope="module")
def model():
    return build()


def _k(budget, n):
    return max(1, math.floor(budget * n + 0.5))


def _images(m, sizes, seed=1, multi=False):
    """pixel values, image_sizes, batch_num_images and, per image, (placeholders, newline mask) from HF itself."""
    sizes = torch.tensor(sizes)
    crops = [1] * len(sizes) if multi else [image_size_to_num_patches(s, m.config.image_grid_pinpoints, 16)
                                            for s in sizes]
    pv = torch.randn(len(sizes), max(crops), 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    bni = torch.tensor([len(sizes)]) if multi else None
    with torch.no_grad():
        feats = m.model.get_image_features(pv, sizes, batch_num_images=bni).pooler_output
    return pv, sizes, bni, [(f, (f == m.model.image_newline).all(-1)) for f in feats]


def _inputs(m, sizes=SIZES[:1], seed=1, multi=False, post=(7, 8, 9)):
    pv, sz, bni, items = _images(m, sizes, seed, multi)
    ids = [1, 5]
    for i, (f, _) in enumerate(items):
        ids += [IMG] * f.shape[0] + ([11] if i < len(items) - 1 else [])
    ids = torch.tensor([ids + list(post)])
    a = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, image_sizes=sz)
    if bni is not None:
        a["batch_num_images"] = bni
    return a, items


def _video(frames=2, seed=3, pre=(1, 5), post=(7, 8)):
    n = frames * 16 + 1  # 4x4 pooled tokens per frame, one newline
    ids = torch.tensor([list(pre) + [VID] * n + list(post)])
    pvv = torch.randn(1, frames, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pvv)


def _pruned(budget, method, items):
    """Placeholders the pruning removes from the images ``items`` (newlines kept)."""
    out = 0
    for f, nl in items:
        n = int((~nl).sum())
        if method != "pool":
            out += n - _k(budget, n)
            continue
        rows = int(nl[64:].sum())
        parts = [(8, 8)] + ([(rows, (f.shape[0] - 64) // rows - 1)] if rows and f.shape[0] > 65 else [])
        out += n - sum(math.prod(pooled_grid(g, _k(budget, math.prod(g)))) for g in parts)
    return out




@pytest.mark.parametrize("method,opts", METHODS, ids=lambda v: str(v))
@pytest.mark.parametrize("budget", [1.0, 0.25, 0.1])
def test_generate_shrinks_lm_input(model, method, opts, budget):
    a, items = _inputs(model, SIZES[:2])  # two AnyRes images in one prompt (each with its tiles)
    ref = model.generate(**a, **GEN)
    with tokenprune.applied(model, budget=budget, method=method, **opts), LMInput(model) as rec:
        out = model.generate(**a, **GEN)
    full = a["input_ids"].shape[1]
    assert rec.seen[0].shape[1] == full - _pruned(budget, method, items)
    assert out.shape == ref.shape and torch.equal(out[:, :full], a["input_ids"])
    if budget == 1.0:
        assert torch.equal(out, ref)
    else:
        assert rec.seen[0].shape[1] < full


@pytest.mark.parametrize("method", ["cls", "random", "apet"])
def test_kept_tokens_are_a_subsequence_with_every_newline(model, method):
    """What reaches the LM at the image placeholders is HF's packed sequence with visual tokens left out: every
    newline token, in order, and exactly K visual tokens."""
    a, items = _inputs(model, SIZES[1:2])
    f, nl = items[0]
    opts = {"k": 2} if method == "apet" else {}
    with tokenprune.applied(model, budget=0.25, method=method, **opts):
        new = model.__dict__["_tokenprune_patch"].adapter.prepare(dict(a), for_generate=True)
    kept = new["inputs_embeds"][0][new["input_ids"][0] == IMG]
    is_nl = (kept == model.model.image_newline).all(-1)
    assert int(is_nl.sum()) == int(nl.sum())  # every newline kept
    assert int((~is_nl).sum()) == _k(0.25, int((~nl).sum()))
    if method != "apet":  # pruned, not merged: the kept rows are HF's own features, in packed order
        seq = torch.empty(kept.shape[0], dtype=torch.long)
        seq[is_nl] = nl.nonzero()[:, 0]
        seq[~is_nl] = (~nl).nonzero()[:, 0][torch.cdist(kept[~is_nl], f[~nl]).argmin(1)]
        assert bool((seq[1:] > seq[:-1]).all())
        assert torch.allclose(kept, f[seq], atol=1e-6)


def test_two_single_crop_images_cls_keeps_most_received(model):
    """In a prompt with several images each image is its base crop + a newline; ``cls`` keeps, per image, the
    patches receiving the most attention at the tower's last layer (reference: eager attention weights)."""
    a, items = _inputs(model, SIZES[:2], multi=True)
    assert [f.shape[0] for f, _ in items] == [65, 65]
    tower = model.model.vision_tower
    attn = getattr(tower, "vision_model", tower).encoder.layers[-1].self_attn
    attn.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            received = tower(a["pixel_values"][:, 0], output_attentions=True).attentions[-1].mean((1, 2))
    finally:
        attn.config._attn_implementation = "sdpa"
    with tokenprune.applied(model, budget=0.25, method="cls"):
        new = model.__dict__["_tokenprune_patch"].adapter.prepare(dict(a), for_generate=True)
        out = model.generate(**a, **GEN)
    kept = new["inputs_embeds"][0][new["input_ids"][0] == IMG]
    assert kept.shape[0] == 2 * (16 + 1)
    for i, (f, nl) in enumerate(items):
        idx = torch.cdist(kept[17 * i:17 * (i + 1)], f).argmin(1)
        assert idx[-1] == 64 and bool(nl[64])
        assert torch.equal(idx[:-1], received[i].topk(16).indices.sort().values)
    assert out.shape[1] == a["input_ids"].shape[1] + GEN["max_new_tokens"]


@pytest.mark.parametrize("method,opts", METHODS, ids=lambda v: str(v))
@pytest.mark.parametrize("budget", [1.0, 0.25, 0.1])
def test_video_prompt(model, method, opts, budget):
    a = _video()
    ref = model.generate(**a, **GEN)
    with tokenprune.applied(model, budget=budget, method=method, **opts), LMInput(model) as rec:
        out = model.generate(**a, **GEN)
    n = 32
    kept = math.prod(pooled_grid((2, 4, 4), _k(budget, n))) if method == "pool" else _k(budget, n)
    assert rec.seen[0].shape[1] == a["input_ids"].shape[1] - (n - kept)
    assert rec.seen[0][0, 2 + kept].allclose(model.model.image_newline)  # the video's newline, after its tokens
    if budget == 1.0:
        assert torch.equal(out, ref)


def test_video_cls_keeps_most_received_after_pooling(model):
    """Video: the score of a pooled token is the frame's received attention pooled as its features are (bilinear
    to ceil(8/2) = 4 per side); ``cls`` keeps the K best over both frames."""
    a = _video()
    tower = model.model.vision_tower
    attn = getattr(tower, "vision_model", tower).encoder.layers[-1].self_attn
    attn.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            received = tower(a["pixel_values_videos"][0], output_attentions=True).attentions[-1].mean((1, 2))
            feats = model.model.get_video_features(a["pixel_values_videos"]).pooler_output[0]
    finally:
        attn.config._attn_implementation = "sdpa"
    pooled = torch.nn.functional.interpolate(received.view(2, 1, 8, 8), size=(4, 4), mode="bilinear").flatten()
    with tokenprune.applied(model, budget=0.25, method="cls"):
        new = model.__dict__["_tokenprune_patch"].adapter.prepare(dict(a), for_generate=True)
    kept = new["inputs_embeds"][0][new["input_ids"][0] == VID]
    idx = torch.cdist(kept, feats[:32]).argmin(1)
    assert torch.equal(idx[:-1], pooled.topk(8).indices.sort().values)
    assert kept[-1].allclose(model.model.image_newline)


def test_image_and_video_in_one_prompt(model):
    a, items = _inputs(model, SIZES[:1])
    v = _video(pre=(), post=(7,))
    ids = torch.cat([a["input_ids"], v["input_ids"]], 1)
    a.update(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=v["pixel_values_videos"])
    ref = model.generate(**a, **GEN)
    with tokenprune.applied(model, budget=0.25, method="cls"), LMInput(model) as rec:
        out = model.generate(**a, **GEN)
    with tokenprune.applied(model, budget=1.0, method="cls"):
        same = model.generate(**a, **GEN)
    assert rec.seen[0].shape[1] == ids.shape[1] - _pruned(0.25, "cls", items) - (32 - 8)
    assert out.shape == ref.shape and torch.equal(same, ref)


def test_resized_tiles(model):
    """Above ``anyres_max_N`` the model resizes the tiles' features (bilinear); scores follow the same resize,
    newlines stay, and the count is K of the resized tokens."""
    cfg = model.config
    old = cfg.vision_aspect_ratio
    cfg.vision_aspect_ratio = "anyres_max_1"  # 2x2 tiles (16x16 patches) are resized to 8x8
    try:
        a, items = _inputs(model, SIZES[1:2])
        assert items[0][0].shape[0] == 64 + 8 * 9
        ref = model.generate(**a, **GEN)
        with tokenprune.applied(model, budget=1.0, method="cls"):
            same = model.generate(**a, **GEN)
        for method in ("cls", "pool"):
            with tokenprune.applied(model, budget=0.25, method=method), LMInput(model) as rec:
                model.generate(**a, **GEN)
            assert rec.seen[0].shape[1] == a["input_ids"].shape[1] - _pruned(0.25, method, items)
    finally:
        cfg.vision_aspect_ratio = old
    assert torch.equal(same, ref)


def _left_pad(rows):
    width = max(r["input_ids"].shape[1] for r in rows)
    out = {k: torch.cat([torch.cat([torch.zeros(1, width - r[k].shape[1], dtype=r[k].dtype), r[k]], 1)
                         for r in rows]) for k in ("input_ids", "attention_mask")}
    crops = max(r["pixel_values"].shape[1] for r in rows)
    out["pixel_values"] = torch.cat([torch.cat([r["pixel_values"], torch.zeros(1, crops - r["pixel_values"].shape[1],
                                                                               3, 16, 16)], 1) for r in rows])
    out["image_sizes"] = torch.cat([r["image_sizes"] for r in rows])
    return out


@pytest.mark.parametrize("method", ["cls", "pool"])
def test_left_padded_batch_of_different_image_sizes_equals_each_alone(model, method):
    a, _ = _inputs(model, SIZES[:1], seed=1, post=(7, 8, 9, 10, 11))
    b, _ = _inputs(model, SIZES[2:3], seed=2, post=(9,))
    batch = _left_pad([a, b])
    with tokenprune.applied(model, budget=0.25, method=method):
        out = model.generate(**batch, **GEN)
        alone = [model.generate(**x, **GEN) for x in (a, b)]
        logits = model(**batch).logits
        logits_alone = [model(**x).logits for x in (a, b)]
    for i, x in enumerate(alone):
        assert torch.equal(out[i, -GEN["max_new_tokens"]:], x[0, -GEN["max_new_tokens"]:])
        assert torch.allclose(logits[i, -1], logits_alone[i][0, -1], atol=1e-5)


def test_pruned_call_is_a_prompt_with_k_placeholders(model):
    """1D positions renumbered: the pruned forward equals the unpatched model on the pruned prompt's embeddings."""
    a, _ = _inputs(model, SIZES[:2])
    with tokenprune.applied(model, budget=0.25, method="cls"):
        new = model.__dict__["_tokenprune_patch"].adapter.prepare(dict(a), for_generate=True)
        pruned = model(**a).logits
    ref = model(inputs_embeds=new["inputs_embeds"], attention_mask=new["attention_mask"]).logits
    assert torch.allclose(pruned, ref, atol=1e-5)


def test_remove_exact(model):
    a, _ = _inputs(model, SIZES[:1])
    v = _video(pre=(), post=(7,))
    ids = torch.cat([a["input_ids"], v["input_ids"]], 1)
    a.update(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=v["pixel_values_videos"])
    ref = model(**a).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tokenprune.apply(model, budget=0.25, method="cls")
    pruned = model(**a).logits
    tokenprune.remove(model)
    assert pruned.shape[1] < ref.shape[1]
    assert torch.equal(model(**a).logits, ref)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    tower = model.model.vision_tower
    assert all(type(la.self_attn).__name__ == "SiglipAttention"
               for la in getattr(tower, "vision_model", tower).encoder.layers)


def test_labels_shrink(model):
    a, items = _inputs(model, SIZES[:1])
    labels = torch.where(a["input_ids"] == IMG, -100, a["input_ids"])
    with tokenprune.applied(model, budget=0.25, method="cls"):
        out = model(**a, labels=labels)
    assert out.logits.shape[1] == a["input_ids"].shape[1] - _pruned(0.25, "cls", items)
    assert torch.isfinite(out.loss)


def test_errors(model):
    a, _ = _inputs(model, SIZES[:1])
    with pytest.raises(ValueError, match="rounds to 0"):  # keeps 0.32 of a crop's 64 tokens
        tokenprune.apply(model, budget=0.005, method="cls")
    with pytest.raises(ValueError, match="not available"):
        tokenprune.apply(model, budget=0.5, method="merge")
    assert not tokenprune.is_applied(model)
    with tokenprune.applied(model, budget=0.25, method="cls"):
        bad = dict(a, input_ids=a["input_ids"].clone())
        bad["input_ids"][0, 3] = 5  # one placeholder fewer than the image needs
        with pytest.raises(ValueError, match="placeholder tokens but the 1 image"):
            model.generate(**bad, **GEN)
        v = _video()
        v["input_ids"][0, 3] = 5
        with pytest.raises(ValueError, match="placeholder tokens but the 1 video"):
            model.generate(**v, **GEN)
        with pytest.raises(ValueError, match="image_sizes"):
            model.generate(**{k: x for k, x in a.items() if k != "image_sizes"}, **GEN)
    with tokenprune.applied(model, budget=0.01, method="cls"):  # a crop keeps 0.64 -> 1 token, a video 0.32 -> 0
        with pytest.raises(ValueError, match="rounds to 0"):
            model.generate(**_video(), **GEN)


def _processor():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, \
        PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "<s>", "USER:", "ASSISTANT:", "what", "is", "this", "?"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({"<image>": IMG, "<video>": VID})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    ftok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    ftok.padding_side = "left"
    size = {"height": 16, "width": 16}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]]),
        video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=ftok, num_image_tokens=64,
        vision_feature_select_strategy="full", image_token="<image>", video_token="<video>")


def test_processor_batch_equals_each_alone(model):
    """``generate(**processor(...))``: a left-padded batch of a one-image prompt (AnyRes tiles) and a two-image
    prompt (single crops, ``batch_num_images``) equals each prompt alone; then a video prompt."""
    import numpy as np

    proc = _processor()
    imgs = [np.random.RandomState(i).randint(0, 255, s, dtype=np.uint8)
            for i, s in enumerate([(20, 30, 3), (32, 32, 3), (30, 12, 3)])]
    images = [[imgs[0]], [imgs[1], imgs[2]]]
    texts = ["USER: <image> what is this ? ASSISTANT:", "USER: <image> <image> ? ASSISTANT:"]
    batch = proc(images=images, text=texts, return_tensors="pt", padding=True)
    alone = [proc(images=[im], text=[t], return_tensors="pt") for im, t in zip(images, texts)]
    assert (batch.input_ids == IMG).sum(1).tolist() == [234, 130]
    with tokenprune.applied(model, budget=0.25, method="cls"), LMInput(model) as rec:
        out = model.generate(**batch, **GEN)
        outs = [model.generate(**x, **GEN) for x in alone]
    steps = GEN["max_new_tokens"]  # LM calls per generate(): the prefill, then one per further token
    assert rec.seen[steps].shape[1] == alone[0].input_ids.shape[1] - (224 - 56)  # its 10 newlines kept
    assert rec.seen[2 * steps].shape[1] == alone[1].input_ids.shape[1] - 2 * (64 - 16)
    for i, x in enumerate(outs):
        assert torch.equal(out[i, -GEN["max_new_tokens"]:], x[0, -GEN["max_new_tokens"]:])
        assert torch.equal(out[i, :batch.input_ids.shape[1]], batch.input_ids[i])
    vid = np.random.RandomState(5).randint(0, 255, (4, 20, 20, 3), dtype=np.uint8)
    inp = proc(videos=[vid], text=["USER: <video> what is this ? ASSISTANT:"], return_tensors="pt")
    with tokenprune.applied(model, budget=0.1, method="cls"), LMInput(model) as rec:
        model.generate(**inp, **GEN)
    assert rec.seen[0].shape[1] == inp.input_ids.shape[1] - (64 - 6)  # 4 frames x 16 pooled tokens, 1 newline
