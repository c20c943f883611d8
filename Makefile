# Two commands: `make train` (default training run) and `make test` (test suite). Each creates .venv first.
VENV := .venv
PYTHON := $(VENV)/bin/python
ARGS ?=

# On a machine without an NVIDIA GPU, install the CPU build of torch first with an exact pin (a version
# range pulls PyPI's multi-GB CUDA build); with a GPU, the project's range takes the default CUDA build.
TORCH_CPU := torch==2.13.0

.PHONY: install train test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(VENV)/bin/pip install $(TORCH_CPU); fi
	$(VENV)/bin/pip install -e '.[dev,sweep,trackers]'
	touch $@

train: install
	$(PYTHON) train.py $(ARGS)

test: install
	$(PYTHON) -m pytest $(ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .cache .pytest_cache
