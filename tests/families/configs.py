"""A tiny config per family of the table (2 layers, hidden size 16): adding a family adds one line here."""
from __future__ import annotations

import torch
import transformers
from transformers import AutoConfig

VOCAB = 32
_BASE = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=32, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_GQA = dict(num_key_value_heads=2)
_ROPE_GQA = dict(_GQA, head_dim=4)

TINY = {
    "gpt2": dict(n_positions=32),
    "gpt_neox": {},
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=4),
    "gptj": dict(n_positions=32, rotary_dim=2),
    "llama": _GQA,
    "mistral": dict(_GQA, sliding_window=4),
    "qwen2": dict(_GQA, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "qwen3": _ROPE_GQA,
    "gemma": _ROPE_GQA,
    "gemma2": dict(_ROPE_GQA, sliding_window=4, query_pre_attn_scalar=4, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0),
    "gemma3_text": dict(_ROPE_GQA, sliding_window=4, query_pre_attn_scalar=4, layer_types=[
        "sliding_attention", "full_attention"], attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    "phi": dict(_GQA, partial_rotary_factor=0.5, qk_layernorm=True),
    "phi3": dict(_GQA, sliding_window=4),
    "olmo": _GQA,
    "olmo2": _GQA,
    "starcoder2": dict(_GQA, sliding_window=4),
    "gpt_bigcode": dict(n_positions=32, multi_query=True),
    "codegen": dict(n_positions=32, n_ctx=32, rotary_dim=2),
    "stablelm": dict(_GQA, qk_layernorm=True, use_parallel_residual=True),
    "opt": dict(ffn_dim=32, word_embed_proj_dim=16),
    "bloom": {},
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2, alibi=False),
    "mpt": dict(expansion_ratio=2, max_seq_len=32, attn_config={"alibi": True}, no_bias=True),
    "bert": {},
    "modernbert": dict(global_attn_every_n_layers=2, local_attention=4, cls_token_id=1, sep_token_id=2),
}
"""``{model_type: config overrides}`` on top of a shared tiny base (unknown fields are dropped)."""

_ENCODERS = ("bert", "modernbert")


def tiny_config(model_type: str, **overrides):
    """The tiny config of ``model_type`` (only fields the config class knows from the shared base)."""
    defaults = AutoConfig.for_model(model_type)
    known = set(vars(defaults)) | set(getattr(defaults, "attribute_map", {}))
    fields = {k: v for k, v in _BASE.items() if k in known}
    fields.update(TINY[model_type])
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str, dtype=torch.float64, seed: int = 0, zero_bias: bool = False, **overrides):
    """A random 2-layer model of ``model_type`` in eval mode; norm weights randomised around their offset."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    auto = transformers.AutoModelForMaskedLM if model_type in _ENCODERS else transformers.AutoModelForCausalLM
    model = auto.from_config(config).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") and zero_bias:
                param.zero_()
            elif "norm" in name.lower() and name.endswith("weight"):
                offset = 0.0 if model_type.startswith("gemma") else 1.0
                param.copy_(offset + 0.3 * torch.randn_like(param))
    return model


def token_pair(batch: int = 2, seq: int = 7, seed: int = 1):
    """Clean and corrupt ids differing at two positions, and a right-padding mask (row 1 padded)."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    corrupt = clean.clone()
    corrupt[:, [1, seq - 3]] = torch.randint(3, VOCAB, (batch, 2), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 2:] = 0
    return clean, corrupt, mask
