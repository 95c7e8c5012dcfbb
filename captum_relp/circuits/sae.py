"""Sparse autoencoders (dictionaries) for sparse feature circuits (Marks et al., 2025).

A :class:`SparseAutoencoder` maps an activation ``x`` (any leading dims, last dim
``d_model``) to sparse features ``f = relu((x - b_dec) @ W_enc + b_enc)`` and back
to ``x_hat = f @ W_dec + b_dec``.

Two on-disk formats are read and written:

* dictionary_learning (saprmarks/dictionary_learning ``AutoEncoder``): a state dict
  with ``encoder.weight (d_dict, d_model)``, ``encoder.bias (d_dict)``,
  ``decoder.weight (d_model, d_dict)`` and ``bias (d_model)``, stored as ``ae.pt``
  (torch) or as a ``.safetensors`` file with the same keys;
* SAELens: a folder with ``cfg.json`` (``d_in``, ``d_sae``, optional
  ``apply_b_dec_to_input``) and ``sae_weights.safetensors`` (``W_enc``, ``b_enc``,
  ``W_dec``, ``b_dec``).

Example:
    >>> import torch
    >>> sae = SparseAutoencoder(4, 8)
    >>> x_hat, f = sae(torch.randn(2, 3, 4))
    >>> x_hat.shape, f.shape
    (torch.Size([2, 3, 4]), torch.Size([2, 3, 8]))
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

PathLike = Union[str, Path]

DL_KEYS = ("encoder.weight", "encoder.bias", "decoder.weight", "bias")
SAELENS_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
DL_FILE = "ae.pt"


class SparseAutoencoder(nn.Module):
    """ReLU sparse autoencoder ``x -> f -> x_hat``.

    Args:
        d_model: Width of the activations.
        d_dict: Number of features.
        apply_b_dec_to_input: If True (default), ``encode`` subtracts ``b_dec`` first
            (SAELens ``apply_b_dec_to_input``).
        dtype, device: Of the parameters (zero-initialised).

    ``encode`` casts its input to the parameter dtype; ``decode`` returns the
    parameter dtype (callers cast back).

    Example:
        >>> import torch
        >>> sae = SparseAutoencoder(2, 3)
        >>> with torch.no_grad():
        ...     _ = sae.W_enc.copy_(torch.tensor([[1., 0., -1.], [0., 1., 1.]]))
        >>> sae.encode(torch.tensor([[2., -1.]])).detach()
        tensor([[2., 0., 0.]])
    """

    def __init__(self, d_model: int, d_dict: int, apply_b_dec_to_input: bool = True,
                 dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        if d_model < 1 or d_dict < 1:
            raise ValueError(f"d_model and d_dict must be positive, got {d_model}, {d_dict}")
        kw = dict(dtype=dtype or torch.float32, device=device)
        self.d_model, self.d_dict = int(d_model), int(d_dict)
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.W_enc = nn.Parameter(torch.zeros(d_model, d_dict, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_dict, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_dict, d_model, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_model, **kw))

    def encode(self, x: Tensor) -> Tensor:
        """Features ``relu((x - b_dec) @ W_enc + b_enc)``, shape ``(..., d_dict)``."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction ``f @ W_dec + b_dec``, shape ``(..., d_model)``."""
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(x_hat, f)``."""
        f = self.encode(x)
        return self.decode(f), f

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_dict={self.d_dict}, "
                f"apply_b_dec_to_input={self.apply_b_dec_to_input}")

    @classmethod
    def from_tensors(cls, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor,
                     apply_b_dec_to_input: bool = True, source: str = "tensors"
                     ) -> "SparseAutoencoder":
        """Build from weights after checking ranks, shapes and finiteness.

        Raises:
            ValueError: Naming ``source`` and the problem.
        """
        tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        _check_tensors(tensors, source)
        d_model, d_dict = W_enc.shape
        sae = cls(d_model, d_dict, apply_b_dec_to_input, dtype=W_enc.dtype, device=W_enc.device)
        with torch.no_grad():
            for name, value in tensors.items():
                getattr(sae, name).copy_(value)
        return sae


def _check_tensors(t: Mapping[str, Tensor], source: str) -> None:
    for name, rank in (("W_enc", 2), ("b_enc", 1), ("W_dec", 2), ("b_dec", 1)):
        if not isinstance(t[name], Tensor):
            raise ValueError(f"{source}: {name} is not a tensor ({type(t[name]).__name__})")
        if t[name].dim() != rank:
            raise ValueError(f"{source}: {name} must have rank {rank}, got shape "
                             f"{tuple(t[name].shape)}")
    d_model, d_dict = t["W_enc"].shape
    expected = {"b_enc": (d_dict,), "W_dec": (d_dict, d_model), "b_dec": (d_model,)}
    for name, shape in expected.items():
        if tuple(t[name].shape) != shape:
            raise ValueError(
                f"{source}: shape mismatch: {name} has shape {tuple(t[name].shape)}, expected "
                f"{shape} from W_enc (d_model={d_model}, d_dict={d_dict})")
    for name, value in t.items():
        if not value.is_floating_point():
            raise ValueError(f"{source}: {name} has non-float dtype {value.dtype}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{source}: {name} contains non-finite values (NaN or inf)")


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


def _read_state(file: Path) -> Dict[str, Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except Exception as err:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"{file}: not a readable safetensors file ({err})") from err
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{file}: not a readable torch state dict ({err})") from err
    if not isinstance(state, Mapping):
        raise ValueError(f"{file}: expected a state dict, got {type(state).__name__}")
    return dict(state)


def load_dictionary_learning(path: PathLike) -> SparseAutoencoder:
    """Load a dictionary_learning ``AutoEncoder`` (``ae.pt``, a folder with it, or a
    ``.safetensors`` file with the same keys).

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
    state = _read_state(file)
    missing = [k for k in DL_KEYS if k not in state]
    if missing:
        raise ValueError(f"{file}: missing key(s) {missing} for the dictionary_learning format "
                         f"(expected {list(DL_KEYS)}, found {sorted(state)})")
    for key in DL_KEYS:
        if not isinstance(state[key], Tensor) or state[key].dim() != (2 if "weight" in key else 1):
            shape = tuple(getattr(state[key], "shape", ()))
            raise ValueError(f"{file}: {key} must have rank {2 if 'weight' in key else 1}, "
                             f"got shape {shape}")
    enc_w, dec_w = state["encoder.weight"], state["decoder.weight"]
    return SparseAutoencoder.from_tensors(
        enc_w.t().contiguous(), state["encoder.bias"], dec_w.t().contiguous(), state["bias"],
        source=f"{file} (W_enc=encoder.weight.T, b_enc=encoder.bias, W_dec=decoder.weight.T, "
               f"b_dec=bias)")


