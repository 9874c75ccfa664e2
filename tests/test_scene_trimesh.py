"""The trimesh 3D backend: exact geometry, colours through .glb, prompt recipes, image relief, errors, cancel."""
from __future__ import annotations

import numpy as np
import pytest
import trimesh
from PIL import Image

from generators import registry
from generators._shapes import shapes_from_prompt
from generators.base import Cancelled, RequestError, validate
from generators.scene_trimesh import TrimeshScene
from generators.tools import SHAPE, TOOLS


class Flag:
    def __init__(self, after: int | None = None):
        self.after, self.reads = after, 0

    @property
    def cancelled(self) -> bool:
        self.reads += 1
        return self.after is not None and self.reads > self.after


def run(tmp_path, shapes=(), prompt="a scene", image="", inputs=(), cancel=None, progress=None):
    req = validate(TOOLS["generate_3d"].schema, {"prompt": prompt, "shapes": list(shapes), "image": image})
    return TrimeshScene().run(req, list(inputs), tmp_path / "out", progress or (lambda s, f: None),
                              cancel or Flag())


def load(result):
    scene = trimesh.load(result.path)
    assert isinstance(scene, trimesh.Scene)
    return scene


def color_of(geom) -> np.ndarray:
    return np.asarray(geom.visual.material.baseColorFactor[:3], dtype=int)


def test_registered_for_3d_and_says_what_it_can_do(tmp_path):
    assert "trimesh" in [e.name for e in registry.entries("3d")]
    gen, wav = TrimeshScene(), tmp_path / "a.wav"
    assert gen.can_do({"prompt": "a red cube", "shapes": [], "image": ""}, [])
    assert gen.can_do({"prompt": "x", "shapes": [{"shape": "box"}], "image": ""}, [])
    assert not gen.can_do({"prompt": "a photorealistic dragon", "shapes": [], "image": ""}, [])
    assert not gen.can_do({"prompt": "a cube", "shapes": [], "image": "last"}, [wav])


def test_box_position_and_size_survive_the_glb(tmp_path):
    res = run(tmp_path, [{"shape": "box", "width": 2, "x": 3}])
    assert res.kind == "model3d" and res.path.endswith(".glb") and res.meta["backend"] == "trimesh"
    assert res.meta["shapes"] == 1 and res.meta["vertices"] > 0 and res.meta["faces"] == 12
    b = load(res).bounds
    assert b == pytest.approx(np.array([[2, -0.5, -0.5], [4, 0.5, 0.5]]), abs=1e-5)
    assert np.array(res.meta["bounds"]) == pytest.approx(b, abs=1e-3)


def test_sphere_radius_and_centre(tmp_path):
    scene = load(run(tmp_path, [{"shape": "sphere", "radius": 1.5, "y": 2, "z": -1}]))
    (geom,) = scene.geometry.values()
    dist = np.linalg.norm(geom.vertices - [0, 2, -1], axis=1)
    assert dist == pytest.approx(np.full(len(dist), 1.5), abs=1e-5)
    assert scene.bounds == pytest.approx(np.array([[-1.5, 0.5, -2.5], [1.5, 3.5, 0.5]]), abs=1e-5)


def test_rotating_a_box_90_degrees_about_z_swaps_x_and_y(tmp_path):
    ext = load(run(tmp_path, [{"shape": "box", "width": 2, "height": 1, "depth": 0.5, "rotate_z": 90}])).extents
    assert ext == pytest.approx([1, 2, 0.5], abs=1e-5)


