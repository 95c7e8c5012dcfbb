"""Independent oracles for the family tests: hook-based activation patching and conservation."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn


def _last(mask: Optional[Tensor], ids: Tensor) -> Tensor:
    if mask is None:
        return torch.full((ids.shape[0],), ids.shape[1] - 1)
    return (torch.arange(ids.shape[1]) * mask).max(dim=1).values


def target_logits(model: nn.Module, ids: Tensor, mask: Optional[Tensor], target: int) -> Tensor:
    """The logit of ``target`` at each row's last real position."""
    logits = model(ids, attention_mask=mask, use_cache=False).logits
    return logits[torch.arange(ids.shape[0]), _last(mask, ids), target]


def _hook(layer: nn.Module, to_input: bool, fn):
    """Replace the layer's output (or first input) by ``fn(tensor)``; plain PyTorch hooks."""
    if to_input:
        def pre(module, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        return layer.register_forward_pre_hook(pre, with_kwargs=True)

    def post(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)
    return layer.register_forward_hook(post)


def patching_effects(model: nn.Module, layers: List[nn.Module], flags: List[bool], clean: Tensor,
                     corrupt: Tensor, mask: Optional[Tensor], target: int) -> List[Tensor]:
    """``L(clean) - L(clean | do(layer[:, t] <- corrupt[:, t]))`` per layer, row and position."""
    results = []
    with torch.no_grad():
        base = target_logits(model, clean, mask, target)
        for layer, flag in zip(layers, flags):
            seen = {}
            # keep a copy: a block may add to the tensor in place afterwards (Falcon's MLP output)
            handle = _hook(layer, flag, lambda t: (seen.setdefault("act", t.clone()), t)[1])
            try:
                model(corrupt, attention_mask=mask, use_cache=False)
            finally:
                handle.remove()
            source = seen["act"]
            effects = torch.zeros(clean.shape, dtype=base.dtype)
            for t in range(clean.shape[1]):
                def put(tensor, t=t):
                    tensor = tensor.clone()
                    tensor[:, t] = source[:, t]
                    return tensor
                handle = _hook(layer, flag, put)
                try:
                    effects[:, t] = base - target_logits(model, clean, mask, target)
                finally:
                    handle.remove()
            results.append(effects if mask is None else effects * mask)
    return results
