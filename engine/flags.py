"""The command line's shortcuts for config fields (engine/config.py reads them): each is a
flag (--llm-backend) and an environment variable (OMNI_LLM_BACKEND), with its help text."""
from __future__ import annotations

# Shortcut name -> dotted field path. Each is a CLI flag (--llm-backend) and an
# env var (OMNI_LLM_BACKEND). Anything else: --set llm.top_p=0.8.
OVERRIDES: dict[str, str] = {
    "llm": "llm.model",
    "llm_backend": "llm.backend",
    "llm_sha256": "llm.sha256",
    "context_tokens": "llm.context_tokens",
    "max_new_tokens": "llm.max_new_tokens",
    "temperature": "llm.temperature",
    "top_p": "llm.top_p",
    "quantization": "llm.quantization",
    "device": "llm.device",
    "vram_gb": "llm.vram_gb",
    "api_base": "llm.base_url",
    "api_key": "llm.api_key",
    "system_prompt": "system_prompt",
    "data_dir": "data_dir",
    "host": "host",
    "port": "port",
    "max_upload_mb": "max_upload_mb",
    "max_request_memory_mb": "max_request_memory_mb",
    "asr": "asr.model",
    "asr_backend": "asr.backend",
    "language": "asr.language",
    "voice": "tts.voice",
    "tts_backend": "tts.backend",
    "speaking_rate": "tts.rate",
    "min_barge_in_ms": "vad.min_barge_in_ms",
    "auth_token": "auth_token",
    "allowed_hosts": "allowed_hosts",
    "allowed_origins": "allowed_origins",
    "trusted_proxy": "trusted_proxies",
    "max_queue": "max_queue",
    "max_parallel": "llm.max_parallel",
}

HELP = {
    "llm": "language model: a name from assets/models.json, a local dir or .gguf file, or a hub id",
    "llm_backend": "transformers | openai | llamacpp",
    "llm_sha256": "expected sha256 of a local .gguf file",
    "temperature": "sampling temperature (0: greedy); default: the model's own (assets/models.json), else 0.7",
    "top_p": "nucleus sampling top_p; default: the model's own (assets/models.json), else 0.9",
    "quantization": "none | 4bit | 8bit (bitsandbytes; MoE experts then in NF4)",
    "vram_gb": "MoE models: GPU memory budget in GB; experts beyond it are offloaded to CPU memory and cached",
    "api_base": "base URL of an OpenAI-compatible server (remote profile)",
    "data_dir": "where conversations, media and converted weights live",
    "max_request_memory_mb": "memory decoding one request's media may use above the resting RSS, in MB; larger "
                             "decodes are refused before they start (default 768)",
    "asr": "speech recognition model: a name from assets/models.json or a local model dir / .pt file",
    "asr_backend": "faster-whisper | openai-whisper | none",
    "voice": "Piper voice: a name from assets/models.json or a path to a voice .onnx",
    "speaking_rate": "speaking rate, 1.0 normal (0.5 to 2.0)",
    "host": "bind address (default 127.0.0.1; anything else needs --auth-token)",
    "auth_token": "bearer token for the API and password for the page (16+ characters off loopback; "
                  "'auto' makes one and prints it)",
    "allowed_hosts": "comma-separated host names the server answers to besides loopback and --host "
                     "(e.g. a LAN name); other Host headers are refused",
    "allowed_origins": "comma-separated web origins (https://app.example) whose pages may call the server",
    "trusted_proxy": "comma-separated addresses of reverse proxies in front of the server: requests from them "
                     "are counted by the client in X-Forwarded-For (wrong-token back-off)",
    "max_queue": "requests that may wait for the model; more are refused with HTTP 429 (default 16)",
    "max_parallel": "sequences the model decodes at once, in one batch (continuous batching; default 8)",
}
