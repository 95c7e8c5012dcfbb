"""The package's shape: no import cycles, no private names across modules, docs cover every subpackage."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "captum_relp"
DOCS = PACKAGE.parent / "docs"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: Set[str]) -> List[Tuple[str, str]]:
    """``(imported module, imported name)`` pairs of every import, also inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((target, "") if target in known else (base, alias.name))
    return [(module, imported) for module, imported in found if module.startswith("captum_relp")]


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: {m for m, _ in _imports(name, path, set(modules)) if m in modules and m != name}
            for name, path in modules.items()}


def test_no_import_cycles():
    graph = _graph()
    state: Dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: List[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    modules = _modules()
    offenders = [f"{name} imports {imported} from {module}"
                 for name, path in modules.items()
                 for module, imported in _imports(name, path, set(modules))
                 if imported.startswith("_") and not imported.startswith("__") and module != name]
    assert not offenders, offenders


def test_modules_stay_small():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 420}
    assert not long, f"modules over ~400 lines: {long}"


def test_api_reference_covers_every_public_subpackage():
    api = "\n".join(p.read_text(encoding="utf-8") for p in [DOCS / "api.rst", *sorted((DOCS / "api").glob("*.rst"))])
    public = sorted(name for name in _modules()
                    if name.count(".") == 1 and not name.rsplit(".", 1)[-1].startswith("_"))
    missing = [name for name in public if name not in api]
    assert not missing, f"modules missing from docs/api: {missing}"


def test_cli_reference_page_lists_every_option():
    import argparse
    import sys

    sys.path.insert(0, str(DOCS / "_ext"))
    from relp_cli import cli_reference

    from captum_relp.cli import build_parser

    text = cli_reference()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        assert f"captum-relp {name}" in text
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for flag in action.option_strings:
                hidden = action.help == argparse.SUPPRESS  # kept for old command lines, not documented
                assert (f"`{flag}`" in text) != hidden, (name, flag)
    assert "| 3 |" in text
    assert "SUPPRESS" not in text and not re.search("\u2013[a-z]", text)
    assert "pip install captum-relp" not in text
    # a default computed at run time is given in words (the help's "(default: ...)"), never as None
    defaults = [line.split(" | ")[1] for line in text.splitlines() if line.startswith("| `--")]
    assert defaults and not [d for d in defaults if "None" in d], [d for d in defaults if "None" in d]
    assert not [d for d in defaults if d.count("(") != d.count(")")], "a default cut at a nested parenthesis"
    assert "None" not in "".join(a.help or "" for p in sub.choices.values() for a in p._actions
                                 if a.help != argparse.SUPPRESS)


def _callers(predicate) -> Set[str]:
    return {name for name, path in _modules().items()
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call) and predicate(ast.unparse(node.func))}


def test_one_coefficient_primitive():
    """Only the coefficient pass applies rules or differentiates a metric (RelP with and without
    ``reduce=``, AtP, IG's inner gradient, edge scores and feature edges all call it)."""
    primitive = "captum_relp._coefficients"
    assert _callers(lambda f: f.split(".")[-1] == "apply_rules") == {primitive}
    assert _callers(lambda f: f.split(".")[-1] == "switch_rules") == {primitive}
    # rules.functional: the slope of an activation function at 0, no metric involved
    assert _callers(lambda f: f.endswith("autograd.grad")) == {primitive, "captum_relp.rules.functional"}
    # sae_train: the SAE training loss, no metric involved
    assert _callers(lambda f: f.endswith(".backward")) == {"captum_relp.circuits.sae_train"}
    aliases = [name for name, path in _modules().items() for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch")
               and any(a.name in ("grad", "backward") for a in node.names)]
    assert not aliases, aliases
    users = {name for name, path in _modules().items() if name != primitive
             and any(m == primitive for m, _ in _imports(name, path, set(_modules())))}
    # attr._base reads reference activations through the same site capture (ModuleSites), without gradients;
    # tasks.file_metrics takes a metric's gradient w.r.t. the logits (its first-order expansion)
    assert users == {"captum_relp.attr._base", "captum_relp.attr._gradient_x_difference",
                     "captum_relp.attr.layer_integrated_gradients_patching", "captum_relp.edges.scores",
                     "captum_relp.circuits.feature_edges", "captum_relp.tasks.file_metrics"}
