"""Calibrated rule sets: the per-group choice of :func:`captum_relp.calibration.calibrate_rules`.

Holds the candidates, the agreement measures and :class:`CalibratedRules` (JSON save/load, the
per-layer plan :class:`~captum_relp.LayerRelevancePatching` runs), with no dependency on the
attribution classes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..models import model_components
from ..rules import AHRule, RuleSet, ZeroRule, registered_rules
from ..rules.registry import registered_category
from . import _schema

SCORES = ("pearson", "spearman", "topk")
TOPK_FRACTION = 0.1
_RULE_CATEGORIES = _schema.RULE_CATEGORIES


_SHORT = {"norm": "ln", "activation": "identity", "gate": "half", "custom": "custom"}


def model_categories(model: Optional[nn.Module]) -> Tuple[Tuple[str, ...], bool]:
    """The rule categories ``model`` has modules of, and whether the AH-rule applies to it.

    Without a model: ``norm``, ``activation`` and ``gate``, no AH-rule.

    Example:
        >>> import torch
        >>> model_categories(torch.nn.Sequential(torch.nn.LayerNorm(2), torch.nn.GELU()))
        (('norm', 'activation'), False)
    """
    if model is None:
        return ("norm", "activation", "gate"), False
    found = {registered_category(type(m)) for m in model.modules()}
    categories = tuple(c for c in _RULE_CATEGORIES if c in found)
    has_ah = hasattr(getattr(model, "config", None), "_attn_implementation") or "attention" in found
    return categories, has_ah


def default_candidates(model: Optional[nn.Module] = None) -> List[RuleSet]:
    """The default candidates of :func:`calibrate_rules`: every subset of the model's rule categories.

    The categories are those ``model`` has modules of (``norm``: LN-rule, ``activation``:
    Identity-rule, ``gate``: Half-rule, ``custom``: registered custom rules), each subset
    with and without the AH-rule when it applies (Hugging Face or TransformerLens
    attention): at most 16 rule sets for the usual transformer (32 with custom rules), one
    RelP pass each. ``gradient`` is the empty set (attribution patching) and comes first
    (it wins ties). The full set is called ``relp`` (the paper preset) and ``relp-ah`` with
    the AH-rule; these three presets are the ones calibration keeps by default (the best of
    them per group) unless another candidate beats it beyond the noise;
    the others are named by their rules (``ln``, ``identity``, ``ln+identity``, ``ln+half``, ...;
    ``+ah`` for the AH-rule).

    Args:
        model (nn.Module, optional): the model (default: norm, activation and gate, no AH-rule).

    Returns:
        list of RuleSet

    Examples::

        >>> [c.name for c in default_candidates()]
        ['gradient', 'ln', 'identity', 'half', 'ln+identity', 'ln+half', 'identity+half', 'relp']
    """
    categories, has_ah = model_categories(model)
    subsets = [tuple(c for i, c in enumerate(categories) if mask >> i & 1) for mask in range(2 ** len(categories))]
    subsets.sort(key=len)
    candidates = []
    for attention in ((None, AHRule()) if has_ah else (None,)):
        for subset in subsets:
            if len(subset) == len(categories) and subset:
                name = "relp" if attention is None else "relp-ah"
                chosen = ("norm", "activation", "gate", "custom")
            else:
                name = "+".join([_SHORT[c] for c in subset] + (["ah"] if attention is not None else [])) or "gradient"
                chosen = subset
            candidates.append(RuleSet(name, categories=chosen, attention=attention))
    return candidates


def explicit_ruleset(ruleset: RuleSet) -> RuleSet:
    """``ruleset`` with the plain gradient (``ZeroRule``) made explicit for disabled categories.

    A candidate such as "LN only" deliberately leaves activations to the gradient;
    making that explicit keeps strict coverage checks from rejecting it.

    Examples::

        >>> rs = explicit_ruleset(RuleSet("ln", categories=("norm",)))
        >>> rs.overrides["torch.nn.modules.activation.GELU"]
        ZeroRule()
    """
    overrides = {
        key: ZeroRule() for key, (category, _) in registered_rules().items()
        if category in _RULE_CATEGORIES and category not in ruleset.categories
    }
    overrides.update(ruleset.overrides)
    return replace(ruleset, overrides=overrides)


def infer_groups(model: Optional[nn.Module], layers: Sequence[nn.Module], flags: Sequence[bool]) -> List[str]:
    """One group label per layer: ``resid``/``attn``/``mlp`` for the layers of
    :func:`~captum_relp.model_components`, else the layer's class name (``+":input"``
    when its input is attributed).

    Examples::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.GELU())
        >>> infer_groups(net, [net[0], net[1]], [False, True])
        ['Linear', 'GELU:input']
    """
    kinds: Dict[Tuple[int, bool], str] = {}
    if model is not None:
        try:
            comps = model_components(model)
        except Exception:  # not a transformer this library knows: fall back to class names
            comps = None
        if comps is not None:
            for kind, modules, flag in (("resid", comps.blocks, True), ("attn", comps.attn, False),
                                        ("mlp", comps.mlp, False)):
                kinds.update({(id(m), flag): kind for m in modules})
    return [kinds.get((id(layer), bool(flag)), type(layer).__name__ + (":input" if flag else ""))
            for layer, flag in zip(layers, flags)]


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor, tied values sharing their average rank; ``nan`` stays ``nan``.

    Example:
        >>> _average_ranks(torch.tensor([3.0, 0.0, 0.0, 5.0])).tolist()
        [3.0, 1.5, 1.5, 4.0]
    """
    ordered, order = torch.sort(values, stable=True)
    starts_run = torch.ones_like(ordered, dtype=torch.bool)
    starts_run[1:] = ordered[1:] != ordered[:-1]
    run = torch.cumsum(starts_run, 0) - 1
    last = torch.cumsum(torch.bincount(run), 0).double()  # rank of each run's last entry
    first = last - torch.bincount(run).double() + 1
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = ((first + last) / 2)[run]
    return ranks.masked_fill(values.isnan(), float("nan"))


