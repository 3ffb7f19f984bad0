"""``tokenprune`` command line. Each subcommand lives in its own module under
``tokenprune.commands`` with ``add_arguments(parser)`` and ``run(args) -> int``."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help); modules are imported only when their command runs
COMMANDS = {
    "quickstart": ("tokenprune.commands.quickstart", "apply a reducer to a timm ViT and report tokens, time, agreement"),
    "plan": ("tokenprune.commands.plan", "print the per-block schedule and FLOP ratio of a method and budget"),
    "demo": ("tokenprune.commands.demo", "local Gradio app: the tokens each method keeps, side by side (image, audio)"),
    "eval": ("tokenprune.commands.eval", "accuracy retained (top-1, kNN, WER) per method and budget, Pareto plot"),
    "bench": ("tokenprune.commands.bench", "throughput, latency, peak memory and FLOPs per method and budget"),
}


class UsageError(Exception):
    """Bad arguments: reported as one line, exit code 2."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tokenprune", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (UsageError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"tokenprune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
