"""The test suite (a package, so that ``pytest`` and ``python -m pytest`` import it alike)."""
