"""What every diffusion backend shares: where weights come from, loading and
unloading, progress and cancel inside the denoising loop, memory errors.

A backend is cheap to make; weights load on the first run (`load()`), from
a local directory holding `model_index.json` or from a hub id already in the
local Hugging Face cache. Nothing is ever downloaded (`local_files_only`), so
`HF_HUB_OFFLINE` changes nothing here: get weights with `hf download <id>` or
point the model at a directory. `model="tiny"` builds a tiny random pipeline
(tests, the tiny profile); `pipeline=` injects a ready pipeline object.

Progress and cancel reach into the loop three ways, whichever the pipeline
offers: `callback_on_step_end` (modern pipelines; cancel sets
`pipe._interrupt`), the legacy `callback(step, t, latents)`, or a forward
pre-hook on the denoiser (Shap-E has no callback). A cancelled run raises
`Cancelled` and writes nothing.

torch and diffusers are imported inside methods so that importing a backend
(to register it) stays fast.
"""
from __future__ import annotations

import gc
import inspect
import os
import re
import sys
import threading
import uuid
from pathlib import Path
from typing import Callable

from generators.base import Backend, Cancelled, GenerationError, ProgressFn, RequestError, check

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


class _Interrupted(Exception):
    """Raised inside a pipeline's loop to stop it when it cannot be asked to stop."""


