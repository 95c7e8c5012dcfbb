"""SAE files written by the real SAELens / dictionary_learning (tests/fixtures/sae, see generate.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from captum_relp.circuits.sae import load_dictionary_learning, load_sae, save_dictionary_learning
from captum_relp.circuits.sae_model import SparseAutoencoder
from captum_relp.circuits.saelens import load_saelens, save_saelens

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sae"
SAELENS_CASES = sorted(p.name for p in (FIXTURES / "saelens").iterdir())
DL_CASES = sorted(p.name for p in (FIXTURES / "dictionary_learning").iterdir())


def _check(sae: SparseAutoencoder, folder: Path) -> None:
    expected = load_file(str(folder / "expected.safetensors"))
    features = sae.encode(expected["x"])
    torch.testing.assert_close(features, expected["features"], rtol=1e-5, atol=1e-5)
    assert torch.equal(features != 0, expected["features"] != 0)
    torch.testing.assert_close(sae.decode(features), expected["x_hat"], rtol=1e-5, atol=1e-5)
    x_hat, f = sae(expected["x"])
    torch.testing.assert_close(x_hat, expected["x_hat"], rtol=1e-5, atol=1e-5)


def test_fixture_versions_recorded():
    versions = json.loads((FIXTURES / "versions.json").read_text())
    assert versions["saelens"]["sae-lens"] and versions["dictionary_learning"]["dictionary-learning"]
    assert {"standard", "topk", "jumprelu", "gated", "layer_norm", "constant_norm_rescale",
            "expected_average_only_in"} <= set(SAELENS_CASES)
    assert {"AutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK", "GatedAutoEncoder"} == set(DL_CASES)


@pytest.mark.parametrize("case", SAELENS_CASES)
def test_saelens_files_give_saelens_features(case, tmp_path):
    folder = FIXTURES / "saelens" / case
    sae = load_saelens(folder)
    assert sae.architecture == json.loads((folder / "cfg.json").read_text())["architecture"]
    _check(sae, folder)
    # our writer round-trips, with architecture and metadata in cfg.json
    out = save_saelens(sae, tmp_path / "out", hook_name="blocks.1.hook_resid_post", model_name="m")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == sae.architecture
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    shutil.copy(folder / "expected.safetensors", out / "expected.safetensors")
    _check(load_sae(out), out)


def test_topk_keeps_k_features():
    sae = load_saelens(FIXTURES / "saelens" / "topk")
    f = sae.encode(torch.randn(50, 8) * 3)
    assert sae.k == 4 and ((f != 0).sum(-1) <= 4).all()


@pytest.mark.parametrize("change, match", [
    ({"architecture": "batchtopk"}, "architecture 'batchtopk' is not supported"),
    ({"architecture": "transcoder"}, "not supported"),
    ({"normalize_activations": "covariance_whitening"}, "normalize_activations"),
    ({"reshape_activations": "hook_z"}, "reshape_activations"),
    ({"activation_fn": "tanh-relu"}, "activation 'tanh-relu'"),
])
def test_saelens_unsupported_settings_raise(tmp_path, change, match):
    shutil.copytree(FIXTURES / "saelens" / "standard", tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    cfg.update(change)
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        load_saelens(tmp_path / "s")


def test_saelens_pre_6_topk_config(tmp_path):
    shutil.copytree(FIXTURES / "saelens" / "topk", tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    for key in ("architecture", "k", "metadata"):
        cfg.pop(key)
    cfg.update(activation_fn_str="topk", activation_fn_kwargs={"k": 4}, normalize_activations=False)
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    _check(load_saelens(tmp_path / "s"), FIXTURES / "saelens" / "topk")


@pytest.mark.parametrize("case", DL_CASES)
def test_dictionary_learning_files_give_library_features(case):
    folder = FIXTURES / "dictionary_learning" / case
    # AutoEncoder.from_pretrained normalises the decoder by default; the fixture used it
    sae = load_dictionary_learning(folder / "ae.pt", normalize_decoder=case == "AutoEncoder")
    _check(sae, folder)
    assert load_sae(folder).architecture == sae.architecture


def test_dictionary_learning_writer_rejects_other_architectures(tmp_path):
    with pytest.raises(ValueError, match="use save_saelens"):
        save_dictionary_learning(SparseAutoencoder(4, 8, architecture="topk", k=2), tmp_path)


def test_normalisation_undone_by_decode():
    for mode in ("layer_norm", "constant_norm_rescale"):
        sae = SparseAutoencoder(4, 6, normalize_activations=mode)
        with pytest.raises(RuntimeError, match="prior encode"):
            sae.decode(torch.zeros(1, 6))
        x = torch.randn(3, 4) * 5 + 2
        torch.testing.assert_close(sae.decode(sae.encode(x) * 0), sae.denormalize(sae.b_dec.expand(3, 4)))


def test_dictionary_learning_writer_normalize_decoder(tmp_path):
    # files written with normalize_decoder=True read the same in dictionary_learning, whose
    # AutoEncoder.from_pretrained normalises the decoder (checked once with dictionary-learning
    # 0.1.0: feature diff 7e-6 on the shipped resid_2 SAE; without it 15.9)
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 16)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    file = save_dictionary_learning(sae, tmp_path, normalize_decoder=True)
    plain, normalised = load_dictionary_learning(file), load_dictionary_learning(file, normalize_decoder=True)
    x = torch.randn(4, 8)
    torch.testing.assert_close(plain.encode(x), normalised.encode(x))
    torch.testing.assert_close(plain(x)[0], sae(x)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.W_dec.norm(dim=1), torch.ones(16))
