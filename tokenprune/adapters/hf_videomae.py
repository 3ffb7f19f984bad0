"""Hugging Face VideoMAE (``VideoMAEModel`` / ``VideoMAEForVideoClassification``).

- Tokens: no prefix, no [CLS] (``has_cls=False``: the ``cls`` reducer uses
  its substitute); a tubelet grid ``(T / tubelet_size, H / patch, W / patch)``
  (time-major, as the 3D patch embedding flattens it) handed to grid-aware
  reducers. With ``bool_masked_pos`` (MAE pre-training input) the visible
  tokens form no grid and ``None`` is passed.
- Positions: fixed sinusoidal embeddings added before the first layer.
- The encoder's layer loop becomes :func:`run_blocks`; attention keeps SDPA
  through the ``tokenprune_sdpa`` kernel of :mod:`.hf_common` (VideoMAE's
  own attention never takes a mask; the kernel adds the size bias).
- Pooling: the classifier's mean pooling becomes a size-weighted mean that
  ignores padding slots, i.e. the mean over the original tubelets. A model
  without mean pooling (``use_mean_pooling=False`` reads token 0, which is an
  ordinary patch here) is refused for classification. ``VideoMAEModel``'s
  ``last_hidden_state`` carries the final token state
  (``tokenprune.engine.attached_state``) when it has no final layer norm.
"""
from __future__ import annotations

from .. import ops
from ..engine import attached_state
from ..plan import EncoderInfo
from .base import Adapter, has_class, restore_class, swap_class
from .hf_common import AttentionRouting, hf_call_block, hf_capture, no_extra_kwargs, run_and_attach


def _attn(layer):
    return layer.attention.attention


_call_block = hf_call_block(_attn)  # VideoMAELayer(x)
_capture = hf_capture(_attn)


def tubelet_grid(config) -> tuple[int, int, int]:
    size = config.image_size if isinstance(config.image_size, (tuple, list)) else (config.image_size,) * 2
    patch = config.patch_size if isinstance(config.patch_size, (tuple, list)) else (config.patch_size,) * 2
    return config.num_frames // config.tubelet_size, size[0] // patch[0], size[1] // patch[1]


class _Encoder:
    """Mixin for ``VideoMAEEncoder``."""

    def forward(self, hidden_states, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        no_extra_kwargs(kwargs, "VideoMAE encoder")
        patch = self._tokenprune_patch
        grid = patch.adapter.grid_for(hidden_states.shape[1])
        out = run_and_attach(patch, self.layer, hidden_states, _call_block, _capture, grid)
        return BaseModelOutput(last_hidden_state=out)


class _Classifier:
    """Mixin for ``VideoMAEForVideoClassification``: size-weighted mean pooling."""

    def forward(self, pixel_values=None, labels=None, **kwargs):
        from transformers.modeling_outputs import ImageClassifierOutput

        outputs = self.videomae(pixel_values, **kwargs)
        seq = outputs.last_hidden_state
        state = attached_state(seq)
        pooled = ops.weighted_mean(seq, state.sizes) if state is not None and state.sizes is not None else seq.mean(1)
        logits = self.classifier(self.fc_norm(pooled))
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


class HFVideoMAEAdapter(Adapter):
    family = "hf_videomae"
    description = "transformers VideoMAEModel / VideoMAEForVideoClassification"

    @classmethod
    def matches(cls, model) -> bool:
        return has_class(model, "transformers.", "VideoMAEModel", "VideoMAEForVideoClassification")

    def __init__(self, model):
        super().__init__(model)
        self.videomae = getattr(model, "videomae", model)
        self.classifier = model if self.videomae is not model else None
        if self.classifier is not None and getattr(model, "fc_norm", None) is None:
            raise TypeError("tokenprune: this VideoMAEForVideoClassification has use_mean_pooling=False, so it "
                            "classifies token 0, an ordinary patch that reduction may drop or merge; only "
                            "mean-pooling VideoMAE classifiers are supported")
        self._routing = AttentionRouting([_attn(layer) for layer in self.videomae.encoder.layer], "VideoMAE model")

    def info(self) -> EncoderInfo:
        c = self.videomae.config
        grid = tubelet_grid(c)
        return EncoderInfo(depth=len(self.videomae.encoder.layer), dim=c.hidden_size,
                           num_heads=c.num_attention_heads, num_prefix=0, num_tokens=grid[0] * grid[1] * grid[2],
                           mlp_hidden=c.intermediate_size, grid=grid, has_cls=False, family=self.family)

    def check(self, reducer) -> None:
        self._routing.check()

    def install(self, patch) -> None:
        self._routing.on()
        enc = self.videomae.encoder
        enc._tokenprune_patch = patch
        swap_class(enc, _Encoder)
        if self.classifier is not None:
            swap_class(self.classifier, _Classifier)

    def uninstall(self) -> None:
        enc = self.videomae.encoder
        if self.classifier is not None:
            restore_class(self.classifier)
        restore_class(enc)
        enc.__dict__.pop("_tokenprune_patch", None)
        self._routing.off()
