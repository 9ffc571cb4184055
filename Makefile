# Quick start: `make demo` then `make test`. Both create .venv and install the project on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.wszoo-installed
ARCH := $(shell uname -m)
# The torch builds this project is tested with (pip takes them from the local wheel cache where present).
ifeq ($(ARCH),aarch64)
TORCH_PINS ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
endif
PYTEST_ARGS ?=
# make test's processes (pytest-xdist, a test file to a process: a file's shared fixtures are built once)
TEST_WORKERS ?= 2

FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-slow lint install data clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist package (MIT licence), installed when apt allows it.
data:
	@test -f $(FMNIST_DIR)/t10k-images-idx3-ubyte.gz || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null); } || \
	  echo "warning: $(FMNIST_DIR) is missing; install Debian's dataset-fashion-mnist or pass --data-dir"

# The main job: evaluate the embedded default (shipped weights) on the 10,000 Fashion-MNIST test images.
demo: $(STAMP) data
	$(VENV)/bin/wszoo eval --model resnet_mini_gn_ws.fmnist --pretrained --dataset fashion-mnist --split test -b 256

# ruff (pyflakes, pycodestyle, import order, bugbear; pyproject.toml), also run by `make test`
lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) data lint
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
