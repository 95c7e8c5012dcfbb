"""Integrated Gradients between corrupt and clean layer activations, via Captum."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

from captum.attr import LayerIntegratedGradients
from captum.log import log_usage
from torch import Tensor

from .._forward import call_model
from .._hooks import captum_safe_outputs, frozen_model
from .._logits import metric_logits
from ..metrics import MetricType, TargetType
from ._base import PatchingLayerAttribution, TensorOrTuple
from ._reduce import check_reduce, reduce_scores


class LayerIntegratedGradientsPatching(PatchingLayerAttribution):
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
    ) -> Union[Tensor, List[Tensor]]:
        """Integrated-gradients patching scores.

        Args:
            inputs, baselines, target, additional_forward_args, attribute_to_layer_input, metric:
                as in :meth:`LayerRelevancePatching.attribute`.
            n_steps (int): integration points (default 10, as in the paper).
            method (str): Captum's integration method (default ``gausslegendre``, whose weights sum
                to 1; Captum's ``riemann_trapezoid`` weights sum to (n-1)/n and shrink the scores).
            internal_batch_size (int, optional): Captum's chunking of the ``n_steps * B`` rows.
            reduce (str, optional), num_heads (int, optional): as in
                :meth:`LayerRelevancePatching.attribute`; each layer's attribution is reduced
                as soon as that layer is integrated (layers are integrated one at a time).

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
                             attribute_to_layer_input, metric, True)
        inputs, baselines, flags, args, kwargs = call.inputs, call.baselines, call.flags, call.args, call.kwargs
        evaluator = call.evaluator
        n_inputs, kw_names = len(inputs), list(kwargs)

        def forward(*flat: Any) -> Tensor:
            run_inputs, rest = flat[:n_inputs], flat[n_inputs:]
            run_args, run_kw = rest[: len(args)], dict(zip(kw_names, rest[len(args):]))
            output = call_model(self.forward_func, run_inputs, run_args, run_kw)
            evaluator.check_target(output)
            return evaluator(output, run_kw.get("attention_mask"))

        extra = tuple(args) + tuple(kwargs[k] for k in kw_names)
        results: List[Tensor] = [None] * len(self.layers)  # type: ignore[list-item]
        with frozen_model(self.model), metric_logits(self.forward_func, evaluator, self.layers):
            for index, (layer, flag) in enumerate(zip(self.layers, flags)):
                # one layer at a time: Captum interpolates all listed layers at once,
                # which is wrong when one layer feeds another (residual stream).
                with captum_safe_outputs([layer]):
                    attribution = LayerIntegratedGradients(forward, layer).attribute(
                        inputs, baselines=baselines, additional_forward_args=extra or None,
                        n_steps=n_steps, method=method, internal_batch_size=internal_batch_size,
                        attribute_to_layer_input=flag,
                    )
                attribution = attribution[0] if isinstance(attribution, tuple) else attribution
                results[index] = reduce_scores(attribution, reduce, num_heads)
        return self._per_layer(results, call)


__all__ = ["LayerIntegratedGradientsPatching"]
