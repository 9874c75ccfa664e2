"""Shared ffmpeg helpers: find the binary, run it with progress and cancel, probe, mux.

ffmpeg is the system one when on PATH, else the static build that ships with
imageio-ffmpeg. Every run goes through `run_ffmpeg`, which reads
`-progress pipe:1` for the fraction done, kills the process as soon as
`cancel.cancelled` turns true, and turns a failure into a GenerationError
carrying ffmpeg's last stderr lines.
"""
from __future__ import annotations

import collections
import functools
import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Sequence

from generators.base import Cancelled, GenerationError, RequestError


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """The system `ffmpeg` if on PATH, else imageio-ffmpeg's bundled binary."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise GenerationError("ffmpeg is not installed: install ffmpeg or the imageio-ffmpeg package") from exc
    return imageio_ffmpeg.get_ffmpeg_exe()


def available() -> tuple[bool, str]:
    try:
        ffmpeg_exe()
        return True, ""
    except GenerationError as exc:
        return False, str(exc)


def _pump(stream, sink) -> None:
    for line in iter(stream.readline, ""):
        sink(line.rstrip("\n"))
    stream.close()


def _seconds(value: str) -> float | None:
    """out_time_us/out_time_ms (both microseconds) or out_time HH:MM:SS.ffffff."""
    try:
        if ":" in value:
            h, m, s = value.split(":")
            return int(h) * 3600 + int(m) * 60 + float(s)
        return int(value) / 1e6
    except ValueError:
        return None  # "N/A" before the first frame


def run_ffmpeg(args: Sequence[str], cancel=None, progress=None, duration_s: float | None = None,
               timeout_s: float = 600, stage: str = "encoding") -> None:
    """Run `ffmpeg <args>` (overwrite on, no stdin); report progress(stage, fraction) from
    out_time / duration_s; kill and raise Cancelled when cancel.cancelled; raise
    GenerationError with the tail of stderr on a non-zero exit or after timeout_s."""
    if cancel is not None and cancel.cancelled:
        raise Cancelled()
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-y", "-progress", "pipe:1", "-nostats", *map(str, args)]
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace")
    except OSError as exc:
        raise GenerationError(f"could not start ffmpeg: {exc}") from exc
    lines: queue.Queue = queue.Queue()
    tail: collections.deque = collections.deque(maxlen=12)
    readers = [threading.Thread(target=_pump, args=(proc.stdout, lines.put), daemon=True),
               threading.Thread(target=_pump, args=(proc.stderr, tail.append), daemon=True)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + timeout_s
    last = -1.0
    try:
        while True:
            if cancel is not None and cancel.cancelled:
                raise Cancelled()
            if time.monotonic() > deadline:
                raise GenerationError(f"ffmpeg took longer than {timeout_s:.0f} s and was stopped")
            try:
                line = lines.get(timeout=0.05)
            except queue.Empty:
                if proc.poll() is not None and not readers[0].is_alive() and lines.empty():
                    break
                continue
            key, _, value = line.partition("=")
            if progress and duration_s and key in ("out_time_us", "out_time"):
                t = _seconds(value.strip())
                if t is not None:
                    fraction = min(1.0, max(0.0, t / duration_s))
                    if fraction > last:
                        last = fraction
                        progress(stage, fraction)
        proc.wait()
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        raise
    finally:
        for reader in readers:
            reader.join(timeout=2)
    if proc.returncode != 0:
        detail = " | ".join(line.strip() for line in tail if line.strip())
        raise GenerationError(f"ffmpeg failed (exit {proc.returncode}): {detail[-800:]}")


_DURATION = re.compile(r"Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)")
_VIDEO = re.compile(r"Stream #\S+.*?: Video: (.*)")
_SIZE = re.compile(r"\b(\d{2,5})x(\d{2,5})\b")
_FPS = re.compile(r"([\d.]+)(k?) (?:fps|tbr)")


def probe(path: str | Path) -> dict:
    """{duration_s, width, height, fps, has_audio, codec} from `ffmpeg -i`'s report (cv2 as a
    fallback for a missing duration). RequestError when the file is not a readable video."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"could not read the video {path.name}: the file is missing")
    proc = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, errors="replace", timeout=60)
    report = proc.stderr
    video = _VIDEO.search(report)
    if video is None:
        why = "it has no video stream" if "Stream #" in report else "it is damaged or not a video format"
        raise RequestError(f"could not read the video {path.name}: {why}")
    spec = video.group(1)
    size = _SIZE.search(spec)
    fps_match = _FPS.search(spec)
    fps = float(fps_match.group(1)) * (1000 if fps_match.group(2) else 1) if fps_match else 0.0
    duration = None
    m = _DURATION.search(report)
    if m:
        duration = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    width, height = (int(size.group(1)), int(size.group(2))) if size else (0, 0)
    if not duration or not width or not fps:
        cv = _cv2_probe(path)
        duration = duration or cv.get("duration_s")
        width, height = (width, height) if width else (cv.get("width", 0), cv.get("height", 0))
        fps = fps or cv.get("fps", 0.0)
    if not duration or not width:
        raise RequestError(f"could not read the video {path.name}: its length or size is unknown")
    return {"duration_s": float(duration), "width": width, "height": height, "fps": fps or 25.0,
            "has_audio": bool(re.search(r"Stream #\S+.*?: Audio:", report)), "codec": spec.split(",")[0].split()[0]}


