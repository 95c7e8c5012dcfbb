"""Calibrated rules: choose the LRP rule set per component type from exact patching runs.

Which LRP rules make RelP agree best with activation patching (AP) depends on the
model and the task: the LN-rule may help on the residual stream and hurt on
attention outputs. :func:`calibrate_rules` runs exact AP once on a few calibration
pairs, runs RelP with every candidate :class:`~captum_relp.RuleSet`, and keeps, per
group of layers (``resid``/``attn``/``mlp`` by default), the candidate whose scores
agree best with AP. The result, :class:`CalibratedRules`, is saved as JSON and is
accepted as ``rules=`` by :class:`~captum_relp.LayerRelevancePatching`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import rules as _rules_module
from .models import model_components
from .registry import RuleSet, registered_rules
from .rules import AHRule, EpsilonRule, PassRule, Rule

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
    """``ruleset`` with the plain gradient (``PassRule``) made explicit for disabled categories.

    A candidate such as "LN only" deliberately leaves activations to the gradient;
    making that explicit keeps strict coverage checks from rejecting it.

    Examples::

        >>> rs = explicit_ruleset(RuleSet("ln", categories=("norm",)))
        >>> rs.overrides["torch.nn.modules.activation.GELU"]
        PassRule()
    """
    overrides = {
        key: PassRule() for key, (category, _) in registered_rules().items()
        if category in _RULE_CATEGORIES and category not in ruleset.categories
    }
    overrides.update(ruleset.overrides)
    return replace(ruleset, overrides=overrides)


def infer_groups(model: Optional[nn.Module], layers: Sequence[nn.Module], flags: Sequence[bool]) -> List[str]:
    """One group label per layer: ``resid``/``attn``/``mlp`` for the layers of
    :func:`~captum_relp.model_components`, else the layer's class name (``+":input"``
    when its input is attributed).

    Examples::

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

        >>> round(agreement(torch.tensor([1., 2., 3.]), torch.tensor([1., 2., 4.])), 3)
        0.982
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


def calibrate_rules(
    forward_func: Callable,
    layers: Sequence[nn.Module],
    inputs: Union[Tensor, Tuple[Tensor, ...]],
    baselines: Union[Tensor, Tuple[Tensor, ...]],
    *,
    model: Optional[nn.Module] = None,
    metric: Optional[Callable[[Tensor], Tensor]] = None,
    target: Any = None,
    additional_forward_args: Any = None,
    attribute_to_layer_input: Union[bool, Sequence[bool]] = False,
    groups: Optional[Sequence[str]] = None,
    candidates: Optional[Sequence[RuleSet]] = None,
    score: str = "pearson",
) -> CalibratedRules:
    r"""Choose, per group of layers, the rule set whose RelP scores agree best with AP.

    Runs exact activation patching (:class:`~captum_relp.LayerActivationPatching`,
    one run per position) on the calibration pairs and one
    :class:`~captum_relp.LayerRelevancePatching` pass per candidate. Scores are
    summed over the hidden dimension (one value per example and position), and the
    agreement of a group is computed over all its layers, examples and positions
    (entries where AP and RelP are both exactly zero, i.e. padding, are dropped).
    Ties go to the earlier candidate. Evaluate the choice on held-out pairs: a small
    calibration set can overfit.

    Args:
        forward_func (Callable or nn.Module): the model (Hugging Face: ``.logits``).
        layers (list of nn.Module): the layers to calibrate.
        inputs, baselines: clean and corrupt inputs of equal shape.
        model (nn.Module, optional): the root module when ``forward_func`` is a function.
        metric, target, additional_forward_args, attribute_to_layer_input: as in
            :meth:`~captum_relp.LayerRelevancePatching.attribute`.
        groups (list of str, optional): one group label per layer. Default:
            ``resid``/``attn``/``mlp`` for :func:`~captum_relp.model_components` layers,
            else the layer's class name.
        candidates (list of RuleSet, optional): default :func:`default_candidates`.
        score (str): ``"pearson"`` (default), ``"spearman"`` or ``"topk"``.

    Returns:
        CalibratedRules

    Examples::

        >>> import torch
        >>> from captum_relp import calibrate_rules, LayerRelevancePatching
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8),
        ...                           torch.nn.GELU(), torch.nn.Linear(8, 2))
        >>> x, x_corrupt = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
        >>> metric = lambda out: out[:, -1, 0]
        >>> cal = calibrate_rules(net, [net[0], net[2]], x, x_corrupt, metric=metric)
        >>> sorted(cal.choices)
        ['GELU', 'Linear']
        >>> LayerRelevancePatching(net, [net[0], net[2]], rules=cal).attribute(
        ...     x, baselines=x_corrupt, metric=metric)[0].shape
        torch.Size([2, 3, 8])
    """
    from .attr import LayerActivationPatching, LayerRelevancePatching  # the attr package imports us

    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    layers = list(layers)
    flags = ([bool(attribute_to_layer_input)] * len(layers) if isinstance(attribute_to_layer_input, bool)
             else [bool(f) for f in attribute_to_layer_input])
    if len(flags) != len(layers):
        raise ValueError(f"attribute_to_layer_input has {len(flags)} flags for {len(layers)} layers")
    root = model if model is not None else (forward_func if isinstance(forward_func, nn.Module) else None)
    auto_groups = groups is None
    groups = infer_groups(root, layers, flags) if groups is None else [str(g) for g in groups]
    if len(groups) != len(layers):
        raise ValueError(f"groups has {len(groups)} labels but there are {len(layers)} layers")
    candidates = list(default_candidates(root) if candidates is None else candidates)
    names = [c.name for c in candidates]
    if not candidates or len(set(names)) != len(names):
        raise ValueError(f"candidates must be a non-empty list of RuleSets with distinct names, got {names}")

    kwargs = dict(baselines=baselines, target=target, additional_forward_args=additional_forward_args,
                  attribute_to_layer_input=flags, metric=metric)
    reference = LayerActivationPatching(forward_func, layers, model=model).attribute(inputs, **kwargs)
    per_candidate = {}
    for candidate in candidates:
        relp = LayerRelevancePatching(forward_func, layers, rules=explicit_ruleset(candidate), model=model)
        per_candidate[candidate.name] = [_per_position(s) for s in relp.attribute(inputs, **kwargs)]

    table: Dict[str, Dict[str, float]] = {}
    choices: Dict[str, str] = {}
    for group in dict.fromkeys(groups):
        idx = [i for i, g in enumerate(groups) if g == group]
        ap = torch.cat([reference[i].flatten().float() for i in idx])
        row = {}
        for name, scores in per_candidate.items():
            values = torch.cat([scores[i].flatten().float() for i in idx])
            keep = (values != 0) | (ap != 0)
            row[name] = agreement(values[keep], ap[keep], score)
        table[group] = row
        choices[group] = max(names, key=lambda n: -math.inf if math.isnan(row[n]) else row[n])
    n_examples = int((inputs[0] if isinstance(inputs, tuple) else inputs).shape[0])
    info = {"relp_passes_per_batch": len({choices[g] for g in choices}), "candidates_run": len(candidates)}
    return CalibratedRules({c.name: c for c in candidates}, choices, table, list(groups), auto_groups,
                           score, n_examples, info)


