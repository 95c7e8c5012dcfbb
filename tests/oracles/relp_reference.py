"""An independent RelP: plain-torch forwards of Hugging Face language models (the families of
``FORWARDS``) that read the model's weights, with every LRP rule written in its "detach" form.

Nothing here comes from ``captum_relp``. The rules, as the paper states them:

* LN-rule: the normaliser (std for LayerNorm, rms for RMSNorm) is detached;
* Identity-rule: ``act(x) = x * (act(x) / x).detach()``;
* Half-rule: ``g * u = 0.5 * (g * u.detach()) + 0.5 * (g.detach() * u)``;
* AH-rule: the attention probabilities are detached.

Scores follow Captum's sign: ``(a(clean) - a(corrupt)) * d metric / d a`` with the gradient taken
through the rules on the clean run, zero at padded positions.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor

PRESET_RULES = {"none": frozenset(), "relp": frozenset({"ln", "identity", "half"}),
                "relp-ah": frozenset({"ln", "identity", "half", "ah"})}
"""The rules each preset applies (docs/rules.md: the paper's Table 4, plus the AH-rule)."""

Key = Tuple[str, int]


def _keep_value(linear: Tensor, value: Tensor) -> Tensor:
    """``value`` in the forward pass, the gradient of ``linear`` in the backward pass."""
    return linear + (value - linear).detach()


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, rules) -> Tensor:
    centred = x - x.mean(-1, keepdim=True)
    std = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    if "ln" in rules:
        std = std.detach()
    return centred / std * weight + bias


def olmo_layer_norm(x: Tensor, weight, eps: float, rules) -> Tensor:
    """OLMo's LayerNorm: no weight or bias, eps 1e-5 (fixed in the model), computed in float32 as the
    model does."""
    value = torch.nn.functional.layer_norm(x.to(torch.float32), x.shape[-1:], eps=1e-5).to(x.dtype)
    if "ln" not in rules:
        return value
    centred = x - x.mean(-1, keepdim=True)
    std = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5).detach()
    return _keep_value(centred / std, value.detach())


def llama_rms_norm(x: Tensor, weight: Tensor, eps: float, rules) -> Tensor:
    """Llama's RMSNorm, normalising in float32 as the model does; under the LN-rule the gradient is
    that of ``weight * x / rms(x)`` with ``rms`` detached, in the input's dtype."""
    x32 = x.to(torch.float32)
    value = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if "ln" not in rules:
        return value
    rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps).detach()
    return _keep_value(weight * (x / rms), value.detach())


def activation(fn, x: Tensor, rules, at_zero: float = 0.5) -> Tensor:
    """``fn(x)``; under the Identity-rule ``x * (fn(x) / x).detach()``, the ratio's limit ``fn'(0)``
    (``at_zero``) where ``x`` is 0."""
    value = fn(x)
    if "identity" not in rules:
        return value
    ratio = torch.where(x != 0, value / x, torch.full_like(x, at_zero))
    return x * ratio.detach()


def gated_product(gate: Tensor, up: Tensor, rules) -> Tensor:
    if "half" not in rules:
        return gate * up
    return 0.5 * (gate * up.detach()) + 0.5 * (gate.detach() * up)


