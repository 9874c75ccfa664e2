"""Classical sound synthesis with numpy: ambiences, noise colours, tones, beeps, melodies.

Every sound is made in 0.5 s chunks (progress and cancel per chunk) from
white noise shaped by FIR filters (overlap-save, so chunks join seamlessly),
slow envelopes and sparse events. 44.1 kHz mono 16-bit WAV, peak-normalised
to -3 dBFS, seeded by a hash of the prompt so the same words give the same
sound. With a video (request["video"]), the sound is as long as the video and
is put on it (mixed with its own sound if it has one).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from generators._notes import layout, parse_notes
from generators.base import Backend, RequestError, Result, check
from generators.registry import register

SR = 44100
CHUNK = SR // 2
PEAK = 10 ** (-3 / 20)  # -3 dBFS
FADE_S = 0.01
MAX_SYNTH_S = 60.0  # longer videos get this much sound, looped
NAMES = "rain, wind, ocean waves, fire, white/pink/brown noise, a tone, beeps or a melody"
DEFAULT_NOTES = "C4 E4 G4 C5 G4 E4 C4"

AUTO = [  # first match wins
    ("rain", r"\b(rain\w*|drizzl\w*|storm\w*|thunder\w*|downpour)\b"),
    ("wind", r"\b(wind|winds|windy|breez\w*|gust\w*|gales?)\b"),
    ("ocean", r"\b(waves?|seas?|seaside|ocean\w*|beach\w*|surf|shore)\b"),
    ("fire", r"\b(fire|fires|campfire\w*|bonfire\w*|fireplace|crackl\w*|flames?)\b"),
    ("melody", r"\b(melod\w*|tunes?|songs?|notes?|jingles?|music)\b"),
    ("beep", r"\b(beeps?|beeping|bleeps?|alarms?)\b"),
    ("tone", r"\b(tones?|sine|hz)\b|\d\s*k?hz\b"),
    ("noise", r"\bnoise\b"),
]


def pick_sound(prompt: str, notes: str = "") -> str:
    """The sound a prompt asks for (sound "auto"); RequestError naming what exists if none."""
    if notes.strip():
        return "melody"
    text = prompt.lower()
    for sound, pattern in AUTO:
        if re.search(pattern, text):
            if sound == "noise":
                if re.search(r"\bpink\b", text):
                    return "pink_noise"
                if re.search(r"\b(brown\w*|red)\b", text):
                    return "brown_noise"
                return "white_noise"
            return sound
    raise RequestError(f"I can't tell which sound {prompt!r} is; I can make {NAMES} "
                       "(name one, or give notes like C4 E4 G4)")


def fir(gain: Callable[[np.ndarray], np.ndarray], taps: int = 4096) -> np.ndarray:
    """A linear-phase FIR with magnitude `gain(f_hz)`, scaled so white noise keeps unit power."""
    f = np.fft.rfftfreq(taps, 1 / SR)
    h = np.roll(np.fft.irfft(gain(np.maximum(f, 1e-3)), taps), taps // 2) * np.hanning(taps)
    return h / np.sqrt(np.sum(h ** 2))


def bandpass(lo: float, hi: float) -> Callable:
    return lambda f: 1 / (1 + (lo / f) ** 4) / (1 + (f / hi) ** 4)


def pink(f):
    return np.where(f >= 20, 1 / np.sqrt(f), f / 20 ** 1.5)


def brown(f):
    return np.where(f >= 20, 1 / f, f / 400)


class Noise:
    """Filtered white noise, streamed: overlap-save keeps the filter state between chunks."""

    def __init__(self, rng: np.random.Generator, gain: Callable | None = None, taps: int = 4096):
        self.rng = rng
        self.h = fir(gain, taps) if gain is not None else None
        self.tail = rng.standard_normal(taps - 1) if gain is not None else None  # warm start, no fade-in
        self._spectra: dict[int, np.ndarray] = {}

    def __call__(self, n: int) -> np.ndarray:
        x = self.rng.standard_normal(n)
        if self.h is None:
            return x
        buf = np.concatenate([self.tail, x])
        size = 1 << int(np.ceil(np.log2(len(buf) + len(self.h))))
        if size not in self._spectra:
            self._spectra[size] = np.fft.rfft(self.h, size)
        y = np.fft.irfft(np.fft.rfft(buf, size) * self._spectra[size], size)[len(self.h) - 1:len(buf)]
        self.tail = buf[-(len(self.h) - 1):]
        return y


class Events:
    """Sparse sounds (droplets, pops) at Poisson times; each may run past its chunk."""

    def __init__(self, rng, rate_hz: float, make: Callable[[np.random.Generator], np.ndarray]):
        self.rng, self.rate, self.make = rng, rate_hz, make
        self.spill = np.zeros(0)

    def __call__(self, n: int) -> np.ndarray:
        count = self.rng.poisson(self.rate * n / SR)
        sounds = [self.make(self.rng) for _ in range(count)]
        longest = max((len(s) for s in sounds), default=0)
        out = np.zeros(n + max(longest, len(self.spill)))
        out[:len(self.spill)] += self.spill
        for at, s in zip(self.rng.integers(0, n, count), sounds):
            out[at:at + len(s)] += s
        self.spill = out[n:]
        return out[:n]


def droplet(rng) -> np.ndarray:
    t = np.arange(int(0.03 * SR)) / SR
    f0 = rng.uniform(1500, 5000)
    freq = f0 * (1 + 0.6 * t / t[-1])  # a small upward chirp, like a drop hitting water
    amp = rng.lognormal(-1.6, 0.6)
    return amp * np.sin(2 * np.pi * np.cumsum(freq) / SR) * np.exp(-t / rng.uniform(0.003, 0.01))


def pop(rng) -> np.ndarray:
    t = np.arange(int(rng.uniform(0.004, 0.03) * SR)) / SR
    amp = min(1.2, 0.15 * rng.pareto(2.5) + 0.15)
    return amp * rng.standard_normal(len(t)) * np.exp(-t / rng.uniform(0.0007, 0.004))


def slow(t: np.ndarray, rates: Sequence[float], phases: Sequence[float]) -> np.ndarray:
    """A smooth 0..1 modulation from a few slow sines."""
    s = sum(np.sin(2 * np.pi * r * t + p) for r, p in zip(rates, phases)) / len(rates)
    return 0.5 + 0.5 * s


# --- the sounds: each is make(rng, request, total_samples) -> chunk(start_sample, n) ---

def make_noise(gain):
    def make(rng, request, total):
        src = Noise(rng, gain)
        return lambda n0, n: src(n)
    return make


def make_rain(rng, request, total):
    hiss, rumble = Noise(rng, bandpass(600, 9000)), Noise(rng, brown)
    drops = Events(rng, 45, droplet)
    phases = rng.uniform(0, 2 * np.pi, 3)

    def chunk(n0, n):
        t = (n0 + np.arange(n)) / SR
        level = 0.85 + 0.3 * slow(t, (0.05, 0.11, 0.31), phases)
        return level * (0.45 * hiss(n) + 0.25 * rumble(n)) + drops(n)
    return chunk


def make_wind(rng, request, total):
    low, high = Noise(rng, bandpass(120, 500)), Noise(rng, bandpass(400, 1800))
    phases = rng.uniform(0, 2 * np.pi, 4)

    def chunk(n0, n):
        t = (n0 + np.arange(n)) / SR
        g = slow(t, (0.05, 0.09, 0.17, 0.29), phases)
        return (0.15 + 0.85 * g ** 1.5) * (low(n) * (1 - 0.6 * g) + 0.8 * g * high(n))
    return chunk


def make_ocean(rng, request, total):
    rumble, surf = Noise(rng, brown), Noise(rng, bandpass(300, 7000))
    p0, p1 = rng.uniform(0, 2 * np.pi, 2)

    def chunk(n0, n):
        t = (n0 + np.arange(n)) / SR
        # swell near 0.1 Hz, its period drifting a little
        phase = 2 * np.pi * 0.1 * t + 1.5 * np.sin(2 * np.pi * 0.013 * t + p0) + p1
        swell = (0.5 - 0.5 * np.cos(phase)) ** 2
        return rumble(n) * (0.35 + 0.65 * swell) + 0.8 * surf(n) * swell ** 3
    return chunk


def make_fire(rng, request, total):
    roar, hiss = Noise(rng, brown), Noise(rng, bandpass(2000, 9000))
    crackle, pops = Events(rng, 25, pop), Events(rng, 3, lambda r: 1.5 * pop(r))
    phases = rng.uniform(0, 2 * np.pi, 3)

    def chunk(n0, n):
        t = (n0 + np.arange(n)) / SR
        flicker = slow(t, (0.3, 0.7, 1.3), phases)
        return 0.5 * roar(n) * (0.7 + 0.3 * flicker) + 0.06 * hiss(n) * flicker + crackle(n) + pops(n)
    return chunk


def make_tone(rng, request, total):
    hz = request["frequency"]
    return lambda n0, n: np.sin(2 * np.pi * hz * (n0 + np.arange(n)) / SR)


def make_beep(rng, request, total, on_s=0.2, period_s=0.5):
    hz = request["frequency"]
    ramp = 0.005

    def chunk(n0, n):
        t = (n0 + np.arange(n)) / SR
        if total / SR < period_s:  # one beep filling the whole sound
            local, length = t, total / SR
        else:
            local, length = np.mod(t, period_s), on_s
        env = np.clip(np.minimum(local, length - local) / ramp, 0, 1) * (local < length)
        return env * np.sin(2 * np.pi * hz * t)
    return chunk


def make_melody(rng, request, total):
    timeline = layout(parse_notes(request.get("notes") or DEFAULT_NOTES), total / SR)

    def chunk(n0, n):
        t = (n0 + np.arange(n)) / SR
        out = np.zeros(n)
        for onset, d, hz in timeline:
            if hz is None or onset >= t[-1] + 1 / SR or onset + d <= t[0]:
                continue
            mask = (t >= onset) & (t < onset + d)
            lt = t[mask] - onset
            a, dc, r = min(0.02, 0.2 * d), min(0.08, 0.2 * d), min(0.08, 0.3 * d)
            env = np.interp(lt, [0, a, a + dc, d - r, d], [0, 1, 0.7, 0.7, 0])
            w = 2 * np.pi * hz * lt
            out[mask] += env * (np.sin(w) + 0.3 * np.sin(2 * w) + 0.12 * np.sin(3 * w))
        return out
    return chunk


SYNTHS = {"rain": make_rain, "wind": make_wind, "ocean": make_ocean, "fire": make_fire,
          "white_noise": make_noise(None), "pink_noise": make_noise(pink), "brown_noise": make_noise(brown),
          "tone": make_tone, "beep": make_beep, "melody": make_melody}


def synthesize(sound: str, request: dict, seconds: float, seed: int, progress=None, cancel=None) -> np.ndarray:
    """`seconds` of `sound` as float32 in [-PEAK, PEAK], made chunk by chunk."""
    total = max(1, int(round(seconds * SR)))
    chunk = SYNTHS[sound](np.random.default_rng(seed), request, total)
    parts, done = [], 0
    while done < total:
        check(cancel)
        n = min(CHUNK, total - done)
        parts.append(chunk(done, n))
        done += n
        if progress:
            progress("making the sound", done / total)
    audio = np.concatenate(parts)
    fade = min(int(FADE_S * SR), total // 4)
    if fade:
        ramp = np.linspace(0, 1, fade)
        audio[:fade] *= ramp
        audio[-fade:] *= ramp[::-1]
    peak = np.max(np.abs(audio))
    if peak > 0:
        audio *= PEAK / peak
    return audio.astype(np.float32)


def seed_of(prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")


def _fresh(out_dir: Path, stem: str, ext: str) -> Path:
    path, n = out_dir / f"{stem}{ext}", 1
    while path.exists():
        n += 1
        path = out_dir / f"{stem}_{n}{ext}"
    return path


@register("audio", "synth")
class SynthAudio(Backend):
    task = "audio"
    name = "synth"

    def __init__(self, **config) -> None:
        self.config = config

    def can_do(self, request: dict, inputs) -> bool:
        """Sounds it knows by name (rain, a melody, a tone...), or any sound onto a video."""
        if request.get("sound") == "speech":
            return False  # the engine's voice does speech
        if request.get("sound", "auto") != "auto" or request.get("video"):
            return True
        try:
            return bool(pick_sound(request.get("prompt", ""), request.get("notes", "")))
        except RequestError:
            return False

    def run(self, request: dict, inputs: Sequence[Path], out_dir: Path, progress, cancel) -> Result:
        import soundfile as sf

        prompt = request.get("prompt", "")
        request = {"sound": "auto", "seconds": 5, "notes": "", "frequency": 440, "video": "", **request}
        sound = request["sound"]
        if sound == "speech":
            raise RequestError("speech needs a text-to-speech voice, and none is available here")
        if sound == "auto":
            sound = pick_sound(prompt, request["notes"])
            if sound in ("tone", "beep") and request["frequency"] == 440:
                m = re.search(r"(\d+(?:\.\d+)?)\s*(k?)hz\b", prompt.lower())
                if m:
                    hz = float(m.group(1)) * (1000 if m.group(2) else 1)
                    request["frequency"] = min(20000.0, max(20.0, hz))
        if sound not in SYNTHS:
            raise RequestError(f"I can't make the sound {sound!r}; I can make {NAMES}")
        if sound == "melody":
            parse_notes(request["notes"] or DEFAULT_NOTES)  # bad notes fail before any work
        with_video = isinstance(request["video"], str) and request["video"].strip() != ""
        info = None
        if with_video:
            if not inputs:
                raise RequestError("which video should the sound go on? send one or make one first")
            from generators.ffmpeg import probe
            info = probe(inputs[0])
            seconds = info["duration_s"]
        else:
            seconds = float(request["seconds"])
            if not 0.1 <= seconds <= 60:
                raise RequestError(f"the sound must last 0.1 to 60 seconds; got {seconds:g}")
        synth_s = min(seconds, MAX_SYNTH_S)
        check(cancel)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        share = 0.8 if with_video else 1.0
        audio = synthesize(sound, request, synth_s, seed_of(prompt),
                           lambda stage, f: progress(stage, share * f), cancel)
        check(cancel)
        meta = {"duration_s": round(len(audio) / SR, 3), "sample_rate": SR, "sound": sound,
                "backend": self.name, "seed": seed_of(prompt) % 2 ** 31}
        if sound in ("tone", "beep"):
            meta["frequency"] = request["frequency"]
        if sound == "melody":
            meta["notes"] = request["notes"] or DEFAULT_NOTES
        if not with_video:
            path = _fresh(out_dir, sound, ".wav")
            try:
                sf.write(str(path), audio, SR, subtype="PCM_16")
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            progress("done", 1.0)
            return Result("audio", str(path), meta)
        return self._onto_video(audio, sound, Path(inputs[0]), info, out_dir, meta, progress, cancel)

    def _onto_video(self, audio, sound, video: Path, info, out_dir, meta, progress, cancel) -> Result:
        import soundfile as sf

        from generators.ffmpeg import sound_onto_video

        wav = _fresh(out_dir, f".{sound}_track", ".wav")
        out = _fresh(out_dir, f"{video.stem[:60]}_{sound}", ".mp4")
        try:
            sf.write(str(wav), audio, SR, subtype="PCM_16")
        except BaseException:
            wav.unlink(missing_ok=True)
            raise
        looped = info["duration_s"] > MAX_SYNTH_S
        got = sound_onto_video(video, wav, out, cancel, lambda stage, f: progress(stage, 0.8 + 0.2 * f),
                               mix=True, loop=looped, duration_s=info["duration_s"])
        progress("done", 1.0)
        meta = {**meta, "duration_s": round(got["duration_s"], 3), "width": got["width"], "height": got["height"],
                "has_audio": got["has_audio"], "mixed": info["has_audio"], "looped": looped}
        return Result("video", str(out), meta)
