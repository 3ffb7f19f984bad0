"""Public entry points: apply, remove, plan, applied, features, methods."""
from __future__ import annotations

import contextlib
import math
from typing import Mapping

from . import adapters, reducers, registry  # noqa: F401  (importing reducers registers the built-in ones)
from .adapters.base import ORIGINAL
from .engine import check_depth, traced_scan_token
from .patch import (MODULE_ATTR, PATCH_ATTR, Patch, check_wrapper_for_apply, get_patch, is_applied,  # noqa: F401
                    unwrap)  # (get_patch, is_applied: public)
from .plan import Plan, check_budget, check_schedule, schedule_budget
from .recipes import load_recipe
from .stem import _ConvAsGemm


def _attach_module(model, patch) -> None:
    """Register ``patch.reducer.module`` (e.g. learned thresholds) as a submodule, so it is in
    ``state_dict`` and follows ``model.to()``; :func:`remove` deletes it."""
    module = getattr(patch.reducer, "module", None)
    if module is not None:
        ref = next(iter(model.parameters()), None)
        if ref is not None:
            module.to(ref.device)
        module.train(model.training)
        model.add_module(MODULE_ATTR, module)


def _make_patch(model, budget, method, schedule, track_source, options) -> Patch:
    schedule = check_schedule(schedule)
    if not isinstance(track_source, bool):
        raise TypeError(f"track_source must be True or False, got {track_source!r}")
    if budget is not None:
        check_budget(budget)
    adapter = adapters.for_model(model)
    if budget is None:  # schedule= without a budget: the schedule's last count sets it
        budget = schedule_budget(schedule, adapter.info().num_tokens)
    reducer = registry.make(method, **options)
    adapter.check(reducer)
    patch = Patch(model, adapter, reducer, float(budget), schedule, track_source)
    patch.method, patch.options = method, dict(options)  # as given: plan(model, budget=...) plans them again
    try:
        patch.plan_for()  # validate budget and options now, not at the first forward
    except ValueError:
        # a default input that is only a placeholder (NaFlex): what fails for its size alone is checked per input
        # at the forward (the error names the input's size); what fails on a larger input too is refused now
        if not adapter.placeholder_input or not _plans_larger_input(patch):
            raise
    return patch


def _plans_larger_input(patch) -> bool:
    """Whether the patch plans an input of 8 times the default's sides (64 times its tokens without a grid)."""
    info = patch.info
    grid = None if info.grid is None else tuple(8 * g for g in info.grid)
    try:
        patch.plan_for(math.prod(grid) if grid else 64 * info.num_tokens, grid)
    except ValueError:
        return False
    return True


def apply(model, budget: float | None = None, method: str | None = None, *,
          schedule: Mapping[int, int] | None = None, track_source: bool = True, recipe: str | None = None,
          **options):
    """Patch ``model`` in place so tokens are reduced between its encoder blocks; returns ``model``.

    Args:
        model: a supported model (see ``tokenprune.adapters.SUPPORTED``).
        budget: the fraction of the input's non-prefix tokens kept (that leave
            the encoder), in (0, 1]. ``round(budget * N)`` tokens leave (halves
            round up); prefix tokens ([CLS], registers) are always kept.
        method: a registered reducer (``tokenprune.methods()``).
        schedule: ``{block: keep}`` overriding the reducer's per-block plan
            (non-prefix tokens left after that block, whole numbers). Its last count must be
            the budget's; without ``budget`` the schedule sets it (last count / N).
        track_source: keep the map from original patches to current tokens
            (needed by ``unmerge`` and the visualisations).
        recipe: a named setting (``tokenprune.recipes.list_recipes()``) or a YAML path; it supplies
            method, budget, schedule and options, and the arguments given explicitly override it
            (a budget other than the recipe's also replaces the recipe's schedule, made for its budget;
            a schedule without a budget replaces both, as it sets the budget).
        **options: the reducer's own options.

    ``budget`` defaults to 0.5 (or the schedule's) and ``method`` to ``"merge"`` when neither they nor a
    recipe give one.
    Applying again replaces the earlier patch; ``tokenprune.remove`` restores the model exactly.
    A ``torch.compile`` or ``torch.nn.DataParallel`` wrapper may be given for the model: the module it runs is
    patched (here and in ``remove``, ``plan``, ``applied``, ``features``). ``DistributedDataParallel`` / FSDP: apply
    before wrapping (refused on the wrapper); ``remove``, ``plan`` and ``features`` take it.
    """
    check_wrapper_for_apply(model)
    given, model = model, unwrap(model)
    budget, method, schedule, options, rec = _with_recipe(recipe, budget, method, schedule, options)
    budget = 0.5 if budget is None and schedule is None else budget
    method = "merge" if method is None else method
    _check_not_nested(model)
    patch = _recipe_patch(rec, model, budget, method, schedule, track_source, options)  # raises before any change
    previous = get_patch(model)
    remove(model)
    try:
        _install(model, patch)
        _check_class_forward(model)
    except BaseException:
        if model.__dict__.get(PATCH_ATTR) is patch:
            remove(model)
        else:
            patch.adapter.uninstall()
        if previous is not None:
            _install(model, previous)
        raise
    return given


