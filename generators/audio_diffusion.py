"""Text-to-audio with AudioLDM / AudioLDM2: a 16 kHz WAV; with a video, the video with that soundtrack.

The sound is generated for the video's length and muxed in with
imageio-ffmpeg's ffmpeg (video stream copied, AAC audio).
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Sequence

from generators.base import GenerationError, RequestError, Result, no_progress
from generators.diffusion import DiffusionBackend, save_atomic
from generators.registry import register

VIDEO_SUFFIXES = {".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi"}
MAX_SECONDS = 60.0


def video_seconds(path: Path) -> float:
    import imageio_ffmpeg

    try:
        _, seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    except (RuntimeError, OSError, ValueError, StopIteration):
        raise RequestError(f"cannot read {Path(path).name} as a video") from None
    if not seconds or seconds <= 0:
        raise RequestError(f"{Path(path).name} has no length to add sound to")
    return float(seconds)


def write_wav(path: Path, audio, rate: int) -> None:
    import numpy as np
    import soundfile

    soundfile.write(str(path), np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0), rate,
                    subtype="PCM_16", format="WAV")


def mux(video: Path, wav: Path, out: Path) -> None:
    """`video`'s picture with `wav` as its only sound, into MP4; re-encodes the picture only if it must."""
    import imageio_ffmpeg

    base = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(video), "-i", str(wav),
            "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart"]
    for picture in (["-c:v", "copy"], ["-c:v", "libx264", "-pix_fmt", "yuv420p"]):
        done = subprocess.run([*base, *picture, "-f", "mp4", str(out)], capture_output=True, text=True)
        if done.returncode == 0:
            return
    raise GenerationError(f"could not add the sound to {video.name}: {done.stderr.strip()[-300:]}")


@register("audio", "audioldm", available=lambda **config: AudioDiffusion.available(**config))
class AudioDiffusion(DiffusionBackend):
    task, name = "audio", "audioldm"
    default_model = "cvssp/audioldm2"
    default_steps = 50

    def refusal(self, request: dict, inputs) -> str:
        if request.get("notes"):
            return "exact notes are played by the synth backend; audioldm makes sound from words"
        if any(Path(p).suffix.lower() not in VIDEO_SUFFIXES for p in inputs):
            return "audioldm can add sound to a video only; other inputs cannot be used"
        return ""

    def run(self, request: dict, inputs: Sequence[Path], out_dir: Path, progress=no_progress,
            cancel=None) -> Result:
        self.check_request(request, inputs)
        videos = [Path(p) for p in inputs]
        seconds = min(MAX_SECONDS, video_seconds(videos[0])) if videos else float(request["seconds"])
        out = self._generate(progress, cancel, "sound", prompt=request["prompt"], audio_length_in_s=seconds,
                             num_inference_steps=self.steps, generator=self.generator(), **self.guidance())
        audio = out.audios[0]
        rate = int(self._pipe.vocoder.config.sampling_rate)
        meta = {"duration_s": len(audio) / rate, "sample_rate": rate, "steps": self.steps, "seed": self.seed,
                "backend": self.label}
        if not videos:
            path = save_atomic(out_dir, "sound", ".wav", lambda p: write_wav(p, audio, rate))
            return Result("audio", str(path), meta)
        wav = save_atomic(out_dir, ".sound", ".wav", lambda p: write_wav(p, audio, rate))
        try:
            path = save_atomic(out_dir, "video", ".mp4", lambda p: mux(videos[0], wav, p))
        finally:
            wav.unlink(missing_ok=True)
        return Result("video", str(path), {**meta, "duration_s": video_seconds(path), "source": videos[0].name})
