# One command each: `make demo` (set up + run the main job), `make test` (set up + run the tests).
# The venv is built on first use; TORCH pins the CPU wheel this project is tested with.
VENV  ?= .venv
TORCH ?= torch==2.13.0
PY    := $(VENV)/bin/python
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-nbs test-py check-export export clean-nbs readme lab bench docs

setup: $(STAMP)

$(STAMP): setup.py settings.ini
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/batchless-nb demo --out runs/demo

test: $(STAMP) check-export test-nbs test-py

# The package is generated from nbs/: a fresh export must not change it.
check-export: $(STAMP)
	@rm -rf .export-check && cp -r batchless_nb .export-check
	$(BIN)/nbdev_export
	@diff -r -x __pycache__ .export-check batchless_nb > /dev/null || { diff -r -x __pycache__ .export-check batchless_nb; rm -rf .export-check; echo "batchless_nb/ differs from a fresh nbdev_export of nbs/: export and commit both"; exit 1; }
	@rm -rf .export-check

# One torch thread per process: the tests run two notebooks (or DDP ranks) at once on small models.
test-nbs: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2

# The venv's bin first on PATH: torch builds the C++ kernel (tests/test_kernel.py) with the ninja the venv installs.
test-py: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -p no:cacheprovider

export: $(STAMP)
	$(BIN)/nbdev_export

clean-nbs: $(STAMP)
	$(BIN)/nbdev_clean

# nbdev_readme needs Quarto; nbconvert renders nbs/index.ipynb to README.md offline.
readme: $(STAMP)
	$(BIN)/jupyter nbconvert --to markdown --RegexRemovePreprocessor.patterns='["^\\#\\| ?hide"]' --execute --output-dir . --output README nbs/index.ipynb

lab: $(STAMP)
	$(BIN)/jupyter lab nbs

# The docs site, offline: executes nbs/, processes them with nbdev (show_doc), Sphinx writes _site/.
# With Quarto installed, `nbdev_docs` builds nbdev's own site instead.
docs: $(STAMP)
	$(PY) nbs/_sphinx/build_docs.py --out _site

bench: $(STAMP)
	$(PY) tests/benchmarks/bench_norm.py