def gelu_new(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def silu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, rules, window=None,
           softcap=None, softmax_dtype=None, bias=None, causal=True, band=None) -> Tensor:
    """Causal attention over ``(B, H, T, D)`` with padded keys masked (and keys ``window`` or more
    positions back, for a sliding window; scores soft-capped by ``softcap``; ``bias`` added to the
    scores (ALiBi); the softmax in ``softmax_dtype`` where the model upcasts it; every real key for
    an encoder, ``causal=False``, or those at most ``band`` positions away); ``(B, T, H * D)``."""
    T = q.shape[-2]
    seen = torch.ones(T, T, dtype=torch.bool)
    if causal:
        seen = seen.tril()
    if window is not None:
        seen = seen & torch.ones(T, T, dtype=torch.bool).triu(1 - window)
    if band is not None:
        seen = seen & torch.ones(T, T, dtype=torch.bool).triu(-band).tril(band)
    allowed = seen[None, None] & mask.bool()[:, None, None, :]
    scores = _softcap(q @ k.transpose(-1, -2) * scale, softcap)
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, torch.finfo(q.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(q.dtype)
    if "ah" in rules:
        probs = probs.detach()
    out = probs @ v
    return out.transpose(1, 2).reshape(q.shape[0], T, -1)


def gpt2_forward(model, ids: Tensor, mask: Tensor, rules) -> Tuple[Dict[Key, Tensor], Tensor]:
    """``({(kind, layer): activation}, logits)`` of a ``GPT2LMHeadModel`` (``Conv1D`` weights) or a
    ``GPTBigCodeForCausalLM`` (multi-query attention); kinds resid, heads, attn, mlp."""
    cfg, w = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    conv = cfg.model_type == "gpt2"
    B, T = ids.shape
    H, d = cfg.n_head, cfg.n_embd
    D = d // H
    eps, act = cfg.layer_norm_epsilon, ACTIVATIONS[cfg.activation_function]

    def linear(x: Tensor, name: str) -> Tensor:  # Conv1D stores (in, out), Linear (out, in)
        weight = w[name + ".weight"]
        return x @ (weight if conv else weight.T) + w[name + ".bias"]

    h = (w["transformer.wte.weight"][ids] + w["transformer.wpe.weight"][torch.arange(T)]).requires_grad_()
    acts: Dict[Key, Tensor] = {}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        acts["resid", i] = h
        a = layer_norm(h, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps, rules)
        kv_heads = 1 if getattr(cfg, "multi_query", False) else H
        q, k, v = linear(a, p + "attn.c_attn").split([d, kv_heads * D, kv_heads * D], dim=-1)
        q, k, v = (t.reshape(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
        k, v = k.repeat_interleave(H // kv_heads, dim=1), v.repeat_interleave(H // kv_heads, dim=1)
        z = attend(q, k, v, mask, D ** -0.5, rules)
        acts["heads", i] = z
        o = linear(z, p + "attn.c_proj")
        acts["attn", i] = o
        h = h + o
        m = layer_norm(h, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps, rules)
        m = linear(activation(act, linear(m, p + "mlp.c_fc"), rules), p + "mlp.c_proj")
        acts["mlp", i] = m
        h = h + m
    h = layer_norm(h, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], eps, rules)
    return acts, h @ w["lm_head.weight"].T


def rope_tables(cfg, length: int, dtype: torch.dtype, head_dim: int, layer_type=None) -> Tuple[Tensor, Tensor]:
    """Default RoPE ``(cos, sin)`` ``(T, 2 * len(inv_freq))`` (the rotated dimensions): angles in
    float32, as the models compute them; ``partial_rotary_factor`` rotates the leading dimensions;
    ``layer_type`` picks the parameters of that kind of layer (Gemma-3)."""
    params = cfg.rope_parameters[layer_type] if layer_type else cfg.rope_parameters
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    angles = torch.arange(length).float()[:, None] * inv_freq[None]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the leading ``cos.shape[-1]`` dimensions of ``x`` (``rotate_half`` layout)."""
    n = cos.shape[-1]
    x_rot, x_pass = x[..., :n], x[..., n:]
    rotated = torch.cat((-x_rot[..., n // 2:], x_rot[..., :n // 2]), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def gemma_rms_norm(x: Tensor, weight: Tensor, eps: float, rules) -> Tensor:
    """Gemma's RMSNorm ``x / rms(x) * (1 + weight)``, computed in float32 as the model does."""
    x32 = x.to(torch.float32)
    value = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())).to(x.dtype)
    if "ln" not in rules:
        return value
    rms = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps).detach()
    return _keep_value((1.0 + weight) * (x / rms), value.detach())


def gelu_tanh(x: Tensor) -> Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


def gelu(x: Tensor) -> Tensor:
    return torch.nn.functional.gelu(x)


LLAMA_LIKE = {  # model_type: (norm, MLP activation, embeddings scaled by sqrt(hidden size))
    "llama": (llama_rms_norm, silu, False), "mistral": (llama_rms_norm, silu, False),
    "qwen2": (llama_rms_norm, silu, False), "qwen3": (llama_rms_norm, silu, False),
    "gemma": (gemma_rms_norm, gelu_tanh, True), "gemma2": (gemma_rms_norm, gelu_tanh, True),
    "gemma3_text": (gemma_rms_norm, gelu_tanh, True),
    "olmo": (olmo_layer_norm, silu, False), "olmo2": (llama_rms_norm, silu, False),
    "phi3": (llama_rms_norm, silu, False), "starcoder2": (layer_norm, gelu_tanh, False),
}
ACTIVATIONS = {"silu": silu, "gelu_pytorch_tanh": gelu_tanh, "gelu": gelu, "gelu_new": gelu_new}


