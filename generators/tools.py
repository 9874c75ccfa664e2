"""The tools the LLM can call: one typed `Tool` record each, with its JSON schema
(the subset in generators/base.py).

A tool's record holds every name it goes by: the tool (`generate_3d`), the
registry task its backends serve (`3d`), the media kind it makes (`model3d`),
the config field with its diffusion model (`model3d_model`) and the LLM's words
for it ("make 3D model"); the tables elsewhere derive from TOOLS. One schema per
tool; the same schema validates a call and constrains its decoding. Media
references ("image", "video") are strings the engine resolves: "last" (the
latest of that kind in the conversation), "first", "previous", or a file name
the user sent.
"""
from __future__ import annotations

from dataclasses import dataclass

from generators.base import MediaKind


@dataclass(frozen=True)
class Tool:
    name: str  # what the LLM calls: generate_3d
    task: str  # the registry task its backends serve: 3d
    task_title: str  # the task in words: text/image-to-3D
    kind: MediaKind  # what it makes (an edit of a video with new sound is still a video)
    words: str  # the LLM's words for it when it chooses a tool: make 3D model
    description: str
    schema: dict
    refs: tuple[tuple[str, MediaKind], ...] = ()  # (argument, kind) naming an earlier file of the conversation
    config_field: str = ""  # the GeneratorsConfig field with its diffusion model ("" : none)

REF = {"type": "string", "maxLength": 200, "default": "last",
       "description": "which earlier file: last, first, previous, or its file name"}
PROMPT = {"type": "string", "minLength": 1, "maxLength": 500, "description": "what to make, in words"}
COLOR = {"type": "string", "maxLength": 30, "description": "a colour name (purple) or #rrggbb"}

IMAGE_OPS = ["crop", "rotate", "flip", "resize", "brightness", "contrast", "saturation", "hue", "blur",
             "sharpen", "grayscale", "invert", "text", "background_blur", "background_remove", "recolor"]

IMAGE_OP = {
    "type": "object",
    "properties": {
        "op": {"type": "string", "enum": IMAGE_OPS},
        # rotate/hue: degrees; brightness/contrast/saturation: percent change (-100..100); blur/sharpen: strength
        "amount": {"type": "number", "minimum": -360, "maximum": 360},
        "width": {"type": "integer", "minimum": 1, "maximum": 8192},
        "height": {"type": "integer", "minimum": 1, "maximum": 8192},
        "aspect": {"type": "string", "maxLength": 10, "description": "crop to an aspect ratio, e.g. 1:1 or 16:9"},
        "x": {"type": "integer", "minimum": 0, "maximum": 8192},
        "y": {"type": "integer", "minimum": 0, "maximum": 8192},
        "direction": {"type": "string", "enum": ["horizontal", "vertical"]},
        "text": {"type": "string", "maxLength": 200},
        "position": {"type": "string", "enum": ["top", "center", "bottom"]},
        "target": {"type": "string", "enum": ["sky", "background", "foreground", "all"]},
        "color": COLOR,
    },
    "required": ["op"],
}

VIDEO_OPS = ["trim", "speed", "extract_frames", "to_gif", "reverse", "mute", "replace_audio"]

SHAPE = {
    "type": "object",
    "properties": {
        "shape": {"type": "string", "enum": ["box", "sphere", "cylinder", "cone", "capsule", "torus", "plane"]},
        "color": COLOR,
        "x": {"type": "number", "minimum": -100, "maximum": 100},
        "y": {"type": "number", "minimum": -100, "maximum": 100},
        "z": {"type": "number", "minimum": -100, "maximum": 100},
        "width": {"type": "number", "minimum": 0.01, "maximum": 100},
        "height": {"type": "number", "minimum": 0.01, "maximum": 100},
        "depth": {"type": "number", "minimum": 0.01, "maximum": 100},
        "radius": {"type": "number", "minimum": 0.01, "maximum": 100},
        "rotate_x": {"type": "number", "minimum": -360, "maximum": 360},
        "rotate_y": {"type": "number", "minimum": -360, "maximum": 360},
        "rotate_z": {"type": "number", "minimum": -360, "maximum": 360},
    },
    "required": ["shape"],
}

SOUNDS = ["auto", "speech", "rain", "wind", "ocean", "fire", "white_noise", "pink_noise", "brown_noise", "tone", "melody",
          "beep"]

