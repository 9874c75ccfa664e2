"""Classical 3D: a .glb scene composed of trimesh primitives, or a relief from a picture.

- `shapes` given: each SHAPE (box, sphere, cylinder, cone, capsule, torus, plane) is
  built centred on x/y/z (y up, glTF's convention), rotated about its centre by
  rotate_x, then rotate_y, then rotate_z degrees. Sizes default to 1 (width,
  height, depth); radius defaults to 0.5 so a default sphere fits a default box.
  Cylinders, cones and capsules stand along y; a torus lies flat (its height is
  the tube's thickness); a plane is width x depth, flat at y.
- no shapes: `shapes_from_prompt` (generators/_shapes.py) builds recognised objects.
- an image: a height field from its luminance (brighter is higher), coloured by it.
Colours go in as a PBR material's baseColorFactor (shapes; glTF wants linear
values, so the sRGB colour is linearised: red 220 is stored as ~183) or as the
picture itself, a baseColorTexture (relief); glTF viewers (three.js, babylon,
gradio's Model3D) show both.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from generators._shapes import dims, parse_color, rotation, shapes_from_prompt
from generators.base import Backend, GenerationError, RequestError, Result, check, validate
from generators.registry import register
from generators.tools import SHAPE

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
AUDIO_EXT = {".wav", ".mp3", ".ogg", ".flac", ".m4a", ".aac", ".opus", ".weba"}
VIDEO_EXT = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v"}
RELIEF_GRID = 128  # longest side of the height field, in vertices
RELIEF_TEXTURE = 512  # longest side of the picture kept as its texture
SMOOTH_DEG = 35.0  # faces meeting at less than this angle are shaded smoothly


def _to_y_axis():
    """4x4 turning trimesh's z-axis primitives to stand along y."""
    import trimesh
    return trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0])


def _primitive(s: dict):
    """The unit-placed primitive for a SHAPE dict, centred on the origin, before rotation."""
    import trimesh
    c, d, kind = trimesh.creation, dims(s), s["shape"]
    if kind == "box":
        return c.box(extents=[d["w"], d["h"], d["d"]])
    if kind == "plane":
        w, dd = d["w"] / 2, d["d"] / 2
        verts = [[-w, 0, -dd], [w, 0, -dd], [w, 0, dd], [-w, 0, dd]]
        return trimesh.Trimesh(verts, [[0, 2, 1], [0, 3, 2]], process=False)
    if kind == "sphere":
        m = c.icosphere(subdivisions=3, radius=1.0)
        m.apply_scale([d["w"] / 2, d["h"] / 2, d["d"] / 2])
        return m
    if kind == "cylinder":
        m = c.cylinder(radius=d["r"], height=d["h"], sections=48)
    elif kind == "cone":
        m = c.cone(radius=d["r"], height=d["h"], sections=48)
        m.apply_translation([0, 0, -d["h"] / 2])
    elif kind == "capsule":
        m = c.capsule(height=max(d["h"] - 2 * d["r"], 0.0), radius=d["r"], count=[32, 32])
    elif kind == "torus":
        m = c.torus(major_radius=d["r"], minor_radius=d["t"], major_sections=48, minor_sections=20)
    else:
        raise RequestError(f"unknown shape {kind!r}")
    return m.apply_transform(_to_y_axis())


def _auto_smooth(vertices: np.ndarray, faces: np.ndarray, angle_deg: float = SMOOTH_DEG):
    """Split every corner into its own vertex; its normal averages the faces at that
    point whose normals are within angle_deg (flat box sides, round sphere)."""
    tri = vertices[faces]
    fn_w = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # area-weighted
    fn = fn_w / np.maximum(np.linalg.norm(fn_w, axis=1, keepdims=True), 1e-12)
    cv, cf = faces.ravel(), np.repeat(np.arange(len(faces)), 3)
    order = np.argsort(cv, kind="stable")
    sv, sf = cv[order], cf[order]
    starts = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]])
    sizes = np.diff(np.r_[starts, len(sv)])
    gid = np.repeat(np.arange(len(starts)), sizes)
    reps = sizes[gid]
    a = np.repeat(np.arange(len(sv)), reps)
    b = np.repeat(starts[gid], reps) + np.arange(reps.sum()) - np.repeat(np.cumsum(reps) - reps, reps)
    keep = np.einsum("ij,ij->i", fn[sf[a]], fn[sf[b]]) > np.cos(np.radians(angle_deg))
    acc = np.zeros((len(sv), 3))
    np.add.at(acc, a[keep], fn_w[sf[b[keep]]])
    normals = np.zeros_like(acc)
    normals[order] = acc / np.maximum(np.linalg.norm(acc, axis=1, keepdims=True), 1e-12)
    return vertices[cv], np.arange(len(cv)).reshape(-1, 3), normals


