# Two commands do all the set-up on a fresh machine:
#   make test    create .venv, install the project with its test extra, run pytest
#   make bench   run the main job: the seed's demos and the benchmark
# and CI adds a third:
#   make test-triton39   the kernel tests again, on the newest Triton the kernels support
# and one for the kernels' launch configs (see its target):
#   make compile-matrix  every config compiled for every chip; writes kernels/footprints.json
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
# torch comes from PyTorch's CPU wheel index: from PyPI alone, torch==2.13.0 on Linux is the CUDA
# build, several GB with its nvidia-* wheels, on any machine. TORCH_INDEX is searched next to pip's
# own configuration (PyPI, or a local wheel folder), for torch alone (--no-deps: its dependencies
# come with the project's install, from pip's own configuration); the +cpu wheel sorts above PyPI's
# 2.13.0, so pip takes it. `make TORCH_INDEX=` skips the index (a GPU machine that wants the CUDA
# build). Where the index cannot be reached (offline, a local folder serving torch), pip gives up
# on it after one retry, under a second, instead of five with back-off (about 8 s per package
# looked up there); --timeout bounds the wait on a host that never answers (PIP_DEFAULT_TIMEOUT may
# say minutes). triton 3.6 matches the GPU image.
TORCH       ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIP   := $(if $(strip $(TORCH_INDEX)),--no-deps --extra-index-url $(TORCH_INDEX) --retries 1 --timeout 15)
TRITON      ?= triton==3.6.0
# The other end of the supported range (setup.cfg): current CUDA builds of torch bring it.
# It goes into its own folder, put first on PYTHONPATH, so .venv keeps 3.6.
TRITON_NEWEST     ?= triton==3.9.0
TRITON_NEWEST_DIR := .triton39
# Every kernel test file but the GPU compile test (slow, and a compiler check rather than
# an interpreter one): new tests/test_kernel_*.py files join by themselves.
KERNEL_TESTS := $(filter-out tests/test_kernel_gpu_compile.py,$(sort $(wildcard tests/test_kernel_*.py)))
# The interpreter runs one thread per test process (conftest.py): two pytest workers keep both cores
# of the project's machines busy (measured: 4 min 34 s instead of about 7 min). A file stays on one
# worker (--dist loadfile), so module-scoped fixtures, such as the gloo process pools, start once.
PYTEST_WORKERS ?= 2
PYTEST := $(PYTHON) -m pytest -n $(PYTEST_WORKERS) --dist loadfile

.PHONY: test test-triton39 compile-matrix bench install clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet $(TORCH_PIP) "$(TORCH)"
	$(PYTHON) -m pip install --quiet "$(TRITON)" "numpy<2.4"
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

# Every config the launchers can pick, compiled for sm_80 to Blackwell on Triton 3.6 and 3.9;
# writes kernels/footprints.json.
compile-matrix: $(VENV)/.installed $(TRITON_NEWEST_DIR)/.installed
	$(PYTHON) -m tests.gpu_compile --workers 2 --write-footprints
	PYTHONPATH=$(TRITON_NEWEST_DIR) $(PYTHON) -m tests.gpu_compile --workers 2 --write-footprints

bench: $(VENV)/.installed
	$(PYTHON) demo.py
	$(PYTHON) -m bench

clean:
	rm -rf $(VENV) $(TRITON_NEWEST_DIR) *.egg-info .pytest_cache
