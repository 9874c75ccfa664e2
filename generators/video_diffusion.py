"""Text-to-video with TextToVideoSD (ModelScope), or AnimateDiff when a motion adapter is configured.

Frames are seconds * fps, at most MAX_FRAMES (these models lose coherence,
and memory grows, past a few dozen frames); the MP4 (H.264) is encoded in
this process with PyAV. No ffmpeg child: imageio-ffmpeg starts one with a
preexec_fn, and a fork with one from a process with many threads can hang
before exec (it did, in CI, for 300 s).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from generators.base import Result, check, no_progress
from generators.diffusion import DiffusionBackend, round8, save_atomic, weights_present
from generators.registry import register

MAX_FRAMES = 48


def write_mp4(path: Path, frames, fps: int, cancel=None) -> None:
    """frames: [N, H, W, 3] floats in [0, 1] or uint8 -> H.264 yuv420p MP4."""
    import av
    import numpy as np

    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height = width, height  # multiples of 8 (round8), as yuv420p needs
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            check(cancel)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


@register("video", "diffusion", available=lambda **config: VideoDiffusion.available(**config))
class VideoDiffusion(DiffusionBackend):
    task, name = "video", "diffusion"
    default_model = "ali-vilab/text-to-video-ms-1.7b"

    def __init__(self, *args, motion_adapter: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.motion_adapter = (os.environ.get("OMNI_GEN_VIDEO_MOTION_ADAPTER", "").strip()
                               if motion_adapter is None else motion_adapter)

    @classmethod
    def available(cls, model: str | None = None, motion_adapter: str | None = None) -> tuple[bool, str]:
        ok, why = super().available(model)
        adapter = os.environ.get("OMNI_GEN_VIDEO_MOTION_ADAPTER", "").strip() if motion_adapter is None \
            else motion_adapter
        if ok and adapter:
            found, where = weights_present(adapter, marker="config.json")
            if not found:
                return False, ("no motion adapter weights: set --set generators.video.motion_adapter=<local dir "
                               f"or hub id> (or OMNI_GEN_VIDEO_MOTION_ADAPTER); {where}")
        return ok, why

    def _from_pretrained(self, dtype):
        import diffusers

        if not self.motion_adapter:
            return diffusers.DiffusionPipeline.from_pretrained(self.model, torch_dtype=dtype, local_files_only=True)
        adapter = diffusers.MotionAdapter.from_pretrained(self.motion_adapter, torch_dtype=dtype,
                                                          local_files_only=True)
        pipe = diffusers.AnimateDiffPipeline.from_pretrained(self.model, motion_adapter=adapter, torch_dtype=dtype,
                                                             local_files_only=True)
        # the scheduler AnimateDiff's authors recommend
        pipe.scheduler = diffusers.DDIMScheduler.from_config(
            pipe.scheduler.config, beta_schedule="linear", clip_sample=False, timestep_spacing="linspace",
            steps_offset=1)
        return pipe

    def refusal(self, request: dict, inputs) -> str:
        if inputs:
            return ("the diffusion video backend makes clips from words only; animating an image needs an "
                    "image-to-video model")
        return ""

    def run(self, request: dict, inputs: Sequence[Path], out_dir: Path, progress=no_progress,
            cancel=None) -> Result:
        self.check_request(request, inputs)
        fps = int(request["fps"])
        frames = max(1, min(MAX_FRAMES, round(request["seconds"] * fps)))
        width, height = round8(request["width"], 1024), round8(request["height"], 1024)
        out = self._generate(progress, cancel, "video", prompt=request["prompt"], num_frames=frames,
                             width=width, height=height, num_inference_steps=self.steps,
                             generator=self.generator(request["seed"]), output_type="np", **self.guidance())
        video = out.frames[0]
        path = save_atomic(out_dir, "video", ".mp4", lambda p: write_mp4(p, video, fps, cancel))
        return Result("video", str(path), {"frames": len(video), "fps": fps, "duration_s": len(video) / fps,
                                           "width": width, "height": height, "steps": self.steps,
                                           "seed": request["seed"], "backend": self.label})
