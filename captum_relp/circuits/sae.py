"""Sparse autoencoders (dictionaries) for sparse feature circuits (Marks et al., 2025).

A :class:`~captum_relp.circuits.sae_model.SparseAutoencoder` maps an activation ``x``
(any leading dims, last dim ``d_model``) to sparse features ``f`` and back to ``x_hat``.

Two on-disk formats are read and written:

* dictionary_learning (saprmarks/dictionary_learning), stored as ``ae.pt`` (torch)
  or as a ``.safetensors`` file with the same keys; the class is recognised from
  the keys: ``AutoEncoder`` (``encoder.weight (d_dict, d_model)``, ``encoder.bias``,
  ``decoder.weight (d_model, d_dict)``, ``bias``), ``AutoEncoderTopK`` (``b_dec`` and
  a ``k`` buffer instead of ``bias``), ``JumpReluAutoEncoder`` (``W_enc``, ``b_enc``,
  ``W_dec``, ``b_dec``, ``threshold``; ``b_dec`` not subtracted from the input) and
  ``GatedAutoEncoder`` (``decoder_bias``, ``r_mag``, ``gate_bias``, ``mag_bias``);
* SAELens (:mod:`captum_relp.circuits.saelens`): a folder with ``cfg.json`` and
  ``sae_weights.safetensors``.

Example:
    >>> import torch
    >>> sae = SparseAutoencoder(4, 8)
    >>> x_hat, f = sae(torch.randn(2, 3, 4))
    >>> x_hat.shape, f.shape
    (torch.Size([2, 3, 4]), torch.Size([2, 3, 8]))
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch
from torch import Tensor

from .sae_model import SparseAutoencoder, read_state_dict
from .saelens import SAELENS_CFG, load_saelens, save_saelens

PathLike = Union[str, Path]

DL_KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "bias")
DL_CLASSES: Dict[str, tuple] = {
    "AutoEncoder": DL_KEYS,
    "AutoEncoderTopK": ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k"),
    "JumpReluAutoEncoder": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "GatedAutoEncoder": ("encoder.weight", "decoder.weight", "decoder_bias", "r_mag",
                         "gate_bias", "mag_bias"),
}
DL_FILE = "ae.pt"


# ---------------------------------------------------------------- dictionary_learning


def _dl_file(path: PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        for name in (DL_FILE, "ae.safetensors"):
            if (path / name).is_file():
                return path / name
        raise ValueError(f"{path}: folder has no {DL_FILE} (dictionary_learning format)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return path


def dictionary_learning_class(state: Mapping[str, Tensor]) -> str:
    """The dictionary_learning class whose state dict ``state`` is (``"AutoEncoder"``, ...).

    Raises:
        ValueError: When no supported class matches, listing the keys found.

    Example:
        >>> import torch
        >>> dictionary_learning_class({k: torch.zeros(1) for k in DL_KEYS})
        'AutoEncoder'
    """
    for name in ("JumpReluAutoEncoder", "GatedAutoEncoder", "AutoEncoderTopK", "AutoEncoder"):
        if all(key in state for key in DL_CLASSES[name]):
            return name
    raise ValueError(
        f"missing key(s) for the dictionary_learning format: found {sorted(state)}; supported "
        f"classes and their keys: " + "; ".join(f"{c} {list(k)}" for c, k in DL_CLASSES.items()))


def load_dictionary_learning(path: PathLike, normalize_decoder: bool = False) -> SparseAutoencoder:
    """Load a dictionary_learning ``AutoEncoder``, ``AutoEncoderTopK``, ``JumpReluAutoEncoder``
    or ``GatedAutoEncoder`` (``ae.pt``, a folder with it, or a ``.safetensors`` file with
    the same keys).

    Args:
        path: The file or its folder.
        normalize_decoder: As ``AutoEncoder.from_pretrained`` (whose default is True):
            scale an ``AutoEncoder``'s decoder columns to unit norm and its encoder
            rows (and bias) by the same norms; features change scale, reconstructions
            do not. Default False: the stored weights as they are.

    Raises:
        ValueError: Missing keys, wrong ranks/shapes or non-finite values (naming the file).

    Example:
        >>> import tempfile, torch
        >>> sae = SparseAutoencoder(4, 8)
        >>> d = tempfile.mkdtemp()
        >>> save_dictionary_learning(sae, d)  # doctest: +ELLIPSIS
        PosixPath('.../ae.pt')
        >>> load_dictionary_learning(d).d_dict
        8
    """
    file = _dl_file(path)
    state = read_state_dict(file)
    try:
        kind = dictionary_learning_class(state)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from err
    for key in DL_CLASSES[kind]:
        if not isinstance(state[key], Tensor):
            raise ValueError(f"{file}: {key} is not a tensor")
    if kind == "JumpReluAutoEncoder":
        return SparseAutoencoder.from_tensors(
            state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"],
            apply_b_dec_to_input=False, source=f"{file} ({kind})",
            extra={"threshold": state["threshold"]}, architecture="jumprelu")
    for key in ("encoder.weight", "decoder.weight"):
        if state[key].dim() != 2:
            raise ValueError(f"{file}: {key} must have rank 2, got shape {tuple(state[key].shape)}")
    W_enc, W_dec = state["encoder.weight"].t().contiguous(), state["decoder.weight"].t().contiguous()
    source = f"{file} ({kind}; W_enc=encoder.weight.T, W_dec=decoder.weight.T)"
    if kind == "GatedAutoEncoder":
        return SparseAutoencoder.from_tensors(
            W_enc, None, W_dec, state["decoder_bias"], source=source, architecture="gated",
            extra={"b_gate": state["gate_bias"], "b_mag": state["mag_bias"], "r_mag": state["r_mag"]})
    if kind == "AutoEncoderTopK":
        return SparseAutoencoder.from_tensors(W_enc, state["encoder.bias"], W_dec, state["b_dec"],
                                              source=source, architecture="topk", k=int(state["k"]))
    b_enc = state["encoder.bias"]
    for key, value in (("encoder.bias", b_enc), ("bias", state["bias"])):
        if value.dim() != 1:
            raise ValueError(f"{file}: {key} must have rank 1, got shape {tuple(value.shape)}")
    if normalize_decoder and W_dec.shape[1] == state["bias"].shape[0]:
        norms = W_dec.norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms)):
            W_dec, W_enc, b_enc = W_dec / norms[:, None], W_enc * norms, b_enc * norms
    return SparseAutoencoder.from_tensors(W_enc, b_enc, W_dec, state["bias"], source=source)


def dictionary_learning_state(sae: SparseAutoencoder,
                              dtype: Optional[torch.dtype] = None) -> Dict[str, Tensor]:
    """The dictionary_learning state dict of ``sae``.

    An SAE with ``apply_b_dec_to_input=False`` is folded exactly into
    ``encoder.bias = b_enc + b_dec @ W_enc``. Only ``standard`` SAEs without
    activation normalisation are written (as ``AutoEncoder``).
    """
    if sae.architecture != "standard" or sae.normalize_activations not in ("none",):
        raise ValueError(
            f"the dictionary_learning writer handles standard SAEs without activation "
            f"normalisation (AutoEncoder); got architecture={sae.architecture!r}, "
            f"normalize_activations={sae.normalize_activations!r}: use save_saelens")
    with torch.no_grad():
        b_enc = sae.b_enc if sae.apply_b_dec_to_input else sae.b_enc + sae.b_dec @ sae.W_enc
        state = {"encoder.weight": sae.W_enc.t(), "encoder.bias": b_enc,
                 "decoder.weight": sae.W_dec.t(), "bias": sae.b_dec}
        return {k: v.detach().to("cpu", dtype or v.dtype).contiguous().clone()
                for k, v in state.items()}


def save_dictionary_learning(sae: SparseAutoencoder, path: PathLike,
                             dtype: Optional[torch.dtype] = None,
                             normalize_decoder: bool = False) -> Path:
    """Write ``sae`` in dictionary_learning layout; returns the file written.

    ``path`` ending in ``.pt`` or ``.safetensors`` is the file; otherwise it is a folder
    that receives ``ae.pt``. ``dtype`` optionally casts the stored tensors.
    ``AutoEncoder.from_pretrained`` rescales features to unit-norm decoder columns by
    default; ``normalize_decoder=True`` writes them so (reconstructions unchanged,
    features scaled by the decoder norms), so that dictionary_learning and
    ``load_dictionary_learning`` read the same features.
    """
    path = Path(path)
    state = dictionary_learning_state(sae, dtype)
    if normalize_decoder:
        norms = state["decoder.weight"].norm(dim=0)
        state["decoder.weight"] = state["decoder.weight"] / norms
        state["encoder.weight"] = state["encoder.weight"] * norms[:, None]
        state["encoder.bias"] = state["encoder.bias"] * norms
    if path.suffix not in (".pt", ".safetensors"):
        path = path / DL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "dictionary_learning"})
    else:
        torch.save(state, path)
    return path


def sae_format(path: PathLike) -> str:
    """``"saelens"`` or ``"dictionary_learning"``; ValueError if neither is recognised."""
    path = Path(path)
    if path.is_dir():
        if (path / SAELENS_CFG).is_file():
            return "saelens"
        if (path / DL_FILE).is_file() or (path / "ae.safetensors").is_file():
            return "dictionary_learning"
    elif path.is_file() and path.suffix in (".pt", ".safetensors"):
        return "dictionary_learning"
    raise ValueError(
        f"{path}: not a recognised SAE; looked for a folder with {SAELENS_CFG} (SAELens), "
        f"a folder with {DL_FILE} or a .pt/.safetensors file (dictionary_learning)")


def load_sae(path: PathLike) -> SparseAutoencoder:
    """Load an SAE in either format (detected by :func:`sae_format`).

    Example:
        >>> import tempfile
        >>> folder = save_saelens(SparseAutoencoder(4, 8), tempfile.mkdtemp())
        >>> load_sae(folder).d_dict
        8
    """
    fmt = sae_format(path)
    return load_saelens(path) if fmt == "saelens" else load_dictionary_learning(path)


__all__ = [
    "SparseAutoencoder", "load_dictionary_learning", "save_dictionary_learning",
    "dictionary_learning_state", "dictionary_learning_class", "load_saelens", "save_saelens",
    "sae_format", "load_sae",
]

