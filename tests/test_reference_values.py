"""Scores equal to the values saved before a restructuring of the library, to the tolerance of
``tests/tolerance.py`` (the dtype's epsilon times the scale of each model and method: the last
bits of float32 scores differ between machines).

RelP (``relp``/``relp-ah``, full, ``reduce="sum"``/``"heads"``, plain LRP, denoising, mask +
target), AtP and IG on the six tested families, edge scores (RelP, RelP-AH, EAP, EAP-IG,
per position) on the four edge families and feature edges (components, neurons, SAE
features; RelP and gradients). Regenerate only for an intended change of numbers:
``OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m tests.fixtures.reference``.
"""
import torch

from tests.fixtures.reference import PATH, compute
from tests.tolerance import assert_close_to_reference, mismatches


def _computation(key: str) -> str:
    """``'bert/relp/denoising/2'`` -> ``'bert/relp'``: one model and method, all its layers."""
    return "/".join(key.split("/")[:2])


def _computed_dtype(values):
    """Feature-edge scores are float32 computations kept as float64 lists: compare them as float32."""
    return {k: v.float() if k.startswith("feature_edges/") else v for k, v in values.items()}


def test_scores_match_saved_reference():
    saved = torch.load(PATH, weights_only=True)
    values, names = compute()
    assert names == saved["names"]  # the same nodes kept and the same edges, in the same order
    assert_close_to_reference(_computed_dtype(values), _computed_dtype(saved["values"]), group=_computation)
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for k, v in values.items() if "/ids" not in k)


def test_reference_tolerance_catches_a_changed_rule():
    """The tolerance is loose enough for other machines, and tight enough for a real change:
    RelP scores in place of AtP scores (the rules dropped) differ far beyond it, on every layer
    of every model."""
    saved = torch.load(PATH, weights_only=True)["values"]
    atp = [key for key in saved if key.split("/")[1:2] == ["atp"]]
    swapped = {key: saved[key.replace("/atp/", "/relp/")] for key in atp}
    assert len(atp) >= 12 and sorted(mismatches(swapped, saved, group=_computation)) == sorted(atp)
