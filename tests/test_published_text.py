"""Published text speaks to users: nothing internal to how the project is developed.

Scans what a reader sees (the README, every documentation source, the tutorials with
their code and any committed outputs, and the help of every command-line subcommand)
for references that only make sense inside the project: issue numbers, commit hashes,
local paths and words about how the work was organised.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]

INTERNAL = {
    "issue number": re.compile(r"\bissues?\s*#?\d+|\(#\d+\)|(?<![\w&/])#\d{2,}\b", re.I),
    "commit hash": re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b"),
    "local path": re.compile(r"(?<![\w.])(?:/work/|/tmp/|/home/\w|/root/|~/\.?\w*(?:tmp|temp|scratch))", re.I),
    "process word": re.compile(r"\b(?:deadline|helper session|this session|sessions?\b(?= (?:of|by) the project)|"
                               r"worktree|this round|last round|next round)\b|"
                               r"\b(?:the|this|that) issue(?:'s|\b(?= (?:asked|measured|that added|target)))", re.I),
}
"""What counts as internal, by kind (each a clear, narrow pattern)."""

# text that looks internal but is not: e.g. the sha256 of a published file is a real checksum
ALLOWED = [
    re.compile(r"sha256"),
]


def _published_files() -> Iterator[Path]:
    yield ROOT / "README.md"
    docs = ROOT / "docs"
    for path in sorted(docs.rglob("*")):
        parts = path.relative_to(docs).parts
        if parts[0] in ("_build", "jupyter_execute", "tutorials") or "generated" in parts:
            continue
        if path.suffix in (".md", ".rst", ".py") and path.is_file():
            yield path


def _notebook_texts(path: Path) -> Iterator[Tuple[str, str]]:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    for index, cell in enumerate(notebook["cells"]):
        yield f"cell {index}", "".join(cell.get("source", ""))
        for output in cell.get("outputs", []):
            text = output.get("text") or output.get("data", {}).get("text/plain", "")
            yield f"cell {index} output", "".join(text)


def _help_texts() -> Iterator[Tuple[str, str]]:
    from captum_relp.cli import build_parser

    parser = build_parser()
    yield "captum-relp --help", parser.format_help()
    for action in parser._actions:  # the subcommands live in the subparsers action
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"captum-relp {name} --help", sub.format_help()


def _sources() -> Iterator[Tuple[str, str]]:
    for path in _published_files():
        yield str(path.relative_to(ROOT)), path.read_text(encoding="utf-8")
    for path in sorted((ROOT / "tutorials").glob("*.ipynb")):
        for where, text in _notebook_texts(path):
            yield f"{path.relative_to(ROOT)} {where}", text
    yield from _help_texts()


def internal_references(text: str) -> List[Tuple[str, str]]:
    """``(kind, line)`` for every line of ``text`` with an internal reference.

    Example:
        >>> internal_references("see issue 19 for why\\nplain text")
        [('issue number', 'see issue 19 for why')]
    """
    hits = []
    for line in text.splitlines():
        if any(allowed.search(line) for allowed in ALLOWED):
            continue
        for kind, pattern in INTERNAL.items():
            if pattern.search(line):
                hits.append((kind, line.strip()))
    return hits


@pytest.mark.parametrize("text, kind", [
    ("as measured in issue 19", "issue number"),
    ("(issue 7)", "issue number"),
    ("fixed in #123", "issue number"),
    ("the bug (commit 1a2b3c4d)", "commit hash"),
    ("written to /tmp/relp-abc/out.json", "local path"),
    ("see /work/main/scripts", "local path"),
    ("before the deadline", "process word"),
    ("in this round of work", "process word"),
    ("checked in a worktree", "process word"),
])
def test_patterns_catch_internal_references(text, kind):
    assert kind in [k for k, _ in internal_references(text)]


@pytest.mark.parametrize("text", [
    "RelP beats AtP on 12 of 14 cells",
    "file sha256 `0123456789abcdef0123`",
    "layer 24, position 3, 100 prompts",
    "python -m captum_relp.cli ioi --out relp-out/ioi",
    "colour #ff0000",
])
def test_patterns_leave_ordinary_text_alone(text):
    assert internal_references(text) == []


def test_published_text_has_no_internal_references():
    found = [f"{where}: {kind}: {line[:160]}" for where, text in _sources()
             for kind, line in internal_references(text)]
    assert not found, "internal references in published text:\n" + "\n".join(found)
