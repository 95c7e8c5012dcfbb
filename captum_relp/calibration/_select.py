"""Noise-aware choice of a calibrated rule set: a paired bootstrap over calibration pairs.

The agreement of a candidate with AP is measured on a few calibration pairs, so it is an
estimate with noise. :func:`select` keeps the default rule set (the caller names it:
:func:`~captum_relp.calibrate_rules` passes the best fixed preset of the group unless told
otherwise) and replaces it only by a candidate whose *margin* over the default is above
zero beyond that noise:

* the calibration pairs are resampled with replacement ``n_bootstrap`` times; every
  candidate and the default are scored on the same resamples (a paired bootstrap), so
  the margin ``agreement(candidate) - agreement(default)`` has a bootstrap distribution;
* a candidate *beats the default* when the whole central percentile interval of its
  margin, at level ``1 - (1 - confidence) / (k - 1)`` for ``k`` candidates (Bonferroni
  over the ``k - 1`` comparisons with the default), lies above zero;
* among the candidates that beat the default, the one with the highest agreement on all
  calibration pairs is chosen (ties: the earlier candidate);
* when a candidate looks better than the default but none beats it beyond the noise,
  the calibration data cannot decide: the default is kept (decision ``undecided``;
  :func:`~captum_relp.calibrate_rules` warns).

Reported per group and candidate: the agreement on all pairs, its ``confidence``
percentile interval, the margin over the default and the margin interval used for the
decision.

The paired bootstrap itself is public as :func:`paired_bootstrap` and
:func:`bootstrap_interval`, e.g. to compare methods with AP on held-out pairs the way the
selection compares candidates.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ._schema import DECISIONS  # noqa: F401  (re-exported: the decisions select makes)
from .calibrated_rules import SCORES, agreement

# a candidate "looks better" than the default only above this difference (float32 scores: ties)
_TIE = 1e-6
# bootstrap resamples where the agreement is undefined (a constant side) may be dropped; with
# fewer than this fraction left, the interval is not reported
_MIN_DEFINED = 0.9



@dataclass
class GroupData:
    """AP and every candidate's scores of one group: one row per calibration pair.

    ``reference`` and each ``scores[name]`` have shape ``(n_examples, n_entries)`` (the
    group's layers and positions side by side); ``mask`` keeps the entries where AP or any
    candidate is non-zero (padding is zero everywhere and is dropped).
    """

    reference: Tensor
    scores: Dict[str, Tensor]
    mask: Tensor

    def rows(self, index: Tensor) -> "GroupData":
        """The data of the calibration pairs ``index`` (e.g. a subset, or a resample)."""
        return GroupData(self.reference[index], {n: s[index] for n, s in self.scores.items()}, self.mask[index])


@dataclass
class Selection:
    """The choice for one group, with its evidence (plain data: stored in the JSON file)."""

    choice: str
    decision: str
    note: str
    agreement: Dict[str, Optional[float]] = field(default_factory=dict)
    interval: Dict[str, Optional[List[float]]] = field(default_factory=dict)
    margin: Dict[str, Optional[float]] = field(default_factory=dict)
    margin_interval: Dict[str, Optional[List[float]]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-ready copy."""
        return asdict(self)


def group_data(reference: Sequence[Tensor], per_candidate: Dict[str, Sequence[Tensor]],
               groups: Sequence[str]) -> Dict[str, GroupData]:
    """Stack per-layer ``(n_examples, ...)`` AP and candidate scores into one :class:`GroupData` per group.

    Example:
        >>> import torch
        >>> ap = [torch.ones(2, 3), torch.zeros(2, 3)]
        >>> data = group_data(ap, {"gradient": ap}, ["mlp", "mlp"])
        >>> data["mlp"].reference.shape, int(data["mlp"].mask.sum())
        (torch.Size([2, 6]), 6)
    """
    out = {}
    for group in dict.fromkeys(groups):
        idx = [i for i, g in enumerate(groups) if g == group]

        def rows(tensors):
            return torch.cat([tensors[i].detach().double().cpu().reshape(tensors[i].shape[0], -1) for i in idx], 1)

        ref = rows(reference)
        scores = {name: rows(s) for name, s in per_candidate.items()}
        mask = ref != 0
        for s in scores.values():
            mask |= s != 0
        out[group] = GroupData(ref, scores, mask)
    return out


def bootstrap_weights(n_examples: int, n_bootstrap: int, seed: int = 0) -> Tensor:
    """``(n_bootstrap + 1, n_examples)`` resampling counts; row 0 is all ones (the full sample).

    Example:
        >>> w = bootstrap_weights(4, 3)
        >>> w.shape, w.sum(1).tolist()
        (torch.Size([4, 4]), [4.0, 4.0, 4.0, 4.0])
    """
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n_examples, (n_bootstrap, n_examples), generator=gen)
    counts = torch.zeros(n_bootstrap, n_examples, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(n_bootstrap, n_examples, dtype=torch.float64))
    return torch.cat([torch.ones(1, n_examples, dtype=torch.float64), counts])


