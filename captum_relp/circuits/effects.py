"""Node effects with RelP, AtP or IG, and the cost of computing them."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict

from torch import Tensor

from ..attr import (
    LayerAttributionPatching,
    LayerIntegratedGradientsPatching,
    LayerRelevancePatching,
)
from .nodes import NodeSpace

METHODS = ("relp", "atp", "ig")


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
    rules: str = "relp",
    n_steps: int = 10,
) -> EffectRun:
    """Score every node of ``space`` by patching ``corrupt`` into ``clean``.

    Sign as in :class:`~captum_relp.LayerRelevancePatching`: positive = patching the
    node lowers the metric. Groups with one node per position are summed over the
    hidden dimension.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.metrics import logit_diff
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20)).eval()
        >>> space = NodeSpace(model, "neurons")
        >>> run = node_effects(space, "relp", torch.ones(1, 3, dtype=torch.long),
        ...                    torch.zeros(1, 3, dtype=torch.long), logit_diff(1, 2))
        >>> run.effects["mlp_0.neurons"].shape, run.forward_passes, run.backward_passes
        (torch.Size([1, 3, 64]), 2, 1)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    model = space.model
    rows = {"forward": 0, "backward": 0}

    def count_forward(module, args, kwargs) -> None:
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        rows["forward"] += ids.shape[0]

    def count_backward(module, grad_input, grad_output) -> None:
        rows["backward"] += grad_output[0].shape[0]

    handles = [model.register_forward_pre_hook(count_forward, with_kwargs=True)]
    output_layer = model.get_output_embeddings()
    if output_layer is not None:
        handles.append(output_layer.register_full_backward_hook(count_backward))
    extra = {"attention_mask": attention_mask} if attention_mask is not None else None
    began = time.perf_counter()
    try:
        with space.active():
            layers, flags = space.layers_and_flags()
            kwargs = dict(baselines=corrupt, metric=metric, additional_forward_args=extra,
                          attribute_to_layer_input=flags)
            if method == "relp":
                scores = LayerRelevancePatching(model, layers, rules=rules).attribute(clean, **kwargs)
            elif method == "atp":
                scores = LayerAttributionPatching(model, layers).attribute(clean, **kwargs)
            else:
                scores = LayerIntegratedGradientsPatching(model, layers).attribute(clean, n_steps=n_steps, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    seconds = time.perf_counter() - began
    effects = {
        group.name: (score.sum(-1, keepdim=True) if group.sum_hidden else score).float()
        for group, score in zip(space.groups, scores)
    }
    batch = clean.shape[0]
    return EffectRun(effects, seconds, rows["forward"] // batch, rows["backward"] // batch)


def mean_effects(effects: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Average over examples at matching positions (templatic data): ``(T, units)``.

    Example:
        >>> import torch
        >>> mean_effects({"g": torch.ones(4, 2, 3)})["g"].shape
        torch.Size([2, 3])
    """
    return {name: values.mean(0) for name, values in effects.items()}


__all__ = ["METHODS", "EffectRun", "node_effects", "mean_effects"]
