# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
ARGS ?=

.PHONY: demo demo-loop demo-rollout test test-arm64 lint typecheck bench bench-quick clean

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

# The edge on emulated Raspberry Pi CPUs (Pi 4: Cortex-A72, Pi 5: Cortex-A76) at both ends of
# the supported numpy/onnxruntime ranges, against a native cloud on loopback (tests/arm64).
# Needs qemu-user-static (installed here with apt-get when run as root) and Debian's and
# PyPI's package registries; the arm64 root and wheels are cached in $(ARM64_CACHE).
ARM64_CACHE ?= $(HOME)/.cache/hybridml/arm64
test-arm64: $(VENV)/.dev-installed
	@command -v qemu-aarch64-static >/dev/null 2>&1 || \
		{ [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq qemu-user-static >/dev/null; } || \
		{ echo "test-arm64: needs qemu-user-static (as root: apt-get install qemu-user-static)"; exit 1; }
	HYBRIDML_ARM64_CACHE=$(ARM64_CACHE) $(PY) -m tests.arm64.rootfs
	HYBRIDML_ARM64_CACHE=$(ARM64_CACHE) $(PY) -m pytest -q -p no:cacheprovider -m arm64 tests/arm64 $(ARGS)

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
