# The gates, runnable on any machine: `make demo` (main job) and `make test` (all checks).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test check pytest serve train-cxr train-polyp clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Serving needs no torch: the demo installs only the runtime (+ the NEMA demo radiographs).
$(VENV)/.serve-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[data]"
	touch $@

# Tests also train tiny models and check the MONAI wrappers: torch from this machine's local disk.
# They run against real servers from Debian's packages (Orthanc + DICOMweb, dcmtk, dicom3tools).
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	scripts/install_servers.sh
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[data,train,dev,postgres]"
	touch $@

demo: $(VENV)/.serve-installed
	$(BIN)/dxassist demo

check: $(VENV)/.dev-installed
	$(BIN)/ruff check models serving training tests
	$(BIN)/ruff format --check models serving training tests
	$(BIN)/mypy
	$(BIN)/lint-imports

pytest: $(VENV)/.dev-installed
	scripts/run_tests.sh

test: check pytest

train-cxr: $(VENV)/.dev-installed
	$(BIN)/python -m training.cli cxr --config configs/training/cxr_triage.yaml --out var/train/cxr

train-polyp: $(VENV)/.dev-installed
	$(BIN)/python -m training.cli polyp --config configs/training/endoscopy_polyp.yaml --out var/train/polyp

clean:
	rm -rf var/store var/results.sqlite3 .pytest_cache .mypy_cache .ruff_cache