def _windows(cfg) -> list:
    """The sliding window of each layer (``None``: full causal attention)."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return [window] * cfg.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in types]


def _softcap(x: Tensor, cap, rules=()) -> Tensor:
    if cap is None:
        return x
    value = torch.tanh(x / cap) * cap
    return activation(lambda t: value, x, rules, at_zero=1.0) if "identity" in rules else value


def llama_forward(model, ids: Tensor, mask: Tensor, rules) -> Tuple[Dict[Key, Tensor], Tensor]:
    """``({(kind, layer): activation}, logits)`` of a Llama-style causal LM (``LLAMA_LIKE``): default
    RoPE, grouped-query attention, sliding windows, what the weights show (q/k/v/o biases, a fused
    qkv or gate/up projection, a plain MLP); query/key norms per head (Qwen3) or over the whole
    projection (OLMo-2) on the plain gradient under every preset; Gemma-2 and -3's norms after
    attention and MLP (OLMo-2: only those), query scale and soft-capped logits (the Identity-rule
    on the cap), Gemma-2's soft-capped scores, Gemma-3's RoPE per kind of layer."""
    cfg, w = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    rms_norm, act, scaled = LLAMA_LIKE[cfg.model_type]
    assert ACTIVATIONS[getattr(cfg, "hidden_activation", None) or cfg.hidden_act] is act
    B, T = ids.shape
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    scale = (getattr(cfg, "query_pre_attn_scalar", None) or D) ** -0.5
    eps = getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "norm_epsilon", None)

    def norm(x: Tensor, name: str, norm_rules=rules) -> Tensor:
        if rms_norm is layer_norm:
            return layer_norm(x, w[name + ".weight"], w[name + ".bias"], eps, norm_rules)
        return rms_norm(x, w.get(name + ".weight"), eps, norm_rules)

    def linear(x: Tensor, name: str) -> Tensor:
        out = x @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    embed = w["model.embed_tokens.weight"]
    per_type = "full_attention" in cfg.rope_parameters  # Gemma-3: RoPE parameters per kind of layer
    tables = {kind: rope_tables(cfg, T, embed.dtype, D, kind if per_type else None)
              for kind in set(getattr(cfg, "layer_types", None) or [None])}
    h = embed[ids]
    if scaled:
        h = h * torch.tensor(cfg.hidden_size ** 0.5, dtype=embed.dtype)
    h = h.requires_grad_()
    acts: Dict[Key, Tensor] = {}
    for i, window in enumerate(_windows(cfg)):
        p = f"model.layers.{i}."
        cos, sin = tables[cfg.layer_types[i] if getattr(cfg, "layer_types", None) else None]
        post_only = cfg.model_type == "olmo2"  # norms after attention and MLP only
        sandwich = p + "pre_feedforward_layernorm.weight" in w  # Gemma-2: norms before and after
        acts["resid", i] = h
        a = h if post_only else norm(h, p + "input_layernorm")
        if p + "self_attn.qkv_proj.weight" in w:
            q, k, v = linear(a, p + "self_attn.qkv_proj").split([H * D, Hkv * D, Hkv * D], dim=-1)
        else:
            q, k, v = (linear(a, p + f"self_attn.{n}_proj") for n in "qkv")
        if p + "self_attn.q_norm.weight" in w:  # no rule: the plain gradient
            full = w[p + "self_attn.q_norm.weight"].numel() == H * D
            q, k = (norm(t if full else t.reshape(B, T, -1, D), p + f"self_attn.{n}_norm", ()).reshape(B, T, -1)
                    for t, n in ((q, "q"), (k, "k")))
        q, k, v = (t.reshape(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        softcap = cfg.attn_logit_softcapping if cfg.model_type == "gemma2" else None  # eager, float32 softmax
        z = attend(q, k, v, mask, scale, rules, window, softcap, torch.float32 if softcap else None)
        acts["heads", i] = z
        o = linear(z, p + "self_attn.o_proj")
        acts["attn", i] = o
        h = h + (norm(o, p + "post_attention_layernorm") if sandwich or post_only else o)
        m = h if post_only else norm(h, p + ("pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"))
        if p + "mlp.c_fc.weight" in w:  # a plain MLP
            m = linear(activation(act, linear(m, p + "mlp.c_fc"), rules), p + "mlp.c_proj")
        else:
            if p + "mlp.gate_up_proj.weight" in w:
                gate, up = linear(m, p + "mlp.gate_up_proj").chunk(2, dim=-1)
            else:
                gate, up = linear(m, p + "mlp.gate_proj"), linear(m, p + "mlp.up_proj")
            m = linear(gated_product(activation(act, gate, rules), up, rules), p + "mlp.down_proj")
        acts["mlp", i] = m
        h = h + (norm(m, p + "post_feedforward_layernorm") if sandwich or post_only else m)
    h = norm(h, "model.norm")
    logits = h @ w.get("lm_head.weight", embed).T
    return acts, _softcap(logits, getattr(cfg, "final_logit_softcapping", None), rules)


def gpt_neox_forward(model, ids: Tensor, mask: Tensor, rules) -> Tuple[Dict[Key, Tensor], Tensor]:
    """``({(kind, layer): activation}, logits)`` of a ``GPTNeoXForCausalLM``: LayerNorm, fused
    per-head ``[q | k | v]`` projection, partial RoPE, parallel or sequential residual, GELU MLP."""
    cfg, w = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    B, T = ids.shape
    H = cfg.num_attention_heads
    D = cfg.hidden_size // H
    eps, act = cfg.layer_norm_eps, ACTIVATIONS[cfg.hidden_act]
    embed = w["gpt_neox.embed_in.weight"]
    cos, sin = rope_tables(cfg, T, embed.dtype, D)
    h = embed[ids].requires_grad_()
    acts: Dict[Key, Tensor] = {}

    def mlp(x: Tensor, p: str) -> Tensor:
        x = activation(act, x @ w[p + "mlp.dense_h_to_4h.weight"].T + w[p + "mlp.dense_h_to_4h.bias"], rules)
        return x @ w[p + "mlp.dense_4h_to_h.weight"].T + w[p + "mlp.dense_4h_to_h.bias"]

    for i in range(cfg.num_hidden_layers):
        p = f"gpt_neox.layers.{i}."
        acts["resid", i] = h
        a = layer_norm(h, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps, rules)
        qkv = a @ w[p + "attention.query_key_value.weight"].T + w[p + "attention.query_key_value.bias"]
        q, k, v = qkv.reshape(B, T, H, 3 * D).transpose(1, 2).chunk(3, dim=-1)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        z = attend(q, k, v, mask, D ** -0.5, rules)
        acts["heads", i] = z
        o = z @ w[p + "attention.dense.weight"].T + w[p + "attention.dense.bias"]
        acts["attn", i] = o
        ln2 = (w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"], eps, rules)
        if cfg.use_parallel_residual:
            m = mlp(layer_norm(h, *ln2), p)
            acts["mlp", i] = m
            h = h + o + m
        else:
            h = h + o
            m = mlp(layer_norm(h, *ln2), p)
            acts["mlp", i] = m
            h = h + m
    h = layer_norm(h, w["gpt_neox.final_layer_norm.weight"], w["gpt_neox.final_layer_norm.bias"], eps, rules)
    return acts, h @ w["lm_head.weight"].T


def gptj_forward(model, ids: Tensor, mask: Tensor, rules) -> Tuple[Dict[Key, Tensor], Tensor]:
    """``({(kind, layer): activation}, logits)`` of a ``GPTJForCausalLM`` or ``CodeGenForCausalLM``:
    one LayerNorm feeding attention and MLP in parallel, interleaved RoPE on the first
    ``rotary_dim`` dimensions; CodeGen's fused projection in four ``[q | v | k]`` groups."""
    cfg, w = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    B, T = ids.shape
    H, d = cfg.n_head, cfg.n_embd
    D, R = d // H, cfg.rotary_dim or d // H
    eps, act = cfg.layer_norm_epsilon, ACTIVATIONS[cfg.activation_function]
    dtype = w["lm_head.weight"].dtype
    # sinusoids in float32 as the model computes them, each repeated for a pair of dimensions
    inv_freq = 1.0 / (10000 ** (torch.arange(0, R, 2, dtype=torch.int64) / R))
    angles = torch.arange(T, dtype=torch.int64).float()[:, None] * inv_freq
    sin, cos = (f(angles).to(dtype).repeat_interleave(2, dim=-1)[None, :, None] for f in (torch.sin, torch.cos))

    def rotate(x: Tensor) -> Tensor:  # (B, T, H, D): rotate the pairs (x0, x1), (x2, x3), ... of the first R
        x_rot, x_pass = x[..., :R], x[..., R:]
        pairs = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
        return torch.cat((x_rot * cos + pairs * sin, x_pass), dim=-1)

    def linear(x: Tensor, name: str) -> Tensor:
        out = x @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    h = w["transformer.wte.weight"][ids].requires_grad_()
    acts: Dict[Key, Tensor] = {}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        acts["resid", i] = h
        a = layer_norm(h, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps, rules)
        if cfg.model_type == "codegen":  # 4 groups of [q | v | k], each a quarter of the width
            q, v, k = (t.reshape(B, T, H, D) for t in
                       linear(a, p + "attn.qkv_proj").reshape(B, T, 4, -1).chunk(3, dim=-1))
        else:
            q, k, v = (linear(a, p + f"attn.{n}_proj").reshape(B, T, H, D) for n in "qkv")
        q, k, v = rotate(q).transpose(1, 2), rotate(k).transpose(1, 2), v.transpose(1, 2)
        z = attend(q, k, v, mask, D ** -0.5, rules)
        acts["heads", i] = z
        o = linear(z, p + "attn.out_proj")
        acts["attn", i] = o
        m = linear(activation(act, linear(a, p + "mlp.fc_in"), rules), p + "mlp.fc_out")
        acts["mlp", i] = m
        h = h + o + m
    h = layer_norm(h, w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], eps, rules)
    return acts, linear(h, "lm_head")


