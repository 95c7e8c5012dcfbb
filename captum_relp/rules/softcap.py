"""Identity-rule for final-logit soft-capping ``c * tanh(z / c)`` (Gemma 2 and 3).

The cap is a pointwise function with ``f(0) = 0``, computed inline after the unembedding.
:class:`LogitSoftcapRule` treats it like an activation under the Identity-rule: the backward
pass multiplies the logits' gradient by ``f(z) / z`` (1 at ``z = 0``), so the relevance of the
capped logit flows unchanged to the uncapped one. The rule is applied to the whole model: it
records the unembedding output ``z`` and re-attaches the model's own capped logits to it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Rule, UndoFn
from .functional import identity_ratio


class _Recapped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, capped):  # type: ignore[override]
        ctx.save_for_backward(identity_ratio(z, capped, 1.0).to(z.dtype))
        return capped.clone()

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (ratio,) = ctx.saved_tensors
        return grad_output * ratio, None


class LogitSoftcapRule(Rule):
    """Identity-rule on the final-logit soft-cap of a causal LM (``config.final_logit_softcapping``).

    Example:
        >>> from transformers import Gemma2Config, Gemma2ForCausalLM
        >>> model = Gemma2ForCausalLM(Gemma2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...     num_key_value_heads=1, head_dim=4, intermediate_size=8, vocab_size=16)).eval()
        >>> undo = LogitSoftcapRule().apply(model); undo()
    """

    name = "identity"
    category = "activation"

    def apply(self, module: nn.Module) -> UndoFn:
        head = module.get_output_embeddings()
        if not isinstance(head, nn.Module):
            raise ValueError(f"LogitSoftcapRule: {type(module).__name__} has no output embeddings")
        seen: dict = {}

        def on_head(mod: nn.Module, args: Any, output: Tensor) -> None:
            seen["z"] = output

        def on_model(mod: nn.Module, args: Any, output: Any):
            z = seen.pop("z", None)
            logits = getattr(output, "logits", None)
            if z is None or logits is None or not torch.is_grad_enabled() or not z.requires_grad:
                return None
            if z.shape != logits.shape:
                raise RuntimeError(f"LogitSoftcapRule: unembedding output {tuple(z.shape)} is not the shape "
                                   f"of the logits {tuple(logits.shape)}")
            output.logits = _Recapped.apply(z, logits)
            return output

        handles = [head.register_forward_hook(on_head), module.register_forward_hook(on_model)]
        return lambda: [handle.remove() for handle in handles] and None


__all__ = ["LogitSoftcapRule"]
