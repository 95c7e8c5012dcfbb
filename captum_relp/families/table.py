"""The family table: one entry per Hugging Face ``model_type`` the library computes exactly.

Adding a family means adding one :class:`~captum_relp.families.Family` entry here and its
tiny config in ``tests/families/configs.py`` (see ``docs/new_architecture.md``). Every
model type not listed is refused in strict mode.
"""
from __future__ import annotations

import math
import sys
from typing import Dict, Optional

import torch

from ._spec import Attention, EdgeParts, Family, Norm

_LLAMA_NORMS = ("input_layernorm", "post_attention_layernorm")
_QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")  # plain gradient: see Family.qk_norms


_POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


def _llama_edges(qk_norm: Optional[str] = None, norms=_LLAMA_NORMS, **extra) -> EdgeParts:
    """Edge-graph parts of a Llama-style decoder (separate projections, final ``norm``, ``rotary_emb``)."""
    return EdgeParts("separate", ("embed_tokens",), norms, "norm", "rotary_emb", qk_norm, **extra)


_SANDWICH = dict(norms=("input_layernorm", "pre_feedforward_layernorm"), post_norms=_POST_NORMS)


def _llama_like(model_type: str, prefix: str, **extra) -> Family:
    """A Llama-style decoder: RMSNorm, separate gated MLP, grouped-query attention."""
    fields = dict(norms=(Norm(f"{prefix}RMSNorm"),), gated_mlp=(f"{prefix}MLP", "separate"),
                  kv_heads="@num_key_value_heads")
    fields.update(extra)
    return Family(model_type, "layers", "self_attn", "self_attn.o_proj", "mlp", **fields)


def _falcon_kv(config) -> int:
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


def _falcon_layout(config) -> str:
    if config.new_decoder_architecture:
        return "grouped"
    return "multi-query" if config.multi_query else "per-head"


def _falcon_edge_layout(config) -> str:
    return {"grouped": "grouped", "multi-query": "fused", "per-head": "neox"}[_falcon_layout(config)]


def _falcon_two_norms(config) -> bool:
    return bool(config.new_decoder_architecture and config.num_ln_in_parallel_attn == 2)


def _falcon_mlp_norm(config) -> str:
    if _falcon_two_norms(config):
        return "ln_mlp"
    return "input_layernorm" if config.new_decoder_architecture or config.parallel_attn else "post_attention_layernorm"


