"""Named settings (method, budget, schedule, options) stored as YAML.

    tokenprune.apply(model, recipe="tome-vit-b")            # the recipe as written
    tokenprune.apply(model, recipe="tome-vit-b", budget=.5) # explicit arguments win
    tokenprune eval --recipe fastervlm-90 ...               # the CLI

Recipes ship in ``tokenprune/recipes/*.yaml``; a path to any YAML file of the
same shape works too. A recipe may name a method this install does not have
(yet): it still loads, and applying it raises an error that says which method
is missing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import registry
from .plan import check_budget, check_schedule

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
_FIELDS = {"name", "description", "source", "model", "method", "budget", "schedule", "options"}


@dataclass(frozen=True)
class Recipe:
    name: str
    method: str
    budget: float
    description: str = ""
    source: str = ""
    model: str = ""  # the model the setting was published for (a hint, not enforced)
    schedule: dict | None = None  # {block: keep} override
    options: dict = field(default_factory=dict)
    path: str = ""

    def apply_kwargs(self) -> dict:
        """``method``, ``budget``, ``schedule`` and the reducer options, as ``apply`` takes them."""
        if self.method not in registry.methods():
            raise ValueError(f"recipe {self.name!r} needs method {self.method!r}, which is not registered in this "
                             f"install; known methods: {', '.join(registry.methods())}")
        out = {"method": self.method, "budget": self.budget, **self.options}
        if self.schedule:
            out["schedule"] = dict(self.schedule)
        return out


def list_recipes() -> list[str]:
    """Names of the recipes that ship with tokenprune."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name, or a YAML file by path."""
    import yaml

    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ValueError(f"recipe file {str(name_or_path)!r} not found (looked from {Path.cwd()}); shipped "
                             f"recipes, by name without .yaml: {', '.join(list_recipes())}")
    else:
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ValueError(f"unknown recipe {str(name_or_path)!r}; known recipes: {', '.join(list_recipes())} "
                         "(or give the path of a .yaml file)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ValueError(f"recipe {path} has unknown field(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(_FIELDS))}")
    for key in ("method", "budget"):
        if key not in data:
            raise ValueError(f"recipe {path} has no {key!r}")
    method, options = data["method"], data.get("options") or {}
    if not isinstance(method, str) or not method:
        raise ValueError(f"recipe {path}: method must be the name of one method (tokenprune.methods()), got "
                         f"{method!r}; for a composition write method: pipeline and options: {{reducers: [...]}}")
    if not isinstance(options, dict):
        raise ValueError(f"recipe {path}: options must be a mapping of the method's options, got {options!r:.80}")
    try:  # checked as apply() checks them: nothing converted (a budget of true, a keep count of 2.7)
        budget = check_budget(data["budget"])
        schedule = check_schedule(data.get("schedule"))
    except (TypeError, ValueError) as e:
        raise type(e)(f"recipe {path}: {e}") from None
    return Recipe(name=str(data.get("name", path.stem)), method=method, budget=budget,
                  description=str(data.get("description", "")), source=str(data.get("source", "")),
                  model=str(data.get("model", "")), schedule=schedule, options=dict(options), path=str(path))
