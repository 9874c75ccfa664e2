"""Speech to text: Whisper on weights that ship in packages.

Two backends behind one contract: faster-whisper (CTranslate2, int8, the
fast CPU path and the default) and openai-whisper (the `whisper` package).
No `.pt` checkpoint ships in any package, so openai-whisper runs on the
packaged CTranslate2 weights converted once into a cached checkpoint (same
tensors, renamed). Input is mono float32 at 16 kHz (see audio.prepare);
silence and near-empty audio give an empty transcript instead of Whisper's
hallucinated "Thank you.". Nothing here reaches the network: models are
local directories with their tokenizer, never hub names.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.config import ASRConfig
from engine.errors import Unavailable
from engine.packaged import manifest, names, package_file, stat_key
from engine.speech.audio import WHISPER_RATE, rms_db

SILENCE_DB = -50.0  # quieter than this on average is silence: do not decode
MIN_SECONDS = 0.1
AUDIBLE_BELOW_PEAK_DB = 50.0  # 10 ms windows within this of the loudest are the sound (canonical)
LEAD_S, TAIL_S = 0.1, 0.05  # kept before and after the sound
PAD_S = 0.4  # digital silence after it
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "omni-assistant" / "models"
WHISPER_INSTALL = "pip install --no-deps openai-whisper && pip install tiktoken numba more-itertools tqdm"


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the audio
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str  # "" when nothing was heard and no language was given
    segments: tuple[Segment, ...] = ()
    duration_s: float = 0.0


@dataclass(frozen=True)
class DecodingOptions:
    """Greedy, one temperature and no carried-over context: lowest latency, deterministic."""

    beam_size: int = 1
    temperatures: tuple[float, ...] = (0.0,)  # more values: Whisper's fallback on repetitive output
    condition_on_previous_text: bool = False


class ASR(ABC):
    name: str = ""
    multilingual: bool = False

    def __init__(self) -> None:
        self._lock = threading.Lock()  # one decode at a time per model

    def transcribe(self, audio: np.ndarray, language: str | None = None) -> Transcript:
        """Mono float32 at 16 kHz -> Transcript. `language` (e.g. "de") skips detection."""
        audio = np.asarray(audio, np.float32).reshape(-1)
        duration = len(audio) / WHISPER_RATE
        language = (language or None) if self.multilingual else "en"
        if duration < MIN_SECONDS or rms_db(audio) < SILENCE_DB:
            return Transcript("", language or "", (), duration)
        start, sound = canonical(audio)
        with self._lock:
            segments, detected = self._decode(sound, language)
        segments = tuple(Segment(min(round(max(s.start + start, 0), 2), duration),
                                 min(round(s.end + start, 2), duration), s.text.strip())
                         for s in segments if re.search(r"\w", s.text))  # not a lone "."
        return Transcript(" ".join(s.text for s in segments), detected, segments, duration)

    @abstractmethod
    def _decode(self, audio: np.ndarray, language: str | None) -> tuple[list[Segment], str]:
        """Segments (times may overrun the audio; transcribe clips them) and the language."""


def canonical(audio: np.ndarray) -> tuple[float, np.ndarray]:
    """(where it starts, s; the sound Whisper hears): the audible part with LEAD_S/TAIL_S of
    what was around it and PAD_S of digital silence after it, however much quiet the recording
    had at its ends. So the same words give the same transcript whether the utterance was
    cut 64 ms after the voice stopped (voice mode, recognised at the first pause) or a
    second later (the whole recording): Whisper's punctuation reads the trailing silence."""
    hop = WHISPER_RATE // 100
    n = len(audio) // hop
    if n < 3:
        return 0.0, audio
    level = 10 * np.log10(np.mean(np.square(audio[: n * hop].reshape(n, hop), dtype=np.float64), axis=1) + 1e-12)
    loud = np.flatnonzero(level > level.max() - AUDIBLE_BELOW_PEAK_DB)
    a = max(0, loud[0] * hop - int(LEAD_S * WHISPER_RATE))
    b = min(len(audio), (loud[-1] + 1) * hop + int(TAIL_S * WHISPER_RATE))
    return a / WHISPER_RATE, np.concatenate([audio[a:b], np.zeros(int(PAD_S * WHISPER_RATE), np.float32)])


