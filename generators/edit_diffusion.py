"""Instruction image editing ("make it snow") with InstructPix2Pix.

Precise operations (crop, rotate, resize, ...) belong to the OpenCV backend;
this one follows the instruction in words, so a request that lists
operations is refused rather than half done.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from generators.base import RequestError, Result, no_progress
from generators.diffusion import DiffusionBackend, round8, save_atomic
from generators.registry import register

MAX_SIDE = 1024


def load_image(path: Path, max_side: int = MAX_SIDE):
    """The input as RGB, at most `max_side` on its longer side, both sides multiples of 8."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            image = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError):
        raise RequestError(f"cannot read {Path(path).name} as an image; send a PNG, JPEG or WebP") from None
    scale = min(1.0, max_side / max(image.size))
    size = (round8(image.width * scale, max_side), round8(image.height * scale, max_side))
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


@register("edit_image", "instruct-pix2pix", available=lambda **config: EditDiffusion.available(**config))
class EditDiffusion(DiffusionBackend):
    task, name = "edit_image", "instruct-pix2pix"
    pipeline_class = "StableDiffusionInstructPix2PixPipeline"
    default_model = "timbrooks/instruct-pix2pix"
    default_steps = 20

    def refusal(self, request: dict, inputs) -> str:
        if request.get("operations"):
            return ("exact operations (crop, rotate, resize, colour, text) are done by the opencv backend; "
                    "instruct-pix2pix only follows the instruction in words")
        if not inputs:
            return "editing needs an image: send one or make one first"
        return ""

    def run(self, request: dict, inputs: Sequence[Path], out_dir: Path, progress=no_progress,
            cancel=None) -> Result:
        self.check_request(request, inputs)
        image = load_image(inputs[0])
        out = self._generate(progress, cancel, "edited image", prompt=request["instruction"], image=image,
                             num_inference_steps=self.steps, generator=self.generator(), output_type="pil",
                             **self.guidance())
        edited = out.images[0]
        path = save_atomic(out_dir, "edit", ".png", lambda p: edited.save(p, format="PNG"))
        return Result("image", str(path), {"width": edited.width, "height": edited.height, "steps": self.steps,
                                           "seed": self.seed, "source": Path(inputs[0]).name,
                                           "backend": self.label})
