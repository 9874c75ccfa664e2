"""Every common audio container wherever audio comes in: the one decoder (engine/speech/decode.py),
attachments (engine.media.ingest), /v1/audio/transcriptions (/translations reads uploads the same way) and chat
`input_audio`. Clips are made here with PyAV: WAV, FLAC, OGG/Vorbis, OGG/Opus, WebM/Opus (as a
browser's MediaRecorder writes it, with and without a declared duration), M4A/AAC, MP4 (a phone's
`isom` brand) and MP3. Damaged ones (cut short, random bytes after a valid header, corrupted
FLAC frames) are InputErrors / HTTP 400s that name the file and no server path; audio over the
limit is refused before it is all decoded."""
from __future__ import annotations

import base64
import fractions
import struct
from pathlib import Path

import av
import httpx
import numpy as np
import pytest

from engine.errors import InputError
from engine.media import ingest
from engine.speech import decode
from tests.test_audio_api import audio_server  # noqa: F401 - the shared app with real speech roles

PHRASE = "Turn off the lights."
SECONDS = 1.6  # the phrase is about 1.3 s long
# file name: (muxer, encoder, sample rate, layout, muxer options)
CONTAINERS = {
    "clip.wav": ("wav", "pcm_s16le", 48000, "mono", {}),
    "clip.flac": ("flac", "flac", 44100, "stereo", {}),
    "vorbis.ogg": ("ogg", "vorbis", 44100, "stereo", {}),
    "opus.ogg": ("ogg", "libopus", 48000, "mono", {}),
    "recording.webm": ("webm", "libopus", 48000, "mono", {}),
    "live.webm": ("webm", "libopus", 48000, "mono", {"live": "1"}),  # MediaRecorder: no duration, no cues
    "memo.m4a": ("ipod", "aac", 44100, "mono", {}),
    "phone.mp4": ("mp4", "aac", 44100, "stereo", {}),
    "song.mp3": ("mp3", "libmp3lame", 44100, "stereo", {}),
}


def speechlike(seconds: float, rate: int) -> np.ndarray:
    """A voiced 140 Hz buzz with harmonics, in syllables of about 4 a second."""
    t = np.arange(int(seconds * rate)) / rate
    voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 8))
    return (0.25 * voice * np.clip(np.sin(2 * np.pi * 4 * t), 0, None)).astype(np.float32)


def make_clip(path: Path, muxer: str, codec: str, rate: int, layout: str, options: dict,
              seconds: float = SECONDS, video: bool = False, signal: np.ndarray | None = None) -> Path:
    """`signal` (mono float32 at `rate`; else `seconds` of a speech-like buzz) encoded by PyAV."""
    x = ((speechlike(seconds, rate) if signal is None else signal) * 32767).astype(np.int16)
    channels = 2 if layout == "stereo" else 1
    with av.open(str(path), "w", format=muxer, options=options) as out:
        a = out.add_stream(codec, rate=rate, options={"strict": "-2"} if codec == "vorbis" else {})
        a.layout = layout
        if video:
            v = out.add_stream("libvpx", rate=10)
            v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
            for i in range(int(seconds * 10)):
                frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40 * (i % 6), np.uint8), format="rgb24")
                frame.pts = i
                for packet in v.encode(frame):
                    out.mux(packet)
            for packet in v.encode(None):
                out.mux(packet)
        for i in range(0, len(x), 960):
            chunk = np.repeat(x[i:i + 960], channels)[None]
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout=layout)
            frame.sample_rate, frame.pts, frame.time_base = rate, i, fractions.Fraction(1, rate)
            for packet in a.encode(frame):
                out.mux(packet)
        for packet in a.encode(None):
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory, say) -> dict[str, Path]:
    """PHRASE spoken by the packaged Piper voice, padded to SECONDS, in every container."""
    folder = tmp_path_factory.mktemp("containers")
    out = {}
    for name, (muxer, codec, rate, layout, options) in CONTAINERS.items():
        speech = say(PHRASE, rate)[: int(SECONDS * rate)]
        signal = np.concatenate([speech, np.zeros(int(SECONDS * rate) - len(speech), np.float32)])
        out[name] = make_clip(folder / name, muxer, codec, rate, layout, options, signal=signal)
    return out


