# Two entry points for a fresh machine with only Python 3.11 and pip:
#   make train   - set up .venv (CPU torch), then run `dpengine train` on the default config
#   make test    - set up .venv with the test extras, then run the whole test suite (slow tests too)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dpengine-installed
# torch==2.13.0 is the CPU build on these machines; an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: train test test-fast test-slow bench bench-quick clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/dpengine train

# DPENGINE_REQUIRE_TRITON=1: the Triton kernel tests fail instead of skipping if triton is missing
test: $(STAMP)
	DPENGINE_REQUIRE_TRITON=1 $(PY) -m pytest -q -m "not slow"
	DPENGINE_REQUIRE_TRITON=1 $(PY) -m pytest -q -m "slow"

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow"

bench-quick: $(STAMP)
	$(VENV)/bin/dpengine bench --quick --output-dir bench-out

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
