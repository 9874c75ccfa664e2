#!/usr/bin/env python3
"""The omni backbone in 4-bit with a picture in the prompt, and the GPU hand-off to diffusion.

A Qwen2.5-Omni-3B-shaped thinker with RANDOM weights (speed and memory are honest,
answers are not), built in code: text model hidden 2048, 36 layers, 16 heads / 2 KV
heads, MLP 11008, vocabulary 151936 (an untied fp16 lm_head); vision tower 32 blocks of 1280
into 2048; audio encoder 32 layers of 1280. It is written as a Qwen2.5-Omni checkpoint
(qwen2_5_omni config, thinker.* weights in fp16, tokenizer, Qwen2-VL image processor
with its real pixel limits) and loaded the way the gpu profile loads a downloaded one:
engine.llm.load_backend with quantization=4bit (bitsandbytes NF4 linear layers, fp16
compute), device=cuda. The tokenizer is character-level with filler tokens up to the
real vocabulary, so every id the model picks decodes to text; the end-of-turn token is
suppressed so every answer decodes all --new-tokens.

backbone: one 640x480 picture and a question through the engine's own token loop
(TransformersBackend.generate): time to first token (processor, vision tower and
prefill), decode tok/s, the picture's tokens, peak VRAM; one warm-up turn, then --runs.
handoff: what engine/tools/run.py does around a diffusion tool call: the LLM parks
(park(): weights to CPU memory), an InstructPix2Pix pipeline at its real size
(bench/diffusion.py) loads and runs 2 steps, the LLM answers again with the pipeline
still resident (as the engine leaves it), the pipeline unloads; VRAM at each point,
the time to bring the LLM back, and whether the answer is the same as before.

On CPU (--shape scaled, the default there): a small thinker in float32, no quantization,
park(force=True) and the tiny edit pipeline: a check of this script, not figures.

    python bench/omni.py [--shape auto|full|scaled] [--runs 2] [--new-tokens 64] [--out PATH]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffusion import Weights, build_instruct_pix2pix  # noqa: E402  (bench/diffusion.py)

MiB = 1 << 20
VOCAB = 151936
FULL = {  # Qwen/Qwen2.5-Omni-3B's thinker
    "text": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                 num_key_value_heads=2, max_position_embeddings=32768,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
    "vision": dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                   window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
    "audio": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, num_mel_bins=128,
                  output_dim=2048, max_source_positions=1500, n_window=100),
}
SCALED = {
    "text": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]}),
    "vision": dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256,
                   window_size=112, fullatt_block_indexes=[1]),
    "audio": dict(d_model=64, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=128, num_mel_bins=128,
                  output_dim=256, max_source_positions=1500, n_window=100),
}
IMAGE_SIZE = (640, 480)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is in this picture?"}]


class Rec:  # what the engine passes for an attachment: a stored MediaRecord's kind, path and name
    def __init__(self, kind: str, path: Path) -> None:
        self.kind, self.path, self.name = kind, str(path), path.name


# Qwen2.5-Omni's own special tokens, so the checkpoint loads the way a downloaded one does whether
# AutoProcessor builds Qwen2_5OmniProcessor (torchvision installed) or the engine falls back to its
# frames processor (no torchvision)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_bos|>", "<|vision_eos|>", "<|IMAGE|>", "<|VIDEO|>",
            "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>", "<unk>"]


def processor(vocab_size: int):
    """The tiny omni processor's char-level tokenizer with Qwen2.5-Omni's specials, filled up to
    `vocab_size` with visible filler tokens, and a Qwen2-VL image processor with real pixel limits."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from engine.llm.vlm_inputs import TEMPLATE, frames_processor
    from engine.llm.tiny import _byte_of

    keep = sorted(c for c in pre_tokenizers.ByteLevel.alphabet() if _byte_of(c) in set(range(32, 127)) | {10})
    names = SPECIALS + keep
    names += [f"w{i}" for i in range(vocab_size - len(names))]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(names)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<unk>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATE.replace("<|vision_start|>", "<|vision_bos|>").replace(
        "<|vision_end|>", "<|vision_eos|>").replace("<|image_pad|>", "<|IMAGE|>").replace("<|video_pad|>", "<|VIDEO|>")
    images = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    return frames_processor(fast, images, "<|vision_bos|>", "<|IMAGE|>", "<|VIDEO|>", "<|vision_eos|>")


