# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
ARGS ?=

.PHONY: demo demo-loop demo-rollout test lint typecheck bench bench-quick clean

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

# The monitoring and continuous-training loop, end to end, on a stream that drifts part-way.
demo-loop: $(VENV)/.cloud-installed
	$(PY) -m hybridml.cloud.demo_loop $(ARGS)

# Safe rollouts: a canary on a simulated fleet of 30 devices, aborted once and promoted once.
demo-rollout: $(VENV)/.cloud-installed
	$(PY) -m hybridml.cloud.demo_rollout $(ARGS)

# Tests run on every logical CPU (pytest-xdist), a test module per worker (its fixtures once),
# in collection order (tests/conftest.py puts the minute-long modules first);
# JOBS=0 runs them in this process, ARGS adds pytest options (ARGS="-k sync" ...).
JOBS ?= logical
test: $(VENV)/.dev-installed
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile --no-loadscope-reorder $(ARGS)

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check cloud edge shared hybridml_pkg tests benchmarks
	$(VENV)/bin/mypy cloud edge shared hybridml_pkg
	$(VENV)/bin/mypy tests/*.py tests/*/*.py benchmarks/*.py

$(VENV)/.bench-installed: $(PY) pyproject.toml
	$(PIP) install -e '.[bench]'
	touch $@ $(VENV)/.dev-installed $(VENV)/.cloud-installed

# wrk is optional (the suite falls back to a Python load generator); install it when we can.
bench: $(VENV)/.bench-installed
	@command -v wrk >/dev/null 2>&1 || apt-get install -y -qq wrk >/dev/null 2>&1 || \
		echo "bench: wrk not installed; serving uses the Python load generator"
	$(PY) -m benchmarks.run $(ARGS)

bench-quick: $(VENV)/.bench-installed
	$(PY) -m benchmarks.run --quick $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
