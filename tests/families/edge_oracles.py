"""Edge oracles on the Hugging Face model itself, sharing no code with ``captum_relp.edges.patching``.

* :func:`hook_edge_effect`: the effect of patching one edge ``u -> v``, recomputed with forward
  hooks: node outputs are read off a clean and a corrupt run of the model, and a clean run is
  repeated with ``v``'s input moved by ``a_u(corrupt) - a_u(clean)``.
* :func:`node_modules`: the module whose output is each node's output (what the node adds to the
  residual stream), for node-level attribution (AtP, RelP) to compare with summed edge scores.

A head's output is its slice of the attention output projection (bias split evenly over the
heads); on post-normed blocks it is that times the post-norm's elementwise factor
``output / input``, so the heads' outputs sum to what the layer adds to the residual stream.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from captum_relp.families import FAMILY_TABLE, config_value


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _kv(model) -> Tuple[int, int]:
    family = FAMILY_TABLE[model.config.model_type]
    return family.num_heads(model.config), family.num_kv_heads(model.config)


class Model:
    """Paths of one family's modules, read from its table entry."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = FAMILY_TABLE[model.config.model_type]
        self.spec = self.family.edges
        self.base = model.base_model
        self.blocks = list(_get(self.base, self.family.blocks))
        self.H, self.K = _kv(model)

    def block(self, layer: int, path) -> nn.Module:
        return _get(self.blocks[layer], path)

    def o_proj(self, layer: int) -> nn.Module:
        return self.block(layer, self.family.o_proj)

    def pre_norm(self, layer: int, which: int):
        name = config_value(self.model.config, self.spec.norms[which])
        return self.block(layer, name) if name else None

    def post_norm(self, layer: int, which: int):
        return self.block(layer, self.spec.post_norms[which]) if self.spec.post_norms else None

    def mlp_out(self, layer: int) -> nn.Module:
        """The module whose output is the MLP's output (OPT: ``fc2``, on flattened rows)."""
        return self.post_norm(layer, 1) or self.block(layer, self.family.mlp or "fc2")

    def mlp_reader(self, layer: int) -> nn.Module:
        """The module whose input is the MLP's residual input."""
        return self.pre_norm(layer, 1) or self.block(layer, self.family.mlp)


def node_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``[(node group, module)]``: ``input`` (token embedding), ``a{l}`` (the attention layer's
    residual write), ``m{l}``; the module's output is the group's summed output."""
    m = Model(model)
    project_in = getattr(getattr(m.base, "decoder", None), "project_in", None)  # OPT: tokens projected
    out = [("input", project_in or _get(m.base, m.spec.embed_norm or m.spec.embed[0]))]
    for layer in range(len(m.blocks)):
        out.append((f"a{layer}", m.post_norm(layer, 0) or m.o_proj(layer)))
        out.append((f"m{layer}", m.mlp_out(layer)))
    return out


def _out(output):
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def _hooks(pairs):
    handles = [register(fn) for register, fn in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _head_share(o_proj: nn.Module, z: Tensor, head: int, n_heads: int) -> Tensor:
    """Head ``head``'s term of ``o_proj(z)``, with the bias split evenly over the heads."""
    width = z.shape[-1] // n_heads
    keep = torch.zeros_like(z)
    keep[..., head * width:(head + 1) * width] = z[..., head * width:(head + 1) * width]
    out = o_proj(keep)
    bias = getattr(o_proj, "bias", None)
    return out if bias is None else out - bias * (n_heads - 1) / n_heads


def node_outputs(model: nn.Module, ids: Tensor, mask: Tensor) -> Dict[str, Tensor]:
    """``{upstream node name: (B, T, d) output}`` of one run, read with hooks."""
    m = Model(model)
    seen: Dict[str, Tensor] = {}

    def keep(key, read):
        return lambda module, args, output: seen.__setitem__(key, read(args, output).detach().clone())

    embeds = [_get(m.base, path) for path in m.spec.embed]
    project_in = getattr(getattr(m.base, "decoder", None), "project_in", None)  # OPT: tokens projected
    embeds[0] = project_in or embeds[0]
    pairs = [(e.register_forward_hook, keep(f"embed{i}", lambda a, o: _out(o))) for i, e in enumerate(embeds)]
    if m.spec.embed_norm:
        pairs.append((_get(m.base, m.spec.embed_norm).register_forward_hook, keep("embed_norm", lambda a, o: o)))
    for layer in range(len(m.blocks)):
        pairs.append((m.o_proj(layer).register_forward_hook, keep(f"z{layer}", lambda a, o: a[0])))
        post = m.post_norm(layer, 0)
        if post is not None:
            pairs.append((post.register_forward_hook, keep(f"ratio{layer}", lambda a, o: o / a[0])))
        pairs.append((m.mlp_out(layer).register_forward_hook, keep(f"m{layer}", lambda a, o: _out(o))))
    with torch.no_grad(), _hooks(pairs):
        model(ids, attention_mask=mask)
    nodes = {"input": sum(seen.pop(f"embed{i}") for i in range(len(m.spec.embed)))}
    if m.spec.embed_norm:  # BLOOM: the input node is the normalised embedding
        nodes["input"] = seen.pop("embed_norm")
    for layer in range(len(m.blocks)):
        z = seen[f"z{layer}"]
        for h in range(m.H):
            with torch.no_grad():
                share = _head_share(m.o_proj(layer), z, h, m.H)
            nodes[f"a{layer}.h{h}"] = share * seen[f"ratio{layer}"] if f"ratio{layer}" in seen else share
        nodes[f"m{layer}"] = seen[f"m{layer}"].reshape(nodes["input"].shape)
    return nodes


