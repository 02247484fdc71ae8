# Two entry points for a fresh machine: `make demo` (the main job on an embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TESTS ?= tests
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench clean

$(BIN)/distill: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/distill

install: $(BIN)/distill

demo: install
	$(BIN)/distill demo --out demo-out

test: install
	$(BIN)/python -m pytest -q $(TESTS) || { s=$$?; [ $$s -ne 5 ] || echo "make test: pytest collected no tests" >&2; exit $$s; }

bench: install
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/cache_overhead.py
	$(BIN)/python benchmarks/train_overhead.py

clean:
	rm -rf $(VENV) demo-out build *.egg-info
