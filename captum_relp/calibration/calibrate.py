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

import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .._forward import call_model, split_forward_args
from ..metrics import MetricEvaluator
from ..models import model_components
from ..rules import RuleSet
from ..rules.switch import SwitchUnsupported
from ._schema import model_signature
from ._scores import CandidateScores
from ._select import GroupData, group_data, select
from .calibrated_rules import (
    SCORES,
    CalibratedRules,
    agreement,
    default_candidates,
    explicit_ruleset,
    infer_groups,
)


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
    default: Optional[str] = None,
    confidence: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> CalibratedRules:
    r"""Choose, per group of layers, the rule set whose RelP scores agree best with AP.

    Runs exact activation patching (:class:`~captum_relp.LayerActivationPatching`,
    one run per position) on the calibration pairs, then scores every candidate rule set
    with :class:`~captum_relp.LayerRelevancePatching` on one shared pair of forward passes
    (``LayerRelevancePatching.attribute_rule_sets``). Scores are
    summed over the hidden dimension (one value per example and position), and the
    agreement of a group is computed over all its layers, examples and positions
    (entries where AP and every candidate are exactly zero, i.e. padding, are dropped).

    The choice accounts for noise (a paired bootstrap over the calibration pairs, see
    :doc:`/calibration`): per group the ``default`` (by default the
    best fixed preset: whichever of the gradient, i.e. AtP, ``relp`` and ``relp-ah`` agrees
    best with AP on the calibration pairs) is kept unless a candidate's margin over it is
    above zero over its whole bootstrap interval (Bonferroni-corrected over the candidates);
    among those that pass, the highest agreement wins. When a candidate looks better but not
    beyond the noise, the default is kept with a warning. The intervals, margins and decisions are in
    :meth:`CalibratedRules.summary` and in the saved file.

    Raises a ``ValueError`` when the corruption has no effect (clean == corrupt, or AP
    zero everywhere); a group whose AP is zero everywhere keeps the default with a warning
    (its agreements are ``None``, never NaN).

    Cost: AP once, then one clean and one corrupt forward pass shared by every candidate and one
    backward pass per candidate (one full RelP call each for rule sets that cannot share the
    forward pass, e.g. rules from outside the package): up to 16 candidates for a transformer
    with norms, activations, gated MLPs and the AH-rule (:func:`default_candidates`).

    Args:
        forward_func (Callable or nn.Module): the model (Hugging Face: ``.logits``).
        layers (list of nn.Module): the layers to calibrate.
        inputs, baselines: clean and corrupt inputs of equal shape.
        model (nn.Module, optional): the root module when ``forward_func`` is a function.
        metric, target, additional_forward_args, attribute_to_layer_input: as in
            ``LayerRelevancePatching.attribute``.
        groups (list of str, optional): one group label per layer. Default:
            ``resid``/``attn``/``mlp`` for :func:`~captum_relp.model_components` layers,
            else the layer's class name.
        candidates (list of RuleSet, optional): default :func:`default_candidates`.
        score (str): ``"pearson"`` (default), ``"spearman"`` or ``"topk"``.
        default (str, optional): the candidate kept unless another beats it beyond the
            noise, in every group (e.g. ``"gradient"``), or ``"best-preset"``: per group,
            whichever of the fixed presets ``gradient``, ``relp`` and ``relp-ah`` (those among
            the candidates) agrees best on the calibration pairs. Default: ``"best-preset"``
            when a preset is among the candidates, else the first candidate.
        confidence (float): level of the reported intervals (default 0.95).
        n_bootstrap (int): bootstrap resamples of the calibration pairs (default 1000).
        seed (int): seed of the resampling.

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


    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if candidates is not None and default not in (None, BEST_PRESET) and default not in [c.name for c in candidates]:
        raise ValueError(f"default {default!r} is not one of the candidates {[c.name for c in candidates]}")
    scores = score_candidates(forward_func, layers, inputs, baselines, model=model, metric=metric, target=target,
                              additional_forward_args=additional_forward_args, attribute_to_layer_input=attribute_to_layer_input,
                              groups=groups, candidates=candidates)
    return _choose(scores, score, default, confidence, n_bootstrap, seed)


def score_candidates(
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
) -> CandidateScores:
    """Run AP once and RelP once per candidate on the calibration pairs (arguments as in :func:`calibrate_rules`).

    Raises a ``ValueError`` when the corruption has no effect (clean == corrupt, or AP zero
    up to rounding everywhere).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
        >>> x, x_corrupt = torch.randn(6, 3, 4), torch.randn(6, 3, 4)
        >>> scores = score_candidates(net, [net[0]], x, x_corrupt, metric=lambda out: out[:, -1, 0])
        >>> [c.name for c in scores.candidates], scores.rows([0, 1]).n_examples
        (['gradient', 'relp'], 2)
    """
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
    _check_effect(inputs, baselines)
    from ..attr import LayerActivationPatching  # attr imports this package

    kwargs = dict(baselines=baselines, target=target, additional_forward_args=additional_forward_args,
                  attribute_to_layer_input=flags, metric=metric)
    began = time.perf_counter()
    reference = LayerActivationPatching(forward_func, layers, model=model).attribute(inputs, **kwargs)
    ap_seconds = time.perf_counter() - began
    tolerance = _effect_tolerance(forward_func, inputs, additional_forward_args, target, metric, model)
    if not any(bool((r.abs() > tolerance).any()) for r in reference):
        raise ValueError(f"activation patching is zero (|effect| <= {tolerance:.1e}, rounding) for every "
                         "calibrated layer and position: the corruption has no effect on the metric, so no "
                         "rule set can be calibrated on these pairs")
    from ..attr import LayerRelevancePatching  # attr imports this package
    began = time.perf_counter()
    relp = LayerRelevancePatching(forward_func, layers, model=model)
    try:  # one clean and one corrupt forward pass, then one backward pass per candidate
        shared = relp.attribute_rule_sets(inputs, rule_sets=[explicit_ruleset(c) for c in candidates],
                                          reduce="sum", **kwargs)
        per_candidate = {name: [_per_position(s) for s in scores] for name, scores in shared.items()}
        scoring = "shared"
    except SwitchUnsupported as error:  # e.g. a rule from outside the package: one pass per candidate
        per_candidate = {}
        for candidate in candidates:
            relp = LayerRelevancePatching(forward_func, layers, rules=explicit_ruleset(candidate), model=model)
            per_candidate[candidate.name] = [_per_position(s) for s in relp.attribute(inputs, **kwargs)]
        scoring = f"one pass per candidate ({error})"
    cost = {"scoring": scoring, "ap_seconds": ap_seconds, "candidates_seconds": time.perf_counter() - began}
    return CandidateScores(candidates, list(groups), auto_groups, group_data(reference, per_candidate, groups),
                           tolerance, model_signature(root), cost)


def choose_rules(scores: CandidateScores, score: str = "pearson", default: Optional[str] = None,
                 confidence: float = 0.95, n_bootstrap: int = 1000, seed: int = 0) -> CalibratedRules:
    """Choose the rules from :func:`score_candidates` output (the selection step of :func:`calibrate_rules`).

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
        >>> x, x_corrupt = torch.randn(6, 3, 4), torch.randn(6, 3, 4)
        >>> scores = score_candidates(net, [net[0]], x, x_corrupt, metric=lambda out: out[:, -1, 0])
        >>> choose_rules(scores, n_bootstrap=100).n_examples
        6
    """
    return _choose(scores, score, default, confidence, n_bootstrap, seed)


def _choose(scores: CandidateScores, score: str, default: Optional[str], confidence: float, n_bootstrap: int,
            seed: int) -> CalibratedRules:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    names = [c.name for c in scores.candidates]
    if default is None:
        default = BEST_PRESET if any(n in names for n in PRESETS) else names[0]
    if default == BEST_PRESET:
        presets = [n for n in PRESETS if n in names]
        if not presets:
            raise ValueError(f"default {BEST_PRESET!r} needs one of the presets {PRESETS} among the candidates {names}")
        kept = {group: _best_preset(data, presets, score) for group, data in scores.data.items()}
    elif default not in names:
        raise ValueError(f"default {default!r} is not one of the candidates {names}")
    else:
        kept = {group: default for group in scores.data}
    selection = {group: select(data, kept[group], score, confidence, n_bootstrap, seed, group, scores.tolerance)
                 for group, data in scores.data.items()}
    for sel in selection.values():
        if sel.decision in ("undecided", "no-effect"):
            warnings.warn(sel.note, CalibrationWarning, stacklevel=3)
    choices = {g: sel.choice for g, sel in selection.items()}
    info = {"relp_passes_per_batch": len(set(choices.values())), "candidates_run": len(names),
            "cost": _cost_text(scores.cost, len(names))}
    info.update({k: v for k, v in scores.cost.items() if k != "scoring"})
    return CalibratedRules({c.name: c for c in scores.candidates}, choices,
                           {g: sel.agreement for g, sel in selection.items()}, list(scores.groups),
                           scores.auto_groups, score, scores.n_examples, info, default=default,
                           confidence=confidence, n_bootstrap=n_bootstrap,
                           selection={g: s.to_dict() for g, s in selection.items()}, model=scores.model)


def _cost_text(cost: Dict[str, Any], n_candidates: int) -> str:
    """The cost line of :meth:`CalibratedRules.summary`."""
    if cost.get("scoring", "shared") == "shared":
        how = (f"activation patching once, then one clean and one corrupt forward pass and one backward "
               f"pass per candidate ({n_candidates})")
    else:
        how = f"activation patching once, then {cost['scoring']}: 2 forward + 1 backward each ({n_candidates})"
    if "ap_seconds" in cost and cost["ap_seconds"] > 0:
        how += (f"; {cost['ap_seconds']:.2f} s for AP, {cost['candidates_seconds']:.2f} s for the candidates "
                f"({cost['candidates_seconds'] / cost['ap_seconds']:.2f} x AP)")
    return how


BEST_PRESET = "best-preset"
"""``default=`` value: per group, the fixed preset that agrees best on the calibration pairs."""
PRESETS = ("gradient", "relp", "relp-ah")
"""The fixed presets ``default="best-preset"`` chooses from (AtP's gradient and the two RelP presets)."""


def _best_preset(data: GroupData, presets: List[str], score: str) -> str:
    """The preset with the highest agreement on all calibration pairs (the first on ties or no value)."""
    values = [agreement(data.scores[n][data.mask], data.reference[data.mask], score) if bool(data.mask.any())
              else float("nan") for n in presets]
    finite = [(v, -i) for i, v in enumerate(values) if v == v]
    return presets[-max(finite)[1]] if finite else presets[0]


class CalibrationWarning(UserWarning):
    """The calibration data could not decide a group's rule set (the default was kept)."""


def _effect_tolerance(forward_func: Callable, inputs: Any, additional_forward_args: Any, target: Any,
                      metric: Any, model: Optional[nn.Module]) -> float:
    """The size below which an AP effect is rounding: 100 ulps of the largest clean metric value."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    args, kw = split_forward_args(forward_func, additional_forward_args, model)
    with torch.no_grad():
        output = call_model(forward_func, inputs, args, kw)
    values = MetricEvaluator(inputs[0].shape[0], target, metric)(output, kw.get("attention_mask"))
    eps = torch.finfo(output.dtype).eps if output.is_floating_point() else torch.finfo(torch.float32).eps
    return 100 * eps * max(float(values.abs().max()), 1e-30)


def _check_effect(inputs: Any, baselines: Any) -> None:
    """No pairs, or clean == corrupt everywhere: nothing to calibrate on (raise before running AP)."""
    first = inputs[0] if isinstance(inputs, tuple) and inputs else inputs
    if isinstance(first, Tensor) and (first.dim() == 0 or first.shape[0] == 0):
        raise ValueError(f"inputs: no calibration pairs (shape {tuple(first.shape)})")
    pairs = zip(inputs, baselines) if isinstance(inputs, tuple) else [(inputs, baselines)]
    if isinstance(inputs, tuple) and not isinstance(baselines, tuple):
        return
    if all(isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
           for a, b in pairs):
        raise ValueError("the clean inputs equal the corrupt baselines: there is no effect to calibrate on")


def _per_position(scores: Tensor) -> Tensor:
    return scores.reshape(scores.shape[0], scores.shape[1], -1).sum(-1) if scores.dim() > 2 else scores


def calibrate_on_batch(model: nn.Module, batch: Any, kinds: Sequence[str] = ("resid", "attn", "mlp"),
                       **options: Any) -> CalibratedRules:
    """Calibrate the rules of ``model`` per component kind on a task batch (``IOIBatch``, ``SVABatch``).

    Args:
        model: a Hugging Face causal LM.
        batch: clean/corrupt ids, ``attention_mask`` and ``metric()`` of the calibration pairs.
        kinds: component kinds calibrated.
        **options: ``candidates``, ``score``, ``default``, ``confidence``, ``n_bootstrap``, ``seed``
            as in :func:`calibrate_rules`.

    Returns:
        CalibratedRules

    Example:
        >>> from captum_relp.embedded import load_embedded
        >>> from captum_relp.tasks.ioi import encode_ioi, generate_ioi_pairs
        >>> model, tok = load_embedded("tiny-gpt2-ioi")
        >>> batch = encode_ioi(generate_ioi_pairs(3, seed=5, tokenizer=tok), tok)
        >>> sorted(calibrate_on_batch(model, batch, kinds=("mlp",), n_bootstrap=50).choices)
        ['mlp']
    """
    device = next(model.parameters()).device
    layers, flags, _ = model_components(model).select(kinds)
    return calibrate_rules(model, layers, batch.clean_ids.to(device), batch.corrupt_ids.to(device),
                           metric=batch.to(device).metric(),
                           additional_forward_args={"attention_mask": batch.attention_mask.to(device)},
                           attribute_to_layer_input=flags, **options)


def calibrated_ioi_rules(
    model: nn.Module,
    tokenizer: Any,
    n_prompts: int = 20,
    seed: int = 0,
    exclude: Sequence[Any] = (),
    kinds: Sequence[str] = ("resid", "attn", "mlp"),
    candidates: Optional[Sequence[RuleSet]] = None,
    score: str = "pearson",
    names: Optional[Sequence[str]] = None,
    default: Optional[str] = None,
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
        candidates, score, default: as in :func:`calibrate_rules`.
        names: the names of the prompts (default: the generator's).

    Returns:
        CalibratedRules (``info["calibration_prompts"]`` lists the clean prompts used,
        ``info["calibration_pairs"]`` the clean and corrupt prompts)

    Examples::

        >>> from captum_relp.embedded import load_embedded
        >>> model, tok = load_embedded("tiny-gpt2-ioi")
        >>> cal = calibrated_ioi_rules(model, tok, n_prompts=2)
        >>> sorted(cal.choices)
        ['attn', 'mlp', 'resid']
    """
    from ..tasks.ioi import encode_ioi, generate_ioi_pairs

    avoid = {getattr(p, "clean_prompt", p) for p in exclude}
    pool = generate_ioi_pairs(n_prompts + len(avoid), seed=seed + 1, tokenizer=tokenizer, names=names)
    pairs = [p for p in pool if p.clean_prompt not in avoid][:n_prompts]
    cal = calibrate_on_batch(model, encode_ioi(pairs, tokenizer), kinds, candidates=candidates, score=score,
                             default=default)
    cal.info["calibration_prompts"] = [p.clean_prompt for p in pairs]
    cal.info["calibration_pairs"] = [{"clean": p.clean_prompt, "corrupt": p.corrupt_prompt} for p in pairs]
    return cal


__all__ = ["calibrate_rules", "calibrated_ioi_rules", "calibrate_on_batch", "score_candidates", "choose_rules",
           "CandidateScores", "CalibrationWarning"]