def dictionary_learning_state(sae: SparseAutoencoder,
                              dtype: Optional[torch.dtype] = None) -> Dict[str, Tensor]:
    """The dictionary_learning state dict of ``sae``.

    An SAE with ``apply_b_dec_to_input=False`` is folded exactly into
    ``encoder.bias = b_enc + b_dec @ W_enc``.
    """
    with torch.no_grad():
        b_enc = sae.b_enc if sae.apply_b_dec_to_input else sae.b_enc + sae.b_dec @ sae.W_enc
        state = {"encoder.weight": sae.W_enc.t(), "encoder.bias": b_enc,
                 "decoder.weight": sae.W_dec.t(), "bias": sae.b_dec}
        return {k: v.detach().to("cpu", dtype or v.dtype).contiguous().clone()
                for k, v in state.items()}


def save_dictionary_learning(sae: SparseAutoencoder, path: PathLike,
                             dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``sae`` in dictionary_learning layout; returns the file written.

    ``path`` ending in ``.pt`` or ``.safetensors`` is the file; otherwise it is a folder
    that receives ``ae.pt``. ``dtype`` optionally casts the stored tensors.
    """
    path = Path(path)
    state = dictionary_learning_state(sae, dtype)
    if path.suffix not in (".pt", ".safetensors"):
        path = path / DL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "dictionary_learning"})
    else:
        torch.save(state, path)
    return path


# ---------------------------------------------------------------- SAELens


def load_saelens(folder: PathLike) -> SparseAutoencoder:
    """Load an SAELens folder (``cfg.json`` + ``sae_weights.safetensors``).

    Raises:
        ValueError: Missing files, cfg fields or keys, mismatching shapes, non-finite values.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_file, weights_file = folder / SAELENS_CFG, folder / SAELENS_WEIGHTS
    for file in (cfg_file, weights_file):
        if not file.is_file():
            raise ValueError(f"{folder}: SAELens folder lacks {file.name}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_file}: invalid JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_file}: expected a JSON object")
    missing = [k for k in ("d_in", "d_sae") if k not in cfg]
    if missing:
        raise ValueError(f"{cfg_file}: missing cfg field(s) {missing}")
    try:
        state = load_file(str(weights_file))
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{weights_file}: not a readable safetensors file ({err})") from err
    absent = [k for k in SAELENS_KEYS if k not in state]
    if absent:
        raise ValueError(f"{weights_file}: missing key(s) {absent} (found {sorted(state)})")
    sae = SparseAutoencoder.from_tensors(
        *(state[k] for k in SAELENS_KEYS),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        source=str(weights_file))
    if (sae.d_model, sae.d_dict) != (cfg["d_in"], cfg["d_sae"]):
        raise ValueError(f"{folder}: shape mismatch: cfg.json says d_in={cfg['d_in']}, "
                         f"d_sae={cfg['d_sae']} but W_enc has shape {tuple(sae.W_enc.shape)}")
    return sae


def save_saelens(sae: SparseAutoencoder, folder: PathLike,
                 extra_cfg: Optional[dict] = None) -> Path:
    """Write ``sae`` as an SAELens folder; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: getattr(sae, k).detach().cpu().contiguous().clone() for k in SAELENS_KEYS}
    save_file(state, str(folder / SAELENS_WEIGHTS))
    cfg = {"d_in": sae.d_model, "d_sae": sae.d_dict,
           "apply_b_dec_to_input": sae.apply_b_dec_to_input,
           "dtype": str(sae.W_enc.dtype).replace("torch.", ""), **(extra_cfg or {})}
    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=1))
    return folder


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
    """Load an SAE in either format (detected by :func:`sae_format`)."""
    fmt = sae_format(path)
    return load_saelens(path) if fmt == "saelens" else load_dictionary_learning(path)




__all__ = [
    "SparseAutoencoder", "load_dictionary_learning", "save_dictionary_learning",
    "dictionary_learning_state", "load_saelens", "save_saelens", "sae_format", "load_sae",
]