def _with_recipe(recipe, budget, method, schedule, options):
    """``(budget, method, schedule, options, recipe or None)``: the recipe's settings under the explicit ones (see
    :func:`apply`)."""
    if recipe is None:
        return budget, method, schedule, options, None
    rec = load_recipe(recipe)
    if budget is None and schedule is None:  # an explicit schedule sets the budget (its last count / N)
        budget = rec.budget
    if method is None or method == rec.method:  # the recipe's options belong to its method
        kw = rec.apply_kwargs()  # a clear error if the recipe's method is not registered
        method = kw.pop("method")
        kw.pop("budget")
        recipe_schedule = kw.pop("schedule", None)
        if schedule is None and budget == rec.budget:  # a budget given here replaces the recipe's schedule too
            schedule = recipe_schedule
        options = {**kw, **options}
    return budget, method, schedule, options, rec


def _recipe_patch(rec, model, budget, method, schedule, track_source, options) -> Patch:
    """:func:`_make_patch`, its error naming the recipe the settings came from."""
    try:
        return _make_patch(model, budget, method, schedule, track_source, options)
    except ValueError as e:
        if rec is None:
            raise
        made_for = f", made for {rec.model}" if rec.model else ""
        raise ValueError(f"{e} (from recipe {rec.name!r}{made_for}: give schedule= / layers= for this model, "
                         "or another recipe)") from e


def _class_patched(m) -> bool:
    """Whether ``m``'s class is one an apply swapped in (fast_patch_embed's convolution is no patch: it composes)."""
    return ORIGINAL in type(m).__dict__ and not isinstance(m, _ConvAsGemm)


def _check_class_forward(model) -> None:
    """A patched module whose ``forward`` was set on the instance (accelerate's hooks) would never run the patched
    class's forward: refused (``apply`` then restores the model)."""
    for name, m in model.named_modules():
        if _class_patched(m) and "forward" in m.__dict__:
            raise ValueError(
                f"tokenprune: the forward of {f'model.{name}' if name else 'the model'} "
                f"({type(m).__dict__[ORIGINAL].__name__}) was replaced on the instance (accelerate's hooks do this: "
                "from_pretrained(device_map=...) over several devices or with offloading, cpu_offload); tokenprune "
                "patches the class, and that forward would bypass the patched one (unreduced outputs). Load it on one "
                "device without device_map (model.to(device)), or call "
                "accelerate.hooks.remove_hook_from_module(model, recurse=True), before tokenprune.apply")


def _install(model, patch) -> None:
    if patch.adapter.writes_blocks:
        patch.scan_token = traced_scan_token(patch)
    patch.adapter.install(patch)
    setattr(model, PATCH_ATTR, patch)
    _attach_module(model, patch)


def _check_not_nested(model) -> None:
    if not hasattr(model, "named_modules"):
        raise TypeError(f"tokenprune.apply takes a model object (torch.nn.Module), got {type(model).__name__} "
                        f"{model!r:.60}; create the model first, e.g. timm.create_model(name)")
    own = PATCH_ATTR in model.__dict__
    for name, m in model.named_modules():
        if name and PATCH_ATTR in m.__dict__:
            raise ValueError(f"tokenprune: the submodule {name!r} of this model is already patched; call "
                             f"tokenprune.remove(model.{name}) first, or apply to that submodule only")
        # patched by an apply on a model that encloses this one
        if not own and _class_patched(m):
            where = f"its submodule {name!r}" if name else "it"
            raise ValueError(f"tokenprune: this {type(model).__name__} is part of a model patched by tokenprune "
                             f"({where} is patched); call tokenprune.remove on that model first, then apply to the "
                             "one you want reduced")