_TOOLS = (
    Tool("generate_image", task="image", task_title="text-to-image", kind=MediaKind.IMAGE, words="draw image",
         description="Make a new picture from a description.",
         schema={"type": "object", "properties": {
            "prompt": PROMPT,
            "negative_prompt": {"type": "string", "maxLength": 300, "default": ""},
            "width": {"type": "integer", "minimum": 64, "maximum": 2048, "default": 512},
            "height": {"type": "integer", "minimum": 64, "maximum": 2048, "default": 512},
            "steps": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
            "seed": {"type": "integer", "minimum": 0, "maximum": 2 ** 31 - 1, "default": 0},
        }, "required": ["prompt"]},
         config_field="image_model"),
    Tool("edit_image", task="edit_image", task_title="image editing", kind=MediaKind.IMAGE, words="edit image",
         description="Change an image the user sent or one made earlier.",
         schema={"type": "object", "properties": {
            "image": REF,
            "instruction": {**PROMPT, "description": "the change, in the user's words"},
            "operations": {"type": "array", "items": IMAGE_OP, "maxItems": 8, "default": []},
        }, "required": ["instruction"]},
         refs=(("image", MediaKind.IMAGE),), config_field="edit_model"),
    Tool("generate_video", task="video", task_title="text/image-to-video", kind=MediaKind.VIDEO, words="make video",
         description="Make a short video clip from a description (or animate an image).",
         schema={"type": "object", "properties": {
            "prompt": PROMPT,
            "seconds": {"type": "number", "minimum": 0.5, "maximum": 20, "default": 2},
            "fps": {"type": "integer", "minimum": 1, "maximum": 30, "default": 8},
            "width": {"type": "integer", "minimum": 64, "maximum": 1024, "default": 256},
            "height": {"type": "integer", "minimum": 64, "maximum": 1024, "default": 256},
            "image": {**REF, "default": ""},
            "seed": {"type": "integer", "minimum": 0, "maximum": 2 ** 31 - 1, "default": 0},
        }, "required": ["prompt"]},
         refs=(("image", MediaKind.IMAGE),), config_field="video_model"),
    Tool("edit_video", task="edit_video", task_title="video editing", kind=MediaKind.VIDEO, words="edit video",
         description="Change a video: trim, speed up or slow down, reverse, mute, frames, GIF, new sound.",
         schema={"type": "object", "properties": {
            "video": REF,
            "operation": {"type": "string", "enum": VIDEO_OPS},
            "start_s": {"type": "number", "minimum": 0, "maximum": 36000, "default": 0},
            "end_s": {"type": "number", "minimum": 0, "maximum": 36000, "default": 0, "description": "0: the end"},
            "factor": {"type": "number", "minimum": 0.1, "maximum": 10, "default": 2},
            "count": {"type": "integer", "minimum": 1, "maximum": 100, "default": 4},
            "audio": {**REF, "default": ""},
        }, "required": ["operation"]},
         refs=(("video", MediaKind.VIDEO), ("audio", MediaKind.AUDIO))),
    Tool("generate_3d", task="3d", task_title="text/image-to-3D", kind=MediaKind.MODEL3D, words="make 3D model",
         description="Make a 3D model (.glb) from a description, optionally as a scene of simple shapes.",
         schema={"type": "object", "properties": {
            "prompt": PROMPT,
            "shapes": {"type": "array", "items": SHAPE, "maxItems": 32, "default": []},
            "image": {**REF, "default": ""},
        }, "required": ["prompt"]},
         refs=(("image", MediaKind.IMAGE),), config_field="model3d_model"),
    Tool("generate_audio", task="audio", task_title="text/video-to-audio", kind=MediaKind.AUDIO, words="make sound",
         description="Make a sound, music or ambience; with a video, add it to the video's soundtrack.",
         schema={"type": "object", "properties": {
            "prompt": PROMPT,
            "sound": {"type": "string", "enum": SOUNDS, "default": "auto"},
            "seconds": {"type": "number", "minimum": 0.1, "maximum": 60, "default": 5},
            "notes": {"type": "string", "maxLength": 200, "default": "", "description": "e.g. C4 E4 G4 C5"},
            "frequency": {"type": "number", "minimum": 20, "maximum": 20000, "default": 440},
            "video": {**REF, "default": "", "description": "a video to add the sound to"},
        }, "required": ["prompt"]},
         refs=(("video", MediaKind.VIDEO),), config_field="audio_model"),
)
TOOLS: dict[str, Tool] = {tool.name: tool for tool in _TOOLS}
BY_TASK: dict[str, Tool] = {tool.task: tool for tool in _TOOLS}
