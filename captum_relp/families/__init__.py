"""Model families as data: what the library knows about each Hugging Face ``model_type``.

:data:`FAMILY_TABLE` (in ``captum_relp/families/table.py``) holds one
:class:`Family` per supported ``model_type``: where blocks, attention, its output projection
and the MLP are, each norm and its rule, the gated-MLP layout, how attention is computed (so
the AH-rule is applied or refused), soft-capping, residual layout, sliding windows and head
counts, and the edge-graph parts. :mod:`captum_relp.models`, the rule registry, activation
patching and :mod:`captum_relp.edges` all read it. A Hugging Face model whose ``model_type``
is not in the table is refused in strict mode (``docs/new_architecture.md`` shows how to add one).
"""
from __future__ import annotations

import sys
from typing import Any, FrozenSet, List, Optional, Sequence

from torch import nn

from ._spec import QK_LAYOUTS, Attention, EdgeParts, Family, Norm, config_value
from .table import FAMILY_TABLE, TRANSFORMERS_INTERNALS

GUIDE = "docs/new_architecture.md"
"""The guide an unknown-family error points to."""


def hf_config(model: Any) -> Optional[Any]:
    """The Hugging Face config of ``model`` (None for other modules)."""
    config = getattr(model, "config", None)
    return config if hasattr(config, "model_type") and hasattr(config, "_attn_implementation") else None


def family_of(model: Any) -> Optional[Family]:
    """The table entry of a Hugging Face model (None when it is not one, or not in the table).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> family_of(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2))).o_proj
        'attn.c_proj'
    """
    config = hf_config(model)
    return None if config is None else FAMILY_TABLE.get(config.model_type)


def unknown_family_message(model: nn.Module) -> Optional[str]:
    """Why strict mode refuses ``model``: a Hugging Face model type outside the table (else None).

    Example:
        >>> import torch
        >>> unknown_family_message(torch.nn.Linear(2, 2)) is None
        True
    """
    config = hf_config(model)
    if config is None or config.model_type in FAMILY_TABLE:
        return None
    return (f"model type {config.model_type!r} ({type(model).__name__}) is not in captum_relp's family "
            f"table, so its rules could not be checked to be exact (norms, gated MLPs, attention, "
            f"soft-capping). Add it: one entry in captum_relp/families/table.py plus its test, as "
            f"{GUIDE} shows; or pass strict=False to use the rules matched by module type at your own risk.")


def ah_refusal(model: nn.Module) -> Optional[str]:
    """Why the AH-rule cannot be applied to ``model`` (None when it can).

    Table families say how their attention is computed. Other Hugging Face models (only
    reachable with ``strict=False``) must route attention through ``AttentionInterface``.

    Example:
        >>> import torch
        >>> ah_refusal(torch.nn.Linear(2, 2)) is None
        True
    """
    config = hf_config(model)
    if config is None:
        return None
    family = FAMILY_TABLE.get(config.model_type)
    if family is not None:
        if family.attn.how != "refused":
            return None
        where = f"the {family.model_type} family"
    else:
        modeling = sys.modules.get(type(model).__module__)
        if modeling is None or hasattr(modeling, "ALL_ATTENTION_FUNCTIONS"):
            return None
        where = f"{type(model).__module__} (no AttentionInterface)"
    return (f"the AH-rule (rules 'relp-ah') cannot be applied to {type(model).__name__}: {where} computes "
            f"attention in its own code, so attention probabilities would not be held constant and the "
            f"scores would be plain 'relp' scores under another name. Use rules='relp'; to add it, see {GUIDE}.")


def switches_attention_function(model: nn.Module) -> bool:
    """Whether the model-level AH-rule (switching ``config._attn_implementation``) applies.

    False for table families whose AH-rule acts on their attention modules instead.
    """
    family = family_of(model)
    return family is None or family.attn.how == "interface"


def model_rules(model: nn.Module, categories: Sequence[str]) -> List[Any]:
    """Rules applied to the whole model: the Identity-rule on a final-logit soft-cap.

    The cap is a pointwise activation, so it follows the ``activation`` category.

    Example:
        >>> import torch
        >>> model_rules(torch.nn.Linear(2, 2), ("activation",))
        []
    """
    family = family_of(model)
    if family is None or family.logit_softcap is None or "activation" not in categories:
        return []
    if getattr(model.config, family.logit_softcap, None) is None or not callable(
            getattr(model, "get_output_embeddings", None)) or model.get_output_embeddings() is None:
        return []
    from ..rules.nonlinear import LogitSoftcapRule  # the rules package reads this table

    return [LogitSoftcapRule()]


