"""Image and video perception for the gpu profile: a vision-language model describes the media.

    p = VisionLanguageAdapter("Qwen/Qwen2.5-VL-7B-Instruct", quantization="4bit").perceive(path, out_dir, cancel)

Qwen2.5-VL or Qwen2.5-Omni's thinker (by the config's model_type) from a local directory
or the Hugging Face cache, never the network: NF4 4-bit (bitsandbytes) on CUDA, fp32 on
the CPU. Images go through the processor's chat template; videos are sampled to
MAX_FRAMES frames with OpenCV, each frame through the model's image processor, packed in
the model's video layout (2 frames per temporal patch, seconds per patch for the 3D rope):
no torchvision needed. Greedy decoding; `cancel` stops it between tokens.
`model="tiny"` builds a seeded random model of the same architecture (tests only,
engine/llm/tiny_omni.py). `image_inputs` / `video_inputs` are shared with the omni
backbone (engine/llm/omni.py), which answers from the media itself.
"""
from __future__ import annotations

import importlib.util
import inspect
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from engine.adapters.base import Perception, check, mmss, stop_on_cancel
from engine.errors import InputError, Unavailable

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

        from engine.adapters.image_tools import pad_to_aspect

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


class VisionLanguageAdapter:
    kind = "image"  # also reads video (VIDEO_EXTS)

    def __init__(self, model: str, device: str = "auto", quantization: str = "none", max_new_tokens: int = 128,
                 prompt: str = DEFAULT_PROMPT, model_obj=None, processor=None) -> None:
        if quantization not in ("none", "4bit"):
            raise ValueError(f"quantization {quantization!r}: choose none or 4bit")
        if device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device {device!r}: choose auto, cpu or cuda")
        import torch

        cuda = torch.cuda.is_available()
        if (device == "cuda" or quantization == "4bit") and not cuda:
            why = "4-bit quantization (bitsandbytes NF4)" if quantization == "4bit" else "device=cuda"
            raise Unavailable(f"{why} needs a CUDA GPU and none is visible",
                              "set quantization=none and device=cpu to run the model in fp32 on the CPU")
        self.model, self.quantization, self.prompt = str(model), quantization, prompt
        self.device = "cuda" if quantization == "4bit" or (device == "auto" and cuda) else device.replace("auto", "cpu")
        self.max_new_tokens = int(max_new_tokens)
        self._model, self._proc = model_obj, processor
        if (model_obj is None) != (processor is None):
            raise ValueError("pass both model_obj and processor, or neither")
        self._lock = threading.Lock()

    # ---- loading -----------------------------------------------------------------------------
    def _loaded(self, timings: dict):
        with self._lock:
            if self._model is None:
                t = time.perf_counter()
                self._model, self._proc = self._load()
                timings["model_load"] = round((time.perf_counter() - t) * 1000, 1)
            elif self._model.device.type != self.device and self.quantization == "none":
                self._model = self._model.to(self.device)  # an injected model
            return self._model, self._proc

    def _load(self):
        if self.model == "tiny":
            from engine.llm.tiny_omni import build_tiny_vlm

            model, proc = build_tiny_vlm(0)
            if self.quantization == "none":
                return model.to(self.device), proc
            with tempfile.TemporaryDirectory() as d:  # the real load path: weights on disk -> NF4 on the GPU
                model.save_pretrained(d)
                return self._from_dir(d, model.config.model_type)[0], proc
        import transformers

        try:
            config = transformers.AutoConfig.from_pretrained(self.model, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise Unavailable(
                f"no vision-language model {self.model!r} here: not a local directory and not in the Hugging Face "
                f"cache ({str(exc).splitlines()[0][:160]})",
                f"set {SETTING} to a local Qwen2.5-VL or Qwen2.5-Omni directory, or download it first "
                "(huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct)") from None
        return self._from_dir(self.model, config.model_type, config)

    def _from_dir(self, where: str, model_type: str, config=None):
        import torch
        import transformers

        if model_type not in ARCHS:
            raise Unavailable(f"{self.model} is a {model_type} model; this adapter reads {', '.join(ARCHS)}",
                              f"set {SETTING} to a Qwen2.5-VL or Qwen2.5-Omni model")
        cls = getattr(transformers, ARCHS[model_type], None)
        if cls is None:
            raise Unavailable(f"transformers {transformers.__version__} has no {ARCHS[model_type]}", "upgrade it")
        half = torch.bfloat16 if self.device == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
        kwargs: dict = {"local_files_only": True, "dtype": torch.float32 if self.device == "cpu" else half}
        if self.quantization == "4bit":
            if importlib.util.find_spec("bitsandbytes") is None:
                raise Unavailable("4-bit quantization needs bitsandbytes, which is not installed",
                                  "pip install '.[gpu]', or set quantization=none")
            kwargs.update(device_map={"": 0}, quantization_config=transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=half))
        try:
            model = cls.from_pretrained(where, **kwargs).eval()
            proc = self._processor(where, config) if config is not None else None
        except (OSError, ValueError) as exc:
            raise Unavailable(f"could not load {self.model}: {str(exc).splitlines()[0][:200]}",
                              f"check the files, or set {SETTING} to another model") from exc
        if "device_map" not in kwargs:
            model = model.to(self.device)
        return model, proc

    @staticmethod
    def _processor(where: str, config):
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

    # ---- inputs ------------------------------------------------------------------------------
    def prepare(self, path, cancel=None, timings: dict | None = None, prompt: str | None = None):
        """(kind, model inputs on the device, info) for one file; loads the model on first use."""
        from engine.adapters.image_tools import load_image

        path = Path(path)
        timings = {} if timings is None else timings
        check(cancel)
        model, proc = self._loaded(timings)
        check(cancel)
        t = time.perf_counter()
        kind = "video" if path.suffix.lower() in VIDEO_EXTS else "image"
        if kind == "video":
            frames, times, duration = read_frames(path)
            text = self._chat(proc, "video", prompt or (VIDEO_PROMPT if self.prompt == DEFAULT_PROMPT else self.prompt))
            inputs = video_inputs(proc, text, frames, times, duration)
            info = {"frames": len(frames), "frame_times_s": [round(x, 2) for x in times],
                    "duration_s": round(duration, 2) if duration else None, "size": list(frames[0].size)}
        else:
            im, size = load_image(path, 2048)
            inputs = image_inputs(proc, self._chat(proc, "image", prompt or self.prompt), [im])
            info = {"size": list(size)}
        params = inspect.signature(type(model).forward).parameters  # the class: hooks wrap the instance
        inputs = {k: v for k, v in inputs.items() if k in params}
        ids = inputs["input_ids"]
        vision_ids = [getattr(model.config, k, None) for k in ("image_token_id", "video_token_id")]
        info["vision_tokens"] = int(sum((ids == i).sum() for i in vision_ids if i is not None))
        timings["preprocess"] = round((time.perf_counter() - t) * 1000, 1)
        return kind, {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()}, info

    @staticmethod
    def _chat(proc, kind: str, prompt: str) -> str:
        return proc.apply_chat_template([{"role": "user", "content": [{"type": kind}, {"type": "text", "text": prompt}]}],
                                        tokenize=False, add_generation_prompt=True)

    # ---- the adapter -------------------------------------------------------------------------
    def perceive(self, path, out_dir, cancel=None, question: str = "") -> Perception:
        """With a `question` (the user's words), the model describes the file and answers it
        from what it sees: the media go through the model's own processor with the question."""
        import torch
        from transformers import StoppingCriteriaList

        path = Path(path)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        prompt = f"{self.prompt} Then answer the user's question about it: {question.strip()}" \
            if question.strip() else None
        kind, inputs, info = self.prepare(path, cancel, timings, prompt)
        check(cancel)
        t = time.perf_counter()
        with self._lock, torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                       num_beams=1, stopping_criteria=StoppingCriteriaList([stop_on_cancel(cancel)]))
        new = out[0, inputs["input_ids"].shape[1]:]
        text = " ".join(self._proc.tokenizer.decode(new, skip_special_tokens=True).split())
        text = text if len(text) <= MAX_CHARS else text[:MAX_CHARS].rsplit(" ", 1)[0] + " ..."
        timings["generate"] = round((time.perf_counter() - t) * 1000, 1)
        timings["total"] = round((time.perf_counter() - t0) * 1000, 1)
        data = {"model": self.model, "arch": self._model.config.model_type, "description": text,
                "tokens": int(len(new)), "question": question.strip(), **info}
        shown = text or "(the model gave no description)"
        span = f"{mmss(info['duration_s'])}, " if info.get("duration_s") else ""
        facts = f"Video {path.name} ({span}{info['frames']} frames looked at): {shown}" if kind == "video" \
            else f"Image {path.name}: {shown}"
        return Perception(kind=kind, name=path.name, facts=facts, data=data, timings_ms=timings)


def __getattr__(name: str):  # the tiny builders live with the other tiny models
    if name in ("build_tiny_vlm", "build_tiny_processor", "TINY_SPECIALS"):
        from engine.llm import tiny_omni

        return getattr(tiny_omni, "SPECIALS" if name == "TINY_SPECIALS" else name)
    raise AttributeError(name)
