"""Video editing with ffmpeg: trim, speed, extract_frames, to_gif, reverse, mute, replace_audio.

inputs[0] is the video; for replace_audio inputs[1] is the sound. Video results
are H.264/AAC mp4 (re-encoded where frame accuracy needs it, stream-copied
where nothing changes in the picture); extract_frames gives PNGs and to_gif a
palette-optimised GIF. A failed or cancelled run removes what it wrote.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from generators.base import Backend, Cancelled, GenerationError, RequestError, Result, check
from generators.ffmpeg import AAC, EVEN, H264, ffmpeg_exe, mux_audio, probe, run_ffmpeg
from generators.registry import register
from generators import ffmpeg as _ff

MAX_INPUT_S = 2 * 3600
MAX_REVERSE_S = 60
MAX_GIF_S = 60
GIF_MAX_WIDTH = 480
GIF_MAX_FPS = 15
MP4 = ["-movflags", "+faststart", "-f", "mp4"]


def atempo_chain(factor: float) -> list[float]:
    """Split a tempo factor into atempo stages, each within atempo's 0.5..2."""
    stages = []
    while factor > 2.0:
        stages.append(2.0)
        factor /= 2.0
    while factor < 0.5:
        stages.append(0.5)
        factor /= 0.5
    stages.append(factor)
    return stages


def has_audio_stream(path: Path) -> bool:
    proc = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, errors="replace", timeout=60)
    return ": Audio:" in proc.stderr


@dataclass
class _Job:
    src: Path
    info: dict
    out_dir: Path
    progress: Callable
    cancel: object
    made: list

    def target(self, tag: str, ext: str) -> Path:
        """A fresh output name next to earlier results, remembered for clean-up."""
        stem = f"{self.src.stem[:60]}_{tag}"
        path, n = self.out_dir / f"{stem}{ext}", 1
        while path.exists():
            n += 1
            path = self.out_dir / f"{stem}_{n}{ext}"
        self.made.append(path)
        return path


