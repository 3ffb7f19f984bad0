"""What every adapter implements, and the class-swap helpers.

An adapter is the only place that knows a model library: where a family keeps
its blocks, its prefix tokens, its q/k and its outputs. Patching swaps the
``__class__`` of existing modules for a subclass (weights and ``state_dict``
keys never change) and swapping back restores the model exactly.
"""
from __future__ import annotations

import sys
from typing import ClassVar

import torch

from ..plan import EncoderInfo

_CLASS_CACHE: dict[tuple[type, type], type] = {}
ORIGINAL = "_tokenprune_original_class"
MIXIN = "_tokenprune_mixin"


def swap_class(module: torch.nn.Module, mixin: type) -> None:
    orig = type(module)
    if ORIGINAL in orig.__dict__:
        raise ValueError(f"tokenprune: this {orig.__name__} is already patched by another tokenprune.apply (on an "
                         "enclosing model or a submodule); call tokenprune.remove on that model first")
    module.__class__ = swapped_class(mixin, orig)
    _register_outputs(module)


def _register_outputs(module) -> None:
    """transformers (5.x) finds a model's output recorders (``output_hidden_states`` / ``output_attentions``) in a
    registry keyed on the class name, filled at ``__init__``: a swapped class must be entered too, or those outputs
    silently come back None."""
    reg = getattr(sys.modules.get("transformers.utils.output_capturing"), "_CAN_RECORD_REGISTRY", None)
    can = getattr(module, "_can_record_outputs", None)
    if reg is None or can is None:
        return
    key = str(type(module)) if type(reg) is dict else module  # transformers 5.17: a dict keyed on str(class)
    if not reg.get(key):
        reg[key] = can


def swapped_class(mixin: type, orig: type) -> type:
    """The class ``(mixin, orig)`` a patched module gets; made once per pair."""
    key = (mixin, orig)
    new = _CLASS_CACHE.get(key)
    if new is None:
        new = type(f"TokenPruned{orig.__name__}", (mixin, orig),
                   {ORIGINAL: orig, MIXIN: mixin, "__module__": mixin.__module__, "__reduce_ex__": _reduce_swapped})
        _CLASS_CACHE[key] = new
    return new


def _new_swapped(mixin: type, orig: type):
    cls = swapped_class(mixin, orig)
    return cls.__new__(cls)


def _reduce_swapped(self, protocol):
    """Pickle (``torch.save``, ``copy.deepcopy``) a patched module: its class is made at run time, so it is
    rebuilt from the (importable) mixin and original classes; the state is the module's own."""
    cls = type(self)
    return _new_swapped, (cls.__dict__[MIXIN], cls.__dict__[ORIGINAL]), self.__dict__


def restore_class(module: torch.nn.Module) -> None:
    orig = type(module).__dict__.get(ORIGINAL)
    if orig is not None:
        module.__class__ = orig


