# Every target creates .venv when it is missing. torch is installed first and pinned so that pip
# takes the CPU wheel that lies on this disk instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.torchshrink-installed
RAY    := $(VENV)/.torchshrink-ray-installed

.PHONY: setup demo test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/torchshrink demo --out out/demo

# the tests of the optional Ray backend need the [ray] extra
$(RAY): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	touch $(RAY)

test: $(STAMP) $(RAY)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench,ray]'
	$(BIN)/python -m bench

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

clean:
	rm -rf out .pytest_cache build src/*.egg-info
