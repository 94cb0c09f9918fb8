# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create or reuse the virtual environment in .venv first.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned here (a CPU wheel lies on the build machines' disk); the package accepts a range.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	.venv/bin/mm1 demo

test: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m pytest

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf .venv runs data
