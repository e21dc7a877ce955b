# Two commands do all the set-up on a fresh machine:
#   make test    create .venv, install the project with its test extra, run pytest
#   make bench   run the main job: the seed's demos and the benchmark
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
# torch==2.13.0 resolves to the CPU wheel on a machine without CUDA; an unpinned
# torch would download a multi-GB CUDA build. triton 3.6 matches the GPU image.
TORCH   ?= torch==2.13.0
TRITON  ?= triton==3.6.0

.PHONY: test bench install clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet "$(TORCH)" "$(TRITON)" "numpy<2.4"
	$(PYTHON) -m pip install --quiet -e ".[test,bench]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PYTHON) -m pytest

bench: $(VENV)/.installed
	$(PYTHON) demo.py
	$(PYTHON) -m bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