def _qkv_columns(m: Model, kind: str, head: int, width: int) -> Tuple[str, slice]:
    """The projection whose output holds ``kind`` (q, k, v) of ``head``, and its columns there."""
    D, H, K = width, m.H, m.K
    which = "qkv".index(kind)
    layout = config_value(m.model.config, m.spec.qkv)
    if layout == "conv1d":
        start = which * H * D + head * D
        return "c_attn", slice(start, start + D)
    if layout == "neox":
        start = head * 3 * D + which * D
        return m.spec.fused or "query_key_value", slice(start, start + D)
    if layout == "grouped":  # per key/value group: its queries, its key, its value
        r = H // K
        group, index = (head // r, head % r) if kind == "q" else (head, r + which - 1)
        start = (group * (r + 2) + index) * D
        return m.spec.fused or "query_key_value", slice(start, start + D)
    if layout == "codegen":  # mp_num blocks of [q | v | k]
        local = m.model.config.hidden_size // attn_mp(m)
        j = torch.arange(head * D, (head + 1) * D)
        return "qkv_proj", j // local * 3 * local + (0, 2, 1)[which] * local + j % local
    if layout == "fused":
        start = (0, H * D, (H + K) * D)[which] + head * D
        return m.spec.fused or "qkv_proj", slice(start, start + D)
    if m.spec.qk_norm == "full" and kind != "v":
        return f"{kind}_norm", slice(head * D, (head + 1) * D)
    return f"{kind}_proj", slice(head * D, (head + 1) * D)


def attn_mp(m: Model) -> int:
    return m.block(0, m.family.o_proj.rpartition(".")[0]).mp_num


def _recompute(m: Model, attn: nn.Module, module: str, x: Tensor) -> Tensor:
    """The output of ``attn.<module>`` had the attention layer read residual ``x``."""
    layer_norm = m.pre_norm(m.layer_of[attn], 0)
    normed = layer_norm(x) if layer_norm is not None else x
    if module.endswith("_norm"):
        return getattr(attn, module)(getattr(attn, module[0] + "_proj")(normed))
    return getattr(attn, module)(normed)


def hook_edge_effect(model: nn.Module, metric, clean: Tensor, corrupt: Tensor, mask: Tensor,
                     upstream: str, downstream: str) -> float:
    """``metric(clean) - metric(clean with upstream -> downstream patched)``, mean over rows."""
    m = Model(model)
    attention = m.family.o_proj.rpartition(".")[0]  # the module holding the projections
    m.layer_of = {_get(b, attention): i for i, b in enumerate(m.blocks)}
    delta = node_outputs(model, corrupt, mask)[upstream] - node_outputs(model, clean, mask)[upstream]
    if downstream == "logits":
        reader = _get(m.base, m.spec.final_norm)
        pairs = [(reader.register_forward_pre_hook, lambda mod, args: (args[0] + delta, *args[1:]))]
    elif "<" not in downstream and m.family.is_parallel(model.config):  # the MLP reads the block's input
        layer, stash = int(downstream[1:]), {}
        norm = m.pre_norm(layer, 1) or (lambda x: x)

        def grab(mod, args, kwargs):
            stash["x"] = args[0] if args else kwargs["hidden_states"]

        pairs = [(lambda fn: m.blocks[layer].register_forward_pre_hook(fn, with_kwargs=True), grab),
                 (m.block(layer, m.family.mlp).register_forward_pre_hook,
                  lambda mod, args: (norm(stash["x"] + delta), *args[1:]))]
    elif "<" not in downstream:
        reader = m.mlp_reader(int(downstream[1:]))  # OPT: on flattened rows
        pairs = [(reader.register_forward_pre_hook, lambda mod, args: (args[0] + delta.reshape(args[0].shape), *args[1:]))]
    else:
        layer, head = (int(p[1:]) for p in downstream.split("<")[0].split("."))
        kind = downstream.split("<")[1][0]
        attn = m.block(layer, attention)
        width = attn.head_dim if hasattr(attn, "head_dim") else model.config.hidden_size // m.H
        module, cols = _qkv_columns(m, kind, head, width)
        stash = {}

        def grab(mod, args, kwargs):
            stash["x"] = args[0] if args else kwargs["hidden_states"]

        def replace(mod, args, output):
            if stash.get("inside"):  # the recomputation's own call
                return output
            stash["inside"] = True
            output = output.clone()
            output[..., cols] = _recompute(m, attn, module, stash["x"] + delta)[..., cols]
            stash["inside"] = False
            return output

        pairs = [(lambda fn: m.blocks[layer].register_forward_pre_hook(fn, with_kwargs=True), grab),
                 (getattr(attn, module).register_forward_hook, replace)]
    with torch.no_grad():
        clean_value = metric(model(clean, attention_mask=mask).logits).mean()
        with _hooks(pairs):
            patched = metric(model(clean, attention_mask=mask).logits).mean()
    return float(clean_value - patched)


@contextlib.contextmanager
def float64_norms(model_type: str):
    """The family's RMSNorm classes computing in the input's dtype (not float32) while inside."""
    import importlib
    family = FAMILY_TABLE[model_type]
    module = importlib.import_module(family.module)
    saved = []
    for norm in family.norms:
        if not norm.rms or "." in norm.cls:
            continue
        cls = getattr(module, norm.cls)

        def forward(self, x, offset=norm.weight_offset):
            eps = getattr(self, "eps", None) or self.variance_epsilon
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + self.weight)

        saved.append((cls, cls.forward))
        cls.forward = forward
    try:
        yield
    finally:
        for cls, forward in saved:
            cls.forward = forward