def agreement(scores: Tensor, reference: Tensor, score: str = "pearson") -> float:
    """Agreement of ``scores`` with ``reference`` (same shape; flattened).

    ``pearson`` and ``spearman`` correlations (NaN if a side is constant or has a NaN entry)
    or ``topk``: the overlap of the top 10% entries by magnitude (at least one). Spearman's
    correlation gives tied values their average rank (like ``scipy.stats.spearmanr``).

    Examples::

        >>> import torch
        >>> round(agreement(torch.tensor([1., 2., 3.]), torch.tensor([1., 2., 4.])), 3)
        0.982
        >>> round(agreement(torch.tensor([1., 2., 3.]), torch.tensor([1., 2., 4.]), "spearman"), 3)
        1.0
        >>> round(agreement(torch.tensor([0., 0., 1., 2.]), torch.tensor([0., 0., 2., 1.]), "spearman"), 3)
        0.778
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    x, y = scores.detach().double().flatten().cpu(), reference.detach().double().flatten().cpu()
    if score == "topk":
        k = max(1, math.ceil(TOPK_FRACTION * x.numel()))
        top_x = set(x.abs().topk(k).indices.tolist())
        return len(top_x & set(y.abs().topk(k).indices.tolist())) / k
    if score == "spearman":
        x, y = _average_ranks(x), _average_ranks(y)
    x, y = x - x.mean(), y - y.mean()
    denom = float(x.norm() * y.norm())
    return float((x * y).sum()) / denom if denom > 0 else float("nan")


@dataclass
class CalibratedRules:
    """The outcome of :func:`calibrate_rules`: one candidate rule set per group of layers.

    Pass it as ``rules=`` to :class:`~captum_relp.LayerRelevancePatching`; layers are
    mapped to groups like in calibration (by component kind when ``auto_groups``,
    else by position in ``groups``), and each distinct chosen rule set costs one
    rules-applied forward and backward pass.

    Attributes:
        candidates: ``{name: RuleSet}`` of all candidates, in order.
        choices: ``{group: candidate name}``.
        agreement: ``{group: {candidate name: score}}`` on the calibration pairs (``None``
            where undefined, e.g. a candidate with constant scores).
        groups: the group of every calibrated layer.
        auto_groups: groups were inferred (:func:`infer_groups`), not given.
        score: ``pearson``, ``spearman`` or ``topk``.
        n_examples: number of calibration pairs.
        info: free-form notes (cost, prompts used).
        default: the candidate kept unless another beats it beyond the noise.
        confidence, n_bootstrap: the level of the intervals and the bootstrap resamples.
        selection: ``{group: {"choice", "decision", "note", "agreement", "interval", "margin",
            "margin_interval"}}``, the evidence of each choice (see :func:`calibrate_rules`).
        model: the signature of the calibrated model (root class and ruled module types);
            when set, using the rules on a model with other module types raises.

    Examples::

        >>> cal = CalibratedRules({"relp": RuleSet("relp")}, {"mlp": "relp"}, {"mlp": {"relp": 0.9}},
        ...                       ["mlp"], auto_groups=True)
        >>> CalibratedRules.from_json(cal.to_json()).choices
        {'mlp': 'relp'}
    """

    candidates: Dict[str, RuleSet]
    choices: Dict[str, str]
    agreement: Dict[str, Dict[str, Optional[float]]]
    groups: List[str]
    auto_groups: bool = True
    score: str = "pearson"
    n_examples: int = 0
    info: Dict[str, Any] = field(default_factory=dict)
    default: Optional[str] = None
    confidence: Optional[float] = None
    n_bootstrap: Optional[int] = None
    selection: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    model: Optional[Dict[str, Any]] = None

    @property
    def is_empty(self) -> bool:
        """False, always; the chosen rule sets make every category explicit (:func:`explicit_ruleset`)."""
        return False

    def rules_for(self, group: str) -> RuleSet:
        """The chosen rule set of ``group`` (disabled categories made explicit)."""
        if group not in self.choices:
            raise ValueError(f"group {group!r} was not calibrated; calibrated groups: {sorted(self.choices)}")
        return explicit_ruleset(self.candidates[self.choices[group]])

    def groups_for(self, model: Optional[nn.Module], layers: Sequence[nn.Module],
                   flags: Sequence[bool]) -> List[str]:
        """The group of each of ``layers`` (see the class docstring)."""
        if self.auto_groups:
            return infer_groups(model, layers, flags)
        if len(layers) != len(self.groups):
            raise ValueError(
                f"these rules were calibrated with explicit groups for {len(self.groups)} layers; "
                f"got {len(layers)} layers (use the same layers, or with_groups(...))")
        return list(self.groups)

    def with_groups(self, groups: Sequence[str]) -> "CalibratedRules":
        """A copy that maps layers to ``groups`` by position."""
        return replace(self, groups=list(groups), auto_groups=False)

    def check_model(self, model: nn.Module) -> None:
        """Raise a ``ValueError`` if ``model`` does not have the module types the rules were calibrated on."""
        _schema.check_model(self.model, self.candidates, model)

    def plan(self, model: Optional[nn.Module], layers: Sequence[nn.Module],
             flags: Sequence[bool]) -> List[Tuple[RuleSet, List[int]]]:
        """``(rule set, layer indices)`` per distinct chosen rule set, in first-use order."""
        if model is not None:
            self.check_model(model)
        by_name: Dict[str, List[int]] = {}
        for index, group in enumerate(self.groups_for(model, layers, flags)):
            self.rules_for(group)  # validates the group
            by_name.setdefault(self.choices[group], []).append(index)
        return [(explicit_ruleset(self.candidates[name]), idx) for name, idx in by_name.items()]

    def summary(self) -> str:
        """The choice per group with its evidence, then the agreement of every candidate.

        With a noise-aware calibration: per group the decision, the margin of the choice
        over the default and its interval; per candidate the agreement and its interval.
        ``*`` marks the choice.
        """
        return _format_summary(self)

    def to_json(self) -> str:
        """JSON text (versioned; candidate rule sets by rule class name and parameters)."""
        data = {"version": _schema.FORMAT_VERSION,
                "candidates": {n: _schema.ruleset_to_dict(r) for n, r in self.candidates.items()},
                "choices": self.choices, "agreement": self.agreement, "groups": self.groups,
                "auto_groups": self.auto_groups, "score": self.score, "n_examples": self.n_examples,
                "info": self.info, "default": self.default, "confidence": self.confidence,
                "n_bootstrap": self.n_bootstrap, "selection": self.selection, "model": self.model}
        return json.dumps(data, indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, model: Optional[nn.Module] = None) -> "CalibratedRules":
        """Inverse of :meth:`to_json`; every field is validated (a ``ValueError`` names a bad one).

        Args:
            text: the JSON text.
            model: when given, the rules must match its modules (:meth:`check_model`).
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"calibrated rules: not valid JSON: {error}") from error
        cal = cls(**_schema.validate(data, SCORES))
        if model is not None:
            cal.check_model(model)
        return cal

    def save(self, path: Union[str, Path]) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: Union[str, Path], model: Optional[nn.Module] = None) -> "CalibratedRules":
        """Read a file written by :meth:`save` (validated; checked against ``model`` when given)."""
        try:
            return cls.from_json(Path(path).read_text(), model=model)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error


