"""Every file the docs name exists: relative links and repository paths in backticks in README.md,
DEVELOPING.md, BENCHMARKS.md and docs/ (a renamed script or a moved raw output breaks this test, not a
reader's copy-paste). docs/history/ is left out: it records deleted scripts by name."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "DEVELOPING.md", ROOT / "BENCHMARKS.md",
        *sorted(p for p in (ROOT / "docs").rglob("*.md") if "history" not in p.parts)]
TOP = ("docs/", "scripts/", "tokenprune/", "tests/", "recipes/", "demos/", ".ci/")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
CODE = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"(?<![\w./-])((?:%s)[\w./{},*-]+)" % "|".join(re.escape(t) for t in TOP))


def _expand(path: str) -> list[str]:
    """``a/{b,c}.json`` -> ``a/b.json``, ``a/c.json`` (the docs' shorthand for a few raw outputs)."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for alt in m.group(1).split(",") for q in _expand(path[:m.start()] + alt + path[m.end():])]


def named_paths(doc: Path) -> list[tuple[str, Path]]:
    text = doc.read_text()
    out = []
    for target in LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        out.append((target, (doc.parent / target)))
    for code in CODE.findall(text):
        for raw in PATH.findall(code):
            raw = raw.rstrip(".,:;)")
            if "OUT" in raw or "*" in raw or "<" in raw:  # a placeholder, or a glob for the reader
                continue
            out += [(p, ROOT / p) for p in _expand(raw)]
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_named_path_exists(doc):
    missing = sorted({name for name, path in named_paths(doc) if not path.exists()})
    assert not missing, f"{doc.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_the_path_check_can_fail(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("see [raw](docs/results/nothing_here.json) and `scripts/no_such_script.py --smoke`\n")
    names = [name for name, path in named_paths(doc) if not path.exists()]
    assert names == ["docs/results/nothing_here.json", "scripts/no_such_script.py"]
