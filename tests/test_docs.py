"""Fast checks of the documentation sources (the full Sphinx build runs in CI)."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _ext_module(name: str):
    """A Sphinx extension of ``docs/_ext`` imported from its file."""
    spec = importlib.util.spec_from_file_location(name, DOCS / "_ext" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tables_module():
    return _ext_module("relp_tables")


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

    api = "\n".join(p.read_text(encoding="utf-8") for p in [DOCS / "api.rst", *sorted((DOCS / "api").glob("*.rst"))])
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


def test_install_instructions_say_how_to_get_the_cpu_build():
    """README and installation page: from the clone (not PyPI), and the CPU build of torch spelled out."""
    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    installation = (DOCS / "installation.md").read_text(encoding="utf-8")
    for text in (readme, installation):
        assert "--index-url https://download.pytorch.org/whl/cpu" in text
        assert "keeps the download small" not in text and "keep the\ndownload small" not in text
    integrations = (DOCS / "integrations.md").read_text(encoding="utf-8")
    assert '"captum-relp[integrations]"' not in integrations and '-e ".[integrations]"' in integrations
    assert 'pip install -e ".[docs,integrations]"' in readme  # the docs build runs the integration examples


def _figures_module():
    return _ext_module("relp_figures")


def test_figure_check_flags_a_drawn_figure_that_is_not_shown():
    missing_figures = _figures_module().missing_figures
    drawn = {"cell_type": "code", "metadata": {}, "source": ["plot_patching_heatmaps(maps, 'resid')\n"],
             "outputs": [{"output_type": "display_data", "data": {"image/png": "iVBOR", "text/plain": "<Figure>"}}]}
    lost = dict(drawn, outputs=[{"output_type": "stream", "name": "stdout", "text": "done\n"}])
    exempt = dict(lost, metadata={"tags": ["no-figure"]})
    prose = {"cell_type": "markdown", "metadata": {}, "source": "plt.subplots() draws"}
    assert missing_figures({"cells": [drawn, lost, exempt, prose]}) == [1]


@pytest.mark.parametrize("path", sorted((ROOT / "tutorials").glob("*.ipynb")), ids=lambda p: p.name)
def test_every_tutorial_that_draws_shows_its_figures_whatever_the_backend(path):
    """A cell that draws needs the inline backend (or an explicit Image): under MPLBACKEND=Agg a figure
    drawn and never shown is lost, and the docs build (relp_figures) fails on it."""
    figures = _figures_module()
    notebook = json.loads(path.read_text(encoding="utf-8"))
    code = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    drawing = [s for s in code if figures.DRAWS.search(s)]
    implicit = [s for s in drawing if "Image(" not in s]  # shown only by the backend
    if implicit:
        assert any(line.strip() == "%matplotlib inline" for s in code for line in s.splitlines()), path.name


@pytest.mark.slow
def test_captum_workflow_tutorial_shows_its_figure_under_agg(monkeypatch):
    """Execute tutorial 02 as the CI docs build does (MPLBACKEND=Agg) and look for its figure."""
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    notebook = nbformat.read(ROOT / "tutorials" / "02_captum_workflow.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    assert _figures_module().missing_figures(notebook) == []
    assert any("image/png" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))


def test_link_check_names_each_missing_page_and_anchor(tmp_path):
    """Hand-made pages: a viewcode-style "[docs]" link to an anchor the page lacks, a link to a missing page."""
    broken_links = _ext_module("relp_links").broken_links
    (tmp_path / "api").mkdir()
    (tmp_path / "_modules").mkdir()
    (tmp_path / "api" / "metrics.html").write_text(
        '<dl><dt id="captum_relp.metrics.tile_rows">tile_rows</dt></dl><a href="../index.html#top">up</a>')
    (tmp_path / "index.html").write_text('<h1 id="top">x</h1><a href="api/metrics.html">api</a>'
                                         '<img src="_images/missing.png"><a href="https://example.org/#x">out</a>')
    (tmp_path / "_modules" / "metrics.html").write_text(
        '<a class="viewcode-back" href="../api/metrics.html#captum_relp.metrics.tile_rows">[docs]</a>'
        '<a class="viewcode-back" href="../api/metrics.html#captum_relp.tile_rows">[docs]</a>')
    assert broken_links(str(tmp_path)) == [
        '_modules/metrics.html: ../api/metrics.html#captum_relp.tile_rows '
        '(no id "captum_relp.tile_rows" in api/metrics.html)',
        "index.html: _images/missing.png (no such file)"]
    with pytest.raises(FileNotFoundError, match="outdir"):
        broken_links(str(tmp_path / "absent"))


def test_viewcode_links_go_to_the_name_an_object_is_documented_under():
    """Objects of captum_relp.metrics documented at the package root, or under their module, or not at all."""
    documented_name = _ext_module("relp_links").documented_name
    objects = {"captum_relp.LogitDiff": "api/generated/captum_relp.LogitDiff",
               "captum_relp.LogitDiff.at_positions": "api/generated/captum_relp.LogitDiff",
               "captum_relp.metrics.tile_rows": "api/metrics", "captum_relp.rules.tile_rows": "api/rules"}
    assert documented_name("captum_relp.metrics", "LogitDiff", objects) == "captum_relp.LogitDiff"
    assert documented_name("captum_relp.metrics", "LogitDiff.at_positions", objects) == \
        "captum_relp.LogitDiff.at_positions"
    # captum_relp.rules has no tile_rows: only the module's own name is the object
    assert documented_name("captum_relp.metrics", "tile_rows", objects, "api/rules") == "captum_relp.metrics.tile_rows"
    assert documented_name("captum_relp.metrics", "final_logits", objects) is None