def build_mesh(s: dict):
    """A SHAPE dict -> a placed, coloured trimesh.Trimesh with shading normals."""
    import trimesh
    from trimesh.visual import TextureVisuals
    from trimesh.visual.material import PBRMaterial

    rgb = parse_color(s.get("color"))
    m = _primitive(s)
    verts = np.asarray(m.vertices) @ rotation(s).T + [s.get("x", 0), s.get("y", 0), s.get("z", 0)]
    v, f, n = _auto_smooth(verts, np.asarray(m.faces))
    mesh = trimesh.Trimesh(v, f, process=False)
    mesh.vertex_normals = n
    mesh.visual = TextureVisuals(material=PBRMaterial(
        name=s.get("color") or "default", baseColorFactor=[*srgb_to_linear(rgb), 255], metallicFactor=0.0,
        roughnessFactor=0.6, doubleSided=s["shape"] == "plane"))
    return mesh


def srgb_to_linear(rgb) -> list[int]:
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return [int(v) for v in np.round(lin * 255)]


# --- relief from a picture ---

def _load_image(path: Path):
    """(grid colours in [0, 1], at most RELIEF_GRID a side; the picture for the texture)."""
    from PIL import Image, ImageOps
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            im = im.convert("RGB")
            im.thumbnail((RELIEF_TEXTURE, RELIEF_TEXTURE), Image.LANCZOS)
            grid = im.copy()
            grid.thumbnail((RELIEF_GRID, RELIEF_GRID), Image.LANCZOS)
            arr = np.asarray(grid, dtype=np.float64) / 255.0
    except (OSError, ValueError) as e:
        raise RequestError(f"can't read the picture {path.name}: {e}") from e
    if min(arr.shape[:2]) < 2:
        raise RequestError("the picture is too small to make a 3D relief from (need at least 2x2 pixels)")
    return arr, im


