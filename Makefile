# covidcxr — the two quick-start commands are `make demo` and `make test`; both bootstrap .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo

.PHONY: demo test bench install clean

# Reinstall when the package's requirements change.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, on its own: the pin resolves to the local CPU build, so the
	# resolver never reaches for a CUDA build while satisfying other packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/covidcxr demo --out $(DEMO_DIR)
	# train on phantoms with a planted corner marker: the test AUC it reaches is the shortcut's
	$(BIN)/covidcxr train recipes/demo.yaml --run-dir $(DEMO_DIR)/run-shortcut --no-progress

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --out benchmarks/results.json

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