# --- where the weights are ----------------------------------------------------

def model_dir(model: str | Path, cache_dir: Path) -> Path:
    """A CTranslate2 Whisper directory (model.bin, config.json, tokenizer.json) for a
    manifest name or a local path. A model split over packages is joined into `cache_dir`."""
    entry = manifest().get("asr", {}).get(str(model))
    if entry is None:
        path = Path(model).expanduser()
        if not path.exists():
            raise Unavailable(f"no speech recognition model {str(model)!r}",
                              f"set --asr NAME_OR_PATH: one of {', '.join(names('asr'))}, "
                              "a CTranslate2 Whisper directory or an openai-whisper .pt file")
        return path
    src, install = entry["source"], entry.get("install", "")
    if "parts" not in src:
        return package_file(src["package"], src["file"], install)[0]
    from engine.llm.sources import join_parts

    parts = [package_file(p["package"], p["file"], install)[0] for p in src["parts"]]
    data = package_file(src["dir"]["package"], src["dir"]["file"], install)[0]
    dest = Path(cache_dir) / "asr" / str(model)
    join_parts(parts, dest / "model.bin", src["sha256"])
    for name in ("config.json", "tokenizer.json", "vocabulary.txt", "preprocessor_config.json"):
        if (data / name).exists() and not (dest / name).exists():
            shutil.copyfile(data / name, dest / name)
    return dest


def _check_ct2_dir(path: Path) -> None:
    missing = [f for f in ("model.bin", "config.json", "tokenizer.json") if not (path / f).is_file()]
    if missing:  # without tokenizer.json faster-whisper would fetch one from the hub
        raise Unavailable(f"{path} is not a complete CTranslate2 Whisper model (missing {', '.join(missing)})",
                          "point --asr at a faster-whisper model directory")


# --- faster-whisper -----------------------------------------------------------

class FasterWhisperASR(ASR):
    def __init__(self, model: str | Path = "whisper-tiny.en", cache_dir: Path = DEFAULT_CACHE,
                 options: DecodingOptions = DecodingOptions(), device: str = "cpu",
                 compute_type: str = "int8") -> None:
        super().__init__()
        path = model_dir(model, cache_dir)
        _check_ct2_dir(path)
        from faster_whisper import WhisperModel

        self.model = WhisperModel(str(path), device=device, compute_type=compute_type,
                                  cpu_threads=os.cpu_count() or 2, local_files_only=True)
        from engine.speech.features import install

        install(self.model)  # long audio's features a block at a time (20 minutes took 1.1 GB at once)
        self.options = options
        self.multilingual = bool(self.model.model.is_multilingual)
        self.name = f"faster-whisper {model if str(model) in names('asr') else path.name}"

    def _decode(self, audio, language):
        o = self.options
        segments, info = self.model.transcribe(
            audio, language=language, beam_size=o.beam_size, temperature=list(o.temperatures),
            condition_on_previous_text=o.condition_on_previous_text, vad_filter=False, without_timestamps=False)
        segments = [Segment(s.start, s.end, s.text) for s in segments]  # a generator: decoding happens here
        return segments, info.language


# --- CTranslate2 -> openai-whisper checkpoint -----------------------------------

_CT2_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")  # ctranslate2/types.h order


def read_ct2(path: Path) -> dict[str, np.ndarray]:
    """The variables of a CTranslate2 model.bin (binary version 6: see ModelSpec._serialize)."""
    data = memoryview(Path(path).read_bytes())
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def string() -> str:
        nonlocal pos
        (n,) = take("H")
        pos += n
        return bytes(data[pos - n:pos - 1]).decode()

    (version,) = take("I")
    if version != 6:
        raise Unavailable(f"{path}: CTranslate2 binary version {version}, the converter reads version 6",
                          "use a model converted by CTranslate2 3.x/4.x")
    string(), take("I")  # spec name, revision
    variables = {}
    for _ in range(take("I")[0]):
        name = string()
        shape = take(f"{take('B')[0]}I")
        dtype, nbytes = _CT2_DTYPES[take("B")[0]], take("I")[0]
        raw = np.frombuffer(data[pos:pos + nbytes], np.uint16 if dtype == "bfloat16" else dtype)
        if dtype == "bfloat16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        variables[name] = raw.reshape(shape)
        pos += nbytes
    for _ in range(take("I")[0]):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return variables


