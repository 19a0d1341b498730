# Entry points: `make demo` (the main job on embedded defaults), `make test` (everything, as CI
# runs it) and `make test-fast` (tiers 1 and 2, under a minute: the loop after every change).
# Each creates or reuses .venv and installs what it needs. torch is pinned to the CPU
# build that this machine keeps on disk; override TORCH_SPEC for a CUDA host.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0
MODEL_DIR   ?= artifacts/bbc-gru
ARGS        ?=
PYTEST_ARGS ?=

.PHONY: venv tools demo test test-fast train eval sim clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[data,broker,keras,rdkafka,test]"
	touch $@

venv: $(VENV)/.installed

$(MODEL_DIR)/config.json: | venv
	$(PY) -m model train --dataset bbc-news --out $(MODEL_DIR)

train: venv
	$(PY) -m model train --dataset bbc-news --out $(MODEL_DIR)

eval: $(MODEL_DIR)/config.json
	$(PY) -m model eval --model $(MODEL_DIR)

demo: venv
	$(PY) -m devtools.demo --model-dir $(MODEL_DIR) $(ARGS)

# tests/test_deploy.py runs promtool and a real Prometheus (Debian's `prometheus` package).
tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's prometheus (promtool) for tests/test_deploy.py"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "promtool not found and not installable here (needs root and apt-get): the 5 Prometheus tests will be skipped"; \
	  fi; }

test: venv tools
	$(PY) -m pytest $(PYTEST_ARGS)

# Unit tests and the loop on in-memory fakes: no services, no subprocess, no training beyond
# the tiny model the fixtures train. The tiers are markers (pyproject.toml, tests/conftest.py).
test-fast: venv
	$(PY) -m pytest -q -m "(unit or fakes) and not heavy and not slow" $(PYTEST_ARGS)

# The deterministic fault simulator (tests/sim): SEEDS seeds from START; the first failure is
# shrunk to a minimal schedule. One seed: $(PY) -m tests.sim --seed S --verbose
SEEDS ?= 500
START ?= 0
sim: venv
	PYTHONHASHSEED=0 $(PY) -m tests.sim --seeds $(SEEDS) --start $(START)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
