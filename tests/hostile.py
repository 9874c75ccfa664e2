"""Hostile attachments built in code (seeded): what a fuzzer or an attacker sends.

    cases = build(seed=0)        # [Case(name, data, family)], a few hundred, ~2 MB in all

Families: the valid originals of every accepted format, each truncated at several
points, zero-byte files, random bytes and magic-then-garbage under every extension,
valid files under the wrong extension, extreme dimensions (1 px thick, 60000 px long),
decompression and header bombs (a PNG/GIF/BMP/JPEG claiming huge sizes, a real 8000x8000
zero PNG of ~200 kB, WAV headers claiming 4 GB of data, a 1e9 s duration, 65535
channels, absurd sample rates, MP4/AVI headers claiming absurd sizes and frame counts,
MJPEG frames claiming 16000x16000), malformed GLB JSON (list, null, 100k deep, huge
declared chunk lengths) and odd names (unicode, control characters, 300 characters).
Nothing here decides what the answer should be: the tests only demand a clean result
or a clear InputError, never a crash, a server path in a message or unbounded memory.
"""
from __future__ import annotations

import io
import json
import os
import struct
import tempfile
import wave
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EXTS = (".png", ".jpg", ".gif", ".webp", ".bmp", ".wav", ".flac", ".ogg", ".mp3", ".mp4", ".avi", ".glb")


@dataclass(frozen=True)
class Case:
    name: str  # the user's file name (may be unicode, hold control characters, be 300 long)
    data: bytes
    family: str


# ---- valid originals -----------------------------------------------------------------------
def picture(w: int = 48, h: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (200, 30, 30)
    img[h // 2:, w // 2:] = rng.integers(0, 255, (h - h // 2, w - w // 2, 3), np.uint8)
    return img


def pil_bytes(arr: np.ndarray, fmt: str, **kw) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(arr).save(out, fmt, **kw)
    return out.getvalue()


def png(w: int, h: int) -> bytes:
    return pil_bytes(np.full((h, w, 3), 90, np.uint8), "PNG")


def sound(fmt: str, seconds: float = 0.5, rate: int = 16000) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    out = io.BytesIO()
    sf.write(out, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format=fmt)
    return out.getvalue()


def video(fourcc: str, ext: str, w: int = 32, h: int = 24, frames: int = 6) -> bytes:
    import cv2

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"v{ext}")
        out = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), 5, (w, h))
        for i in range(frames):  # one scene: each keyframe costs an OCR run in the perceiver
            out.write(np.full((h, w, 3), 60 + i, np.uint8))
        out.release()
        return Path(path).read_bytes()


def glb(doc: bytes, total: int | None = None, chunk_len: int | None = None, chunk_type: int = 0x4E4F534A) -> bytes:
    """A binary glTF: 12-byte header, one JSON chunk (padded to 4 bytes); lengths may lie."""
    body = doc + b" " * (-len(doc) % 4)
    n = 12 + 8 + len(body)
    return struct.pack("<4sII", b"glTF", 2, n if total is None else total) \
        + struct.pack("<II", len(body) if chunk_len is None else chunk_len, chunk_type) + body


GLB_DOC = json.dumps({"asset": {"version": "2.0"}, "scenes": [{"nodes": [0]}], "nodes": [{"name": "n"}]}).encode()


def originals() -> dict[str, bytes]:
    img = picture()
    return {".png": pil_bytes(img, "PNG"), ".jpg": pil_bytes(img, "JPEG", quality=80),
            ".gif": pil_bytes(img, "GIF"), ".webp": pil_bytes(img, "WEBP"), ".bmp": pil_bytes(img, "BMP"),
            ".wav": sound("WAV"), ".flac": sound("FLAC"), ".ogg": sound("OGG"), ".mp3": sound("MP3"),
            ".mp4": video("mp4v", ".mp4"), ".avi": video("MJPG", ".avi"), ".glb": glb(GLB_DOC)}


# ---- header bombs --------------------------------------------------------------------------
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_claiming(w: int, h: int, idat: bytes | None = None) -> bytes:
    """A PNG whose IHDR claims w x h RGB; the pixel data is a few bytes (or `idat`)."""
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) \
        + _chunk(b"IDAT", idat if idat is not None else zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def png_zero_bomb(side: int = 8000) -> bytes:
    """A real, valid side x side grey PNG of all zeros: ~1000:1 deflate, compressed row by row."""
    z, row, parts = zlib.compressobj(9), b"\0" * (1 + side), []
    for _ in range(side):
        parts.append(z.compress(row))
    parts.append(z.flush())
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)) \
        + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def gif_screen(w: int, h: int) -> bytes:
    """A GIF whose logical screen is w x h, holding one 1x1 image."""
    return b"GIF89a" + struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff" \
        + b",\0\0\0\0\x01\0\x01\0\0" + b"\x02\x02\x44\x01\0" + b";"


