# Two commands do all the set-up on a fresh machine:
#   make test    create .venv, install the project with its test extra, run pytest
#   make bench   run the main job: the seed's demos and the benchmark
# and CI adds a third:
#   make test-triton39   the kernel tests again, on the newest Triton the kernels support
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
# torch==2.13.0 resolves to the CPU wheel on a machine without CUDA; an unpinned
# torch would download a multi-GB CUDA build. triton 3.6 matches the GPU image.
TORCH   ?= torch==2.13.0
TRITON  ?= triton==3.6.0
# The other end of the supported range (setup.cfg): current CUDA builds of torch bring it.
# It goes into its own folder, put first on PYTHONPATH, so .venv keeps 3.6.
TRITON_NEWEST     ?= triton==3.9.0
TRITON_NEWEST_DIR := .triton39
# Every kernel test file but the sm_90 compile test (slow, and a compiler check rather than
# an interpreter one): new tests/test_kernel_*.py files join by themselves.
KERNEL_TESTS := $(filter-out tests/test_kernel_hopper_compile.py,$(sort $(wildcard tests/test_kernel_*.py)))
# The interpreter runs one thread per test process (conftest.py): two pytest workers keep both cores
# of the project's machines busy (measured: 4 min 34 s instead of about 7 min). A file stays on one
# worker (--dist loadfile), so module-scoped fixtures, such as the gloo process pools, start once.
PYTEST_WORKERS ?= 2
PYTEST := $(PYTHON) -m pytest -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: test test-triton39 bench install clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet "$(TORCH)" "$(TRITON)" "numpy<2.4"
	$(PYTHON) -m pip install --quiet -e ".[test,bench]"
	touch $@

$(TRITON_NEWEST_DIR)/.installed: Makefile | $(VENV)/.installed
	rm -rf $(TRITON_NEWEST_DIR)
	$(PYTHON) -m pip install --quiet --no-deps --target $(TRITON_NEWEST_DIR) "$(TRITON_NEWEST)"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PYTEST)

test-triton39: $(VENV)/.installed $(TRITON_NEWEST_DIR)/.installed
	PYTHONPATH=$(TRITON_NEWEST_DIR) $(PYTHON) -c "import triton; \
		assert triton.__version__ == '$(patsubst triton==%,%,$(TRITON_NEWEST))', triton.__version__; \
		print('triton', triton.__version__, 'from', triton.__file__)"
	PYTHONPATH=$(TRITON_NEWEST_DIR) $(PYTEST) $(KERNEL_TESTS)

bench: $(VENV)/.installed
	$(PYTHON) demo.py
	$(PYTHON) -m bench

clean:
	rm -rf $(VENV) $(TRITON_NEWEST_DIR) *.egg-info .pytest_cache
