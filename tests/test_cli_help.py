"""`tokenprune --help` and `<command> --help`: full description, help text and defaults for every
option, one budget wording everywhere, and no torch imported to parse arguments."""
import argparse
import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tokenprune.cli import COMMANDS, build_parser, main
from tokenprune.commands._common import BUDGET_MEANING

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tokenprune"


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _run_python(code: str, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120, **kw)


def test_parsing_and_help_import_no_torch():
    """The CLI and every command module parse and format help without torch, timm, transformers,
    matplotlib or gradio. ``tokenprune/__init__.py`` (not part of the CLI) is bypassed here by
    registering the package by its path, so this checks the CLI's own imports."""
    proc = _run_python(f"""
        import contextlib, io, sys, types
        pkg = types.ModuleType("tokenprune"); pkg.__path__ = [{str(PKG)!r}]; sys.modules["tokenprune"] = pkg
        from tokenprune.cli import build_parser, main
        parser = build_parser()
        for argv in (["plan"], ["quickstart", "--budget", "0.5"], ["eval", "--device", "cuda"], ["bench"], ["demo"]):
            parser.parse_args(argv)
        for argv in (["--help"], ["plan", "--help"], ["eval", "--help"], ["bench", "--help"], ["demo", "--help"],
                     ["quickstart", "--help"], ["plan", "--budget", "7"]):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                assert main(argv) in (0, 2), argv
        heavy = sorted(m for m in ("torch", "timm", "transformers", "matplotlib", "gradio", "PIL") if m in sys.modules)
        print("HEAVY", heavy)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HEAVY []" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_console_help_imports_no_torch():
    """The console script's path (the real package __init__, then tokenprune.cli) imports no torch for
    any --help; the CLI's method check, the first thing in the process to need the reducers (as in
    `tokenprune quickstart`), knows the built-in methods; the package's public names still load on first use.
    One fresh process for the three (each costs seconds of imports)."""
    proc = _run_python("""
        import contextlib, io, sys
        import tokenprune
        from tokenprune.cli import COMMANDS, main
        for argv in [["--help"]] + [[name, "--help"] for name in COMMANDS]:
            with contextlib.redirect_stdout(io.StringIO()):
                assert main(argv) == 0, argv
        assert "torch" not in sys.modules, "torch imported"
        loaded = sorted(m for m in sys.modules if m.startswith(("tokenprune.reducers", "tokenprune.api")))
        assert not loaded, loaded  # the method check below is the first to need the reducers
        from tokenprune.commands._common import check_methods
        assert check_methods(["merge", "cls"]) == ["merge", "cls"]
        assert "tokenprune.api" not in sys.modules
        assert callable(tokenprune.apply) and "tokenprune.api" in sys.modules
        import tokenprune.plan  # the submodule of the same name does not shadow the function
        assert callable(tokenprune.plan) and tokenprune.plan.__module__ == "tokenprune.api"
        from tokenprune.plan import Plan
        assert tokenprune.Plan is Plan
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_description_is_whole_sentences(capsys):
    parser = build_parser()
    assert parser.description.rstrip().endswith(".")
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "tokenprune <command> --help" in out
    for name in COMMANDS:
        assert name in out
    for name, sub in _subparsers(parser).items():
        assert sub.description and sub.description.rstrip().endswith((".", ")")), name



@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_help_has_no_developer_notes(name, capsys):
    """``tokenprune demo --help`` printed the module docstring's notes for contributors ("Modules: ``choices`` ...,
    imports nothing heavy"). A command's --help says what it does and how to use it: no module layout, import
    rules or internal function names."""
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    for note in (r"\bModules?:", r"\bimports? (nothing|no torch)", r"``tokenprune\.[\w.]+``", r"\bthis module\b"):
        assert not re.search(note, out, re.IGNORECASE), (name, note)

def test_every_option_has_help_and_shows_its_default():
    for name, sub in _subparsers(build_parser()).items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            opt = action.option_strings[-1]
            assert action.help and len(action.help) > 10, f"{name} {opt} has no help"
            shown = " ".join(formatter._expand_help(action).split())  # the text --help prints for it
            if action.default not in (None, False, argparse.SUPPRESS, []):
                assert f"(default: {action.default})" in shown, (name, opt, shown)
            elif action.default is None:  # no default value: the help says what happens without the option
                assert "default" in shown, (name, opt, shown)


def test_budget_help_uses_the_one_wording():
    for name, sub in _subparsers(build_parser()).items():
        for action in sub._actions:
            if "budget" in action.dest:
                assert BUDGET_MEANING in action.help, (name, action.dest, action.help)


def _literals(tree):
    """Every string literal (adjacent literals joined) and the constant text of every f-string."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value
        elif isinstance(node, ast.JoinedStr):
            yield "".join(v.value for v in node.values if isinstance(v, ast.Constant))


def test_budget_descriptions_in_cli_plots_and_demo_use_the_one_wording():
    files = [PKG / "cli.py", PKG / "plots.py", PKG / "evaluate.py", *sorted((PKG / "commands").rglob("*.py"))]
    bad = []
    for f in files:
        for text in _literals(ast.parse(f.read_text())):
            flat = " ".join(text.split())
            if re.search(r"budget", flat, re.I) and re.search(r"(fraction|share|portion|percentage) of", flat, re.I):
                if BUDGET_MEANING not in flat:
                    bad.append((f.name, flat[:160]))
    check = next(n for n in ast.walk(ast.parse((PKG / "plan.py").read_text()))
                 if isinstance(n, ast.FunctionDef) and n.name == "check_budget")
    for text in _literals(check):
        flat = " ".join(text.split())
        if "fraction of" in flat and BUDGET_MEANING not in flat:
            bad.append(("plan.check_budget", flat[:160]))
    assert not bad, bad
