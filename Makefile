# hubmerge developer commands. Every target works on a fresh clone: `setup` creates .venv/ first.
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned so pip takes the local CPU wheel instead of a multi-GB CUDA build.
TORCH := torch==2.13.0

# open_clip (the `clip` extra) needs torchvision, and PyPI's torchvision does not import beside the 2.13.0 CPU
# wheel: its tests get their own venv with the torch/torchvision pair this machine keeps on disk (~5.5 GB).
CLIP_VENV := .venv-clip
CLIP_TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup setup-clip demo test test-clip lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup-clip: $(CLIP_VENV)/.installed

$(CLIP_VENV)/.installed: pyproject.toml
	python3 -m venv $(CLIP_VENV)
	$(CLIP_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CLIP_VENV)/bin/python -m pip install --quiet $(CLIP_TORCH)
	$(CLIP_VENV)/bin/python -m pip install --quiet -e ".[test,clip]"
	touch $@

demo: setup
	$(PY) demo/prepare.py
	$(VENV)/bin/hubmerge run demo/recipes/ta.yaml --overwrite --quiet
	$(VENV)/bin/hubmerge run demo/recipes/consensus.yaml --overwrite --quiet
	$(VENV)/bin/hubmerge run demo/recipes/tall.yaml --overwrite
	$(VENV)/bin/hubmerge materialize out/demo-tall --task unicode_category --output out/demo-unicode_category --overwrite
	$(PY) demo/report.py out/demo-ta out/demo-consensus out/demo-tall
	$(PY) demo/serve.py out/demo-tall

test: setup lint
	$(PY) -m pytest

# open_clip checkpoints end to end; in the default venv these tests are skipped.
test-clip: setup-clip
	$(CLIP_VENV)/bin/python -m pytest tests/test_open_clip.py

lint: setup
	$(VENV)/bin/ruff check hubmerge tests benchmarks demo
	$(VENV)/bin/ruff format --check hubmerge tests benchmarks demo

clean:
	rm -rf $(VENV) $(CLIP_VENV) out .cache .pytest_cache
