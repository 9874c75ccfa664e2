#!/usr/bin/env python3
"""Each diffusion backend's pipeline at its real architecture size, random weights, one run.

The generators' default models, rebuilt from their configs written out below
(nothing is downloaded; the weights are random, which is honest for time and
memory, not for pictures):
  sdxl_turbo        ImageDiffusion   stabilityai/sdxl-turbo: SDXL UNet (2.6B), CLIP-L + OpenCLIP-bigG,
                                     SDXL VAE; 512x512, guidance 0
  instruct_pix2pix  EditDiffusion    timbrooks/instruct-pix2pix: SD1.5 UNet with 8 input channels,
                                     CLIP-L, SD VAE; a 512x512 picture
  text_to_video     VideoDiffusion   ali-vilab/text-to-video-ms-1.7b: UNet3D (1.4B), OpenCLIP-H text,
                                     SD VAE; 16 frames of 256x256
  animatediff       VideoDiffusion   SD1.5 + guoyww/animatediff-motion-adapter-v1-5-2 (UNetMotionModel);
                                     16 frames of 512x512
  shap_e            ShapeDiffusion   openai/shap-e: prior transformer (24 layers, 1024 wide), CLIP-L with
                                     projection, the NeRF/STF renderer; a mesh (Heun: 2 prior calls a step)
  audioldm2         AudioDiffusion   cvssp/audioldm2: CLAP, Flan-T5-large encoder, GPT-2, UNet (350M),
                                     VAE, HiFi-GAN; 10 s of sound
Tokenizers are the tiny character-level ones (generators/tiny_diffusion.py): they
only choose token ids; every id is valid for the real vocabularies.

Each pipeline is built on the meta device and its weights drawn where it runs, then
handed to its generator backend (`pipeline=`), loaded with `load()` and run through the
backend's own denoising loop (`_generate`: the callback or hook that reports progress
and checks cancel), without the file writing of `run()` (which needs ffmpeg, trimesh
and soundfile, none of them on the GPU machine). Timed: every step (the progress
callback synchronizes CUDA), the whole call (text encoding and decoding included); peak
VRAM over the call; then `unload()` must give the memory back (the LLM takes it next).

On CUDA in float16. `--tiny` runs the tiny random pipelines instead (a check of this
script on a CPU); `--device cpu --size small` runs the real architectures at a tiny
output size (slow, a check of the configs). Writes the JSON after every pipeline, so
a run stopped at a time limit keeps what it measured.

    python bench/diffusion.py [--only sdxl_turbo,shap_e] [--steps 3] [--tiny] [--out PATH]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

MiB = 1 << 20

# -- the real configs ----------------------------------------------------------------------------
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
CLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
              num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
              block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
MS_UNET3D = dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=64, cross_attention_dim=1024,
                 down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
                 up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3)
MOTION = dict(motion_max_seq_length=32, motion_num_attention_heads=8, use_motion_mid_block=True)
SHAP_E_PRIOR = dict(num_attention_heads=16, attention_head_dim=64, num_layers=24, embedding_dim=1024,
                    num_embeddings=1024, additional_embeddings=0, time_embed_act_fn="gelu", norm_in_type="layer",
                    embedding_proj_norm_type="layer", encoder_hid_proj_type=None, added_emb_type=None,
                    time_embed_dim=4096, embedding_proj_dim=768, clip_embed_dim=2048)
SHAP_E_RENDERER = dict(param_shapes=((256, 93), (256, 8), (256, 8), (256, 8)), d_latent=1024, d_hidden=256,
                       n_output=12, n_hidden_layers=6, act_fn="swish", insert_direction_at=4,
                       background=(255.0, 255.0, 255.0))
# AudioLDM2 (diffusers' conversion script's DEFAULT_CONFIG for audioldm2-full): UNet model_channels 128,
# channel_mult (1, 2, 3, 5), attention at 2x-8x, 32 channels per head, each transformer block a self
# attention then cross attention to GPT-2's 768-wide and Flan-T5's 1024-wide states
AUDIOLDM2_UNET = dict(sample_size=256, in_channels=8, out_channels=8, layers_per_block=2,
                      block_out_channels=(128, 256, 384, 640), attention_head_dim=(4, 8, 12, 20),
                      cross_attention_dim=[[None, 768, 1024]] * 4,
                      down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                      up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",))
AUDIOLDM2_VAE = dict(in_channels=1, out_channels=1, latent_channels=8, layers_per_block=2,
                     block_out_channels=(128, 256, 512), down_block_types=("DownEncoderBlock2D",) * 3,
                     up_block_types=("UpDecoderBlock2D",) * 3, sample_size=256)
CLAP_TEXT = dict(vocab_size=50265, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=514, type_vocab_size=1, projection_dim=512,
                 pad_token_id=1)
FLAN_T5_LARGE = dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=24, num_heads=16,
                     feed_forward_proj="gated-gelu", is_encoder_decoder=False)
GPT2_BASE = dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024, max_new_tokens=8)
HIFIGAN_16K = dict(model_in_dim=64, sampling_rate=16000, upsample_initial_channel=1024,
                   upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[16, 16, 8, 4, 4],
                   resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5]] * 3, normalize_before=False)

SIZES = {  # the run's output size: "full" as the generators are asked, "small" for a CPU check of the configs
    "full": dict(image=512, frames=16, video_side=256, animatediff_side=512, audio_s=10.0),
    "small": dict(image=64, frames=2, video_side=64, animatediff_side=64, audio_s=1.0),
}


# -- building on meta, weights drawn on the device ---------------------------------------------
class Weights:
    """Builds modules on the meta device and draws their weights where they will run."""

    def __init__(self, device, dtype, seed: int = 0) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.gen = torch.Generator(self.device).manual_seed(seed)

    def __call__(self, cls, *args, **kwargs):
        import accelerate

        with accelerate.init_empty_weights():  # parameters on meta; buffers (tables, positions) real
            module = cls(*args, **kwargs)
        return self.fill(module)

    def fill(self, module: nn.Module) -> nn.Module:
        """Random N(0, 1/fan_in) matrices, unit norm scales, zero biases; shared parameters stay shared."""
        made: dict[int, nn.Parameter] = {}
        for name, p in list(module.named_parameters(remove_duplicate=False)):
            if id(p) not in made:
                t = torch.empty(p.shape, device=self.device, dtype=self.dtype)
                if p.dim() >= 2:
                    t.normal_(0.0, (p[0].numel()) ** -0.5, generator=self.gen)
                else:
                    t.fill_(0.0 if name.endswith("bias") else 1.0)
                made[id(p)] = nn.Parameter(t, requires_grad=False)
            prefix, _, leaf = name.rpartition(".")
            module.get_submodule(prefix)._parameters[leaf] = made[id(p)]
        module.to(device=self.device, dtype=self.dtype)  # buffers, as from_pretrained(torch_dtype=) leaves them
        for keep in getattr(module, "_keep_in_fp32_modules", None) or []:  # e.g. T5's wo, as transformers loads it
            for name, sub in module.named_modules():
                if name.split(".")[-1] == keep:
                    sub.float()
        return module.eval()


def clip_text(w: Weights, cfg: dict, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(**cfg, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return w(CLIPTextModelWithProjection if projection else CLIPTextModel, config)


def sd_parts(w: Weights, unet_in: int = 4):
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, UNet2DConditionModel

    from generators.tiny_diffusion import clip_tokenizer

    return dict(unet=w(UNet2DConditionModel, **{**SD15_UNET, "in_channels": unet_in}),
                vae=w(AutoencoderKL, **SD_VAE, scaling_factor=0.18215), text_encoder=clip_text(w, CLIP_L),
                tokenizer=clip_tokenizer(), scheduler=EulerAncestralDiscreteScheduler(
                    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1))


def build_sdxl_turbo(w: Weights):
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline
    from diffusers import UNet2DConditionModel

    from generators.tiny_diffusion import clip_tokenizer

    return StableDiffusionXLPipeline(
        unet=w(UNet2DConditionModel, **SDXL_UNET),
        vae=w(AutoencoderKL, **{**SD_VAE, "sample_size": 1024}, scaling_factor=0.13025, force_upcast=True),
        text_encoder=clip_text(w, CLIP_L), text_encoder_2=clip_text(w, CLIP_BIGG, projection=True),
        tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(),
        scheduler=EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                  timestep_spacing="trailing", steps_offset=1))


def build_instruct_pix2pix(w: Weights):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    return StableDiffusionInstructPix2PixPipeline(**sd_parts(w, unet_in=8), safety_checker=None,
                                                  feature_extractor=None, requires_safety_checker=False)


def build_text_to_video(w: Weights):
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel

    from generators.tiny_diffusion import clip_tokenizer

    return TextToVideoSDPipeline(
        unet=w(UNet3DConditionModel, **MS_UNET3D), vae=w(AutoencoderKL, **SD_VAE, scaling_factor=0.18215),
        text_encoder=clip_text(w, CLIP_H), tokenizer=clip_tokenizer(),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1))


def build_animatediff(w: Weights):
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, UNetMotionModel

    parts = sd_parts(w)
    unet_cfg = {k: v for k, v in SD15_UNET.items() if k not in ("down_block_types", "up_block_types",
                                                                  "attention_head_dim")}
    # the UNet the pipeline makes from SD1.5's and the adapter (UNetMotionModel.from_unet2d), built directly;
    # the adapter stays a component too (its weights twice in memory, as in a loaded pipeline)
    unet = w(UNetMotionModel, **unet_cfg, num_attention_heads=8, **MOTION)
    adapter = w(MotionAdapter, block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2,
                motion_mid_block_layers_per_block=1, motion_norm_num_groups=32, **MOTION)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                              timestep_spacing="linspace", steps_offset=1)
    return AnimateDiffPipeline(unet=unet, motion_adapter=adapter, vae=parts["vae"], text_encoder=parts["text_encoder"],
                               tokenizer=parts["tokenizer"], scheduler=scheduler, feature_extractor=None,
                               image_encoder=None)


def build_shap_e(w: Weights):
    from diffusers import HeunDiscreteScheduler, PriorTransformer, ShapEPipeline
    from diffusers.pipelines.shap_e import ShapERenderer

    from generators.tiny_diffusion import clip_tokenizer, marching_cubes_table

    renderer = w(ShapERenderer, **SHAP_E_RENDERER)
    cases, masks = marching_cubes_table()  # real checkpoints ship this table; a built renderer has zeros
    renderer.mesh_decoder.cases.copy_(torch.from_numpy(cases))
    renderer.mesh_decoder.masks.copy_(torch.from_numpy(masks))
    # as the tiny pipeline does: random weights on the position encoding's high octaves make a surface of
    # millions of triangles; keep xyz and the two lowest octaves
    first = renderer.params_proj.projections["nerstf__mlp__0__weight"]
    octave = torch.arange(93, device=w.device)
    octave = torch.where(octave < 3, 0, (octave - 3) % 45 // 3)
    with torch.no_grad():
        for weights in (first.norm.weight, first.norm.bias, first.proj.bias.view(256, 93)):
            weights[..., octave >= 2] = 0
    return ShapEPipeline(prior=w(PriorTransformer, **SHAP_E_PRIOR), text_encoder=clip_text(w, CLIP_L, projection=True),
                         tokenizer=clip_tokenizer(), shap_e_renderer=renderer, scheduler=HeunDiscreteScheduler(
                             beta_schedule="exp", num_train_timesteps=1024, prediction_type="sample",
                             use_karras_sigmas=True, clip_sample=True, clip_sample_range=1.0))


def t5_tokenizer():
    """A character-level T5 tokenizer (ids < 100; Flan-T5's vocabulary has 32128)."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'-\u2581"
    tok = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in chars], extra_ids=0)
    tok.model_max_length = 128  # as AudioLDM2's own
    return tok


