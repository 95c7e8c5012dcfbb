"""Standard components of a transformer by family: residual stream, attention and MLP outputs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from torch import Tensor, nn

from ._forward import unwrap_model
from .families import Family, family_of

_BLOCK_PATHS = ("transformer.h", "gpt_neox.layers", "model.layers", "bert.encoder.layer",
                "encoder.layer", "layers", "h")
_ATTN_NAMES = ("attn", "self_attn", "attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_OUT_PROJ_NAMES = ("c_proj", "o_proj", "dense", "out_proj")

COMPONENT_KINDS = ("resid", "attn", "mlp")
"""The standard component types: residual stream entering each block, attention and MLP outputs."""
COMPONENT_TITLES = {"resid": "Residual stream", "attn": "Attention outputs", "mlp": "MLP outputs"}
"""Readable names of :data:`COMPONENT_KINDS` (tables and figure titles)."""


@dataclass
class ModelComponents:
    """The standard components of a model, one entry per layer.

    Each component kind of :data:`COMPONENT_KINDS` is an attribute of its name (``resid``,
    ``attn``, ``mlp``), the name ``select()``, the CLI and the results tables use.

    Attributes:
        blocks: the transformer blocks; their *input* is the residual stream entering the block
            (also available as :attr:`resid`).
        attn: the attention output projections (``c_proj``, ``o_proj``, ``dense``): their
            output is the attention output before the residual add (equal to the
            attention module's output in eval mode), their *input* holds the heads.
        mlp: modules whose output is the MLP output (before the residual add).
        num_heads: attention heads per layer.
        missing: ``{kind: reason}`` for kinds the model has no module for (OPT runs its MLP on
            flattened ``(B * T, d)`` rows); selecting them raises with the reason.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> parts = model_components(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2)))
        >>> parts.resid == parts.blocks, len(parts.resid), type(parts.resid[0]).__name__
        (True, 2, 'GPT2Block')
    """

    blocks: List[nn.Module]
    attn: List[nn.Module]
    mlp: List[nn.Module]
    num_heads: Optional[int] = None
    missing: Dict[str, str] = field(default_factory=dict)

    @property
    def resid(self) -> List[nn.Module]:
        """The modules of the ``resid`` component kind: ``blocks``, attributed at their input."""
        return self.blocks

    @property
    def kinds(self) -> Tuple[str, ...]:
        """The component kinds this model has."""
        return tuple(kind for kind in self.KINDS if kind not in self.missing)

    KINDS = COMPONENT_KINDS

    def select(self, kinds: Sequence[str] = COMPONENT_KINDS) -> Tuple[List[nn.Module], List[bool], List[Tuple[str, int]]]:
        """Layers, ``attribute_to_layer_input`` flags and ``(kind, layer index)`` labels.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=10))
            >>> layers, flags, labels = model_components(model).select(["resid", "mlp"])
            >>> flags, labels[-1]
            ([True, True, False, False], ('mlp', 1))
        """
        layers, flags, labels = [], [], []
        for kind in kinds:
            if kind not in self.KINDS:
                raise ValueError(f"component kind must be one of {self.KINDS}, got {kind!r}")
            if kind in self.missing:
                raise ValueError(f"no {kind!r} components: {self.missing[kind]} (available: {self.kinds})")
            modules = getattr(self, kind)
            layers += modules
            flags += [kind == "resid"] * len(modules)
            labels += [(kind, i) for i in range(len(modules))]
        return layers, flags, labels


def _get(root: nn.Module, path: str) -> Optional[nn.Module]:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _child(module: nn.Module, names: Sequence[str]) -> Optional[nn.Module]:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> len(find_blocks(GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2))))
        3
    """
    for path in _BLOCK_PATHS:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"could not find the transformer blocks of {type(model).__name__}")


def model_components(model: nn.Module) -> ModelComponents:
    """Residual-stream, attention-output and MLP-output modules of a Hugging Face model.

    Hugging Face families of the family table (:mod:`captum_relp.families`) use the paths
    of their entry; other models fall back to common attribute names.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2))
        >>> parts = model_components(model)
        >>> type(parts.attn[0]).__name__, type(parts.mlp[0]).__name__, parts.num_heads
        ('Conv1D', 'GPT2MLP', 2)
    """
    model = unwrap_model(model)  # nnsight models, (Distributed)DataParallel
    if type(model).__module__.startswith("transformer_lens") and hasattr(model, "hook_dict"):
        return transformer_lens_components(model)
    family = family_of(model)
    if family is not None:
        return table_components(model, family)
    blocks = list(find_blocks(model))
    attn, mlp = [], []
    for index, block in enumerate(blocks):
        attention = _child(block, _ATTN_NAMES)
        if attention is not None and _child(attention, ("output",)) is not None:  # BERT
            projection, feed_forward = attention.output.dense, block.output.dense
        else:
            feed_forward = _child(block, _MLP_NAMES)
            projection = _child(attention, _OUT_PROJ_NAMES) if attention is not None else None
        if projection is None or feed_forward is None:
            raise ValueError(
                f"block {index} ({type(block).__name__}) has no attention output projection "
                f"{_ATTN_NAMES}.{_OUT_PROJ_NAMES} or MLP {_MLP_NAMES}"
            )
        attn.append(projection)
        mlp.append(feed_forward)
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    return ModelComponents(blocks, attn, mlp, heads)


