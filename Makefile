# `make demo` and `make test` create .venv on first use and install r1jax into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JAX_PLATFORMS ?= cpu

.PHONY: demo test r1 vs-tunix venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m r1jax.demo

# The whole R1 recipe at tiny scale (configs/recipe/r1-tiny.yaml): ~35 min on 2 CPU cores.
r1: $(STAMP)
	$(PY) -m r1jax.recipe configs/recipe/r1-tiny.yaml

# r1jax beside Tunix (benchmarks/vs_tunix.py) in its own venv, .venv-peers. Tunix goes in with
# --no-deps: google-tunix 0.1.7 asks for safetensors<0.8, which r1jax's pins rule out (README).
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed

$(PEERS_STAMP): pyproject.toml
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q -e '.[peers]'
	$(PEERS)/bin/python -m pip install -q --no-deps google-tunix==0.1.7
	touch $(PEERS_STAMP)

vs-tunix: $(PEERS_STAMP)
	$(PEERS)/bin/python benchmarks/vs_tunix.py

test: $(STAMP)
	XLA_FLAGS="$${XLA_FLAGS:---xla_force_host_platform_device_count=8}" $(PY) -m pytest -n 2 --dist worksteal --durations=15 tests

clean:
	rm -rf $(VENV) $(PEERS) runs
