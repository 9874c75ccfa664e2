"""Attachments: type sniffed from content, size-limited, decoded once to prove
they are sound, stored by content hash. Every rejection is an InputError
whose message names the file, what was wrong, and what is accepted.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import InputError

ACCEPTED = "images (PNG, JPEG, GIF, WebP, BMP), audio (WAV, FLAC, OGG, MP3) or video (MP4, MOV, WebM, MKV, AVI) or 3D models (GLB)"
MAX_PIXELS = 64_000_000  # larger images are refused as decompression bombs
MAX_VIDEO_SECONDS = 3 * 60 * 60


@dataclass(frozen=True)
class MediaRecord:
    sha256: str
    kind: str  # image | audio | video
    mime: str
    path: str  # absolute path of the stored copy
    size: int
    name: str  # the user's file name
    meta: dict = field(default_factory=dict)  # width/height, duration, ...


def sniff(head: bytes) -> tuple[str, str, str] | None:
    """(kind, mime, extension) from a file's first bytes, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "image/png", ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image", "image/jpeg", ".jpg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image", "image/gif", ".gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image", "image/webp", ".webp"
    if head.startswith(b"BM"):
        return "image", "image/bmp", ".bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio", "audio/wav", ".wav"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video", "video/x-msvideo", ".avi"
    if head.startswith(b"fLaC"):
        return "audio", "audio/flac", ".flac"
    if head.startswith(b"OggS"):
        return "audio", "audio/ogg", ".ogg"
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "audio", "audio/mpeg", ".mp3"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"M4A ", b"M4B "):
            return "audio", "audio/mp4", ".m4a"
        if brand == b"qt  ":
            return "video", "video/quicktime", ".mov"
        return "video", "video/mp4", ".mp4"
    if head[:4] == b"glTF":
        return "model3d", "model/gltf-binary", ".glb"
    if head.startswith(b"\x1aE\xdf\xa3"):
        return ("video", "video/webm", ".webm") if b"webm" in head[:64] else ("video", "video/x-matroska", ".mkv")
    return None


def ingest(src: str | os.PathLike, media_dir: Path, max_bytes: int, name: str | None = None) -> MediaRecord:
    """Validate `src` and store a copy under media_dir/<sha[:2]>/<sha><ext>."""
    path = Path(src)
    name = name or path.name
    if not path.is_file():
        raise InputError(f"{name}: file not found")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{name}: the file is empty")
    if size > max_bytes:
        raise InputError(f"{name} is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB "
                         "(raise it with --max-upload-mb)")
    with open(path, "rb") as f:
        head = f.read(64)
    sniffed = sniff(head)
    if sniffed is None:
        raise InputError(f"{name}: unsupported file type; attach {ACCEPTED}")
    kind, mime, ext = sniffed
    meta = _VALIDATORS[kind](path, name, mime)
    digest = _sha256(path)
    dest = media_dir / digest[:2] / f"{digest}{ext}"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".tmp")
        os.close(fd)
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
    return MediaRecord(digest, kind, mime, str(dest), size, name, meta)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _image(path: Path, name: str, mime: str) -> dict:
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
                if width * height > MAX_PIXELS:
                    raise InputError(f"{name} is {width}x{height} pixels; the limit is "
                                     f"{MAX_PIXELS // 1_000_000} megapixels")
                im.verify()
            with Image.open(path) as im:
                im.load()  # verify() misses truncated pixel data; a full decode does not
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{name}: image too large to decode safely (decompression bomb)") from None
    except Exception as exc:
        raise InputError(f"{name}: not a valid {mime.split('/')[1].upper()} image ({_short(exc)})") from None
    return {"width": width, "height": height}


def _audio(path: Path, name: str, mime: str) -> dict:
    import soundfile as sf

    try:
        info = sf.info(str(path))
        with sf.SoundFile(str(path)) as f:
            f.read(frames=min(f.frames, 4096) or 1)
    except Exception as exc:
        raise InputError(f"{name}: not a readable {mime.split('/')[1].upper()} audio file ({_short(exc)})") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise InputError(f"{name}: the audio holds no samples")
    return {"duration_s": round(info.frames / info.samplerate, 3), "sample_rate": info.samplerate,
            "channels": info.channels}


def _video(path: Path, name: str, mime: str) -> dict:
    import cv2

    cap = cv2.VideoCapture(str(path))
    try:
        ok, frame = cap.read() if cap.isOpened() else (False, None)
        if not ok or frame is None:
            raise InputError(f"{name}: not a readable video (no frame could be decoded)")
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        frames = cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0
    finally:
        cap.release()
    duration = frames / fps if fps > 0 else 0.0
    if duration > MAX_VIDEO_SECONDS:
        raise InputError(f"{name} is {duration / 3600:.1f} hours long; the limit is {MAX_VIDEO_SECONDS // 3600} hours")
    return {"width": int(frame.shape[1]), "height": int(frame.shape[0]), "fps": round(fps, 3),
            "duration_s": round(duration, 3)}


def _model3d(path: Path, name: str, mime: str) -> dict:
    """A binary glTF 2.0 (.glb): header, declared length, and a JSON chunk that parses."""
    import json
    import struct

    with open(path, "rb") as f:
        head = f.read(20)
        if len(head) < 20:
            raise InputError(f"{name}: not a valid .glb model (truncated header)")
        _, version, length = struct.unpack("<4sII", head[:12])
        chunk_len, chunk_type = struct.unpack("<II", head[12:20])
        if version != 2 or length != path.stat().st_size or chunk_type != 0x4E4F534A:
            raise InputError(f"{name}: not a valid glTF 2.0 binary (.glb)")
        try:
            doc = json.loads(f.read(chunk_len))
        except ValueError:
            raise InputError(f"{name}: the .glb's JSON chunk is corrupt") from None
    return {"meshes": len(doc.get("meshes", [])), "nodes": len(doc.get("nodes", []))}


def _short(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:160]


_VALIDATORS = {"image": _image, "audio": _audio, "video": _video, "model3d": _model3d}
