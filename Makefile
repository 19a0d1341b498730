# Two entry points: `make demo` (the main job on embedded defaults) and `make test`.
# Both create or reuse .venv and install what they need. torch is pinned to the CPU
# build that this machine keeps on disk; override TORCH_SPEC for a CUDA host.
PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0
MODEL_DIR   ?= artifacts/bbc-gru
ARGS        ?=
PYTEST_ARGS ?=

.PHONY: venv demo test train eval bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[data,broker,keras,test]"
	touch $@

venv: $(VENV)/.installed

$(MODEL_DIR)/config.json: | venv
	$(PY) -m model train --dataset bbc-news --out $(MODEL_DIR)

train: venv
	$(PY) -m model train --dataset bbc-news --out $(MODEL_DIR)

eval: $(MODEL_DIR)/config.json
	$(PY) -m model eval --model $(MODEL_DIR)

demo: venv
	$(PY) -m worker demo --model-dir $(MODEL_DIR) $(ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
