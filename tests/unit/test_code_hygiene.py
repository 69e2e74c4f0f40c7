"""Source hygiene of the package: short module docstrings, no comment or docstring that points
outside the repository, and a module map in every package's __init__ docstring.

Walks every .py file under node/, strategies/ and protocol/ (protocol/pb/ is generated).
Docstrings are read with `ast`, comments with `tokenize`; every failure lists all offenders
as path:line."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("node", "strategies", "protocol")
GENERATED = (Path("protocol") / "pb",)
MAX_MODULE_DOC_LINES = 15
# pointers to documents outside the repository, or to the issue tracker and notes
POINTERS = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"\.\./shared",
    r"/shared/reference",
    r"operations\.md",
    r"\bissue \d+",
    r"\bthe note\b",
    r"\bstop \d+\b",
    r"\btest [A-Z]-\d+\b",
    r"\bO-\d+\b",
    r"§",
))


def _sources() -> list[Path]:
    out = []
    for top in PACKAGE_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if not any(rel.is_relative_to(g) for g in GENERATED):
                out.append(rel)
    return out


SOURCES = _sources()


def _tree(rel: Path) -> ast.Module:
    return ast.parse((ROOT / rel).read_text(encoding="utf-8"), filename=str(rel))


def _docstrings(tree: ast.Module):
    """(line of the docstring, text) for the module and every class and function."""
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=False)
        if doc is not None:
            yield node.body[0].lineno, doc


def _comments(rel: Path):
    """(line, text) of every comment."""
    source = (ROOT / rel).read_text(encoding="utf-8")
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            yield tok.start[0], tok.string


def test_the_walk_finds_the_package():
    names = {p.as_posix() for p in SOURCES}
    assert {"node/__init__.py", "strategies/__init__.py", "protocol/codec.py"} <= names
    assert not any(n.startswith("protocol/pb/") for n in names)


def test_module_docstrings_are_at_most_15_lines():
    offenders = []
    for rel in SOURCES:
        doc = ast.get_docstring(_tree(rel))
        if doc is not None and len(doc.splitlines()) > MAX_MODULE_DOC_LINES:
            offenders.append(f"{rel}:1: module docstring has {len(doc.splitlines())} lines")
    assert not offenders, f"module docstrings over {MAX_MODULE_DOC_LINES} lines:\n" + "\n".join(offenders)


def test_no_comment_or_docstring_points_outside_the_repository():
    offenders = []
    for rel in SOURCES:
        for first, doc in _docstrings(_tree(rel)):
            for offset, line in enumerate(doc.splitlines()):
                hits = [p.pattern for p in POINTERS if p.search(line)]
                if hits:
                    offenders.append(f"{rel}:{first + offset}: {line.strip()}  [{', '.join(hits)}]")
        for lineno, text in _comments(rel):
            hits = [p.pattern for p in POINTERS if p.search(text)]
            if hits:
                offenders.append(f"{rel}:{lineno}: {text.strip()}  [{', '.join(hits)}]")
    assert not offenders, "pointers outside the repository (say it in our own words):\n" + "\n".join(offenders)


def _names(doc: str, module: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(module)}(\.py)?(?!\w)", doc) is not None


@pytest.mark.parametrize("package", sorted({p.parent for p in SOURCES if p.name == "__init__.py"}),
                         ids=lambda p: p.as_posix())
def test_every_package_docstring_maps_its_modules(package: Path):
    init = package / "__init__.py"
    doc = ast.get_docstring(_tree(init))
    assert doc, f"{init}:1: no docstring (it must name every module of {package}/)"
    modules = sorted(p.stem for p in (ROOT / package).glob("*.py") if p.name != "__init__.py")
    missing = [f"{init}:1: does not name {m}.py" for m in modules if not _names(doc, m)]
    assert not missing, "package docstrings missing modules:\n" + "\n".join(missing)
