"""The modules and per-head weights of a model at the paths of its family's edge-graph parts.

:class:`Parts` reads a Hugging Face model through its family's
:class:`~captum_relp.families.EdgeParts`: the embeddings, the norms around attention and
MLP (pre-norms, and post-norms on "sandwich" blocks), the rotary embedding of each layer,
the query/key/value/output weights split per head, soft-capping constants.
:func:`split_through_norm` defines the per-head outputs of a post-normed attention layer.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..families import FAMILY_TABLE, config_value, layer_window


def _path(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)  # None where a model leaves an optional module out
    return module


def _identity(x: Tensor) -> Tensor:
    return x


def softcap(x: Tensor, cap: Optional[float]) -> Tensor:
    """``cap * tanh(x / cap)`` (Gemma-2 soft-capping), or ``x`` when ``cap`` is None.

    Example:
        >>> import torch
        >>> softcap(torch.tensor([0.0, 100.0]), 5.0)
        tensor([0., 5.])
    """
    return x if not cap else torch.tanh(x / cap) * cap


def split_through_norm(norm: Callable[[Tensor], Tensor], out: Tensor, s: Optional[Tensor] = None) -> Tensor:
    """Per-head shares ``(B, T, H, d)`` of ``norm(s)``, ``s = sum_h out_h``, for an RMSNorm without bias.

    An RMSNorm multiplies its input elementwise by ``g * r(s)`` (gain ``g``, one scale ``r``
    per vector): head ``h`` contributes ``out_h * g * r(s)``, and the shares sum to the
    norm's output exactly. The factor is read off the norm itself (``norm(s) / s``), so its
    backward is the norm's own (with a rule applied: the LN-rule holds ``r`` constant).
    Entries where ``s`` is exactly zero take the factor from a tiny non-zero stand-in. ``s``
    may be given, computed as the model computes it (a norm in float32 rounds its input: the
    same bits give the same output).

    Example:
        >>> import torch
        >>> norm = torch.nn.RMSNorm(4, eps=1e-6).double()
        >>> out = torch.randn(1, 2, 3, 4, dtype=torch.float64)
        >>> shares = split_through_norm(norm, out)
        >>> torch.allclose(shares.sum(2), norm(out.sum(2)))
        True
    """
    s = out.sum(dim=2) if s is None else s
    total = norm(s)
    zero = s == 0
    if bool(zero.any()):
        with torch.no_grad():
            tiny = (s.abs().amax(-1, keepdim=True) * torch.finfo(s.dtype).eps).clamp_min(torch.finfo(s.dtype).tiny)
            stand_in = torch.where(zero, tiny.expand_as(s), s)
            fallback = norm(stand_in) / stand_in
        ratio = torch.where(zero, fallback, total / torch.where(zero, torch.ones_like(s), s))
    else:
        ratio = total / s
    return out * ratio[:, :, None]


def codegen_rows(mp_num: int, width: int, which: int) -> Tensor:
    """Rows of CodeGen's ``qkv_proj`` holding the queries (``which=0``), values (1) or keys (2),
    in head order: the output is ``mp_num`` blocks of ``[q | v | k]``, each ``width / mp_num`` wide.

    Example:
        >>> codegen_rows(2, 4, 2).tolist()
        [4, 5, 10, 11]
    """
    local = width // mp_num
    column = torch.arange(width)
    return column // local * 3 * local + which * local + column % local


class Parts:
    """Modules and per-head weights of ``model``, at the paths of its family's edge-graph parts.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.edges import build_graph
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10))
        >>> parts = Parts(model, build_graph(model))
        >>> [w.shape for w in parts.weights(0)[:1]], parts.post_norms(0)
        ([torch.Size([2, 8, 4])], None)
    """

    def __init__(self, model: nn.Module, graph) -> None:
        self.graph = graph
        self.family = FAMILY_TABLE[graph.family]
        self.spec = self.family.edges
        self.config = model.config
        base = model.base_model
        self.blocks = list(_path(base, self.family.blocks))
        self.final_norm = _path(base, self.spec.final_norm)
        self.final_proj = _path(base, self.spec.final_proj) if self.spec.final_proj else None
        rotary = config_value(self.config, self.spec.rotary)
        self.rotary_module = _path(base, rotary) if rotary else None
        if not self.spec.qk_norm and getattr(self.attention(0), self.spec.qk_norm_modules[0], None) is not None:
            raise ValueError(f"{graph.family}: attention with q/k norms needs qk_norm in its edge-graph parts")
        for layer in range(len(self.blocks)):
            for norm in self.post_norms(layer) or ():
                if getattr(norm, "bias", None) is not None or "RMSNorm" not in type(norm).__name__:
                    raise ValueError(f"{graph.family}: post-norms split over heads must be RMSNorms without bias, "
                                     f"got {type(norm).__name__}")
        self.base = base
        self.lm_head = model.get_output_embeddings()
        self.attn_cap = config_value(self.config, "@" + self.family.attn.softcap) if self.family.attn.softcap else None
        self.logit_cap = config_value(self.config, "@" + self.family.logit_softcap) if self.family.logit_softcap else None
        self.clip = config_value(self.config, self.spec.clip_qkv)
        # eager attention takes the softmax in float32 (transformers' eager_attention_forward): so does
        # the graph, so that a float64 model is recomputed to float64 precision of its own forward
        self.float32_softmax = str(getattr(self.config, "_attn_implementation", None)).endswith("eager")
        scores32 = self.spec.float32_scores
        self.float32_scores = scores32 is True or (scores32 == "eager" and self.float32_softmax)

    def embed(self, ids: Tensor, positions: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        if self.spec.embed_fn is not None:
            return self.spec.embed_fn(self.base, ids, attention_mask)
        token, *position = self.spec.embed
        out = _path(self.base, token)(ids)
        out = out + _path(self.base, position[0])(positions) if position else out
        return _path(self.base, self.spec.embed_norm)(out) if self.spec.embed_norm else out

    def position_bias(self, attention_mask: Optional[Tensor], batch: int, length: int, ref: Tensor):
        """The ALiBi bias on the attention scores, broadcastable to ``(B, H, T, T)``, or None."""
        if self.spec.position_bias is None:
            return None
        return self.spec.position_bias(self.base, attention_mask, batch, length, self.graph.n_heads, ref)

    def scaling(self, layer: int) -> float:
        """The factor on the attention scores of layer ``layer``."""
        value = self.spec.scaling
        return getattr(self.attention(layer), value or "scaling") if value is None or isinstance(value, str) else value

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        """The MLP's output for its normalised input ``x``."""
        if callable(self.spec.mlp):
            return self.spec.mlp(self.blocks[layer], x)
        mlp = _path(self.blocks[layer], self.spec.mlp)
        return mlp(x, torch.zeros_like(x)) if self.spec.mlp_residual else mlp(x)

    def unembed(self, x: Tensor) -> Tensor:
        """Logits (before any soft-cap) from the residual stream's final value."""
        for module in (self.final_norm, self.final_proj):
            x = x if module is None else module(x)
        return self.lm_head(x)

    def attention(self, layer: int) -> nn.Module:
        """The module holding the projections: the parent of the output projection (GPT-Neo's
        ``attn.attention``, the block's attention elsewhere)."""
        return _path(self.blocks[layer], self.family.o_proj.rpartition(".")[0])

    def norms(self, layer: int):
        """The pre-attention and pre-MLP norm of a block (the identity where a block has none)."""
        names = (config_value(self.config, name) for name in self.spec.norms)
        return tuple(_path(self.blocks[layer], name) if name else _identity for name in names)

    def o_proj(self, layer: int) -> nn.Module:
        """The attention output projection (its input holds the heads)."""
        return _path(self.blocks[layer], self.family.o_proj)

    def qk_norms(self, layer: int):
        """The norms of queries and keys of a layer, or None where the model has none."""
        attn = self.attention(layer)
        q, k = (getattr(attn, name, None) for name in self.spec.qk_norm_modules)
        return None if q is None else (q, k)

    def post_norms(self, layer: int):
        """The norms of the attention and MLP outputs before the residual add, or None."""
        return tuple(_path(self.blocks[layer], name) for name in self.spec.post_norms) or None

    def window(self, layer: int) -> Optional[int]:
        """The sliding window of layer ``layer`` (None: full causal attention)."""
        return layer_window(self.config, self.family, layer)

    def rotary(self, embeds: Tensor, positions: Tensor):
        """``layer -> (cos, sin)``: one rotation per layer type where the rotary embedding takes one (Gemma-3)."""
        if self.rotary_module is None:
            return lambda layer: None
        types = getattr(self.config, "layer_types", None)
        if types and "layer_type" in inspect.signature(self.rotary_module.forward).parameters:
            per_type = {t: self.rotary_module(embeds, positions, t) for t in set(types)}
            return lambda layer: per_type[types[layer]]
        shared = self.rotary_module(embeds, positions)
        return lambda layer: shared

    def layout(self) -> str:
        """The query/key/value projection layout (:attr:`EdgeParts.qkv`, resolved on the config)."""
        return config_value(self.config, self.spec.qkv)

    def weights(self, layer: int):
        """``W_q (H, d, D), b_q, W_k (Hkv, d, D), b_k, W_v, b_v, W_o (H, D, d), b_o (d)``."""
        g, attn, layout = self.graph, self.attention(layer), self.layout()
        H, K = g.n_heads, g.n_kv_heads
        o_proj = self.o_proj(layer)
        if layout == "conv1d":
            w, b = attn.c_attn.weight, attn.c_attn.bias  # (d, 3d), (3d,)
            d = w.shape[0]
            D = d // H
            ws = [w[:, i * d:(i + 1) * d].reshape(d, H, D).permute(1, 0, 2) for i in range(3)]
            bs = [b[i * d:(i + 1) * d].reshape(H, D) for i in range(3)]
            return ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], o_proj.weight.reshape(H, D, d), o_proj.bias
        w_o, b_o = o_proj.weight.t().reshape(H, -1, o_proj.weight.shape[0]), o_proj.bias
        if layout == "neox":  # per head [q k v] rows
            fused = getattr(attn, self.spec.fused or "query_key_value")
            w, b = fused.weight, fused.bias  # (3d, d)
            D = w.shape[0] // (3 * H)
            w = w.reshape(H, 3, D, -1)
            ws = [w[:, i].transpose(1, 2) for i in range(3)]
            bs = [None if b is None else b.reshape(H, 3, D)[:, i] for i in range(3)]
            return ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], w_o, b_o
        if layout == "fused":  # one projection, rows [q (H D) | k (Hkv D) | v (Hkv D)]
            fused = getattr(attn, self.spec.fused or "qkv_proj")
            w, b = fused.weight, fused.bias
            D = w.shape[0] // (H + 2 * K)
            cuts = (0, H * D, (H + K) * D, (H + 2 * K) * D)
            rows = [(w[a:z], None if b is None else b[a:z]) for a, z in zip(cuts, cuts[1:])]
        elif layout == "grouped":  # per key/value group: its queries, then its key and value (Falcon)
            fused = getattr(attn, self.spec.fused or "query_key_value")
            D = fused.weight.shape[0] // (H + 2 * K)
            w = fused.weight.reshape(K, H // K + 2, D, -1)
            b = None if fused.bias is None else fused.bias.reshape(K, H // K + 2, D)
            parts = [(w[:, :-2].flatten(0, 1), None if b is None else b[:, :-2].flatten(0, 1))]
            parts += [(w[:, i], None if b is None else b[:, i]) for i in (-2, -1)]
            rows = [(weight.flatten(0, 1), None if bias is None else bias.flatten()) for weight, bias in parts]
        elif layout == "codegen":  # qkv_proj rows: mp_num blocks of [q | v | k], each a slice of every head
            w = attn.qkv_proj.weight
            D = w.shape[1] // H
            rows = [(w[codegen_rows(attn.mp_num, w.shape[1], which)], None) for which in (0, 2, 1)]
        else:
            rows = [(p.weight, p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
            D = attn.q_proj.weight.shape[0] // H
        ws, bs = [], []
        for (weight, bias), n in zip(rows, (H, K, K)):
            ws.append(weight.reshape(n, D, weight.shape[1]).transpose(1, 2))
            bs.append(None if bias is None else bias.reshape(n, D))
        return ws[0], bs[0], ws[1], bs[1], ws[2], bs[2], w_o, b_o


__all__ = ["Parts", "softcap", "split_through_norm"]
