"""Fast checks of the documentation sources (the full Sphinx build runs in CI)."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _tables_module():
    spec = importlib.util.spec_from_file_location("relp_tables", DOCS / "_ext" / "relp_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_registry_table_lists_every_registered_type():
    from captum_relp.rules import registered_rules

    table = _tables_module().registry_table()
    for key in registered_rules():
        module, name = key.rsplit(".", 1)
        assert f"| `{name}` | `{module}` |" in table


def test_presets_table_lists_every_preset():
    from captum_relp import PRESETS

    table = _tables_module().presets_table()
    for name in PRESETS:
        assert repr(name) in table


@pytest.mark.slow
def test_family_tables_have_no_uncovered_modules():
    text = _tables_module().family_tables()
    for family in ("GPT-2", "GPT-NeoX / Pythia", "Llama", "Qwen2", "Gemma2", "BERT"):
        assert f"### {family}" in text
    assert "no rule**" not in text
    assert "HalfRule()" in text and "weight_offset=1.0" in text


@pytest.mark.parametrize("path", sorted((ROOT / "tutorials").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_valid_and_stripped(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name}: commit notebooks without outputs"


def test_toctree_entries_exist():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```\{toctree\}(.*?)```", index, flags=re.S)
    entries = [line.strip() for block in blocks for line in block.splitlines()
               if line.strip() and not line.strip().startswith(":")]
    assert entries
    for entry in entries:
        candidates = [DOCS / f"{entry}{ext}" for ext in (".md", ".rst", ".ipynb")]
        assert any(c.exists() for c in candidates), entry


def test_api_reference_covers_public_names():
    import captum_relp
    import captum_relp.rules

    api = (DOCS / "api.rst").read_text(encoding="utf-8")
    for name in captum_relp.__all__ + captum_relp.rules.__all__:
        assert re.search(rf"^\s+{name}$|py:data:: {name}$", api, flags=re.M), name


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README's "In Python" example is complete: it runs as is on the shipped model."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## In Python", 1)[1].split("\n## ", 1)[0]
    blocks = _python_blocks(section)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "->" in out and out.count("MLP ") == 3
    assert (tmp_path / "relp_mlp.png").stat().st_size > 0


def test_quickstart_examples_match_readme_and_hub_variant_runs(tmp_path, monkeypatch, capsys):
    """The quickstart's executed example is the README's; its hub-model (gpt2) variant, which
    the docs build does not execute, runs with the shipped model in place of ``gpt2``."""
    from captum_relp.embedded import embedded_model_path

    quickstart = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    readme_code = _python_blocks(readme.split("## In Python", 1)[1])[0]
    executed = re.findall(r"^```\{code-cell\} python\n(.*?)^```", quickstart, flags=re.S | re.M)

    def norm(code):
        return re.sub(r"\s+", "", code.replace("fig = ", "").removesuffix("fig\n"))

    assert any(norm(cell) == norm(readme_code) for cell in executed)

    hub = _python_blocks(quickstart.split("## A hub model", 1)[1])[0]
    assert 'from_pretrained("gpt2")' in hub
    hub = hub.replace('"gpt2"', repr(str(embedded_model_path("tiny-gpt2-ioi"))))
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__quickstart__"}
    exec(compile(hub, "quickstart.md", "exec"), namespace)
    model = namespace["model"]
    assert tuple(namespace["heads"].shape) == (model.config.n_layer, model.config.n_head)
    assert namespace["batch"].attention_mask.min() == 0  # the variant exercises padding
    assert capsys.readouterr().out.count("head ") == 5
