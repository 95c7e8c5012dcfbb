"""scripts/trust_cases.py runs its cases as a script only: importing it runs nothing."""
from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_script_runs_nothing(monkeypatch, capsys):
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    monkeypatch.delitem(sys.modules, "trust_cases", raising=False)
    seeded = []
    monkeypatch.setattr(torch, "manual_seed", lambda *args: seeded.append(args))  # the first thing a case does
    silenced = ("ignore", None, Warning, None, 0)  # what warnings.filterwarnings("ignore") adds
    monkeypatch.setattr(warnings, "filters", [f for f in warnings.filters if f != silenced])
    module = importlib.import_module("trust_cases")
    assert callable(module.main)
    assert seeded == [] and capsys.readouterr().out == ""
    assert silenced not in warnings.filters  # the script silences warnings when it runs, not when imported
