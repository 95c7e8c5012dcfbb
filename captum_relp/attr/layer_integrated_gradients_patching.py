"""Integrated Gradients between corrupt and clean layer activations, via Captum."""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

from captum.attr import GradientAttribution, LayerIntegratedGradients
from captum.log import log_usage
from torch import Tensor, nn

from .._coefficients import TensorSites, layer_coefficients
from .._forward import call_model, metric_logits
from .._hooks import captum_safe_outputs, frozen_model
from ..metrics import MetricEvaluator, MetricType, TargetType
from ._base import LayerType, PatchingAttribution, TensorOrTuple, check_reduce, reduce_scores


class _CheckedLayerIntegratedGradients(LayerIntegratedGradients):
    """Captum's :class:`~captum.attr.LayerIntegratedGradients` (interpolation, steps, weights)
    whose inner gradient is the package's one coefficient pass: the interpolated layer values
    replace the layer's output (or input) as Captum does, and the metric is checked and
    differentiated by :func:`~captum_relp._coefficients.layer_coefficients`."""

    def __init__(self, run: Callable[..., Any], layer: nn.Module, evaluator: MetricEvaluator,
                 mask_of: Callable[[Tuple[Any, ...]], Optional[Tensor]], name: str) -> None:
        super().__init__(run, layer)
        self.evaluator, self.mask_of, self.name = evaluator, mask_of, name

    def _make_gradient_func(self, num_outputs_cumsum, attribute_to_layer_input, grad_kwargs):
        def gradient_func(forward_fn, inputs, target_ind=None, additional_forward_args=None):
            def replace(module, hook_inputs, hook_outputs=None):
                held = hook_outputs if hook_outputs is not None else hook_inputs
                return tuple(inputs) if isinstance(held, tuple) else inputs[0]

            def forward():
                hook = (self.layer.register_forward_pre_hook(replace) if attribute_to_layer_input
                        else self.layer.register_forward_hook(replace))
                try:
                    return forward_fn(*additional_forward_args)
                finally:
                    hook.remove()

            sites = TensorSites(lambda output: inputs, f"{self.name}, interpolated value {{}}".format)
            with layer_coefficients(forward, sites, self.evaluator,
                                    attention_mask=self.mask_of(additional_forward_args)) as result:
                return tuple(result.coefficients)

        return gradient_func


class LayerIntegratedGradientsPatching(PatchingAttribution, GradientAttribution):
    r"""Captum's :class:`~captum.attr.LayerIntegratedGradients` with patching inputs and metrics.

    Integrates the gradient of the metric along the straight line from the corrupt
    to the clean layer activation (``n_steps`` points, 10 as in the paper), giving
    ``(act(clean) - act(corrupt)) * mean gradient``: the same layout and sign as
    :class:`LayerRelevancePatching`, at ``n_steps`` forward and backward passes per layer
    (each layer is integrated separately, as in Marks et al. 2025).

    Examples::

        >>> import torch
        >>> from captum_relp import LayerIntegratedGradientsPatching
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1))
        >>> ig = LayerIntegratedGradientsPatching(net, net[1])
        >>> ig.attribute(torch.ones(3, 2), baselines=torch.zeros(3, 2), n_steps=5).shape
        torch.Size([3, 2])
    """

    def __init__(self, forward_func: Callable, layer: LayerType, model: Optional[nn.Module] = None) -> None:
        PatchingAttribution.__init__(self, forward_func, layer, model)
        GradientAttribution.__init__(self, self.forward_func)

    @log_usage()
    def attribute(  # type: ignore[override]
        self,
        inputs: TensorOrTuple,
        baselines: TensorOrTuple,
        target: TargetType = None,
        additional_forward_args: Any = None,
        attribute_to_layer_input: Union[bool, Sequence[bool]] = False,
        metric: MetricType = None,
        n_steps: int = 10,
        method: str = "gausslegendre",
        internal_batch_size: Optional[int] = None,
        reduce: Optional[str] = None,
        num_heads: Optional[int] = None,
        logit_positions: Optional[Union[int, Sequence[int]]] = None,
    ) -> Union[Tensor, List[Tensor]]:
        """Integrated-gradients patching scores.

        Args:
            inputs, baselines, target, additional_forward_args, attribute_to_layer_input, metric:
                as in ``LayerRelevancePatching.attribute``.
            n_steps (int): integration points (default 10, as in the paper).
            method (str): Captum's integration method (default ``gausslegendre``, whose weights sum
                to 1; Captum's ``riemann_trapezoid`` weights sum to (n-1)/n and shrink the scores).
            internal_batch_size (int, optional): Captum's chunking of the ``n_steps * B`` rows.
            reduce (str, optional), num_heads (int, optional): as in
                ``LayerRelevancePatching.attribute``; each layer's attribution is reduced
                as soon as that layer is integrated (layers are integrated one at a time).
            logit_positions (int or list of int, optional): the positions a plain callable
                ``metric`` reads, as in ``LayerRelevancePatching.attribute``.

        Returns:
            Tensor or list of Tensor: attributions, same shape as the layer activations.

        Examples::

            >>> import torch
            >>> from captum_relp import LayerIntegratedGradientsPatching
            >>> lin = torch.nn.Sequential(torch.nn.Linear(2, 1))
            >>> ig = LayerIntegratedGradientsPatching(lin, lin[0])
            >>> x = torch.ones(1, 2)
            >>> ig.attribute(x, baselines=torch.zeros(1, 2)).sum().item() == (lin(x) - lin(0 * x)).item()
            True
        """
        check_reduce(reduce, num_heads)
        call = self._prepare(inputs, baselines, target, additional_forward_args,
                             attribute_to_layer_input, metric, True, logit_positions=logit_positions)
        args, kwargs = call.args, call.kwargs
        n_inputs, kw_names = len(call.inputs), list(kwargs)

        def split(flat: Tuple[Any, ...]):
            run_inputs, rest = flat[:n_inputs], flat[n_inputs:]
            return run_inputs, rest[: len(args)], dict(zip(kw_names, rest[len(args):]))

        def forward(*flat: Any) -> Tensor:
            return call_model(self.forward_func, *split(flat))

        def mask_of(flat: Tuple[Any, ...]) -> Optional[Tensor]:
            return split(flat)[2].get("attention_mask")

        extra = tuple(args) + tuple(kwargs[k] for k in kw_names)
        results: List[Tensor] = [None] * len(self.layers)  # type: ignore[list-item]
        with frozen_model(self.model), metric_logits(self.forward_func, call.evaluator, self.layers):
            for index, (layer, flag) in enumerate(zip(self.layers, call.flags)):
                # one layer at a time: Captum interpolates all listed layers at once,
                # which is wrong when one layer feeds another (residual stream).
                with captum_safe_outputs([layer]):
                    integrated = _CheckedLayerIntegratedGradients(forward, layer, call.evaluator, mask_of,
                                                                  self._layer_name(index))
                    attribution = integrated.attribute(
                        call.inputs, baselines=call.baselines, additional_forward_args=extra or None,
                        n_steps=n_steps, method=method, internal_batch_size=internal_batch_size,
                        attribute_to_layer_input=flag,
                    )
                attribution = attribution[0] if isinstance(attribution, tuple) else attribution
                results[index] = reduce_scores(attribution, reduce, num_heads)
        return self._per_layer(results, call)


__all__ = ["LayerIntegratedGradientsPatching"]