def test_primitives_stand_along_y_with_their_sizes(tmp_path):
    shapes = [{"shape": "cylinder", "radius": 0.5, "height": 2, "x": -6},
              {"shape": "cone", "radius": 1, "height": 3, "x": -3},
              {"shape": "capsule", "radius": 0.25, "height": 2},
              {"shape": "torus", "radius": 1, "height": 0.4, "x": 3},
              {"shape": "plane", "width": 4, "depth": 2, "x": 6}]
    scene = load(run(tmp_path, shapes))
    ext = {name.split("_")[1]: g.extents for name, g in scene.geometry.items()}
    assert ext["cylinder"] == pytest.approx([1, 2, 1], abs=1e-3)
    assert ext["cone"] == pytest.approx([2, 3, 2], abs=2e-2)
    assert ext["capsule"] == pytest.approx([0.5, 2, 0.5], abs=1e-2)
    assert ext["torus"] == pytest.approx([2.4, 0.4, 2.4], abs=1e-2)
    assert ext["plane"] == pytest.approx([4, 0, 2], abs=1e-6)
    cone = scene.geometry["01_cone"].vertices
    assert cone[cone[:, 1].argmax()][[0, 2]] == pytest.approx([-3, 0], abs=1e-6)  # tip up


def test_colours_survive_the_glb(tmp_path):
    scene = load(run(tmp_path, [{"shape": "box", "color": "red"}, {"shape": "sphere", "color": "#00ff00", "x": 2},
                                {"shape": "cone", "color": "Light Blue", "x": 4}]))
    red, green, blue = (color_of(scene.geometry[n]) for n in ("00_box", "01_sphere", "02_cone"))
    assert red[0] > 150 and red[1] < 40 and red[2] < 40
    assert list(green) == [0, 255, 0]
    assert blue[2] > blue[0] and blue[2] > blue[1]


def test_unknown_colour_and_shape_are_refused(tmp_path):
    with pytest.raises(RequestError, match="unknown colour 'sparkly'.*red"):
        run(tmp_path, [{"shape": "box", "color": "sparkly"}])
    with pytest.raises(RequestError, match="must be one of box, sphere"):
        validate(TOOLS["generate_3d"].schema, {"prompt": "x", "shapes": [{"shape": "pyramid"}]})
    with pytest.raises(RequestError, match="shapes\\[0\\].shape must be one of"):
        TrimeshScene().run({"prompt": "x", "shapes": [{"shape": "pyramid"}], "image": ""}, [], tmp_path,
                           lambda s, f: None, Flag())
    assert not list(tmp_path.glob("**/*.glb"))


def test_a_snowman_is_three_stacked_spheres_with_a_nose(tmp_path):
    shapes = shapes_from_prompt("make me a snowman")
    body = [s for s in shapes if s["shape"] == "sphere" and s["radius"] >= 0.2]
    assert len(body) == 3
    assert [s["y"] for s in body] == sorted(s["y"] for s in body) and len({s["y"] for s in body}) == 3
    assert body[0]["radius"] > body[1]["radius"] > body[2]["radius"]
    assert any(s["shape"] == "cone" and s["color"] == "orange" for s in shapes)
    res = run(tmp_path, prompt="make me a snowman")
    assert res.meta["shapes"] == len(shapes) and load(res).bounds[0][1] == pytest.approx(0, abs=1e-6)


def test_a_red_cube_and_three_blue_spheres(tmp_path):
    (cube,) = shapes_from_prompt("a red cube")
    assert cube["shape"] == "box" and cube["color"] == "red"
    scene = load(run(tmp_path, prompt="a red cube"))
    (geom,) = scene.geometry.values()
    c = color_of(geom)
    assert c[0] > 150 and c[1] < 40 and c[2] < 40
    balls = shapes_from_prompt("three blue spheres")
    assert len(balls) == 3 and all(s["shape"] == "sphere" and s["color"] == "blue" for s in balls)
    assert len({s["x"] for s in balls}) == 3 and len({s["y"] for s in balls}) == 1
    assert len(shapes_from_prompt("5 cubes")) == 5 and len(shapes_from_prompt("a stack of two cubes")) == 2


def test_on_puts_an_object_on_top_of_another():
    shapes = shapes_from_prompt("a blue ball on a green table")
    ball = [s for s in shapes if s["shape"] == "sphere"]
    table = [s for s in shapes if s["shape"] == "box"]
    assert len(ball) == 1 and ball[0]["color"] == "blue" and len(table) == 5
    assert all(s["color"] == "green" for s in table)
    top = max(s["y"] + s["height"] / 2 for s in table)
    assert ball[0]["y"] - ball[0]["radius"] == pytest.approx(top, abs=1e-6)


