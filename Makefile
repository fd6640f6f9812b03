# The two commands a newcomer needs: `make demo` and `make test`. Both install first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# pip 26.3 refuses the pb1-detectron2 sdist (a URL dependency in its extras); 26.2.1 accepts it.
PIP_VERSION := 26.2.1
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo

.PHONY: help install java demo test bench figures gpu-check clean

help:
	@echo "make demo    synthetic data -> train -> evaluate -> predict -> archive -> serve (installs first)"
	@echo "make test    ruff, then the test suite (installs first)"
	@echo "make bench   severstal bench convert: RLE -> COCO instances vs the pixel pipeline, real masks"
	@echo "make figures the real sample's figures (graphs/) and the README's pictures (images/), with the demo's run if any"
	@echo "make gpu-check  on an NVIDIA GPU: GPU tests and one table (train AMP, fp16, TorchServe, ONNX Runtime, TensorRT)"
	@echo "make install only the virtual environment .venv"

install: java $(STAMP)

# TorchServe's frontend is Java: install a JRE when missing and we may (root), else say what to do.
java:
	@if java -version 2>&1 | grep -Eq 'version "(1[7-9]|[2-9][0-9])'; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "install: Java 17 missing, installing openjdk-17-jre-headless"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless; \
	else \
		echo "install: TorchServe needs Java 17 or newer on the PATH: install openjdk-17-jre-headless" >&2; exit 1; \
	fi

$(STAMP): pyproject.toml tools/build_detectron2.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q pip==$(PIP_VERSION)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	wheel="$$($(PY) tools/build_detectron2.py --python $(PY) --cache .cache/detectron2)" && $(PIP) install -q "$$wheel"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/severstal demo --out $(DEMO_DIR)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/severstal bench convert

# Figures of the real sample (graphs/) and the README's pictures (images/); with the demo's run when there is one.
figures: install
	$(VENV)/bin/severstal figures --out graphs --images-out images $$(test -d $(DEMO_DIR)/run && echo --run $(DEMO_DIR)/run)

# The GPU path in one command, at most 8 minutes. An offline GPU machine brings its own .venv (docs/gpu.md: what to
# carry), so an existing .venv is used as it is and only a missing one is installed.
gpu-check:
	test -x $(PY) || $(MAKE) install
	timeout 600 $(VENV)/bin/severstal bench gpu $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache $(DEMO_DIR)
