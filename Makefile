# The two commands of the README: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=
# glibc huge pages for the processes make starts (pytest and its workers); fmjax entry points
# re-execute themselves with the mimalloc host allocator anyway (fmjax/host_memory.py says why).
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: demo test test-fast install clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[torch,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m fmjax.demo --output $(DEMO_DIR)

# The whole suite, slow end-to-end tests included (CI runs this via .ci/run).
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -q -ra $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -q -ra -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
