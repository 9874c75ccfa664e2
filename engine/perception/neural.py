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

from engine.errors import Unavailable
from engine.llm.vlm_inputs import (ARCHS, DEFAULT_PROMPT, MAX_CHARS, SETTING, VIDEO_EXTS, VIDEO_PROMPT,
                                   image_inputs, load_processor, read_frames, video_inputs)
from engine.perception.base import Perception, check, mmss, stop_on_cancel


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
            proc = load_processor(where, config) if config is not None else None
        except (OSError, ValueError) as exc:
            raise Unavailable(f"could not load {self.model}: {str(exc).splitlines()[0][:200]}",
                              f"check the files, or set {SETTING} to another model") from exc
        if "device_map" not in kwargs:
            model = model.to(self.device)
        return model, proc

    # ---- inputs ------------------------------------------------------------------------------
    def prepare(self, path, cancel=None, timings: dict | None = None, prompt: str | None = None):
        """(kind, model inputs on the device, info) for one file; loads the model on first use."""
        from engine.perception.image_tools import load_image

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