def remove(model):
    """Undo :func:`apply`: the model's classes and attributes are restored exactly. No-op if unpatched."""
    given, model = model, unwrap(model)
    if not hasattr(model, "named_modules"):
        raise TypeError(f"tokenprune.remove takes a model object (torch.nn.Module), got {type(model).__name__}")
    patch = model.__dict__.get(PATCH_ATTR)
    if patch is not None:
        patch.adapter.uninstall()
        del model.__dict__[PATCH_ATTR]
        if getattr(patch.reducer, "module", None) is not None:
            model._modules.pop(MODULE_ATTR, None)
    return given


def plan(model, budget: float | None = None, method: str | None = None, *, num_tokens: int | None = None,
         input_shape=None, schedule: Mapping[int, int] | None = None, recipe: str | None = None, **options) -> Plan:
    """The per-block schedule: of the installed patch (no budget given) or of a hypothetical one (on a patched
    model, without ``method=`` or with the same method: the installed method with its options, at ``budget``).
    ``num_tokens``: non-prefix tokens of the input to plan for (default: the model's default input).
    ``input_shape``: the shape of an input (e.g. ``(B, 3, H, W)``, image families): planned on the token grid that
    input gives, as a forward on it runs. ``recipe``: as in :func:`apply` (the explicit arguments override it)."""
    if num_tokens is not None and (isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1):
        raise ValueError(f"num_tokens must be a positive number of (non-prefix) input tokens, got {num_tokens!r}")
    if input_shape is not None and num_tokens is not None:
        raise ValueError("give num_tokens= or input_shape=, not both")
    model = unwrap(model)
    patch = get_patch(model)
    if recipe is not None:
        budget, method, schedule, options, rec = _with_recipe(recipe, budget, method, schedule, options)
        budget = 0.5 if budget is None and schedule is None else budget
        new = _recipe_patch(rec, model, budget, method or "merge", schedule, True, options)
        return new.plan_for(*_planned_input(new, num_tokens, input_shape))
    if budget is None and method is None and not options and schedule is None:
        if patch is None:
            raise ValueError("model is not patched; give budget= and method= to plan a reduction")
        check_depth(patch.adapter.info().depth, patch.info.depth)
        return patch.plan_for(*_planned_input(patch, num_tokens, input_shape))
    if budget is None and schedule is None:
        budget = patch.budget if patch is not None else 0.5
    installed = getattr(patch, "method", None) if patch is not None else None  # None: a patch pickled before
    if installed is not None and (method is None or method == installed):  # the installed method as configured
        method, options = installed, {**patch.options, **options}
    elif patch is not None and method is None:
        method = patch.reducer.name
    method = "merge" if method is None else method
    new = _make_patch(model, budget, method, schedule, True, options)
    return new.plan_for(*_planned_input(new, num_tokens, input_shape))


def _planned_input(patch, num_tokens, input_shape):
    """``(num_tokens, grid)`` to plan for: the adapter's grid of ``input_shape``, else the count (grid: default)."""
    if input_shape is None:
        return num_tokens, None
    grid = tuple(patch.adapter.input_grid(input_shape))
    return math.prod(grid), grid


@contextlib.contextmanager
def applied(model, budget: float | None = None, method: str | None = None, **kwargs):
    """``with tokenprune.applied(model, budget=0.25, method="cls"): ...`` -- the same arguments as
    :func:`apply` (a ``recipe=`` too); removed on exit, restoring an earlier patch if there was one."""
    previous = get_patch(model)
    apply(model, budget, method, **kwargs)
    try:
        yield model
    finally:
        remove(model)
        if previous is not None:
            _install(unwrap(model), previous)


def features(model, *args, **kwargs):
    """Run the patched encoder and return ``(tokens, state)``: its output tokens (``[B, P + K, C]``,
    the encoder's final norm applied) and the final :class:`~tokenprune.state.TokenState` (token sizes,
    source map for :func:`tokenprune.unmerge`). Arguments are the encoder's inputs as the model
    takes them (images for timm / open_clip, ``pixel_values=`` / ``input_features=`` for
    transformers models). This is the one public way to get the final state of a forward."""
    patch = get_patch(model)
    if patch is None:
        raise ValueError("features() needs a patched model: call tokenprune.apply(model, ...) first")
    return patch.adapter.features(*args, **kwargs)


def methods() -> list[str]:
    """Names of the registered reducers."""
    return registry.methods()
