"""Spoken answers from Qwen2.5-Omni's own speech head (the "talker"), not a separate TTS.

transformers' `Qwen2_5OmniForConditionalGeneration.generate` runs the thinker (text LLM)
with `output_hidden_states=True`, then feeds the thinker's per-step embeddings and
last-layer hidden states to the talker (codec LM) and decodes its codes with token2wav
(DiT + BigVGAN) into a 24 kHz waveform. Our engine runs the thinker with its own token
loop, so this module is that second half on its own:

    trace = ThinkerTrace(input_ids)
    out = thinker(input_ids=input_ids, use_cache=True, output_hidden_states=True)
    trace.add(out.hidden_states)                  # entry 0: the prompt
    while ...:                                     # each sampled token goes to reply_ids
        trace.reply_ids.append(tok)                # (EOS included when it is sampled)
        if done: break                             # the last token is never forwarded, like HF
        out = thinker(input_ids=[[tok]], cache=out.cache, use_cache=True, output_hidden_states=True)
        trace.add(out.hidden_states)               # one entry per forwarded reply token
    wav = talk(model, trace, speaker="Chelsie", cancel=cancel)   # float32, SAMPLE_RATE Hz

`talk` rebuilds exactly the talker inputs HF builds (same masking, text-bos/eos/pad
embeddings, EOS rewrite, generate kwargs and token2wav call), so a greedy trace gives the
same samples as `model.generate(..., thinker_do_sample=False)`. Extra trailing hidden entries
(a loop that also forwarded its final token) are ignored. `build_tiny_omni` makes a seeded
random tiny model (tests only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.perception.base import check, stop_on_cancel
from engine.speech.tts import TTS

SAMPLE_RATE = 24000
_RATE_KWARGS = ("image_grid_thw", "video_grid_thw", "video_second_per_grid", "audio_feature_lengths")


@dataclass
class ThinkerTrace:
    """What the thinker produced, filled step by step by the caller's loop (batch of 1).

    `embeds`/`hidden`: entry 0 covers the prompt [1, P, H]; entry i >= 1 is the forward of
    reply token i-1 [1, 1, H]. `audio`/`image`/`video`: which inputs were given (their
    placeholder embeddings are zeroed for the talker, as HF does). `rope` holds the
    talker's 3D-rope inputs for multimodal prompts (image_grid_thw, video_grid_thw,
    video_second_per_grid, audio_feature_lengths); `eos_token_id` overrides the thinker's."""
    input_ids: Any
    embeds: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    reply_ids: list[int] = field(default_factory=list)
    audio: bool = False
    image: bool = False
    video: bool = False
    use_audio_in_video: bool = False
    attention_mask: Any = None
    rope: dict = field(default_factory=dict)
    eos_token_id: Any = None

    @classmethod
    def from_inputs(cls, inputs, use_audio_in_video: bool = False) -> "ThinkerTrace":
        """A trace for the processor's output dict (input_ids, pixel_values, ...)."""
        rope = {k: inputs[k] for k in _RATE_KWARGS if inputs.get(k) is not None}
        if inputs.get("feature_attention_mask") is not None:
            rope["audio_feature_lengths"] = inputs["feature_attention_mask"].sum(dim=1)
        return cls(inputs["input_ids"], audio=inputs.get("input_features") is not None,
                   image=inputs.get("pixel_values") is not None,
                   video=inputs.get("pixel_values_videos") is not None, use_audio_in_video=use_audio_in_video,
                   attention_mask=inputs.get("attention_mask"), rope=rope)

    def add(self, hidden_states, token: int | None = None) -> None:
        """Record one thinker forward's `outputs.hidden_states` (embeddings first, last layer
        last); `token`, if given, is appended to reply_ids."""
        self.embeds.append(hidden_states[0])
        self.hidden.append(hidden_states[-1])
        if token is not None:
            self.reply_ids.append(int(token))


