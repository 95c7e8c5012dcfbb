"""Attribution patching (AtP, Nanda 2022): the gradient preset of the gradient-times-difference class."""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from ._base import LayerType
from ._gradient_x_difference import LayerGradientXDifference


class LayerAttributionPatching(LayerGradientXDifference):
    r"""Attribution patching: ``(act(inputs) - act(baselines)) * dL/dact`` on the inputs run.

    The same computation as :class:`LayerRelevancePatching` with ``rules="none"``: plain
    gradients, no rule applied.

    Examples::

        >>> import torch
        >>> from captum_relp import LayerAttributionPatching
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh(), torch.nn.Linear(2, 1))
        >>> atp = LayerAttributionPatching(net, net[1])
        >>> atp.attribute(torch.ones(1, 2), baselines=torch.zeros(1, 2)).shape
        torch.Size([1, 2])
    """

    def __init__(
        self,
        forward_func: Callable,
        layer: LayerType,
        *,
        multiply_by_inputs: bool = True,
        model: Optional[nn.Module] = None,
    ) -> None:
        super().__init__(forward_func, layer, "none", multiply_by_inputs=multiply_by_inputs, model=model)
