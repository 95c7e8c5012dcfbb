"""Agreement of attribution methods with activation patching, with paired bootstrap intervals.

For one component type, every method's per-prompt scores (``(N, layers, T)``) are compared with
AP's over all (prompt, layer, position) entries that are not padding: the Pearson correlation
on all prompts, and its 95% percentile interval over ``n_bootstrap`` resamples of the prompts
(the same resamples for every method, so differences between methods are paired). A method
*loses to* another beyond noise when the whole interval of the difference of their
correlations lies below zero.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch

from ..calibration import bootstrap_interval, paired_bootstrap

LEVEL = 0.95
"""Level of the reported intervals."""


def _value(x: torch.Tensor) -> Optional[float]:
    return float(x) if math.isfinite(float(x)) else None


def agreement_table(reference: np.ndarray, scores: Dict[str, np.ndarray], valid: np.ndarray,
                    n_bootstrap: int = 1000, seed: int = 0, against: str = "AtP") -> Dict[str, Dict[str, object]]:
    """Per method: PCC with ``reference`` on all prompts, its interval, and the paired difference to ``against``.

    Args:
        reference: ``(N, layers, T)`` AP scores of one component type.
        scores: ``{method: (N, layers, T)}`` on the same prompts.
        valid: ``(N, T)`` real (non-pad) positions.
        n_bootstrap, seed: resamples of the prompts.
        against: the method every other is compared with (``margin``: PCC minus its PCC).

    Returns:
        ``{method: {"pcc", "interval", "margin", "margin_interval", "loses"}}``
        (``loses``: the margin's interval lies below zero).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> ap = rng.normal(size=(20, 2, 4)); valid = np.ones((20, 4), bool)
        >>> table = agreement_table(ap, {"AtP": ap + 0.1 * rng.normal(size=ap.shape),
        ...                              "RelP": rng.normal(size=ap.shape)}, valid)
        >>> table["AtP"]["pcc"] > 0.9, table["RelP"]["loses"]
        (True, True)
    """
    mask = np.broadcast_to(valid[:, None, :], reference.shape)
    keep = lambda a: torch.from_numpy(np.where(mask, np.asarray(a, float), 0.0).reshape(a.shape[0], -1))  # noqa: E731
    values = paired_bootstrap(keep(reference), {m: keep(s) for m, s in scores.items()},
                              torch.from_numpy(np.ascontiguousarray(mask).reshape(mask.shape[0], -1).copy()),
                              n_bootstrap=n_bootstrap, seed=seed)
    out: Dict[str, Dict[str, object]] = {}
    for method, v in values.items():
        row: Dict[str, object] = {"pcc": _value(v[0]), "interval": bootstrap_interval(v[1:], LEVEL)}
        if against in values and method != against:
            margin = v - values[against]
            interval = bootstrap_interval(margin[1:], LEVEL)
            row.update(margin=_value(margin[0]), margin_interval=interval,
                       loses=bool(interval is not None and interval[1] < 0))
        out[method] = row
    return out


def format_interval(row: Dict[str, object]) -> str:
    """``.565 [.41, .71]`` for a row of :func:`agreement_table`.

    Example:
        >>> format_interval({"pcc": 0.5651, "interval": [0.41, 0.712]})
        '0.565 [0.41, 0.71]'
    """
    pcc, interval = row.get("pcc"), row.get("interval")
    text = "nan" if pcc is None else f"{pcc:.3f}"
    return text + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else " [n/a]")


__all__ = ["LEVEL", "agreement_table", "format_interval"]