def build_audioldm2(w: Weights):
    from diffusers import AudioLDM2Pipeline, AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel, AutoencoderKL
    from diffusers import DDIMScheduler
    from transformers import (ClapConfig, ClapFeatureExtractor, ClapModel, GPT2Config, GPT2LMHeadModel,
                              SpeechT5HifiGan, SpeechT5HifiGanConfig, T5Config, T5EncoderModel)

    from generators.tiny_diffusion import roberta_tokenizer

    return AudioLDM2Pipeline(
        vae=w(AutoencoderKL, **AUDIOLDM2_VAE, scaling_factor=0.4),
        text_encoder=w(ClapModel, ClapConfig(text_config=CLAP_TEXT, projection_dim=512)),
        text_encoder_2=w(T5EncoderModel, T5Config(**FLAN_T5_LARGE)),
        projection_model=w(AudioLDM2ProjectionModel, 512, 1024, 768),
        language_model=w(GPT2LMHeadModel, GPT2Config(**GPT2_BASE)),
        tokenizer=roberta_tokenizer(), tokenizer_2=t5_tokenizer(), feature_extractor=ClapFeatureExtractor(),
        unet=w(AudioLDM2UNet2DConditionModel, **AUDIOLDM2_UNET),
        scheduler=DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        vocoder=w(SpeechT5HifiGan, SpeechT5HifiGanConfig(**HIFIGAN_16K)))