def talk(model, trace: ThinkerTrace, speaker: str = "Chelsie", max_new_tokens: int = 4096, do_sample: bool = True,
         seed: int | None = None, cancel=None, top_k: int = 40, top_p: float = 0.8, temperature: float = 0.9,
         repetition_penalty: float = 1.05, eos_token_id: list[int] | None = None,
         token2wav_kwargs: dict | None = None) -> np.ndarray:
    """The reply in `trace` spoken by Qwen2.5-Omni's talker + token2wav: mono float32 at
    SAMPLE_RATE. `eos_token_id` defaults to the talker's codec pad and end tokens (HF's
    hard-coded [8292, 8294] on the real model). `seed` seeds talker sampling and the DiT's
    noise without touching the global RNG. Raises Cancelled once `cancel.cancelled`."""
    import torch

    if not getattr(model, "has_talker", False):
        raise ValueError("this Qwen2.5-Omni model has no talker: load it with enable_audio_output=True")
    if speaker not in model.speaker_map:
        raise ValueError(f"unknown speaker {speaker!r}; available speakers: {', '.join(sorted(model.speaker_map))}")
    check(cancel)
    n = len(trace.reply_ids)
    if n < 2:  # HF cannot speak a reply this short (it would fail); nothing to say anyway
        return np.zeros(0, np.float32)
    if len(trace.hidden) < n or len(trace.embeds) < n:
        raise ValueError(f"trace has {len(trace.hidden)} hidden-state entries for {n} reply tokens; need {n}")

    talker, thinker = model.talker, model.thinker
    input_ids = trace.input_ids
    dev, batch = input_ids.device, input_ids.shape[0]
    params = model.speaker_map[speaker]
    full = lambda value: torch.full((batch, 1), value, dtype=torch.long, device=dev)  # noqa: E731

    with torch.no_grad():
        # the prompt's embeddings with media placeholders zeroed, exactly as HF
        embeds = [e.to(dev) for e in trace.embeds[:n]]
        hidden = [h.to(dev) for h in trace.hidden[:n]]
        cfg = model.config.thinker_config
        prompt = embeds[0].clone()
        for present, token in ((trace.audio, cfg.audio_token_index), (trace.image, cfg.image_token_index),
                               (trace.video, cfg.video_token_index)):
            if present:
                prompt = prompt.masked_fill((input_ids == token).unsqueeze(-1), 0)
        embeds[0] = prompt
        reply = torch.tensor([trace.reply_ids], dtype=torch.long, device=dev)

        text_bos = params["bos_token"]
        input_text_ids = torch.cat([input_ids, full(text_bos), reply[:, :1]], dim=-1)
        talker_input_ids = torch.cat([torch.full_like(input_ids, talker.codec_mask_token),
                                      full(talker.codec_pad_token), full(talker.codec_bos_token)], dim=1)
        embed = thinker.get_input_embeddings()
        reply_part = torch.cat(hidden[1:], dim=1) + torch.cat(embeds[1:], dim=1)
        inputs_embeds = torch.cat([hidden[0] + embeds[0], embed(full(text_bos)).to(dev), reply_part[:, :1, :]],
                                  dim=1)
        eos_embed, pad_embed = embed(full(talker.text_eos_token)).to(dev), embed(full(talker.text_pad_token)).to(dev)
        reply_part = torch.cat([reply_part[:, 1:, :], eos_embed, pad_embed], dim=1)
        # HF's batch EOS rewrite: text EOS right after the last real token, pads after it
        thinker_eos = trace.eos_token_id if trace.eos_token_id is not None else thinker.generation_config.eos_token_id
        if thinker_eos is not None:
            is_eos = (reply.unsqueeze(-1) == torch.as_tensor(thinker_eos, device=dev).flatten()).any(dim=-1)
            first = torch.where(is_eos, torch.arange(n, device=dev), n).min(dim=-1).values.clamp(min=1, max=n - 1)
            pos = torch.arange(reply_part.shape[1], device=dev).unsqueeze(0)
            reply_part = torch.where((pos >= first.unsqueeze(1)).unsqueeze(-1), pad_embed, reply_part)
            reply_part = torch.where((pos == (first - 1).unsqueeze(1)).unsqueeze(-1), eos_embed, reply_part)
        attention_mask = None
        if trace.attention_mask is not None:
            attention_mask = torch.cat([trace.attention_mask, trace.attention_mask.new_ones((batch, 2))], dim=1).to(dev)

        eos = list(eos_token_id) if eos_token_id is not None else [talker.codec_pad_token, talker.codec_eos_token]
        extra = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in trace.rope.items()}
        gen = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, top_k=top_k, top_p=top_p,
                   temperature=temperature, eos_token_id=eos, pad_token_id=talker.codec_pad_token,
                   repetition_penalty=repetition_penalty, use_audio_in_video=trace.use_audio_in_video, **extra)
        if cancel is not None:
            gen["stopping_criteria"] = [stop_on_cancel(cancel)]

        wav_dev = next(model.token2wav.parameters()).device
        devices = [wav_dev.index or 0] if wav_dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            check(cancel)
            result = talker.generate(input_ids=talker_input_ids, input_text_ids=input_text_ids,
                                     thinker_reply_part=reply_part, inputs_embeds=inputs_embeds,
                                     attention_mask=attention_mask, suppress_tokens=[talker.codec_bos_token], **gen)
            check(cancel)
            codes = result[:, talker_input_ids.shape[1]:]
            is_end = (codes.unsqueeze(-1) == torch.as_tensor(eos, device=codes.device).flatten()).any(dim=-1)
            length = int(torch.where(is_end, torch.arange(codes.shape[-1], device=codes.device),
                                     codes.shape[-1]).min(dim=-1).values[0])
            if length == 0:
                return np.zeros(0, np.float32)
            if model.token2wav.dtype != torch.float:
                model.token2wav.float()
            cond = params["cond"].to(dev).float().expand(batch, -1)
            ref_mel = params["ref_mel"].to(dev).float().expand(batch, -1, -1)
            wav = model.token2wav(codes[:1, :length], conditioning=cond[:1], reference_mel=ref_mel[:1],
                                  **(token2wav_kwargs or {}))
    return wav.reshape(-1).float().cpu().numpy().astype(np.float32)


