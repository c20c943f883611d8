# Two commands: `make train` (default training run) and `make test` (test suite). Each creates .venv first.
VENV := .venv
PYTHON := $(VENV)/bin/python
ARGS ?=
# The exact versions CI tested; pyproject.toml keeps ranges. `make lock` refreshes it after the suite passes.
LOCK := constraints.txt
EXTRAS := .[dev,sweep,trackers]

# On a machine without an NVIDIA GPU, install the CPU build of torch first with an exact pin (a version
# range pulls PyPI's multi-GB CUDA build); with a GPU, the project's range takes the default CUDA build.
TORCH_CPU := torch==2.13.0

.PHONY: install train test lint lock clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(VENV)/bin/pip install -c $(LOCK) $(TORCH_CPU); fi
	$(VENV)/bin/pip install -c $(LOCK) -e '$(EXTRAS)'
	touch $@

train: install
	$(PYTHON) train.py $(ARGS)

test: install
	$(PYTHON) -m pytest $(ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Resolve the newest versions pyproject.toml allows in a scratch venv, run the suite there, and only if it passes
# rewrite the lock (torch keeps the CPU pin on machines without a GPU).
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	if ! command -v nvidia-smi >/dev/null 2>&1; then .venv-lock/bin/pip install $(TORCH_CPU); fi
	.venv-lock/bin/pip install -e '$(EXTRAS)'
	.venv-lock/bin/python -m pytest tests/test_lightning_seams.py  # Lightning's internals first: a failure names the seam
	.venv-lock/bin/python -m pytest -m 'not slow or slow'
	{ grep '^#' $(LOCK); .venv-lock/bin/pip freeze --exclude-editable \
		| grep -v '^protein-mlm' | sed 's/^\(torch==[0-9.]*\)+.*/\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf .venv-lock

clean:
	rm -rf $(VENV) .cache .pytest_cache