@register("edit_video", "ffmpeg", available=_ff.available)
class FFmpegVideoEditor(Backend):
    task = "edit_video"
    name = "ffmpeg"

    def __init__(self, **config) -> None:
        self.config = config

    def run(self, request: dict, inputs: Sequence[Path], out_dir: Path, progress, cancel) -> Result:
        op = request["operation"]
        if not inputs:
            raise RequestError("edit_video needs a video: send one or make one first")
        src = Path(inputs[0])
        check(cancel)
        progress("reading the video", 0.0)
        info = probe(src)
        if info["duration_s"] > MAX_INPUT_S:
            raise RequestError(f"the video is {info['duration_s'] / 3600:.1f} hours long; "
                               f"I edit videos up to {MAX_INPUT_S // 3600} hours")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        made: list[Path] = []  # every file this run writes, removed again if it fails
        job = _Job(src, info, out_dir, progress, cancel, made)
        try:
            result = getattr(self, "_" + op)(job, request, inputs)
            check(cancel)
        except BaseException:
            for path in made:
                path.unlink(missing_ok=True)
            raise
        progress("done", 1.0)
        return result

    # --- helpers ---


    def _video_result(self, out: Path, op: str, extra: dict | None = None) -> Result:
        if not out.is_file() or out.stat().st_size == 0:
            raise GenerationError(f"ffmpeg wrote no {op} result")
        got = probe(out)
        meta = {"duration_s": round(got["duration_s"], 3), "width": got["width"], "height": got["height"],
                "fps": got["fps"], "has_audio": got["has_audio"], "backend": self.name, "operation": op}
        return Result("video", str(out), {**meta, **(extra or {})})

    def _encode(self, args: list, out: Path, cancel, progress, duration: float, stage: str) -> None:
        run_ffmpeg([*args, *MP4, str(out)], cancel, progress, duration, stage=stage)

    # --- operations ---

    def _trim(self, job: _Job, request: dict, inputs) -> Result:
        src, info, progress, cancel = job.src, job.info, job.progress, job.cancel
        dur = info["duration_s"]
        start, end = float(request.get("start_s", 0)), float(request.get("end_s", 0))
        end = dur if end <= 0 else min(end, dur)
        if start >= dur:
            raise RequestError(f"the start ({start:g} s) is at or past the end of the {dur:.1f} s video")
        if end <= start:
            raise RequestError(f"the end ({end:g} s) must come after the start ({start:g} s)")
        length = end - start
        out = job.target("trim", ".mp4")
        self._encode(["-ss", f"{start:.3f}", "-i", str(src), "-t", f"{length:.3f}", "-map", "0:v:0",
                      "-map", "0:a:0?", "-vf", EVEN, *H264, *AAC], out, cancel, progress, length, "trimming")
        return self._video_result(out, "trim", {"start_s": start, "end_s": end})

    def _speed(self, job: _Job, request: dict, inputs) -> Result:
        src, info, progress, cancel = job.src, job.info, job.progress, job.cancel
        factor = float(request.get("factor", 2))
        if not 0.1 <= factor <= 10:
            raise RequestError(f"the speed factor must be between 0.1 and 10; got {factor:g}")
        length = info["duration_s"] / factor
        fps = min(info["fps"] or 25.0, 60.0)
        args = ["-i", str(src), "-map", "0:v:0", "-filter:v",
                f"setpts=(PTS-STARTPTS)/{factor:.6f},fps={fps:g},{EVEN}", *H264]
        if info["has_audio"]:
            tempo = ",".join(f"atempo={s:.6f}" for s in atempo_chain(factor))
            args += ["-map", "0:a:0", "-filter:a", tempo, *AAC]
        out = job.target(f"speed{factor:g}x", ".mp4")
        self._encode(args, out, cancel, progress, length, "changing speed")
        return self._video_result(out, "speed", {"factor": factor})

    def _extract_frames(self, job: _Job, request: dict, inputs) -> Result:
        src, info, progress, cancel = job.src, job.info, job.progress, job.cancel
        count = int(request.get("count", 4))
        if not 1 <= count <= 100:
            raise RequestError(f"I can take 1 to 100 frames; got {count}")
        dur, fps = info["duration_s"], info["fps"] or 25.0
        last = max(0.0, dur - 1.0 / fps)
        paths, times = [], []
        for i in range(count):
            check(cancel)
            progress("extracting frames", i / count)
            t = min(dur * (i + 0.5) / count, last)
            out = job.target(f"frame{i + 1:03d}", ".png")
            for at in (t, max(0.0, t - 1.0), 0.0):  # a seek right at the end can land after the last frame
                run_ffmpeg(["-ss", f"{at:.3f}", "-i", str(src), "-map", "0:v:0", "-frames:v", "1",
                            "-update", "1", "-f", "image2", str(out)], cancel)
                if out.is_file() and out.stat().st_size:
                    break
            else:
                raise GenerationError(f"ffmpeg could not take a frame at {t:.2f} s")
            paths.append(str(out))
            times.append(round(t, 3))
        meta = {"duration_s": dur, "width": info["width"], "height": info["height"], "has_audio": info["has_audio"],
                "backend": self.name, "operation": "extract_frames", "frames": paths, "times_s": times}
        return Result("image", paths[0], meta)

    def _to_gif(self, job: _Job, request: dict, inputs) -> Result:
        src, info, progress, cancel = job.src, job.info, job.progress, job.cancel
        dur = info["duration_s"]
        if dur > MAX_GIF_S:
            raise RequestError(f"the video is {dur:.0f} s long; I make GIFs of up to {MAX_GIF_S} s "
                               "(trim it first)")
        fps = min(GIF_MAX_FPS, info["fps"] or GIF_MAX_FPS)
        width = min(GIF_MAX_WIDTH, info["width"])
        height = max(1, round(info["height"] * width / info["width"]))
        graph = (f"fps={fps:g},scale={width}:-1:flags=lanczos,split[a][b];"
                 "[a]palettegen=stats_mode=diff[p];[b][p]paletteuse=dither=bayer:bayer_scale=4")
        out = job.target("gif", ".gif")
        run_ffmpeg(["-i", str(src), "-map", "0:v:0", "-vf", graph, "-loop", "0", "-f", "gif", str(out)],
                   cancel, progress, dur, stage="making the GIF")
        if not out.is_file() or out.stat().st_size == 0:
            raise GenerationError("ffmpeg wrote no GIF")
        meta = {"duration_s": dur, "width": width, "height": height, "fps": fps, "has_audio": False,
                "backend": self.name, "operation": "to_gif"}
        return Result("image", str(out), meta)

    def _reverse(self, job: _Job, request: dict, inputs) -> Result:
        src, info, progress, cancel = job.src, job.info, job.progress, job.cancel
        dur = info["duration_s"]
        if dur > MAX_REVERSE_S:
            raise RequestError(f"the video is {dur:.0f} s long; I reverse clips of up to {MAX_REVERSE_S} s "
                               "(reversing holds the whole clip in memory; trim it first)")
        args = ["-i", str(src), "-map", "0:v:0", "-vf", f"reverse,{EVEN}", *H264]
        if info["has_audio"]:
            args += ["-map", "0:a:0", "-af", "areverse", *AAC]
        out = job.target("reversed", ".mp4")
        self._encode(args, out, cancel, progress, dur, "reversing")
        return self._video_result(out, "reverse")

    def _mute(self, job: _Job, request: dict, inputs) -> Result:
        src, info, progress, cancel = job.src, job.info, job.progress, job.cancel
        out = job.target("muted", ".mp4")
        base = ["-i", str(src), "-map", "0:v:0", "-an"]
        try:
            self._encode([*base, "-c:v", "copy"], out, cancel, progress, info["duration_s"], "removing sound")
        except Cancelled:
            raise
        except GenerationError:  # a codec mp4 cannot carry: re-encode
            self._encode([*base, "-vf", EVEN, *H264], out, cancel, progress, info["duration_s"], "removing sound")
        return self._video_result(out, "mute")

    def _replace_audio(self, job: _Job, request: dict, inputs) -> Result:
        src, progress, cancel = job.src, job.progress, job.cancel
        if len(inputs) < 2:
            raise RequestError("replace_audio needs a sound file as well as the video")
        sound = Path(inputs[1])
        if not sound.is_file() or not has_audio_stream(sound):
            raise RequestError(f"could not read the sound {sound.name}: it has no audio I can use")
        out = job.target("new_audio", ".mp4")
        mux_audio(src, sound, out, cancel, progress)
        return self._video_result(out, "replace_audio")
