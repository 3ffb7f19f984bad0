"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL: visual tokens pruned between the vision tower and the LM (vlm/core.py).

Tiny random configs (2-3 vision blocks of width 32, patch 2, 2x2 merge; a 2-layer LM of width 32), CPU.
"""
import math

import pytest
import torch

import tokenprune
from conftest import cache_kw  # transformers' two cache names

torch.set_num_threads(1)

transformers = pytest.importorskip("transformers")
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,  # noqa: E402
                          Qwen2VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration)

IMG, VID, VS, VE = 120, 121, 122, 123
GEN = dict(max_new_tokens=3, do_sample=False)
KINDS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
METHODS = [("cls", {}), ("random", {}), ("pool", {}), ("apet", {"k": 2})]


def _text(**kw):
    d = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=None,
             initializer_range=0.2,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    d.update(kw)
    return d


def build(kind, depth=None, full=(1,), deepstack=(0, 1), lm=32):
    """A tiny Qwen VLM: ``depth`` vision blocks (default 2, Qwen3-VL 3), Qwen2.5-VL's full-attention blocks
    ``full`` (its other blocks attend in windows of 8 px = 2x2 merged tokens), Qwen3-VL's deepstack taps; ``lm``:
    the language model's width, which the merger projects to (heads of 16; the vision blocks are 32 wide)."""
    torch.manual_seed(0)
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
    text = _text(hidden_size=lm, num_attention_heads=lm // 16, num_key_value_heads=lm // 16)
    if kind == "qwen2_5_vl":
        vc = dict(depth=depth or 2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2,
                  temporal_patch_size=2, spatial_merge_size=2, window_size=8, out_hidden_size=lm,
                  fullatt_block_indexes=list(full), tokens_per_second=2)
        m = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(vision_config=vc, text_config=text, **ids))
    elif kind == "qwen2_vl":
        vc = dict(depth=depth or 2, embed_dim=32, hidden_size=lm, mlp_ratio=2, num_heads=2, patch_size=2,
                  temporal_patch_size=2, spatial_merge_size=2)
        m = Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vc, text_config=text, **ids))
    else:
        vc = dict(depth=depth or 3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2,
                  temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=lm, num_position_embeddings=64,
                  deepstack_visual_indexes=list(deepstack))
        t = dict(text, head_dim=16)
        t["rope_parameters"]["mrope_interleaved"] = True
        m = Qwen3VLForConditionalGeneration(Qwen3VLConfig(vision_config=vc, text_config=t, **ids))
    m = m.eval()
    m.generation_config.pad_token_id = 0
    m.generation_config.eos_token_id = None
    return m


@pytest.fixture(scope="module")
def models():
    return {k: build(k) for k in KINDS}


def _n(grid):
    return math.prod(grid) // 4


def _pixels(grids, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(math.prod(x) for x in grids), 24, generator=g)


def _prompt(grids, pre=(1, 5), post=(7, 8, 9), token=IMG):
    ids = list(pre)
    for i, gr in enumerate(grids):
        ids += [VS] + [token] * _n(gr) + [VE] + ([11] if i < len(grids) - 1 else [])
    return torch.tensor([ids + list(post)])


def _inputs(grids=((1, 8, 12),), seed=1, **kw):
    ids = _prompt(grids, **kw)
    return dict(input_ids=ids, pixel_values=_pixels(grids, seed), image_grid_thw=torch.tensor(grids),
                mm_token_type_ids=(ids == IMG).int())


def _k(budget, n):
    return max(1, math.floor(budget * n + 0.5))


class LMInput:
    """Records what the language model receives: inputs_embeds and position ids of every call."""

    def __init__(self, model):
        self.lm = model.model.language_model
        self.embeds, self.pos = [], []

    def _hook(self, mod, args, kw):
        self.embeds.append(kw["inputs_embeds"].detach().clone())
        p = kw.get("position_ids")
        self.pos.append(None if p is None else p[-3:].clone())

    def __enter__(self):
        self.h = self.lm.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.h.remove()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method,opts", METHODS, ids=lambda v: str(v))
