"""Hugging Face Audio Spectrogram Transformer (``ASTForAudioClassification`` / ``ASTModel``).

- Tokens: two prefix tokens ([CLS] and the distillation token, never
  reduced) and a 2D frequency x time patch grid, ``(F, T)`` with
  ``F = (num_mel_bins - patch_size) // frequency_stride + 1`` and
  ``T = (max_length - patch_size) // time_stride + 1`` (row-major: the patch
  embedding flattens frequency-major), handed to grid-aware reducers.
- Positions: learned absolute embeddings added before the first layer.
- The layer loop lives in ``ASTModel.forward``, so that forward is re-stated
  here (embeddings, :func:`run_blocks`, final layer norm, pooler = mean of
  the two prefix tokens, which reduction never touches). Attention keeps SDPA
  through the ``tokenprune_sdpa`` kernel of :mod:`.hf_common`.
- Not reduced: ``attention_mask`` / ``output_hidden_states`` /
  ``output_attentions`` (clear error).
"""
from __future__ import annotations

from ..engine import Forward
from ..plan import EncoderInfo
from .base import Adapter, attach, detach, has_class, named_holders
from .hf_common import AttentionRouting, SaveAsOriginal, no_extra_kwargs, returned, run


def _attn(layer):
    return layer.attention


def _layers(ast_model):
    layers = getattr(ast_model, "layers", None)
    if layers is None and hasattr(ast_model, "encoder"):  # older layout: ASTEncoder.layer
        layers = ast_model.encoder.layer
    if layers is None:
        raise TypeError("tokenprune: cannot find the layers of this ASTModel")
    return layers


def ast_grid(config) -> tuple[int, int]:
    f = (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1
    t = (config.max_length - config.patch_size) // config.time_stride + 1
    return f, t


class _ASTModel(SaveAsOriginal):
    """Mixin for ``ASTModel``: the same forward with the reduced layer loop."""

    def forward(self, input_values=None, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return_dict = kwargs.pop("return_dict", None)
        seq = self.layernorm(self._tokenprune_tokens(Forward(self._tokenprune_patch), input_values,
                                                     attention_mask=attention_mask, **kwargs))
        pooled = (seq[:, 0] + seq[:, 1]) / 2
        return returned(self, BaseModelOutputWithPooling(last_hidden_state=seq, pooler_output=pooled), return_dict)

    def _tokenprune_tokens(self, fwd, input_values, **kwargs):
        kwargs.pop("return_dict", None)
        no_extra_kwargs(kwargs, "AST encoder", self.config)
        x = self.embeddings(input_values)
        return run(fwd, _layers(self), x, fwd.patch.adapter.grid_for(x.shape[1] - fwd.patch.num_prefix))


class HFASTAdapter(Adapter):
    family = "hf_ast"
    description = "transformers ASTForAudioClassification / ASTModel"

    @classmethod
    def matches(cls, model) -> bool:
        return has_class(model, "transformers.", "ASTForAudioClassification", "ASTModel")

    def __init__(self, model):
        super().__init__(model)
        self.ast = getattr(model, "audio_spectrogram_transformer", model)
        self._routing = AttentionRouting([_attn(layer) for layer in _layers(self.ast)], "AST model")
        encoder = self.ast.encoder if getattr(self.ast, "layers", None) is None else None  # older layout
        self._holders = named_holders(model, encoder)

    def info(self) -> EncoderInfo:
        c = self.ast.config
        grid = ast_grid(c)
        return EncoderInfo(depth=len(_layers(self.ast)), dim=c.hidden_size, num_heads=c.num_attention_heads,
                           num_prefix=2, num_tokens=grid[0] * grid[1], mlp_hidden=c.intermediate_size, grid=grid,
                           has_cls=True, family=self.family)

    def check(self, reducer) -> None:
        self._routing.check()

    def features(self, input_values):
        fwd = Forward(self.ast._tokenprune_patch)  # last_hidden_state: the final layer norm applied
        return self.ast.layernorm(self.ast._tokenprune_tokens(fwd, input_values)), fwd.state

    def install(self, patch) -> None:
        self._routing.on()
        attach(self.ast, _ASTModel, patch)

    def uninstall(self) -> None:
        detach(self.ast)
        self._routing.off()
