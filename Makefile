# spkr — one-command set-up, demo and tests. Pinned torch so a fresh machine never pulls a surprise build.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_PIN := torch==2.14.1
TORCHAUDIO_PIN := torchaudio==2.11.0
PYTEST_ARGS ?=
# when make started: `setup` runs first (a prerequisite of demo/test), so the end of its recipe gives its time
MAKE_START := $(shell date +%s)

.PHONY: setup demo test lint format bench clean

setup:
	$(PIP) install --quiet $(TORCH_PIN)
	$(PIP) install --quiet --no-deps $(TORCHAUDIO_PIN)
	$(PIP) install --quiet -e ".[dev]"
	@echo "== setup (pip installs) took $$(( $$(date +%s) - $(MAKE_START) )) s"

demo: setup
	bash scripts/demo.sh
	@echo "== make demo took $$(( $$(date +%s) - $(MAKE_START) )) s (setup included)"

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

test: setup lint
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PYTHON) tools/bench_shard.py
	$(PYTHON) tools/bench_loader.py
	$(PYTHON) tools/bench_model.py

clean:
	rm -rf shards/demo runs/demo .pytest_cache