def phi_forward(model, ids: Tensor, mask: Tensor, rules) -> Tuple[Dict[Key, Tensor], Tensor]:
    """``({(kind, layer): activation}, logits)`` of a ``PhiForCausalLM``: one LayerNorm feeding
    attention and MLP in parallel, grouped-query attention, per-head query/key LayerNorms (plain
    gradient under every preset), partial RoPE."""
    cfg, w = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    B, T = ids.shape
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    eps, act = cfg.layer_norm_eps, ACTIVATIONS[cfg.hidden_act]
    embed = w["model.embed_tokens.weight"]
    cos, sin = rope_tables(cfg, T, embed.dtype, D)

    def linear(x: Tensor, name: str) -> Tensor:
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    h = embed[ids].requires_grad_()
    acts: Dict[Key, Tensor] = {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        acts["resid", i] = h
        a = layer_norm(h, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps, rules)
        q, k, v = (linear(a, p + f"self_attn.{n}_proj").reshape(B, T, -1, D).transpose(1, 2) for n in "qkv")
        if cfg.qk_layernorm:  # no rule: the plain gradient
            q, k = (layer_norm(t, w[p + f"self_attn.{n}_layernorm.weight"], w[p + f"self_attn.{n}_layernorm.bias"],
                               eps, ()) for t, n in ((q, "q"), (k, "k")))
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        z = attend(q, k, v, mask, D ** -0.5, rules)
        acts["heads", i] = z
        o = linear(z, p + "self_attn.dense")
        acts["attn", i] = o
        m = linear(activation(act, linear(a, p + "mlp.fc1"), rules), p + "mlp.fc2")
        acts["mlp", i] = m
        h = h + o + m
    h = layer_norm(h, w["model.final_layernorm.weight"], w["model.final_layernorm.bias"], eps, rules)
    return acts, linear(h, "lm_head")


def opt_forward(model, ids: Tensor, mask: Tensor, rules) -> Tuple[Dict[Key, Tensor], Tensor]:
    """``({(kind, layer): activation}, logits)`` of an ``OPTForCausalLM`` (norms before attention and
    MLP): learned positions counted over real tokens from 2, ReLU MLP."""
    cfg, w = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    assert cfg.do_layer_norm_before and cfg.word_embed_proj_dim == cfg.hidden_size
    B, T = ids.shape
    H = cfg.num_attention_heads
    D = cfg.hidden_size // H
    act = {"relu": torch.relu}[cfg.activation_function]

    def linear(x: Tensor, name: str) -> Tensor:
        out = x @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    def norm(x: Tensor, name: str) -> Tensor:
        return layer_norm(x, w[name + ".weight"], w[name + ".bias"], 1e-5, rules)

    positions = (torch.cumsum(mask, dim=1) * mask - 1).long() + 2
    h = (w["model.decoder.embed_tokens.weight"][ids] + w["model.decoder.embed_positions.weight"][positions])
    h = h.requires_grad_()
    acts: Dict[Key, Tensor] = {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.decoder.layers.{i}."
        acts["resid", i] = h
        a = norm(h, p + "self_attn_layer_norm")
        q, k, v = (linear(a, p + f"self_attn.{n}_proj").reshape(B, T, H, D).transpose(1, 2) for n in "qkv")
        z = attend(q, k, v, mask, D ** -0.5, rules)
        acts["heads", i] = z
        o = linear(z, p + "self_attn.out_proj")
        acts["attn", i] = o
        h = h + o
        m = linear(activation(act, linear(norm(h, p + "final_layer_norm"), p + "fc1"), rules, at_zero=0.0), p + "fc2")
        acts["mlp", i] = m
        h = h + m
    h = norm(h, "model.decoder.final_layer_norm")
    return acts, linear(h, "lm_head")


def falcon_forward(model, ids: Tensor, mask: Tensor, rules) -> Tuple[Dict[Key, Tensor], Tensor]:
    """``({(kind, layer): activation}, logits)`` of a ``FalconForCausalLM`` with the new decoder
    architecture: two LayerNorms feeding attention and MLP in parallel, a fused projection that
    holds each key/value group's queries, then its key and value; RoPE."""
    cfg, w = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    assert cfg.new_decoder_architecture and not cfg.alibi and cfg.num_ln_in_parallel_attn == 2
    B, T = ids.shape
    H, Hkv = cfg.num_attention_heads, cfg.num_kv_heads
    D = cfg.hidden_size // H
    eps, act = cfg.layer_norm_epsilon, ACTIVATIONS[cfg.activation]
    embed = w["transformer.word_embeddings.weight"]
    cos, sin = rope_tables(cfg, T, embed.dtype, D)

    def linear(x: Tensor, name: str) -> Tensor:
        out = x @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    def norm(x: Tensor, name: str) -> Tensor:
        return layer_norm(x, w[name + ".weight"], w[name + ".bias"], eps, rules)

    h = embed[ids].requires_grad_()
    acts: Dict[Key, Tensor] = {}
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.h.{i}."
        acts["resid", i] = h
        grouped = linear(norm(h, p + "ln_attn"), p + "self_attention.query_key_value").reshape(B, T, Hkv, -1, D)
        q = grouped[..., :-2, :].reshape(B, T, H, D).transpose(1, 2)
        k, v = grouped[..., -2, :].transpose(1, 2), grouped[..., -1, :].transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        z = attend(q, k, v, mask, D ** -0.5, rules)
        acts["heads", i] = z
        o = linear(z, p + "self_attention.dense")
        acts["attn", i] = o
        m = activation(act, linear(norm(h, p + "ln_mlp"), p + "mlp.dense_h_to_4h"), rules)
        m = linear(m, p + "mlp.dense_4h_to_h")
        acts["mlp", i] = m
        h = h + o + m
    h = norm(h, "transformer.ln_f")
    return acts, linear(h, "lm_head")


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi's head slopes ``2 ** (-8 h / H)`` (H a power of two), in float32 as the models compute them."""
    assert num_heads & (num_heads - 1) == 0
    return torch.tensor([2.0 ** (-8.0 * h / num_heads) for h in range(1, num_heads + 1)], dtype=torch.float32)


def bloom_forward(model, ids: Tensor, mask: Tensor, rules) -> Tuple[Dict[Key, Tensor], Tensor]:
    """``({(kind, layer): activation}, logits)`` of a ``BloomForCausalLM``: LayerNorm on the
    embeddings, ALiBi over the real positions, fused per-head ``[q, k, v]`` projection, float32
    softmax, Bloom's tanh GELU."""
    cfg, w = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    assert not cfg.apply_residual_connection_post_layernorm
    B, T = ids.shape
    H = cfg.n_head
    D = cfg.hidden_size // H
    eps = cfg.layer_norm_epsilon
    embed = w["transformer.word_embeddings.weight"]
    positions = (mask.cumsum(dim=-1) - 1) * mask  # real tokens counted from 0
    bias = (alibi_slopes(H)[None, :, None] * positions[:, None, :]).to(embed.dtype)[:, :, None, :]

    def linear(x: Tensor, name: str) -> Tensor:
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    def norm(x: Tensor, name: str) -> Tensor:
        return layer_norm(x, w[name + ".weight"], w[name + ".bias"], eps, rules)

    def bloom_gelu(x: Tensor) -> Tensor:
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))

    h = norm(embed[ids].requires_grad_(), "transformer.word_embeddings_layernorm")
    acts: Dict[Key, Tensor] = {}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        acts["resid", i] = h
        qkv = linear(norm(h, p + "input_layernorm"), p + "self_attention.query_key_value")
        q, k, v = qkv.reshape(B, T, H, 3, D).unbind(-2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        z = attend(q, k, v, mask, D ** -0.5, rules, softmax_dtype=torch.float32, bias=bias)
        acts["heads", i] = z
        o = linear(z, p + "self_attention.dense")
        acts["attn", i] = o
        h = h + o
        m = activation(bloom_gelu, linear(norm(h, p + "post_attention_layernorm"), p + "mlp.dense_h_to_4h"), rules)
        m = linear(m, p + "mlp.dense_4h_to_h")
        acts["mlp", i] = m
        h = h + m
    h = norm(h, "transformer.ln_f")
    return acts, h @ w.get("lm_head.weight", embed).T


def mpt_forward(model, ids: Tensor, mask: Tensor, rules) -> Tuple[Dict[Key, Tensor], Tensor]:
    """``({(kind, layer): activation}, logits)`` of an ``MptForCausalLM`` without biases: ALiBi
    relative to the last position, ``[q | k | v]`` thirds, float32 softmax, exact GELU."""
    cfg, w = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    attn_cfg = cfg.attn_config
    assert cfg.no_bias and attn_cfg.alibi and not attn_cfg.qk_ln and attn_cfg.clip_qkv is None
    B, T = ids.shape
    H = cfg.n_heads
    D = cfg.d_model // H
    eps = cfg.layer_norm_epsilon
    embed = w["transformer.wte.weight"]
    exponents = torch.arange(1, H + 1, dtype=torch.int64).float() * (attn_cfg.alibi_bias_max / H)
    slopes = 1.0 / torch.pow(2, exponents)  # float32, as the model computes them
    assert H & (H - 1) == 0
    bias = torch.arange(1 - T, 1, dtype=torch.int32)[None, None, None, :] * slopes[None, :, None, None]

    def norm(x: Tensor, name: str) -> Tensor:
        return layer_norm(x, w[name + ".weight"], 0.0, eps, rules)

    h = embed[ids].requires_grad_()
    acts: Dict[Key, Tensor] = {}
    for i in range(cfg.n_layers):
        p = f"transformer.blocks.{i}."
        acts["resid", i] = h
        qkv = norm(h, p + "norm_1") @ w[p + "attn.Wqkv.weight"].T
        q, k, v = (t.reshape(B, T, H, D).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        z = attend(q, k, v, mask, (attn_cfg.softmax_scale or D ** -0.5), rules,
                   softmax_dtype=torch.float32, bias=bias.to(embed.dtype))
        acts["heads", i] = z
        o = z @ w[p + "attn.out_proj.weight"].T
        acts["attn", i] = o
        h = h + o
        m = activation(gelu, norm(h, p + "norm_2") @ w[p + "ffn.up_proj.weight"].T, rules)
        m = m @ w[p + "ffn.down_proj.weight"].T
        acts["mlp", i] = m
        h = h + m
    h = norm(h, "transformer.norm_f")
    return acts, h @ w.get("lm_head.weight", embed).T


def bert_forward(model, ids: Tensor, mask: Tensor, rules) -> Tuple[Dict[Key, Tensor], Tensor]:
    """``({(kind, layer): activation}, logits)`` of a ``BertForMaskedLM``: embeddings (token type 0)
    and their LayerNorm, bidirectional attention over the real tokens, LayerNorm after each
    residual add, the MLM head's dense, GELU and LayerNorm."""
    cfg, w = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    B, T = ids.shape
    H = cfg.num_attention_heads
    D = cfg.hidden_size // H
    eps, act = cfg.layer_norm_eps, ACTIVATIONS[cfg.hidden_act]

    def linear(x: Tensor, name: str) -> Tensor:
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    def norm(x: Tensor, name: str) -> Tensor:
        return layer_norm(x, w[name + ".weight"], w[name + ".bias"], eps, rules)

    e = "bert.embeddings."
    h = (w[e + "word_embeddings.weight"][ids] + w[e + "token_type_embeddings.weight"][0]
         + w[e + "position_embeddings.weight"][torch.arange(T)])
    h = norm(h.requires_grad_(), e + "LayerNorm")
    acts: Dict[Key, Tensor] = {}
    for i in range(cfg.num_hidden_layers):
        p = f"bert.encoder.layer.{i}."
        acts["resid", i] = h
        q, k, v = (linear(h, p + f"attention.self.{n}").reshape(B, T, H, D).transpose(1, 2)
                   for n in ("query", "key", "value"))
        z = attend(q, k, v, mask, D ** -0.5, rules, causal=False)
        acts["heads", i] = z
        o = linear(z, p + "attention.output.dense")
        acts["attn", i] = o
        h = norm(o + h, p + "attention.output.LayerNorm")
        m = linear(activation(act, linear(h, p + "intermediate.dense"), rules), p + "output.dense")
        acts["mlp", i] = m
        h = norm(m + h, p + "output.LayerNorm")
    t = "cls.predictions."
    h = norm(activation(act, linear(h, t + "transform.dense"), rules), t + "transform.LayerNorm")
    return acts, linear(h, t + "decoder")


def gpt_neo_forward(model, ids: Tensor, mask: Tensor, rules) -> Tuple[Dict[Key, Tensor], Tensor]:
    """``({(kind, layer): activation}, logits)`` of a ``GPTNeoForCausalLM``: global and local
    (sliding-window) layers, unscaled scores computed from float32 queries and keys (as the model
    computes them), softmax in the model's dtype."""
    cfg, w = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    B, T = ids.shape
    H, d = cfg.num_heads, cfg.hidden_size
    D = d // H
    eps, act = cfg.layer_norm_epsilon, ACTIVATIONS[cfg.activation_function]

    def linear(x: Tensor, name: str) -> Tensor:
        out = x @ w[name + ".weight"].T
        return out + w[name + ".bias"] if name + ".bias" in w else out

    def norm(x: Tensor, name: str) -> Tensor:
        return layer_norm(x, w[name + ".weight"], w[name + ".bias"], eps, rules)

    h = (w["transformer.wte.weight"][ids] + w["transformer.wpe.weight"][torch.arange(T)]).requires_grad_()
    acts: Dict[Key, Tensor] = {}
    for i, kind in enumerate(cfg.attention_layers):
        p = f"transformer.h.{i}."
        acts["resid", i] = h
        a = norm(h, p + "ln_1")
        q, k, v = (linear(a, p + f"attn.attention.{n}_proj").reshape(B, T, H, D).transpose(1, 2) for n in "qkv")
        scores = (q.to(torch.float32) @ k.to(torch.float32).transpose(-1, -2)).to(q.dtype)
        seen = torch.ones(T, T, dtype=torch.bool).tril()
        if kind == "local":
            seen = seen & torch.ones(T, T, dtype=torch.bool).triu(1 - cfg.window_size)
        allowed = seen[None, None] & mask.bool()[:, None, None, :]
        probs = torch.softmax(scores.masked_fill(~allowed, torch.finfo(q.dtype).min), dim=-1)
        if "ah" in rules:
            probs = probs.detach()
        z = (probs @ v).transpose(1, 2).reshape(B, T, d)
        acts["heads", i] = z
        o = linear(z, p + "attn.attention.out_proj")
        acts["attn", i] = o
        h = h + o
        m = linear(activation(act, linear(norm(h, p + "ln_2"), p + "mlp.c_fc"), rules), p + "mlp.c_proj")
        acts["mlp", i] = m
        h = h + m
    h = norm(h, "transformer.ln_f")
    return acts, linear(h, "lm_head")


def stablelm_forward(model, ids: Tensor, mask: Tensor, rules) -> Tuple[Dict[Key, Tensor], Tensor]:
    """``({(kind, layer): activation}, logits)`` of a ``StableLmForCausalLM`` with parallel residual:
    one LayerNorm feeding attention and the gated MLP, a LayerNorm per head of the queries and keys
    (plain gradient under every preset), RoPE on the first ``int(D * partial_rotary_factor)``
    dimensions with the model's ``(cos, sin)`` tables (which broadcast when that number is odd)."""
    cfg, w = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    assert cfg.use_parallel_residual and cfg.qk_layernorm and not cfg.use_qkv_bias
    B, T = ids.shape
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    R = int(D * cfg.rope_parameters["partial_rotary_factor"])
    eps = cfg.layer_norm_eps
    embed = w["model.embed_tokens.weight"]
    cos, sin = rope_tables(cfg, T, embed.dtype, D)

    def rotate(x: Tensor) -> Tensor:  # the model's rotate_half on the first R dimensions
        x_rot, x_pass = x[..., :R], x[..., R:]
        half = x_rot.shape[-1] // 2
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
        return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)

    def per_head_norm(x: Tensor, name: str) -> Tensor:  # (B, heads, T, D), no rule
        return torch.cat([layer_norm(x[:, j:j + 1], w[f"{name}.norms.{j}.weight"], 0.0, eps, ())
                          for j in range(x.shape[1])], dim=1)

    h = embed[ids].requires_grad_()
    acts: Dict[Key, Tensor] = {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        acts["resid", i] = h
        a = layer_norm(h, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], eps, rules)
        q, k, v = ((a @ w[p + f"self_attn.{n}_proj.weight"].T).reshape(B, T, -1, D).transpose(1, 2) for n in "qkv")
        q, k = per_head_norm(q, p + "self_attn.q_layernorm"), per_head_norm(k, p + "self_attn.k_layernorm")
        q, k = rotate(q), rotate(k)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        z = attend(q, k, v, mask, D ** -0.5, rules)
        acts["heads", i] = z
        o = z @ w[p + "self_attn.o_proj.weight"].T
        acts["attn", i] = o
        gate = activation(silu, a @ w[p + "mlp.gate_proj.weight"].T, rules)
        m = gated_product(gate, a @ w[p + "mlp.up_proj.weight"].T, rules) @ w[p + "mlp.down_proj.weight"].T
        acts["mlp", i] = m
        h = h + o + m
    h = layer_norm(h, w["model.norm.weight"], w["model.norm.bias"], eps, rules)
    return acts, h @ w["lm_head.weight"].T


def modernbert_forward(model, ids: Tensor, mask: Tensor, rules) -> Tuple[Dict[Key, Tensor], Tensor]:
    """``({(kind, layer): activation}, logits)`` of a ``ModernBertForMaskedLM``: LayerNorms without
    bias (none before the first attention), bidirectional global and local (banded) layers with
    RoPE per kind of layer on float32-rounded queries and keys, ``[q | k | v]`` thirds, a fused GeGLU ``act(input) * gate``, the MLM
    head's dense, GELU and LayerNorm."""
    cfg, w = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    assert not (cfg.attention_bias or cfg.mlp_bias or cfg.norm_bias or cfg.classifier_bias)
    B, T = ids.shape
    H = cfg.num_attention_heads
    D = cfg.hidden_size // H
    eps, act = cfg.norm_eps, ACTIVATIONS[cfg.hidden_activation]
    embed = w["model.embeddings.tok_embeddings.weight"]
    tables = {kind: rope_tables(cfg, T, embed.dtype, D, kind) for kind in set(cfg.layer_types)}

    def norm(x: Tensor, name: str) -> Tensor:
        return layer_norm(x, w[name + ".weight"], 0.0, eps, rules)

    h = norm(embed[ids].requires_grad_(), "model.embeddings.norm")
    acts: Dict[Key, Tensor] = {}
    for i, kind in enumerate(cfg.layer_types):
        p = f"model.layers.{i}."
        acts["resid", i] = h
        a = h if i == 0 else norm(h, p + "attn_norm")
        q, k, v = (a @ w[p + "attn.Wqkv.weight"].T).reshape(B, T, 3, H, D).transpose(1, 3).unbind(dim=2)
        cos, sin = tables[kind]
        q, k = rope(q.float(), cos, sin).to(q.dtype), rope(k.float(), cos, sin).to(k.dtype)  # as the model does
        band = cfg.sliding_window if kind == "sliding_attention" else None
        z = attend(q, k, v, mask, D ** -0.5, rules, causal=False, band=band)
        acts["heads", i] = z
        o = z @ w[p + "attn.Wo.weight"].T
        acts["attn", i] = o
        h = h + o
        inputs, gate = (norm(h, p + "mlp_norm") @ w[p + "mlp.Wi.weight"].T).chunk(2, dim=-1)
        m = gated_product(activation(act, inputs, rules), gate, rules) @ w[p + "mlp.Wo.weight"].T
        acts["mlp", i] = m
        h = h + m
    h = norm(h, "model.final_norm")
    h = norm(activation(ACTIVATIONS[cfg.classifier_activation], h @ w["head.dense.weight"].T, rules), "head.norm")
    return acts, h @ w["decoder.weight"].T + w["decoder.bias"]


FORWARDS = {"gpt2": gpt2_forward, "gpt_bigcode": gpt2_forward, "gpt_neox": gpt_neox_forward,
            "gptj": gptj_forward, "phi": phi_forward, "opt": opt_forward, "falcon": falcon_forward,
            "bloom": bloom_forward, "mpt": mpt_forward, "bert": bert_forward, "gpt_neo": gpt_neo_forward, "codegen": gptj_forward,
            "modernbert": modernbert_forward,
            "stablelm": stablelm_forward,
            **{model_type: llama_forward for model_type in LLAMA_LIKE}}
"""``{model_type: forward}`` of the families the reference implements."""


def last_real(mask: Tensor) -> Tensor:
    """The index of each row's last real token (right padding)."""
    return torch.stack([row.nonzero().max() for row in mask])


def relp_scores(model, clean: Tensor, corrupt: Tensor, mask: Tensor, correct: Sequence[int],
                wrong: Sequence[int], preset: str) -> Tuple[Dict[Key, Tensor], Tensor]:
    """``({(kind, layer): scores (B, T, width)}, logits of the clean run)`` for the metric
    ``logit[correct] - logit[wrong]`` at each row's last real position."""
    forward, rules = FORWARDS[model.config.model_type], PRESET_RULES[preset]
    with torch.no_grad():
        reference, _ = forward(model, corrupt, mask, rules)
    with torch.enable_grad():
        acts, logits = forward(model, clean, mask, rules)
        rows, last = torch.arange(clean.shape[0]), last_real(mask)
        metric = logits[rows, last, torch.tensor(correct)] - logits[rows, last, torch.tensor(wrong)]
        keys = list(acts)
        grads = torch.autograd.grad(metric.sum(), [acts[key] for key in keys])
    real = mask[..., None].to(logits.dtype)
    scores = {key: ((acts[key] - reference[key]) * grad * real).detach() for key, grad in zip(keys, grads, strict=True)}
    return scores, logits.detach()
