"""Forward pass over the component graph, with exact edge patching.

:func:`graph_forward` recomputes a Hugging Face model from its own weights and
modules, with the residual stream split into node outputs: the input of every
query, key, value, MLP and logits is the sum of its upstream node outputs. Each
attention head reads its own (possibly patched) residual stream. Norms, MLPs and
activations are the model's modules, so :func:`captum_relp.rules.apply_rules`
changes the backward pass of this forward as it does the model's. Attention is
computed here (softmax over scaled dot products); ``ah=True`` detaches queries and
keys in it, which is the AH-rule; ``ah="qk-local"`` keeps the AH-rule for the residual
stream and gives the query and key inputs the local attention-pattern gradient (the
``relp-ah-qk`` edge scores). Linear projections use the 0-rule (plain gradient).

Patching an edge ``u -> v`` replaces ``u``'s output in ``v``'s input by ``u``'s
output in a reference (corrupt) run:

.. math:: x_v = \\sum_{u \\to v} a_u - \\sum_{u \\to v} P_{uv} (a_u - a_u^{corrupt}),

with ``P`` the patch matrix (1 = patched). ``a_u`` is the output of ``u`` in the
patched run itself, as in EAP-IG/MIB.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import List, Optional, Union

import torch
from torch import Tensor, nn

from .._forward import check_token_ids
from ..rules.nonlinear import softcap_logits
from ._parts import Parts, softcap, split_through_norm
from .graph import ComponentGraph


@dataclass
class GraphRun:
    """The result of :func:`graph_forward`.

    Attributes:
        logits: ``(B, T, vocab)`` logits.
        outputs: ``(B, T, U, d)`` outputs of the upstream nodes (graph order).
        inputs: tensors whose concatenation along dim 2 is the ``(B, T, V, d)``
            downstream inputs (graph order), part of the autograd graph: the
            gradient of a metric with respect to them is the per-input coefficient.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.edges import build_graph
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=10)).eval()
        >>> run = graph_forward(model, build_graph(model), torch.randint(10, (1, 3)))
        >>> run.logits.shape
        torch.Size([1, 3, 10])
    """

    logits: Tensor
    outputs: Tensor
    inputs: List[Tensor]


def _project(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    out = torch.einsum("bthd,hde->bhte", x, weight)
    return out if bias is None else out + bias[None, :, None, :]


def _additive_mask(attention_mask: Optional[Tensor], batch: int, length: int, ref: Tensor,
                   window: Optional[int] = None) -> Tensor:
    keep = torch.ones(length, length, dtype=torch.bool, device=ref.device).tril()[None, None]
    if window is not None:  # sliding window: query t sees keys t - window < s <= t
        keep = keep & torch.ones_like(keep).triu(1 - window)
    if attention_mask is not None:
        keep = keep & attention_mask.bool()[:, None, None, :]
    keep = keep.expand(batch, 1, length, length)
    zero = torch.zeros((), dtype=ref.dtype, device=ref.device)
    return torch.where(keep, zero, torch.finfo(ref.dtype).min)


def _ungroup(weight: Tensor, bias: Optional[Tensor], n_heads: int):
    """Key or value weights ``(H_kv, d, D)`` repeated per query head ``(H, d, D)`` (ungrouped graphs)."""
    repeat = n_heads // weight.shape[0]
    if repeat == 1:
        return weight, bias
    return weight.repeat_interleave(repeat, 0), None if bias is None else bias.repeat_interleave(repeat, 0)


def _qk_leaf(x: Tensor, n_qk: int) -> Tensor:
    """``x`` with its first ``n_qk`` slots (the q and k inputs) replaced by a gradient leaf of the same
    values: the attention-pattern gradient stops there and never reaches the residual stream."""
    leaf = x[:, :, :n_qk].detach().requires_grad_(torch.is_grad_enabled())
    return torch.cat([leaf, x[:, :, n_qk:]], dim=2)


def _full_qk(x: Tensor, proj: nn.Module, norm: nn.Module, n_out: int, group: Tensor) -> Tensor:
    """Queries or keys ``(B, n, T, D)`` under a norm over all heads (OLMo-2): input ``i`` of ``x``
    ``(B, T, n, d)`` is projected to every head, normalised, and its own head ``group[i]`` kept."""
    full = norm(proj(x))  # (B, T, n, n_out * D)
    full = full.reshape(*full.shape[:3], n_out, -1)
    index = group.to(x.device)[None, None, :, None, None].expand(*full.shape[:3], 1, full.shape[-1])
    return full.gather(3, index).squeeze(3).transpose(1, 2)


def _qkv(parts: Parts, layer: int, normed: Tensor):
    """Queries ``(B, H, T, D)``, keys and values ``(B, K, T, D)`` from per-slot normalised inputs."""
    g, attn = parts.graph, parts.attention(layer)
    H, K = g.n_heads, g.n_kv_inputs
    w_q, b_q, w_k, b_k, w_v, b_v, _, _ = parts.weights(layer)
    if g.ungrouped:  # one key/value input per query head, each through its group's weights
        (w_k, b_k), (w_v, b_v) = _ungroup(w_k, b_k, H), _ungroup(w_v, b_v, H)
    if parts.spec.qk_norm == "full":
        group = torch.arange(K) // (K // g.n_kv_heads)
        q = _full_qk(normed[:, :, :H], attn.q_proj, attn.q_norm, H, torch.arange(H))
        k = _full_qk(normed[:, :, H:H + K], attn.k_proj, attn.k_norm, g.n_kv_heads, group)
    else:
        q = _project(normed[:, :, :H], w_q, b_q)
        k = _project(normed[:, :, H:H + K], w_k, b_k)
    v = _project(normed[:, :, H + K:], w_v, b_v)
    norms = parts.qk_norms(layer) if parts.spec.qk_norm == "head" else None
    if norms is not None:  # per-head norms of queries and keys (Qwen3), before the rotation
        b, _, t, d = k.shape  # ungrouped: the inputs of a group through its key norm (one per group)
        q, k = norms[0](q), norms[1](k.reshape(b, g.n_kv_heads, -1, d)).reshape(b, K, t, d)
    if parts.clip:
        q, k, v = (t.clamp(-parts.clip, parts.clip) for t in (q, k, v))
    return q, k, v


def _rotate(parts: Parts, attn: nn.Module, q: Tensor, k: Tensor, rotary) -> tuple:
    """Queries and keys rotated by the family's ``apply_rotary_pos_emb`` (on the first
    ``attn.rotary_ndims`` columns only, where ``partial_rotary``)."""
    if rotary is None:
        return q, k
    apply = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    if parts.spec.rotary_style == "gptj":  # (B, T, H, D) layout, (sin, cos), the first rotary_dim columns
        n = attn.rotary_dim or q.shape[-1]

        def turn(x: Tensor) -> Tensor:
            x = x.transpose(1, 2)
            return torch.cat([apply(x[..., :n], *rotary), x[..., n:]], dim=-1).transpose(1, 2)

        return turn(q), turn(k)
    if not parts.spec.partial_rotary:
        return apply(q, k, *rotary)
    n = attn.rotary_ndims
    q_rot, k_rot = apply(q[..., :n], k[..., :n], *rotary)
    return torch.cat([q_rot, q[..., n:]], dim=-1), torch.cat([k_rot, k[..., n:]], dim=-1)


def _heads(parts: Parts, layer: int, x: Tensor, masks, rotary, ah: bool) -> Tensor:
    """Per-head outputs ``(B, T, H, d)`` from per-slot residual inputs ``x`` ``(B, T, H + 2K, d)``,
    ``K`` key/value inputs per layer (``graph.n_kv_inputs``). ``ah="qk-local"``: ``x`` comes from
    :func:`_qk_leaf`, and queries and keys stay differentiable (the pattern gradient ends at the leaf).
    On post-normed blocks a head's output is its share of the post-norm's output."""
    H, K = parts.graph.n_heads, parts.graph.n_kv_inputs
    attn = parts.attention(layer)
    q, k, v = _qkv(parts, layer, parts.norms(layer)[0](x))
    q, k = _rotate(parts, attn, q, k, rotary)
    if K != H:
        k = k.repeat_interleave(H // K, dim=1)
        v = v.repeat_interleave(H // K, dim=1)
    if ah is True:
        q, k = q.detach(), k.detach()
    if parts.float32_scores:
        q, k = q.float(), k.float()
    scores = softcap(torch.matmul(q, k.transpose(-1, -2)) * parts.scaling(layer), parts.attn_cap)
    scores = scores + masks(parts.window(layer))
    # eager attention takes the softmax in float32; GPT-Neo's float32 scores plus the mask in the model's dtype
    upcast = (parts.float32_softmax and not parts.float32_scores) or scores.dtype in (torch.float16, torch.bfloat16)
    probs = torch.softmax(scores.float() if upcast else scores, dim=-1).to(v.dtype)
    z = torch.matmul(probs, v)  # (B, H, T, D)
    *_, w_o, b_o = parts.weights(layer)
    out = torch.einsum("bhte,hed->bthd", z, w_o)
    out = out if b_o is None else out + (b_o / H)
    post = parts.post_norms(layer)
    if post is None:
        return out
    summed = parts.o_proj(layer)(z.transpose(1, 2).flatten(2))  # as the model sums the heads
    return split_through_norm(post[0], out, summed)


def _mlp(parts: Parts, layer: int, x: Tensor) -> Tensor:
    """The MLP node's output: what the MLP adds to the residual stream (after its post-norm, if any)."""
    out = parts.mlp(layer, parts.norms(layer)[1](x))
    post = parts.post_norms(layer)
    return out if post is None else post[1](out)


