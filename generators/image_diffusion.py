"""Text-to-image with a diffusers pipeline (SD, SDXL, SDXL-Turbo, ... via AutoPipelineForText2Image)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from generators.base import Result, no_progress
from generators.diffusion import DiffusionBackend, round8, save_atomic
from generators.registry import register


@register("image", "diffusion", available=lambda **config: ImageDiffusion.available(**config))
class ImageDiffusion(DiffusionBackend):
    task, name = "image", "diffusion"
    pipeline_class = "AutoPipelineForText2Image"
    default_model = "stabilityai/sdxl-turbo"

    def run(self, request: dict, inputs: Sequence[Path], out_dir: Path, progress=no_progress,
            cancel=None) -> Result:
        width, height = round8(request["width"]), round8(request["height"])
        steps, seed = request["steps"], request["seed"]
        out = self._generate(
            progress, cancel, "image", prompt=request["prompt"], negative_prompt=request["negative_prompt"] or None,
            width=width, height=height, num_inference_steps=steps, generator=self.generator(seed),
            output_type="pil", **self.guidance())
        image = out.images[0]
        path = save_atomic(out_dir, "image", ".png", lambda p: image.save(p, format="PNG"))
        return Result("image", str(path), {"width": image.width, "height": image.height, "steps": steps,
                                           "seed": seed, "backend": self.label})
