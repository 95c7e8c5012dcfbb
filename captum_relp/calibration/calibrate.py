"""Running the calibration: exact patching once, RelP per candidate, the best candidate per group."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .calibrated_rules import (
    SCORES,
    CalibratedRules,
    agreement,
    default_candidates,
    explicit_ruleset,
    infer_groups,
)
from ..models import model_components
from ..rules import RuleSet


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
    from ..attr import LayerActivationPatching, LayerRelevancePatching  # attr imports this package

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
    from ..tasks.ioi import encode_ioi, generate_ioi_pairs

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


__all__ = ["calibrate_rules", "calibrated_ioi_rules"]
