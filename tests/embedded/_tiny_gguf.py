"""Write a tiny GGUF file with the gguf package: a 1-layer Llama, Q8_0 matrices, byte-level BPE.

Damaged variants for the loader's checks: ``omit`` leaves tensors out, ``metadata`` overrides
hyperparameters (e.g. ``{"embedding_length": 48}``), ``blocks`` writes more blocks of tensors
and ``int32`` stores tensors as integers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Optional

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


def _hyperparameters(blocks: int) -> Dict[str, object]:
    return {"block_count": blocks, "context_length": 64, "embedding_length": D, "feed_forward_length": FF,
            "head_count": HEADS, "head_count_kv": KV_HEADS, "layer_norm_rms_eps": 1e-5,
            "rope_dimension_count": D // HEADS, "vocab_size": len(TOKENS)}


def write_tiny_gguf(path: Path, architecture: str = "llama", seed: int = 0, omit: Iterable[str] = (),
                    metadata: Optional[Dict[str, object]] = None, blocks: int = 1,
                    int32: Iterable[str] = ()) -> Path:
    """A ``blocks``-layer ``architecture`` GGUF (hyperparameters under that name) with random weights."""
    import gguf
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in {**_hyperparameters(blocks), **(metadata or {})}.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    writer.add_token_merges(["Ġ a", "Ġ b"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    omit = set(omit)

    def tensor(name: str, shape: tuple, quantized: bool = True) -> None:
        values = rng.normal(0.0, 0.2, shape).astype(np.float32)
        if name in omit:
            return
        if name in int32:
            writer.add_tensor(name, np.round(values * 100).astype(np.int32))
        elif quantized:
            writer.add_tensor(name, quantize(values, GGMLQuantizationType.Q8_0),
                              raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, values)

    kv = KV_HEADS * D // HEADS
    tensor("token_embd.weight", (len(TOKENS), D))
    tensor("output_norm.weight", (D,), quantized=False)
    for block in range(blocks):
        for name, shape in (("attn_norm", (D,)), ("ffn_norm", (D,)), ("attn_q", (D, D)), ("attn_k", (kv, D)),
                            ("attn_v", (kv, D)), ("attn_output", (D, D)), ("ffn_gate", (FF, D)),
                            ("ffn_up", (FF, D)), ("ffn_down", (D, FF))):
            tensor(f"blk.{block}.{name}.weight", shape, quantized=len(shape) == 2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
