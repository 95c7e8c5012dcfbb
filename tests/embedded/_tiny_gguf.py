"""Write a tiny GGUF file with the gguf package: a 1-layer Llama, Q8_0 matrices, byte-level BPE."""
from __future__ import annotations

from pathlib import Path

import numpy as np

D, FF, HEADS, KV_HEADS = 32, 64, 4, 2


def _byte_alphabet() -> list:
    """GPT-2's printable stand-ins for the 256 bytes (byte-level BPE tokens)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


TOKENS = ["<unk>", "<s>", "</s>"] + _byte_alphabet() + ["Ġa", "Ġb"]


def write_tiny_gguf(path: Path, architecture: str = "llama", seed: int = 0) -> Path:
    """A 1-layer ``architecture`` GGUF (hyperparameters under that name) with random weights."""
    import gguf
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(D // HEADS)
    writer.add_vocab_size(len(TOKENS))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    writer.add_token_merges(["Ġ a", "Ġ b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def tensor(name: str, shape: tuple, quantized: bool = True) -> None:
        values = rng.normal(0.0, 0.2, shape).astype(np.float32)
        if quantized:
            writer.add_tensor(name, quantize(values, GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, values)

    kv = KV_HEADS * D // HEADS
    tensor("token_embd.weight", (len(TOKENS), D))
    tensor("output_norm.weight", (D,), quantized=False)
    for name, shape in (("attn_norm", (D,)), ("ffn_norm", (D,)), ("attn_q", (D, D)), ("attn_k", (kv, D)),
                        ("attn_v", (kv, D)), ("attn_output", (D, D)), ("ffn_gate", (FF, D)),
                        ("ffn_up", (FF, D)), ("ffn_down", (D, FF))):
        tensor(f"blk.0.{name}.weight", shape, quantized=len(shape) == 2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
