# Two commands set everything up on a fresh machine that has only Python: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest perf-guard bench clean install dist smoke-install

# The venv is rebuilt when pyproject.toml changes, so a stale environment never hides a missing dependency.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# `make run LISTEN=127.0.0.1:9443` when 8443 is taken.
LISTEN ?= 127.0.0.1:8443
run: $(STAMP)
	$(BIN)/tlsgate demo --listen $(LISTEN)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

test: lint typecheck pytest perf-guard

# Fails when tlsgate executes >3% more instructions per new connection or per keep-alive request than the
# committed baseline (callgrind, ~1-2 min); prints SKIP and passes without valgrind or on another machine.
perf-guard: $(STAMP)
	$(BIN)/python bench/instructions.py --check bench/baseline-instructions.json

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build dist

# -- packaging (docs/install.md) --------------------------------------------------------------------------------
# `make install`: `tlsgate` on your PATH, independent of this checkout and its .venv. With pipx, in a venv of its
# own (~/.local/pipx/venvs/tlsgate, command in ~/.local/bin); without, `pip install --user .` into your user site.
install:
	@if command -v pipx >/dev/null 2>&1; then \
		echo "pipx install --force ."; pipx install --force .; \
	else \
		echo "$(PYTHON) -m pip install --user ."; $(PYTHON) -m pip install --user .; \
	fi

# `make dist`: dist/tlsgate-X.tar.gz and dist/tlsgate-X-py3-none-any.whl, checked as PyPI would check them.
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

# Build, check, install the wheel into a clean venv and run a real tunnel from it (.ci/smoke_install.py).
smoke-install: $(STAMP)
	$(BIN)/python .ci/smoke_install.py
