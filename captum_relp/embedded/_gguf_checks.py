"""Checks that keep a damaged or inconsistent GGUF file from becoming a model with wrong weights.

transformers builds the model that a GGUF file's metadata describes and copies in the tensors
it finds; a tensor that is missing, or that the metadata does not ask for, leaves a weight at
random initialisation (or a tensor unused) without an error. These checks run before the
model is built, and again on what transformers reports after loading:

* :func:`read_checked`: every tensor's storage type is known and a floating-point or quantized
  one, its rows fill whole quantization blocks, and its bytes lie inside the file (a truncated
  file is named as such, with the tensor that is cut);
* :func:`check_against_config`: the file holds exactly the tensors of the model its metadata
  describes, each with the shape that model expects;
* :func:`check_loading_info`: transformers reports no weight missing or of another shape.

Every failure is a :class:`GGUFFileError` (a :class:`ValueError`) naming the file, the tensor,
what was expected and what was found.
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterable, List, Tuple

_INTEGER_TYPES = ("I8", "I16", "I32", "I64")
_SUMMARY_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size")
_BLOCK = re.compile(r"^blk\.(\d+)\.")


class GGUFFileError(ValueError):
    """A GGUF file that is damaged, or whose tensors disagree with the model its metadata describes.

    Example:
        >>> issubclass(GGUFFileError, ValueError)
        True
    """


def _shown(names: Iterable[str], limit: int = 4, quote: bool = True) -> str:
    """Up to ``limit`` names (quoted), then how many more.

    Example:
        >>> _shown(["a", "b", "c"], limit=2)
        "'a', 'b' and 1 more"
    """
    names = sorted(names)
    shown = ", ".join(repr(n) if quote else n for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_field(path: Path, field: Any, data_start: int, file_size: int) -> None:
    """One tensor-table entry: known floating-point or quantized type, whole blocks, bytes inside the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    _, name_data, _, dims, raw_type, offset = field.parts
    name = bytes(name_data).decode("utf-8", "replace")
    try:
        ggml_type = GGMLQuantizationType(int(raw_type[0]))
    except ValueError:
        raise GGUFFileError(f"{path}: tensor {name!r} has storage type {int(raw_type[0])}, expected one the "
                            "gguf package knows (F32, F16, BF16, Q8_0, Q4_K ...); the file is damaged "
                            "or newer than the gguf package") from None
    if ggml_type.name in _INTEGER_TYPES:
        raise GGUFFileError(f"{path}: tensor {name!r} is stored as {ggml_type.name}, expected a "
                            "floating-point or quantized weight type")
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    shape = [int(d) for d in dims]
    if shape and shape[0] % block:
        raise GGUFFileError(f"{path}: tensor {name!r} ({ggml_type.name}) has rows of {shape[0]} values, "
                            f"expected a multiple of the {block}-value quantization block")
    begin = data_start + int(offset[0])
    end = begin + math.prod(shape) // block * type_size
    if end > file_size:
        raise GGUFFileError(f"{path}: tensor {name!r} ({ggml_type.name}, shape {tuple(reversed(shape))}) "
                            f"ends at byte {end}, expected the file to hold it, found {file_size} bytes: "
                            "the file is truncated or damaged")


@lru_cache(maxsize=None)
def _checked_reader_class() -> type:
    from gguf import GGUFReader

    class CheckedReader(GGUFReader):
        """``GGUFReader`` that checks each tensor's entry before it maps the tensor's bytes."""

        def __init__(self, path: Path) -> None:
            self.checked_path = path
            super().__init__(str(path))

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            for field in fields:
                _check_field(self.checked_path, field, int(start_offs), len(self.data))
            super()._build_tensors(start_offs, fields)

    return CheckedReader


