"""Tiny random diffusers pipelines, built in code: no files, no downloads.

They run the real pipeline code paths (text encoder, denoiser, scheduler,
decoder) in well under a second per step on a CPU, so tests and the `tiny`
profile exercise every diffusion backend without weights. The output is
noise, by design. `tiny_pipeline(task)` takes a registry task name
("image", "edit_image", "video", "3d", "audio") or "animatediff".

Tokenizers are character level (the byte alphabet of CLIP/RoBERTa BPE with
no merges), so any prompt tokenizes without a vocabulary download.
"""
from __future__ import annotations

KINDS = ("image", "edit_image", "video", "animatediff", "3d", "audio")
HIDDEN = 32  # text encoder width = cross-attention width


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE uses (GPT-2's table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):  # CLIP marks the last piece of a word with </w>
        for ch in _byte_alphabet():
            vocab[ch + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def roberta_tokenizer():
    from transformers import RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for ch in _byte_alphabet():
        vocab[ch] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _clip_text(projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=514, hidden_size=HIDDEN,
                            projection_dim=HIDDEN, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, layer_norm_eps=1e-5)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(channels: int = 3):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), in_channels=channels, out_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=4, norm_num_groups=4, sample_size=32).eval()


def _unet(in_channels: int = 4, cross_attention_dim=HIDDEN, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=4, **extra).eval()


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _image():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(unet=_unet(), vae=_vae(), text_encoder=_clip_text(), tokenizer=clip_tokenizer(),
                                   scheduler=_ddim(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _edit_image():
    from diffusers import StableDiffusionInstructPix2PixPipeline

    # 8 input channels: the noisy latent and the encoded source image side by side
    return StableDiffusionInstructPix2PixPipeline(
        unet=_unet(in_channels=8), vae=_vae(), text_encoder=_clip_text(), tokenizer=clip_tokenizer(),
        scheduler=_ddim(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _video():
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    unet = UNet3DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=HIDDEN, attention_head_dim=4, norm_num_groups=4).eval()
    return TextToVideoSDPipeline(unet=unet, vae=_vae(), text_encoder=_clip_text(), tokenizer=clip_tokenizer(),
                                 scheduler=_ddim())


def _animatediff():
    from diffusers import AnimateDiffPipeline, MotionAdapter

    adapter = MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1, motion_norm_num_groups=4,
                            motion_num_attention_heads=2, motion_max_seq_length=48).eval()
    return AnimateDiffPipeline(unet=_unet(), motion_adapter=adapter, vae=_vae(), text_encoder=_clip_text(),
                               tokenizer=clip_tokenizer(), scheduler=_ddim(), feature_extractor=None,
                               image_encoder=None)


def marching_cubes_table():
    """The marching-cubes lookup (cases [256, 5, 3], masks [256, 5]) in Shap-E's corner and edge order.

    Real Shap-E checkpoints ship this table as buffers of the renderer's mesh
    decoder; a renderer built in code starts with zeros and would make no
    triangles. Corner i is (x, y, z) = bits of i; each loop of cut edges is
    wound so its normal points from inside (positive field) to outside, and
    an ambiguous face cuts off each inside corner separately (consistent
    between neighbouring cubes, so meshes come out watertight).
    """
    import numpy as np

    corners = [(i & 1, (i >> 1) & 1, (i >> 2) & 1) for i in range(8)]
    edges = []  # (corner, corner) per local edge, in the order of shap_e.renderer._create_flat_edge_indices
    for axis, (u, v) in ((0, (1, 2)), (1, (0, 2)), (2, (0, 1))):
        for k in range(4):
            p = [0, 0, 0]
            p[u], p[v] = k & 1, k >> 1
            q = list(p)
            q[axis] = 1
            edges.append((corners.index(tuple(p)), corners.index(tuple(q))))
    faces = [[e for e, (a, b) in enumerate(edges) if corners[a][ax] == side == corners[b][ax]]
             for ax in range(3) for side in (0, 1)]
    mid = np.array([np.add(corners[a], corners[b]) / 2 for a, b in edges])
    cases, masks = np.zeros((256, 5, 3), np.int64), np.zeros((256, 5), bool)
    for case in range(256):
        inside = [(case >> c) & 1 for c in range(8)]
        links = {e: [] for e, (a, b) in enumerate(edges) if inside[a] != inside[b]}
        for face in faces:
            cut = [e for e in face if e in links]
            if len(cut) == 4:
                pairs = [[e for e in face if c in edges[e]] for c in {c for e in face for c in edges[e]} if inside[c]]
            else:
                pairs = [cut] if cut else []
            for a, b in pairs:
                links[a].append(b)
                links[b].append(a)
        tris = []
        while links:
            loop = [next(iter(links))]
            while nxt := [e for e in links[loop[-1]] if e not in loop]:
                loop.append(nxt[0])
            for e in loop:
                del links[e]
            outward = sum(np.subtract(corners[b], corners[a]) * (1 if inside[a] else -1) for a, b in
                          (edges[e] for e in loop))
            pts = mid[loop]
            if np.dot(np.cross(pts, np.roll(pts, -1, 0)).sum(0), outward) < 0:
                loop.reverse()
            tris += [[loop[0], loop[i], loop[i + 1]] for i in range(1, len(loop) - 1)]
        if tris:
            cases[case, :len(tris)] = tris
            masks[case, :len(tris)] = True
    return cases, masks


def _3d():
    import torch
    from diffusers import HeunDiscreteScheduler, PriorTransformer, ShapEPipeline
    from diffusers.pipelines.shap_e import ShapERenderer

    latent_dim, renderer_dim = 32, 8
    prior = PriorTransformer(
        num_attention_heads=2, attention_head_dim=16, embedding_dim=latent_dim, num_embeddings=32,
        embedding_proj_dim=HIDDEN, time_embed_dim=4 * latent_dim, num_layers=1, clip_embed_dim=2 * latent_dim,
        additional_embeddings=0, time_embed_act_fn="gelu", norm_in_type="layer", encoder_hid_proj_type=None,
        added_emb_type=None).eval()
    renderer = ShapERenderer(
        param_shapes=((renderer_dim, 93), (renderer_dim, 8), (renderer_dim, 8), (renderer_dim, 8)),
        d_latent=latent_dim, d_hidden=renderer_dim, n_output=12, background=(0.1, 0.1, 0.1)).eval()
    cases, masks = marching_cubes_table()
    renderer.mesh_decoder.cases.copy_(torch.from_numpy(cases))
    renderer.mesh_decoder.masks.copy_(torch.from_numpy(masks))
    # The first MLP layer sees the position and 15 octaves of sines; random weights on the high octaves
    # make a surface of millions of triangles. Keep xyz and the two lowest octaves: a smooth blob.
    first = renderer.params_proj.projections["nerstf__mlp__0__weight"]
    octave = torch.arange(93)
    octave = torch.where(octave < 3, 0, (octave - 3) % 45 // 3)
    with torch.no_grad():
        for weights in (first.norm.weight, first.norm.bias, first.proj.bias.view(renderer_dim, 93)):
            weights[..., octave >= 2] = 0
    scheduler = HeunDiscreteScheduler(beta_schedule="exp", num_train_timesteps=1024, prediction_type="sample",
                                      use_karras_sigmas=True, clip_sample=True, clip_sample_range=1.0)
    return ShapEPipeline(prior=prior, text_encoder=_clip_text(projection=True), tokenizer=clip_tokenizer(),
                         shap_e_renderer=renderer, scheduler=scheduler)


def _audio():
    from diffusers import AudioLDMPipeline
    from transformers import ClapTextConfig, ClapTextModelWithProjection, SpeechT5HifiGan, SpeechT5HifiGanConfig

    text = ClapTextModelWithProjection(ClapTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=261, hidden_size=HIDDEN, projection_dim=HIDDEN,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, layer_norm_eps=1e-5)).eval()
    # AudioLDM conditions on the text as a class embedding; its "cross" attention attends to itself
    unet = _unet(cross_attention_dim=(8, 16), class_embed_type="simple_projection",
                 projection_class_embeddings_input_dim=HIDDEN, class_embeddings_concat=True)
    # a hop of 160 samples at 16 kHz (10 ms mel frames), like the real vocoder, so lengths are realistic
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=8, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[10, 16],
        upsample_kernel_sizes=[20, 32], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
        normalize_before=False)).eval()
    return AudioLDMPipeline(vae=_vae(channels=1), text_encoder=text, tokenizer=roberta_tokenizer(), unet=unet,
                            scheduler=_ddim(), vocoder=vocoder)


def tiny_pipeline(kind: str, seed: int = 0):
    """A seeded tiny random pipeline for `kind` (see KINDS), on the CPU in float32."""
    import torch

    builders = {"image": _image, "edit_image": _edit_image, "video": _video, "animatediff": _animatediff,
                "3d": _3d, "audio": _audio}
    if kind not in builders:
        raise ValueError(f"no tiny pipeline for {kind!r}; kinds are {', '.join(KINDS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = builders[kind]()
    pipe.set_progress_bar_config(disable=True)
    return pipe
