"""Attachments: type sniffed from content, size-limited, decoded once to prove
they are sound, stored by content hash. Every rejection is an InputError
whose message names the file (the user's name, never a server path), what was
wrong, and what is accepted. Hostile files are the normal case: every header
field that sizes an allocation (pixels, video frame size, channels, sample
rate, duration, a GLB's JSON length and nesting) is checked before decoding.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from engine.perception.base import printable, public_message, release_memory
from engine import memory_budget
from engine.memory_budget import MAX_PIXELS
from engine.errors import InputError

ACCEPTED = "images (PNG, JPEG, GIF, WebP, BMP), audio (WAV, FLAC, OGG/Opus, MP3, M4A/AAC, WebM/Opus) or video (MP4, MOV, WebM, MKV, AVI) or 3D models (GLB)"
MAX_VIDEO_SECONDS = 3 * 60 * 60
MAX_AUDIO_SECONDS = 4 * 60 * 60  # what the audio adapter reads (AudioPerception.max_seconds)
MAX_GLB_JSON = 8_000_000  # a glTF JSON chunk of 8 MB is already a very large scene

# what each sniffed type is called in messages; and the types file name extensions claim
LABELS = {"image/png": "PNG image", "image/jpeg": "JPEG image", "image/gif": "GIF image", "image/webp": "WebP image",
          "image/bmp": "BMP image", "audio/wav": "WAV audio file", "audio/flac": "FLAC audio file",
          "audio/ogg": "OGG audio file", "audio/mpeg": "MP3 audio file", "audio/mp4": "M4A audio file",
          "audio/aac": "AAC audio file", "audio/webm": "WebM audio file", "audio/x-matroska": "MKA audio file",
          "video/mp4": "MP4 video", "video/quicktime": "MOV video", "video/webm": "WebM video",
          "video/x-matroska": "MKV video", "video/x-msvideo": "AVI video", "model/gltf-binary": "GLB 3D model"}
EXTENSIONS = {".png": "image/png", ".apng": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
              ".jpe": "image/jpeg", ".jfif": "image/jpeg", ".gif": "image/gif", ".webp": "image/webp",
              ".bmp": "image/bmp", ".dib": "image/bmp", ".wav": "audio/wav", ".wave": "audio/wav",
              ".flac": "audio/flac", ".ogg": "audio/ogg", ".oga": "audio/ogg", ".opus": "audio/ogg",
              ".mp3": "audio/mpeg", ".m4a": "audio/mp4", ".aac": "audio/aac",
              ".weba": "audio/webm", ".mka": "audio/x-matroska", ".mp4": "video/mp4", ".m4v": "video/mp4",
              ".mov": "video/quicktime", ".qt": "video/quicktime", ".webm": "video/webm", ".mkv": "video/x-matroska",
              ".avi": "video/x-msvideo", ".glb": "model/gltf-binary"}
# containers that hold either video or only sound: (mime, extension) when there is only sound
SOUND_ONLY = {"video/webm": ("audio/webm", ".webm"), "video/x-matroska": ("audio/x-matroska", ".mka"),
              "video/mp4": ("audio/mp4", ".m4a"), "video/quicktime": ("audio/mp4", ".m4a")}
# magic numbers long enough that a file cut inside them is recognisably that type
MAGICS = {b"\x89PNG\r\n\x1a\n": "image/png", b"GIF89a": "image/gif", b"GIF87a": "image/gif",
          b"\xff\xd8\xff": "image/jpeg", b"fLaC": "audio/flac", b"OggS": "audio/ogg", b"glTF": "model/gltf-binary",
          b"\x1aE\xdf\xa3": "video/x-matroska"}


@dataclass(frozen=True)
class MediaRecord:
    sha256: str
    kind: str  # image | audio | video
    mime: str
    path: str  # absolute path of the stored copy
    size: int
    name: str  # the user's file name
    meta: dict = field(default_factory=dict)  # width/height, duration, ...
    spoken: bool = False  # the conversation's own speech (a voice message, a spoken answer): not a file to refer to


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
    if len(head) > 1 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:  # ADTS: MPEG sync with layer 0 (raw AAC)
        return "audio", "audio/aac", ".aac"
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
    """Validate `src` and store a copy under media_dir/<sha[:2]>/<sha><ext>. Whatever a decoder
    says goes out with `src`'s path replaced by the user's `name`."""
    path = Path(src)
    name = name or path.name
    try:
        return _ingest(path, media_dir, max_bytes, name, printable(name))
    except InputError as exc:
        error = InputError(public_message(str(exc), path, name))  # raised below, without the decoder's traceback
    finally:  # runs after the except clause, when a refusal's frames (and the pixels in them) are gone
        release_memory()  # a 64 MP image or a video frame was just decoded in full to prove it sound
    raise error


def _ingest(path: Path, media_dir: Path, max_bytes: int, name: str, shown: str) -> MediaRecord:
    if not path.is_file():
        raise InputError(f"{shown}: file not found")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{shown}: the file is empty")
    if size > max_bytes:
        raise InputError(f"{shown} is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB "
                         "(raise it with --max-upload-mb)")
    with open(path, "rb") as f:
        head = f.read(64)
    sniffed = sniff(head)
    if sniffed is None:
        raise InputError(_unrecognised(shown, head))
    kind, mime, ext = sniffed
    if mime in SOUND_ONLY:  # decided by the tracks inside, not the first bytes
        kind, mime, ext = _sound_only(path, mime) or sniffed
    try:
        meta = _VALIDATORS[kind](path, shown, mime)
    except InputError:
        if _weak(head, mime) and EXTENSIONS.get(os.path.splitext(shown)[1].lower(), mime) != mime:
            raise InputError(_unrecognised(shown, b"")) from None  # random bytes, named as what they are not
        raise
    digest = _sha256(path)
    dest = media_dir / digest[:2] / f"{digest}{ext}"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".tmp")
        os.close(fd)
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
    return MediaRecord(digest, kind, mime, str(dest), size, name, meta)


def _unrecognised(shown: str, head: bytes) -> str:
    """Why content that matches no format is refused: cut inside a known magic number
    (damaged), claimed by its extension (damaged or mislabelled), or simply not media."""
    for magic, mime in MAGICS.items():
        if 2 <= len(head) < len(magic) and magic.startswith(head):
            return damaged(shown, mime)
    claimed = EXTENSIONS.get(os.path.splitext(shown)[1].lower())
    if head[:4] == b"RIFF" and len(head) < 12:  # cut before it says WAVE, AVI or WEBP
        return damaged(shown, claimed if claimed in ("audio/wav", "video/x-msvideo", "image/webp") else "")
    if claimed:
        return f"{shown} is not a valid {LABELS[claimed]} (damaged or mislabelled): its content matches no format read here"
    return f"{shown}: unsupported file type; attach {ACCEPTED}"


def _weak(head: bytes, mime: str) -> bool:
    """An MP3 frame sync is 11 bits (ADTS's 12 and a layer of 0): one file of random bytes in ~2000 starts with one."""
    return mime == "audio/aac" or (mime == "audio/mpeg" and not head.startswith(b"ID3"))


def damaged(shown: str, mime: str) -> str:
    return f"{shown}: the {LABELS.get(mime, 'file')} is damaged or truncated and cannot be read"


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
                memory_budget.check_image(name, width, height, im.mode, im.format or "")  # before a pixel is decoded
                im.verify()
            with Image.open(path) as im:
                im.draft(None, (memory_budget.WORK_SIDE,) * 2)  # a JPEG's whole stream, decoded at 1/2..1/8 scale
                im.load()  # verify() misses truncated pixel data; a decode does not
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        raise InputError(f"{name}: image too large to decode safely (decompression bomb)") from None
    except Exception:  # noqa: BLE001 - PIL raises many types for bad data (and quotes the path)
        raise InputError(damaged(name, mime)) from None
    if width < 1 or height < 1:
        raise InputError(damaged(name, mime))
    return {"width": width, "height": height}


def _audio(path: Path, name: str, mime: str) -> dict:
    """The container's sample rate, channels and length are checked before a sample is read
    (engine.speech.decode.probe: the analysis resamples to 16 kHz mono, so each of them
    multiplies the work), then its first second is decoded, through the same decoder the
    API, the transcription and the audio adapter use."""
    from engine.speech import decode

    try:
        info = decode.probe(path, name)
        if info.duration_s is not None and info.duration_s > MAX_AUDIO_SECONDS:
            raise InputError(f"{name} is {info.duration_s / 3600:.1f} hours long; the limit is "
                             f"{MAX_AUDIO_SECONDS // 3600} hours")
        if info.duration_s == 0:
            raise InputError(f"{name}: the audio holds no samples")
        first = decode.decode(path, None, name=name, duration=1.0, info=info)
    except decode.Undecodable as exc:
        raise InputError(damaged(name, mime) + (f" ({exc.detail})" if exc.detail else "")) from None
    if not first.size:
        raise InputError(f"{name}: the audio holds no samples")
    meta = {"sample_rate": info.sample_rate, "channels": info.channels, "codec": info.codec}
    return meta if info.duration_s is None else {"duration_s": round(info.duration_s, 3), **meta}


def _sound_only(path: Path, mime: str) -> tuple[str, str, str] | None:
    """A WebM, MKV, MP4 or MOV that holds sound and no pictures (a browser's MediaRecorder
    clip, a phone's voice memo): ("audio", mime, extension); None when it has a picture track
    or FFmpeg cannot read it (then it is judged as the video it claims to be)."""
    from engine.speech import decode

    try:
        info = decode.probe(path)
    except InputError:
        return None
    if info.has_video:
        return None
    return ("audio", *SOUND_ONLY[mime])


def _video(path: Path, name: str, mime: str) -> dict:
    """The frame size comes from the container and codec headers and is held to the image pixel
    budget and the request's memory budget before the first frame is decoded; the decoded frame
    is checked again (a header may lie). Decoded as perception reads it: one frame at a time,
    scaled down as it is converted (engine/perception/video_frames.py)."""
    from engine.perception.video_frames import VideoFrames

    try:
        with VideoFrames(path, name) as video:
            video.first(side=64)
            fps, frames, duration = video.fps, video.frame_count, video.duration_s
            width, height = video.size
    except InputError as exc:
        if "could not read the video" not in str(exc):
            raise
        raise InputError(f"{damaged(name, mime)} (no frame could be decoded)"
                         if "no frame" in str(exc) else damaged(name, mime)) from None
    if frames > 0 and fps > 0:
        duration = frames / fps
    if duration > MAX_VIDEO_SECONDS:
        raise InputError(f"{name} is {duration / 3600:.1f} hours long; the limit is {MAX_VIDEO_SECONDS // 3600} hours")
    return {"width": int(width), "height": int(height), "fps": round(fps, 3), "duration_s": round(duration, 3)}


def _model3d(path: Path, name: str, mime: str) -> dict:
    """A binary glTF 2.0 (.glb): header, declared lengths, and a JSON chunk that parses to an
    object. The JSON is capped in size (json.loads of 8 MB of `[]` is ~150 MB of lists) and
    its nesting by the parser's recursion limit."""
    import json
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(20)
        if len(head) < 20:
            raise InputError(f"{damaged(name, mime)} (the header is cut short)")
        _, version, length = struct.unpack("<4sII", head[:12])
        chunk_len, chunk_type = struct.unpack("<II", head[12:20])
        what = f"{name}: the GLB 3D model"
        if version != 2:
            raise InputError(f"{what} is glTF version {version}; only glTF 2.0 binaries are read")
        if length != size:
            raise InputError(f"{what}'s header says {length:,} bytes but the file has {size:,} (damaged or truncated)")
        if chunk_type != 0x4E4F534A:
            raise InputError(f"{what} does not start with its JSON chunk (damaged)")
        if chunk_len > size - 20:
            raise InputError(f"{what}'s JSON chunk length ({chunk_len:,} bytes) is larger than the file")
        if chunk_len > MAX_GLB_JSON:
            raise InputError(f"{what}'s JSON chunk is {chunk_len / 1e6:.1f} MB; the limit is {MAX_GLB_JSON // 1_000_000} MB")
        try:
            doc = json.loads(f.read(chunk_len))
        except RecursionError:
            raise InputError(f"{what}'s JSON chunk is nested too deeply") from None
        except ValueError:
            raise InputError(f"{what}'s JSON chunk is corrupt") from None
    if not isinstance(doc, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(doc), "a number")
        raise InputError(f"{what}'s JSON chunk is {kind}, not an object")
    for key in ("meshes", "nodes"):
        if not isinstance(doc.get(key, []), list):
            raise InputError(f"{what}'s JSON chunk is not valid glTF: '{key}' is not a list")
    return {"meshes": len(doc.get("meshes", [])), "nodes": len(doc.get("nodes", []))}


_VALIDATORS = {"image": _image, "audio": _audio, "video": _video, "model3d": _model3d}
