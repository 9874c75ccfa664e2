"""Attachment validation: sniffed by content, size-limited, decoded, stored by hash."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from engine.errors import InputError
from engine.media import ingest, sniff


def test_sound_files_are_stored_by_content_hash(tmp_path, png, wav, mp4):
    for src, kind in ((png, "image"), (wav, "audio"), (mp4, "video")):
        rec = ingest(src, tmp_path / "media", 10**7)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        assert rec.kind == kind and rec.sha256 == digest and rec.name == src.name
        assert Path(rec.path).read_bytes() == src.read_bytes() and digest[:2] in rec.path
    assert ingest(wav, tmp_path / "media", 10**7).meta["duration_s"] == 1.0
    assert ingest(mp4, tmp_path / "media", 10**7).meta["duration_s"] == pytest.approx(2.0, abs=0.2)


def test_type_comes_from_content_not_the_name(tmp_path, png):
    disguised = tmp_path / "notes.txt"
    disguised.write_bytes(png.read_bytes())
    assert ingest(disguised, tmp_path / "m", 10**6).mime == "image/png"
    fake = tmp_path / "photo.png"
    fake.write_text("just some text, not an image")
    with pytest.raises(InputError, match=r"photo.png is not a valid PNG image \(damaged or mislabelled\)"):
        ingest(fake, tmp_path / "m", 10**6)
    text = tmp_path / "notes.txt"
    text.write_text("just some text")
    with pytest.raises(InputError, match="unsupported file type; attach images"):
        ingest(text, tmp_path / "m", 10**6)


@pytest.mark.parametrize("name, data, needle", [
    ("trunc.png", None, "the PNG image is damaged or truncated"),
    ("bad.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 64, "the JPEG image is damaged or truncated"),
    ("bad.wav", b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 40, "the WAV audio file is damaged or truncated"),
    ("bad.mp4", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200, "the MP4 video is damaged or truncated"),
    ("empty.png", b"", "empty"),
])
def test_corrupt_files_get_a_clear_error(tmp_path, png, name, data, needle):
    path = tmp_path / name
    path.write_bytes(png.read_bytes()[:60] if data is None else data)
    with pytest.raises(InputError, match=needle) as err:
        ingest(path, tmp_path / "m", 10**6)
    assert name in str(err.value)
    assert not list((tmp_path / "m").rglob("*.*"))  # nothing stored


def test_size_limit(tmp_path, wav):
    with pytest.raises(InputError, match="the limit is 0 MB .*--max-upload-mb"):
        ingest(wav, tmp_path / "m", 1000)


def test_decompression_bomb_is_refused(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # tiny file, 144 megapixels
    assert bomb.stat().st_size < 100_000
    with pytest.raises(InputError, match="megapixels|decompression bomb"):
        ingest(bomb, tmp_path / "m", 10**7)


def test_sniff_table():
    assert sniff(b"GIF89a....")[0] == "image"
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ")[1] == "image/webp"
    assert sniff(b"fLaC\x00")[1] == "audio/flac"
    assert sniff(b"OggS\x00")[1] == "audio/ogg"
    assert sniff(b"ID3\x04")[1] == "audio/mpeg"
    assert sniff(b"\x1aE\xdf\xa3\x00webm")[1] == "video/webm"
    assert sniff(b"\x00\x00\x00\x14ftypqt  ")[1] == "video/quicktime"
    assert sniff(b"%PDF-1.7") is None
