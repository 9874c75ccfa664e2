"""What the vision-language model reads: the chat template, the processor that packs video
frames, and the model inputs for images and sampled video frames.

Shared by the neural perception adapter (engine/perception/neural.py), the omni backbone
(engine/llm/omni.py) and the tiny random models (engine/llm/tiny_omni.py), so none of them
imports another's module for it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.errors import InputError

SETTING = "perception.vl_model"  # the setting that names the model (shown when it is missing)
_THINKER = "Qwen2_5OmniThinkerForConditionalGeneration"  # Omni's text-out half (no talker)
_THINKER3 = "Qwen3OmniMoeThinkerForConditionalGeneration"  # Qwen3-Omni's MoE thinker
ARCHS = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen2_5_omni": _THINKER, "qwen2_5_omni_thinker": _THINKER,
         "qwen3_omni_moe": _THINKER3, "qwen3_omni_moe_thinker": _THINKER3}
VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp"}
MAX_FRAMES = 8
IMAGE_MAX_PIXELS = 1280 * 28 * 28  # <= 1280 vision tokens, as qwen-vl-utils allows an image
FRAME_MAX_PIXELS = 360 * 420  # per video frame
MAX_ASPECT = 50  # thinner pictures are padded: the processor's limit is 200:1, and a strip is few tokens
MAX_CHARS = 2000  # of the description kept in the facts
DEFAULT_PROMPT = "Describe this image in detail, and quote any text you can read."
VIDEO_PROMPT = "Describe this video in detail: what happens, in order, and quote any text you can read."

# Qwen2-VL's chat template (one default system turn; image/video parts become placeholders)
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def frames_processor(tokenizer, image_processor, start, image, video, end):
    """Qwen2.5-VL's processor without a video processor (transformers' needs torchvision;
    video frames are packed here), with the model's own placeholder tokens."""
    from transformers import Qwen2_5_VLProcessor

    class FramesProcessor(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    template = (getattr(tokenizer, "chat_template", None) or TEMPLATE).replace("<|vision_start|>", start) \
        .replace("<|image_pad|>", image).replace("<|video_pad|>", video).replace("<|vision_end|>", end)
    proc = FramesProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                           chat_template=template)
    proc.image_token, proc.video_token = image, video
    proc.image_token_id, proc.video_token_id = (tokenizer.convert_tokens_to_ids(t) for t in (image, video))
    return proc


def _cap(im, max_pixels: int):
    """The PIL image scaled down (aspect kept) to at most max_pixels, and padded to at most
    MAX_ASPECT:1 first: Qwen2-VL's processor raises ValueError beyond 200:1 (a 1999x1 PNG)."""
    if max(im.size) > MAX_ASPECT * min(im.size):  # scaled to fit max_pixels once padded, then padded
        from PIL import Image

        from engine.perception.image_tools import pad_to_aspect

        s = min(1.0, (max_pixels * MAX_ASPECT) ** 0.5 / max(im.size))
        if s < 1.0:
            im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), 3)
        im = Image.fromarray(pad_to_aspect(np.asarray(im.convert("RGB")), MAX_ASPECT))
    if im.width * im.height <= max_pixels:
        return im
    s = (max_pixels / (im.width * im.height)) ** 0.5
    return im.resize((max(28, int(im.width * s)), max(28, int(im.height * s))), 3)  # 3: bicubic


def read_frames(path: Path, max_frames: int = MAX_FRAMES):
    """(RGB PIL frames sampled evenly, their times in s, duration in s or None). InputError if unreadable."""
    import cv2
    from PIL import Image

    if not path.is_file():
        raise InputError(f"could not read the video {path.name}: the file does not exist")
    cap, frames, times = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG), [], []
    try:
        total, fps = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), float(cap.get(cv2.CAP_PROP_FPS) or 0)
        wanted = np.unique(np.linspace(0, total - 1, min(max_frames, total)).round().astype(int)) if total > 0 \
            else range(max_frames)  # no frame count: the first frames
        for i in wanted:
            if total > 0:
                cap.set(cv2.CAP_PROP_POS_FRAMES, int(i))
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(_cap(Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])), FRAME_MAX_PIXELS))
            times.append(float(i) / fps if fps > 0 else float(len(times)))
    finally:
        cap.release()
    if not frames:
        raise InputError(f"could not read the video {path.name}: it is corrupt or not a video; try another file")
    return frames, times, (total / fps if total > 0 and fps > 0 else None)


def image_inputs(proc, text: str, images) -> dict:
    """A templated chat with one image placeholder per image -> the model's inputs."""
    return dict(proc(text=[text], images=[_cap(im, IMAGE_MAX_PIXELS) for im in images], return_tensors="pt"))


def video_inputs(proc, text: str, frames, times, duration) -> dict:
    """Frames -> the model's video inputs for a templated chat with one video placeholder: each
    frame through the image processor (one temporal slice), pairs stacked as temporal patches,
    the placeholder expanded."""
    import torch

    ip = proc.image_processor
    tp, merge, p = ip.temporal_patch_size, ip.merge_size, ip.patch_size
    frames = [f.resize(frames[0].size) for f in frames]
    frames += [frames[-1]] * (-len(frames) % tp)
    out = ip(frames, temporal_patch_size=1, return_tensors="pt")
    pv = torch.as_tensor(out["pixel_values"])
    _, gh, gw = (int(x) for x in out["image_grid_thw"][0])
    g = len(frames) // tp
    pv = pv.reshape(g, tp, gh * gw, -1, p * p).permute(0, 2, 3, 1, 4).reshape(g * gh * gw, -1)
    step = (duration / len(times)) if duration else (times[-1] - times[0]) / max(1, len(times) - 1) or 1.0
    text = text.replace(proc.video_token, proc.video_token * (g * gh * gw // merge ** 2), 1)
    enc = proc.tokenizer([text], return_tensors="pt")
    ids = enc["input_ids"]
    mm = (ids == proc.image_token_id).long() + 2 * (ids == proc.video_token_id).long()
    seconds = torch.tensor([tp * step], dtype=torch.float32)
    return {"input_ids": ids, "attention_mask": enc["attention_mask"], "mm_token_type_ids": mm,
            "pixel_values_videos": pv, "video_grid_thw": torch.tensor([[g, gh, gw]]),
            "second_per_grid_ts": seconds, "video_second_per_grid": seconds}


def load_processor(where: str, config):
    """The model's processor from a local or cached checkpoint; without torchvision (its video
    processor) one built from the tokenizer and image processor (frames_processor)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(where, local_files_only=True)
    except (ImportError, ValueError, TypeError, AttributeError):  # e.g. no torchvision for the video processor
        tok = AutoTokenizer.from_pretrained(where, local_files_only=True)
        cfg = getattr(config, "thinker_config", config)
        start, end = (tok.convert_ids_to_tokens(getattr(cfg, k, None) or 151652 + i)
                      for i, k in enumerate(("vision_start_token_id", "vision_end_token_id")))
        image, video = (tok.convert_ids_to_tokens(i) for i in (cfg.image_token_id, cfg.video_token_id))
        images = AutoImageProcessor.from_pretrained(where, local_files_only=True)
        return frames_processor(tok, images, start, image, video, end)
