"""Node effects with RelP, AtP or IG, and the cost of computing them."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict

from torch import Tensor

from ..attr import PassCounter, get_method
from .nodes import NodeSpace


@dataclass
class EffectRun:
    """Per-example node effects ``{group: (B, T, units)}`` and what they cost.

    Passes are counted in units of the batch: a forward over ``k * B`` rows (IG's
    interpolation batch) counts as ``k`` forward passes.
    """

    effects: Dict[str, Tensor]
    seconds: float
    forward_passes: int
    backward_passes: int


def node_effects(
    space: NodeSpace,
    method: str,
    clean: Tensor,
    corrupt: Tensor,
    metric,
    attention_mask: Tensor = None,
    n_steps: int = 10,
    rules=None,
) -> EffectRun:
    """Score every node of ``space`` by patching ``corrupt`` into ``clean`` with ``method``.

    ``method`` is a name of :data:`captum_relp.attr.METHODS` other than ``AP``
    (``RelP``, ``RelP+AH``, ``AtP``, ``IG``; case-insensitive).

    ``rules`` (RelP only): a :class:`~captum_relp.CalibratedRules` calibrated per component kind;
    each node group gets the rule set chosen for its kind (``attn``, ``mlp``, ``resid``).

    Sign as in :class:`~captum_relp.LayerRelevancePatching`: positive = patching the
    node lowers the metric. Groups with one node per position are summed over the
    hidden dimension.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.metrics import logit_diff
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20)).eval()
        >>> space = NodeSpace(model, "neurons")
        >>> run = node_effects(space, "RelP", torch.ones(1, 3, dtype=torch.long),
        ...                    torch.zeros(1, 3, dtype=torch.long), logit_diff(1, 2))
        >>> run.effects["mlp_0.neurons"].shape, run.forward_passes, run.backward_passes
        (torch.Size([1, 3, 64]), 2, 1)
    """
    runner = get_method(method)
    if runner.name == "AP":
        raise ValueError("node_effects scores nodes with one backward pass: use RelP, RelP+AH, AtP or IG")
    extra = {"attention_mask": attention_mask} if attention_mask is not None else None
    began = time.perf_counter()
    with PassCounter(space.model) as counter, space.active():
        layers, flags = space.layers_and_flags()
        kwargs = dict(baselines=corrupt, metric=metric, additional_forward_args=extra,
                      attribute_to_layer_input=flags)
        if rules is None:
            scores = runner.attribute(space.model, layers, clean, n_steps=n_steps, **kwargs)
        elif runner.name != "RelP":
            raise ValueError(f"calibrated rules apply to RelP, not {runner.name}")
        else:
            by_kind = rules.with_groups([group.kind for group in space.groups])
            scores = runner.build(space.model, layers, rules=by_kind).attribute(clean, **kwargs)
    seconds = time.perf_counter() - began
    effects = {
        group.name: (score.sum(-1, keepdim=True) if group.sum_hidden else score).float()
        for group, score in zip(space.groups, scores)
    }
    batch = clean.shape[0]
    return EffectRun(effects, seconds, counter.forward_rows // batch, counter.backward_rows // batch)


def mean_effects(effects: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Average over examples at matching positions (templatic data): ``(T, units)``.

    Example:
        >>> import torch
        >>> mean_effects({"g": torch.ones(4, 2, 3)})["g"].shape
        torch.Size([2, 3])
    """
    return {name: values.mean(0) for name, values in effects.items()}


__all__ = ["EffectRun", "node_effects", "mean_effects"]
