# Two commands on a fresh machine (each installs what it needs into .venv first):
#   make train   - the embedded default CISPO run (extra Hydra overrides: make train ARGS="steps=5")
#   make test    - the whole test suite
# (both as root also install bubblewrap, the code reward's sandbox, when it is missing)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-cpu

.PHONY: install train test bubblewrap

$(STAMP): pyproject.toml constraints-cpu.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch resolves to a multi-GB CUDA build.
	$(PY) -m pip install -q --no-compile torch==2.13.0
	# pinned to the versions CI last passed with (constraints-cpu.txt says how to refresh them)
	$(PY) -m pip install -q --no-compile -c constraints-cpu.txt -e '.[cpu,test]'
	# PyPI's torchvision/torchaudio/torchcodec builds break transformers/vllm imports beside CPU torch.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	# Byte-compile on every core instead of pip's one (measured on 2 cores: 177 s install against
	# 226). Compiled here, not left to first imports: with PYTHONDONTWRITEBYTECODE set (as on the
	# CI machine) every Ray/vLLM process would compile torch and vLLM from source again.
	# Errors ignored as pip ignores them: a few packaged files are for newer Pythons.
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
	touch $(STAMP)

# The code reward runs solutions in a bubblewrap sandbox (rewards/sandbox.py) and refuses to
# start without it: install the Debian package when `bwrap` is missing (as root), else say how.
bubblewrap:
	@command -v bwrap >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing bubblewrap (the code reward's sandbox)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -qq bubblewrap >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq bubblewrap; }; \
	  else \
	    echo "make: bubblewrap (bwrap) is missing: the code reward and its tests need it;" \
	         "install it as root: apt-get install -y bubblewrap (Fedora: dnf install bubblewrap)" >&2; \
	    exit 1; \
	  fi; }

install: $(STAMP) bubblewrap

train: $(STAMP)
	RAY_AUTH_MODE=disabled $(VENV)/bin/cispo-train $(ARGS)

# Two pytest-xdist workers: the suite mostly waits on Ray/vLLM/DeepSpeed start-up, so two overlap
# well even on 2 cores (24 min -> 13 min on the CI machine); tests/conftest.py keeps each file on one worker.
test: $(STAMP) bubblewrap
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q -n 2 $(ARGS)