def test_generate_runs_and_lm_input_shrinks(models, kind, method, opts):
    m = models[kind]
    inp = _inputs()
    n = _n((1, 8, 12))
    ref = m.generate(**inp, **GEN)
    for budget in (1.0, 0.25, 0.1):
        with tokenprune.applied(m, budget=budget, method=method, **opts), LMInput(m) as rec:
            out = m.generate(**inp, **GEN)
        assert out.shape == ref.shape and torch.equal(out[:, :inp["input_ids"].shape[1]], inp["input_ids"])
        kept = n - (inp["input_ids"].shape[1] - rec.embeds[0].shape[1])
        if method == "pool":
            assert kept <= n and (budget < 1 or kept == n)
        else:
            assert kept == _k(budget, n), (budget, kept)
        assert all(e.shape[1] == 1 for e in rec.embeds[1:])  # decoding: one token per step
        if budget == 1.0:
            assert torch.equal(out, ref)  # nothing pruned: the model's own path


def test_streamer_gets_the_prompt_generate_returns(models):
    """A streamer's first ``put`` is the prompt: the one the caller passed (as the returned sequences hold it), not
    the pruned one the language model runs; then each new token."""

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

    m, inp, rec = models["qwen2_5_vl"], _inputs(), Recorder()
    with tokenprune.applied(m, budget=0.25, method="cls"), LMInput(m) as lm:
        out = m.generate(**inp, **GEN, streamer=rec)
    assert lm.embeds[0].shape[1] < inp["input_ids"].shape[1]  # the LM ran a pruned prompt
    assert torch.equal(rec.puts[0], inp["input_ids"]) and rec.ended
    assert torch.equal(torch.cat([rec.puts[0]] + [p.view(1, -1) for p in rec.puts[1:]], 1), out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["cls", "random"])
