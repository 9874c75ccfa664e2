"""Text-to-3D with Shap-E: a mesh with vertex colours, saved as .glb (Y up)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from generators.base import GenerationError, Result, no_progress
from generators.diffusion import DiffusionBackend, save_atomic
from generators.registry import register


def to_trimesh(mesh):
    """A diffusers MeshDecoderOutput -> trimesh.Trimesh, turned from Shap-E's Z up to glTF's Y up."""
    import numpy as np
    import trimesh

    verts = mesh.verts.detach().float().cpu().numpy()
    faces = mesh.faces.detach().cpu().numpy()
    colors = None
    if mesh.vertex_channels and all(c in mesh.vertex_channels for c in "RGB"):
        rgb = np.stack([mesh.vertex_channels[c].detach().float().cpu().numpy() for c in "RGB"], axis=1)
        colors = (np.clip(rgb, 0.0, 1.0) * 255).round().astype(np.uint8)
    out = trimesh.Trimesh(vertices=verts, faces=faces, vertex_colors=colors, process=False)
    # as in diffusers' Shap-E docs: rotate -90 degrees about X
    out.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0]))
    return out


@register("3d", "shap-e", available=lambda **config: ShapeDiffusion.available(**config))
class ShapeDiffusion(DiffusionBackend):
    task, name = "3d", "shap-e"
    pipeline_class = "ShapEPipeline"
    default_model = "openai/shap-e"
    denoiser = "prior"
    default_steps = 64
    default_guidance = 15.0

    def refusal(self, request: dict, inputs) -> str:
        if request.get("shapes"):
            return "a scene of simple shapes is built by the trimesh backend; shap-e makes one object from words"
        if inputs:
            return "shap-e here makes 3D from words only; 3D from an image needs shap-e-img2img"
        return ""

    def run(self, request: dict, inputs: Sequence[Path], out_dir: Path, progress=no_progress,
            cancel=None) -> Result:
        self.check_request(request, inputs)
        out = self._generate(progress, cancel, "3D model", prompt=request["prompt"], num_inference_steps=self.steps,
                             generator=self.generator(), output_type="mesh", **self.guidance())
        mesh = to_trimesh(out.images[0])
        if len(mesh.faces) == 0:
            raise GenerationError("shap-e made an empty shape; try another wording or seed")
        data = mesh.export(file_type="glb")
        path = save_atomic(out_dir, "model", ".glb", lambda p: p.write_bytes(data))
        return Result("model3d", str(path), {"vertices": len(mesh.vertices), "faces": len(mesh.faces),
                                             "steps": self.steps, "seed": self.seed, "backend": self.label})