def ct2_to_whisper_checkpoint(src: Path, dest: Path) -> Path:
    """Write an openai-whisper checkpoint ({"dims", "model_state_dict"}) for CT2 model dir `src`."""
    import torch

    v = read_ct2(src / "model.bin")
    if any(k.endswith("weight_scale") for k in v):
        raise Unavailable(f"{src} holds quantized weights; the converter needs float weights",
                          "use a float16/float32 CTranslate2 model or an openai-whisper .pt file")
    enc, dec = (range(sum(bool(re.fullmatch(rf"{side}/layer_\d+/ffn/linear_0/weight", k)) for k in v))
                for side in ("encoder", "decoder"))
    sd: dict[str, np.ndarray] = {}

    def linear(dst, src_):
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = v[f"{src_}/weight"], v[f"{src_}/bias"]

    def norm(dst, src_):
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = v[f"{src_}/gamma"], v[f"{src_}/beta"]

    def fused(dst, src_, names_):  # CT2 stacks q/k/v along the output axis; Whisper's key has no bias
        weights, biases = (np.split(v[f"{src_}/{kind}"], len(names_)) for kind in ("weight", "bias"))
        for name, w, b in zip(names_, weights, biases):
            sd[f"{dst}.{name}.weight"] = w
            if name != "key":
                sd[f"{dst}.{name}.bias"] = b

    def block(dst, src_, cross: bool):
        fused(f"{dst}.attn", f"{src_}/self_attention/linear_0", ("query", "key", "value"))
        linear(f"{dst}.attn.out", f"{src_}/self_attention/linear_1")
        norm(f"{dst}.attn_ln", f"{src_}/self_attention/layer_norm")
        if cross:
            fused(f"{dst}.cross_attn", f"{src_}/attention/linear_0", ("query",))
            fused(f"{dst}.cross_attn", f"{src_}/attention/linear_1", ("key", "value"))
            linear(f"{dst}.cross_attn.out", f"{src_}/attention/linear_2")
            norm(f"{dst}.cross_attn_ln", f"{src_}/attention/layer_norm")
        linear(f"{dst}.mlp.0", f"{src_}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src_}/ffn/linear_1")
        norm(f"{dst}.mlp_ln", f"{src_}/ffn/layer_norm")

    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    sd["encoder.positional_embedding"] = v["encoder/position_encodings/encodings"]
    for i in enc:
        block(f"encoder.blocks.{i}", f"encoder/layer_{i}", cross=False)
    norm("encoder.ln_post", "encoder/layer_norm")
    sd["decoder.token_embedding.weight"] = v["decoder/embeddings/weight"]
    sd["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
    for i in dec:
        block(f"decoder.blocks.{i}", f"decoder/layer_{i}", cross=True)
    norm("decoder.ln", "decoder/layer_norm")

    audio_ctx, audio_state = v["encoder/position_encodings/encodings"].shape
    text_ctx, text_state = v["decoder/position_encodings/encodings"].shape
    dims = dict(n_mels=v["encoder/conv1/weight"].shape[1], n_vocab=len(v["decoder/embeddings/weight"]),
                n_audio_ctx=audio_ctx, n_audio_state=audio_state, n_audio_head=int(v["encoder/num_heads"]),
                n_audio_layer=len(enc), n_text_ctx=text_ctx, n_text_state=text_state,
                n_text_head=int(v["decoder/num_heads"]), n_text_layer=len(dec))
    heads = json.loads((src / "config.json").read_text()).get("alignment_heads") or []
    checkpoint = {"dims": dims, "alignment_heads": [list(map(int, h)) for h in heads],
                  "model_state_dict": {k: torch.from_numpy(np.array(a)) for k, a in sd.items()}}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, dest)  # a crash mid-write never leaves a half checkpoint under the real name
    return dest


# --- openai-whisper -----------------------------------------------------------

