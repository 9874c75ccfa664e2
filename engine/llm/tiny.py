"""A seeded random tiny Llama (SmolLM2's architecture) built in code: tests only.

No files, no network. Its tokenizer is byte-level BPE with no merges over
printable ASCII, with the ChatML specials and template SmolLM2 uses, so the
transformers backend runs exactly the code path of the real model.
"""
from __future__ import annotations

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# a wide init makes the random model's greedy output varied visible text rather
# than one repeated token, which is what browser and streaming tests look at
INIT_STD = 0.4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    # keep the byte-level symbols of printable ASCII and newline only
    keep = {c for c in alphabet if _byte_of(c) in set(range(32, 127)) | {10}}
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for c in sorted(keep):
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<unk>", pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def _byte_of(symbol: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for one symbol."""
    code = ord(symbol)
    if 33 <= code <= 126 or 161 <= code <= 172 or 174 <= code <= 255:
        return code
    # the 68 remapped bytes map to 256.. in order of their byte value
    remapped = [b for b in range(256) if not (33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255)]
    return remapped[code - 256]


def build_tiny_model(seed: int = 0):
    """(model, tokenizer): a 2-layer Llama with random weights, seeded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=INIT_STD,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    torch.random.set_rng_state(generator_state)
    return model, tokenizer


def build_tiny_moe(seed: int = 0):
    """(model, tokenizer): a 2-layer Qwen3-MoE (8 experts, top-2) with random weights, seeded:
    the same family as Qwen3-30B-A3B / Qwen3-Omni's thinker, for the MoE code paths."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=INIT_STD,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).eval()
    torch.random.set_rng_state(generator_state)
    return model, tokenizer


def save_tiny_checkpoint(folder, model=None, tokenizer=None, seed: int = 0):
    """The tiny Llama (or `model`) written as a checkpoint folder, as a converted GGUF is:
    config, safetensors, tokenizer.json and chat template."""
    from pathlib import Path

    if model is None:
        model, tokenizer = build_tiny_model(seed)
    model.save_pretrained(folder)
    (tokenizer or build_tiny_tokenizer()).save_pretrained(folder)
    return Path(folder)
