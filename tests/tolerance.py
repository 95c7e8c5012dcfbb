"""How tests compare numbers with values saved on another machine.

A value saved on one machine is not reproduced bit for bit on another: float32 matrix products
and attention kernels (sdpa) take different vectorised paths on different CPUs and builds, so the
last bits of a score depend on the machine. Saved-reference tests therefore compare through
:func:`assert_close_to_reference`, whose tolerance comes from the dtype and the magnitude of the
computation:

    |actual - saved| <= ULPS * eps(dtype) * scale

``eps`` is the dtype's machine epsilon (1.2e-7 for float32, 2.2e-16 for float64) and ``scale`` the
largest magnitude among the saved values of the same computation (the same model and method, over
all its layers): a score that is small because terms cancel carries the rounding error of the
terms, not of its own size. ``ULPS = 256`` covers the differences measured between machines (up
to 65 eps of the scale, on BERT's sdpa attention) with room to spare, and is still 1e-5 of the
scale in float32: any change of rule, layout or position moves scores by far more.

Bitwise checks (``torch.equal``) stay where equality holds by construction on one machine, such
as a forward pass with and without the rules.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

ULPS = 256
"""Tolerance in units of the dtype's epsilon times the computation's scale."""


def reference_tolerance(dtype: torch.dtype, scale: float, ulps: int = ULPS) -> float:
    """The absolute tolerance for values of ``dtype`` from a computation of magnitude ``scale``.

    Example:
        >>> reference_tolerance(torch.float32, 1.0) == 256 * torch.finfo(torch.float32).eps
        True
    """
    return ulps * torch.finfo(dtype).eps * scale


def mismatches(values: Dict[str, torch.Tensor], saved: Dict[str, torch.Tensor],
               group: Optional[Callable[[str], str]] = None, ulps: int = ULPS) -> Dict[str, str]:
    """``{key: why}`` for each value that differs from its saved value beyond the tolerance.

    Integer and bool tensors (ids, masks) must be equal. ``group(key)`` names the computation a
    key belongs to; its scale is the largest saved magnitude in the group (default: the key alone).

    Example:
        >>> saved = {"m/0": torch.tensor([1.0, 2.0]), "m/1": torch.tensor([1e-6])}
        >>> mismatches({"m/0": torch.tensor([1.0, 2.0]), "m/1": torch.tensor([1.1e-6])}, saved,
        ...            group=lambda key: key.split("/")[0])
        {}
        >>> list(mismatches({"m/0": torch.tensor([1.0, 2.01]), "m/1": saved["m/1"]}, saved))
        ['m/0']
    """
    group = group or (lambda key: key)
    scales: Dict[str, float] = {}
    for key, value in saved.items():
        if value.is_floating_point() and value.numel():
            scales[group(key)] = max(scales.get(group(key), 0.0), float(value.abs().max()))
    bad = {}
    for key, value in values.items():
        reference = saved[key]
        if value.dtype != reference.dtype or value.shape != reference.shape:
            bad[key] = f"{value.dtype} {tuple(value.shape)} != saved {reference.dtype} {tuple(reference.shape)}"
        elif not value.is_floating_point():
            if not torch.equal(value, reference):
                bad[key] = "integer values differ"
        elif value.numel():
            tol = reference_tolerance(value.dtype, scales.get(group(key), 0.0), ulps)
            diff = float((value - reference).abs().max())
            if not diff <= tol:
                bad[key] = f"max |difference| {diff:.3g} > tolerance {tol:.3g}"
    return bad


def assert_close_to_reference(values: Dict[str, torch.Tensor], saved: Dict[str, torch.Tensor],
                              group: Optional[Callable[[str], str]] = None, ulps: int = ULPS) -> None:
    """Assert that ``values`` has the saved keys and matches them within :func:`reference_tolerance`.

    Example:
        >>> assert_close_to_reference({"a": torch.tensor([1.0])}, {"a": torch.tensor([1.0])})
    """
    assert sorted(values) == sorted(saved), "the saved keys differ from the computed ones"
    bad = mismatches(values, saved, group, ulps)
    shown = "; ".join(f"{key}: {why}" for key, why in list(bad.items())[:10])
    assert not bad, f"{len(bad)} of {len(values)} reference tensors differ beyond the tolerance: {shown}"
