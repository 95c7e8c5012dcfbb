"""The method table: one name per attribution method, used by experiments, CLI and plots.

``METHODS`` maps each method's name (``AP``, ``AtP``, ``RelP``, ``RelP+AH``, ``IG``)
to its class, constructor options and cost in passes. :class:`PassCounter` counts
the forward and backward passes a call makes, so costs are measured, not assumed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

from torch import Tensor, nn

from .layer_activation_patching import LayerActivationPatching
from .layer_attribution_patching import LayerAttributionPatching
from .layer_integrated_gradients_patching import LayerIntegratedGradientsPatching
from .layer_relevance_patching import LayerRelevancePatching


@dataclass(frozen=True)
class Method:
    """One attribution method: its name, class, constructor options and cost.

    Example:
        >>> METHODS["RelP+AH"].options
        {'rules': 'relp-ah'}
    """

    name: str
    cls: type
    cost: str
    options: Dict[str, Any] = field(default_factory=dict)

    def build(self, model: nn.Module, layers: Sequence[nn.Module], **options: Any):
        """An instance of the method's class on ``layers`` of ``model``."""
        return self.cls(model, list(layers), **{**self.options, **options})

    def attribute(self, model: nn.Module, layers: Sequence[nn.Module], inputs: Tensor, *,
                  n_steps: int = 10, internal_batch_size: Optional[int] = None, **kwargs: Any):
        """Build and run the method; ``n_steps`` (IG) and ``internal_batch_size`` (AP, IG) where used."""
        if self.cls is LayerIntegratedGradientsPatching:
            kwargs.update(n_steps=n_steps, internal_batch_size=internal_batch_size)
        elif self.cls is LayerActivationPatching and internal_batch_size is not None:
            kwargs.update(internal_batch_size=internal_batch_size)
        return self.build(model, layers).attribute(inputs, **kwargs)


METHODS: Dict[str, Method] = {
    method.name: method
    for method in (
        Method("AP", LayerActivationPatching, "1 clean forward + 1 forward per patched location"),
        Method("AtP", LayerAttributionPatching, "2 forward + 1 backward"),
        Method("RelP", LayerRelevancePatching, "2 forward + 1 backward", {"rules": "relp"}),
        Method("RelP+AH", LayerRelevancePatching, "2 forward + 1 backward", {"rules": "relp-ah"}),
        Method("IG", LayerIntegratedGradientsPatching, "n_steps forward + n_steps backward per layer"),
    )
}
"""Every method by name."""


def get_method(name: str) -> Method:
    """The method called ``name`` (case-insensitive; ``relp-ah`` is accepted for ``RelP+AH``).

    Example:
        >>> get_method("relp").name, get_method("relp-ah").name
        ('RelP', 'RelP+AH')
    """
    key = str(name).strip().lower().replace("-", "+")
    for method in METHODS.values():
        if method.name.lower() == key:
            return method
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")


class PassCounter:
    """Counts forward calls/rows (hook on the model output) and backward passes through it.

    Use as a context manager; rows are summed so that a forward over ``k * B``
    tiled rows counts ``k * B`` (the larger of the input's and the output's rows, so a pass
    that computes no logits still counts its input rows).

    Example:
        >>> import torch
        >>> net = torch.nn.Linear(2, 1)
        >>> with PassCounter(net) as counter:
        ...     net(torch.ones(3, 2, requires_grad=True)).sum().backward()
        >>> counter.snapshot()
        {'forward_calls': 1, 'forward_rows': 3, 'backward_calls': 1, 'backward_rows': 3}
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.handle = None
        self.reset()

    def _hook(self, module, args, kwargs, output) -> None:
        logits = getattr(output, "logits", output)
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        rows = int(logits.shape[0]) if logits.dim() else 1
        first = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if isinstance(first, Tensor) and first.dim():  # a pass without logits still counts
            rows = max(rows, int(first.shape[0]))
        self.forward_calls += 1
        self.forward_rows += rows
        if logits.requires_grad:
            def on_grad(grad, rows=rows):
                self.backward_calls += 1
                self.backward_rows += rows

            logits.register_hook(on_grad)

    def reset(self) -> None:
        """Set all counts to zero."""
        self.forward_calls = self.forward_rows = self.backward_calls = self.backward_rows = 0

    def snapshot(self) -> Dict[str, int]:
        """The counts as a dict."""
        return {"forward_calls": self.forward_calls, "forward_rows": self.forward_rows,
                "backward_calls": self.backward_calls, "backward_rows": self.backward_rows}

    def __enter__(self) -> "PassCounter":
        self.handle = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


__all__ = ["Method", "METHODS", "get_method", "PassCounter"]