def read_checked(path: Path) -> Any:
    """A ``gguf.GGUFReader`` of ``path`` after each tensor's type, row length and extent are checked.

    Raises:
        GGUFFileError: for a damaged or truncated file (naming the tensor where one is at fault).

    Example:
        >>> import tempfile
        >>> bad = Path(tempfile.mkdtemp()) / "bad.gguf"
        >>> _ = bad.write_bytes(b"GGUF" + bytes(7))
        >>> read_checked(bad)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        captum_relp.embedded._gguf_checks.GGUFFileError: .../bad.gguf: not a readable GGUF file ...
    """
    try:
        return _checked_reader_class()(Path(path))
    except GGUFFileError:
        raise
    except Exception as error:  # the reader's own failures: IndexError, ValueError, struct errors ...
        raise GGUFFileError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error}); it is "
                            "truncated or damaged") from error


def metadata_summary(config: Any) -> str:
    """The hyperparameters that set the tensors' shapes, as the config read from the file has them.

    Example:
        >>> from transformers import LlamaConfig
        >>> metadata_summary(LlamaConfig(num_hidden_layers=2, hidden_size=8, intermediate_size=16,
        ...                              num_attention_heads=2, num_key_value_heads=1, vocab_size=10))
        'llama: num_hidden_layers 2, hidden_size 8, intermediate_size 16, num_attention_heads 2, num_key_value_heads 1, head_dim 4, vocab_size 10'
    """
    values = [f"{key} {getattr(config, key)}" for key in _SUMMARY_KEYS if getattr(config, key, None) is not None]
    return f"{config.model_type}: " + ", ".join(values)


