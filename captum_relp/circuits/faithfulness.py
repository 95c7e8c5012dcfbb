"""Faithfulness and completeness of circuits, with everything else mean-ablated.

faithfulness(C) = (L(C) - L(empty)) / (L(M) - L(empty)); completeness(C) is the
faithfulness of the complement M \\ C (Marks et al. 2025; Wang et al. 2023).

Both are ratios over the same denominator ``m(M) - m(empty)``. Where the full model
barely beats the mean-ablated one, the denominator is small next to its noise and the
ratios overshoot: a circuit can score 20 or -20 without doing anything remarkable.
:class:`CircuitCurve` keeps the denominator and its standard error, and
:attr:`CircuitCurve.reliable` says whether the ratios can be read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .._selection import top_finite
from .nodes import NodeSpace, ablated

ERROR_POLICIES = ("keep", "drop-all", "drop-attn-mlp")
MIN_DENOMINATOR_SNR = 3.0
"""A denominator under this many standard errors makes a curve unreliable."""


@dataclass
class CircuitCurve:
    """Faithfulness and completeness as the circuit grows (one point per threshold).

    Attributes:
        n_nodes, thresholds, faithfulness, completeness: one entry per circuit size.
        metric_full: mean metric ``m(M)`` of the full model on the evaluation inputs.
        metric_empty: mean metric ``m(empty)`` with every evaluated node mean-ablated.
        denominator_se: standard error of ``m(M) - m(empty)`` over the evaluation
            examples (NaN when the metric runner returns only a mean).

    Example:
        >>> curve = CircuitCurve([1], [0.5], [1.2], [0.1], metric_full=2.0, metric_empty=1.9,
        ...                      denominator_se=0.05)
        >>> round(curve.denominator, 3), curve.reliable
        (0.1, False)
    """

    n_nodes: List[int] = field(default_factory=list)
    thresholds: List[float] = field(default_factory=list)
    faithfulness: List[float] = field(default_factory=list)
    completeness: List[float] = field(default_factory=list)
    metric_full: float = 0.0
    metric_empty: float = 0.0
    denominator_se: float = float("nan")

    @property
    def denominator(self) -> float:
        """``m(M) - m(empty)``, the denominator of both ratios."""
        return self.metric_full - self.metric_empty

    @property
    def reliable(self) -> bool:
        """``|m(M) - m(empty)|`` is at least :data:`MIN_DENOMINATOR_SNR` standard errors (True if unknown)."""
        if math.isnan(self.denominator_se):
            return self.denominator != 0
        return abs(self.denominator) >= MIN_DENOMINATOR_SNR * self.denominator_se


def evaluated_groups(space: NodeSpace, exclude_first_third: bool) -> List[str]:
    """Groups whose nodes are evaluated; earlier layers are always kept (appendix A.2).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2))
        >>> evaluated_groups(NodeSpace(model, "components"), True)
        ['attn_1', 'mlp_1', 'attn_2', 'mlp_2']
    """
    first = space.n_layers // 3 if exclude_first_third else 0
    return [g.name for g in space.groups if g.layer >= first]


def _circuit_candidates(space: NodeSpace, evaluated: Sequence[str], error_policy: str) -> List[str]:
    if error_policy not in ERROR_POLICIES:
        raise ValueError(f"error_policy must be one of {ERROR_POLICIES}, got {error_policy!r}")
    dropped = {g.name for g in space.groups if g.is_error and (
        error_policy == "drop-all" or (error_policy == "drop-attn-mlp" and g.kind in ("attn", "mlp")))}
    return [name for name in evaluated if name not in dropped]


def evaluate_circuits(
    space: NodeSpace,
    effects: Dict[str, Tensor],
    means: Dict[str, Tensor],
    run_metric: Callable[[], Tensor],
    budgets: Sequence[int],
    exclude_first_third: bool = True,
    error_policy: str = "keep",
) -> CircuitCurve:
    """Faithfulness/completeness of the top-``k`` nodes by ``|mean effect|`` for each ``k``.

    Args:
        space: the node space (its SAEs must be the ones ``effects`` were computed with).
        effects: mean effects per group, ``(T, units)``.
        means: mean activations per group on the training split, ``(T, width)``.
        run_metric: runs the model on the evaluation inputs, returns the metric per
            example (or its mean; then the denominator's standard error is unknown).
        budgets: circuit sizes to evaluate; the threshold T_N of size k is the k-th
            largest ``|effect|``. Only nodes with a finite effect are chosen; a budget above
            their number raises a ``ValueError`` that says how many nodes are unscored.
        exclude_first_third: keep the first third of layers always (appendix A.2).
        error_policy: ``keep``, ``drop-all`` error nodes, or ``drop-attn-mlp`` ones.
    """
    evaluated = evaluated_groups(space, exclude_first_third)
    candidates = _circuit_candidates(space, evaluated, error_policy)
    scores = torch.cat([effects[name].abs().flatten() for name in candidates])
    sizes = sorted({min(int(b), len(scores)) for b in budgets})
    order = top_finite(scores, max(sizes, default=0), "nodes")
    curve = CircuitCurve()
    with space.active():
        full = _values(run_metric())
        with ablated(space, _keep_masks(effects, evaluated, candidates, None), means):
            empty = _values(run_metric())
        curve.metric_full, curve.metric_empty = float(full.mean()), float(empty.mean())
        if full.numel() > 1 and full.numel() == empty.numel():
            curve.denominator_se = float((full - empty).std() / math.sqrt(full.numel()))
        span = curve.denominator
        for budget in sizes:
            chosen = torch.zeros_like(scores, dtype=torch.bool)
            chosen[order[:budget]] = True
            circuit = _keep_masks(effects, evaluated, candidates, chosen)
            complement = _keep_masks(effects, evaluated, candidates, ~chosen)
            with ablated(space, circuit, means):
                in_circuit = float(_values(run_metric()).mean())
            with ablated(space, complement, means):
                in_complement = float(_values(run_metric()).mean())
            curve.n_nodes.append(budget)
            curve.thresholds.append(float(scores[order[budget - 1]]) if budget else float("inf"))
            curve.faithfulness.append((in_circuit - curve.metric_empty) / span if span else float("nan"))
            curve.completeness.append((in_complement - curve.metric_empty) / span if span else float("nan"))
    return curve


def _values(metric) -> Tensor:
    """A metric value or per-example values as a flat float64 tensor."""
    return torch.as_tensor(metric.detach() if isinstance(metric, Tensor) else metric,
                           dtype=torch.float64).flatten()


def _keep_masks(effects, evaluated, candidates, chosen: Optional[Tensor]) -> Dict[str, Tensor]:
    """Bool keep-masks for the evaluated groups (non-candidates are always ablated)."""
    masks, offset = {}, 0
    for name in evaluated:
        shape = effects[name].shape
        if name in candidates:
            size = effects[name].numel()
            masks[name] = (chosen[offset : offset + size].reshape(shape) if chosen is not None
                           else torch.zeros(shape, dtype=torch.bool))
            offset += size
        else:
            masks[name] = torch.zeros(shape, dtype=torch.bool)
    return masks
