# fedpact: `make demo` and `make test` each bootstrap .venv (idempotent) and then run.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Offline-safe Flower: no telemetry, no update check, no per-run dependency installation.
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export RAY_USAGE_STATS_ENABLED := 0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test bench lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 2; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing torch 2.13.0 (CPU build) and fedpact into $(VENV) ..."
	@$(PIP) install "torch==2.13.0" 2>&1 | grep -v "is ignored: it is neither" || true
	@$(BIN)/python -c "import torch" || { echo "error: torch did not install"; exit 2; }
	@$(PIP) install -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
	@# Test-only PSI peer; it pins an older protobuf than Flower needs, so without its deps.
	@$(PIP) install --no-deps "openmined-psi==2.0.6" 2>&1 | grep -v "is ignored: it is neither" || true
	@$(BIN)/python -c "import fedpact, flwr, opacus" || { echo "error: fedpact did not install"; exit 2; }
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedpact demo --home .fedpact/demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pytest -m bench -s -p no:cacheprovider --timeout 3600 bench/

lint: $(STAMP)
	$(BIN)/ruff check fedpact tests bench conftest.py

clean:
	rm -rf .fedpact .pytest_cache .ruff_cache
