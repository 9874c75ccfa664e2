"""Video editing (ffmpeg) and sound synthesis (numpy): offline, on clips made here."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from generators import registry
from generators._notes import note_hz, parse_notes
from generators.audio_synth import SR, SYNTHS, SynthAudio, pick_sound
from generators.base import Cancelled, GenerationError, RequestError, validate
from generators.ffmpeg import ffmpeg_exe, probe, run_ffmpeg
from generators.tools import TOOLS
from generators.video_ffmpeg import FFmpegVideoEditor, atempo_chain

PEAK_DB = -3.0


class Flag:
    cancelled = False


class CancelOnProgress:
    """Flips to cancelled the first time work reports progress beyond the start."""

    def __init__(self):
        self.cancelled = False
        self.calls = 0

    def progress(self, stage, fraction):
        self.calls += 1
        if fraction > 0:
            self.cancelled = True


def ff(*args):
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *map(str, args)],
                   check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    clip = root / "clip.mp4"  # 3 s, 10 fps, grey level 8 * frame number, 440 Hz tone
    ff("-f", "lavfi", "-i", "color=c=black:s=160x120:r=10:d=3,format=yuv420p,geq=lum='8*N':cb=128:cr=128",
       "-f", "lavfi", "-i", "sine=frequency=440:duration=3", "-t", "3",
       "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", clip)
    wide = root / "wide.mp4"  # 1 s, 960 px wide, 25 fps, no sound
    ff("-f", "lavfi", "-i", "testsrc=size=960x120:rate=25", "-t", "1", "-c:v", "libx264", "-preset", "ultrafast",
       "-pix_fmt", "yuv420p", wide)
    long = root / "long.mp4"  # 61 s at 1 fps, tiny
    ff("-f", "lavfi", "-i", "testsrc=size=32x32:rate=1", "-t", "61", "-c:v", "libx264", "-preset", "ultrafast",
       "-pix_fmt", "yuv420p", long)
    bad = root / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8)))
    return {"clip": clip, "wide": wide, "long": long, "bad": bad, "root": root}


def edit(inputs, out_dir, progress=None, cancel=None, **args):
    request = validate(TOOLS["edit_video"].schema, args)
    calls = []

    def record(stage, fraction):
        assert 0.0 <= fraction <= 1.0
        calls.append(fraction)
        if progress:
            progress(stage, fraction)

    result = FFmpegVideoEditor().run(request, [Path(p) for p in inputs], Path(out_dir), record, cancel or Flag())
    assert calls and calls[-1] == 1.0
    return result


def make_sound(out_dir, inputs=(), progress=None, cancel=None, **args):
    request = validate(TOOLS["generate_audio"].schema, args)
    return SynthAudio().run(request, [Path(p) for p in inputs], Path(out_dir),
                            progress or (lambda s, f: None), cancel or Flag())


def frames(path):
    import cv2

    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        out.append(frame)
    cap.release()
    return out


def audio_seconds(path, rate=8000):
    raw = subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-ac", "1",
                          "-ar", str(rate), "-f", "s16le", "-"], capture_output=True, check=True).stdout
    return len(raw) / 2 / rate


def files(folder):
    return sorted(p.name for p in Path(folder).iterdir()) if Path(folder).exists() else []


# --- ffmpeg helpers ---

def test_ffmpeg_found_and_probe_reads_the_clip(media):
    assert Path(ffmpeg_exe()).exists()
    info = probe(media["clip"])
    assert info["duration_s"] == pytest.approx(3.0, abs=0.05)
    assert (info["width"], info["height"], info["fps"], info["has_audio"]) == (160, 120, 10.0, True)
    assert probe(media["wide"])["has_audio"] is False


def test_probe_refuses_a_broken_or_missing_file(media):
    with pytest.raises(RequestError, match="could not read the video"):
        probe(media["bad"])
    with pytest.raises(RequestError, match="could not read the video"):
        probe(media["root"] / "nope.mp4")


def test_run_ffmpeg_reports_progress_and_stops_when_cancelled(tmp_path):
    cancel = CancelOnProgress()
    start = time.monotonic()
    with pytest.raises(Cancelled):
        run_ffmpeg(["-f", "lavfi", "-i", "testsrc2=size=640x480:rate=30", "-t", "600", "-c:v", "libx264",
                    "-preset", "veryslow", tmp_path / "big.mp4"], cancel, cancel.progress, duration_s=600)
    assert time.monotonic() - start < 8
    assert cancel.calls >= 1


def test_run_ffmpeg_failure_carries_stderr(tmp_path):
    with pytest.raises(GenerationError, match="ffmpeg failed") as err:
        run_ffmpeg(["-i", tmp_path / "missing.mp4", tmp_path / "x.mp4"], Flag())
    assert "missing.mp4" in str(err.value)


def test_atempo_chain_keeps_each_stage_in_range():
    for factor in (0.1, 0.3, 0.5, 1.0, 2.0, 3.7, 10.0):
        stages = atempo_chain(factor)
        assert all(0.5 <= s <= 2.0 for s in stages)
        assert np.prod(stages) == pytest.approx(factor)


# --- edit_video ---

def test_trim_is_frame_accurate(media, tmp_path):
    result = edit([media["clip"]], tmp_path, operation="trim", start_s=0.5, end_s=2.0)
    assert result.kind == "video" and result.path.endswith(".mp4")
    assert result.meta["duration_s"] == pytest.approx(1.5, abs=0.1)  # within one frame at 10 fps
    assert result.meta["backend"] == "ffmpeg" and result.meta["operation"] == "trim" and result.meta["has_audio"]
    got = frames(result.path)
    assert abs(len(got) - 15) <= 1
    original = frames(media["clip"])
    assert got[0].mean() == pytest.approx(original[5].mean(), abs=3)  # starts on frame 5
    assert got[-1].mean() == pytest.approx(original[19].mean(), abs=3)  # ends on frame 19
    assert audio_seconds(result.path) == pytest.approx(1.5, abs=0.1)


def test_trim_refuses_impossible_ranges(media, tmp_path):
    with pytest.raises(RequestError, match="past the end"):
        edit([media["clip"]], tmp_path, operation="trim", start_s=5, end_s=0)
    with pytest.raises(RequestError, match="after the start"):
        edit([media["clip"]], tmp_path, operation="trim", start_s=2, end_s=1)
    assert files(tmp_path) == []


def test_speed_up_and_slow_down(media, tmp_path):
    fast = edit([media["clip"]], tmp_path, operation="speed", factor=2)
    assert fast.meta["duration_s"] == pytest.approx(1.5, abs=0.1)
    assert fast.meta["has_audio"] and audio_seconds(fast.path) == pytest.approx(1.5, abs=0.1)
    slow = edit([media["clip"]], tmp_path, operation="speed", factor=0.25)
    assert slow.meta["duration_s"] == pytest.approx(12.0, abs=0.15)
    assert audio_seconds(slow.path) == pytest.approx(12.0, abs=0.15)


def test_to_gif_is_small_and_animated(media, tmp_path):
    from PIL import Image

    result = edit([media["wide"]], tmp_path, operation="to_gif")
    assert result.kind == "image" and result.path.endswith(".gif")
    with Image.open(result.path) as gif:
        assert gif.format == "GIF" and gif.size[0] == 480 and gif.size[1] == 60
        assert gif.n_frames >= 10  # 25 fps capped to 15 over 1 s
        assert gif.n_frames <= 16
    small = edit([media["clip"]], tmp_path, operation="to_gif")
    with Image.open(small.path) as gif:
        assert gif.size == (160, 120) and gif.n_frames >= 25


def test_extract_frames_gives_evenly_spaced_pngs(media, tmp_path):
    from PIL import Image

    result = edit([media["clip"]], tmp_path, operation="extract_frames", count=4)
    paths = result.meta["frames"]
    assert result.kind == "image" and result.path == paths[0] and len(paths) == 4
    assert all(p.endswith(".png") and Path(p).is_file() for p in paths)
    levels = []
    for p in paths:
        with Image.open(p) as im:
            assert im.size == (160, 120)
            levels.append(np.asarray(im.convert("L"), float).mean())
    assert levels == sorted(levels) and levels[-1] - levels[0] > 100  # spread across the clip


def test_reverse_plays_backwards(media, tmp_path):
    result = edit([media["clip"]], tmp_path, operation="reverse")
    original, reversed_ = frames(media["clip"]), frames(result.path)
    assert abs(len(reversed_) - len(original)) <= 1
    assert reversed_[0].mean() == pytest.approx(original[-1].mean(), abs=6)
    assert reversed_[-1].mean() == pytest.approx(original[0].mean(), abs=6)
    assert result.meta["has_audio"]


def test_reverse_refuses_long_clips(media, tmp_path):
    with pytest.raises(RequestError, match="60 s"):
        edit([media["long"]], tmp_path, operation="reverse")


def test_mute_drops_the_sound(media, tmp_path):
    result = edit([media["clip"]], tmp_path, operation="mute")
    assert result.meta["has_audio"] is False and probe(result.path)["has_audio"] is False
    assert result.meta["duration_s"] == pytest.approx(3.0, abs=0.1)


@pytest.mark.parametrize("seconds", [1.0, 5.0])
def test_replace_audio_keeps_the_video_length(media, tmp_path, seconds):
    wav = tmp_path / "new.wav"
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(wav, 0.5 * np.sin(2 * np.pi * 300 * t), 16000)
    result = edit([media["clip"], wav], tmp_path / "out", operation="replace_audio", audio="new.wav")
    assert result.meta["has_audio"] and result.meta["duration_s"] == pytest.approx(3.0, abs=0.1)
    assert audio_seconds(result.path) == pytest.approx(3.0, abs=0.1)  # padded with silence, or cut


def test_replace_audio_needs_a_sound(media, tmp_path):
    with pytest.raises(RequestError, match="sound"):
        edit([media["clip"]], tmp_path, operation="replace_audio")
    with pytest.raises(RequestError, match="could not read the sound"):
        edit([media["clip"], media["bad"]], tmp_path, operation="replace_audio")


def test_broken_video_is_a_request_error(media, tmp_path):
    with pytest.raises(RequestError, match="could not read the video"):
        edit([media["bad"]], tmp_path, operation="mute")
    with pytest.raises(RequestError, match="needs a video"):
        edit([], tmp_path, operation="mute")


@pytest.mark.parametrize("args", [{"operation": "trim", "start_s": 0.5}, {"operation": "speed", "factor": 0.5},
                                  {"operation": "extract_frames", "count": 4}, {"operation": "to_gif"},
                                  {"operation": "replace_audio"}])
def test_cancel_mid_run_leaves_nothing(media, tmp_path, args):
    cancel = CancelOnProgress()
    out = tmp_path / "out"
    inputs = [media["clip"], media["clip"]]  # the clip's own sound serves replace_audio
    with pytest.raises(Cancelled):
        FFmpegVideoEditor().run(validate(TOOLS["edit_video"].schema, args), inputs, out, cancel.progress, cancel)
    assert files(out) == []


def test_registered_under_their_tasks():
    assert ("ffmpeg" in [e.name for e in registry.entries("edit_video")])
    assert ("synth" in [e.name for e in registry.entries("audio")])
    assert FFmpegVideoEditor.task == "edit_video" and SynthAudio.task == "audio"


# --- generate_audio ---

@pytest.mark.parametrize("sound", sorted(SYNTHS))
def test_every_sound_has_the_asked_length_and_level(tmp_path, sound):
    result = make_sound(tmp_path, prompt=f"some {sound}", sound=sound, seconds=1.3, notes="")
    info = sf.info(result.path)
    assert result.kind == "audio" and result.path.endswith(".wav")
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (SR, 1, "PCM_16", round(1.3 * SR))
    audio, _ = sf.read(result.path)
    peak = np.abs(audio).max()
    assert peak <= 1.0 and 20 * np.log10(peak) == pytest.approx(PEAK_DB, abs=0.1)
    assert result.meta["sound"] == sound and result.meta["backend"] == "synth"


def high_share(path, above=2000):
    audio, rate = sf.read(path)
    power = np.abs(np.fft.rfft(audio)) ** 2
    return power[np.fft.rfftfreq(len(audio), 1 / rate) > above].sum() / power.sum()


def test_rain_is_brighter_than_brown_noise(tmp_path):
    rain = make_sound(tmp_path, prompt="rain", sound="rain", seconds=2)
    brown = make_sound(tmp_path, prompt="rumble", sound="brown_noise", seconds=2)
    assert high_share(rain.path) > 10 * high_share(brown.path)


def test_melody_plays_its_notes_in_order(tmp_path):
    result = make_sound(tmp_path, prompt="a tune", sound="melody", notes="C4 E4 G4", seconds=3)
    audio, rate = sf.read(result.path)
    third = len(audio) // 3
    for i, hz in enumerate((261.63, 329.63, 392.0)):
        part = audio[i * third + rate // 10: (i + 1) * third - rate // 10]
        spectrum = np.abs(np.fft.rfft(part * np.hanning(len(part)), 8 * len(part)))
        peak = np.fft.rfftfreq(8 * len(part), 1 / rate)[np.argmax(spectrum)]
        assert peak == pytest.approx(hz, abs=2)


def test_note_parsing():
    assert note_hz("A", 4) == pytest.approx(440)
    assert note_hz("C", 4) == pytest.approx(261.63, abs=0.01)
    assert note_hz("C#", 5) == pytest.approx(554.37, abs=0.01)
    notes = parse_notes("C D E:0.5 Bb3 r:0.25")
    assert notes[1] == (pytest.approx(293.66, abs=0.01), None)
    assert notes[2][1] == 0.5 and notes[3][0] == pytest.approx(233.08, abs=0.01) and notes[4] == (None, 0.25)
    with pytest.raises(RequestError, match="H4"):
        parse_notes("C4 H4")


def test_auto_picks_a_sound_from_the_words(tmp_path):
    assert make_sound(tmp_path, prompt="rain sounds", seconds=0.5).meta["sound"] == "rain"
    for prompt, sound in [("a light drizzle", "rain"), ("a gentle breeze", "wind"), ("waves at the beach", "ocean"),
                          ("a crackling campfire", "fire"), ("a little jingle", "melody"), ("an alarm", "beep"),
                          ("a 1 kHz tone", "tone"), ("pink noise", "pink_noise"), ("brown noise", "brown_noise"),
                          ("some noise", "white_noise")]:
        assert pick_sound(prompt) == sound, prompt
    tone = make_sound(tmp_path, prompt="a 1 kHz tone", seconds=0.5)
    assert tone.meta["frequency"] == 1000


def test_unknown_sound_request_says_what_it_can_make(tmp_path):
    with pytest.raises(RequestError, match="rain, wind"):
        make_sound(tmp_path, prompt="a cat meowing")
    with pytest.raises(RequestError, match="note"):
        make_sound(tmp_path, prompt="tune", sound="melody", notes="C4 Q7")
    assert files(tmp_path) == []


def test_same_prompt_same_sound(tmp_path):
    a = sf.read(make_sound(tmp_path, prompt="storm at night", seconds=1).path)[0]
    b = sf.read(make_sound(tmp_path, prompt="storm at night", seconds=1).path)[0]
    c = sf.read(make_sound(tmp_path, prompt="storm at noon", sound="rain", seconds=1).path)[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sound_onto_a_video(media, tmp_path):
    mixed = make_sound(tmp_path, [media["clip"]], prompt="ocean waves", video="clip.mp4", seconds=10)
    assert mixed.kind == "video" and mixed.path.endswith(".mp4") and mixed.meta["mixed"] is True
    info = probe(mixed.path)
    assert info["has_audio"] and info["duration_s"] == pytest.approx(3.0, abs=0.1)
    assert audio_seconds(mixed.path) == pytest.approx(3.0, abs=0.1)
    silent = make_sound(tmp_path, [media["wide"]], prompt="fire", video="wide.mp4")
    assert silent.meta["mixed"] is False and probe(silent.path)["has_audio"]
    assert audio_seconds(silent.path) == pytest.approx(1.0, abs=0.1)
    assert [n for n in files(tmp_path) if n.endswith(".wav")] == []  # the track is not left behind


def test_sound_cancel_leaves_nothing(media, tmp_path):
    for inputs, video in (((), ""), ((media["clip"],), "clip.mp4")):
        cancel = CancelOnProgress()
        with pytest.raises(Cancelled):
            make_sound(tmp_path, inputs, cancel.progress, cancel, prompt="wind", seconds=5, video=video)
        assert files(tmp_path) == []
