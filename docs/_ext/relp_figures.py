"""Fail the docs build when a tutorial cell that draws a figure shows none.

A notebook executed by the build shows a matplotlib figure only when the kernel's backend
displays it: under ``MPLBACKEND=Agg`` (as in CI) a figure that is drawn but never shown is
silently lost. After each tutorial is executed, every code cell that draws (calls
``plt.subplots``/``plt.figure``, a ``plot_*`` function or ``Image(...)``) must have an image
among its outputs; a cell tagged ``no-figure`` is exempt.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List


DRAWS = re.compile(r"\bplt\.(?:subplots|figure|plot|bar|imshow)\(|\bplot_\w+\(|\bImage\(")
"""What a cell that draws a figure calls."""


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _has_image(cell: dict) -> bool:
    return any(key.startswith("image/") for output in cell.get("outputs", [])
               for key in output.get("data", {}))


def missing_figures(notebook: dict) -> List[int]:
    """Indices of the code cells of an executed ``notebook`` that draw a figure but show none.

    Example:
        >>> drawn = {"cell_type": "code", "source": "fig, ax = plt.subplots()", "metadata": {},
        ...          "outputs": [{"output_type": "display_data", "data": {"image/png": "..."}}]}
        >>> lost = dict(drawn, outputs=[])
        >>> missing_figures({"cells": [drawn, lost]})
        [1]
    """
    return [index for index, cell in enumerate(notebook.get("cells", []))
            if cell.get("cell_type") == "code" and DRAWS.search(_source(cell))
            and "no-figure" not in cell.get("metadata", {}).get("tags", []) and not _has_image(cell)]


def _check_executed_tutorial(app, doctree) -> None:
    docname = app.env.docname
    if not docname.startswith("tutorials/"):
        return
    from sphinx.errors import ExtensionError  # here, so the module imports without sphinx (tests)

    executed = Path(app.outdir).parent / "jupyter_execute" / (docname + ".ipynb")
    if not executed.exists():
        raise ExtensionError(f"{docname}: the executed notebook {executed.name} was not written "
                             "(nb_execution_mode?), so its figures cannot be checked")
    missing = missing_figures(json.loads(executed.read_text(encoding="utf-8")))
    if missing:
        raise ExtensionError(
            f"{docname}: code cell(s) {missing} draw a figure but show none (a figure that is never "
            "displayed under a non-interactive backend such as MPLBACKEND=Agg; use `%matplotlib inline`, "
            "or show the saved PNG with IPython.display.Image)")


def setup(app):
    app.connect("doctree-read", _check_executed_tutorial)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
