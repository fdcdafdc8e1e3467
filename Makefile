# hubmerge developer commands. Every target works on a fresh clone: `setup` creates .venv/ first.
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned so pip takes the local CPU wheel instead of a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(PY) demo/prepare.py
	$(VENV)/bin/hubmerge run demo/recipes/ta.yaml --overwrite --quiet
	$(VENV)/bin/hubmerge run demo/recipes/consensus.yaml --overwrite --quiet
	$(VENV)/bin/hubmerge run demo/recipes/tall.yaml --overwrite
	$(VENV)/bin/hubmerge materialize out/demo-tall --task unicode_category --output out/demo-unicode_category --overwrite
	$(PY) demo/report.py out/demo-ta out/demo-consensus out/demo-tall

test: setup lint
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check hubmerge tests benchmarks demo
	$(VENV)/bin/ruff format --check hubmerge tests benchmarks demo

clean:
	rm -rf $(VENV) out .cache .pytest_cache
