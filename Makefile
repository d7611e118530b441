# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
ARGS ?=

.PHONY: demo test lint typecheck bench bench-quick clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.cloud-installed: $(PY) pyproject.toml
	$(PIP) install -e '.[cloud]'
	touch $@

$(VENV)/.dev-installed: $(PY) pyproject.toml
	$(PIP) install -e '.[dev]'
	touch $@ $(VENV)/.cloud-installed

demo: $(VENV)/.cloud-installed
	$(PY) -m hybridml.cloud.demo $(ARGS)

test: $(VENV)/.dev-installed
	$(PY) -m pytest -q $(ARGS)

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check cloud edge shared hybridml_pkg tests
	$(VENV)/bin/mypy cloud edge shared hybridml_pkg

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