def weighted_agreements(data: GroupData, name: str, weights: Tensor, score: str) -> Tensor:
    """The agreement of candidate ``name`` with AP under each row of example ``weights`` (NaN if undefined)."""
    x, y, m = data.scores[name], data.reference, data.mask
    if score == "pearson":  # weighted sufficient statistics: one matrix product for all resamples
        md = m.double()
        count = md.sum()
        if count == 0:
            return torch.full((weights.shape[0],), math.nan, dtype=torch.float64)
        x = (x - (x * md).sum() / count) * md  # centre first: no cancellation in the sums
        y = (y - (y * md).sum() / count) * md
        stats = torch.stack([md.sum(1), x.sum(1), y.sum(1), (x * x).sum(1), (y * y).sum(1), (x * y).sum(1)], 1)
        n, sx, sy, sxx, syy, sxy = (weights @ stats).unbind(1)
        cov, vx, vy = n * sxy - sx * sy, n * sxx - sx * sx, n * syy - sy * sy
        defined = (vx > 1e-12 * n * sxx) & (vy > 1e-12 * n * syy)  # a constant side: undefined
        denom = (vx.clamp_min(0) * vy.clamp_min(0)).sqrt().clamp_min(1e-300)
        return torch.where(defined, cov / denom, torch.full_like(cov, math.nan))
    values = []
    for row in weights:
        rows = torch.repeat_interleave(torch.arange(len(row)), row.long())
        keep = m[rows]
        values.append(agreement(x[rows][keep], y[rows][keep], score) if keep.any() else math.nan)
    return torch.tensor(values, dtype=torch.float64)


