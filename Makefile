# The two commands: `make demo` (the main job on the embedded default) and `make test`.
# Each creates .venv and installs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch goes in first, pinned, so nothing else can pull a different (CUDA) build; pyproject.toml
# accepts a range (torch>=2.9,<2.14) so that a GPU environment keeps its own CUDA torch.
TORCH_SPEC ?= torch==2.13.0
export DS_BUILD_OPS := 0
export DS_ACCELERATOR ?= cpu
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test test-fast install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/safer run configs/tiny.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q -rs tests

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -rs tests/unit

clean:
	rm -rf $(VENV) runs .pytest_cache
