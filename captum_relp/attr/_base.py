"""Shared plumbing of the four patching attribution classes (RelP, AtP, AP, IG).

It includes the reduction of scores as they are computed (``reduce=``): with
``reduce="sum"`` (over hidden units) or ``reduce="heads"`` (per attention head), RelP
and AtP turn each layer's ``(act - act_ref) * coefficient`` into its reduced score the
moment the coefficient arrives in the backward pass (``on_coefficient`` of
:func:`~captum_relp._coefficients.layer_coefficients`) and drop that layer's reference
activation right away: no full ``(B, T, d)`` coefficient is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from captum._utils.common import _format_tensor_into_tuples
from captum.attr import LayerAttribution
from torch import Tensor, nn

from .._coefficients import ModuleSites
from .._forward import (call_model, check_token_ids, is_causal_lm, split_forward_args, unwrap_layers,
                       unwrap_model, without_logits)
from .._read_positions import normalize_positions
from .._hooks import as_layer_list, check_layers_in_model, pad_mask_like, per_layer_flags
from ..metrics import LogitDiff, MetricEvaluator, MetricType, TargetType, last_positions
from ..models import split_heads

LayerType = Union[nn.Module, Sequence[nn.Module]]
TensorOrTuple = Union[Tensor, Tuple[Tensor, ...]]
REDUCTIONS = (None, "sum", "heads")


def check_reduce(reduce: Optional[str], num_heads: Optional[int]) -> None:
    """Raise on an unknown reduction, or ``"heads"`` without ``num_heads``.

    Example:
        >>> check_reduce("sum", None)
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if reduce == "heads" and not num_heads:
        raise ValueError("reduce='heads' needs num_heads")


def reduce_scores(scores: Tensor, reduce: Optional[str], num_heads: Optional[int] = None) -> Tensor:
    """Sum over the last dimension (hidden units), per head (``(..., H*D) -> (..., H)``), or nothing.

    Example:
        >>> reduce_scores(torch.ones(1, 2, 4), "heads", 2)
        tensor([[[2., 2.],
                 [2., 2.]]])
    """
    if reduce is None:
        return scores
    if reduce == "sum":
        return scores.sum(-1)
    return split_heads(scores, int(num_heads))  # type: ignore[arg-type]


def format_pair(inputs: TensorOrTuple, baselines: Optional[TensorOrTuple]):
    """Inputs and baselines as tuples; a clear error when their shapes differ."""
    inputs = _format_tensor_into_tuples(inputs)
    if baselines is None:
        return inputs, None
    baselines = _format_tensor_into_tuples(baselines)
    if len(baselines) != len(inputs):
        raise ValueError(f"baselines has {len(baselines)} tensors, inputs has {len(inputs)}")
    for index, (inp, base) in enumerate(zip(inputs, baselines)):
        if not isinstance(base, Tensor) or base.shape != inp.shape:
            shape = tuple(base.shape) if isinstance(base, Tensor) else type(base).__name__
            raise ValueError(
                f"baselines[{index}] has shape {shape} but inputs[{index}] has shape "
                f"{tuple(inp.shape)}: clean and corrupt inputs must align position by position"
            )
    return inputs, baselines


@dataclass
class PatchingCall:
    """The normalised arguments of one ``attribute`` call."""

    inputs: Tuple[Tensor, ...]
    baselines: Optional[Tuple[Tensor, ...]]
    flags: List[bool]
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    evaluator: MetricEvaluator

    @property
    def attention_mask(self) -> Optional[Tensor]:
        return self.kwargs.get("attention_mask")


def check_logit_positions(forward_func: Callable, input_ids: Tensor, logit_positions: Any) -> None:
    """``logit_positions`` needs a Hugging Face causal LM and positions inside ``input_ids``."""
    if not is_causal_lm(forward_func):
        raise ValueError("logit_positions applies to Hugging Face causal language models (the logits "
                         f"of a {type(forward_func).__name__} are not computed by position)")
    normalize_positions(logit_positions, input_ids.shape[-1])


