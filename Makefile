# make demo   create .venv, install, train the default config (MiniLM + LoRA on the sample ledger)
# make test   create .venv, install, run the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint clean

install: $(VENV)/.installed

# torch first, pinned: a bare `torch` requirement on a CPU machine pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	$(PY) src/lorasweep/train.py

# The venv's bin/ first on PATH: the tests run the real `deepspeed` and `torchrun` commands.
# Two workers (pytest-xdist) share out the tests; the files whose module fixtures are costly (a
# trained run, an MLflow server, the installed wheel) run on one worker each (xdist_group).
test: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -ra --durations=15 -n 2 --dist loadgroup

lint: install
	$(VENV)/bin/ruff check src tests bench data

clean:
	rm -rf .cache multirun/runs multirun/sweeps mlflow.db mlruns