@pytest.fixture(scope="module")
def damaged(clips, tmp_path_factory) -> dict[str, Path]:
    """Broken files, each of a kind that used to get through or break mid-read."""
    folder = tmp_path_factory.mktemp("damaged")
    rng = np.random.default_rng(7)
    out = {}

    def put(name: str, data: bytes) -> None:
        out[name] = folder / name
        out[name].write_bytes(data)

    for name in ("clip.flac", "recording.webm", "memo.m4a", "opus.ogg"):
        data = clips[name].read_bytes()
        put(f"cut-{name}", data[: len(data) // 2])  # truncated in the middle
    for name, keep in (("clip.flac", 42), ("recording.webm", 300), ("memo.m4a", 40), ("song.mp3", 45)):
        data = clips[name].read_bytes()
        put(f"noise-{name}", data[:keep] + rng.bytes(len(data) - keep))  # random bytes after a valid header
    # a FLAC whose first second is sound and whose later frames are corrupted: it passes the
    # attachment check (which decodes the start) and breaks mid-read ('flac decoder lost sync')
    longer = make_clip(folder / "long.flac", "flac", "flac", 44100, "mono", {}, seconds=3.0).read_bytes()
    a, b = int(len(longer) * 0.6), int(len(longer) * 0.85)
    put("frames.flac", longer[:a] + rng.bytes(b - a) + longer[b:])
    return out


def no_path(message: str, *places) -> None:
    for p in ("/tmp/", "pytest-", *map(str, places)):
        assert p not in message, message


# ---- the decoder --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONTAINERS))
def test_every_container_decodes_to_16k_mono(clips, name):
    info = decode.probe(clips[name])
    x = decode.decode(clips[name], 16000)
    assert x.dtype == np.float32 and x.ndim == 1
    assert len(x) / 16000 == pytest.approx(SECONDS, abs=0.06), (name, info)
    assert 0.1 < float(np.abs(x).max()) <= 1.0
    assert (info.duration_s is None) == (name == "live.webm")
    assert info.reader == ("pyav" if name.endswith((".webm", ".m4a", ".mp4")) else "soundfile"), info
    piece = decode.decode(clips[name], 16000, start=0.5, duration=0.5)  # seeking, as the audio adapter does
    assert len(piece) / 16000 == pytest.approx(0.5, abs=0.02)
    whole = decode.decode(clips[name], 16000)
    lag = np.argmax(np.correlate(whole[7000:9000], piece[:1000], "valid"))
    assert abs(7000 + lag - 8000) <= 16, lag  # the piece starts at 0.5 s (within 1 ms)


@pytest.mark.parametrize("name", sorted(["cut-clip.flac", "cut-recording.webm", "cut-memo.m4a", "cut-opus.ogg",
                                         "noise-clip.flac", "noise-recording.webm", "noise-memo.m4a",
                                         "noise-song.mp3", "frames.flac"]))
def test_damaged_audio_is_an_input_error_naming_the_file(damaged, name):
    with pytest.raises(InputError) as err:
        decode.decode(damaged[name], 16000, name="my voice note.x")
    message = str(err.value)
    assert message.startswith("my voice note.x") and "damaged" in message, message
    no_path(message, damaged[name].parent, damaged[name].name)


def test_too_long_is_refused_before_decoding(tmp_path, monkeypatch, clips):
    """Declared too long: refused before a sample is decoded. Declaring nothing (a live
    recording) or declaring too little (a lying header): decoding stops just past the limit."""
    import soundfile as sf

    hour = tmp_path / "hour.flac"  # an hour of 8 kHz silence is a small FLAC
    with sf.SoundFile(str(hour), "w", 8000, 1, format="FLAC") as f:
        for _ in range(60):
            f.write(np.zeros(8000 * 60, np.float32))
    decoded = []

    def counting(real):
        def pieces(*args):
            for rate, x in real(*args):
                decoded.append(len(x) / rate)
                yield rate, x
        return pieces

    monkeypatch.setattr(decode, "_sf_pieces", counting(decode._sf_pieces))
    monkeypatch.setattr(decode, "_av_pieces", counting(decode._av_pieces))
    with pytest.raises(InputError, match=r"^talk.flac is 1:00:00 long; the limit is 30:00$"):
        decode.decode(hour, 16000, name="talk.flac", max_s=1800)
    assert decoded == []

    live = make_clip(tmp_path / "live3.webm", "webm", "libopus", 48000, "mono", {"live": "1"}, seconds=3.0)
    with pytest.raises(InputError, match="longer than the limit of 0:01"):
        decode.decode(live, 16000, name="live3.webm", max_s=1.0)
    assert 1.0 < sum(decoded) < 1.5, sum(decoded)

    decoded.clear()
    liar = bytearray(make_clip(tmp_path / "liar.webm", "webm", "libopus", 48000, "mono", {}, seconds=3.0).read_bytes())
    at = liar.index(b"\x44\x89\x88")  # Matroska Duration: an 8-byte float, in ms
    liar[at + 3: at + 11] = struct.pack(">d", 1000.0)
    (tmp_path / "liar.webm").write_bytes(bytes(liar))
    assert decode.probe(tmp_path / "liar.webm").duration_s == pytest.approx(1.0)
    with pytest.raises(InputError, match="more than the 0:01 its header declares"):
        decode.decode(tmp_path / "liar.webm", 16000, max_s=2.0)
    assert 2.0 < sum(decoded) < 2.5, sum(decoded)


def test_video_without_sound_and_sound_without_samples(tmp_path, mp4):
    with pytest.raises(InputError, match="^movie.mp4 has no audio track$"):
        decode.probe(mp4, "movie.mp4")
    silent = tmp_path / "nothing.wav"
    import wave

    with wave.open(str(silent), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    with pytest.raises(InputError, match="holds no samples"):
        decode.decode(silent, 16000)


def test_playlists_and_lists_of_other_files_are_not_followed(tmp_path, clips):
    """FFmpeg's HLS and concat demuxers open the files (or URLs) a text file names: the decoder
    allows media demuxers only, and the file protocol only."""
    (tmp_path / "list.m3u8").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.5,\n{clips['song.mp3']}\n"
                                        "#EXT-X-ENDLIST\n")
    (tmp_path / "list.txt").write_text(f"ffconcat version 1.0\nfile {clips['clip.wav']}\n")
    for name in ("list.m3u8", "list.txt"):
        with pytest.raises(InputError, match="damaged"):
            decode.decode(tmp_path / name, 16000)


# ---- attachments ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONTAINERS))
def test_attachments_in_every_container_are_audio(clips, tmp_path, name):
    rec = ingest(clips[name], tmp_path / "media", 10**7)
    assert rec.kind == "audio" and rec.mime.startswith("audio/"), rec
    assert rec.meta.get("duration_s", SECONDS) == pytest.approx(SECONDS, abs=0.06)
    if name.endswith(".webm"):
        assert rec.mime == "audio/webm" and rec.path.endswith(".webm")
    if name.endswith((".m4a", ".mp4")):
        assert rec.mime == "audio/mp4" and rec.path.endswith(".m4a")


def test_a_webm_with_pictures_stays_video(tmp_path):
    clip = make_clip(tmp_path / "camera.webm", "webm", "libopus", 48000, "mono", {}, seconds=1.0, video=True)
    rec = ingest(clip, tmp_path / "media", 10**7)
    assert (rec.kind, rec.mime) == ("video", "video/webm")


def test_damaged_attachments_are_refused_by_name(damaged, tmp_path):
    for name in ("noise-clip.flac", "noise-memo.m4a", "cut-memo.m4a", "cut-opus.ogg"):
        with pytest.raises(InputError) as err:
            ingest(damaged[name], tmp_path / "media", 10**7, f"voice note{name[-5:]}")
        assert str(err.value).startswith(f"voice note{name[-5:]}") and "damaged" in str(err.value), str(err.value)
        no_path(str(err.value), damaged[name].parent)


# ---- the API ----------------------------------------------------------------------------------

def _transcribe(server, name: str, data: bytes) -> httpx.Response:
    """(/translations reads the upload the same way, app/audio_api._upload_audio; the packaged
    Whisper is English-only, so it answers 400 there before reading the file.)"""
    return httpx.post(f"{server.url}/v1/audio/transcriptions", timeout=120, files={"file": (name, data)},
                      data={"model": "whisper-1", "response_format": "verbose_json"})


def _chat(server, data: bytes, fmt: str) -> httpx.Response:
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                      json={"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": [part]}]})