# -- one run through the generator backend -------------------------------------------------------
def request(name: str, size: dict, steps: int, backend) -> tuple[str, dict]:
    """(what, keyword arguments) as the backend's run() passes them to the pipeline."""
    gen = backend.generator()
    if name == "sdxl_turbo":
        return "image", dict(prompt="a lighthouse at dusk", width=size["image"], height=size["image"],
                             num_inference_steps=steps, generator=gen, output_type="pil", **backend.guidance())
    if name == "instruct_pix2pix":
        from PIL import Image

        image = Image.new("RGB", (size["image"], size["image"]), (90, 140, 200))
        return "edited image", dict(prompt="make it snow", image=image, num_inference_steps=steps, generator=gen,
                                    output_type="pil", **backend.guidance())
    if name in ("text_to_video", "animatediff"):
        side = size["video_side" if name == "text_to_video" else "animatediff_side"]
        return "video", dict(prompt="waves on a beach", num_frames=size["frames"], width=side, height=side,
                             num_inference_steps=steps, generator=gen, output_type="np", **backend.guidance())
    if name == "shap_e":  # (the mesh decoder's 128^3 grid takes minutes on a CPU: "small" stops at the latent)
        return "3D model", dict(prompt="a cup", num_inference_steps=steps, generator=gen,
                                output_type="mesh" if size is SIZES["full"] else "latent", **backend.guidance())
    return "sound", dict(prompt="rain on a roof", audio_length_in_s=size["audio_s"], num_inference_steps=steps,
                         generator=gen, **backend.guidance())


