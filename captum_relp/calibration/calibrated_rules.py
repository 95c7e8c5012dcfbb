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

from torch import Tensor, nn

from .. import rules as _rules_module
from ..models import model_components
from ..rules import AHRule, EpsilonRule, Rule, RuleSet, ZeroRule, registered_rules

SCORES = ("pearson", "spearman", "topk")
TOPK_FRACTION = 0.1
_RULE_CATEGORIES = ("norm", "activation", "gate", "custom")


def default_candidates(model: Optional[nn.Module] = None, epsilon: float = 0.1) -> List[RuleSet]:
    """The default candidate rule sets of :func:`calibrate_rules`.

    ``gradient`` (no rules: attribution patching), ``ln`` (LN-rule only), ``identity``
    (Identity-rule only), ``relp`` (the paper preset: LN + Identity, Half-rule on gated
    MLPs), ``relp-ah`` (plus the AH-rule; only for Hugging Face models) and ``relp-eps``
    (the preset plus LRP-epsilon on every linear layer).

    Args:
        model (nn.Module, optional): the model; the AH candidate needs a Hugging Face config.
        epsilon (float): the stabiliser of the ``relp-eps`` candidate.

    Returns:
        list of RuleSet

    Examples::

        >>> [c.name for c in default_candidates()]
        ['relp', 'gradient', 'ln', 'identity', 'relp-eps']
    """
    candidates = [
        RuleSet("relp"),
        RuleSet("gradient", categories=()),
        RuleSet("ln", categories=("norm",)),
        RuleSet("identity", categories=("activation",)),
    ]
    if model is not None and hasattr(getattr(model, "config", None), "_attn_implementation"):
        candidates.append(RuleSet("relp-ah", attention=AHRule()))
    candidates.append(RuleSet("relp-eps", linear=EpsilonRule(epsilon)))
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


def agreement(scores: Tensor, reference: Tensor, score: str = "pearson") -> float:
    """Agreement of ``scores`` with ``reference`` (same shape; flattened).

    ``pearson`` and ``spearman`` correlations (NaN if a side is constant) or ``topk``:
    the overlap of the top 10% entries by magnitude (at least one).

    Examples::

        >>> import torch
        >>> round(agreement(torch.tensor([1., 2., 3.]), torch.tensor([1., 2., 4.])), 3)
        0.982
        >>> import torch
        >>> round(agreement(torch.tensor([1., 2., 3.]), torch.tensor([1., 2., 4.]), "spearman"), 3)
        1.0
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    x, y = scores.detach().double().flatten().cpu(), reference.detach().double().flatten().cpu()
    if score == "topk":
        k = max(1, math.ceil(TOPK_FRACTION * x.numel()))
        top_x = set(x.abs().topk(k).indices.tolist())
        return len(top_x & set(y.abs().topk(k).indices.tolist())) / k
    if score == "spearman":
        x, y = x.argsort().argsort().double(), y.argsort().argsort().double()
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
        agreement: ``{group: {candidate name: score}}`` on the calibration pairs.
        groups: the group of every calibrated layer.
        auto_groups: groups were inferred (:func:`infer_groups`), not given.
        score: ``pearson``, ``spearman`` or ``topk``.
        n_examples: number of calibration pairs.

    Examples::

        >>> cal = CalibratedRules({"relp": RuleSet("relp")}, {"mlp": "relp"}, {"mlp": {"relp": 0.9}},
        ...                       ["mlp"], auto_groups=True)
        >>> CalibratedRules.from_json(cal.to_json()).choices
        {'mlp': 'relp'}
    """

    candidates: Dict[str, RuleSet]
    choices: Dict[str, str]
    agreement: Dict[str, Dict[str, float]]
    groups: List[str]
    auto_groups: bool = True
    score: str = "pearson"
    n_examples: int = 0
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        """Always False: the chosen rule sets make every category explicit (:func:`explicit_ruleset`)."""
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

    def plan(self, model: Optional[nn.Module], layers: Sequence[nn.Module],
             flags: Sequence[bool]) -> List[Tuple[RuleSet, List[int]]]:
        """``(rule set, layer indices)`` per distinct chosen rule set, in first-use order."""
        by_name: Dict[str, List[int]] = {}
        for index, group in enumerate(self.groups_for(model, layers, flags)):
            self.rules_for(group)  # validates the group
            by_name.setdefault(self.choices[group], []).append(index)
        return [(explicit_ruleset(self.candidates[name]), idx) for name, idx in by_name.items()]

    def summary(self) -> str:
        """A table of the agreement of every candidate per group; ``*`` marks the choice."""
        names = list(self.candidates)
        lines = [f"{self.score} agreement with AP on {self.n_examples} calibration pairs",
                 f"{'group':<14}" + "".join(f"{n:>11}" for n in names)]
        for group, row in self.agreement.items():
            cells = [f"{row.get(n, float('nan')):.3f}" + ("*" if self.choices[group] == n else " ")
                     for n in names]
            lines.append(f"{group:<14}" + "".join(f"{c:>11}" for c in cells))
        return "\n".join(lines)

    def to_json(self) -> str:
        """JSON text (candidate rule sets by rule class name and parameters)."""
        data = {"candidates": {n: _ruleset_to_dict(r) for n, r in self.candidates.items()},
                "choices": self.choices, "agreement": self.agreement, "groups": self.groups,
                "auto_groups": self.auto_groups, "score": self.score, "n_examples": self.n_examples,
                "info": self.info}
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CalibratedRules":
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        data["candidates"] = {n: _ruleset_from_dict(d) for n, d in data["candidates"].items()}
        return cls(**data)

    def save(self, path: Union[str, Path]) -> None:
        """Write :meth:`to_json` to ``path``."""
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: Union[str, Path]) -> "CalibratedRules":
        """Read a file written by :meth:`save`."""
        return cls.from_json(Path(path).read_text())


def _rule_to_dict(rule: Optional[Rule]) -> Optional[Dict[str, Any]]:
    if rule is None:
        return None
    name = type(rule).__name__
    if getattr(_rules_module, name, None) is not type(rule):
        raise ValueError(f"cannot save {rule!r}: only the rules of captum_relp.rules are serialisable")
    return {"type": name, "params": dict(vars(rule))}


def _rule_from_dict(data: Optional[Dict[str, Any]]) -> Optional[Rule]:
    if data is None:
        return None
    cls = getattr(_rules_module, data["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, Rule)):
        raise ValueError(f"unknown rule type {data['type']!r}")
    rule = cls.__new__(cls)
    rule.__dict__.update(data["params"])
    return rule


def _ruleset_to_dict(ruleset: RuleSet) -> Dict[str, Any]:
    return {"name": ruleset.name, "categories": list(ruleset.categories),
            "attention": _rule_to_dict(ruleset.attention), "linear": _rule_to_dict(ruleset.linear),
            "overrides": {k: _rule_to_dict(r) for k, r in ruleset.overrides.items()}}


def _ruleset_from_dict(data: Dict[str, Any]) -> RuleSet:
    return RuleSet(data["name"], tuple(data["categories"]), _rule_from_dict(data["attention"]),
                   _rule_from_dict(data["linear"]),
                   {k: _rule_from_dict(r) for k, r in data["overrides"].items()})