def relief_mesh(rgb: np.ndarray, texture=None, size: float = 2.0, relief: float = 0.3, base: float = 0.06):
    """A closed height field lying in x/z (image top is -z), longest side `size`,
    top at base + luminance * relief, textured with the picture (`texture`, a PIL
    image; default: the grid colours themselves)."""
    import trimesh
    from PIL import Image
    from trimesh.visual import TextureVisuals
    from trimesh.visual.material import PBRMaterial

    h, w = rgb.shape[:2]
    lum = rgb @ [0.2126, 0.7152, 0.0722]
    pad = np.pad(lum, 1, mode="edge")  # 3x3 blur: photos are noisy
    lum = sum(pad[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9
    sx, sz = size * w / max(w, h), size * h / max(w, h)
    xs, zs = np.meshgrid(np.linspace(-sx / 2, sx / 2, w), np.linspace(-sz / 2, sz / 2, h))
    top = np.stack([xs, base + relief * lum, zs], -1).reshape(-1, 3)
    bottom = top * [1, 0, 1]
    idx = np.arange(h * w).reshape(h, w)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    up = np.r_[np.c_[a, c, b], np.c_[b, c, d]]  # normals +y
    ring = np.r_[idx[0, :], idx[1:, -1], idx[-1, -2::-1], idx[-2:0:-1, 0]]  # border, clockwise seen from above
    nxt, off = np.roll(ring, -1), h * w
    sides = np.r_[np.c_[ring, nxt, ring + off], np.c_[nxt, nxt + off, ring + off]]
    faces = np.r_[up, up[:, ::-1] + off, sides]
    verts = np.r_[top, bottom]
    us, vs = np.meshgrid(np.linspace(0, 1, w), np.linspace(1, 0, h))  # trimesh's uv: v=1 is the image top
    uv = np.tile(np.stack([us, vs], -1).reshape(-1, 2), (2, 1))
    fn = np.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
    vn = np.zeros_like(verts)
    for k in range(3):
        np.add.at(vn, faces[:, k], fn)
    mesh = trimesh.Trimesh(verts, faces, process=False)
    mesh.vertex_normals = vn / np.maximum(np.linalg.norm(vn, axis=1, keepdims=True), 1e-12)
    if texture is None:
        texture = Image.fromarray(np.round(rgb * 255).astype(np.uint8))
    mesh.visual = TextureVisuals(uv=uv, material=PBRMaterial(
        name="picture", baseColorTexture=texture, metallicFactor=0.0, roughnessFactor=0.8))
    return mesh


def _media_kind(path: Path) -> str:
    ext = path.suffix.lower()
    for kind, exts in (("image", IMAGE_EXT), ("audio", AUDIO_EXT), ("video", VIDEO_EXT)):
        if ext in exts:
            return kind
    try:
        from PIL import Image
        with Image.open(path):
            return "image"
    except Exception:
        return "unknown"


@register("3d", "trimesh")
class TrimeshScene(Backend):
    """Text/shapes/image -> .glb with trimesh; no weights, CPU only."""

    task = "3d"
    name = "trimesh"

    def __init__(self, **config) -> None:
        self.config = config

    def can_do(self, request: dict, inputs: Sequence[Path]) -> bool:
        """Whether this backend can make it: explicit shapes, a picture, or a prompt it recognises."""
        kinds = {_media_kind(Path(p)) for p in inputs or ()}
        if kinds & {"audio", "video"}:
            return False
        if request.get("image"):
            return "image" in kinds
        if request.get("shapes"):
            return True
        try:
            return bool(shapes_from_prompt(request.get("prompt", "")))
        except RequestError:
            return False

    def run(self, request: dict, inputs: Sequence[Path], out_dir: Path, progress, cancel) -> Result:
        check(cancel)
        kinds = [(Path(p), _media_kind(Path(p))) for p in inputs or ()]
        for p, kind in kinds:
            if kind == "audio":
                raise RequestError("can't make 3D from audio; describe the object in words or send a picture")
            if kind == "video":
                raise RequestError("can't make 3D from video; send a still picture (extract a frame first) "
                                   "or describe the object in words")
        images = [p for p, kind in kinds if kind == "image"]
        if request.get("image"):
            if not images:
                raise RequestError("there is no picture to turn into 3D; send one, or describe the object")
            return self._relief(images[0], Path(out_dir), progress, cancel)
        shapes = [validate(SHAPE, s, f"shapes[{i}]") for i, s in enumerate(request.get("shapes") or [])]
        source = "shapes"
        if not shapes:
            shapes, source = shapes_from_prompt(request.get("prompt", "")), "prompt"
        for i, s in enumerate(shapes):
            try:
                parse_color(s.get("color"))
            except RequestError as e:
                raise RequestError(f"shapes[{i}]: {e}") from None
        import trimesh

        scene = trimesh.Scene()
        progress("building shapes", 0.0)
        for i, s in enumerate(shapes):
            check(cancel)
            name = f"{i:02d}_{s['shape']}"
            scene.add_geometry(build_mesh(s), node_name=name, geom_name=name)
            progress("building shapes", 0.85 * (i + 1) / len(shapes))
        return self._write(scene, Path(out_dir), "scene.glb", cancel, progress,
                           {"shapes": len(shapes), "source": source})

    def _relief(self, path: Path, out_dir: Path, progress, cancel) -> Result:
        import trimesh

        progress("reading picture", 0.0)
        rgb, texture = _load_image(path)
        check(cancel)
        progress("building relief", 0.4)
        scene = trimesh.Scene()
        scene.add_geometry(relief_mesh(rgb, texture), node_name="relief", geom_name="relief")
        check(cancel)
        return self._write(scene, out_dir, "relief.glb", cancel, progress,
                           {"shapes": 1, "source": "image", "grid": [rgb.shape[1], rgb.shape[0]]})

    def _write(self, scene, out_dir: Path, filename: str, cancel, progress, meta: dict) -> Result:
        progress("writing glb", 0.9)
        try:
            data = scene.export(file_type="glb", include_normals=True)
        except Exception as e:  # trimesh internals
            raise GenerationError(f"could not write the 3D model: {e}") from e
        check(cancel)
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / filename
        fd, tmp = tempfile.mkstemp(prefix=".scene-", suffix=".part", dir=out_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            check(cancel)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        geoms = list(scene.geometry.values())
        bounds = np.asarray(scene.bounds, dtype=float)
        progress("done", 1.0)
        return Result("model3d", str(target), meta={
            "backend": "trimesh", **meta, "vertices": int(sum(len(g.vertices) for g in geoms)),
            "faces": int(sum(len(g.faces) for g in geoms)), "bounds": (np.round(bounds, 4) + 0.0).tolist()})
