"""The attribution RelP and AtP share: activation difference times the metric's coefficient."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from captum.attr import LayerGradientXActivation
from captum.log import log_usage
from torch import Tensor, nn

from .._coefficients import ModuleSites, candidate_coefficients, layer_coefficients
from .._forward import call_model, metric_logits
from .._hooks import frozen_model
from ..metrics import MetricType, TargetType
from ..rules import RuleSet, RulesLike, rule_plan
from ._base import LayerType, PatchingAttribution, TensorOrTuple, check_reduce, reduce_scores

DIRECTIONS = ("noising", "denoising")


class LayerGradientXDifference(PatchingAttribution, LayerGradientXActivation):
    r"""``(act(inputs) - act(baselines)) * coefficient``, coefficients under a rule set.

    The coefficient of each layer activation is the derivative of the metric taken
    through the rules (:mod:`captum_relp.rules`) on the ``inputs`` run: the LRP
    propagation coefficient :math:`\rho` for :class:`~captum_relp.LayerRelevancePatching`,
    the plain gradient for :class:`~captum_relp.LayerAttributionPatching` (its preset).

    It is a Captum ``LayerGradientXActivation`` (a ``LayerAttribution`` and
    ``GradientAttribution``) by type, because Captum's ``LLMGradientAttribution`` accepts
    only the gradient methods it lists; none of that class's code runs.

    Args:
        forward_func (Callable or nn.Module): the model, or a function returning a tensor.
        layer (nn.Module or list of nn.Module): the layer(s) attributed.
        rules (str, RuleSet or CalibratedRules): anything :func:`~captum_relp.rules.rule_plan`
            accepts: a preset name, a :class:`~captum_relp.RuleSet` or the outcome of
            :func:`~captum_relp.calibrate_rules` (one pass per distinct chosen rule set).
            Default ``"relp"``.
        multiply_by_inputs (bool): if False, return the coefficients only.
        model (nn.Module, optional): the module rules apply to, for a plain ``forward_func``.
        strict (bool): raise if a normalisation/activation module has no rule.

    Examples::

        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1))
        >>> gxd = LayerGradientXDifference(net, net[1], "none")
        >>> gxd.attribute(torch.ones(1, 2), baselines=torch.zeros(1, 2)).shape
        torch.Size([1, 2])
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: LayerType,
        rules: RulesLike = "relp",
        *,
        multiply_by_inputs: bool = True,
        model: Optional[nn.Module] = None,
        strict: bool = True,
    ) -> None:
        LayerGradientXActivation.__init__(self, forward_func, layer, None, multiply_by_inputs)
        PatchingAttribution.__init__(self, forward_func, layer, model)
        self.rules = rule_plan(rules)
        self.strict = strict
        if self.model is None and not self.rules.is_empty:
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
        logit_positions: Optional[Union[int, Sequence[int]]] = None,
    ) -> Union[Tensor, List[Tensor]]:
        r"""Scores of the layer activations.

        Args:
            inputs (Tensor or tuple of Tensor): the clean (original) input, e.g. token ids ``(B, T)``.
            baselines (Tensor or tuple of Tensor, optional): the corrupt (patch) input,
                same shape as ``inputs``. None gives plain LRP relevance ``act * coefficient``.
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
            logit_positions (int or list of int, optional): the sequence positions a plain
                callable ``metric`` reads from the ``(B, T, V)`` logits, e.g. ``[-1]`` for
                ``lambda logits: logits[:, -1, 5] - logits[:, -1, 7]``. Logits are then
                computed only there (the metric still receives a ``(B, T, V)`` tensor; other
                positions repeat a read one or are NaN). Checked on a probe: a ``ValueError``
                names this argument when the metric reads other positions. Default None: the
                positions are found on a probe (see ``captum_relp._read_positions``), and the
                full logits are computed when they cannot be found exactly.

        Logits are computed only at the positions the metric reads when the model is a
        Hugging Face causal LM: ``target=`` (the last real position), a metric that declares
        its positions (:class:`~captum_relp.metrics.LogitDiff`), or a plain callable
        (``logit_positions`` or the probe). The corrupt run (the clean run for
        ``direction="denoising"``) computes no logits.

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
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if direction == "denoising" and baselines is None:
            raise ValueError("direction='denoising' needs baselines")
        check_reduce(reduce, num_heads)
        call = self._prepare(inputs, baselines, target, additional_forward_args,
                             attribute_to_layer_input, metric, False, logit_positions=logit_positions)
        run, reference_run = call.inputs, call.baselines
        if direction == "denoising":
            run, reference_run = reference_run, run
        results: List[Optional[Tensor]] = [None] * len(self.layers)
        with frozen_model(self.model), metric_logits(self.forward_func, call.evaluator, self.layers):
            reference = None if reference_run is None else self._collect(reference_run, call)
            for ruleset, indices in self.rules.plan(self.model, self.layers, call.flags):
                sites = ModuleSites([self.layers[i] for i in indices], [call.flags[i] for i in indices],
                                    [self._layer_name(i) for i in indices])

                def score(j: int, act: Tensor, coefficient: Tensor, indices=indices) -> None:
                    results[indices[j]] = reduce_scores(
                        self._times_difference(indices[j], act, coefficient, reference, direction),
                        reduce, num_heads)

                with layer_coefficients(
                    lambda: call_model(self.forward_func, run, call.args, call.kwargs), sites,
                    call.evaluator, ruleset, model=self.model, strict=self.strict,
                    attention_mask=call.attention_mask, allow_unused=allow_unused,
                    on_coefficient=score if reduce is not None else None,
                ) as result:
                    for j, (act, coefficient) in enumerate(zip(result.activations, result.coefficients)):
                        score(j, act.detach(), coefficient)  # type: ignore[arg-type]
        return self._per_layer(results, call)  # type: ignore[arg-type]

    @log_usage()
    def attribute_rule_sets(
        self,
        inputs: TensorOrTuple,
        baselines: TensorOrTuple,
        rule_sets: Sequence[RuleSet],
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: Union[bool, Sequence[bool]] = False,
        metric: MetricType = None,
        allow_unused: bool = False,
        reduce: Optional[str] = None,
        num_heads: Optional[int] = None,
        logit_positions: Optional[Union[int, Sequence[int]]] = None,
    ) -> Dict[str, List[Tensor]]:
        r"""The scores under each of several rule sets, from one clean and one corrupt forward pass.

        Equal to one :meth:`attribute` call per rule set (``direction="noising"``), at the cost
        of one forward pass per input and one backward pass per rule set: the rule sets are
        switched in together (:func:`~captum_relp.rules.switch.switch_rules`) and the backward
        pass is repeated over the kept graph. The instance's own ``rules`` are not used.

        Args:
            inputs, baselines: the clean and corrupt inputs.
            rule_sets (list of RuleSet): the rule sets, with distinct names.
            target, additional_forward_args, attribute_to_layer_input, metric, allow_unused,
            reduce, num_heads, logit_positions: as in :meth:`attribute`.

        Returns:
            dict: rule set name -> list of per-layer scores (one per layer, also for one layer).

        Raises:
            SwitchUnsupported: the rule sets cannot share a forward pass (e.g. a rule from outside
                this package); call :meth:`attribute` once per rule set instead.

        Examples::

            >>> import torch
            >>> from captum_relp import LayerRelevancePatching, RuleSet
            >>> net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.GELU(), torch.nn.Linear(3, 2))
            >>> x, x_corrupt = torch.randn(2, 3), torch.randn(2, 3)
            >>> sets = [RuleSet("gradient", categories=()), RuleSet("relp")]
            >>> scores = LayerRelevancePatching(net, net[1]).attribute_rule_sets(x, x_corrupt, sets, target=0)
            >>> one = LayerRelevancePatching(net, net[1], rules=sets[1]).attribute(x, baselines=x_corrupt, target=0)
            >>> torch.allclose(scores["relp"][0], one)
            True
        """
        names = [r.name for r in rule_sets]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"rule_sets must be a non-empty list of RuleSets with distinct names, got {names}")
        if self.model is None:
            raise ValueError("rules need a model: pass model=<nn.Module> when forward_func is a plain function")
        check_reduce(reduce, num_heads)
        call = self._prepare(inputs, baselines, target, additional_forward_args,
                             attribute_to_layer_input, metric, True, logit_positions=logit_positions)
        results = {name: [] for name in names}
        sites = ModuleSites(self.layers, call.flags, [self._layer_name(i) for i in range(len(self.layers))])
        with frozen_model(self.model), metric_logits(self.forward_func, call.evaluator, self.layers):
            reference = self._collect(call.baselines, call)

            def on_candidate(k: int, acts: List[Tensor], coefficients: List[Tensor]) -> None:
                results[names[k]] = self._per_layer(
                    [reduce_scores((a.detach() - r) * c, reduce, num_heads)
                     for a, r, c in zip(acts, reference, coefficients)], call) if acts else []

            candidate_coefficients(lambda: call_model(self.forward_func, call.inputs, call.args, call.kwargs),
                                   sites, call.evaluator, list(rule_sets), on_candidate, model=self.model,
                                   strict=self.strict, attention_mask=call.attention_mask,
                                   allow_unused=allow_unused)
        return {name: scores if isinstance(scores, list) else [scores] for name, scores in results.items()}

    def _times_difference(self, index: int, act: Tensor, coefficient: Tensor,
                          reference: Optional[List[Optional[Tensor]]], direction: str) -> Tensor:
        """Layer ``index``'s score before reduction; drops its reference activation."""
        if not self.multiplies_by_inputs:
            result = coefficient
        elif reference is None:
            result = act * coefficient
        elif direction == "noising":
            result = (act - reference[index]) * coefficient  # type: ignore[operator]
        else:
            result = (reference[index] - act) * coefficient  # type: ignore[operator]
        if reference is not None:
            reference[index] = None
        return result


__all__ = ["LayerGradientXDifference", "DIRECTIONS"]