def build_tiny_omni(seed: int = 0):
    """(model, processor): a seeded random tiny Qwen2_5OmniForConditionalGeneration with
    talker and token2wav (tests only). The thinker and processor are neural.py's tiny
    Qwen2.5-Omni thinker; the talker has 64 codec tokens (60 pad, 61 bos, 62 end, 63 mask)
    and reuses the tiny vocabulary's specials as its text start/end/pad tokens."""
    import torch
    import transformers

    from engine.llm.tiny_omni import build_tiny_vlm

    thinker, proc = build_tiny_vlm(seed, arch="qwen2_5_omni")
    tc, tok = thinker.config, proc.tokenizer
    ids = lambda t: tok.convert_tokens_to_ids(t)  # noqa: E731
    text = tc.text_config
    talker = dict(
        vocab_size=64, tts_codec_pad_token_id=60, tts_codec_start_token_id=61, tts_codec_end_token_id=62,
        tts_codec_mask_token_id=63, tts_text_start_token_id=ids("<|im_start|>"),
        tts_text_end_token_id=ids("<|im_end|>"), tts_text_pad_token_id=ids("<|endoftext|>"),
        embedding_size=text.hidden_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        initializer_range=0.4, audio_token_index=tc.audio_token_index, image_token_index=tc.image_token_index,
        video_token_index=tc.video_token_index, vision_start_token_id=tc.vision_start_token_id,
        vision_end_token_id=tc.vision_end_token_id, audio_start_token_id=tc.audio_start_token_id,
        audio_end_token_id=tc.audio_end_token_id, position_id_per_seconds=tc.position_id_per_seconds,
        seconds_per_chunk=tc.seconds_per_chunk, spatial_merge_size=tc.vision_config.spatial_merge_size)
    dit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16, ff_mult=2, emb_dim=16,
               max_position_embeddings=4096, block_size=8, look_ahead_layers=[1], look_backward_layers=[0],
               repeats=2, num_embeds=64, mel_dim=16, enc_emb_dim=16, enc_dim=16, enc_channels=[16, 16, 16, 16, 48],
               enc_kernel_sizes=[5, 3, 3, 3, 1], enc_dilations=[1, 2, 3, 4, 1], enc_attention_channels=8,
               enc_res2net_scale=2, enc_se_channels=8)
    bigvgan = dict(mel_dim=16, upsample_initial_channel=64, resblock_kernel_sizes=[3],
                   resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[8, 6, 5],  # 240 samples a mel frame
                   upsample_kernel_sizes=[16, 12, 11])
    config = transformers.Qwen2_5OmniConfig(thinker_config=tc.to_dict(), talker_config=talker,
                                            token2wav_config=dict(dit_config=dit, bigvgan_config=bigvgan),
                                            enable_audio_output=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen2_5OmniForConditionalGeneration(config).eval()
        model.thinker = thinker  # same weights and generation config as build_tiny_vlm's
        model.speaker_map = {
            name: {"bos_token": ids(bos), "cond": torch.randn(1, dit["enc_emb_dim"]),
                   "ref_mel": torch.randn(1, 40, dit["mel_dim"]) - 4.0}
            for name, bos in (("Chelsie", "<|im_start|>"), ("Ethan", "<|vision_start|>"))}
    return model, proc


class TalkerVoice(TTS):
    """The tts role when tts.backend=talker: the LLM backend's own talker speaks its answers.

    It speaks from the thinker's hidden states (a ThinkerTrace the backend fills when a
    turn asks for it), not from text, so it starts once the answer is complete."""

    sample_rate = SAMPLE_RATE
    from_trace = True

    def __init__(self, llm_role, speaker: str) -> None:
        from engine.errors import Unavailable

        backend = llm_role.get()
        model = backend.talker_model
        if model is None:
            raise Unavailable(f"{backend.name} has no talker (speech head)",
                              "set --tts-backend piper, or --llm to a Qwen2.5-Omni model")
        if speaker not in model.speaker_map:
            raise Unavailable(f"the talker has no speaker {speaker!r}",
                              f"set --set tts.talker_speaker= one of {', '.join(sorted(model.speaker_map))}")
        self.backend, self.speaker = backend, speaker
        self.name = f"{backend.name} talker ({speaker})"

    def synthesize(self, text: str, rate: float = 1.0, cancel=None):
        from engine.errors import Unavailable

        raise Unavailable(f"{self.name} speaks the model's own answers, not given text",
                          "set --tts-backend piper to speak given text")

    def speak(self, trace: ThinkerTrace, cancel=None, lock=None) -> np.ndarray:
        """The traced answer as float32 samples at SAMPLE_RATE (Cancelled on cancel)."""
        from contextlib import nullcontext

        with lock if lock is not None else nullcontext():
            self.backend.ready()
            return talk(self.backend.talker_model, trace, self.speaker, cancel=cancel, seed=0)