def test_kept_tokens_and_text_keep_their_positions(models, kind, method):
    """Every column the LM receives after pruning (kept visual tokens and text) has the embedding AND the (t, h, w)
    position of one column of the unpruned input; decoding continues at the unpruned model's positions. Pruned after
    the tower's last block (``layers=[depth - 1]``), so kept tokens are exactly unpruned ones (in-tower pruning at
    earlier blocks: tests/test_vlm_qwen_tower.py)."""
    m = models[kind]
    inp = _inputs(pre=(1, 5, 6), post=(7, 8, 9, 10))
    last = len(m.model.visual.blocks) - 1
    with LMInput(m) as ref:
        m.generate(**inp, **GEN)
    with tokenprune.applied(m, budget=0.25, method=method, layers=[last]), LMInput(m) as rec:
        m.generate(**inp, **GEN)
    e_ref, e = ref.embeds[0][0], rec.embeds[0][0]
    assert e.shape[0] == e_ref.shape[0] - (24 - _k(0.25, 24))
    dist = (e[:, None] - e_ref[None]).abs().amax(-1)
    assert bool((dist.amin(1) < 1e-6).all())
    src = dist.argmin(1)
    assert bool((src[1:] > src[:-1]).all())  # order kept
    assert torch.equal(rec.pos[0][:, 0], ref.pos[0][:, 0, src])
    assert torch.equal(src[-4:], torch.arange(e_ref.shape[0] - 4, e_ref.shape[0]))  # the text after the image
    for p, q in zip(rec.pos[1:], ref.pos[1:]):  # decoding steps
        assert torch.equal(p, q)


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_of_different_image_sizes_equals_each_alone(models, kind):
    m = models[kind]
    a = _inputs(((1, 8, 12),), seed=1, pre=(1, 5, 6, 7))
    b = _inputs(((1, 4, 8),), seed=2, pre=(1, 2))
    pad = a["input_ids"].shape[1] - b["input_ids"].shape[1]
    ids = torch.cat([a["input_ids"], torch.cat([torch.zeros(1, pad, dtype=torch.long), b["input_ids"]], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    both = dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([a["pixel_values"], b["pixel_values"]]),
                image_grid_thw=torch.cat([a["image_grid_thw"], b["image_grid_thw"]]), mm_token_type_ids=(ids == IMG).int())
    kw = dict(output_scores=True, return_dict_in_generate=True, **GEN)
    with tokenprune.applied(m, budget=0.25, method="cls"):
        out = m.generate(**both, **kw)
        one = m.generate(**a, **kw)
        two = m.generate(**b, **kw)
    la, lb = a["input_ids"].shape[1], b["input_ids"].shape[1]
    assert torch.equal(out.sequences[:, :ids.shape[1]], ids)
    assert torch.equal(out.sequences[0, ids.shape[1]:], one.sequences[0, la:])
    assert torch.equal(out.sequences[1, ids.shape[1]:], two.sequences[0, lb:])
    for s, s1, s2 in zip(out.scores, one.scores, two.scores):
        assert torch.allclose(s[0], s1[0], atol=1e-4) and torch.allclose(s[1], s2[0], atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_two_images_in_one_prompt(models, kind):
    m = models[kind]
    grids = ((1, 8, 12), (1, 4, 8))
    inp = _inputs(grids)
    with tokenprune.applied(m, budget=0.25, method="cls"), LMInput(m) as rec:
        out = m.generate(**inp, **GEN)
    pruned = sum(_n(g) - _k(0.25, _n(g)) for g in grids)
    assert rec.embeds[0].shape[1] == inp["input_ids"].shape[1] - pruned
    assert torch.equal(out[:, :inp["input_ids"].shape[1]], inp["input_ids"])


@pytest.mark.parametrize("method", ["cls", "pool", "random"])
def test_qwen2_5_video_prompt(models, method):
    m = models["qwen2_5_vl"]
    grid = (2, 8, 8)  # 2 temporal steps (4 frames) of 8x8 patches: 32 merged tokens
    ids = _prompt([grid], token=VID)
    inp = dict(input_ids=ids, pixel_values_videos=_pixels([grid]), video_grid_thw=torch.tensor([grid]),
               second_per_grid_ts=torch.tensor([1.0]), mm_token_type_ids=(ids == VID).int() * 2)
    with LMInput(m) as ref:
        m.generate(**inp, **GEN)
    with tokenprune.applied(m, budget=0.25, method=method), LMInput(m) as rec:
        out = m.generate(**inp, **GEN)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    kept = 32 - (ids.shape[1] - rec.embeds[0].shape[1])
    assert kept == (8 if method == "pool" else _k(0.25, 32))  # pool: 2 x (2 x 2) per temporal step
    assert torch.equal(rec.pos[0][..., -3:], ref.pos[0][..., -3:])  # text after the video keeps its positions
    assert torch.equal(rec.pos[1], ref.pos[1])


def test_cls_scores_are_received_attention_of_merge_groups(models):
    """Qwen2.5-VL, cls: the kept tokens are the top-K merged tokens by the attention their 2x2 patches receive at
    the first full-attention block (here the last block; reference from that block's eager attention, in the
    original patch order)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    m = models["qwen2_5_vl"]
    inp = _inputs()
    grid = inp["image_grid_thw"]
    seen = {}
    blk = m.model.visual.blocks[1]
    h = blk.attn.register_forward_pre_hook(lambda mod, a, kw: seen.update(x=a[0], pe=kw["position_embeddings"]),
                                           with_kwargs=True)
    with torch.no_grad():
        full = m.model.visual(inp["pixel_values"], grid_thw=grid).pooler_output
    h.remove()
    attn = blk.attn
    x = seen["x"]
    q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *seen["pe"])
    a = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * attn.scaling, -1)  # one image: one full span
    received = a.mean(1).mean(0)  # [patches], window order
    merged = received.view(-1, 4).mean(1)
    window_index, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=8, patch_size=2)
    merged = merged[torch.argsort(window_index)]
    want = merged.topk(_k(0.25, 24)).indices.sort().values
    with tokenprune.applied(m, budget=0.25, method="cls"), LMInput(m) as rec, torch.no_grad():
        m(**inp)
    got = rec.embeds[0][0, 3:3 + _k(0.25, 24)]
    idx = (got[:, None] - full[None]).abs().amax(-1).argmin(1)
    assert torch.equal(idx, want)


def test_qwen3_deepstack_follows_the_selection(models):
    """Qwen3-VL: the LM output equals the text model run on the pruned input with the deepstack features of
    exactly the kept tokens at the kept positions (and differs without them). Pruned after the last block."""
    m = models["qwen3_vl"]
    inp = _inputs()
    with torch.no_grad():
        vo = m.model.visual(inp["pixel_values"], grid_thw=inp["image_grid_thw"])
    lm = m.model.language_model
    seen = []
    h = lm.register_forward_hook(lambda mod, a, kw, out: seen.append((kw["inputs_embeds"], kw["position_ids"],
                                                                       out.last_hidden_state)), with_kwargs=True)
    try:
        with tokenprune.applied(m, budget=0.25, method="cls", layers=[2]), torch.no_grad():
            m(**inp)
    finally:
        h.remove()
    emb, pos, got = seen[0]
    k = _k(0.25, 24)
    mask = torch.zeros(emb.shape[:2], dtype=torch.bool)
    mask[0, 3:3 + k] = True
    idx = (emb[0, 3:3 + k][:, None] - vo.pooler_output[None]).abs().amax(-1).argmin(1)
    with torch.no_grad():
        want = lm(inputs_embeds=emb, position_ids=pos, visual_pos_masks=mask,
                  deepstack_visual_embeds=[d[idx] for d in vo.deepstack_features]).last_hidden_state
        without = lm(inputs_embeds=emb, position_ids=pos).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, without, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_remove_is_exact(models, kind):
    m = models[kind]
    inp = _inputs()
    classes = (type(m), type(m.model.language_model))
    impl = m.config.vision_config._attn_implementation
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    ref = m.generate(**inp, **GEN)
    tokenprune.apply(m, budget=0.1, method="cls")
    assert type(m) is not classes[0]
    tokenprune.remove(m)
    assert (type(m), type(m.model.language_model)) == classes
    assert m.config.vision_config._attn_implementation == impl
    assert not any(k.startswith("_tokenprune") for k in m.__dict__)
    assert sd.keys() == m.state_dict().keys() and all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    assert torch.equal(m.generate(**inp, **GEN), ref)


def test_forward_with_labels_shrinks(models):
    m = models["qwen2_5_vl"]
    inp = _inputs()
    labels = inp["input_ids"].clone()
    labels[labels == IMG] = -100
    with tokenprune.applied(m, budget=0.25, method="cls"):
        out = m(**inp, labels=labels)
    assert out.logits.shape[1] == inp["input_ids"].shape[1] - (24 - _k(0.25, 24))
    assert torch.isfinite(out.loss)


def test_errors(models):
    m = models["qwen2_5_vl"]
    with pytest.raises(ValueError, match="not available"):
        tokenprune.apply(m, budget=0.5, method="merge")
    with pytest.raises(ValueError, match="threshold"):
        tokenprune.apply(m, budget=0.5, method="cls", threshold=0.1)
    assert not tokenprune.is_applied(m)
    inp = _inputs()
    with tokenprune.applied(m, budget=0.5, method="cls"):
        bad = dict(inp, input_ids=inp["input_ids"][:, 1:].clone())
        bad["input_ids"][0, 3] = 5  # one placeholder fewer than the image needs
        bad["mm_token_type_ids"] = (bad["input_ids"] == IMG).int()
        with pytest.raises(ValueError, match="processor"):
            m.generate(**bad, **GEN)
    with tokenprune.applied(m, budget=0.02, method="cls"):  # keeps 0.48 of the 24 tokens of this image
        with pytest.raises(ValueError, match="rounds to 0"):
            m.generate(**inp, **GEN)


def test_unsupported_vlm_families_refused_at_apply():
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Mistral3Config, \
        Mistral3ForConditionalGeneration

    for cfg, cls in ((Idefics3Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=32, patch_size=8),
                                     text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=128)),
                      Idefics3ForConditionalGeneration),
                     (Mistral3Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=32, patch_size=8, head_dim=16),
                                     text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=128,
                                                      head_dim=16)),
                      Mistral3ForConditionalGeneration)):
        m = cls(cfg)
        with pytest.raises(TypeError, match="does not support yet"):
            tokenprune.apply(m, budget=0.5, method="cls")
        assert not tokenprune.is_applied(m)


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_beam_search_with_pruning(models, kind):
    """generate() expands the pruned prompt (embeddings, 3D positions, Qwen3-VL's deepstack rows) for beams."""
    m = models[kind]
    inp = _inputs()
    kw = dict(max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    with tokenprune.applied(m, budget=0.25, method="cls"):
        out = m.generate(**inp, **kw)
        greedy = m.generate(**inp, max_new_tokens=1, do_sample=False)
    assert out.shape == (2, inp["input_ids"].shape[1] + 3)
    assert torch.equal(out[:, :inp["input_ids"].shape[1]], inp["input_ids"].expand(2, -1))
    assert out[0, inp["input_ids"].shape[1]] == greedy[0, -1]  # the best beam starts with the greedy token


def test_qwen3_video_with_frame_timestamps(models):
    """Qwen3-VL writes each temporal step as its own <vision_start> run after a timestamp: the video's
    placeholders are not contiguous, and still shrink by exactly the pruned count with text positions kept."""
    m = models["qwen3_vl"]
    grid = (2, 8, 8)
    per = 16
    ids = [1, 5]
    for f in range(2):
        ids += [30 + f, 31, VS] + [VID] * per + [VE]
    ids = torch.tensor([ids + [7, 8, 9]])
    inp = dict(input_ids=ids, pixel_values_videos=_pixels([grid]), video_grid_thw=torch.tensor([grid]),
               mm_token_type_ids=(ids == VID).int() * 2)
    with LMInput(m) as ref:
        m.generate(**inp, **GEN)
    with tokenprune.applied(m, budget=0.25, method="cls"), LMInput(m) as rec:
        out = m.generate(**inp, **GEN)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    assert rec.embeds[0].shape[1] == ids.shape[1] - (32 - _k(0.25, 32))
    assert torch.equal(rec.pos[0][..., -3:], ref.pos[0][..., -3:])
    assert torch.equal(rec.pos[1], ref.pos[1])


def test_output_hidden_states_while_patched(models):
    """Qwen3-VL's text model gets a swapped class (deepstack); transformers looks its output recorders up by class
    name, so the swapped class must be known there too, or output_hidden_states silently returns None."""
    m = models["qwen3_vl"]
    inp = _inputs()
    ref = m(**inp, output_hidden_states=True).hidden_states
    assert ref is not None
    with tokenprune.applied(m, budget=1.0, method="cls"):
        same = m(**inp, output_hidden_states=True).hidden_states
    assert same is not None and len(same) == len(ref) and all(torch.equal(a, b) for a, b in zip(same, ref))
    with tokenprune.applied(m, budget=0.5, method="cls"):
        out = m(**inp, output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == len(ref)
    assert out.hidden_states[-1].shape[1] == out.logits.shape[1]


@pytest.mark.parametrize("kind", KINDS)
def test_forward_then_cached_step_continues_at_the_unpruned_positions(models, kind):
    """A pruned forward (prefill) followed by the user's own cached step (no position ids: the model adds its
    stored rope_deltas) gives the same next-token logits as generate()'s second step, whose positions are the
    unpruned model's (test_kept_tokens_and_text_keep_their_positions)."""
    m = models[kind]
    inp = _inputs()
    m.model.rope_deltas = None
    with tokenprune.applied(m, budget=0.5, method="cls"):
        gen = m.generate(**inp, max_new_tokens=2, do_sample=False, output_scores=True, return_dict_in_generate=True)
        m(**_inputs(((1, 4, 8),)))  # an unrelated earlier call: its rope_deltas must not be used
        out = m(**inp, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = m(input_ids=nxt, **cache_kw(out), use_cache=True)
    assert torch.equal(nxt[0, 0], gen.sequences[0, inp["input_ids"].shape[1]])
    assert torch.allclose(step.logits[0, -1], gen.scores[1][0], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_continuing_generate_from_a_pruned_cache_with_the_images_again(models, kind):
    """The next turn of a chat: generate() on the whole conversation with the images again and the cache of the
    pruned first turn runs only the new tokens (Qwen3-VL: its deepstack rows follow generate()'s slicing of the
    cached prefix) and gives the tokens of a fresh generate(); text only with that cache is refused."""
    m = models[kind]
    inp = _inputs()
    with tokenprune.applied(m, budget=0.5, method="cls"):
        out = m.generate(**inp, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        ids = torch.cat([out.sequences, torch.tensor([[20, 21, 22]])], 1)
        turn = dict(inp, input_ids=ids, mm_token_type_ids=(ids == IMG).int())
        fresh = m.generate(**turn, **GEN)
        again = m.generate(**turn, **cache_kw(out), **GEN)
        with pytest.raises(ValueError, match="pixel_values"):
            m.generate(input_ids=ids, **cache_kw(out), **GEN)
    assert torch.equal(again, fresh)
