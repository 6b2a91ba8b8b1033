# The two set-up commands: `make demo` and `make test`. Both create .venv and install wsikit into it.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.wsikit-installed

.PHONY: demo demo-full test test-slow lint bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	# staintools pins opencv-python, which would overwrite opencv-python-headless's cv2/: no deps.
	$(PY) -m pip install -q --no-deps "staintools==2.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/wsikit demo --out demo_out

demo-full: $(STAMP)
	$(VENV)/bin/wsikit demo --out demo_out --full

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf demo_out .pytest_cache .ruff_cache