def _shared_correction(diffs: List[Tensor], starts: List[int], diff_sum: Tensor, patch: Tensor,
                       edge_mask: Tensor, slots) -> Optional[Tensor]:
    """``sum_u P[u, v] (a_u - a_u^corrupt)`` for the inputs ``slots`` under a ``(U, V)`` patch.

    One contraction over the nodes with a patched edge into ``slots`` or, when fewer edges are
    kept than patched (small circuits), ``diff_sum`` (the sum over every node written so far,
    all of which feed these inputs) minus the contraction over the kept edges. A per-node
    loop costs a pass over the ``(B, T, V, d)`` result per node: on deep models that was the
    dominant cost of circuit evaluation.
    """
    n = starts[-1] + diffs[-1].shape[2]
    p = patch[:n, slots]
    block = edge_mask[:n, slots]
    p, block = (p.unsqueeze(-1), block.unsqueeze(-1)) if isinstance(slots, int) else (p, block)
    if not bool(p.any()):
        return None
    kept = block.to(p.dtype) - p
    complement = bool(block.all()) and int(kept.count_nonzero()) < int(p.count_nonzero())
    weights = kept if complement else p
    active = weights.any(1).tolist()
    nodes = [i for i, (start, diff) in enumerate(zip(starts, diffs)) if any(active[start:start + diff.shape[2]])]
    part = None
    if nodes:
        stacked = torch.cat([diffs[i] for i in nodes], dim=2) if len(nodes) > 1 else diffs[nodes[0]]
        w = torch.cat([weights[starts[i]:starts[i] + diffs[i].shape[2]] for i in nodes], dim=0)
        part = torch.einsum("btud,uv->btvd", stacked, w)
    if not complement:
        return part
    everything = diff_sum[:, :, None].expand(-1, -1, p.shape[1], -1)
    return everything if part is None else everything - part