class OpenAIWhisperASR(ASR):
    """openai-whisper on a `.pt` checkpoint, or on a CT2 model converted once into `cache_dir`."""

    def __init__(self, model: str | Path = "whisper-tiny.en", cache_dir: Path = DEFAULT_CACHE,
                 options: DecodingOptions = DecodingOptions(), device: str = "cpu") -> None:
        super().__init__()
        try:
            import torch
            import whisper
        except ImportError:
            raise Unavailable("the whisper package (openai-whisper) is not installed", WHISPER_INSTALL) from None
        path = model_dir(model, cache_dir)
        if path.suffix != ".pt":
            _check_ct2_dir(path)
            label = str(model) if str(model) in names("asr") else path.name
            pt = Path(cache_dir) / "asr" / "openai-whisper" / f"{label}-{stat_key(path / 'model.bin')[:16]}.pt"
            path = pt if pt.exists() else ct2_to_whisper_checkpoint(path, pt)
        checkpoint = torch.load(path, map_location=device, weights_only=True)
        self.model = whisper.model.Whisper(whisper.model.ModelDimensions(**checkpoint["dims"]))
        self.model.load_state_dict(checkpoint["model_state_dict"])
        if checkpoint.get("alignment_heads"):  # for word timestamps; official checkpoints set their own
            mask = torch.zeros(self.model.dims.n_text_layer, self.model.dims.n_text_head, dtype=torch.bool)
            for layer, head in checkpoint["alignment_heads"]:
                mask[layer, head] = True
            self.model.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
        self.model.to(device).eval()
        self.options = options
        self.multilingual = bool(self.model.is_multilingual)
        self.name = f"openai-whisper {model if str(model) in names('asr') else Path(model).stem}"

    def _decode(self, audio, language):
        o = self.options
        out = self.model.transcribe(
            audio, language=language, fp16=False, temperature=o.temperatures, verbose=None,
            beam_size=o.beam_size if o.beam_size > 1 else None,
            condition_on_previous_text=o.condition_on_previous_text)
        return [Segment(s["start"], s["end"], s["text"]) for s in out["segments"]], out.get("language") or "en"


def load_asr(cfg: ASRConfig, cache_dir: Path | None = None) -> ASR:
    """The configured recogniser; `cache_dir`/asr holds joined and converted weights."""
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE
    if cfg.backend == "none":
        raise Unavailable("speech recognition is off", "set --asr-backend faster-whisper")
    if cfg.backend == "openai-whisper":
        return OpenAIWhisperASR(cfg.model, cache_dir)
    if cfg.backend == "faster-whisper":
        if str(cfg.model).endswith(".pt"):
            raise Unavailable(f"{cfg.model} is an openai-whisper checkpoint", "set --asr-backend openai-whisper")
        return FasterWhisperASR(cfg.model, cache_dir)
    raise Unavailable(f"unknown speech recognition backend {cfg.backend!r}",
                      "set --asr-backend faster-whisper, openai-whisper or none")


# --- word error rate ------------------------------------------------------------

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _number_words(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    for size, word in ((10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            rest = n % size
            return f"{_number_words(n // size)} {word}" + (f" {_number_words(rest)}" if rest else "")
    raise AssertionError(n)


_WHOLE = {"won't": "will not", "can't": "can not", "cannot": "can not", "let's": "let us"}
_SUFFIXES = (("n't", " not"), ("'re", " are"), ("'m", " am"), ("'ll", " will"), ("'ve", " have"), ("'d", " would"))
_IS = {"it", "that", "what", "where", "who", "how", "there", "here", "he", "she"}  # "'s" = "is" only after these


def _expand(word: str) -> str:
    if word in _WHOLE:
        return _WHOLE[word]
    for suffix, full in _SUFFIXES:
        if word.endswith(suffix):
            return word[: -len(suffix)] + full
    return word[:-2] + " is" if word.endswith("'s") and word[:-2] in _IS else word


def normalise(text: str) -> list[str]:
    """Lower case, no punctuation, common contractions expanded ("where's" -> "where is"),
    digits spelled out ("10" -> "ten", "1,500" -> "one thousand five hundred")."""
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text.lower().replace("\u2019", "'"))
    text = re.sub(r"\d{1,12}", lambda m: f" {_number_words(int(m.group()))} ", text)
    words = [w.strip("'") for w in re.sub(r"[^\w\s']|_", " ", text).split()]
    return " ".join(_expand(w) for w in words if w).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance (substitutions + insertions + deletions) over
    the number of reference words, after `normalise`."""
    ref, hyp = normalise(reference), normalise(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)
