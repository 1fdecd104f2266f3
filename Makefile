# Every target creates .venv (Python 3.11) on first use and installs the package with its extras.
PYTHON ?= python3.11
VENV ?= .venv
export TFW_MNIST_DIR ?= $(abspath ../shared/datasets/mnist)
export TFW_MLPNET_NPZ ?= $(abspath ../shared/models/mlpnet_mnist_reference.npz)
export TFW_CIFAR10_DIR ?= $(abspath ../shared/datasets/cifar10)
export TFW_RESNET20_NPZ ?= $(abspath ../shared/models/resnet20_cifar10_reference.npz)

$(VENV)/installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test,plot,docs]"
	touch $@

.PHONY: demo test test-fast lint docs
demo: $(VENV)/installed  ## the main job: one-shot WoodFisher vs magnitude on the reference MLPNet, MNIST
	$(VENV)/bin/python examples/oneshot_mnist.py

test: $(VENV)/installed  ## the test suite (the README's test command); Keras 3 tests in their own process
	$(VENV)/bin/python -m pytest -q -n 2 tests && $(VENV)/bin/python -m pytest -q -n 2 tests_keras3

test-fast: $(VENV)/installed  ## the fast tier: no data, numerical core against NumPy references
	$(VENV)/bin/python -m pytest -q -n 2 -m "not slow" tests && $(VENV)/bin/python -m pytest -q -n 2 -m "not slow" tests_keras3

lint: $(VENV)/installed
	$(VENV)/bin/ruff check .

docs: $(VENV)/installed  ## the API reference, build/api/index.html
	PATH="$(abspath $(VENV))/bin:$$PATH" bash docs/build.sh
