"""scripts/_real_model_runs.py keeps its chunks in the library's checkpoint: the committed chunks load
under the committed fingerprint, another model file is refused, and the scripts import without a cycle
and only through public names (no private name of another module, no private library module)."""
from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from _real_model_runs import CHUNK, load_split  # noqa: E402

from captum_relp.embedded.gguf import CARD_KEY  # noqa: E402
from captum_relp.experiments.checkpoint import CheckpointMismatch  # noqa: E402

SMOLLM2 = ROOT / "docs" / "_static" / "results" / "smollm2"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # results.json's model card


class _Carded(nn.Linear):
    """Stands in for the GGUF-loaded model: only its card and dtype are read."""

    def __init__(self, sha256: str) -> None:
        super().__init__(1, 1)
        self.config = type("Config", (), {CARD_KEY: {"sha256": sha256}})()


@pytest.mark.parametrize("task", ["ioi", "sva"])
def test_the_committed_chunks_load_as_written(task):
    loaded = load_split(_Carded(SHA256), SMOLLM2, task, "eval")
    files = sorted((SMOLLM2 / "parts").glob(f"{task}_eval_[0-9][0-9][0-9].npz"))
    assert loaded["metric"].shape[0] == CHUNK * len(files)
    direct = np.concatenate([np.load(f)["AP"] for f in files])
    assert np.array_equal(loaded["scores"]["AP"], direct)
    assert loaded["prompts"][0] == str(np.load(files[0])["prompts"][0])


def test_chunks_of_another_model_file_are_refused(tmp_path):
    shutil.copytree(SMOLLM2 / "parts", tmp_path / "parts")
    with pytest.raises(CheckpointMismatch, match="model_sha256"):
        load_split(_Carded("0" * 64), tmp_path, "ioi", "eval")
    with pytest.raises(CheckpointMismatch, match="dtype"):
        load_split(_Carded(SHA256).to(torch.float64), tmp_path, "ioi", "eval")


def _script_imports(path: Path) -> set:
    names = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module in names:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in names}
    return found


def test_scripts_import_each_other_without_a_cycle():
    graph = {p.stem: _script_imports(p) for p in (ROOT / "scripts").glob("*.py")}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, seen + (n,))) for n in graph[start])

    assert not [name for name in graph if reaches(name, name)]


def _private(dotted: str) -> bool:
    """A private part after the first: ``captum_relp.calibration._select``, ``_report._cell``."""
    return any(part.startswith("_") and not part.startswith("__") for part in dotted.split(".")[1:])


def _private_imports(source: str) -> List[str]:
    """What ``source`` takes from another module's internals: a private name (``from m import _x``,
    ``m._x`` on an imported module) or a private module of the library (``captum_relp.x._y``)."""
    scripts = {p.stem for p in (ROOT / "scripts").glob("*.py")}
    tree = ast.parse(source)
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in scripts | {"captum_relp"}:
                    modules.add(alias.asname or alias.name.split(".")[0])
                    if _private(alias.name):
                        found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in scripts | {"captum_relp"}:
                modules |= {alias.asname or alias.name for alias in node.names}
                if _private(node.module):
                    found.append(f"line {node.lineno}: from {node.module} import ...")
            found += [f"line {node.lineno}: from {node.module} import {alias.name}" for alias in node.names
                      if _private("." + alias.name)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = ast.unparse(node)
            if chain.split(".")[0] in modules and _private(chain):
                found.append(f"line {node.lineno}: {chain}")
    return sorted(set(found))


def test_scripts_use_only_public_names_of_other_modules():
    """Scripts are a thin layer over the library's public API and over shared script modules' public names."""
    offenders = {p.name: found for p in sorted((ROOT / "scripts").glob("*.py"))
                 if (found := _private_imports(p.read_text()))}
    assert not offenders, offenders


@pytest.mark.parametrize("source, named", [
    ("from _real_model_page import METHODS, _losses", "from _real_model_page import _losses"),
    ("from captum_relp.calibration._select import group_data", "from captum_relp.calibration._select import ..."),
    ("from captum_relp.calibration import _select", "from captum_relp.calibration import _select"),
    ("import captum_relp.calibration._schema as schema", "import captum_relp.calibration._schema"),
    ("import _report as report\nreport._cell(1, True)", "report._cell"),
    ("from captum_relp import calibration\ncalibration._select.select", "calibration._select"),
])
def test_the_public_names_check_names_each_private_import(source, named):
    assert [f for f in _private_imports(source) if f.endswith(named)], _private_imports(source)


def test_the_public_names_check_passes_public_names():
    source = ("from __future__ import annotations\nimport _calibration_rows as rows_io\n"
              "from _report import table\nfrom captum_relp.calibration import CandidateScores\n"
              "rows_io.coverage_table([], 1)\nconfig._attn_implementation = 'eager'\n")
    assert _private_imports(source) == []
