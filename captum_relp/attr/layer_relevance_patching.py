"""Relevance Patching (RelP) as a Captum layer attribution method."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
from captum.attr import LayerGradientXActivation
from captum.log import log_usage
from torch import Tensor, nn

from .._forward import MetricEvaluator, MetricType, TargetType, call_model, root_module
from .._hooks import (
    as_layer_list,
    capture,
    check_layers_in_model,
    frozen_model,
    layer_hooks,
    pad_mask_like,
)
from ..calibration import CalibratedRules
from ..registry import RuleSet, apply_rules, resolve_rules
from ._base import LayerType, TensorOrTuple, prepare_call


class LayerRelevancePatching(LayerGradientXActivation):
    r"""Relevance Patching (RelP, Jafari et al. 2025) for one or several layers.

    RelP approximates activation patching like attribution patching (AtP) does,
    with two forward passes and one backward pass, but replaces the gradient by
    the LRP propagation coefficient :math:`\rho`: the forward pass is unchanged
    while the backward pass follows LRP rules (LN-rule, Identity-rule, Half-rule,
    optionally the AH-rule; see :mod:`captum_relp.rules`).

    Sign convention (Captum's): with ``inputs`` = clean and ``baselines`` =
    corrupt prompts, the returned attribution of a layer activation :math:`n` is

    .. math:: (n(x_{clean}) - n(x_{corrupt})) \odot \rho(\mathcal{L}(x_{clean})),

    i.e. minus the paper's :math:`\hat c_{RelP}(n)` (Eq. 3), which uses
    :math:`n(x_{patch}) - n(x_{original})`. Summed over a component it approximates
    :math:`\mathcal{L}(x_{clean}) - \mathcal{L}(x_{clean} \mid do(n \leftarrow n(x_{corrupt})))`:
    a positive score means corrupting the component lowers the metric.
    ``direction="denoising"`` evaluates :math:`\rho` on the ``baselines`` run instead
    (approximating the effect of patching clean activations into the corrupt run).
    Without ``baselines`` the plain LRP relevance :math:`n(x) \odot \rho` is returned.

    Args:
        forward_func (Callable or nn.Module): the model, or a function returning a
            tensor. For a Hugging Face ``PreTrainedModel`` the output's ``.logits`` is used.
        layer (nn.Module or list of nn.Module): the layer(s) attributed; a list is
            attributed in one clean forward, one corrupt forward and one backward pass.
        rules (str, RuleSet or CalibratedRules): ``"relp"`` (the paper's Table 4: LN +
            Identity + 0-rule, Half-rule on gated MLPs), ``"relp-ah"`` (plus AH-rule),
            ``"none"`` (plain gradients, i.e. attribution patching), or the outcome of
            :func:`~captum_relp.calibrate_rules` (one rules-applied forward and backward
            pass per distinct chosen rule set). Default: ``"relp"``.
        device_ids (list[int], optional): as in Captum (for DataParallel models).
        multiply_by_inputs (bool): if False, return the propagation coefficients only.
        model (nn.Module, optional): the module to apply rules to when
            ``forward_func`` is a plain function. Default: ``forward_func`` itself.
        strict (bool): raise if a normalisation/activation module has no rule
            (default); if False, warn and use plain gradients there.

    Examples::

        >>> import torch
        >>> from captum_relp import LayerRelevancePatching
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
        >>> clean, corrupt = torch.randn(2, 4), torch.randn(2, 4)
        >>> relp = LayerRelevancePatching(net, net[1])
        >>> relp.attribute(clean, baselines=corrupt, target=0).shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: LayerType,
        rules: Union[str, RuleSet, CalibratedRules, None] = "relp",
        device_ids: Optional[List[int]] = None,
        multiply_by_inputs: bool = True,
        model: Optional[nn.Module] = None,
        strict: bool = True,
    ) -> None:
        super().__init__(forward_func, layer, device_ids, multiply_by_inputs)
        self.layers = as_layer_list(layer)
        self.calibrated = rules if isinstance(rules, CalibratedRules) else None
        self.rules = resolve_rules(None if self.calibrated else rules)
        self.strict = strict
        self.model = root_module(forward_func, model)
        needs_model = self.calibrated or self.rules.categories or self.rules.attention or self.rules.linear
        if self.model is None and needs_model:
            raise ValueError(
                "rules need a model: pass model=<nn.Module> when forward_func is a plain function"
            )
        check_layers_in_model(self.model, self.layers)

    @log_usage()
    def attribute(  # type: ignore[override]
        self,
        inputs: TensorOrTuple,
        baselines: Optional[TensorOrTuple] = None,
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: Union[bool, Sequence[bool]] = False,
        metric: MetricType = None,
        direction: str = "noising",
    ) -> Union[Tensor, List[Tensor]]:
        r"""Relevance-patching scores of the layer activations.

        Args:
            inputs (Tensor or tuple of Tensor): the clean (original) input, e.g. token ids ``(B, T)``.
            baselines (Tensor or tuple of Tensor, optional): the corrupt (patch) input,
                same shape as ``inputs``. None gives plain LRP relevance.
            target (int, list or Tensor, optional): as in Captum. For language-model
                logits ``(B, T, V)`` it is the token id whose logit at the last real
                position is explained.
            additional_forward_args (tuple or dict, optional): extra model arguments;
                for Hugging Face models ``(attention_mask,)`` or ``{"attention_mask": m}``.
                Scores at padded positions are zero.
            attribute_to_layer_input (bool or list of bool): attribute the layer's input
                instead of its output (e.g. the residual stream entering a block); one
                flag per layer allowed.
            metric (callable, optional): ``metric(output) -> Tensor[B]``, e.g. a logit
                difference (:func:`captum_relp.metrics.logit_diff`). Replaces ``target``.
            direction (str): ``"noising"`` (coefficients on the ``inputs`` run) or
                ``"denoising"`` (on the ``baselines`` run).

        Returns:
            Tensor or list of Tensor: attributions of the layer activations, same shape
            as the activations (first element of a tuple output); a list when the
            instance was built with a list of layers.

        Examples::

            >>> import torch
            >>> from captum_relp import LayerRelevancePatching
            >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
            >>> relp = LayerRelevancePatching(net, [net[0], net[1]])
            >>> scores = relp.attribute(torch.randn(1, 3), baselines=torch.zeros(1, 3), target=1)
            >>> len(scores), scores[0].shape
            (2, torch.Size([1, 3]))
        """
        if direction not in ("noising", "denoising"):
            raise ValueError(f"direction must be 'noising' or 'denoising', got {direction!r}")
        if direction == "denoising" and baselines is None:
            raise ValueError("direction='denoising' needs baselines")
        call = prepare_call(self.forward_func, len(self.layers), inputs, baselines, target,
                            additional_forward_args, attribute_to_layer_input, metric, False)
        inputs, baselines, flags, args, kwargs = call.inputs, call.baselines, call.flags, call.args, call.kwargs
        grad_run, reference_run = (inputs, baselines)
        if direction == "denoising":
            grad_run, reference_run = baselines, inputs

        with frozen_model(self.model):
            reference_acts = None
            if reference_run is not None:
                reference_acts = self._collect(reference_run, flags, args, kwargs)
            coefficients_of = self._calibrated_coefficients if self.calibrated else self._coefficients
            grad_acts, coefficients = coefficients_of(grad_run, flags, args, kwargs, call.evaluator)

        results = []
        for index, coefficient in enumerate(coefficients):
            if not self.multiplies_by_inputs:
                result = coefficient
            elif reference_acts is None:
                result = grad_acts[index] * coefficient
            elif direction == "noising":
                result = (grad_acts[index] - reference_acts[index]) * coefficient
            else:
                result = (reference_acts[index] - grad_acts[index]) * coefficient
            mask = pad_mask_like(call.attention_mask, result)
            results.append((result * mask if mask is not None else result).detach())
        return results[0] if isinstance(self.layer, nn.Module) else results

    def _collect(self, run, flags, args, kwargs) -> List[Tensor]:
        store: List[Optional[Tensor]] = [None] * len(self.layers)
        with torch.no_grad(), layer_hooks(self.layers, flags, capture(store)):
            call_model(self.forward_func, run, args, kwargs)
        return [self._require(t, i) for i, t in enumerate(store)]

    def _coefficients(self, run, flags, args, kwargs, evaluator: MetricEvaluator, layers=None, rules=None):
        layers = self.layers if layers is None else layers
        store: List[Optional[Tensor]] = [None] * len(layers)
        with torch.enable_grad(), self._rules_applied(rules), layer_hooks(
            layers, flags, capture(store, make_leaf=True)
        ):
            output = call_model(self.forward_func, run, args, kwargs)
            evaluator.check_target(output)
            values = evaluator(output, kwargs.get("attention_mask"))
            acts = [self._require(t, i) for i, t in enumerate(store)]
            grads = torch.autograd.grad(values.sum(), acts, allow_unused=True)
        coefficients = [torch.zeros_like(a) if g is None else g for a, g in zip(acts, grads)]
        return [a.detach() for a in acts], coefficients

    def _rules_applied(self, rules: Optional[RuleSet] = None):
        if self.model is None:
            return nullcontext()
        return apply_rules(self.model, self.rules if rules is None else rules, self.strict)

    def _calibrated_coefficients(self, run, flags, args, kwargs, evaluator: MetricEvaluator):
        """CalibratedRules: one rules-applied forward+backward per distinct chosen rule set.

        Layers are grouped by their rule set; results come back in the original layer order.
        """
        acts: List[Optional[Tensor]] = [None] * len(self.layers)
        coefficients: List[Optional[Tensor]] = [None] * len(self.layers)
        for ruleset, indices in self.calibrated.plan(self.model, self.layers, flags):
            sub_acts, sub_coefficients = self._coefficients(
                run, [flags[i] for i in indices], args, kwargs, evaluator,
                layers=[self.layers[i] for i in indices], rules=ruleset)
            for j, i in enumerate(indices):
                acts[i], coefficients[i] = sub_acts[j], sub_coefficients[j]
        return acts, coefficients

    def _require(self, tensor: Optional[Tensor], index: int) -> Tensor:
        if tensor is None:
            raise ValueError(
                f"layer[{index}] ({type(self.layers[index]).__name__}) was not called in the forward "
                "pass: is it part of the model's computation?"
            )
        return tensor

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs
