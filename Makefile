# Both targets create .venv (Python 3.11) on first use and install the package with its extras.
PYTHON ?= python3.11
VENV ?= .venv
export TFW_MNIST_DIR ?= $(abspath ../shared/datasets/mnist)
export TFW_MLPNET_NPZ ?= $(abspath ../shared/models/mlpnet_mnist_reference.npz)

$(VENV)/installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test,plot]"
	touch $@

.PHONY: demo test
demo: $(VENV)/installed  ## the main job: one-shot WoodFisher vs magnitude on the reference MLPNet, MNIST
	$(VENV)/bin/python examples/oneshot_mnist.py

test: $(VENV)/installed  ## the test suite (the README's test command)
	$(VENV)/bin/python -m pytest -q tests
