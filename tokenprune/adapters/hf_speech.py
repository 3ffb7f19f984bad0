"""Hugging Face self-supervised speech encoders: ``Wav2Vec2Model`` and ``HubertModel``.

- Tokens: the frames of the convolutional feature encoder (20 ms each at 16 kHz), no prefix token, no
  [CLS] (``has_cls=False``: the ``cls`` reducer uses its substitute). The grid handed to grid-aware
  reducers is ``(1, T)``: one row of time frames, ``T`` read from the input (so ``pool`` pools along
  time). The nominal count (for ``tokenprune.plan(model)`` and the checks at ``apply``) is that of 10 s of
  16 kHz audio; every input length gets its own plan.
- Positions: the convolutional positional embedding (``encoder.pos_conv_embed``) is added before the
  first layer, so merged/pruned tokens carry their positions with them.
- The model forward is re-stated here (feature encoder, feature projection, SpecAugment masking, the
  encoder's positional convolution and norm, then :func:`run_blocks` over ``encoder.layers``), because
  the layer loop lives in the encoder. Both layouts: the post-norm encoder (``do_stable_layer_norm=False``,
  base models: norm before the layers, each layer ends with its own norm) and the "stable layer norm"
  pre-norm encoder (large models: the encoder's norm after the last layer). HF's layers run as they are;
  they pass keyword arguments on to their attention function, so the ``tokenprune_sdpa`` kernel of
  :mod:`.hf_common` adds the size bias, records q/k and keeps SDPA (no mixin on the layers).
- Not reduced: ``attention_mask`` with padding (padded batches; run equal-length batches or one utterance at a
  time; an all-ones mask, what a stable-layer-norm processor returns for one utterance, is accepted and dropped),
  ``output_hidden_states`` / ``output_attentions`` (clear errors); ``Wav2Vec2Model`` with
  ``add_adapter=True`` (its strided convolutions over time need the full frame sequence) is refused.
  LayerDrop (training only) is not applied in the reduced forward.
- ``WavLMModel`` (and every WavLM head) is refused: its attention adds a gated relative position bias, a
  ``T x T`` table bucketed by the frames' time distance and computed for the full sequence, which would have
  to follow the kept tokens (and has no single distance for a merged token).
"""
from __future__ import annotations

import torch

from ..engine import Forward
from ..plan import EncoderInfo
from .base import Adapter, attach, detach, has_class, named_holders
from .hf_common import AttentionRouting, SaveAsOriginal, no_extra_kwargs, returned, run

_CLASSES = ("Wav2Vec2Model", "HubertModel")
NOMINAL_SAMPLES = 160_000  # 10 s at 16 kHz: the count tokenprune.plan(model) shows without an input


def frames(config, samples: int) -> int:
    """Frames the convolutional feature encoder makes of ``samples`` audio samples."""
    n = samples
    for k, s in zip(config.conv_kernel, config.conv_stride):
        n = (n - k) // s + 1
    return n


