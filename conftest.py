"""Collection rules for the whole suite (tests/ and the docstring examples in captum_relp/)."""
from __future__ import annotations

import importlib.util
import re

import pytest

OPTIONAL_PACKAGES = {"gguf": "gguf", "accelerate": "accelerate", "nnsight": "nnsight",
                     "transformer_lens": "transformer-lens"}
"""``{importable name: the extra that installs it}`` for docstring examples that need one."""


def pytest_collection_modifyitems(config, items):
    """Skip, with a reason, the docstring examples that import a missing optional package."""
    for item in items:
        examples = getattr(getattr(item, "dtest", None), "examples", None)
        if not examples:
            continue
        source = "".join(example.source for example in examples)
        for name, extra in OPTIONAL_PACKAGES.items():
            if re.search(rf"\b(import|from) {name}\b|import [\w, ]*\b{name}\b", source) and \
                    importlib.util.find_spec(name) is None:
                item.add_marker(pytest.mark.skip(
                    reason=f"needs the optional package {name} (pip install -e '.[{extra}]')"))