PIPELINES = {  # name: (builder, generator backend class, tiny pipeline kind, what the numbers are per)
    "sdxl_turbo": (build_sdxl_turbo, "generators.image_diffusion:ImageDiffusion", "image", "step"),
    "instruct_pix2pix": (build_instruct_pix2pix, "generators.edit_diffusion:EditDiffusion", "edit_image", "step"),
    "text_to_video": (build_text_to_video, "generators.video_diffusion:VideoDiffusion", "video", "step"),
    "animatediff": (build_animatediff, "generators.video_diffusion:VideoDiffusion", "animatediff", "step"),
    "shap_e": (build_shap_e, "generators.shape_diffusion:ShapeDiffusion", "3d", "prior call (Heun: 2 a step)"),
    "audioldm2": (build_audioldm2, "generators.audio_diffusion:AudioDiffusion", "audio", "step"),
}
MODEL_LABELS = {"sdxl_turbo": "sdxl-turbo (random weights)"}  # "turbo" in the name: guidance 0, as the backend does


def backend_class(path: str):
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def run_one(name: str, args, device, dtype) -> dict:
    builder, cls_path, tiny_kind, unit = PIPELINES[name]
    size = SIZES["small" if args.tiny else args.size]
    release(device)
    base = allocated(device)
    t0 = time.perf_counter()
    if args.tiny:
        from generators.tiny_diffusion import tiny_pipeline

        pipe = tiny_pipeline(tiny_kind).to(device=device, dtype=dtype)
    else:
        pipe = builder(Weights(device, dtype))
    sync(device)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for c in pipe.components.values() if isinstance(c, nn.Module) for p in c.parameters())
    weights = sum(p.numel() * p.element_size() for c in pipe.components.values() if isinstance(c, nn.Module)
                  for p in c.parameters())
    backend = backend_class(cls_path)(model=MODEL_LABELS.get(name, name), pipeline=pipe, device=device.type,
                                      steps=args.steps)
    del pipe  # the backend holds it; unload() must be able to free it
    backend.load()
    what, kwargs = request(name, size, args.steps, backend)
    marks: list[float] = []

    def progress(stage: str, fraction: float) -> None:
        if stage == "denoising":
            sync(device)
            marks.append(time.perf_counter())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    out = backend._generate(progress, None, what, **kwargs)
    sync(device)
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(marks, marks[1:])]
    hooked = unit != "step"  # a pre-hook marks each call's start, and the end after decoding: the last gap is both
    if hooked:
        gaps = gaps[:-1]
    res = {"class": type(backend._pipe).__name__, "backend": type(backend).__name__, "params_b": round(params / 1e9, 3),
           "weights_mb": round(weights / MiB, 1), "dtype": str(dtype).replace("torch.", ""),
           "build_s": round(build_s, 1),
           "steps": args.steps, "per": unit, "calls_timed": len(marks),
           "first_step_s": round(marks[0] - start, 3) if marks else None,
           "step_s": round(statistics.median(gaps), 4) if gaps else None,
           "run_s": round(end - start, 2),
           "after_last_step_s": round(end - marks[-1], 2) if marks and not hooked else None,
           "output": describe(out), "request": {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str))}}
    if device.type == "cuda":
        res["peak_vram_mb"] = round(torch.cuda.max_memory_allocated(device) / MiB, 1)
        held = allocated(device)
        del out
        backend.unload()
        release(device)
        after = allocated(device)
        res.update(vram_with_pipeline_mb=round((held - base) / MiB, 1),
                   vram_after_unload_mb=round((after - base) / MiB, 1),
                   freed_on_unload=after - base < 64 * MiB)
    else:
        res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        del out
        backend.unload()
    return res


