"""Relevance Patching (RelP) as a Captum layer attribution method."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from captum.attr import LayerGradientXActivation
from captum.log import log_usage
from torch import Tensor, nn

from .._forward import call_model
from .._hooks import capture, frozen_model, layer_hooks
from .._logits import metric_logits
from ..calibration.calibrated_rules import CalibratedRules
from ..metrics import MetricEvaluator, MetricType, TargetType, disconnected_message, metric_grads
from ..rules import RuleSet, apply_rules, resolve_rules
from ._base import LayerType, PatchingAttribution, TensorOrTuple
from ._reduce import check_reduce, reduce_scores, streamed_scores


class LayerRelevancePatching(PatchingAttribution, LayerGradientXActivation):
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
        *,
        multiply_by_inputs: bool = True,
        model: Optional[nn.Module] = None,
        strict: bool = True,
    ) -> None:
        LayerGradientXActivation.__init__(self, forward_func, layer, None, multiply_by_inputs)
        self._init_layers(forward_func, layer, model)
        self.calibrated = rules if isinstance(rules, CalibratedRules) else None
        self.rules = resolve_rules(None if self.calibrated else rules)
        self.strict = strict
        if self.model is None and (self.calibrated or not self.rules.is_empty):
            raise ValueError(
                "rules need a model: pass model=<nn.Module> when forward_func is a plain function"
            )

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
        allow_unused: bool = False,
        reduce: Optional[str] = None,
        num_heads: Optional[int] = None,
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
            allow_unused (bool): give zero scores to a layer the metric does not depend on.
                Default False: such a layer raises a ``ValueError`` naming it, because a
                disconnected coefficient usually means a wrong layer or a wrapped graph.
            reduce (str, optional): ``None`` (full scores), ``"sum"`` (summed over the last
                dimension, the hidden units: ``(B, T, d) -> (B, T)``) or ``"heads"`` (summed
                per head, ``(B, T, H * D) -> (B, T, H)``; needs ``num_heads``). Reduced scores
                are computed in the backward pass as each layer's coefficient arrives, and
                each layer's activations and coefficient are freed right away.
            num_heads (int, optional): heads per layer, for ``reduce="heads"``.

        Logits are computed only at the positions the metric reads when the model is a
        Hugging Face causal LM and the metric is ``target=`` or declares its positions
        (:class:`~captum_relp.metrics.LogitDiff`); see ``captum_relp._logits``.

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
        check_reduce(reduce, num_heads)
        call = self._prepare(inputs, baselines, target, additional_forward_args,
                             attribute_to_layer_input, metric, False)
        inputs, baselines, flags, args, kwargs = call.inputs, call.baselines, call.flags, call.args, call.kwargs
        grad_run, reference_run = (inputs, baselines)
        if direction == "denoising":
            grad_run, reference_run = baselines, inputs

        with frozen_model(self.model), metric_logits(self.forward_func, call.evaluator, self.layers):
            reference_acts = None
            if reference_run is not None:
                reference_acts = self._collect(reference_run, flags, args, kwargs)
            combine = self._combiner(reference_acts, direction, reduce, num_heads)
            results: List[Optional[Tensor]] = [None] * len(self.layers)
            for ruleset, indices in self._rule_plan(flags):
                if reduce is not None:  # combined in the backward pass, layer by layer
                    sub = streamed_scores(
                        self.forward_func, [self.layers[i] for i in indices], [flags[i] for i in indices],
                        grad_run, args, kwargs, call.evaluator, lambda j, a, c: combine(indices[j], a, c),
                        lambda: self._rules_applied(ruleset), lambda t, j: self._require(t, indices[j]),
                        lambda j: self._disconnected([indices[j]], allow_unused))
                else:
                    acts, coefficients = self._coefficients(
                        grad_run, flags, args, kwargs, call.evaluator, allow_unused, indices, ruleset)
                    sub = [combine(i, a, c) for i, a, c in zip(indices, acts, coefficients)]
                for j, i in enumerate(indices):
                    results[i] = sub[j]
        return self._per_layer(results, call)  # type: ignore[arg-type]

    def _collect(self, run, flags, args, kwargs) -> List[Tensor]:
        store: List[Optional[Tensor]] = [None] * len(self.layers)
        with torch.no_grad(), layer_hooks(self.layers, flags, capture(store)):
            call_model(self.forward_func, run, args, kwargs)
        return [self._require(t, i) for i, t in enumerate(store)]

    def _rule_plan(self, flags) -> List[Tuple[RuleSet, List[int]]]:
        """``(rule set, layer indices)``: one entry, or one per distinct calibrated rule set."""
        if self.calibrated is None:
            return [(self.rules, list(range(len(self.layers))))]
        return [(ruleset, list(indices)) for ruleset, indices in self.calibrated.plan(self.model, self.layers, flags)]

    def _coefficients(self, run, flags, args, kwargs, evaluator: MetricEvaluator, allow_unused: bool,
                      indices: List[int], rules: RuleSet):
        """One rules-applied forward and backward: activations and coefficients of ``layers[indices]``."""
        layers = [self.layers[i] for i in indices]
        store: List[Optional[Tensor]] = [None] * len(layers)
        with torch.enable_grad(), self._rules_applied(rules), layer_hooks(
            layers, [flags[i] for i in indices], capture(store, make_leaf=True)
        ):
            output = call_model(self.forward_func, run, args, kwargs)
            evaluator.check_target(output)
            values = evaluator(output, kwargs.get("attention_mask"))
            acts = [self._require(t, i) for i, t in zip(indices, store)]
            coefficients = metric_grads(values, acts, [self._layer_name(i) for i in indices], allow_unused)
        return [a.detach() for a in acts], coefficients

    def _layer_name(self, index: int) -> str:
        return f"layer[{index}] ({type(self.layers[index]).__name__})"

    def _disconnected(self, indices: List[int], allow_unused: bool) -> None:
        """Raise for layers whose coefficient is disconnected from the metric, unless allowed."""
        if indices and not allow_unused:
            raise ValueError(disconnected_message([self._layer_name(i) for i in indices]))

    def _combiner(self, reference_acts: Optional[List[Optional[Tensor]]], direction: str,
                  reduce: Optional[str], num_heads: Optional[int]):
        """``combine(i, act, coefficient)``: layer i's reduced score; drops its reference activation."""

        def combine(index: int, act: Tensor, coefficient: Tensor) -> Tensor:
            if not self.multiplies_by_inputs:
                result = coefficient
            elif reference_acts is None:
                result = act * coefficient
            elif direction == "noising":
                result = (act - reference_acts[index]) * coefficient  # type: ignore[operator]
            else:
                result = (reference_acts[index] - act) * coefficient  # type: ignore[operator]
            if reference_acts is not None:
                reference_acts[index] = None
            return reduce_scores(result, reduce, num_heads)

        return combine

    def _rules_applied(self, rules: RuleSet):
        if self.model is None:
            return nullcontext()
        return apply_rules(self.model, rules, self.strict)

    @property
    def multiplies_by_inputs(self) -> bool:
        return self._multiply_by_inputs
