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

.PHONY: demo test install install-dev lint clean

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

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