def bmp_claiming(w: int, h: int) -> bytes:
    return b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 16,
                                                                          2835, 2835, 0, 0) + b"\0" * 16


def jpeg_claiming(jpg: bytes, w: int, h: int) -> bytes:
    i = jpg.index(b"\xff\xc0")
    return jpg[:i + 5] + struct.pack(">HH", h, w) + jpg[i + 9:]


def wav_header(rate: int = 16000, channels: int = 1, bits: int = 16, data_size: int | None = None,
               payload: bytes = b"\0" * 3200, tag: int = 1) -> bytes:
    size = len(payload) if data_size is None else data_size
    block = max(1, channels * bits // 8)
    fmt = struct.pack("<HHIIHH", tag, channels, rate & 0xFFFFFFFF, (rate * block) & 0xFFFFFFFF, block & 0xFFFF, bits)
    return b"RIFF" + struct.pack("<I", min(0xFFFFFFFF, 36 + size)) + b"WAVEfmt " + struct.pack("<I", 16) + fmt \
        + b"data" + struct.pack("<I", min(0xFFFFFFFF, size)) + payload


def avi_claiming(avi: bytes, w: int, h: int, frames: int | None = None, sof: tuple | None = None) -> bytes:
    """An MJPEG AVI whose headers (avih, strh, strf) claim w x h and `frames`; with `sof` the
    JPEG frames themselves claim that (w, h) too."""
    b = bytearray(avi)
    i = b.index(b"avih") + 8
    if frames is not None:
        struct.pack_into("<I", b, i + 16, frames)
    struct.pack_into("<II", b, i + 32, w, h)
    j = b.index(b"strf") + 8
    struct.pack_into("<ii", b, j + 4, w, h)
    if sof is not None:
        k = 0
        while (k := b.find(b"\xff\xc0", k)) >= 0:
            struct.pack_into(">HH", b, k + 5, sof[1], sof[0])
            k += 2
    return bytes(b)


def mp4_claiming(mp4: bytes, w: int, h: int, duration: int | None = None) -> bytes:
    """An mp4v MP4 whose tkhd and sample entry claim w x h (and mvhd a duration in its time scale)."""
    b = bytearray(mp4)
    t = b.index(b"tkhd") + 4
    struct.pack_into(">II", b, t + (88 if b[t] == 1 else 76), w << 16, h << 16)
    s = b.index(b"mp4v") + 4
    struct.pack_into(">HH", b, s + 24, w & 0xFFFF, h & 0xFFFF)
    if duration is not None:
        m = b.index(b"mvhd") + 4
        if b[m] == 0:
            struct.pack_into(">I", b, m + 16, duration & 0xFFFFFFFF)
    return bytes(b)


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def bombs(orig: dict[str, bytes]) -> list[Case]:
    jpg, avi, mp4 = orig[".jpg"], orig[".avi"], orig[".mp4"]
    cases = [("png-100000x100000.png", png_claiming(100_000, 100_000)), ("png-8000x7999-noidat.png", png_claiming(8000, 7999)),
             ("png-0x0.png", png_claiming(0, 0)), ("png-zero-8000.png", png_zero_bomb()),
             ("gif-screen-65535.gif", gif_screen(65535, 65535)), ("gif-screen-1200.gif", gif_screen(1200, 1200)),
             ("gif-screen-0.gif", gif_screen(0, 0)), ("bmp-30000.bmp", bmp_claiming(30000, 30000)),
             ("bmp-negative.bmp", bmp_claiming(-5, -2_000_000)), ("jpeg-65500.jpg", jpeg_claiming(jpg, 65500, 65500)),
             ("jpeg-1600x1200.jpg", jpeg_claiming(jpg, 1600, 1200)), ("jpeg-1x60000.jpg", jpeg_claiming(jpg, 1, 60000)),
             ("wav-4gb-data.wav", wav_header(data_size=0xFFFFFFF0)),
             ("wav-1e9s.wav", wav_header(rate=1, bits=16, data_size=2_000_000_000)),
             ("wav-rate-0.wav", wav_header(rate=0)), ("wav-rate-1.wav", wav_header(rate=1)),
             ("wav-rate-4e9.wav", wav_header(rate=4_000_000_000)), ("wav-65535ch.wav", wav_header(channels=65535, payload=b"\0" * 262140)),
             ("wav-0ch.wav", wav_header(channels=0)), ("wav-0bits.wav", wav_header(bits=0)),
             ("wav-float-nan.wav", wav_header(bits=32, tag=3, payload=np.full(800, np.nan, "<f4").tobytes())),
             ("avi-16000.avi", avi_claiming(avi, 16000, 16000, sof=(16000, 16000))),
             ("avi-head-16000.avi", avi_claiming(avi, 16000, 16000)),
             ("avi-1x60000.avi", avi_claiming(avi, 1, 60000, sof=(1, 60000))),
             ("avi-frames-4e9.avi", avi_claiming(avi, 32, 24, frames=0xFFFFFFFF)),
             ("avi-0x0.avi", avi_claiming(avi, 0, 0, sof=(0, 0))),
             ("mp4-60000.mp4", mp4_claiming(mp4, 60000, 60000)), ("mp4-1x60000.mp4", mp4_claiming(mp4, 1, 60000)),
             ("mp4-duration.mp4", mp4_claiming(mp4, 32, 24, duration=0xFFFFFFF0)),
             ("glb-list.glb", glb(b"[1, 2, 3]")), ("glb-null.glb", glb(b"null")), ("glb-number.glb", glb(b"42")),
             ("glb-string.glb", glb(b'"model"')), ("glb-deep.glb", glb(deep_json(100_000))),
             ("glb-deep-dict.glb", glb(b'{"a":' * 50_000 + b"1" + b"}" * 50_000)),
             ("glb-meshes-int.glb", glb(b'{"asset": {"version": "2.0"}, "meshes": 5, "nodes": null}')),
             ("glb-chunk-4gb.glb", glb(GLB_DOC, chunk_len=0xFFFFFFF0)),
             ("glb-total-lies.glb", glb(GLB_DOC, total=0xFFFFFFF0)), ("glb-bin-first.glb", glb(GLB_DOC, chunk_type=0x004E4942)),
             ("glb-not-utf8.glb", glb(b'{"asset": "\xff\xfe"}')), ("glb-header-only.glb", glb(b"")[:12]),
             ("glb-version-1.glb", b"glTF" + struct.pack("<I", 1) + glb(GLB_DOC)[8:])]
    return [Case(n, d, "bomb") for n, d in cases]


def extremes() -> list[Case]:
    sizes = [(1, 1), (1, 500), (500, 1), (1999, 1), (1, 60000), (60000, 1), (2, 3000), (3000, 2), (2001, 2), (7, 4000)]
    cases = [Case(f"png-{w}x{h}.png", png(w, h), "extreme") for w, h in sizes]
    thin = np.full((1, 3000, 3), 128, np.uint8)
    cases += [Case("thin.jpg", pil_bytes(thin, "JPEG"), "extreme"), Case("thin.gif", pil_bytes(thin, "GIF"), "extreme"),
              Case("tall.bmp", pil_bytes(np.ascontiguousarray(thin.transpose(1, 0, 2)), "BMP"), "extreme"),
              Case("thin.webp", pil_bytes(np.full((1, 3000, 3), 128, np.uint8), "WEBP"), "extreme"),
              Case("tiny.wav", sound("WAV", seconds=1 / 16000), "extreme"),
              Case("rate-8000.wav", sound("WAV", seconds=0.3, rate=8000), "extreme"),
              Case("thin-video.avi", video("MJPG", ".avi", w=2, h=400, frames=3), "extreme"),
              Case("wide-video.avi", video("MJPG", ".avi", w=1200, h=8, frames=3), "extreme")]
    return cases


# ---- the whole set -------------------------------------------------------------------------
NAMES = ["фото кота 🐱.png", "ｗｉｄｅ　名前.wav", "tab\there.jpg", "new\nline.png", "bell\x07\x1b[31m.gif",
         "x" * 296 + ".png", "../../etc/passwd.png", "C:\\Windows\\evil.png", "‮gnp.exe", ".png", "no-extension"]


def build(seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    orig = originals()
    cases = [Case(f"valid{ext}", data, "valid") for ext, data in orig.items()]
    for ext, data in orig.items():
        cuts = sorted({4, 8, 12, 20, 40, len(data) // 8, len(data) // 3, len(data) // 2, len(data) * 9 // 10,
                       len(data) - 1})
        cases += [Case(f"cut-{n}{ext}", data[:n], "truncated") for n in cuts if 0 < n < len(data)]
        cases.append(Case(f"empty{ext}", b"", "empty"))
        cases.append(Case(f"random{ext}", rng.integers(0, 256, int(rng.integers(1, 4096)), np.uint8).tobytes(), "random"))
        head = data[:16] if ext != ".glb" else data[:12]
        cases.append(Case(f"garbage{ext}", head + rng.integers(0, 256, 600, np.uint8).tobytes(), "garbage"))
        flipped = bytearray(data)
        for i in rng.integers(len(data) // 4, len(data), 12):
            flipped[i] ^= 0xFF
        cases.append(Case(f"flipped{ext}", bytes(flipped), "corrupt"))
    exts = list(orig)
    for i, ext in enumerate(exts):  # valid content, another type's extension
        cases.append(Case(f"renamed{exts[(i + 5) % len(exts)]}", orig[ext], "renamed"))
    cases.append(Case("text.png", b"just some text, not an image", "renamed"))
    cases.append(Case("pdf.mp4", b"%PDF-1.7\n" + b"0" * 500, "renamed"))
    cases += extremes() + bombs(orig)
    for i, name in enumerate(NAMES):
        data = orig[".png"] if i % 2 == 0 else orig[".wav"][:40]
        cases.append(Case(name, data, "names"))
    return cases


def on_disk(case: Case, folder: Path, index: int) -> Path:
    """The case written under `folder` as <index>-<name>, its name cut to fit a file system
    (255 bytes, no '/' or NUL); the user's full name is `case.name`."""
    safe = case.name.replace("/", "_").replace("\0", "_")
    while len(f"{index:03d}-{safe}".encode()) > 250:
        safe = safe[1:]
    path = folder / f"{index:03d}-{safe}"
    path.write_bytes(case.data)
    return path


def write_wav(path: Path, seconds: float = 0.5, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(np.zeros(int(seconds * rate), "<i2").tobytes())
    return path


# ---- real, decodable giants in a few bytes ------------------------------------------------
def jpeg_flat(w: int, h: int) -> bytes:
    """A valid baseline greyscale JPEG of w x h mid-grey pixels in ~2 bits per 8x8 block: one-code
    Huffman tables (DC difference 0 -> '0', AC end-of-block -> '0'). 16000x16000 is ~1 MB and
    decodes to 256 MB: a decompression bomb no header check sees."""
    def seg(marker: int, body: bytes) -> bytes:
        return struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body

    dqt = seg(0xDB, b"\0" + b"\1" * 64)
    sof = seg(0xC0, struct.pack(">BHHB", 8, h, w, 1) + b"\1\x11\0")
    dht = seg(0xC4, b"\x00" + b"\1" + b"\0" * 15 + b"\0" + b"\x10" + b"\1" + b"\0" * 15 + b"\0")
    sos = seg(0xDA, b"\1\1\0\0\x3f\0")
    blocks = -(-w // 8) * -(-h // 8)
    rest = blocks * 2 % 8
    data = b"\0" * (blocks * 2 // 8) + (bytes([(1 << (8 - rest)) - 1]) if rest else b"")  # '00' per block, 1-padded
    return b"\xff\xd8" + dqt + sof + dht + sos + data + b"\xff\xd9"


def avi_mjpeg(frames: list[bytes], w: int, h: int, fps: int = 5) -> bytes:
    """A minimal AVI (RIFF 'AVI ', one MJPG video stream, idx1) around JPEG frames."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return tag + struct.pack("<I", len(body)) + body + b"\0" * (len(body) % 2)

    def lst(kind: bytes, body: bytes) -> bytes:
        return chunk(b"LIST", kind + body)

    n, biggest = len(frames), max(len(f) for f in frames)
    avih = struct.pack("<14I", 1_000_000 // fps, 0, 0, 0x10, n, 0, 1, biggest, w, h, 0, 0, 0, 0)
    strh = b"vidsMJPG" + struct.pack("<IHHIIIIIIII4h", 0, 0, 0, 0, 1, fps, 0, n, biggest, 0xFFFFFFFF, 0, 0, 0, min(w, 32767), min(h, 32767))
    strf = struct.pack("<IiiHH4sIiiII", 40, w, h, 1, 24, b"MJPG", w * h * 3, 0, 0, 0, 0)
    hdrl = lst(b"hdrl", chunk(b"avih", avih) + lst(b"strl", chunk(b"strh", strh) + chunk(b"strf", strf)))
    movi, index, offset = b"", b"", 4
    for f in frames:
        index += b"00dc" + struct.pack("<III", 0x10, offset, len(f))
        piece = chunk(b"00dc", f)
        movi, offset = movi + piece, offset + len(piece)
    body = b"AVI " + hdrl + lst(b"movi", movi) + chunk(b"idx1", index)
    return b"RIFF" + struct.pack("<I", len(body)) + body
