"""What the subcommands share: the budget wording, argument types and checks that need no torch,
device checks, model loading with progress lines, and the warning/progress output on stderr.

Nothing here imports torch at module level: ``tokenprune <command> --help`` must not pay for it.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

#: The one description of ``budget`` used in every help text, plot and label.
BUDGET_MEANING = "fraction of the input's non-prefix tokens kept (that leave the encoder)"
BUDGET_HELP = f"budget = {BUDGET_MEANING}, in (0, 1]"
DTYPE_NAMES = ("bfloat16", "float16", "float32")
DEVICE_FORMS = "cpu, cuda, cuda:N or mps"


class UsageError(Exception):
    """Bad arguments or an unusable setup: reported as one line, exit code 2."""


# -- output --------------------------------------------------------------------------------------
def info(message: str) -> None:
    """A progress line on stderr (stdout stays for results)."""
    print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """A warning line on stderr, loud enough to see in a log."""
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


# -- argument types (argparse ``type=``): a bad value is a one-line usage error, exit 2 -------------
def budget_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; {BUDGET_HELP}") from None
    if not 0.0 < value <= 1.0:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"budget must be in (0, 1]: the {BUDGET_MEANING}; got {text}")
    return value


def _int_arg(low: int, high: int | None = None, what: str = "an integer"):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


positive_int = _int_arg(1, what="an integer >= 1")
nonnegative_int = _int_arg(0, what="an integer >= 0")
port_arg = _int_arg(1, 65535, what="a TCP port in 1..65535")


def device_arg(text: str) -> str:
    """The form of a torch device string, checked without torch (availability is checked at run time)."""
    value = text.strip().lower()
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", value):
        hint = " (for an NVIDIA GPU use cuda)" if value in ("gpu", "nvidia") else ""
        raise argparse.ArgumentTypeError(f"unknown device {text!r}{hint}; use {DEVICE_FORMS}")
    return value


def existing_dir(text: str) -> str:
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return str(Path(text).expanduser())


def add_assets_argument(p) -> None:
    p.add_argument("--assets", type=existing_dir, default=None, metavar="DIR",
                   help="shared assets folder: real weights, CIFAR-10 archives, speech clips (default: "
                        "$TOKENPRUNE_ASSETS, else ../shared/assets next to the tokenprune checkout)")


# -- run-time checks (after parsing; these may import torch) ----------------------------------------
def make_out_dir(out: str) -> None:
    """Create the ``--out`` folder now: one that cannot be made (a file of that name, no permission) is a
    usage error before anything runs, not after a whole run whose results would be lost."""
    try:
        Path(out).expanduser().mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out} cannot be used as the output folder: {e.strerror or e}") from None


def check_device(device: str) -> str:
    """``device`` if this machine has it; a :class:`UsageError` naming what is missing otherwise."""
    import torch

    kind = device.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False); use --device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"--device {device}: Apple MPS is not available on this machine; use --device cpu")
    return device


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def check_methods(methods) -> list[str]:
    """The method names, each checked against the registry (an unknown one: one line listing the known)."""
    from .. import reducers, registry  # noqa: F401  (importing reducers registers the built-in methods; imported
    # on use, not at the top, so that the command's --help does not import torch)

    for m in methods:
        try:
            registry.get(m)
        except ValueError as e:  # the registry's message: the known methods, and a near miss if there is one
            raise UsageError(str(e)) from None
    return list(methods)


def check_lists(methods, budgets, recipes) -> None:
    """An empty ``--methods`` / ``--budgets`` list (an unset shell variable, a stray comma) would compare nothing but
    the unreduced model: refused."""
    if methods and not budgets:
        raise UsageError("--budgets gives no budget (an empty list); give at least one, e.g. --budgets 0.5,0.25")
    if not methods and not recipes:
        raise UsageError("--methods gives no method (an empty list); give at least one, e.g. --methods merge,cls, "
                         "or a --recipe")


def set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


# -- models ----------------------------------------------------------------------------------------
def add_model_source_arguments(p, default_help: str) -> None:
    """The model arguments shared by quickstart, plan, eval and bench (one loader:
    :func:`load_model`)."""
    p.add_argument("--model", default=None,
                   help="timm model name, local folder (timm layout: config.json with 'architecture' + "
                        "model.safetensors; or a Hugging Face folder) or Hugging Face id (owner/name) "
                        f"(default: {default_help})")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="local weights for a timm model name: a .safetensors/.pth file or a folder with "
                        "model.safetensors and config.json (default: none)")
    p.add_argument("--model-args", default=None, metavar="JSON",
                   help='JSON keyword arguments for timm.create_model, e.g. \'{"img_size": 32, "depth": 4}\' '
                        "(default: none)")
    p.add_argument("--num-classes", type=nonnegative_int, default=None, metavar="N",
                   help="reset the classifier head to N classes (0: feature extractor) "
                        "(default: keep the model's head)")
    p.add_argument("--pretrained", action="store_true",
                   help="timm model name: download its pretrained weights (needs network); without it, "
                        "or --weights, a timm name has RANDOM weights")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and data sampling")


def resolve_model(spec: str | None, default_parts: tuple[str, ...]) -> tuple[str, bool]:
    """``(model spec, is_default)``: ``--model`` as given, or the default under the assets folder."""
    if spec is not None:
        return spec, False
    from ..data import default_asset

    return str(default_asset(*default_parts)), True


def random_timm(spec: str, args) -> bool:
    """Whether ``spec`` names a timm model that would be built with random weights (no local folder,
    no ``--weights``, no ``--pretrained``); known before anything is loaded."""
    if Path(spec).expanduser().exists() or args.weights or args.pretrained:
        return False
    import timm

    return timm.is_model(spec.split(".")[0])


def load_model(spec: str, args, *, what: str = "command", weights_matter: bool = True, device=None):
    """:func:`tokenprune.evaluate.load_model` with a progress line before and after, and a one-line
    error for a path that does not exist. The result has ``random_weights`` set; when
    ``weights_matter`` a warning line says so. ``device``: build the model under that torch device
    (``"meta"``: no memory, no initialisation; for plans)."""
    import time

    from .. import evaluate as ev

    path = Path(spec).expanduser()
    if not path.exists() and (spec.startswith((".", "/", "~")) or path.suffix in (".safetensors", ".pth")
                              or spec.count("/") > 1):
        from ..data import assets_dir, assets_source

        raise UsageError(f"--model {spec} does not exist (assets folder: {assets_dir()}, from "
                         f"{assets_source()}; set --assets or $TOKENPRUNE_ASSETS, or give a timm name or "
                         "Hugging Face id)")
    import contextlib

    import torch

    t0 = [time.perf_counter()]

    def announce(description: str) -> None:
        info(f"loading {description}")
        t0[0] = time.perf_counter()

    with torch.device(device) if device is not None else contextlib.nullcontext():
        lm = ev.load_model(str(path) if path.exists() else spec, args.weights, ev.parse_model_args(args.model_args),
                           args.num_classes, args.pretrained, args.seed, announce=announce)
    size = f", input {lm.img_size[0]}x{lm.img_size[1]} px" if lm.img_size else ""
    info(f"loaded {lm.name} ({lm.family}, {lm.modality}{size}, "
         f"{lm.num_classes or 'no'} head classes) in {time.perf_counter() - t0[0]:.1f} s")
    if lm.random_weights and weights_matter:
        warn(f"{lm.name} has RANDOM weights (a timm name without --weights or --pretrained): "
             "its predictions, accuracy and agreement mean nothing")
    elif lm.random_weights:
        info(f"({lm.name} has random weights; this {what} does not depend on them)")
    return lm
