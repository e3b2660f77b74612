# Two commands do all set-up on a fresh clone; both create and use .venv in the repo root.
#   make run    the CIFAR-10 experiment (configs/cifar10.yaml) on an embedded local Ray
#   make test   the test suite (real local Ray, real CIFAR-10 from ../shared/data/cifar10, a real Label Studio
#               server from .venv-label-studio: its own venv, since label-studio's pins clash with ours)
# Extra flags for the job: make run ARGS="--rounds 2 --model resnet18"

PYTHON ?= python3
VENV := .venv
LS_VENV := .venv-label-studio
DATA ?= ../shared/data/cifar10
OUT ?= runs/cifar10
ARGS ?=

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[test,bench]"
	touch $@

$(LS_VENV)/.installed:
	$(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install --quiet --upgrade pip
	$(LS_VENV)/bin/pip install --quiet label-studio==1.23.2
	touch $@

.PHONY: install label-studio-venv run test
install: $(VENV)/.installed

label-studio-venv: $(LS_VENV)/.installed

run: install
	$(VENV)/bin/python jobs/cifar10.py --data-dir $(DATA) --out $(OUT) $(ARGS)

test: install label-studio-venv
	$(VENV)/bin/python -m pytest -q $(ARGS)
