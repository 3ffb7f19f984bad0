"""``method="diverse"`` (DivPrune, optional ``text=`` conditioning) on every VLM family of ``tokenprune/vlm``.

Tiny random configs as in ``test_llava.py`` / ``test_vlm_*.py``, but with a language model of width 48 next to
a vision tower of width 32, so that the feature space of the selected tokens (vision tower output for LLaVA-1.5,
the LM's input width for the others) is told apart. CPU.
"""
import math

import pytest
import torch

import tokenprune
from tokenprune.patch import get_patch

torch.set_num_threads(1)

transformers = pytest.importorskip("transformers")
import test_llava as L  # noqa: E402  (input builders of each family)
import test_vlm_gemma as G  # noqa: E402
import test_vlm_onevision as O  # noqa: E402
import test_vlm_qwen as Q  # noqa: E402

LM = 48  # the language model's width; every vision tower here is 32 wide
VISION = 32
GEN = dict(max_new_tokens=3, do_sample=False)
FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "paligemma", "gemma3", "onevision"]
SPACE = {"llava": VISION}  # width of the tokens diverse selects from (text= must match); LM elsewhere


def build(family):
    """Each family's tiny model (its own test file's), the language model LM wide."""
    if family.startswith("qwen"):
        return Q.build(family, lm=LM)
    if family in ("paligemma", "gemma3"):
        return G.build(family, lm=LM)
    if family == "onevision":
        return O.build(lm=LM)
    torch.manual_seed(0)
    vc, tc = L._configs(text=dict(hidden_size=LM))
    if family == "llava":
        return L.LlavaForConditionalGeneration(L.LlavaConfig(vision_config=vc, text_config=tc,
                                                             image_token_id=L.IMG)).eval()
    cfg = L.LlavaNextConfig(vision_config=vc, text_config=tc, image_token_index=L.IMG,
                            image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    return L.LlavaNextForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def models():
    return {}


def model(models, family):
    if family not in models:
        models[family] = build(family)
    return models[family]


def _inputs(m, family, seed=1, post=(7, 8, 9)):
    """One prompt with one image: ``(call arguments, visual placeholders, [tokens a budget counts per image])``."""
    if family == "llava":
        return dict(input_ids=L._prompt(post=post), pixel_values=L._pixels(seed=seed)), [L.N]
    if family == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        sizes = torch.tensor([[40, 60]])
        crops = image_size_to_num_patches(sizes[0], m.config.image_grid_pinpoints, 32)
        pv = torch.randn(1, crops, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            n = m.model.get_image_features(pv, sizes).pooler_output[0].shape[0]
        ids = torch.tensor([[1, 5] + [L.IMG] * n + list(post)])
        return dict(input_ids=ids, pixel_values=pv, image_sizes=sizes), [n]
    if family.startswith("qwen"):
        a = Q._inputs(seed=seed, post=post)
        return a, [Q._n((1, 8, 12))]
    if family in ("paligemma", "gemma3"):
        a = G._inputs(family, seed=seed, post=post)
        return a, [G.n_tokens(family)]
    a, items = O._inputs(m, O.SIZES[:1], seed=seed, post=post)
    return a, [int((~nl).sum()) for _, nl in items]


def _k(budget, n):
    return max(1, math.floor(budget * n + 0.5))


LMInput = L.LMInput  # what the language model receives (inputs_embeds of every call)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_shrinks_lm_input_by_the_pruned_count(models, family):
    m = model(models, family)
    a, counts = _inputs(m, family)
    ref = m.generate(**a, output_scores=True, return_dict_in_generate=True, **GEN)
    for budget in (1.0, 0.25, 0.1):
        with tokenprune.applied(m, budget=budget, method="diverse"), LMInput(m) as rec:
            out = m.generate(**a, output_scores=True, return_dict_in_generate=True, **GEN)
        ids = a["input_ids"]
        assert out.sequences.shape == (1, ids.shape[1] + GEN["max_new_tokens"]), (family, budget)
        assert torch.equal(out.sequences[:, :ids.shape[1]], ids)
        pruned = sum(n - _k(budget, n) for n in counts)
        assert rec.seen[0].shape[1] == ids.shape[1] - pruned, (family, budget)
        assert all(e.shape[1] == 1 for e in rec.seen[1:])
        if budget == 1.0:  # nothing pruned: the model's own path
            assert torch.equal(out.sequences, ref.sequences), family
            assert torch.equal(out.scores[0], ref.scores[0]), family


def _left_pad(rows):
    """Two one-image prompts, left-padded into one batch (Qwen / LLaVA-NeXT: visual inputs concatenated)."""
    width = max(r["input_ids"].shape[1] for r in rows)
    out = {}
    for k in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
        if k == "attention_mask" or k in rows[0]:
            vals = [r.get(k, torch.ones_like(r["input_ids"])) for r in rows]
            out[k] = torch.cat([torch.cat([torch.zeros(1, width - v.shape[1], dtype=v.dtype), v], 1) for v in vals])
    for k in ("pixel_values", "image_grid_thw", "image_sizes"):
        if k in rows[0]:
            vals = [r[k] for r in rows]
            if k == "pixel_values" and vals[0].ndim == 5:  # crops: pad to the most crops
                c = max(v.shape[1] for v in vals)
                vals = [torch.cat([v, v.new_zeros(1, c - v.shape[1], *v.shape[2:])], 1) for v in vals]
            out[k] = torch.cat(vals)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_each_prompt_alone(models, family):
    m = model(models, family)
    a, _ = _inputs(m, family, seed=1, post=(7, 8, 9, 10, 11))
    b, _ = _inputs(m, family, seed=2, post=(9,))
    batch = _left_pad([a, b])
    with tokenprune.applied(m, budget=0.25, method="diverse"):
        out = m.generate(**batch, **GEN)
        alone = [m.generate(**x, **GEN) for x in (a, b)]
        logits = m(**batch).logits
        logits_alone = [m(**x).logits for x in (a, b)]
    for i, x in enumerate(alone):
        assert torch.equal(out[i, -GEN["max_new_tokens"]:], x[0, -GEN["max_new_tokens"]:]), (family, i)
        assert torch.allclose(logits[i, -1], logits_alone[i][0, -1], atol=1e-5), (family, i)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_in_the_selected_space_conditions_the_selection(models, family):
    m = model(models, family)
    a, _ = _inputs(m, family)
    width = SPACE.get(family, LM)
    text = torch.randn(width, generator=torch.Generator().manual_seed(5))
    with tokenprune.applied(m, budget=0.25, method="diverse"), LMInput(m) as plain:
        m(**a)
    with tokenprune.applied(m, budget=0.25, method="diverse", text=text, text_weight=4.0), LMInput(m) as cond:
        out = m.generate(**a, **GEN)
        m(**a)
    assert out.shape[1] == a["input_ids"].shape[1] + GEN["max_new_tokens"]
    assert cond.seen[-1].shape == plain.seen[0].shape  # the same count, other tokens
    assert not torch.equal(cond.seen[-1], plain.seen[0]), family


@pytest.mark.parametrize("family", FAMILIES)
def test_text_of_another_width_names_the_width_to_give(models, family):
    m = model(models, family)
    width = SPACE.get(family, LM)
    wrong = VISION if width == LM else LM
    with pytest.raises(ValueError, match=rf"text has {wrong} features.*give an embedding of {width} features"):
        tokenprune.apply(m, budget=0.25, method="diverse", text=torch.randn(wrong))
    assert get_patch(m) is None  # refused before any change


def test_text_with_several_rows_is_refused_on_a_vlm(models):
    """The tokens are selected per image, not per prompt row: a [B, C] text would be matched to images."""
    m = model(models, "paligemma")
    with pytest.raises(ValueError, match="one embedding \\[C\\] for every image"):
        tokenprune.apply(m, budget=0.25, method="diverse", text=torch.randn(2, LM))
    assert get_patch(m) is None
    with tokenprune.applied(m, budget=0.25, method="diverse", text=torch.randn(1, LM)):
        m(**_inputs(m, "paligemma")[0])
