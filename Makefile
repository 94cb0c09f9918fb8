# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create or reuse the virtual environment in .venv first.
PY := .venv/bin/python
# Two stamps: the demo needs mm1's own dependencies only; the tests, lint and benchmarks add the dev
# extras (transformers, pycocoevalcap, scipy, ...), which took half a minute more of a fresh demo's set-up.
STAMP := .venv/.installed
DEV_STAMP := .venv/.installed-dev

.PHONY: setup demo test lint bench mutate clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned here (a CPU wheel lies on the build machines' disk); the package accepts a range.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

setup: $(DEV_STAMP)

demo: $(STAMP)
	.venv/bin/mm1 demo

# MM1_REQUIRE_REFERENCES=1: a test whose reference (pycocoevalcap, Java, transformers, scipy) is
# missing fails instead of skipping (tests/references.py), so CI cannot pass by skipping them.
test: $(DEV_STAMP)
	MM1_REQUIRE_REFERENCES=1 OMP_NUM_THREADS=2 $(PY) -m pytest

# ruff: lint rules, import order and formatting (pyproject.toml [tool.ruff]); CI runs it before the tests.
lint: $(DEV_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# One-line bugs that once passed the suite, each applied to a temp copy: the tests named beside
# each must fail (tools/mutate.py; about 10 minutes, not part of CI).
mutate: $(DEV_STAMP)
	OMP_NUM_THREADS=2 $(PY) tools/mutate.py

bench: $(DEV_STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf .venv runs data
