"""Base classes for LRP rules.

A rule adapts one module for the backward pass while leaving its forward output
bit-identical. Rules are tiny objects: :meth:`Rule.apply` patches a module and
returns a function that undoes the patch.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

UndoFn = Callable[[], None]


class Rule:
    """An LRP propagation rule for one kind of module.

    Subclasses implement :meth:`apply`, which adapts ``module`` so that the forward
    pass is unchanged and the backward pass follows the rule, and returns a
    function restoring the module.

    Example:
        >>> from captum_relp.rules import IdentityRule
        >>> IdentityRule().name
        'identity'
    """

    name: str = "rule"
    category: str = "custom"
    """The registry category the rule belongs to (``norm``, ``activation``, ``gate``, ``linear``,
    ``attention`` or ``custom``): :func:`~captum_relp.register_rule` files it there unless told."""

    def apply(self, module: nn.Module) -> UndoFn:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ZeroRule(Rule):
    """The 0-rule: the plain gradient (what attribution patching, AtP, uses). Nothing to patch.

    Example:
        >>> import torch
        >>> undo = ZeroRule().apply(torch.nn.Linear(2, 2)); undo()
    """

    name = "0-rule"

    def apply(self, module: nn.Module) -> UndoFn:
        return lambda: None


def forward_attribute(module: nn.Module) -> str:
    """The attribute a rule patches: ``forward``, or ``_old_forward`` under accelerate.

    accelerate's ``add_hook_to_module`` replaces ``module.forward`` by a wrapper that
    loads offloaded (CPU/disk) weights, calls ``module._old_forward`` and offloads
    them again. Patching ``_old_forward`` keeps the rule inside that wrapper, so it
    reads the real weights instead of ``meta`` tensors.

    Example:
        >>> import torch
        >>> forward_attribute(torch.nn.LayerNorm(2))
        'forward'
    """
    if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__:
        return "_old_forward"
    return "forward"


class ForwardPatchRule(Rule):
    """A rule that replaces ``module.forward`` by :meth:`patched_forward`.

    The replacement is an instance attribute, so hooks registered on the module
    keep working; the undo function removes it again. On modules dispatched by
    accelerate (``_hf_hook``) the wrapped ``_old_forward`` is replaced instead
    (see ``forward_attribute``).

    The guard every rule shares lives here: a call with more than the one input tensor
    runs the original forward, and so does a call whose input carries no gradient when
    :attr:`only_with_grad` is set (the rule would change nothing but the cost).
    """

    only_with_grad: bool = True
    """Run the original forward when gradients are off or the input does not require them."""

    def patched_forward(
        self, module: nn.Module, original: Callable, state: Any, *args: Any, **kwargs: Any
    ):
        raise NotImplementedError

    def prepare(self, module: nn.Module, original: Callable) -> Any:
        """Checks ``module`` once when the rule is applied; returns per-module state."""
        return None

    def apply(self, module: nn.Module) -> UndoFn:
        attribute = forward_attribute(module)
        original = getattr(module, attribute)
        state = self.prepare(module, original)

        def forward(*args: Any, **kwargs: Any):
            if args and (len(args) > 1 or kwargs or (self.only_with_grad and not (
                    torch.is_grad_enabled() and getattr(args[0], "requires_grad", False)))):
                return original(*args, **kwargs)
            return self.patched_forward(module, original, state, *args, **kwargs)

        return set_instance_attribute(module, attribute, forward)


def set_instance_attribute(module: nn.Module, name: str, value: Any) -> UndoFn:
    """Set ``module.<name>`` on the instance; the returned function restores what was there.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(1, 1)
        >>> undo = set_instance_attribute(lin, "forward", lambda x: x); undo()
        >>> "forward" in lin.__dict__
        False
    """
    had_instance = name in module.__dict__
    previous = module.__dict__.get(name)
    setattr(module, name, value)

    def undo() -> None:
        if had_instance:
            setattr(module, name, previous)
        else:
            module.__dict__.pop(name, None)

    return undo


class UnsupportedModuleError(TypeError):
    """Raised in strict mode when a model holds modules that no rule covers, or when a rule
    cannot be applied to a model exactly (the AH-rule on attention computed in its own code)."""
