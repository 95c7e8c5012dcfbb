"""Damaged GGUF files are refused with a message naming the file, the tensor, what was expected and found.

No damaged file may load: a truncated file, a file whose metadata disagrees with its tensors
and a file missing tensors all fail before the model is built, and the CLI exits with 2.
"""
from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from captum_relp.cli import EXIT_USAGE, main
from captum_relp.embedded import load_model
from captum_relp.embedded.gguf import gguf_card, load_gguf

gguf = pytest.importorskip("gguf", reason="the gguf extra (pip install 'captum-relp[gguf]') is not installed")
from _tiny_gguf import write_tiny_gguf  # noqa: E402

BLOCK = ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _block(index: int) -> list:
    return [f"blk.{index}.{name}.weight" for name in BLOCK]


def _cli(path, tmp_path, capsys) -> tuple:
    code = main(["ioi", "--model", str(path), "--quiet", "--device", "cpu", "--out", str(tmp_path / "out")])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_a_truncated_file_names_the_cut_tensor(tiny, tmp_path, capsys):
    data = tiny.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-3000])
    first = next(t for t in gguf.GGUFReader(str(tiny)).tensors if t.data_offset + t.n_bytes > len(data) - 3000)
    shape = tuple(reversed(first.shape.tolist()))
    message = (f"cut.gguf: tensor '{first.name}' (Q8_0, shape {shape}) ends at byte "
               f"{first.data_offset + first.n_bytes}, expected the file to hold it, found {len(data) - 3000} "
               "bytes: the file is truncated or damaged")
    with pytest.raises(ValueError, match=re.escape(message)):
        gguf_card(cut)
    code, err = _cli(cut, tmp_path, capsys)
    assert code == EXIT_USAGE and message in err


def test_a_file_cut_inside_its_header_is_named_unreadable(tiny, tmp_path):
    cut = tmp_path / "header.gguf"
    cut.write_bytes(tiny.read_bytes()[:1000])
    with pytest.raises(OSError, match=r"header\.gguf: not a readable GGUF file .* it is truncated or damaged"):
        load_model(str(cut))


@pytest.mark.parametrize("metadata, tensor, expected, found", [
    ({"embedding_length": 48}, "token_embd.weight", (261, 48), (261, 32)),
    ({"head_count_kv": 4}, "blk.0.attn_k.weight", (32, 32), (16, 32)),
    ({"feed_forward_length": 32}, "blk.0.ffn_gate.weight", (32, 32), (64, 32)),
], ids=["embedding_length", "head_count_kv", "feed_forward_length"])
def test_metadata_that_disagrees_with_the_tensors_is_a_clear_cli_error(metadata, tensor, expected, found, tmp_path,
                                                                       capsys):
    path = write_tiny_gguf(tmp_path / "disagrees.gguf", metadata=metadata)
    with pytest.raises(ValueError, match=re.escape(f"disagrees.gguf: tensor '{tensor}' for ") + ".* " +
                       re.escape(f"has shape {found}, expected {expected} from the file's metadata (llama: ")):
        load_gguf(path)
    code, err = _cli(path, tmp_path, capsys)
    assert code == EXIT_USAGE
    assert f"tensor '{tensor}'" in err and f"expected {tuple(expected)}" in err and "Traceback" not in err


@pytest.mark.parametrize("blocks, omit, metadata, absent", [
    (2, _block(1), None, "blk.1.attn_k.weight' (for model.layers.1.self_attn.k_proj.weight)"),
    (1, ["blk.0.ffn_up.weight"], None, "blk.0.ffn_up.weight' (for model.layers.0.mlp.up_proj.weight)"),
    (1, ["token_embd.weight"], None, "token_embd.weight' (for model.embed_tokens.weight)"),
    (1, [], {"block_count": 2}, "blk.1.attn_k.weight' (for model.layers.1.self_attn.k_proj.weight)"),
], ids=["a whole block", "one matrix", "the embedding", "block_count above the blocks"])
def test_missing_tensors_never_load_as_random_weights(blocks, omit, metadata, absent, tmp_path, capsys):
    path = write_tiny_gguf(tmp_path / "missing.gguf", blocks=blocks, omit=omit, metadata=metadata)
    with pytest.raises(ValueError, match=re.escape(f"missing.gguf: the file has no tensor '{absent}") +
                       ".*; expected every weight .* loading it would leave these weights random"):
        load_gguf(path)
    code, err = _cli(path, tmp_path, capsys)
    assert code == EXIT_USAGE and "no tensor" in err


def test_tensors_beyond_the_metadata_block_count_are_refused(tmp_path):
    path = write_tiny_gguf(tmp_path / "extra.gguf", blocks=2, metadata={"block_count": 1})
    with pytest.raises(ValueError, match=r"extra\.gguf: 9 tensor\(s\) 'blk\.1\.attn_k\.weight', .* \(blocks at or "
                                         r"beyond the metadata's block count 1\) are not part of the model"):
        load_gguf(path)


def test_an_integer_weight_is_refused(tmp_path):
    path = write_tiny_gguf(tmp_path / "int32-norm.gguf", int32=["output_norm.weight"])
    with pytest.raises(ValueError, match=r"int32-norm\.gguf: tensor 'output_norm\.weight' is stored as I32, "
                                         "expected a floating-point or quantized weight type"):
        load_gguf(path)


def test_an_intact_file_still_loads_every_weight_from_the_file(tiny):
    model, _ = load_gguf(tiny)
    stored = {t.name: t for t in gguf.GGUFReader(str(tiny)).tensors}
    norm = gguf.dequantize(stored["blk.0.ffn_norm.weight"].data, stored["blk.0.ffn_norm.weight"].tensor_type)
    assert np.array_equal(model.model.layers[0].post_attention_layernorm.weight.detach().numpy(), norm)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: no output.weight in the file



@pytest.mark.parametrize("package", ["gguf", "accelerate"])
def test_a_missing_extra_is_named_with_its_install_command(package, tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    code, err = _cli(tiny, tmp_path, capsys)
    assert code == EXIT_USAGE
    assert f"needs the optional package {package}, which is not installed: " in err
    assert 'pip install "captum-relp[gguf]"' in err
