# ditjax: `make train` (set up, train configs/default.py on the bundled digits) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/default
# Threads for pytest-xdist; JAX tests compile a lot, two workers overlap compilation on 2 cores.
TEST_WORKERS ?= 2

# A Python >= 3.12 (jax >= 0.11 needs it), 3.12 preferred: python3.12/3.13/python3 on PATH, else pyenv's.
define find_python
for c in python3.12 python3.13 python3; do \
  p=$$(command -v $$c) && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo $$p; exit 0; }; \
done; \
if command -v pyenv >/dev/null; then \
  for v in $$(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])' | sort -V); do \
    p=$$(PYENV_VERSION=$$v pyenv which python 2>/dev/null) && { echo $$p; exit 0; }; \
  done; \
fi; exit 1
endef

.PHONY: setup train test clean
setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	@py=$$($(find_python)) || { echo "ditjax needs Python >= 3.12 (jax >= 0.11 requires it) and none was found."; \
	  echo "Install one, e.g. 'pyenv install 3.12' or your OS package python3.12 (with venv), then re-run make."; exit 1; }; \
	echo "using $$py ($$($$py --version))"; \
	[ -x $(PY) ] && $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null || { rm -rf $(VENV); $$py -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

train: setup
	$(PY) -m ditjax.train --config configs/default.py --workdir $(WORKDIR)

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --durations=15

clean:
	rm -rf $(VENV) runs .pytest_cache
