# Two commands do all set-up on a fresh clone; both create and use .venv in the repo root.
#   make run    the CIFAR-10 experiment (configs/cifar10.yaml) on an embedded local Ray
#   make test   the test suite (real local Ray, real CIFAR-10 from ../shared/data/cifar10)
# Extra flags for the job: make run ARGS="--rounds 2 --model resnet18"

PYTHON ?= python3
VENV := .venv
DATA ?= ../shared/data/cifar10
OUT ?= runs/cifar10
ARGS ?=

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test,bench]"
	touch $@

.PHONY: install run test
install: $(VENV)/.installed

run: install
	$(VENV)/bin/python jobs/cifar10.py --data-dir $(DATA) --out $(OUT) $(ARGS)

test: install
	$(VENV)/bin/python -m pytest -q $(ARGS)