def write_checkpoint(where: Path, shape: dict, device, dtype) -> dict:
    """A random Qwen2.5-Omni thinker of `shape`, saved as the checkpoints ship (thinker.* weights)."""
    import transformers
    from safetensors.torch import save_file

    proc = processor(VOCAB)
    tok = proc.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    config = transformers.Qwen2_5OmniThinkerConfig(
        text_config=dict(shape["text"], vocab_size=VOCAB, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=shape["vision"], audio_config=shape["audio"],
        image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"], audio_token_index=ids["<|AUDIO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        user_token_id=tok.convert_tokens_to_ids("u"),
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        position_id_per_seconds=25)
    t0 = time.perf_counter()
    model = Weights(device, dtype)(transformers.Qwen2_5OmniThinkerForConditionalGeneration, config)
    params = sum(p.numel() for p in model.parameters())
    built = time.perf_counter() - t0
    where.mkdir(parents=True, exist_ok=True)
    transformers.Qwen2_5OmniConfig(thinker_config=config.to_dict(), enable_audio_output=False).save_pretrained(where)
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id = ids["<|im_end|>"], ids["<|endoftext|>"]
    gen.suppress_tokens = [ids[t] for t in SPECIALS]  # every answer decodes all its tokens, all visible text
    gen.save_pretrained(where)
    state, seen = {}, set()
    for k, v in model.state_dict().items():  # (a tied tensor is saved once, as safetensors wants)
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            state[f"thinker.{k}"] = v.detach().to("cpu", torch.float16).contiguous()
    del model
    release()
    save_file(state, str(where / "model.safetensors"), metadata={"format": "pt"})
    del state
    tok.save_pretrained(where)
    proc.image_processor.save_pretrained(where)
    return {"params_b": round(params / 1e9, 3), "build_s": round(built, 1),
            "save_s": round(time.perf_counter() - t0 - built, 1),
            "checkpoint_mb": round(sum(f.stat().st_size for f in where.iterdir()) / MiB, 1)}


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def mb(n: int) -> float:
    return round(n / MiB, 1)


def vram() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def answer(backend, image: Path, new_tokens: int) -> dict:
    """One turn through the engine's token loop: the text, time to first token, decode tok/s."""
    from engine.events import TextDelta
    from engine.llm.base import GenParams

    params = GenParams(max_new_tokens=new_tokens, temperature=0.0)
    start = time.perf_counter()
    first = None
    text = []
    gen = backend.generate(MESSAGES, [Rec("image", image)], params)
    while True:
        try:
            event = next(gen)
        except StopIteration as stop:
            usage = stop.value
            break
        if isinstance(event, TextDelta):
            first = first or time.perf_counter()
            text.append(event.text)
    end = time.perf_counter()
    decoded = usage["completion_tokens"] - 1
    return {"text": "".join(text), "ttft_ms": round((first - start) * 1000, 1) if first else None,
            "decode_tok_s": round(decoded / (end - first), 2) if first and decoded > 0 else None,
            "prompt_tokens": usage["prompt_tokens"], "image_tokens": usage.get("media_tokens", {}).get("image"),
            "completion_tokens": usage["completion_tokens"]}


def backbone(backend, image: Path, runs: int, new_tokens: int) -> dict:
    answer(backend, image, new_tokens)  # warm-up: kernels, the processor
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rows = [answer(backend, image, new_tokens) for _ in range(runs)]
    res = {"ttft_ms": statistics.median(r["ttft_ms"] for r in rows),
           "decode_tok_s": statistics.median(r["decode_tok_s"] for r in rows),
           "ttft_ms_runs": [r["ttft_ms"] for r in rows], "decode_tok_s_runs": [r["decode_tok_s"] for r in rows],
           **{k: rows[0][k] for k in ("prompt_tokens", "image_tokens", "completion_tokens")},
           "same_answer_every_run": len({r["text"] for r in rows}) == 1, "answer_start": rows[0]["text"][:60]}
    if torch.cuda.is_available():
        res["peak_vram_mb"] = mb(torch.cuda.max_memory_allocated())
    return res


def handoff(backend, image: Path, new_tokens: int, device, tiny: bool) -> dict:
    """park -> a pipeline loads and runs -> the LLM answers (pipeline still resident) -> unload."""
    from generators.edit_diffusion import EditDiffusion

    before = answer(backend, image, new_tokens)["text"]
    res = {"vram_llm_mb": mb(vram())}
    t = time.perf_counter()
    freed = backend.park(force=not torch.cuda.is_available())
    release()
    res.update(park_s=round(time.perf_counter() - t, 2), freed_mb=mb(freed), vram_after_park_mb=mb(vram()))
    if tiny:
        from generators.tiny_diffusion import tiny_pipeline

        pipe = tiny_pipeline("edit_image")
    else:
        pipe = build_instruct_pix2pix(Weights(device, torch.float16))
    editor = EditDiffusion(model="instruct-pix2pix (random weights)", pipeline=pipe, device=device.type, steps=2)
    del pipe
    editor.load()
    from PIL import Image

    side = 64 if tiny else 512
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    editor._generate(lambda stage, f: None, None, "edited image", prompt="make it snow",
                     image=Image.new("RGB", (side, side), (90, 140, 200)), num_inference_steps=2,
                     generator=editor.generator(), output_type="pil")
    res.update(pipeline_run_s=round(time.perf_counter() - t, 2), vram_with_pipeline_mb=mb(vram()))
    if torch.cuda.is_available():
        res["pipeline_peak_mb"] = mb(torch.cuda.max_memory_allocated())
    t = time.perf_counter()
    backend.ready()  # what the next turn's generate() does first
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    res["restore_s"] = round(time.perf_counter() - t, 2)
    after = answer(backend, image, new_tokens)["text"]
    res.update(vram_llm_and_pipeline_mb=mb(vram()), same_answer=after == before)
    editor.unload()
    release()
    res["vram_after_unload_mb"] = mb(vram())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description="The omni backbone in 4-bit with a picture, and the GPU hand-off.")
    ap.add_argument("--shape", default="auto", choices=["auto", "full", "scaled"])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--quantization", default="auto", choices=["auto", "none", "4bit"],
                    help="auto: 4bit on CUDA, none on CPU (bitsandbytes' CPU backend is slow)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "omni.json"))
    args = ap.parse_args()
    started = time.perf_counter()
    import transformers

    from engine.config import LLMConfig
    from engine.llm import load_backend

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape_name = args.shape if args.shape != "auto" else ("full" if cuda else "scaled")
    shape = FULL if shape_name == "full" else SCALED
    quant = args.quantization if args.quantization != "auto" else ("4bit" if cuda else "none")
    result = {"bench": "omni", "device": device.type,
              "device_name": torch.cuda.get_device_name() if cuda else platform.machine(), "shape": shape_name,
              "architecture": "Qwen2_5OmniThinkerForConditionalGeneration", "weights": "random", "config": shape,
              "quantization": f"{quant} (engine.llm.load_backend: bitsandbytes NF4 layers)" if quant == "4bit"
              else quant,
              "image": f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} random pixels", "new_tokens": args.new_tokens,
              "runs": args.runs,
              "torch": torch.__version__, "transformers": transformers.__version__, "partial": True}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shm = Path("/dev/shm")  # the checkpoint is written once and read once: RAM when there is room
    base = shm if shm.is_dir() and shutil.disk_usage(shm).free > 24 * 2**30 else None
    tmp = Path(tempfile.mkdtemp(prefix="omni-bench-", dir=base))
    try:
        image = tmp / "picture.png"
        from PIL import Image

        rng = np.random.RandomState(0)
        Image.fromarray((rng.rand(IMAGE_SIZE[1], IMAGE_SIZE[0], 3) * 255).astype("uint8")).save(image)
        result["checkpoint"] = write_checkpoint(tmp / "ckpt", shape, device, torch.float16 if cuda else torch.float32)
        t = time.perf_counter()
        backend = load_backend(LLMConfig(model=str(tmp / "ckpt"), quantization=quant, device=device.type,
                                         temperature=0.0, context_tokens=8192), tmp / "cache")
        result["load_s"] = round(time.perf_counter() - t, 1)
        result["weights_mb"] = mb(backend.model.get_memory_footprint())
        result["linear_4bit"] = sum(type(m).__name__ == "Linear4bit" for m in backend.model.modules())
        result["processor"] = type(backend.omni.proc).__name__  # the checkpoint's own, or the engine's fallback
        try:
            result["backbone"] = backbone(backend, image, args.runs, args.new_tokens)
        except Exception as exc:  # noqa: BLE001 - report, then try the hand-off
            result["backbone"] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
        print(f"backbone: {json.dumps(result['backbone'])}", file=sys.stderr, flush=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        try:
            result["handoff"] = handoff(backend, image, 8, device, tiny=not cuda)
        except Exception as exc:  # noqa: BLE001
            result["handoff"] = {"error": f"{type(exc).__name__}: {exc}"[:600]}
        print(f"handoff: {json.dumps(result['handoff'])}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["partial"] = False
    result["wall_s"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