def hub_cache() -> str:
    """The hub cache directory, read from the environment now (not at import, as huggingface_hub does)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def weights_present(model: str, marker: str = "model_index.json") -> tuple[bool, str]:
    """(True, where) when `model` is a local directory holding `marker` or a hub id whose `marker` is
    in the local cache; else (False, why not). A pipeline's marker is model_index.json, a model's config.json."""
    path = Path(model).expanduser()
    if path.is_dir():
        if (path / marker).is_file():
            return True, str(path)
        return False, f"{path} has no {marker}"
    if not _HUB_ID.match(model):
        return False, f"{model} is not a directory"
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache()
    found = try_to_load_from_cache(model, marker, cache_dir=cache)
    if isinstance(found, str):
        return True, found
    return False, f"{model} is not a local directory nor in the Hugging Face cache ({cache})"


def is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def save_atomic(out_dir: Path, stem: str, suffix: str, write: Callable[[Path], None]) -> Path:
    """Write a new file in `out_dir` through `write(tmp_path)`; it appears whole or not at all."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"
    tmp = out_dir / f".{path.stem}.partial{suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def round8(size: int, largest: int = 2048) -> int:
    """A pixel size the VAE and UNet accept: a multiple of 8, at least 8."""
    return max(8, min(int(size), largest) // 8 * 8)


class _Steps:
    """Counts denoising steps for one run: reports progress, stops the loop on cancel."""

    def __init__(self, pipe, progress: ProgressFn, cancel, total: int) -> None:
        self.pipe, self.progress, self.cancel, self.total = pipe, progress, cancel, max(1, int(total))
        self.interrupted = False
        self.calls = 0

    @property
    def _cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.cancelled

    def _report(self, done: int, total: int) -> None:
        self.progress("denoising", min(1.0, done / max(1, total)))

    def on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """`callback_on_step_end`: pipelines with an `interrupt` property stop at the next step."""
        self._report(step + 1, getattr(pipe, "_num_timesteps", None) or self.total)
        if self._cancelled:
            self.interrupted = True
            if not isinstance(getattr(type(pipe), "interrupt", None), property):
                raise _Interrupted()  # this pipeline never looks at _interrupt
            pipe._interrupt = True
        return callback_kwargs

    def legacy(self, step: int, timestep, latents) -> None:
        """The older `callback(step, t, latents)` (TextToVideoSD, AudioLDM): no interrupt flag, so raise."""
        self._report(step + 1, self.total)
        if self._cancelled:
            self.interrupted = True
            raise _Interrupted()

    def pre_hook(self, module, args) -> None:
        """A forward pre-hook on the denoiser, for pipelines with no callback: one call per loop step."""
        if self._cancelled:
            self.interrupted = True
            raise _Interrupted()
        if self.calls:
            self._report(self.calls, len(getattr(self.pipe.scheduler, "timesteps", ())) or self.total)
        self.calls += 1

    def finish(self) -> None:
        """The pre-hook reports a step when the next begins; the last one is reported here."""
        if self.calls:
            self._report(1, 1)


class DiffusionBackend(Backend):
    """Base of the diffusion generators; subclasses set the class attributes and write `run`.
    The task (which also names the env var OMNI_GEN_<TASK>_MODEL) gives the config field
    holding the model (--set generators.<field>=...), from the task's Tool record."""

    resident = True  # a pipeline on the device: the engine keeps one and parks the LLM for it

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        from generators.tools import BY_TASK

        cls.config_field = BY_TASK[cls.task].config_field
    pipeline_class = "DiffusionPipeline"  # diffusers class whose from_pretrained loads `model`
    default_model = ""  # hub id used when nothing is configured (used only if already in the cache)
    denoiser = "unet"  # the pipeline module called once per denoising step
    default_steps = 25  # for requests that carry no step count
    default_guidance: float | None = None  # None: the pipeline's own default

    def __init__(self, model: str | None = None, device: str = "auto", dtype: str = "auto", steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0, offload: bool = False, pipeline=None,
                 quantize: str = "none") -> None:
        if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
            raise GenerationError(f"device must be auto, cpu or cuda; got {device!r}")
        if dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise GenerationError(f"dtype must be auto, float16, bfloat16 or float32; got {dtype!r}")
        self.model = self.configured_model() if model is None else model
        self.device_setting, self.dtype_setting, self.offload = device, dtype, offload
        if quantize not in ("none", "4bit", "8bit"):
            raise GenerationError(f"quantize must be none, 4bit or 8bit; got {quantize!r}")
        self.quantize = quantize  # bitsandbytes on the denoiser, CUDA only (diffusers refuses it on CPU)
        self.steps = steps or self.default_steps
        self.guidance_scale = guidance_scale if guidance_scale is not None else self.default_guidance
        self.seed = seed
        self._pipe = pipeline
        self._placed = False
        self._lock = threading.RLock()

    # --- where the weights are -------------------------------------------------------------
    @classmethod
    def env_var(cls) -> str:
        return f"OMNI_GEN_{cls.task.upper()}_MODEL"

    @classmethod
    def configured_model(cls) -> str:
        return os.environ.get(cls.env_var(), "").strip() or cls.default_model

    @classmethod
    def what_to_set(cls) -> str:
        return f"set --set generators.{cls.config_field}=<local dir or hub id> (or {cls.env_var()})"

    @classmethod
    def setup_hint(cls, model: str | None = None) -> str:
        """One plain sentence for the chat: what is missing and the one thing that adds it (the
        detail, with paths, is in `available()` for the status panel and the log)."""
        from generators.registry import TASKS

        model = cls.configured_model() if model is None else model
        task, setting = TASKS[cls.task].capitalize(), f"--set generators.{cls.config_field}"
        local = f"or start with {setting}=FOLDER (a local model folder)"
        if not model:
            return f"{task} needs a diffusion model: start with {setting}=FOLDER (a local model folder) " \
                   "or a downloaded hub id."
        if model and _HUB_ID.match(model) and not Path(model).expanduser().exists():
            if model == cls.default_model:
                return f"{task} needs a diffusion model, and none is on this machine: get one with " \
                       f"`hf download {model}`, {local}."
            return f"{task} needs the diffusion model {model}, which is not on this machine: get it with " \
                   f"`hf download {model}`, {local}."
        return f"{task} needs a diffusion model, and the folder set in {setting} holds none: {local[3:]}."

    @classmethod
    def available(cls, model: str | None = None) -> tuple[bool, str]:
        """(ok, why not): cheap, reads no weights; `model` None means the env var or the default."""
        model = cls.configured_model() if model is None else model
        if model == "tiny":
            return True, ""
        if not model:
            return False, f"no weights: {cls.what_to_set()}"
        ok, why = weights_present(model)
        return (True, "") if ok else (False, f"no weights: {cls.what_to_set()}; {why}")

    @property
    def label(self) -> str:
        return f"{self.name}:{self.model or type(self._pipe).__name__}"

    # --- loading -------------------------------------------------------------------------
    def device(self) -> str:
        import torch

        if self.device_setting == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device_setting.startswith("cuda") and not torch.cuda.is_available():
            raise GenerationError(f"device {self.device_setting} was asked for but no CUDA GPU is visible; "
                                  "use device=cpu or auto")
        return self.device_setting

    def dtype(self):
        import torch

        if self.dtype_setting == "auto":
            return torch.float16 if self.device().startswith("cuda") else torch.float32
        return getattr(torch, self.dtype_setting)

    def _from_pretrained(self, dtype):
        """Load `self.model` with diffusers; subclasses add components (e.g. a motion adapter)."""
        import diffusers

        return getattr(diffusers, self.pipeline_class).from_pretrained(
            self.model, torch_dtype=dtype, local_files_only=True, **self._quantization(dtype))

    def _quantization(self, dtype) -> dict:
        """bitsandbytes 4-bit (NF4) or 8-bit for the denoiser, where the pipeline supports it (CUDA)."""
        if self.quantize == "none" or not self.device().startswith("cuda"):
            return {}
        try:
            from diffusers.quantizers import PipelineQuantizationConfig
        except ImportError:
            return {}
        kwargs = ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype}
                  if self.quantize == "4bit" else {"load_in_8bit": True})
        return {"quantization_config": PipelineQuantizationConfig(
            quant_backend=f"bitsandbytes_{self.quantize[0]}bit", quant_kwargs=kwargs,
            components_to_quantize=[self.denoiser])}

    def load(self):
        """The pipeline, loaded and placed on the device on first use."""
        with self._lock:
            if self._pipe is not None and self._placed:
                return self._pipe
            device = self.device()
            try:
                if self._pipe is None:
                    self._pipe = self._build()
                if self.offload and device.startswith("cuda"):
                    self._pipe.enable_model_cpu_offload()
                elif self._pipe.device.type != device.split(":")[0] or device.startswith("cuda:"):
                    self._pipe.to(device)
            except GenerationError:
                raise
            except Exception as e:
                self.unload()
                if is_out_of_memory(e):
                    raise GenerationError(f"ran out of memory loading {self.model} on {device}: free memory "
                                          "(unload other models) or use offload=true") from None
                raise GenerationError(f"could not load {self.model or 'the pipeline'}: {e}") from e
            self._pipe.set_progress_bar_config(disable=True)
            self._placed = True
            return self._pipe

    def _build(self):
        if self.model == "tiny":
            import torch

            from generators.tiny_diffusion import tiny_pipeline

            pipe, dtype = tiny_pipeline(self.task), self.dtype()
            return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
        ok, why = self.available(self.model)
        if not ok:
            raise GenerationError(why)
        return self._from_pretrained(self.dtype())

    def unload(self) -> None:
        """Drop the pipeline and give its memory back (the LLM may need the GPU next)."""
        with self._lock:
            pipe, self._pipe, self._placed = self._pipe, None, False
            self._steps = None  # the last run's step counter holds the pipeline too
        del pipe
        self._free_cache()

    # --- one run ---------------------------------------------------------------------------
    def refusal(self, request: dict, inputs) -> str:
        """Why this backend cannot do `request` with `inputs` ("" when it can); subclasses say."""
        return ""

    def can_do(self, request: dict, inputs) -> bool:
        """For the engine's pick between backends of one task: no weights are touched."""
        return not self.refusal(request, inputs)

    def check_request(self, request: dict, inputs) -> None:
        if why := self.refusal(request, inputs):
            raise RequestError(why)

    def generator(self, seed: int | None = None):
        import torch

        return torch.Generator(device="cpu").manual_seed(self.seed if seed is None else int(seed))

    def guidance(self) -> dict:
        """`guidance_scale` to pass, if any: the configured one, 0 for turbo (distilled) models."""
        if self.guidance_scale is not None:
            return {"guidance_scale": float(self.guidance_scale)}
        if "turbo" in (self.model or "").lower():
            return {"guidance_scale": 0.0}
        return {}

    def _callback(self, progress: ProgressFn, cancel, total: int):
        """A `callback_on_step_end` that reports progress and, on cancel, sets `pipe._interrupt`.

        The run remembers the interruption (`_steps.interrupted`) and raises `Cancelled` once the
        pipeline has returned, before anything is written.
        """
        self._steps = _Steps(self._pipe, progress, cancel, total)
        return self._steps.on_step_end

    def _generate(self, progress: ProgressFn, cancel, what: str, **kwargs):
        """Run the pipeline with progress, cancel and memory errors handled; return its output."""
        with self._lock:
            check(cancel)
            if not self._placed:
                progress("loading", 0.0)
            pipe = self.load()
            total = kwargs.get("num_inference_steps") or self.steps
            params = inspect.signature(pipe.__call__).parameters
            hook = None
            if "callback_on_step_end" in params:
                kwargs["callback_on_step_end"] = self._callback(progress, cancel, total)
            elif "callback" in params:
                self._steps = _Steps(pipe, progress, cancel, total)
                kwargs.update(callback=self._steps.legacy, callback_steps=1)
            else:
                self._steps = _Steps(pipe, progress, cancel, total)
                hook = getattr(pipe, self.denoiser).register_forward_pre_hook(self._steps.pre_hook)
            try:
                import torch

                with torch.inference_mode():
                    out = pipe(**kwargs)
            except _Interrupted:
                raise Cancelled() from None
            except Exception as e:
                if is_out_of_memory(e):
                    self._free_cache()
                    raise GenerationError(f"ran out of memory making the {what} on {self.device()}: "
                                          "try a smaller size, fewer frames or fewer steps") from None
                raise GenerationError(f"{self.label} failed making the {what}: {e}") from e
            finally:
                if hook is not None:
                    hook.remove()
                pipe._interrupt = False
            if self._steps.interrupted or (cancel is not None and cancel.cancelled):
                raise Cancelled()
            if hook is not None:
                self._steps.finish()
            return out

    @staticmethod
    def _free_cache() -> None:
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