@pytest.mark.parametrize("prompt", ["a cube", "a box", "a ball", "a sphere", "a cylinder", "a soda can", "a cone",
                                    "a donut", "a torus", "a ring", "a snowman", "a table", "a house", "a tree",
                                    "a christmas tree", "a car", "a lamp", "a tower", "a lighthouse", "a rocket",
                                    "a chair", "a mushroom", "a capsule", "two houses on the ground"])
def test_recipes_are_valid_shapes(prompt):
    shapes = shapes_from_prompt(prompt)
    assert shapes and len(shapes) <= 32
    for s in shapes:
        assert validate(SHAPE, s) == s
    assert min(s["y"] for s in shapes if s["shape"] != "plane") > -1e-6


def test_recipes_keep_their_parts_and_take_the_colour():
    car = shapes_from_prompt("a yellow car")
    assert sum(s["shape"] == "cylinder" and s["color"] == "black" for s in car) == 4
    assert any(s["shape"] == "box" and s["color"] == "yellow" for s in car)
    tree = shapes_from_prompt("a tree")
    assert {(s["shape"], s["color"]) for s in tree} == {("cylinder", "brown"), ("sphere", "green")}
    assert [s["shape"] for s in shapes_from_prompt("can you make a table")].count("cylinder") == 0


def test_nonsense_prompt_lists_what_it_can_build(tmp_path):
    with pytest.raises(RequestError, match="I can build:.*snowman"):
        run(tmp_path, prompt="the meaning of life")


def make_image(path, w, h):
    a = np.zeros((h, w, 3), np.uint8)
    a[:, w // 2:] = 255  # right half bright
    a[: h // 2, : w // 2] = [200, 0, 0]  # top-left red
    Image.fromarray(a).save(path)
    return path


def test_image_relief_follows_aspect_and_brightness(tmp_path):
    img = make_image(tmp_path / "photo.png", 300, 150)
    res = run(tmp_path, prompt="turn this into a 3D model", image="last", inputs=[img])
    assert res.meta["grid"] == [128, 64] and res.meta["shapes"] == 1
    scene = load(res)
    (geom,) = scene.geometry.values()
    assert scene.extents[0] == pytest.approx(2 * scene.extents[2], rel=1e-6)
    assert geom.is_watertight
    v = geom.vertices
    top = v[:, 1] > 0.01
    left, right = top & (v[:, 0] < -0.2), top & (v[:, 0] > 0.2)
    assert v[right, 1].min() > v[left, 1].max()
    colors = geom.visual.to_color().vertex_colors
    corner = np.argmin(np.where(top, np.hypot(v[:, 0] + 1, v[:, 2] + 0.5), 9))  # image top-left
    assert colors[corner][0] > 150 and colors[corner][1] < 50


def test_audio_and_video_inputs_and_missing_pictures_are_refused(tmp_path):
    for name, kind in (("song.wav", "audio"), ("clip.mp4", "video")):
        f = tmp_path / name
        f.write_bytes(b"\0" * 16)
        with pytest.raises(RequestError, match=f"can't make 3D from {kind}"):
            run(tmp_path, prompt="make it 3d", image="last", inputs=[f])
    with pytest.raises(RequestError, match="no picture"):
        run(tmp_path, prompt="make it 3d", image="last")


@pytest.mark.parametrize("after", [0, 1, 3])
def test_cancel_leaves_no_glb(tmp_path, after):
    with pytest.raises(Cancelled):
        run(tmp_path, prompt="a house and a car", cancel=Flag(after))
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())


def test_cancel_relief_and_progress(tmp_path):
    img = make_image(tmp_path / "p.png", 40, 40)
    with pytest.raises(Cancelled):
        run(tmp_path, image="last", inputs=[img], cancel=Flag(1))
    assert not list(tmp_path.glob("out/*"))
    seen = []
    run(tmp_path, prompt="three balls", progress=lambda stage, f: seen.append(f))
    assert seen[-1] == 1.0 and seen == sorted(seen) and len(seen) >= 5
