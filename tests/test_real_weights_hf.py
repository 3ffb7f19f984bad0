"""Real weights, two families: the shipped ViT-S/14 CIFAR-10 classifier (timm format) converted to the Hugging Face
``Dinov2ForImageClassification`` layout here, in the test (the package has no converter).

The HF model reproduces timm's logits; with the same reducer and budget, tokenprune's predictions on real CIFAR-10
test images are the same on both families. Skipped without the shared assets (``$TOKENPRUNE_ASSETS``).
"""
from __future__ import annotations

import pytest
import torch

import tokenprune

pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def timm_to_hf_dinov2(timm_model):
    """A ``Dinov2ForImageClassification`` holding the weights of a timm DINOv2-architecture ViT classifier with
    ``global_pool='token'``. HF classifies ``[CLS, mean of patches]``: the timm head becomes the [CLS] half of the
    classifier and the mean half is zero, so the logits are the same function."""
    from transformers import Dinov2Config, Dinov2ForImageClassification

    t = timm_model
    sd = t.state_dict()
    dim, depth = t.embed_dim, len(t.blocks)
    patch = t.patch_embed.patch_size[0]
    cfg = Dinov2Config(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=t.blocks[0].attn.num_heads,
                       mlp_ratio=t.blocks[0].mlp.fc1.out_features // dim, image_size=t.patch_embed.img_size[0],
                       patch_size=patch, num_labels=t.head.out_features, layer_norm_eps=t.norm.eps,
                       attn_implementation="sdpa")
    with torch.device("meta"):  # no random init (seconds for ViT-S): every weight is assigned below
        hf = Dinov2ForImageClassification(cfg).eval()
    keys = set(hf.state_dict())
    new_attention = "dinov2.encoder.layer.0.attention.q_proj.weight" in keys  # transformers 5.25; 5.17: query/key/...
    out = {"dinov2.embeddings.cls_token": sd["cls_token"],
           "dinov2.embeddings.mask_token": torch.zeros(1, dim),  # used with bool_masked_pos only
           "dinov2.embeddings.position_embeddings": sd["pos_embed"],
           "dinov2.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "dinov2.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "dinov2.layernorm.weight": sd["norm.weight"], "dinov2.layernorm.bias": sd["norm.bias"],
           "classifier.weight": torch.cat([sd["head.weight"], torch.zeros_like(sd["head.weight"])], 1),
           "classifier.bias": sd["head.bias"]}
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"dinov2.encoder.layer.{i}."
        q, k, v = sd[src + "attn.qkv.weight"].chunk(3)
        qb, kb, vb = sd[src + "attn.qkv.bias"].chunk(3)
        names = (("q_proj", "k_proj", "v_proj", "o_proj") if new_attention else
                 ("attention.query", "attention.key", "attention.value", "output.dense"))
        for name, w, b in zip(names[:3], (q, k, v), (qb, kb, vb)):
            out[f"{dst}attention.{name}.weight"], out[f"{dst}attention.{name}.bias"] = w, b
        out[f"{dst}attention.{names[3]}.weight"] = sd[src + "attn.proj.weight"]
        out[f"{dst}attention.{names[3]}.bias"] = sd[src + "attn.proj.bias"]
        for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            out[f"{dst}{b}.weight"], out[f"{dst}{b}.bias"] = sd[f"{src}{a}.weight"], sd[f"{src}{a}.bias"]
        out[f"{dst}layer_scale1.lambda1"] = sd[src + "ls1.gamma"]
        out[f"{dst}layer_scale2.lambda1"] = sd[src + "ls2.gamma"]
    assert set(out) == keys, (set(out) ^ keys)
    hf.load_state_dict(out, assign=True)
    return hf


@pytest.fixture(scope="module")
def models_and_images(real_vit_s14):
    """The shared timm model (conftest.real_vit_s14), its HF conversion, the images, labels and timm's logits."""
    return real_vit_s14.model, timm_to_hf_dinov2(real_vit_s14.model), real_vit_s14.x, real_vit_s14.labels, \
        real_vit_s14.ref


@pytest.mark.slow
@pytest.mark.xdist_group("real-vit-s14")  # shares the loaded model with test_core.py
def test_hf_conversion_reproduces_timm_logits(models_and_images):
    timm_model, hf_model, x, labels, ref = models_and_images  # ref: timm_model(x), one thread
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            got = hf_model(pixel_values=x).logits
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert (ref.argmax(1) == labels).float().mean() >= 0.75  # the real classifier (96% top-1)
        for method, budget in (("merge", 0.5), ("merge", 0.25), ("cls", 0.25)):
            with torch.no_grad():
                with tokenprune.applied(timm_model, budget, method):
                    y_timm = timm_model(x)
                with tokenprune.applied(hf_model, budget, method):
                    y_hf = hf_model(pixel_values=x).logits
            # same reducer, same tokens kept / merged: the same predictions and (nearly) the same logits
            assert torch.equal(y_timm.argmax(1), y_hf.argmax(1)), (method, budget)
            torch.testing.assert_close(y_hf, y_timm, rtol=1e-3, atol=1e-3)
            assert not torch.allclose(y_timm, ref, atol=1e-3)  # reduction really happened
    finally:
        torch.set_num_threads(before)
