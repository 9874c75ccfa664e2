"""The omni backbone: an LLM that looks at images and video itself.

When `llm.model` is a Qwen2.5-Omni, Qwen3-Omni-MoE or Qwen2.5-VL checkpoint (or
`tiny-omni`, `tiny-omni-moe`, `tiny-vl` in tests), the transformers backend
loads its thinker (the text-out half) and its processor, and a turn's attached
images or video go through that processor into the prompt: the answer is made
from the pixels, not from a description. The tokens each medium became are
known, so the MoE router statistics are split by modality (text / image /
video). Media of earlier turns stay in the conversation as the perception
tools' facts (text), which keeps the prompt short and the KV cache reusable.

One turn takes up to MAX_IMAGES images, or one video (sampled to
vlm_inputs.MAX_FRAMES frames; a video wins over images, which keep their facts).
Audio is heard through the perception tools (Whisper + sound labels).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

from engine.errors import InputError, Unavailable

MAX_IMAGES = 4
MODALITY_TOKENS = {"image": ("image_token_id", "image_token_index"), "video": ("video_token_id", "video_token_index")}


def read_config(where: Path, hub: bool) -> dict:
    """The checkpoint's config as a dict ({} when it cannot be read)."""
    try:
        if not hub:
            return json.loads((Path(where) / "config.json").read_text())
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(where), local_files_only=True).to_dict()
    except (OSError, ValueError):
        return {}


def is_omni(model_type: str) -> bool:
    from engine.llm.vlm_inputs import ARCHS

    return model_type in ARCHS


def is_moe_config(config: dict) -> bool:
    """Whether a config names routed experts (at any nesting: thinker, text)."""
    if any((config.get(k) or 0) > 1 for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        return True
    return any(is_moe_config(v) for v in config.values() if isinstance(v, dict))


TALKERS = {"qwen2_5_omni": "Qwen2_5OmniForConditionalGeneration"}  # thinker + talker + token2wav


def has_talker(model) -> bool:
    return bool(getattr(model, "has_talker", False)) and hasattr(model, "thinker")


def load_omni(where: str, model_type: str, kwargs: dict, processor=None, talker: bool = False):
    """(model, processor) of a local or cached checkpoint, with `kwargs` for from_pretrained:
    the thinker, or with `talker` (and a checkpoint that has one) the whole model."""
    import transformers

    from engine.llm.vlm_inputs import ARCHS, load_processor

    name = TALKERS[model_type] if talker and model_type in TALKERS else ARCHS[model_type]
    if name in TALKERS.values() and "quantization_config" in kwargs:  # the vocoder stays in full precision
        kwargs["quantization_config"].llm_int8_skip_modules = ["lm_head", "token2wav"]
    cls = getattr(transformers, name, None)
    if cls is None:
        raise Unavailable(f"transformers {transformers.__version__} has no {name}", "upgrade it")
    model = cls.from_pretrained(where, local_files_only=True, **kwargs)
    if processor is None:
        config = transformers.AutoConfig.from_pretrained(where, local_files_only=True)
        processor = load_processor(where, config)
    return model, processor


class OmniInputs:
    """Builds a turn's prompt with its media through the model's own processor."""

    def __init__(self, model, processor) -> None:
        self.model, self.proc = model, processor
        self.kinds = frozenset(("image", "video"))
        cfg = model.config
        self.token_ids = {kind: next((getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None), None)
                          for kind, keys in MODALITY_TOKENS.items()}
        self._params = inspect.signature(type(model).forward).parameters

    def build(self, messages, media) -> tuple[dict, dict, list[str]]:
        """(model inputs, {modality: token mask}, names of the files the model sees) for
        `messages` whose last user message gets the media."""
        from engine.perception.image_tools import load_image
        from engine.llm.vlm_inputs import image_inputs, read_frames, video_inputs

        videos = [r for r in media if r.kind == "video"][:1]
        images = [] if videos else [r for r in media if r.kind == "image"][:MAX_IMAGES]
        used = videos or images
        if not used:
            raise InputError("no image or video to look at")
        parts = [{"type": r.kind} for r in used]
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        chat = [dict(m) for m in messages]
        chat[last]["content"] = [*parts, {"type": "text", "text": chat[last]["content"]}]
        text = self.proc.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        if videos:
            frames, times, duration = read_frames(Path(videos[0].path))
            inputs = video_inputs(self.proc, text, frames, times, duration)
        else:
            inputs = image_inputs(self.proc, text, [load_image(Path(r.path), 2048)[0] for r in images])
        inputs = {k: v for k, v in inputs.items() if k in self._params}
        ids = inputs["input_ids"][0]
        masks = {kind: ids == tid for kind, tid in self.token_ids.items() if tid is not None and bool((ids == tid).any())}
        return inputs, masks, [r.name for r in used]


def reset_positions(model) -> None:
    """Forget the multimodal rotary offsets of the last media prompt (Qwen's mrope keeps them
    on the inner model), so the next prompt's positions are computed afresh."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None