def _masks_nothing(mask: torch.Tensor) -> bool:
    """Whether an ``attention_mask`` is all ones (what stable-layer-norm processors return for one utterance): then it
    is dropped. Reading it waits for the GPU once, in eager calls only (HF's own mask handling waits too); compiled
    or captured calls cannot read it and refuse any mask."""
    if torch.compiler.is_compiling() or (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return False
    return bool(mask.all())


class _Model(SaveAsOriginal):
    """Mixin for ``Wav2Vec2Model`` / ``HubertModel``: the same forward with the reduced layer loop."""

    def forward(self, input_values=None, attention_mask=None, mask_time_indices=None, tokenprune=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput, Wav2Vec2BaseModelOutput

        return_dict = kwargs.pop("return_dict", None)
        fwd = tokenprune if tokenprune is not None else Forward(self._tokenprune_patch)
        hidden, extract = self._tokenprune_tokens(fwd, input_values, attention_mask, mask_time_indices, **kwargs)
        if extract is not None:  # Wav2Vec2: also the normed features (for quantization)
            return returned(self, Wav2Vec2BaseModelOutput(last_hidden_state=hidden, extract_features=extract),
                            return_dict)
        return returned(self, BaseModelOutput(last_hidden_state=hidden), return_dict)

    def _tokenprune_tokens(self, fwd, input_values, attention_mask=None, mask_time_indices=None, **kwargs):
        kwargs.pop("return_dict", None)
        if attention_mask is not None and not _masks_nothing(attention_mask):
            raise ValueError(f"tokenprune: attention_mask (a padded batch) cannot be combined with token reduction in "
                             f"the {type(self).__name__} encoder; run equal-length utterances or one at a time, or "
                             "call tokenprune.remove(model) first")
        no_extra_kwargs(kwargs, f"{type(self).__name__} encoder", self.config)
        features = self.feature_extractor(input_values).transpose(1, 2)
        hidden = self.feature_projection(features)
        extract = None
        if isinstance(hidden, tuple):  # Wav2Vec2FeatureProjection returns (projected, normed features)
            hidden, extract = hidden
        hidden = self._mask_hidden_states(hidden, mask_time_indices=mask_time_indices)
        enc = self.encoder
        hidden = hidden + enc.pos_conv_embed(hidden)
        stable = bool(self.config.do_stable_layer_norm)
        if not stable:  # post-norm encoder: norm before the layers
            hidden = enc.layer_norm(hidden)
        hidden = enc.dropout(hidden)
        hidden = run(fwd, enc.layers, hidden, (1, hidden.shape[1]), extra=(None,))
        if stable:  # pre-norm ("stable layer norm") encoder: norm after the last layer
            hidden = enc.layer_norm(hidden)
        return hidden, extract


class HFSpeechAdapter(Adapter):
    family = "hf_speech"
    description = "transformers Wav2Vec2Model / HubertModel (WavLM refused: relative position bias in attention)"

    @classmethod
    def matches(cls, model) -> bool:
        return has_class(model, "transformers.", *_CLASSES, "WavLMPreTrainedModel")

    def __init__(self, model):
        super().__init__(model)
        if has_class(model, "transformers.", "WavLMPreTrainedModel"):
            raise TypeError(
                f"tokenprune: {type(model).__name__} is refused: WavLM's attention adds a gated relative position "
                "bias (a T x T table over the frames' time distances, computed once for the full sequence) that "
                "would have to follow the kept tokens, and a merged token has no single time distance. Supported "
                "speech encoders: Wav2Vec2Model, HubertModel")
        if getattr(model.config, "add_adapter", False):
            raise TypeError("tokenprune: this Wav2Vec2Model has add_adapter=True: its adapter downsamples the encoder "
                            "output with strided convolutions over time, which need the full, ordered frame sequence")
        for name in ("feature_extractor", "feature_projection", "encoder", "_mask_hidden_states"):
            if not hasattr(model, name):
                raise TypeError(f"tokenprune: {type(model).__name__} has no {name}; is it a Wav2Vec2Model/HubertModel?")
        self._routing = AttentionRouting([layer.attention for layer in model.encoder.layers],
                                         type(model).__name__)
        self._holders = named_holders(model, model.encoder)  # runs the layers in transformers

    def info(self) -> EncoderInfo:
        c = self.model.config
        n = frames(c, NOMINAL_SAMPLES)
        return EncoderInfo(depth=len(self.model.encoder.layers), dim=c.hidden_size, num_heads=c.num_attention_heads,
                           num_prefix=0, num_tokens=n, mlp_hidden=c.intermediate_size, grid=(1, n), has_cls=False,
                           family=self.family)

    def grid_for(self, num_tokens: int):
        return (1, num_tokens)

    def check(self, reducer) -> None:
        self._routing.check()

    def features(self, input_values, mask_time_indices=None):
        """Encoder tokens (``last_hidden_state``, ``[B, K, C]``) and the final state."""
        fwd = Forward(self.model._tokenprune_patch)
        return self.model._tokenprune_tokens(fwd, input_values, mask_time_indices=mask_time_indices)[0], fwd.state

    def install(self, patch) -> None:
        self._routing.on()
        attach(self.model, _Model, patch)

    def uninstall(self) -> None:
        detach(self.model)
        self._routing.off()