def _format_summary(cal: CalibratedRules) -> str:
    names = list(cal.candidates)
    lines = [f"{cal.score} agreement with AP on {cal.n_examples} calibration pairs"]
    if cal.selection:
        lines[0] += (f"; default {cal.default!r}, kept unless a candidate beats it beyond the noise "
                     f"({cal.n_bootstrap} bootstrap resamples of the pairs, {cal.confidence:.0%} intervals)")
        for group, sel in cal.selection.items():
            lines.append(f"  {group}: {sel['choice']} ({sel['decision']}): {sel['note']}")
    width = max(11, 2 + max(len(n) for n in names))
    lines.append(f"{'group':<14}" + "".join(f"{n:>{width}}" for n in names))
    for group, row in cal.agreement.items():
        cells = [_cell(row.get(n)) + ("*" if cal.choices[group] == n else " ") for n in names]
        lines.append(f"{group:<14}" + "".join(f"{c:>{width}}" for c in cells))
        intervals = cal.selection.get(group, {}).get("interval")
        if intervals:
            cells = ["[" + ",".join(f"{v:.2f}" for v in intervals[n]) + "] " if intervals.get(n) else "n/a "
                     for n in names]
            lines.append(f"{'  interval':<14}" + "".join(f"{c:>{width}}" for c in cells))
    if cal.info.get("cost"):
        lines.append(f"cost: {cal.info['cost']}")
    return "\n".join(lines)


def _cell(value: Optional[float]) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