def _minus_reference(out: Tensor, reference: Tensor) -> Tensor:
    """``out - reference``; ``reference`` may hold ``B`` rows for ``k * B`` rows of ``out`` (tiled)."""
    if reference.shape[0] == out.shape[0]:
        return out - reference
    tiles = out.shape[0] // reference.shape[0]
    return (out.reshape(tiles, *reference.shape) - reference[None]).reshape(out.shape)


def graph_forward(
    model: nn.Module,
    graph: ComponentGraph,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    patch: Optional[Tensor] = None,
    corrupt_outputs: Optional[Tensor] = None,
    input_embeds: Optional[Tensor] = None,
    ah: Union[bool, str] = False,
) -> GraphRun:
    r"""Run ``model`` over its component graph, optionally patching edges.

    Args:
        model (nn.Module): a supported Hugging Face causal LM (see
            :func:`~captum_relp.edges.build_graph`), in eval mode.
        graph (ComponentGraph): ``build_graph(model)``.
        input_ids (Tensor): ``(B, T)`` token ids.
        attention_mask (Tensor, optional): ``(B, T)``, 1 for real tokens (right padding).
        patch (Tensor, optional): ``(U, V)`` or per-row ``(B, U, V)`` patch matrix
            (1 = edge patched; fractional values interpolate). Entries off
            ``graph.edge_mask`` are ignored. Needs ``corrupt_outputs``.
        corrupt_outputs (Tensor, optional): ``(B, T, U, d)`` node outputs of the
            reference run (``GraphRun.outputs`` of the corrupt prompts); ``B`` may
            divide the batch, for tiled copies ``[row0..rowB-1, row0..]`` of the prompts.
        input_embeds (Tensor, optional): ``(B, T, d)`` replaces the output of the
            ``input`` node (used by EAP-IG-inputs).
        ah (bool or str): ``True`` applies the AH-rule (attention probabilities constant in
            backward). ``"qk-local"``: the AH-rule for the residual stream, and the query and
            key inputs (``GraphRun.inputs``) get the *local* pattern gradient: they enter the
            attention scores through a gradient leaf of their own, so the coefficient there is
            the softmax gradient at that head, driven by the AH coefficient of its output, and
            nothing of it flows on into earlier nodes. The forward values are the same.

    Returns:
        GraphRun: logits, node outputs and downstream inputs.

    Examples::

        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from captum_relp.edges import build_graph, graph_forward
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50)).eval()
        >>> ids = torch.randint(50, (2, 5))
        >>> run = graph_forward(model, build_graph(model), ids)
        >>> torch.allclose(run.logits, model(ids).logits, atol=1e-5)
        True
    """
    if patch is not None and corrupt_outputs is None:
        raise ValueError("patch needs corrupt_outputs (GraphRun.outputs of the reference run)")
    check_token_ids(model, (input_ids,))
    parts = Parts(model, graph)
    batch, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device)[None].expand(batch, length)
    embeds = parts.embed(input_ids, positions, attention_mask) if input_embeds is None else input_embeds
    if torch.is_grad_enabled() and not embeds.requires_grad:
        embeds = embeds.detach().requires_grad_(True)  # frozen parameters: start the autograd graph here
    windows: dict = {}
    bias = parts.position_bias(attention_mask, batch, length, embeds)

    def masks(window: Optional[int]) -> Tensor:
        """The additive mask of a window, plus the ALiBi bias where the family has one."""
        if window not in windows:
            windows[window] = _additive_mask(attention_mask, batch, length, embeds, window)
            windows[window] = windows[window] if bias is None else windows[window] + bias
        return windows[window]

    rotary = parts.rotary(embeds, positions)
    edge_mask = graph.edge_mask.to(embeds.device)
    if patch is not None:
        patch = patch.to(embeds.dtype) * edge_mask
    outputs: List[Tensor] = []
    diffs: List[Tensor] = []
    starts: List[int] = []
    inputs: List[Tensor] = []
    state = {"total": None, "diff_sum": None}

    def write(out: Tensor) -> None:
        starts.append(sum(o.shape[2] for o in outputs))
        outputs.append(out)
        summed = out.sum(dim=2)
        state["total"] = summed if state["total"] is None else state["total"] + summed
        if patch is not None:
            reference = corrupt_outputs[:, :, starts[-1]:starts[-1] + out.shape[2]]
            diffs.append(_minus_reference(out, reference))
            summed_diff = diffs[-1].sum(dim=2)
            state["diff_sum"] = summed_diff if state["diff_sum"] is None else state["diff_sum"] + summed_diff

    def read(slots) -> Tensor:
        width = 1 if isinstance(slots, int) else slots.stop - slots.start
        total = state["total"][:, :, None].expand(-1, -1, width, -1)
        if patch is None:
            return total
        if patch.dim() == 2:  # one patch for all rows (circuit evaluation): one contraction
            correction = _shared_correction(diffs, starts, state["diff_sum"], patch, edge_mask, slots)
            return total if correction is None else total - correction
        correction = None
        for start, diff in zip(starts, diffs):
            p = patch[..., start:start + diff.shape[2], slots]
            p = p.unsqueeze(-1) if isinstance(slots, int) else p
            if not bool(p.any()):
                continue
            term = torch.einsum("btud,uv->btvd" if p.dim() == 2 else "btud,buv->btvd", diff, p)
            correction = term if correction is None else correction + term
        return total if correction is None else total - correction

    if ah not in (False, True, "qk-local"):
        raise ValueError(f"ah must be False, True or 'qk-local', got {ah!r}")
    write(embeds[:, :, None])
    for layer in range(graph.n_layers):
        attn_in = read(graph.attn_slots(layer))
        if ah == "qk-local":
            attn_in = _qk_leaf(attn_in, graph.n_heads + graph.n_kv_inputs)
        mlp_in = read(graph.mlp_slot(layer)) if graph.parallel else None
        write(_heads(parts, layer, attn_in, masks, rotary(layer), ah))
        if mlp_in is None:
            mlp_in = read(graph.mlp_slot(layer))
        write(_mlp(parts, layer, mlp_in[:, :, 0])[:, :, None])
        inputs += [attn_in, mlp_in]
    final_in = read(graph.logits_slot)
    inputs.append(final_in)
    logits = softcap_logits(model, parts.unembed(final_in[:, :, 0]), parts.logit_cap)
    return GraphRun(logits, torch.cat(outputs, dim=2), inputs)


__all__ = ["GraphRun", "graph_forward"]