def _falcon_alibi(base, attention_mask, batch: int, length: int, heads: int, ref):
    """Falcon's ALiBi bias ``(B, H, 1, T)`` over ``sqrt(head_dim)``, as the model adds it to its mask."""
    mask = attention_mask if attention_mask is not None else ref.new_ones(batch, length, dtype=torch.long)
    bias = sys.modules[type(base).__module__].build_alibi_tensor(mask.to(ref.device), heads, ref.dtype)
    return bias.reshape(batch, heads, 1, length) / math.sqrt(base.config.hidden_size // heads)


_FALCON_EDGES = EdgeParts(
    _falcon_edge_layout, ("word_embeddings",), (lambda c: "ln_attn" if _falcon_two_norms(c) else "input_layernorm",
                                                _falcon_mlp_norm), "ln_f",
    rotary=lambda c: None if c.alibi else "rotary_emb", fused="query_key_value",
    scaling="inv_norm_factor",  # every supported release has it (``scaling`` only from 5.25)
    position_bias=lambda base, *args: _falcon_alibi(base, *args) if base.config.alibi else None)


def _bloom_alibi(base, attention_mask, batch: int, length: int, heads: int, ref):
    """BLOOM's ALiBi bias ``(B, H, 1, T)``, from the model's own ``build_alibi_tensor``."""
    mask = attention_mask if attention_mask is not None else ref.new_ones(batch, length, dtype=torch.long)
    return base.build_alibi_tensor(mask.to(ref.device), heads, ref.dtype).view(batch, heads, 1, length)


def _bloom_refusal(config) -> str:
    if config.apply_residual_connection_post_layernorm:
        return ("apply_residual_connection_post_layernorm: the residual stream carries normalised "
                "values, so it is not the sum of the node outputs")
    return ""


def _mpt_alibi(base, attention_mask, batch: int, length: int, heads: int, ref):
    """MPT's ALiBi bias ``(1, H, 1, T)``: the last ``T`` key positions of ``build_mpt_alibi_tensor``."""
    bias = base.build_mpt_alibi_tensor(heads, base.config.max_seq_len, device=ref.device)
    return bias[None, :, :, bias.shape[-1] - length:]


def _opt_embed(base, ids, attention_mask):
    """OPT's input: token embeddings (through ``project_in``) plus positions counted over the mask."""
    decoder = base.decoder
    tokens = decoder.embed_tokens(ids)
    tokens = tokens if decoder.project_in is None else decoder.project_in(tokens)
    mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
    return tokens + decoder.embed_positions(mask, 0)


def _opt_mlp(block, x):
    """OPT's MLP, which its block runs on flattened rows (the same per-position values)."""
    return block.fc2(block.activation_fn(block.fc1(x)))


def _opt_refusal(config) -> str:
    if not config.do_layer_norm_before:
        return ("do_layer_norm_before=False (OPT-350m): a norm after each residual add normalises the "
                "residual stream itself, so it is not the sum of the node outputs")
    return ""


def _stablelm_mlp_norm(config) -> str:
    """StableLM's MLP reads the attention's norm under ``use_parallel_residual``."""
    return "input_layernorm" if config.use_parallel_residual else "post_attention_layernorm"


_QK_LAYERNORMS = ("q_layernorm", "k_layernorm")
_SLIDING = Attention(sliding_window="@sliding_window")
_GEMMA2_ATTN = Attention(softcap="attn_logit_softcapping", sliding_window="@sliding_window")
_GEMMA3_ATTN = Attention(sliding_window="@sliding_window")  # its config has attn_logit_softcapping, unused

_ENTRIES = (
    Family("gpt2", "h", "attn", "attn.c_proj", "mlp",
           edges=EdgeParts("conv1d", ("wte", "wpe"), ("ln_1", "ln_2"), "ln_f")),
    Family("gpt_neox", "layers", "attention", "attention.dense", "mlp",
           parallel_residual="@use_parallel_residual",
           edges=EdgeParts("neox", ("embed_in",), _LLAMA_NORMS, "final_layer_norm", "rotary_emb")),
    Family("gpt_neo", "h", "attn", "attn.attention.out_proj", "mlp",
           attn=Attention("qk-columns", "GPTNeoSelfAttention", ("q_proj", "k_proj"), "all",
                          sliding_window="@window_size"),
           edges=EdgeParts("separate", ("wte", "wpe"), ("ln_1", "ln_2"), "ln_f", scaling=1.0, float32_scores=True)),
    Family("gptj", "h", "attn", "attn.out_proj", "mlp", parallel_residual=True,
           edges=EdgeParts("separate", ("wte",), ("ln_1", "ln_1"), "ln_f", "rotary_emb", float32_scores="eager",
                           rotary_style="gptj")),
    _llama_like("llama", "Llama", edges=_llama_edges()),
    _llama_like("mistral", "Mistral", attn=_SLIDING, edges=_llama_edges()),
    _llama_like("qwen2", "Qwen2", attn=_SLIDING, edges=_llama_edges()),
    _llama_like("qwen3", "Qwen3", attn=_SLIDING, edges=_llama_edges("head"),
                qk_norms=_QK_NORMS),
    _llama_like("gemma", "Gemma", norms=(Norm("GemmaRMSNorm", weight_offset=1.0),),
                structural=("GemmaTextScaledWordEmbedding",), embed_scale=True, edges=_llama_edges()),
    _llama_like("gemma2", "Gemma2", norms=(Norm("Gemma2RMSNorm", weight_offset=1.0),),
                structural=("Gemma2TextScaledWordEmbedding",), embed_scale=True, attn=_GEMMA2_ATTN,
                logit_softcap="final_logit_softcapping", post_norms=True, edges=_llama_edges(**_SANDWICH)),
    _llama_like("gemma3_text", "Gemma3", modeling="gemma3.modeling_gemma3",
                norms=(Norm("Gemma3RMSNorm", weight_offset=1.0),),
                structural=("Gemma3TextScaledWordEmbedding",), embed_scale=True, attn=_GEMMA3_ATTN,
                logit_softcap="final_logit_softcapping", post_norms=True, qk_norms=_QK_NORMS,
                edges=_llama_edges("head", **_SANDWICH)),
    Family("phi", "layers", "self_attn", "self_attn.dense", "mlp", parallel_residual=True,
           kv_heads="@num_key_value_heads", qk_norms=("self_attn.q_layernorm", "self_attn.k_layernorm"),
           edges=EdgeParts("separate", ("embed_tokens",), ("input_layernorm", "input_layernorm"), "final_layernorm",
                           "rotary_emb", "head", qk_norm_modules=_QK_LAYERNORMS, partial_rotary=True)),
    _llama_like("phi3", "Phi3", gated_mlp=("Phi3MLP", "gate_up_proj"), attn=_SLIDING,
                edges=EdgeParts("fused", ("embed_tokens",), _LLAMA_NORMS, "norm", "rotary_emb")),
    _llama_like("olmo", "Olmo", norms=(Norm("OlmoLayerNorm", rms=False, eps=1e-5),),
                edges=_llama_edges(clip_qkv="@clip_qkv")),
    _llama_like("olmo2", "Olmo2", post_norms=True, qk_norms=_QK_NORMS,
                edges=_llama_edges("full", norms=(None, None), post_norms=_POST_NORMS)),
    Family("starcoder2", "layers", "self_attn", "self_attn.o_proj", "mlp", attn=_SLIDING,
           kv_heads="@num_key_value_heads", edges=_llama_edges()),
    Family("gpt_bigcode", "h", "attn", "attn.c_proj", "mlp",
           kv_heads=lambda c: 1 if c.multi_query else c.num_attention_heads,
           edges=EdgeParts(lambda c: "fused" if c.multi_query else "neox", ("wte", "wpe"), ("ln_1", "ln_2"), "ln_f",
                           fused="c_attn"),
           reuse_prefix=False),  # batch-1 prefix: its attention reshapes with the batch of the input
    Family("codegen", "h", "attn", "attn.out_proj", "mlp", parallel_residual=True,
           edges=EdgeParts("codegen", ("wte",), ("ln_1", "ln_1"), "ln_f", "rotary_emb", float32_scores="eager",
                           rotary_style="gptj")),
    _llama_like("stablelm", "StableLm", norms=(), structural=("StableLmLayerNormPerHead",),
                parallel_residual="@use_parallel_residual",
                qk_norms=("self_attn.q_layernorm", "self_attn.k_layernorm"),  # one LayerNorm per head
                edges=_llama_edges("head", norms=("input_layernorm", _stablelm_mlp_norm),
                                   qk_norm_modules=_QK_LAYERNORMS, partial_rotary=True)),
    Family("opt", "decoder.layers", "self_attn", "self_attn.out_proj", None,
           no_mlp="OPT runs fc1/fc2 on flattened (batch * positions, d) rows, so no module outputs "
                  "the per-position MLP output",
           structural=("OPTLearnedPositionalEmbedding",),
           edges=EdgeParts("separate", ("decoder.embed_tokens", "decoder.embed_positions"),
                           ("self_attn_layer_norm", "final_layer_norm"), "decoder.final_layer_norm",
                           embed_fn=_opt_embed, mlp=_opt_mlp, final_proj="decoder.project_out",
                           refuse=_opt_refusal)),
    Family("bloom", "h", "self_attention", "self_attention.dense", "mlp.dense_4h_to_h",
           activations=("BloomGelu",),
           attn=Attention("qk-columns", "BloomAttention", ("query_key_value",), "per-head", alibi=True),
           edges=EdgeParts("neox", ("word_embeddings",), ("input_layernorm", "post_attention_layernorm"), "ln_f",
                           scaling="inv_norm_factor", position_bias=_bloom_alibi, mlp_residual=True,
                           embed_norm="word_embeddings_layernorm",
                           refuse=_bloom_refusal),
           reuse_prefix=False),  # batch-1 prefix: its alibi bias (B * H, 1, T) does not broadcast
    Family("falcon", "h", "self_attention", "self_attention.dense", "mlp", structural=("linear:FalconLinear",),
           attn=Attention("qk-columns", "FalconAttention", ("query_key_value",), _falcon_layout, alibi="@alibi"),
           parallel_residual=lambda c: c.new_decoder_architecture or c.parallel_attn, kv_heads=_falcon_kv,
           edges=_FALCON_EDGES,
           reuse_prefix=False),  # blocks add attention to the MLP output in place: batch 1 cannot grow
    Family("mpt", "blocks", "attn", "attn.out_proj", "ffn.down_proj",
           attn=Attention("qk-columns", "MptAttention", ("Wqkv",), "thirds", alibi=True),
           edges=EdgeParts("fused", ("wte",), ("norm_1", "norm_2"), "norm_f", fused="Wqkv", scaling="softmax_scale",
                           position_bias=_mpt_alibi, mlp="ffn", mlp_residual=True,
                           clip_qkv=lambda c: c.attn_config.clip_qkv)),
    Family("bert", "encoder.layer", "attention", "attention.output.dense", "output.dense", encoder=True,
           no_edges="BERT normalises after each residual add (LayerNorm(x + sublayer(x))): the residual "
                    "stream is not the sum of the node outputs, so no edge is an exact intervention"),
    Family("modernbert", "layers", "attn", "attn.Wo", "mlp", gated_mlp=("ModernBertMLP", "wi"),
           attn=Attention(sliding_window="@sliding_window"), encoder=True,
           no_edges="a bidirectional masked-LM encoder: the component graph is built for causal decoders "
                    "(causal masks, next-token logits), and circuits over a masked-LM head are not defined "
                    "here"),
)

FAMILY_TABLE: Dict[str, Family] = {family.model_type: family for family in _ENTRIES}
"""``{model_type: Family}`` for every family the library computes exactly."""

TRANSFORMERS_INTERNALS: Dict[str, str] = {
    "PretrainedConfig._attn_implementation":
        "the name of the attention function a model calls: the AH-rule (rules 'relp-ah') sets it to a "
        "registered wrapper that passes detached queries and keys, and restores it afterwards; edge graphs "
        "read it to take the softmax in float32 where the model's eager attention does",
    "PreTrainedModel._keys_to_ignore_on_load_missing":
        "weights a model class computes itself rather than loads: a GGUF file is not required to hold "
        "them, every other weight must come from the file",
}
"""The private attributes of transformers that the library uses, each with what it is used for.

Family entries name public submodules and config fields only; these are the exceptions.
``tests/families/test_internals.py`` fails, naming the entry, on a transformers release that
changes one, and checks that the package uses no other private transformers attribute.
"""

__all__ = ["FAMILY_TABLE", "TRANSFORMERS_INTERNALS"]
