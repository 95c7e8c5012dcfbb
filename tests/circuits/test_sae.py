"""Sparse autoencoders: arithmetic, both file formats, validation, trainer, shipped dictionaries."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from captum_relp.circuits.sae import (
    SparseAutoencoder,
    load_dictionary_learning,
    load_sae,
    load_saelens,
    sae_format,
    save_dictionary_learning,
    save_saelens,
)
from captum_relp.circuits.sae_train import fraction_variance_explained, train_sae
from captum_relp.embedded import embedded_saes_dir, load_embedded_sae_stats, load_embedded_saes

torch.set_num_threads(1)


def hand_sae(apply_b_dec_to_input=True):
    """d_model=2, d_dict=3 with hand-picked weights."""
    sae = SparseAutoencoder(2, 3, apply_b_dec_to_input=apply_b_dec_to_input)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -1.0, 0.5]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.5], [-1.0, 1.0]]))
        sae.b_dec.copy_(torch.tensor([1.0, 1.0]))
    return sae


def random_sae(seed=0, d_model=5, d_dict=7, apply=True):
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d_model, d_dict, apply_b_dec_to_input=apply)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return sae


def test_encode_decode_by_hand():
    sae = hand_sae()
    x = torch.tensor([[3.0, 2.0], [1.0, 1.0], [0.0, 3.0]])
    # x - b_dec = [2, 1], [0, 0], [-1, 2]
    # @ W_enc + b_enc = [2, 1, -0.5], [0, -1, 0.5], [-1, 3, 3.5]; relu:
    f_expected = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.5], [0.0, 3.0, 3.5]])
    f = sae.encode(x)
    assert torch.equal(f, f_expected)
    # f @ W_dec + b_dec
    x_hat_expected = torch.tensor([[3.0, 1.5], [0.5, 1.5], [-2.5, 6.0]])
    assert torch.equal(sae.decode(f), x_hat_expected)
    x_hat, f2 = sae(x)
    assert torch.equal(f2, f_expected) and torch.equal(x_hat, x_hat_expected)
    # leading dims (B, T, d)
    x_hat3, f3 = sae(x.reshape(1, 3, 2).expand(2, 3, 2))
    assert f3.shape == (2, 3, 3) and torch.equal(x_hat3[1], x_hat_expected)


def test_apply_b_dec_to_input_false_and_dtype():
    sae = hand_sae(apply_b_dec_to_input=False)
    x = torch.tensor([[3.0, 2.0]])  # @ W_enc + b_enc = [3, 3, -0.5]
    assert torch.equal(sae.encode(x), torch.tensor([[3.0, 3.0, 0.0]]))
    half = hand_sae().to(torch.float64)
    f = half.encode(torch.tensor([[3.0, 2.0]], dtype=torch.float32))
    assert f.dtype == torch.float64 and half.decode(f).dtype == torch.float64


def assert_same(a: SparseAutoencoder, b: SparseAutoencoder, x: torch.Tensor):
    xa, fa = a(x)
    xb, fb = b(x)
    assert torch.allclose(fa, fb, atol=1e-6) and torch.allclose(xa, xb, atol=1e-6)


@pytest.mark.parametrize("target", ["folder", "ae.pt", "x.safetensors"])
def test_dictionary_learning_round_trip(tmp_path, target):
    sae = random_sae()
    path = tmp_path if target == "folder" else tmp_path / target
    written = save_dictionary_learning(sae, path)
    assert written.name == ("ae.pt" if target == "folder" else target)
    loaded = load_dictionary_learning(path)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
    assert_same(sae, loaded, torch.randn(3, 4, 5))
    assert sae_format(path) == "dictionary_learning"
    assert isinstance(load_sae(path), SparseAutoencoder)


def test_dictionary_learning_layout_matches_autoencoder_semantics(tmp_path):
    """f = relu(encoder(x - bias)), x_hat = decoder(f) + bias, with nn.Linear layers."""
    sae = random_sae(1)
    state = torch.load(save_dictionary_learning(sae, tmp_path), weights_only=True)
    assert state["encoder.weight"].shape == (7, 5) and state["decoder.weight"].shape == (5, 7)
    encoder, decoder = torch.nn.Linear(5, 7), torch.nn.Linear(7, 5, bias=False)
    encoder.load_state_dict({"weight": state["encoder.weight"], "bias": state["encoder.bias"]})
    decoder.load_state_dict({"weight": state["decoder.weight"]})
    x = torch.randn(6, 5)
    f = torch.relu(encoder(x - state["bias"]))
    assert_same(sae, load_dictionary_learning(tmp_path), x)
    assert torch.allclose(sae.encode(x), f, atol=1e-6)
    assert torch.allclose(sae.decode(f), decoder(f) + state["bias"], atol=1e-6)


def test_dictionary_learning_folds_apply_b_dec_false(tmp_path):
    sae = random_sae(2, apply=False)
    loaded = load_dictionary_learning(save_dictionary_learning(sae, tmp_path / "a.pt"))
    assert loaded.apply_b_dec_to_input
    assert_same(sae, loaded, torch.randn(10, 5))


@pytest.mark.parametrize("apply", [True, False])
def test_saelens_round_trip(tmp_path, apply):
    sae = random_sae(3, apply=apply)
    save_saelens(sae, tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["d_sae"] == 7
    loaded = load_saelens(tmp_path)
    assert loaded.apply_b_dec_to_input is apply
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
    assert_same(sae, loaded, torch.randn(2, 3, 5))
    assert sae_format(tmp_path) == "saelens" and load_sae(tmp_path).apply_b_dec_to_input is apply


def test_saelens_default_apply_b_dec(tmp_path):
    save_saelens(random_sae(), tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 5, "d_sae": 7}))
    assert load_saelens(tmp_path).apply_b_dec_to_input is True


def test_format_detection_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="cfg.json.*ae.pt"):
        load_sae(tmp_path)
    with pytest.raises(ValueError, match="not a recognised SAE"):
        load_sae(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        load_dictionary_learning(tmp_path / "missing.pt")


DL_CASES = {
    "missing key": (lambda s: s.pop("encoder.bias"), r"missing key.*encoder\.bias"),
    "wrong shape": (lambda s: s.__setitem__("decoder.weight", torch.zeros(5, 6)),
                    r"shape mismatch: W_dec has shape \(6, 5\), expected \(7, 5\)"),
    "bias shape": (lambda s: s.__setitem__("bias", torch.zeros(4)), r"b_dec has shape \(4,\)"),
    "wrong rank": (lambda s: s.__setitem__("encoder.weight", torch.zeros(7, 5, 1)),
                   r"encoder\.weight must have rank 2"),
    "nan": (lambda s: s["encoder.bias"].__setitem__(3, float("nan")),
            r"b_enc contains non-finite"),
    "inf": (lambda s: s["decoder.weight"].__setitem__((0, 0), float("inf")),
            r"W_dec contains non-finite"),
}


@pytest.mark.parametrize("case", sorted(DL_CASES))
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_dictionary_learning_rejects_malformed(tmp_path, case, suffix):
    corrupt, message = DL_CASES[case]
    file = save_dictionary_learning(random_sae(), tmp_path / f"ae{suffix}")
    state = load_file(str(file)) if suffix == ".safetensors" else torch.load(file)
    corrupt(state)
    if suffix == ".safetensors":
        save_file(state, str(file))
    else:
        torch.save(state, file)
    with pytest.raises(ValueError, match=message) as err:
        load_dictionary_learning(file)
    assert str(file) in str(err.value)


def test_dictionary_learning_rejects_non_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "ae.pt")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_dictionary_learning(tmp_path)


SAELENS_CASES = {
    "missing cfg field": ("cfg", lambda c: c.pop("d_sae"), r"missing cfg field.*d_sae"),
    "cfg size mismatch": ("cfg", lambda c: c.__setitem__("d_in", 6), r"d_in=6"),
    "missing key": ("w", lambda s: s.pop("b_dec"), r"missing key.*b_dec"),
    "wrong shape": ("w", lambda s: s.__setitem__("b_enc", torch.zeros(8)),
                    r"shape mismatch: b_enc has shape \(8,\), expected \(7,\)"),
    "wrong rank": ("w", lambda s: s.__setitem__("W_enc", torch.zeros(35)), r"W_enc must have rank 2"),
    "nan": ("w", lambda s: s["W_enc"].__setitem__((1, 1), float("nan")), r"W_enc contains non-finite"),
}


@pytest.mark.parametrize("case", sorted(SAELENS_CASES))
def test_saelens_rejects_malformed(tmp_path, case):
    where, corrupt, message = SAELENS_CASES[case]
    save_saelens(random_sae(), tmp_path)
    if where == "cfg":
        cfg = json.loads((tmp_path / "cfg.json").read_text())
        corrupt(cfg)
        (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    else:
        state = load_file(str(tmp_path / "sae_weights.safetensors"))
        corrupt(state)
        save_file(state, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=message) as err:
        load_saelens(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_saelens_missing_weights_file(tmp_path):
    save_saelens(random_sae(), tmp_path)
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(ValueError, match="lacks sae_weights.safetensors"):
        load_saelens(tmp_path)


def synthetic(n=3000, d=16, k=32, p=0.06, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(k, d, generator=g)
    dirs /= dirs.norm(dim=-1, keepdim=True)
    codes = (torch.rand(n, k, generator=g) < p) * torch.rand(n, k, generator=g) * 2
    return codes @ dirs + 0.3


def test_fve():
    x = torch.randn(50, 4)
    assert fraction_variance_explained(x, x) == 1.0
    assert abs(fraction_variance_explained(x, x.mean(0).expand_as(x))) < 1e-12


def test_trainer_sparse_data_and_determinism():
    x = synthetic()
    kw = dict(d_dict=64, l1_coeff=1.0, steps=300, lr=1e-2, batch_size=128, seed=3)
    sae, stats = train_sae(x, **kw)
    assert stats["fve"] > 0.8, stats
    assert stats["l0"] < 12, stats  # sparse: fewer active features than d_model=16
    assert 0.0 <= stats["dead_fraction"] <= 0.5, stats
    # stats are measured on the original scale of x
    held_out_fve = fraction_variance_explained(x, sae(x)[0])
    assert held_out_fve > 0.8
    sae2, stats2 = train_sae(x, **kw)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name), getattr(sae2, name)), name
    assert stats["fve"] == stats2["fve"]
    sae3, _ = train_sae(x, **{**kw, "seed": 4})
    assert not torch.equal(sae.W_dec, sae3.W_dec)


def test_trainer_rejects_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        train_sae(torch.full((10, 3), float("nan")), 4, steps=1)
    with pytest.raises(ValueError, match=r"\(N, d_model\)"):
        train_sae(torch.zeros(10), 4, steps=1)


MODELS = ("tiny-gpt2-ioi", "tiny-llama-ioi")
MIN_FVE = 0.85  # measured >= 0.9 at training time (see saes.json); margin for re-measurement


@pytest.mark.parametrize("name", MODELS)
def test_embedded_saes(name):
    if not (embedded_saes_dir(name) / "saes.json").is_file():
        with pytest.raises(FileNotFoundError, match="scripts/train_saes.py"):
            load_embedded_saes(name)
        pytest.skip(f"dictionaries of {name} not trained")
    from captum_relp.embedded import load_embedded

    info = load_embedded_sae_stats(name)
    saes = load_embedded_saes(name)
    model, _ = load_embedded(name)
    n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
    assert sorted(saes) == sorted(f"{k}_{i}" for k in ("resid", "attn", "mlp")
                                  for i in range(n_layers))
    for key, sae in saes.items():
        stats = info["dictionaries"][key]
        assert (sae.d_model, sae.d_dict) == (d_model, 4 * d_model)
        assert stats["fve"] >= MIN_FVE, (key, stats)
        assert stats["l0"] < d_model / 2, (key, stats)
        assert stats["dead_fraction"] < 0.9, (key, stats)  # many dead: tiny vocabulary
    assert "train_saes.py" in info["command"] and "seed" in info


@pytest.mark.parametrize("name", MODELS[:1])
def test_embedded_saes_reconstruct_model_activations(name):
    """Re-measure FVE on fresh text: the shipped dictionaries fit the model's activations."""
    if not (embedded_saes_dir(name) / "saes.json").is_file():
        pytest.skip(f"dictionaries of {name} not trained")
    from captum_relp.embedded import load_embedded
    from captum_relp.models import model_components

    model, tok = load_embedded(name)
    saes = load_embedded_saes(name)
    texts = ["Then, Mary and John went to the store. John gave a drink to Mary.",
             "The keys that the man holds are on the table."] * 4
    enc = tok(texts, return_tensors="pt", padding=True)
    acts = {}
    parts = model_components(model)
    handles = [parts.blocks[0].register_forward_hook(
        lambda m, i, o: acts.__setitem__("resid_0", o[0] if isinstance(o, tuple) else o)),
        parts.mlp[1].register_forward_hook(lambda m, i, o: acts.__setitem__("mlp_1", o))]
    with torch.no_grad():
        model(**enc)
    for h in handles:
        h.remove()
    mask = enc["attention_mask"].bool() & (enc["input_ids"] != tok.bos_token_id)
    for key, a in acts.items():
        x = a[mask]
        assert fraction_variance_explained(x, saes[key](x)[0]) > 0.7, key
