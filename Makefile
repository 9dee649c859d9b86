# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv once (torch first, then megatron-core, then this package with the extras it
# needs: `demo` -> .[demo], `test` -> .[dev,demo] since the tests exercise the demo and the
# benchmarks); re-running with .venv present installs nothing unless setup.py changed.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel on this project's machines; on a CUDA machine pass e.g. TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0
MCORE_SPEC ?= megatron-core==0.19.2
PY := $(VENV)/bin/python
# one stamp per install: the core (torch, megatron-core, the library), then each set of extras on top
STAMP := $(VENV)/.camopd-installed
DEMO_STAMP := $(VENV)/.camopd-demo-installed
TEST_STAMP := $(VENV)/.camopd-test-installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	# numpy & co first and WITHOUT --ignore-requires-python (else pip picks a py3.12-only numpy sdist)
	$(PY) -m pip install --quiet numpy "packaging>=24.2" psutil tqdm
	# megatron-core 0.19.2 declares Python>=3.12 but ships a cp311 wheel that works on 3.11
	$(PY) -m pip install --quiet --no-deps --ignore-requires-python $(MCORE_SPEC)
	$(PY) -m pip install --quiet -e .
	touch $@

# the extras' stamps depend on the core stamp, so a changed setup.py re-installs them too
$(DEMO_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $@

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,demo]'
	touch $@

demo: $(DEMO_STAMP)
	$(PY) -m camopd_megatron.demo $(DEMO_ARGS)

test: $(TEST_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(TEST_STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
