"""``tokenprune`` command line. Each subcommand lives in its own module under
``tokenprune.commands`` with ``add_arguments(parser)`` and ``run(args) -> int``.

Parsing imports no torch: the command modules import it (and timm, matplotlib, ...) inside
``run``, so ``tokenprune --help`` and ``tokenprune <command> --help`` answer at once.

Errors are one line on stderr, ``tokenprune <command>: error: ...``, with exit code 2 (bad
arguments, missing files or devices, and anything else that stops a command;
``TOKENPRUNE_DEBUG=1`` shows the traceback instead). A closed output pipe
(``tokenprune plan | head -1``) ends quietly with 141 (128 + SIGPIPE), Ctrl+C with 130.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap

from .commands._common import BUDGET_HELP, UsageError, add_assets_argument

__all__ = ["main", "build_parser", "UsageError", "COMMANDS"]

DESCRIPTION = textwrap.fill(
    "tokenprune: token reduction (merging, pruning, pooling) between the encoder blocks of transformer models "
    "-- timm ViTs, open_clip and Hugging Face CLIP / SigLIP, Whisper, AST, VideoMAE, LLaVA -- with fused "
    "attention (SDPA) kept. Run `tokenprune <command> --help` for a command's options.", width=88)
EPILOG = f"""\
{BUDGET_HELP}.
assets (real weights, CIFAR-10, speech clips): --assets DIR, else $TOKENPRUNE_ASSETS,
  else ../shared/assets next to the tokenprune checkout.
exit codes: 0 done; 2 error (one line on stderr; TOKENPRUNE_DEBUG=1 for the traceback);
  130 interrupted; 141 output pipe closed."""

# name -> (module, one-line help); modules are imported to add their arguments, and import
# torch and the model libraries only when their command runs
COMMANDS = {
    "quickstart": ("tokenprune.commands.quickstart",
                   "apply a reducer to a ViT and report tokens, time and agreement with the unreduced model"),
    "plan": ("tokenprune.commands.plan", "print the per-block schedule and FLOP ratio of a method and budget"),
    "demo": ("tokenprune.commands.demo", "local Gradio app: the tokens each method keeps, side by side (image, audio)"),
    "eval": ("tokenprune.commands.eval", "accuracy retained (top-1, kNN, WER) per method and budget, Pareto plot"),
    "bench": ("tokenprune.commands.bench", "throughput, latency, peak memory and FLOPs per method and budget"),
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; every option's default appended unless its help already
    states it (or it is None / a flag that is off)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (action.option_strings and "(default" not in text and "%(default)" not in text
                and default is not None and default is not False and default != argparse.SUPPRESS
                and default != []):
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line: ``<prog>: error: <message> (see <prog> --help)``;
    an unknown option after a command is reported by that command."""

    commands: dict = {}

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        args, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = self.commands.get(getattr(args, "command", None), self)
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return args


def build_parser() -> ArgumentParser:
    """The full parser; importing it and parsing imports no torch."""
    parser = ArgumentParser(prog="tokenprune", description=DESCRIPTION, epilog=EPILOG,
                            formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    parser.commands = sub.choices  # name -> subparser
    for name, (module, help_) in COMMANDS.items():
        mod = importlib.import_module(module)
        doc = (mod.__doc__ or "").strip()
        p = sub.add_parser(name, help=help_, description=doc or help_, epilog=EPILOG,
                           formatter_class=HelpFormatter)
        p.set_defaults(_module=module)
        mod.add_arguments(p)
        add_assets_argument(p)
    return parser


def _one_line(text: str, limit: int = 600) -> str:
    line = "; ".join(part.strip() for part in str(text).strip().splitlines() if part.strip())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv=None) -> int:
    """Run the command line; returns the exit code (``sys.exit(main())`` in the console script)."""
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help (0) or a usage error (2, already printed as one line)
            sys.stdout.flush()
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        return _run(args)
    except BrokenPipeError:
        _silence_stdout()
        return 141


def _run(args) -> int:
    from .data import set_assets_dir

    previous = set_assets_dir(args.assets) if args.assets else None
    try:
        code = int(importlib.import_module(args._module).run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows up here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        raise
    except KeyboardInterrupt:
        print(f"tokenprune {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- one line, exit 2, for every error (README promise)
        if os.environ.get("TOKENPRUNE_DEBUG"):
            raise
        known = isinstance(e, (UsageError, ValueError, TypeError, FileNotFoundError, NotImplementedError))
        message = _one_line(e) if known else f"{type(e).__name__}: {_one_line(e)} (TOKENPRUNE_DEBUG=1 shows the traceback)"
        print(f"tokenprune {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        if args.assets:
            set_assets_dir(previous)


if __name__ == "__main__":
    sys.exit(main())
