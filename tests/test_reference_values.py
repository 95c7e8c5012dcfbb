"""Scores bit for bit equal to the values saved before issue 17's restructuring.

RelP (``relp``/``relp-ah``, full, ``reduce="sum"``/``"heads"``, plain LRP, denoising, mask +
target), AtP and IG on the six tested families, edge scores (RelP, RelP-AH, EAP, EAP-IG,
per position) on the four edge families and feature edges (components, neurons, SAE
features; RelP and gradients). Regenerate only for an intended change of numbers:
``OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m tests.fixtures.reference``.
"""
import torch

from tests.fixtures.reference import PATH, compute


def test_scores_are_bit_identical_to_saved_reference():
    saved = torch.load(PATH, weights_only=True)
    values, names = compute()
    assert sorted(values) == sorted(saved["values"])
    assert names == saved["names"]  # the same nodes kept and the same edges, in the same order
    differ = [key for key, value in values.items()
              if value.dtype != saved["values"][key].dtype or not torch.equal(value, saved["values"][key])]
    assert not differ, f"{len(differ)} of {len(values)} reference tensors changed: {differ[:10]}"
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for k, v in values.items() if "/ids" not in k)