def ah_module_rules(model: nn.Module) -> List[Any]:
    """``(module, rule)`` pairs of the AH-rule for a family whose attention is computed in its own
    code (:attr:`Attention.how` ``"qk-columns"``); empty for other models.

    Raises a ``ValueError`` when the model has no module of the family's attention class in a
    block (another attention class, e.g. a flash-attention variant), rather than leaving
    attention unruled.

    Example:
        >>> from transformers import BloomConfig, BloomForCausalLM
        >>> model = BloomForCausalLM(BloomConfig(n_layer=2, hidden_size=8, n_head=2, vocab_size=16))
        >>> [type(m).__name__ for m, _ in ah_module_rules(model)], ah_module_rules(model)[0][1]
        (['BloomAttention', 'BloomAttention'], DetachQKColumnsRule(('query_key_value',), 'per-head'))
    """
    family = family_of(model)
    if family is None or family.attn.how != "qk-columns":
        return []
    from ..rules.attention import DetachQKColumnsRule  # the rules package reads this table

    config = model.config
    rule = DetachQKColumnsRule(family.attn.projections, config_value(config, family.attn.layout),
                               family.num_heads(config), family.num_kv_heads(config))
    cls = family.key(family.attn.cls)
    found = [m for m in model.modules() if f"{type(m).__module__}.{type(m).__qualname__}" == cls]
    blocks = len(model.base_model.get_submodule(family.blocks))
    if len(found) != blocks:
        kinds = sorted({type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__})
        raise ValueError(
            f"the AH-rule (rules 'relp-ah') for the {family.model_type} family acts on {family.attn.cls} "
            f"modules, but {type(model).__name__} has {len(found)} of them for {blocks} blocks (its attention "
            f"modules: {kinds}); load the model with attn_implementation='eager' or 'sdpa'")
    return [(module, rule) for module in found]


def gradient_paths(model: nn.Module) -> FrozenSet[str]:
    """Module paths of ``model`` that take the plain gradient under every rule set: its
    family's query/key norms (:attr:`Family.qk_norms`).

    Example:
        >>> from transformers import Qwen3Config, Qwen3ForCausalLM
        >>> config = Qwen3Config(num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
        ...                      num_key_value_heads=1, head_dim=4, intermediate_size=8, vocab_size=16)
        >>> sorted(gradient_paths(Qwen3ForCausalLM(config)))
        ['model.layers.0.self_attn.k_norm', 'model.layers.0.self_attn.q_norm']
    """
    family = family_of(model)
    if family is None or not family.qk_norms:
        return frozenset()
    return frozenset(path for path, _ in model.named_modules()
                     if any(path.endswith("." + suffix) for suffix in family.qk_norms))


def reuse_prefix_allowed(model: Any) -> bool:
    """Whether activation patching may create patched copies at the layer (and reuse the clean cache).

    Example:
        >>> import torch
        >>> reuse_prefix_allowed(torch.nn.Linear(2, 2))
        True
    """
    family = family_of(model)
    return family is None or family.reuse_prefix


def layer_window(config: Any, family: Family, layer: int) -> Optional[int]:
    """The sliding window of layer ``layer`` (None: full causal attention).

    Uses ``config.layer_types`` where the config has them (alternating local/global layers), or
    GPT-Neo's ``attention_layers``.
    """
    window = family.window(config)
    types = getattr(config, "layer_types", None) or getattr(config, "attention_layers", None)
    if window is None or not types:
        return window
    return window if types[layer] in ("sliding_attention", "local_attention", "local") else None


__all__ = ["FAMILY_TABLE", "GUIDE", "QK_LAYOUTS", "Attention", "EdgeParts", "Family", "Norm", "ah_module_rules",
           "ah_refusal", "config_value",
           "family_of", "gradient_paths", "hf_config", "layer_window", "model_rules", "reuse_prefix_allowed",
           "switches_attention_function", "unknown_family_message", "TRANSFORMERS_INTERNALS"]