class PatchingAttribution(LayerAttribution):
    """The base of every attribution class of the package: a Captum layer attribution over
    one or several layers of a model.

    Holds the attributed layers (one module or a list, attributed in one call), the
    root module whose state is guarded, and the argument handling of ``attribute``.

    Args:
        forward_func (Callable or nn.Module): the model, or a function returning a tensor.
        layer (nn.Module or list of nn.Module): the layer(s) attributed.
        model (nn.Module, optional): the root module when ``forward_func`` is a plain function.
    """

    layers: List[nn.Module]
    model: Optional[nn.Module]

    def __init__(self, forward_func: Callable, layer: LayerType, model: Optional[nn.Module] = None) -> None:
        LayerAttribution.__init__(self, forward_func, layer)
        # nnsight, (Distributed)DataParallel, torch.compile: attribute the module inside
        self.forward_func = unwrap_model(forward_func, keep_bound=True)
        self.layer = unwrap_layers(layer)
        self.layers = as_layer_list(self.layer)
        root = unwrap_model(model if model is not None else forward_func)  # the module rules apply to
        self.model = root if isinstance(root, nn.Module) else None
        check_layers_in_model(self.model, self.layers)

    def _prepare(self, inputs, baselines, target: TargetType, additional_forward_args: Any,
                 attribute_to_layer_input, metric: MetricType, require_baselines: bool,
                 needs_grad: bool = True, logit_positions: Any = None) -> PatchingCall:
        inputs, baselines = format_pair(inputs, baselines)
        if require_baselines and baselines is None:
            raise ValueError("baselines (the corrupt input) is required")
        if inputs[0].dim() == 0 or inputs[0].shape[0] == 0:
            raise ValueError(f"inputs is an empty batch (shape {tuple(inputs[0].shape)})")
        check_token_ids(self.model, inputs + (baselines or ()))
        if needs_grad and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__}.attribute needs autograd and cannot run under "
                "torch.inference_mode(); call it outside that context (it disables gradients itself)"
            )
        flags = per_layer_flags(attribute_to_layer_input, len(self.layers), "attribute_to_layer_input")
        args, kwargs = split_forward_args(self.forward_func, additional_forward_args, self.model)
        mask = kwargs.get("attention_mask")
        if isinstance(metric, LogitDiff) and metric.positions is None and isinstance(mask, Tensor):
            # read each row's last real token, as target= does, not the padding at position -1
            metric = metric.at_positions(last_positions(mask, mask.shape[0], mask.shape[1], mask.device))
        evaluator = MetricEvaluator(inputs[0].shape[0], target, metric, logit_positions)
        if logit_positions is not None:
            check_logit_positions(self.forward_func, inputs[0], logit_positions)
        return PatchingCall(inputs, baselines, flags, args, kwargs, evaluator)

    def _collect(self, run: Tuple[Tensor, ...], call: PatchingCall) -> List[Tensor]:
        """The activations of every layer on ``run``, without gradients."""
        sites = ModuleSites(self.layers, call.flags, make_leaf=False)
        with torch.no_grad(), sites.capturing() as read, without_logits(self.forward_func, self.layers):
            return read(call_model(self.forward_func, run, call.args, call.kwargs))

    def _layer_name(self, index: int) -> str:
        return f"layer[{index}] ({type(self.layers[index]).__name__})"

    def _require(self, tensor: Optional[Tensor], index: int, what: str = "called") -> Tensor:
        """The captured tensor of layer ``index``; a clear error when the layer did not run."""
        if tensor is None:
            raise ValueError(
                f"layer[{index}] ({type(self.layers[index]).__name__}) was not {what} in the forward "
                "pass: is it part of the model's computation?"
            )
        return tensor

    def _per_layer(self, results: List[Tensor], call: PatchingCall) -> Union[Tensor, List[Tensor]]:
        """Zero at padded positions, detached; one tensor for one layer, else a list."""
        out = []
        for result in results:
            mask = pad_mask_like(call.attention_mask, result)
            out.append((result * mask if mask is not None else result).detach())
        return out[0] if isinstance(self.layer, nn.Module) else out  # type: ignore[attr-defined]