def _skeleton(config: Any) -> Any:
    """The model ``config`` describes, on the meta device (names and shapes only, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _gguf_names(skeleton: Any, architecture: str, config: Any) -> Dict[str, str]:
    """``{gguf tensor name: model key}`` as transformers maps them when it loads the file."""
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map)

    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    return get_gguf_hf_weights_map(skeleton, processor)


def _derived(skeleton: Any) -> List[str]:
    """Keys transformers itself does not expect from a checkpoint (computed by the model)."""
    return [pattern for pattern in getattr(skeleton, "_keys_to_ignore_on_load_missing", None) or ()]


def _tied_groups(skeleton: Any) -> List[List[str]]:
    """Keys of parameters and buffers that are one tensor (tied weights), grouped."""
    groups: Dict[int, List[str]] = {}
    named = list(skeleton.named_parameters(remove_duplicate=False)) + \
        list(skeleton.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def _transposed(skeleton: Any) -> set:
    """Weights of ``Conv1D`` modules (GPT-2 style), stored transposed relative to the GGUF tensor."""
    from transformers.pytorch_utils import Conv1D

    return {f"{name}.weight" for name, module in skeleton.named_modules() if isinstance(module, Conv1D)}


def _same_shape(found: Tuple[int, ...], expected: Tuple[int, ...], transposed: bool) -> bool:
    """Equal, equal once transposed (``Conv1D``), or equal but for dimensions of size 1.

    Example:
        >>> _same_shape((4, 8), (8, 4), transposed=True), _same_shape((4, 8), (8, 4), transposed=False)
        (True, False)
        >>> _same_shape((16,), (1, 16), transposed=False)
        True
    """
    if found == expected or (transposed and found[::-1] == expected):
        return True
    return len(found) != len(expected) and [d for d in found if d != 1] == [d for d in expected if d != 1]


def _check_names(path: Path, found: Dict[str, Tuple[int, ...]], names: Dict[str, str], config: Any) -> None:
    """Every tensor of the file is one the model uses."""
    unused = [name for name in found if name not in names]
    if not unused:
        return
    layers = getattr(config, "num_hidden_layers", None)
    beyond = [n for n in unused if _BLOCK.match(n) and layers is not None and int(_BLOCK.match(n)[1]) >= layers]
    why = (f" (blocks at or beyond the metadata's block count {layers})" if beyond else "")
    raise GGUFFileError(f"{path}: {len(unused)} tensor(s) {_shown(unused)}{why} are not part of the model "
                        f"the file's metadata describes ({metadata_summary(config)}); expected only that "
                        "model's tensors, found more")


def _check_shapes(path: Path, found: Dict[str, Tuple[int, ...]], names: Dict[str, str],
                  expected: Dict[str, Tuple[int, ...]], transposed: set, config: Any) -> None:
    """Each tensor has the shape its model key expects (keys filled from several tensors are skipped)."""
    targets: Dict[str, int] = {}
    for name in found:
        targets[names[name]] = targets.get(names[name], 0) + 1
    for name, shape in found.items():
        key = names[name]
        if targets[key] > 1 or key not in expected:
            continue
        if not _same_shape(shape, expected[key], key in transposed):
            raise GGUFFileError(f"{path}: tensor {name!r} for {key} has shape {shape}, expected "
                                f"{expected[key]} from the file's metadata ({metadata_summary(config)})")


def _check_complete(path: Path, found: Dict[str, Tuple[int, ...]], names: Dict[str, str],
                    expected: Dict[str, Tuple[int, ...]], skeleton: Any, config: Any) -> None:
    """Every parameter and persistent buffer (``expected``) is filled from the file, directly or
    through one tied to it."""
    filled = {names[name] for name in found}
    derived = _derived(skeleton)
    gguf_name = {key: name for name, key in names.items()}
    missing = []
    for group in _tied_groups(skeleton):
        keys = [k for k in group if k in expected]
        if keys and not filled.intersection(group) and not any(re.search(p, k) for p in derived for k in keys):
            missing.append(keys[0])
    if missing:
        wanted = [f"{gguf_name[key]!r} (for {key})" if key in gguf_name else f"for {key}" for key in missing]
        raise GGUFFileError(f"{path}: the file has no tensor {_shown(wanted, quote=False)}; expected every "
                            f"weight of the model its metadata describes ({metadata_summary(config)}), found "
                            f"{len(found)} tensors; loading it would leave these weights random")


def check_against_config(path: Path, reader: Any, config: Any, architecture: str) -> None:
    """The file's tensors against the model its metadata describes, before that model is built.

    Args:
        path: the file (for the messages).
        reader: its :func:`read_checked` reader.
        config: the config transformers reads from the file (``AutoConfig.from_pretrained(...,
            gguf_file=...)``).
        architecture: the file's ``general.architecture``.

    Raises:
        GGUFFileError: for a tensor the model does not use, one of the wrong shape, or a weight
            no tensor fills (naming both names and both shapes where there are two).
    """
    skeleton = _skeleton(config)
    names = _gguf_names(skeleton, architecture, config)
    found = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    expected = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    _check_names(path, found, names, config)
    _check_shapes(path, found, names, expected, _transposed(skeleton), config)
    _check_complete(path, found, names, expected, skeleton, config)


def check_loading_info(path: Path, info: Dict[str, Any]) -> None:
    """What transformers reports after loading: no weight left missing or loaded with another shape.

    Example:
        >>> check_loading_info(Path("m.gguf"), {"missing_keys": set(), "mismatched_keys": set()})
        >>> check_loading_info(Path("m.gguf"), {"missing_keys": {"lm_head.weight"}})
        Traceback (most recent call last):
        ...
        captum_relp.embedded._gguf_checks.GGUFFileError: m.gguf: transformers left 'lm_head.weight' at random initialisation; expected every weight from the file, found no tensor for it
    """
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise GGUFFileError(f"{path}: transformers left {_shown(missing)} at random initialisation; expected "
                            "every weight from the file, found no tensor for it")
    mismatched = sorted(str(m) for m in info.get("mismatched_keys") or ())
    if mismatched:
        raise GGUFFileError(f"{path}: transformers found {_shown(mismatched)} with another shape than the "
                            "model its metadata describes")


__all__ = ["GGUFFileError", "check_against_config", "check_loading_info", "metadata_summary", "read_checked"]