def _per_position(scores: Tensor) -> Tensor:
    return scores.reshape(scores.shape[0], scores.shape[1], -1).sum(-1) if scores.dim() > 2 else scores


def calibrated_ioi_rules(
    model: nn.Module,
    tokenizer: Any,
    n_prompts: int = 20,
    seed: int = 0,
    exclude: Sequence[Any] = (),
    kinds: Sequence[str] = ("resid", "attn", "mlp"),
    candidates: Optional[Sequence[RuleSet]] = None,
    score: str = "pearson",
) -> CalibratedRules:
    """Calibrate rules on ``n_prompts`` IOI pairs disjoint from ``exclude`` (the evaluated pairs).

    Pairs are drawn with ``generate_ioi_pairs(..., seed=seed + 1)``; any pair whose
    clean prompt occurs in ``exclude`` is skipped.

    Args:
        model: a Hugging Face causal LM; tokenizer: its tokenizer.
        n_prompts: number of calibration pairs.
        seed: the evaluation seed (calibration uses ``seed + 1``).
        exclude: :class:`~captum_relp.tasks.ioi.IOIPair` objects (or clean prompts) to avoid.
        kinds: component kinds calibrated.
        candidates, score: as in :func:`calibrate_rules`.

    Returns:
        CalibratedRules (``info["calibration_prompts"]`` lists the clean prompts used)

    Examples::

        >>> from captum_relp.embedded import load_embedded
        >>> model, tok = load_embedded("tiny-gpt2-ioi")
        >>> cal = calibrated_ioi_rules(model, tok, n_prompts=2)
        >>> sorted(cal.choices)
        ['attn', 'mlp', 'resid']
    """
    from .tasks.ioi import encode_ioi, generate_ioi_pairs

    avoid = {getattr(p, "clean_prompt", p) for p in exclude}
    pool = generate_ioi_pairs(n_prompts + len(avoid), seed=seed + 1, tokenizer=tokenizer)
    pairs = [p for p in pool if p.clean_prompt not in avoid][:n_prompts]
    device = next(model.parameters()).device
    batch = encode_ioi(pairs, tokenizer, device=device)
    layers, flags, _ = model_components(model).select(kinds)
    cal = calibrate_rules(model, layers, batch.clean_ids, batch.corrupt_ids, metric=batch.metric(),
                          additional_forward_args={"attention_mask": batch.attention_mask},
                          attribute_to_layer_input=flags, candidates=candidates, score=score)
    cal.info["calibration_prompts"] = [p.clean_prompt for p in pairs]
    return cal


__all__ = ["CalibratedRules", "calibrate_rules", "calibrated_ioi_rules", "default_candidates",
           "explicit_ruleset", "infer_groups", "agreement", "SCORES"]
