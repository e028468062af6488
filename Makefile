# Two commands for a new user: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# A local CPU wheel, when the machine has one, keeps pip from pulling CUDA packages.
TORCH_WHEEL ?= $(firstword $(wildcard /opt/wheels/torch-$(TORCH_VERSION)+cpu-*.whl))

.PHONY: install demo test bench parity clean

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

# Re-check bit-parity with mergekit 0.1.5 in a separate environment (.venv-mergekit).
parity: install
	bash scripts/mergekit_parity.sh

clean:
	rm -rf $(VENV) build *.egg-info
