# Two commands: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= runs/demo

.PHONY: demo test install install-dev lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# torch goes in first, pinned, so the project's ranges accept it and pip never pulls a CUDA build.
$(VENV)/.torch: $(BIN)/python
	$(BIN)/pip install "torch==$(TORCH_VERSION)"
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -e ".[serve,eval]"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -e ".[serve,eval,quant,dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Until the unified-model stages land (`mllm demo`), the demo runs the stages that exist:
# data -> teacher -> tokenizer -> tokenizer evaluation. Each stage is a file target, so a rerun
# skips what is complete and a killed stage resumes.
demo: $(VENV)/.installed $(DEMO_OUT)/tokenizer/eval/results.json
	@echo "Demo stages done: data, teacher, tokenizer (see $(DEMO_OUT)/tokenizer/eval/)."
	@echo "The unified-model stages (mllm init/train/eval/serve) are not in this release yet."

$(DEMO_OUT)/data/train/index.json: | $(VENV)/.installed
	$(BIN)/mllm data shapes --out $(DEMO_OUT)/data/train --n 20000 --seed 0 --overwrite

$(DEMO_OUT)/data/test/index.json: | $(VENV)/.installed
	$(BIN)/mllm data shapes --out $(DEMO_OUT)/data/test --n 1000 --seed 0 --split test --overwrite

$(DEMO_OUT)/teacher/model.safetensors: $(DEMO_OUT)/data/train/index.json
	$(BIN)/mllm train-teacher --data $(DEMO_OUT)/data/train --out $(DEMO_OUT)/teacher

$(DEMO_OUT)/tokenizer/model.safetensors: $(DEMO_OUT)/teacher/model.safetensors
	$(BIN)/mllm train-tokenizer --data $(DEMO_OUT)/data/train --out $(DEMO_OUT)/tokenizer \
		--teacher $(DEMO_OUT)/teacher --resume

$(DEMO_OUT)/tokenizer/eval/results.json: $(DEMO_OUT)/tokenizer/model.safetensors $(DEMO_OUT)/data/test/index.json
	$(BIN)/mllm eval-tokenizer --tokenizer $(DEMO_OUT)/tokenizer --data $(DEMO_OUT)/data/test

test: $(VENV)/.installed-dev
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