def table_components(model: nn.Module, family: Family) -> ModelComponents:
    """Components of a Hugging Face model at the paths of its family table entry.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.families import FAMILY_TABLE
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2))
        >>> len(table_components(model, FAMILY_TABLE["gpt2"]).mlp)
        2
    """
    base = getattr(model, "base_model", model)
    blocks = _get(base, family.blocks)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no block list at {family.blocks!r} (family {family.model_type!r})")
    attn, mlp = [], []
    for index, block in enumerate(blocks):
        projection = _get(block, family.o_proj)
        feed_forward = _get(block, family.mlp) if family.mlp is not None else block
        if projection is None or feed_forward is None:
            raise ValueError(f"block {index} ({type(block).__name__}) has no {family.o_proj!r} or "
                             f"{family.mlp!r} (family {family.model_type!r})")
        attn.append(projection)
        mlp.append(feed_forward)
    missing = {"mlp": family.no_mlp} if family.mlp is None else {}
    return ModelComponents(list(blocks), attn, [] if missing else mlp, family.num_heads(model.config), missing)


def model_name(model: nn.Module) -> str:
    """A short name for results and figure titles: the hub name, or the folder name of a local model.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2))
        >>> model.config.name_or_path = "/site-packages/captum_relp/embedded/tiny-gpt2-ioi"
        >>> model_name(model)
        'tiny-gpt2-ioi'
    """
    import os

    name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    return os.path.basename(os.path.normpath(name)) if os.path.isabs(name) or os.path.isdir(name) else name


def transformer_lens_components(model: nn.Module) -> ModelComponents:
    """Components of a TransformerLens ``HookedTransformer`` or ``TransformerBridge``.

    The modules are the hook points ``blocks.{i}.hook_resid_pre`` (the residual stream
    entering block ``i``; attributed at its input, which equals its output),
    ``blocks.{i}.hook_attn_out`` and ``blocks.{i}.hook_mlp_out``. Unlike Hugging Face
    models, the attention entries do not hold the heads (use ``hook_z`` for heads).

    Raises:
        ValueError: When one of these hook points is missing.

    Example:
        >>> import torch
        >>> transformer_lens_components(torch.nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        AttributeError: 'Linear' object has no attribute 'hook_dict'
    """
    hooks = model.hook_dict
    names = {kind: [f"blocks.{i}.{hook}" for i in range(len(model.blocks))]
             for kind, hook in (("resid", "hook_resid_pre"), ("attn", "hook_attn_out"),
                                ("mlp", "hook_mlp_out"))}
    missing = [n for group in names.values() for n in group if n not in hooks]
    if missing:
        raise ValueError(f"{type(model).__name__} lacks hook point(s) {missing[:3]}")
    cfg = getattr(model, "cfg", None)
    return ModelComponents([hooks[n] for n in names["resid"]], [hooks[n] for n in names["attn"]],
                           [hooks[n] for n in names["mlp"]], getattr(cfg, "n_heads", None))


def split_heads(attributions: Tensor, num_heads: int) -> Tensor:
    """Sum attributions of concatenated heads ``(..., H * D)`` per head, giving ``(..., H)``.

    Use it on attributions of an attention output projection's *input*.

    Example:
        >>> import torch
        >>> split_heads(torch.ones(1, 2, 6), 3)
        tensor([[[2., 2., 2.],
                 [2., 2., 2.]]])
    """
    *lead, width = attributions.shape
    if width % num_heads:
        raise ValueError(f"last dimension {width} is not divisible by num_heads={num_heads}")
    return attributions.reshape(*lead, num_heads, width // num_heads).sum(-1)


__all__ = ["COMPONENT_KINDS", "COMPONENT_TITLES", "ModelComponents", "model_components", "model_name",
           "table_components", "transformer_lens_components", "find_blocks", "split_heads"]
