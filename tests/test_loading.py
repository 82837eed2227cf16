"""Model folder fingerprints: what result caches use to tell a retrained model from the old one."""

import os

from imptome import loading


def _folder(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "weights.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "model_index.json").write_text("{}")
    return tmp_path


def test_fingerprint_follows_file_contents(tmp_path):
    folder = _folder(tmp_path)
    before = loading.model_fingerprint(str(folder))
    assert before.startswith("sha256:") and loading.model_fingerprint(str(folder)) == before
    (folder / "unet" / "weights.safetensors").write_bytes(b"\x01" + b"\x00" * 63)
    assert loading.model_fingerprint(str(folder)) != before


def test_large_files_are_identified_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "_HASHED_BYTES", 16)  # every weight file counts as large here
    folder = _folder(tmp_path)
    weights = folder / "unet" / "weights.safetensors"
    os.utime(weights, ns=(1, 1))
    before = loading.model_fingerprint(str(folder))
    weights.write_bytes(b"\x01" + b"\x00" * 63)  # same size: only the modification time tells
    os.utime(weights, ns=(1, 1))
    assert loading.model_fingerprint(str(folder)) == before
    os.utime(weights, ns=(2, 2))
    assert loading.model_fingerprint(str(folder)) != before


def test_hub_ids_are_their_own_fingerprint():
    assert loading.model_fingerprint("some-org/some-model") == "some-org/some-model"
