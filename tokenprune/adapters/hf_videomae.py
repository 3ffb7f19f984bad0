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
  ordinary patch here) is refused for classification.
- VideoMAE's self-attention takes no keyword arguments, so it gets a mixin that
  accepts the context (``tokenprune=``) and hands it to the attention function.
"""
from __future__ import annotations

from .. import ops
from ..engine import Forward
from ..plan import EncoderInfo
from .base import Adapter, attach, detach, has_class, named_holders, restore_class, swap_class
from .hf_common import AttentionRouting, SaveAsOriginal, no_extra_kwargs, returned, run


def _attn(layer):
    return layer.attention.attention


def tubelet_grid(config) -> tuple[int, int, int]:
    size = config.image_size if isinstance(config.image_size, (tuple, list)) else (config.image_size,) * 2
    patch = config.patch_size if isinstance(config.patch_size, (tuple, list)) else (config.patch_size,) * 2
    return config.num_frames // config.tubelet_size, size[0] // patch[0], size[1] // patch[1]


class _SelfAttention:
    """Mixin for ``VideoMAESelfAttention``: its forward, with the context passed to the attention function."""

    def forward(self, hidden_states=None, tokenprune=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if tokenprune is None:
            return super().forward(hidden_states)
        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        q = self.query(hidden_states).view(shape).transpose(1, 2)
        k = self.key(hidden_states).view(shape).transpose(1, 2)
        v = self.value(hidden_states).view(shape).transpose(1, 2)
        out, probs = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation](
            self, q, k, v, None, is_causal=False, scaling=self.scaling,
            dropout=0.0 if not self.training else self.dropout_prob, tokenprune=tokenprune)
        return out.reshape(*out.shape[:-2], self.all_head_size), probs


class _Model(SaveAsOriginal):
    """Mixin for ``VideoMAEModel``: its forward with the reduced layer loop (the context is passed on)."""

    def forward(self, pixel_values=None, bool_masked_pos=None, tokenprune=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        fwd = tokenprune if tokenprune is not None else Forward(self._tokenprune_patch)
        return_dict = kwargs.pop("return_dict", None)
        no_extra_kwargs(kwargs, "VideoMAE encoder", self.config)
        x = self.embeddings(pixel_values, bool_masked_pos)
        grid = fwd.patch.adapter.grid_for(x.shape[1]) if bool_masked_pos is None else None
        x = run(fwd, self.encoder.layer, x, grid)
        if self.layernorm is not None:
            x = self.layernorm(x)
        return returned(self, BaseModelOutput(last_hidden_state=x), return_dict)


class _Classifier(SaveAsOriginal):
    """Mixin for ``VideoMAEForVideoClassification``: size-weighted mean pooling."""

    def forward(self, pixel_values=None, labels=None, **kwargs):
        from transformers.modeling_outputs import ImageClassifierOutput

        return_dict = kwargs.pop("return_dict", None)
        fwd = Forward(self._tokenprune_patch)
        seq = self.videomae(pixel_values, tokenprune=fwd, return_dict=True, **kwargs).last_hidden_state
        pooled = ops.weighted_mean(seq, fwd.sizes) if fwd.sizes is not None else seq.mean(1)
        logits = self.classifier(self.fc_norm(pooled))
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        return returned(self, ImageClassifierOutput(loss=loss, logits=logits), return_dict)


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
        self._holders = named_holders(model, self.videomae.encoder)

    def info(self) -> EncoderInfo:
        c = self.videomae.config
        grid = tubelet_grid(c)
        return EncoderInfo(depth=len(self.videomae.encoder.layer), dim=c.hidden_size,
                           num_heads=c.num_attention_heads, num_prefix=0, num_tokens=grid[0] * grid[1] * grid[2],
                           mlp_hidden=c.intermediate_size, grid=grid, has_cls=False, family=self.family)

    def check(self, reducer) -> None:
        self._routing.check()

    def features(self, pixel_values):
        """Encoder tokens (``VideoMAEModel``'s ``last_hidden_state``) and the final state."""
        fwd = Forward(self.videomae._tokenprune_patch)
        return self.videomae(pixel_values, tokenprune=fwd, return_dict=True).last_hidden_state, fwd.state

    def _attentions(self):
        return [_attn(layer) for layer in self.videomae.encoder.layer]

    def install(self, patch) -> None:
        self._routing.on()
        attach(self.videomae, _Model, patch)
        for a in self._attentions():
            swap_class(a, _SelfAttention)
        if self.classifier is not None:
            attach(self.classifier, _Classifier, patch)

    def uninstall(self) -> None:
        if self.classifier is not None:
            detach(self.classifier)
        for a in self._attentions():
            restore_class(a)
        detach(self.videomae)
        self._routing.off()
