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

# phantoms from 3 sites (a marker planted at one) -> lungs -> preprocess -> pretrain ->
# fine-tune -> seen/unseen test -> audit -> $(DEMO_DIR)/report.html (covidcxr.demo)
demo: $(STAMP)
	$(BIN)/covidcxr demo --out $(DEMO_DIR) --no-progress

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --out benchmarks/results.json

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