def _cv2_probe(path: Path) -> dict:
    try:
        import cv2
    except ImportError:
        return {}
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            return {}
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        frames = cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0
        return {"fps": fps, "width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
                "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                "duration_s": frames / fps if fps and frames else None}
    finally:
        cap.release()


def mux_audio(video: str | Path, wav: str | Path, out: str | Path, cancel=None, progress=None,
              mix: bool = False, loop: bool = False, duration_s: float | None = None) -> None:
    """Write `out` (mp4): `video`'s picture (stream copy, re-encoded only if mp4 cannot hold it)
    with `wav` as its sound track (AAC), padded with silence or cut to the video's length.
    mix=True mixes the new sound with the video's own audio instead (amix, which normalises
    by scaling each input by 1/2); loop=True repeats `wav` to fill a longer video."""
    info = probe(video)
    dur = duration_s or info["duration_s"]
    sound = ["-stream_loop", "-1"] if loop else []
    if mix and info["has_audio"]:
        graph = (f"[0:a:0]apad=whole_dur={dur:.3f}[o];[1:a:0]apad=whole_dur={dur:.3f}[s];"
                 f"[o][s]amix=inputs=2:duration=longest[a]")
    else:
        graph = f"[1:a:0]apad=whole_dur={dur:.3f}[a]"
    base = ["-i", str(video), *sound, "-i", str(wav), "-filter_complex", graph, "-map", "0:v:0", "-map", "[a]"]
    tail = ["-c:a", "aac", "-b:a", "160k", "-t", f"{dur:.3f}", "-movflags", "+faststart", "-f", "mp4", str(out)]
    try:
        run_ffmpeg([*base, "-c:v", "copy", *tail], cancel, progress, dur, stage="adding sound")
    except Cancelled:
        raise
    except GenerationError:  # a codec mp4 cannot carry: re-encode the picture
        run_ffmpeg([*base, "-vf", EVEN, *H264, *tail], cancel, progress, dur, stage="adding sound")


# the encoder settings every re-encoded mp4 uses (even sizes: yuv420p needs them)
EVEN = "scale=trunc(iw/2)*2:trunc(ih/2)*2"
H264 = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p"]
AAC = ["-c:a", "aac", "-b:a", "160k"]


def sound_onto_video(video: str | Path, wav: Path, out: Path, cancel=None, progress=None, mix: bool = False,
                     loop: bool = False, duration_s: float | None = None) -> dict:
    """mux_audio for a freshly made sound: `wav` is always deleted afterwards, `out` too if
    anything fails or is cancelled (no partial result is left). Returns probe(out)."""
    from generators.base import check

    try:
        mux_audio(video, wav, out, cancel, progress, mix=mix, loop=loop, duration_s=duration_s)
        check(cancel)
        return probe(out)
    except BaseException:
        Path(out).unlink(missing_ok=True)
        raise
    finally:
        Path(wav).unlink(missing_ok=True)