def test_the_api_hears_every_container(audio_server, clips):  # noqa: F811
    for name, path in clips.items():
        r = _transcribe(audio_server, name, path.read_bytes())
        assert r.status_code == 200, (name, r.text)
        assert r.json()["duration"] == pytest.approx(SECONDS, abs=0.06), (name, r.json())
        assert "lights" in r.json()["text"].lower(), (name, r.json()["text"])
    for name, fmt in (("live.webm", "webm"), ("memo.m4a", "m4a")):
        r = _chat(audio_server, clips[name].read_bytes(), fmt)
        assert r.status_code == 200, (name, r.text)


def test_the_api_refuses_damaged_and_long_audio_with_400s(audio_server, damaged, tmp_path):  # noqa: F811
    import soundfile as sf

    places = (audio_server.engine.media_dir, audio_server.engine.config.data_path, damaged["frames.flac"].parent)
    for name in ("frames.flac", "cut-clip.flac", "cut-recording.webm", "noise-memo.m4a"):
        r = _transcribe(audio_server, name, damaged[name].read_bytes())
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and message.startswith(name) and "damaged" in message, (name, r.text)
        no_path(message, *places)
    # FLAC frames that break after the first second: this was an HTTP 500 (LibsndfileError mid-read)
    r = _chat(audio_server, damaged["frames.flac"].read_bytes(), "flac")
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "audio-0.flac" in message and "damaged" in message, r.text
    no_path(message, *places)
    long = tmp_path / "long.flac"  # 31 minutes of 8 kHz silence: over the API's 30, refused from the header
    with sf.SoundFile(str(long), "w", 8000, 1, format="FLAC") as f:
        for _ in range(31):
            f.write(np.zeros(8000 * 60, np.float32))
    r = _transcribe(audio_server, "meeting.flac", long.read_bytes())
    assert r.status_code == 400 and r.json()["error"]["message"] == "meeting.flac is 31:00 long; the limit is 30:00"