def paired_bootstrap(reference: Tensor, scores: Dict[str, Tensor], mask: Optional[Tensor] = None, *,
                     n_bootstrap: int = 1000, seed: int = 0, score: str = "pearson") -> Dict[str, Tensor]:
    """Every method's agreement with ``reference`` on all examples and on paired resamples of them.

    The examples (first dimension) are resampled with replacement ``n_bootstrap`` times, the
    same resamples for every method, so the difference of two methods' values is paired
    (:func:`bootstrap_interval` of it is the interval of their difference). Each agreement is
    computed over all entries of the resampled examples that ``mask`` keeps.

    Args:
        reference: ``(n_examples, ...)`` reference scores, e.g. activation patching's.
        scores: ``{method: scores of the reference's shape}``.
        mask: the entries that count, of the reference's shape (default: where the reference or
            any method is non-zero, so padding that is zero everywhere is dropped).
        n_bootstrap: number of resamples (at least 1).
        seed: seed of the resampling.
        score: ``"pearson"``, ``"spearman"`` or ``"topk"`` (as in :func:`agreement`).

    Returns:
        ``{method: (n_bootstrap + 1,) float64 tensor}``: entry 0 on all examples, then one per
        resample (NaN where undefined, e.g. constant scores)

    Example:
        >>> import torch
        >>> ap = torch.arange(1., 41.).reshape(20, 2)
        >>> boot = paired_bootstrap(ap, {"exact": 2 * ap, "noisy": ap + torch.randn(20, 2)}, n_bootstrap=200)
        >>> boot["exact"].shape, round(float(boot["exact"][0]), 6)
        (torch.Size([201]), 1.0)
        >>> bootstrap_interval((boot["exact"] - boot["noisy"])[1:])[0] > 0
        True
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if not scores:
        raise ValueError("scores must hold at least one method")
    if reference.dim() == 0 or reference.shape[0] == 0:
        raise ValueError(f"reference must have one row per example, got shape {tuple(reference.shape)}")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, numbers.Integral) or n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be an integer >= 1, got {n_bootstrap!r}")
    given = {f"scores[{name!r}]": values for name, values in scores.items()}
    for where, values in {**given, **({} if mask is None else {"mask": mask})}.items():
        if tuple(values.shape) != tuple(reference.shape):
            raise ValueError(f"{where} has shape {tuple(values.shape)}, the reference {tuple(reference.shape)}")
    n = reference.shape[0]

    def rows(values: Tensor) -> Tensor:
        return values.detach().double().cpu().reshape(n, -1)

    ref, per_method = rows(reference), {name: rows(values) for name, values in scores.items()}
    if mask is None:
        keep = ref != 0
        for values in per_method.values():
            keep |= values != 0
    else:
        keep = mask.detach().cpu().bool().reshape(n, -1)
    data = GroupData(ref, per_method, keep)
    weights = bootstrap_weights(n, n_bootstrap, seed)
    return {name: weighted_agreements(data, name, weights, score) for name in scores}


def bootstrap_interval(values: Tensor, level: float = 0.95) -> Optional[List[float]]:
    """The central ``level`` percentile interval of bootstrap ``values``, or ``None`` if too few are defined.

    Resamples whose value is undefined (NaN, e.g. a method with constant scores there) are
    dropped; with fewer than 90% of them left, no interval is reported (``None``).

    Args:
        values: one value per bootstrap resample (e.g. entries ``1:`` of :func:`paired_bootstrap`,
            or the difference of two methods' entries: a paired interval).
        level: the interval's coverage, between 0 and 1.

    Returns:
        ``[low, high]``, or ``None``

    Example:
        >>> import torch
        >>> bootstrap_interval(torch.arange(101.), level=0.5)
        [25.0, 75.0]
        >>> print(bootstrap_interval(torch.tensor([1.0, float("nan")])))
        None
    """
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"level must be between 0 and 1, got {level!r}")
    finite = values[torch.isfinite(values)].double()
    if finite.numel() < _MIN_DEFINED * values.numel() or finite.numel() == 0:
        return None
    alpha = (1.0 - level) / 2
    q = torch.quantile(finite, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return [float(q[0]), float(q[1])]


def _value(x: Tensor) -> Optional[float]:
    return float(x) if math.isfinite(float(x)) else None


def select(data: GroupData, default: str, score: str = "pearson", confidence: float = 0.95,
           n_bootstrap: int = 1000, seed: int = 0, group: str = "", tolerance: float = 0.0) -> Selection:
    """Choose the rule set of one group (see the module docstring for the criterion).

    Args:
        data: AP and candidate scores of the group (:func:`group_data`).
        default: the candidate kept unless another beats it beyond the noise.
        score: ``pearson``, ``spearman`` or ``topk``.
        confidence: level of the reported intervals (the decision uses the Bonferroni level).
        n_bootstrap: resamples of the calibration pairs.
        seed: seed of the resampling.
        group: the group's name (for messages).
        tolerance: AP effects of at most this size are rounding (no effect).

    Returns:
        Selection

    Example:
        >>> import torch
        >>> ap = torch.arange(1., 41.).reshape(20, 2)
        >>> data = GroupData(ap, {"gradient": ap + torch.randn(20, 2), "exact": ap.clone()}, ap != 0)
        >>> select(data, "gradient").choice
        'exact'
    """
    names = list(data.scores)
    if default not in names:
        raise ValueError(f"default {default!r} is not one of the candidates {names}")
    if not bool((data.reference.abs() > tolerance).any()):
        note = (f"activation patching is zero everywhere in group {group!r} (the corruption has no "
                f"effect there): agreement is undefined; kept {default!r}")
        return Selection(default, "no-effect", note, {n: None for n in names}, {n: None for n in names},
                         {n: None for n in names}, {n: None for n in names})
    weights = bootstrap_weights(data.reference.shape[0], n_bootstrap, seed)
    boot = {n: weighted_agreements(data, n, weights, score) for n in names}
    decision_level = 1.0 - (1.0 - confidence) / max(1, len(names) - 1)
    sel = Selection(default, "default", "")
    for n in names:
        sel.agreement[n] = _value(boot[n][0])
        sel.interval[n] = bootstrap_interval(boot[n][1:], confidence)
        diff = boot[n] - boot[default]
        sel.margin[n] = _value(diff[0])
        sel.margin_interval[n] = None if n == default else bootstrap_interval(diff[1:], decision_level)
    beats = [n for n in names if n != default and sel.margin_interval[n] is not None
             and sel.margin_interval[n][0] > 0 and sel.agreement[n] is not None]
    looks_better = [n for n in names if n != default and sel.agreement[n] is not None
                    and (sel.agreement[default] is None or sel.agreement[n] > sel.agreement[default] + _TIE)]
    if beats:
        best = max(beats, key=lambda n: (sel.agreement[n], -names.index(n)))
        lo, hi = sel.margin_interval[best]
        sel.choice, sel.decision = best, "chosen"
        sel.note = (f"{best!r} beats {default!r} by {sel.margin[best]:+.3f} (margin interval "
                    f"[{lo:+.3f}, {hi:+.3f}] at level {decision_level:.4f}, above zero)")
    elif looks_better:
        best = max(looks_better, key=lambda n: (sel.agreement[n], -names.index(n)))
        shown = "undefined" if sel.margin_interval[best] is None else \
            "[{:+.3f}, {:+.3f}]".format(*sel.margin_interval[best])
        margin = "undefined" if sel.margin[best] is None else f"{sel.margin[best]:+.3f}"
        sel.decision = "undecided"
        sel.note = (f"group {group!r}: the calibration pairs cannot decide: {best!r} looks better than "
                    f"{default!r} ({margin}) but its margin interval {shown} does not lie above zero; "
                    f"kept {default!r} (more calibration pairs may decide)")
    else:
        sel.note = f"{default!r} has the highest agreement"
    return sel