def image_grid(input_shape, patch) -> tuple[int, int]:
    """``(H // ph, W // pw)`` of an image shape ``(..., H, W)`` and a patch size (int or pair)."""
    shape = tuple(int(v) for v in input_shape)
    if len(shape) < 2:
        raise ValueError(f"tokenprune: input_shape {shape} needs at least (H, W)")
    ph, pw = (int(patch[0]), int(patch[1])) if isinstance(patch, (tuple, list)) else (int(patch), int(patch))
    grid = (shape[-2] // ph, shape[-1] // pw)
    if min(grid) < 1:
        raise ValueError(f"tokenprune: input_shape {shape} is smaller than one {ph}x{pw} patch")
    return grid


def named_holders(model: torch.nn.Module, *modules) -> tuple:
    """``(name in model, module)`` of ``modules`` (``None`` left out), for :meth:`Adapter.block_holders`."""
    names = {id(m): n for n, m in model.named_modules()}
    return tuple((names.get(id(m)) or type(m).__name__, m) for m in modules if m is not None)


def attach(module: torch.nn.Module, mixin: type, patch) -> None:
    """Swap ``module``'s class to ``(mixin, its class)`` and give it the patch its patched forward reads."""
    swap_class(module, mixin)
    module._tokenprune_patch = patch


def detach(module: torch.nn.Module) -> None:
    """Undo :func:`attach`: the original class back, the patch gone."""
    restore_class(module)
    module.__dict__.pop("_tokenprune_patch", None)


def class_names(model) -> set[tuple[str, str]]:
    """(module, name) of every class in the model's MRO: match families without importing them."""
    return {(c.__module__, c.__name__) for c in type(model).__mro__}


def has_class(model, module_prefix: str, *names: str) -> bool:
    return any(m.startswith(module_prefix) and n in names for m, n in class_names(model))


class Adapter:
    family: ClassVar[str] = ""
    description: ClassVar[str] = ""  # what the adapter supports, for error messages
    mid_block: ClassVar[bool] = False  # its block function calls fwd.reduce_mid between attention and MLP
    # its block function writes the block out (no nn.Module.__call__ on the block and most submodules): module hooks
    # there would not run, so engine.check_no_hooks refuses them
    writes_blocks: ClassVar[bool] = False
    # the default input (info()) is only a placeholder: inputs bring their own sizes (NaFlex), so apply() does not
    # refuse options for being too large for it; each input size is checked at its first forward
    placeholder_input: bool = False

    def __init__(self, model):
        self.model = model

    @classmethod
    def matches(cls, model) -> bool:
        raise NotImplementedError

    def info(self) -> EncoderInfo:
        raise NotImplementedError

    @property
    def inside_blocks(self) -> bool:
        """Whether stages may run inside the blocks on every input the model takes (``EncoderInfo.inside_blocks``:
        where a reducer's placement "auto" puts them): ``mid_block`` unless the adapter says otherwise."""
        return self.mid_block

    # what shell_blocks() / block_holders() return: adapters set them once at __init__ (named_holders), as the hook
    # checks read them every forward
    _shells: tuple = ()
    _holders: tuple = ()

    def shell_blocks(self) -> tuple:
        """``(name, module)`` of blocks that the patched forward writes out while calling their submodules through
        ``nn.Module.__call__`` (HF ViT / DINOv2 / DINOv3 layers): hooks on those submodules run, a hook on the block
        itself would not, so it is refused (:func:`engine.check_holders`)."""
        return self._shells

    def block_holders(self) -> tuple:
        """``(name, module)`` of the modules holding the blocks that the unpatched forward calls and the patched one
        does not (it runs the blocks itself): a hook there would not run, so the forward refuses it
        (``writes_blocks`` adapters: with the blocks', :func:`engine.check_no_hooks`; others:
        :func:`engine.check_holders`, a few lookups per forward)."""
        return self._holders

    def written_blocks(self):
        """The blocks its forward hands to ``engine.run_blocks`` (``writes_blocks`` adapters: the hook scan while
        torch.compile traces, ``engine._hooked_when_traced``, finds them here); timm's layout, ``model.blocks``, unless
        the adapter says otherwise (open_clip)."""
        return self.model.blocks

    def grid_for(self, num_tokens: int):
        info = self.info()
        return info.grid if info.grid is not None and num_tokens == info.num_tokens else None

    def check(self, reducer) -> None:
        """Raise if this model cannot give what the reducer needs."""
        return None

    def input_grid(self, input_shape) -> tuple[int, ...]:
        """The token grid an input of ``input_shape`` (what the model's forward takes, e.g. ``(B, C, H, W)`` or
        ``(H, W)``) gives, for ``tokenprune.plan(model, input_shape=...)``."""
        raise ValueError(f"tokenprune: plan(input_shape=...) is not known for the {self.family} family; give "
                         "num_tokens= (the non-prefix tokens entering the encoder)")

    def install(self, patch) -> None:
        raise NotImplementedError

    def features(self, *args, **kwargs):
        """``(tokens, final TokenState)`` of one patched encoder forward (``tokenprune.features``)."""
        raise NotImplementedError(f"tokenprune.features is not available for the {self.family} family")

    def uninstall(self) -> None:
        raise NotImplementedError
