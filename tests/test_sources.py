"""Model sources: packaged files, split packages joined with a hash check, local paths."""
from __future__ import annotations

import hashlib

import pytest

from engine.errors import Unavailable
from engine.llm.sources import join_parts, resolve
from engine.packaged import package_file


def test_joined_parts_are_hash_checked_and_cached(tmp_path):
    parts = []
    for i in range(3):
        p = tmp_path / f"part{i}.bin"
        p.write_bytes(bytes([i]) * 1000)
        parts.append(p)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    dest = join_parts(parts, tmp_path / "cache" / "model.gguf", digest)
    assert dest.read_bytes() == b"".join(p.read_bytes() for p in parts)
    parts[0].write_bytes(b"tampered")  # the verified join is reused, not redone
    assert join_parts(parts, dest, digest) == dest
    with pytest.raises(Unavailable, match="expected"):
        join_parts(parts, tmp_path / "cache" / "other.gguf", digest)
    assert not (tmp_path / "cache" / "other.gguf").exists()


def test_missing_package_says_how_to_install():
    with pytest.raises(Unavailable, match="not installed.*pip install"):
        package_file("no-such-package-xyz", "x.gguf", "pip install no-such-package-xyz")


def test_packaged_default_model_is_found():
    src = resolve("smollm2-135m", cache_dir=None)
    assert src.is_gguf and src.path.exists() and len(src.cache_key) > 20


def test_local_gguf_hash_check(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(Unavailable, match="expected"):
        resolve(str(f), tmp_path, sha256="0" * 64)
    good = hashlib.sha256(f.read_bytes()).hexdigest()
    assert resolve(str(f), tmp_path, sha256=good).cache_key == good


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(Unavailable, match="not a model directory"):
        resolve(str(tmp_path), tmp_path)
    assert resolve("org/model-name", tmp_path).hub


def test_packaged_file_is_checked_against_the_manifest_hash(tmp_path):
    """A single-package model's sha256 is compared with pip's RECORD hash (no read of the weights)."""
    import base64

    from engine.llm.sources import _from_manifest, record_sha256
    from engine.packaged import manifest

    digest = hashlib.sha256(b"x").digest()
    assert record_sha256(base64.urlsafe_b64encode(digest).decode().rstrip("=")) == digest.hex()
    assert record_sha256("not-a-record-hash") == ""
    entry = manifest()["llm"]["smollm2-135m"]
    assert _from_manifest("smollm2-135m", entry, tmp_path).is_gguf
    wrong = {**entry, "source": {**entry["source"], "sha256": "0" * 64}}
    with pytest.raises(Unavailable, match="expected 000000000000"):
        _from_manifest("smollm2-135m", wrong, tmp_path)
