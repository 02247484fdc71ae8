# Two entry points for a fresh machine: `make demo` (the main job on an embedded default) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TESTS ?= tests
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo lint test bench clean

$(BIN)/distill: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/distill

install: $(BIN)/distill

demo: install
	$(BIN)/distill demo --out demo-out

# lint, format and types (settings in pyproject.toml): all three run, each failure names its check, any fails
lint: install
	@fail=0; \
	$(BIN)/ruff check . || { echo "make lint: ruff check failed (try: ruff check --fix .)" >&2; fail=1; }; \
	$(BIN)/ruff format --check . || { echo "make lint: ruff format --check failed (run: ruff format .)" >&2; fail=1; }; \
	$(BIN)/mypy || { echo "make lint: mypy found type errors" >&2; fail=1; }; \
	exit $$fail

test: install lint
	$(BIN)/python -m pytest -q $(TESTS) || { s=$$?; [ $$s -ne 5 ] || echo "make test: pytest collected no tests" >&2; exit $$s; }

bench: install
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m benchmarks.cache_overhead
	$(BIN)/python -m benchmarks.train_overhead

clean:
	rm -rf $(VENV) demo-out build *.egg-info
