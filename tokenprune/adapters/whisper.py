"""Hugging Face Whisper: reduce the audio encoder's tokens.

Accepted: ``WhisperForConditionalGeneration``, ``WhisperModel``, a bare
``WhisperEncoder`` and ``WhisperForAudioClassification`` (its mean over the
encoder frames becomes size-weighted, padding slots weigh 0: the mean over the
original frames; ``use_weighted_layer_sum=True`` is refused, it needs every
layer's full output). Only the encoder is reduced; the decoder then
cross-attends over the fewer encoder tokens (its keys/values are computed
once per utterance and cached, so every decoding step gets cheaper too).
``generate()`` works unchanged.

- Tokens: ``max_source_positions`` (1500 for 30 s; audio is always padded to
  30 s, so the budget counts the frames of the padding/silence too), no
  prefix token, no [CLS] (``has_cls=False``: the ``cls`` reducer uses its
  substitute). The grid handed to grid-aware reducers is ``(1, 1500)``: one
  row of time frames (so a 2D pooling reducer pools along time only).
- Positions: sinusoidal embeddings are added before the first layer, so
  merged/pruned tokens carry their positions.
- The encoder forward is re-stated here (conv stem, positions, then
  :func:`run_blocks`, final layer norm) because the layer loop lives in it;
  the final token state rides on ``last_hidden_state``.
- Decoder cross-attention: the decoder's ``encoder_attn`` modules get the
  encoder's final ``log(size)`` as an additive key bias (proportional
  attention; ``-inf`` for padding slots of per-sample reducers), through the
  same ``tokenprune_sdpa`` kernel. The encoder returns the bias as a field of
  its output (``encoder_outputs["tokenprune_key_bias"]``), so ``generate()``
  keeps it and expands it with the beams like every other encoder output; the
  ``WhisperModel`` forward hands it to the decoder layers (``tokenprune=``). The encoder called with
  ``return_dict=False`` returns ``(last_hidden_state,)`` as HF's does, without the bias; a reduced tuple handed
  back to the model as ``encoder_outputs`` is refused (its cross-attention would get no size bias).
- Measured (tiny.en, 116 utterances, ``scripts/whisper_wer.py``): ``cls``
  with ``substitute="received"`` (the default) keeps WER near the unreduced
  one where ``"mean_query"`` loses 3-5 points.
- Not reduced: ``output_hidden_states`` / ``output_attentions`` (a clear
  error), word-level timestamps (they need cross-attention weights).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels, ops
from ..engine import QK, Forward, hooks_free, run_blocks
from ..plan import EncoderInfo
from .base import Adapter, attach, detach, has_class, named_holders, restore_class, swap_class
from .hf_common import (AttentionRouting, KeyBias, SaveAsOriginal, bias_for, block_fn, no_extra_kwargs, returned,
                         returns_dict)

BIAS_KEY = "tokenprune_key_bias"


def _attn(layer):
    return layer.self_attn


# (layer, attention, activation classes' forward functions) -> whether they are transformers' own. Keyed by the
# functions, not the classes: a forward replaced on a class after a first call is checked again
_STANDARD_FORWARDS: dict = {}
_Linear, _LayerNorm = nn.Linear, nn.LayerNorm
_WHISPER = "transformers.models.whisper.modeling_whisper"


def _own(fn, qualname: str, module: str = _WHISPER) -> bool:
    """Whether ``fn`` is transformers' ``module.qualname``, bare or under transformers' own decorators (which wrap
    the layers' forwards): every function of its ``__wrapped__`` chain must be transformers' code, since a wrapper
    made elsewhere with ``functools.wraps`` carries the original's name and module."""
    import transformers

    root = transformers.__file__.rpartition("__init__.py")[0]
    while True:
        code = getattr(fn, "__code__", None)
        if code is None or not code.co_filename.startswith(root):
            return False
        inner = getattr(fn, "__wrapped__", None)
        if inner is None:
            break
        fn = inner
    return getattr(fn, "__qualname__", "") == qualname and getattr(fn, "__module__", "") == module


def _standard_forwards(layer_fwd, attn_fwd, act_fwd) -> bool:
    key = (layer_fwd, attn_fwd, act_fwd)
    ok = _STANDARD_FORWARDS.get(key)
    if ok is None:
        ok = _STANDARD_FORWARDS[key] = (_own(layer_fwd, "WhisperEncoderLayer.forward")
                                        and _own(attn_fwd, "WhisperAttention.forward")
                                        and _own(act_fwd, "GELUActivation.forward", "transformers.activations"))
    return ok


def _layer(layer, x: torch.Tensor, fwd: Forward) -> torch.Tensor:
    """``WhisperEncoderLayer.forward`` in inference (dropout off), written out with the context's key bias, kernel and
    q/k recording: the same aten ops, without transformers' call chain (module calls, kwargs handling, the attention
    interface lookup), which is what a batch-1 eager forward waits on. Only transformers' own layer and attention
    forwards with plain ``nn.Linear`` / ``nn.LayerNorm`` submodules and transformers' GELU activation are written out
    (checked on every call, as they are read: a layer adapted after ``apply``, e.g. LoRA, or with a forward set on an
    instance of it or its modules, e.g. accelerate's hooks, or compiled in place, runs through transformers);
    ``tests/test_adapters_matrix.py`` checks the result against the layer itself."""
    a = layer.self_attn
    d = a.__dict__["_modules"]
    qp, kp, vp, op = d["q_proj"], d["k_proj"], d["v_proj"], d["out_proj"]
    d = layer.__dict__["_modules"]
    ln1, ln2, fc1, fc2, act = (d["self_attn_layer_norm"], d["final_layer_norm"], d["fc1"], d["fc2"],
                               d["activation_fn"])
    if layer.training or a.training:  # a layer of an eval-mode encoder switched to training (its dropout runs)
        return _CALL(layer, x, fwd)
    for m in (layer, a, qp, kp, vp, op, ln1, ln2, fc1, fc2, act):
        d = m.__dict__  # a forward set on the instance (accelerate's device_map / offload hooks), or the module
        if "forward" in d or d.get("_compiled_call_impl") is not None:  # compiled in place (module.compile()): run it
            return _CALL(layer, x, fwd)
    if not (type(qp) is _Linear and type(kp) is _Linear and type(vp) is _Linear and type(op) is _Linear
            and type(fc1) is _Linear and type(fc2) is _Linear and type(ln1) is _LayerNorm and type(ln2) is _LayerNorm
            and getattr(act, "act", None) is F.gelu and not getattr(a, "is_causal", False)
            and _standard_forwards(type(layer).forward, type(a).forward, type(act).forward)):
        return _CALL(layer, x, fwd)
    b, n, c = x.shape
    h = F.layer_norm(x, ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps)
    shape = (b, n, a.num_heads, a.head_dim)
    q = (F.linear(h, qp.weight, qp.bias) * a.scaling).view(shape).transpose(1, 2)
    k = F.linear(h, kp.weight, kp.bias).view(shape).transpose(1, 2)
    v = F.linear(h, vp.weight, vp.bias).view(shape).transpose(1, 2)
    bias = fwd.bias if fwd.bias is None else bias_for(fwd.bias, q)  # as tokenprune_sdpa (autocast: bf16 q)
    lse = None
    if fwd.kernel is not None:  # MAELRE's linear attention: q in the standard convention (Whisper pre-scales it)
        heads = fwd.kernel(q * a.head_dim ** 0.5, k, v, bias)
    elif fwd.want_qk and fwd.lse and kernels.attention_lse_applies(q, k, v, bias):
        heads, lse = kernels.attention_with_lse(q, k, v, 1.0)
    else:
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
    if fwd.want_qk:
        fwd.qk = QK(q, k, 1.0, fwd.bias, heads, lse=lse)
    x = x + F.linear(heads.transpose(1, 2).reshape(b, n, c), op.weight, op.bias)
    h = F.layer_norm(x, ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps)
    y = F.linear(F.gelu(F.linear(h, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
    grad = torch.is_grad_enabled()  # without autograd the last add and the clamp write in place (one allocation less)
    x = x + y if grad else x.add_(y)
    if x.dtype == torch.float16:  # as the layer: keep fp16 activations finite
        clamp = torch.finfo(x.dtype).max - 1000
        x = torch.clamp(x, min=-clamp, max=clamp) if grad else x.clamp_(min=-clamp, max=clamp)
    return x


_CALL = block_fn(None)  # the layer through transformers (training, compiling, hooks, or a layer of another kind)


class _Encoder(SaveAsOriginal):
    """Mixin for ``WhisperEncoder``: same stem and final norm, reduced layer loop."""

    def forward(self, input_features, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        return_dict = kwargs.pop("return_dict", None)
        fwd = Forward(self._tokenprune_patch)
        hidden = self.layer_norm(self._tokenprune_tokens(fwd, input_features, **kwargs))
        out = BaseModelOutput(last_hidden_state=hidden)
        if not returns_dict(self, return_dict):
            return returned(self, out, False)  # (hidden,) as HF's: the size bias is a field of the dict form only
        bias = fwd.state.attn_bias(hidden.dtype)
        if bias is not None:  # for the decoder's cross-attention; generate() expands it with the beams
            out[BIAS_KEY] = bias
        return out

    def _tokenprune_tokens(self, fwd, input_features, **kwargs):
        # like Whisper itself, attention_mask is accepted and ignored (inputs are always 30 s)
        kwargs.pop("return_dict", None)
        no_extra_kwargs({k: v for k, v in kwargs.items() if k != "attention_mask"}, "Whisper encoder", self.config)
        expected = self.config.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
        if input_features.shape[-1] != expected:
            raise ValueError(f"Whisper expects mel features of length {expected}, got {input_features.shape[-1]}; "
                             "pad them with the WhisperFeatureExtractor")
        x = nn.functional.gelu(self.conv1(input_features))
        x = nn.functional.gelu(self.conv2(x)).permute(0, 2, 1)
        # (not cast to x's dtype: under autocast transformers adds the float32 positions to the bf16/fp16 stem output,
        # and its layers run on a float32 residual stream)
        x = x + self.embed_positions.weight[: x.shape[1]]
        x = nn.functional.dropout(x, p=self.dropout, training=self.training)
        written = not self.training and not torch.compiler.is_compiling() and hooks_free(fwd.patch, self.layers)
        return run_blocks(fwd, self.layers, x, _layer if written else _CALL, (1, x.shape[1]))


class _Model(SaveAsOriginal):
    """Mixin for ``WhisperModel``: the decoder's cross-attention gets the encoder tokens' size bias."""

    def forward(self, input_features=None, *args, encoder_outputs=None, **kwargs):
        if encoder_outputs is None and input_features is not None:  # as HF: SpecAugment (training), then the encoder
            input_features = self._mask_input_features(input_features, attention_mask=kwargs.get("attention_mask"))
            asked = {k: kwargs[k] for k in ("output_hidden_states", "output_attentions") if k in kwargs}
            encoder_outputs = self.encoder(input_features, return_dict=True, **asked)  # refused there, clearly
        if isinstance(encoder_outputs, (tuple, list)) and encoder_outputs and \
                encoder_outputs[0].shape[1] != self.config.max_source_positions:
            raise ValueError(
                f"encoder_outputs is a tuple of {encoder_outputs[0].shape[1]} reduced frames (the encoder called with "
                "return_dict=False): that form drops the merged frames' sizes (and padding mask) the decoder's "
                "cross-attention needs, so its logits would be off. Pass the encoder's output as it returns it with "
                "return_dict=True (a BaseModelOutput), or leave encoder_outputs out")
        bias = encoder_outputs.get(BIAS_KEY) if isinstance(encoder_outputs, dict) else None
        if bias is not None:
            kwargs["tokenprune"] = KeyBias(self._tokenprune_cross, bias)
        return super().forward(input_features, *args, encoder_outputs=encoder_outputs, **kwargs)


class _AudioClassifier(SaveAsOriginal):
    """Mixin for ``WhisperForAudioClassification``: projector, then the size-weighted mean over the encoder frames."""

    def forward(self, input_features=None, encoder_outputs=None, labels=None, **kwargs):
        from torch.nn import CrossEntropyLoss
        from transformers.modeling_outputs import SequenceClassifierOutput

        if encoder_outputs is not None:  # computed elsewhere: their token sizes are not known here
            if isinstance(encoder_outputs, dict) and encoder_outputs.get(BIAS_KEY) is not None:
                raise ValueError("tokenprune: encoder_outputs of a reduced Whisper encoder carry no token sizes for "
                                 "the classifier's mean; pass input_features instead")
            return super().forward(input_features, encoder_outputs=encoder_outputs, labels=labels, **kwargs)
        return_dict = kwargs.pop("return_dict", None)
        fwd = Forward(self._tokenprune_patch)
        hidden = self.projector(self.encoder.layer_norm(self.encoder._tokenprune_tokens(fwd, input_features, **kwargs)))
        pooled = ops.weighted_mean(hidden, fwd.sizes) if fwd.sizes is not None else hidden.mean(1)
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, self.config.num_labels), labels.to(logits.device).view(-1))
        return returned(self, SequenceClassifierOutput(loss=loss, logits=logits), return_dict)


def _parts(model):
    """(encoder, decoder or None) of a Whisper model."""
    if has_class(model, "transformers.", "WhisperEncoder"):
        return model, None
    base = getattr(model, "model", model)
    enc, dec = getattr(base, "encoder", None), getattr(base, "decoder", None)
    if enc is None or not hasattr(enc, "layers"):
        raise TypeError(f"tokenprune: cannot find the encoder of {type(model).__name__}")
    return enc, dec


class WhisperAdapter(Adapter):
    family = "whisper"
    description = ("transformers WhisperForConditionalGeneration / WhisperModel / WhisperEncoder / "
                   "WhisperForAudioClassification (encoder)")

    @classmethod
    def matches(cls, model) -> bool:
        return has_class(model, "transformers.", "WhisperForConditionalGeneration", "WhisperModel", "WhisperEncoder",
                         "WhisperForAudioClassification")

    def __init__(self, model):
        super().__init__(model)
        self.head = model if has_class(model, "transformers.", "WhisperForAudioClassification") else None
        if self.head is not None and getattr(model.config, "use_weighted_layer_sum", False):
            raise TypeError("tokenprune: this WhisperForAudioClassification has use_weighted_layer_sum=True: it "
                            "averages the outputs of every encoder layer, whose token counts differ once tokens are "
                            "reduced between them; only use_weighted_layer_sum=False is supported")
        self.encoder, self.decoder = _parts(model)
        self.base = getattr(model, "model", model) if self.decoder is not None else None  # the WhisperModel
        attention = [_attn(layer) for layer in self.encoder.layers]
        if self.decoder is not None:  # cross-attention reads the reduced encoder output
            attention += [layer.encoder_attn for layer in self.decoder.layers]
        self._routing = AttentionRouting(attention, "Whisper model")
        # the encoder's own forward is the patched one, but the audio classifier runs its tokens without calling it
        self._holders = named_holders(model, self.encoder if self.head is not None else None)

    def info(self) -> EncoderInfo:
        c = self.encoder.config
        n = c.max_source_positions
        return EncoderInfo(depth=len(self.encoder.layers), dim=c.d_model, num_heads=c.encoder_attention_heads,
                           num_prefix=0, num_tokens=n, mlp_hidden=c.encoder_ffn_dim, grid=(1, n), has_cls=False,
                           family=self.family)

    def grid_for(self, num_tokens: int):
        return (1, num_tokens)

    def check(self, reducer) -> None:
        self._routing.check()

    def features(self, input_features):
        """The encoder's ``last_hidden_state`` (its final layer norm applied, as in transformers) and the final
        state."""
        fwd = Forward(self.encoder._tokenprune_patch)
        return self.encoder.layer_norm(self.encoder._tokenprune_tokens(fwd, input_features)), fwd.state

    def install(self, patch) -> None:
        self._routing.on()
        attach(self.encoder, _Encoder, patch)
        if self.base is not None:
            self.base._tokenprune_cross = tuple(layer.encoder_attn for layer in self.decoder.layers)
            swap_class(self.base, _Model)
        if self.head is not None:
            attach(self.head, _AudioClassifier, patch)

    def uninstall(self) -> None:
        if self.head is not None:
            detach(self.head)
        detach(self.encoder)
        if self.base is not None:
            restore_class(self.base)
            self.base.__dict__.pop("_tokenprune_cross", None)
        self._routing.off()