def describe(out) -> str:
    for attr in ("images", "frames", "audios"):
        value = getattr(out, attr, None)
        if value is not None:
            first = value[0]
            shape = getattr(first, "shape", None) or getattr(first, "size", None)
            if attr == "images" and hasattr(first, "verts"):
                return f"mesh: {len(first.verts)} vertices, {len(first.faces)} faces"
            return f"{attr}: {len(value)} x {tuple(shape) if shape is not None else type(first).__name__}"
    return type(out).__name__


def release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description="One run of each diffusion pipeline at its real size (random weights).")
    ap.add_argument("--only", default="", help=f"comma-separated, of: {', '.join(PIPELINES)}")
    ap.add_argument("--steps", type=int, default=3, help="denoising steps (the first one warms up)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cpu")
    ap.add_argument("--dtype", default="auto",
                    help="auto (float16 on CUDA, float32 on CPU), float16, bfloat16, float32")
    ap.add_argument("--size", default="full", choices=list(SIZES),
                    help="output size (small: a CPU check of the configs)")
    ap.add_argument("--tiny", action="store_true",
                    help="the tiny random pipelines instead (a CPU check of this script)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "diffusion.json"))
    args = ap.parse_args()
    started = time.perf_counter()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = (torch.float16 if device.type == "cuda" else torch.float32) if args.dtype == "auto" \
        else getattr(torch, args.dtype)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(PIPELINES)
    if unknown := [n for n in names if n not in PIPELINES]:
        ap.error(f"unknown pipeline(s) {', '.join(unknown)}; choose from {', '.join(PIPELINES)}")
    import diffusers
    import transformers

    result = {"bench": "diffusion", "device": device.type,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
              "weights": ("tiny random pipelines" if args.tiny else
                          "random, real architecture sizes (configs in bench/diffusion.py)"),
              "dtype": str(dtype).replace("torch.", ""), "size": "small" if args.tiny else args.size,
              "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
              "partial": True, "pipelines": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        t = time.perf_counter()
        try:
            res = run_one(name, args, device, dtype)
        except Exception as exc:  # noqa: BLE001 - report it and go on to the next pipeline
            res = {"error": f"{type(exc).__name__}: {exc}"[:600]}
            release(device)
        res["wall_s"] = round(time.perf_counter() - t, 1)
        result["pipelines"][name] = res
        print(f"{name}: {json.dumps(res)}", file=sys.stderr, flush=True)
        result["wall_s"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(result, indent=2) + "\n")
    result["partial"] = False
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
