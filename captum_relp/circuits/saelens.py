"""SAELens SAE folders: ``cfg.json`` + ``sae_weights.safetensors`` (SAELens 6 and older).

The loader implements SAELens' inference SAEs ``standard``, ``topk``, ``jumprelu`` and
``gated`` with ``normalize_activations`` ``none``, ``expected_average_only_in``,
``layer_norm`` and ``constant_norm_rescale``, and rejects any other architecture or
setting with a clear error instead of reading it as a ReLU SAE. Configs written
before SAELens 6 (no ``architecture``; ``activation_fn_str="topk"`` with
``activation_fn_kwargs={"k": ...}``; boolean ``normalize_activations``) are mapped as
SAELens maps them.

Example:
    >>> import tempfile
    >>> from captum_relp.circuits.sae_model import SparseAutoencoder
    >>> folder = save_saelens(SparseAutoencoder(4, 8, architecture="topk", k=2), tempfile.mkdtemp(),
    ...                       hook_name="blocks.0.hook_resid_post")
    >>> sae = load_saelens(folder)
    >>> sae.architecture, sae.k
    ('topk', 2)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

from .sae_model import ARCHITECTURES, EXTRA_PARAMETERS, NORMALIZATIONS, SparseAutoencoder, read_state_dict

PathLike = Union[str, Path]

SAELENS_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"


def saelens_options(cfg: Dict[str, Any], source: str = "cfg.json") -> Dict[str, Any]:
    """The :class:`SparseAutoencoder` options an SAELens config describes.

    Raises:
        ValueError: For an architecture, activation or setting the package does not implement.

    Example:
        >>> saelens_options({"d_in": 4, "d_sae": 8, "activation_fn_str": "topk",
        ...                  "activation_fn_kwargs": {"k": 3}})["architecture"]
        'topk'
    """
    cfg = dict(cfg)
    architecture = cfg.get("architecture")
    default_activation = "topk" if architecture == "topk" else "relu"  # SAELens 6 stores none
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str", default_activation))
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if architecture is None:  # SAELens < 6
        architecture = "topk" if activation == "topk" else "standard"
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{source}: SAELens architecture {architecture!r} is not supported "
                         f"(supported: {list(ARCHITECTURES)})")
    if activation not in ("relu", "topk") or (activation == "topk") != (architecture == "topk"):
        raise ValueError(f"{source}: activation {activation!r} with architecture {architecture!r} "
                         "is not supported (relu, or topk for a topk SAE)")
    normalize = cfg.get("normalize_activations", "none")
    if isinstance(normalize, bool) or normalize is None:
        normalize = "expected_average_only_in" if normalize else "none"
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"{source}: normalize_activations={normalize!r} is not supported "
                         f"(supported: {list(NORMALIZATIONS)})")
    for key, ok in (("finetuning_scaling_factor", (False, None)),
                    ("reshape_activations", ("none", None)),
                    ("hook_head_index", (None,))):
        if cfg.get(key) not in ok:
            raise ValueError(f"{source}: {key}={cfg.get(key)!r} is not supported")
    options: Dict[str, Any] = {"architecture": architecture, "normalize_activations": normalize}
    if architecture == "topk":
        k = cfg.get("k", kwargs.get("k"))
        if not isinstance(k, int):
            raise ValueError(f"{source}: a topk SAE needs an integer k, got {k!r}")
        options["k"] = k
        options["rescale_acts_by_decoder_norm"] = bool(cfg.get("rescale_acts_by_decoder_norm", False))
    return options


def load_saelens(folder: PathLike) -> SparseAutoencoder:
    """Load an SAELens folder (``cfg.json`` + ``sae_weights.safetensors``).

    Raises:
        ValueError: Missing files, cfg fields or keys, mismatching shapes, non-finite
            values, or an architecture/normalisation that is not supported.

    Example:
        >>> import tempfile
        >>> folder = save_saelens(SparseAutoencoder(4, 8), tempfile.mkdtemp())
        >>> load_saelens(folder).architecture
        'standard'
    """
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
    options = saelens_options(cfg, str(cfg_file))
    state = read_state_dict(weights_file)
    needed = [k for k in SAELENS_KEYS if not (k == "b_enc" and options["architecture"] == "gated")]
    absent = [k for k in needed if k not in state]
    if absent:
        raise ValueError(f"{weights_file}: missing key(s) {absent} (found {sorted(state)})")
    extra = {k: state[k] for k in EXTRA_PARAMETERS[options["architecture"]] if k in state}
    sae = SparseAutoencoder.from_tensors(
        state["W_enc"], state.get("b_enc"), state["W_dec"], state["b_dec"],
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        source=str(weights_file), extra=extra, **options)
    if (sae.d_model, sae.d_dict) != (cfg["d_in"], cfg["d_sae"]):
        raise ValueError(f"{folder}: shape mismatch: cfg.json says d_in={cfg['d_in']}, "
                         f"d_sae={cfg['d_sae']} but W_enc has shape {tuple(sae.W_enc.shape)}")
    return sae


def save_saelens(sae: SparseAutoencoder, folder: PathLike, extra_cfg: Optional[dict] = None,
                 hook_name: Optional[str] = None, model_name: Optional[str] = None) -> Path:
    """Write ``sae`` as an SAELens 6 folder (readable by ``SAE.load_from_disk``); returns it.

    Args:
        sae: The SAE.
        folder: Created if needed.
        extra_cfg: More ``cfg.json`` entries (a ``metadata`` dict is merged).
        hook_name, model_name: Recorded in ``metadata`` (SAELens uses them to attach
            the SAE to a TransformerLens model).

    Example:
        >>> import json, tempfile
        >>> folder = save_saelens(SparseAutoencoder(4, 8), tempfile.mkdtemp(), model_name="gpt2")
        >>> json.loads((folder / "cfg.json").read_text())["metadata"]["model_name"]
        'gpt2'
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [k for k in SAELENS_KEYS if not (k == "b_enc" and sae.architecture == "gated")]
    names += list(EXTRA_PARAMETERS[sae.architecture])
    state = {k: getattr(sae, k).detach().cpu().contiguous().clone() for k in names}
    save_file(state, str(folder / SAELENS_WEIGHTS))
    extra = dict(extra_cfg or {})
    metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION, "hook_name": hook_name,
                "model_name": model_name, **extra.pop("metadata", {})}
    cfg: Dict[str, Any] = {
        "architecture": sae.architecture, "d_in": sae.d_model, "d_sae": sae.d_dict,
        "dtype": str(sae.W_enc.dtype).replace("torch.", ""), "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": sae.normalize_activations, "reshape_activations": "none",
    }
    if sae.architecture == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=sae.rescale_acts_by_decoder_norm)
    cfg.update(extra)
    cfg["metadata"] = metadata
    (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=1))
    return folder


__all__ = ["load_saelens", "save_saelens", "saelens_options", "SAELENS_CFG", "SAELENS_WEIGHTS"]
