"""Tiny seeded random omni backbones, built in code (the tiny profile and tests only).

The same architectures as the gpu profile's models, a few hundred thousand
parameters each: Qwen2.5-VL, Qwen2.5-Omni's thinker and Qwen3-Omni-MoE's
thinker (8 routed experts, top-2), with a 2-block vision tower (hidden 64) feeding a
2-layer text model and a char-level tokenizer carrying the Qwen special tokens,
so images and video go through the real processors and forwards.
"""
from __future__ import annotations

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>", "<unk>"]
ARCHS = ("qwen2_5_vl", "qwen2_5_omni", "qwen3_omni_moe")
NAMES = {"tiny-vl": "qwen2_5_vl", "tiny-omni": "qwen2_5_omni", "tiny-omni-moe": "qwen3_omni_moe"}  # llm.model


def build_tiny_processor():
    """Char-level tokenizer with the Qwen specials and template + a Qwen2-VL image processor
    sized so an image becomes 4..9 vision tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from engine.llm.vlm_inputs import TEMPLATE, frames_processor
    from engine.llm.tiny import _byte_of

    keep = sorted(c for c in pre_tokenizers.ByteLevel.alphabet() if _byte_of(c) in set(range(32, 127)) | {10})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + keep)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="<unk>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    images = Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=9 * 28 * 28)
    return frames_processor(fast, images, "<|vision_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_end|>")


def build_tiny_vlm(seed: int = 0, arch: str = "qwen2_5_vl"):
    """(model, processor): one of ARCHS with random weights, seeded."""
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"tiny arch {arch!r}: choose one of {', '.join(ARCHS)}")
    proc = build_tiny_processor()
    tok = proc.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_parameters=rope,
                initializer_range=0.4,  # varied visible text rather than one repeated token
                bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64)  # >= 64: bnb blocks
    marks = dict(vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    unk = ids["<unk>"]  # the tiny ones have no audio tokens
    audio = dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                 output_dim=64, max_source_positions=64, n_window=8)
    omni = dict(audio_start_token_id=unk, user_token_id=tok.convert_tokens_to_ids("u"), position_id_per_seconds=2)
    if arch == "qwen2_5_vl":
        config = transformers.Qwen2_5_VLConfig(
            text_config=text, vision_config=dict(vision, window_size=56, fullatt_block_indexes=[1], tokens_per_second=2),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], **marks)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    elif arch == "qwen2_5_omni":
        config = transformers.Qwen2_5OmniThinkerConfig(
            text_config=text, vision_config=dict(vision, window_size=56, fullatt_block_indexes=[1]),
            image_token_index=ids["<|image_pad|>"], video_token_index=ids["<|video_pad|>"], audio_token_index=unk,
            audio_end_token_id=unk, audio_config=audio, **omni, **marks)
        cls = transformers.Qwen2_5OmniThinkerForConditionalGeneration
    else:  # Qwen3-Omni's thinker: a Qwen3-MoE text model (8 experts, top-2) and a Qwen3-VL style vision tower
        moe = dict(text, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=16,
                   rope_parameters={**rope, "mrope_interleaved": True})
        config = transformers.Qwen3OmniMoeThinkerConfig(
            text_config=moe, vision_config=dict(vision, patch_size=14, num_position_embeddings=64,
                                                deepstack_visual_indexes=[0]),
            audio_config=dict(audio, downsample_hidden_size=8), image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"], audio_token_id=unk, **omni, **marks)
        cls = transformers.Qwen3OmniMoeThinkerForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).eval()
    gen = model.generation_config
    gen.eos_token_id, gen.pad_token_id = ids["<|im_end|>"], ids["<|endoftext|>"]
    # keep the random model's words visible: no placeholders or turn markers in its answer
    gen.suppress_tokens = [ids[t] for t in SPECIALS if t not in ("<|im_end|>",)]
    return model, proc
