"""The README's snippets define every name they use (and the Whisper one runs on the shared assets);
one budget wording in the README, the package's docstrings and docs/methods.md."""
import ast
import builtins
import importlib
import re
from pathlib import Path

import pytest

from tokenprune.commands._common import BUDGET_MEANING

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _undefined_names(code: str) -> set[str]:
    """Names a snippet reads but never binds (imports, assignments, loop targets, functions, with-as)."""
    tree = ast.parse(code)
    bound, used = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Name):
            (bound if isinstance(node.ctx, ast.Store) else used).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return used - bound


def _snippet(marker: str) -> str:
    blocks = [b for b in _python_blocks(README) if marker in b and not b.lstrip().startswith(">>>")]
    assert len(blocks) == 1, f"one README snippet with {marker}, found {len(blocks)}"
    return blocks[0]


@pytest.mark.parametrize("marker", ["LlavaForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                                    "WhisperForConditionalGeneration"])
def test_vlm_and_speech_snippets_define_every_name(marker):
    assert not _undefined_names(_snippet(marker)), _undefined_names(_snippet(marker))


def test_the_name_check_can_fail():
    assert _undefined_names("import torch\nout = model(torch.ones(1))\n") == {"model"}


@pytest.mark.slow
def test_whisper_snippet_runs_on_the_shared_assets(assets, capsys):
    pytest.importorskip("soundfile")
    code = (_snippet("WhisperForConditionalGeneration")
            .replace('"openai/whisper-tiny.en"', repr(str(assets / "whisper-tiny.en")))
            .replace('"speech.wav"', repr(str(assets / "speech-hifitts-6097" / "jfk.wav"))))
    assert str(assets) in code
    exec(compile(code, "README.md (Whisper snippet)", "exec"), {})
    text = capsys.readouterr().out.lower()
    assert "ask not what your country can do for you" in text, text


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_one_budget_wording():
    import tokenprune
    from tokenprune import api

    plan = importlib.import_module("tokenprune.plan")  # the module (tokenprune.plan is the function)
    places = {"README.md": README, "docs/methods.md": (ROOT / "docs" / "methods.md").read_text(),
              "tokenprune/__init__.py": tokenprune.__doc__, "tokenprune.apply": api.apply.__doc__,
              "tokenprune/plan.py": plan.__doc__}
    for where, text in places.items():
        flat = _flat(text.replace("*", "").replace("`", ""))
        assert BUDGET_MEANING in flat, where
        for m in re.finditer(r"budget\W[^.]{0,60}?(fraction|share|portion) of [^.]*", flat, re.I):
            assert BUDGET_MEANING in flat[m.start():m.end() + 60], (where, m.group(0))
