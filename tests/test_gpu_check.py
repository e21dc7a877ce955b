"""bench/gpu_check.sh on the CPU: its real preflight up to the missing GPU, then its plan with stand-ins;
and the Makefile's set-up of a machine, read from `make -n`.

The stand-ins are two programs first on PATH. `nvidia-smi` answers with a GPU's
name. `python3` runs the script's real preflight with torch.cuda answering as
that GPU (the preflight's tiny Triton launch runs on the CPU, under the
interpreter), and records every other call (pytest, bench.precompile, bench)
instead of running it. So a CPU machine sees which test files the GPU step
would import, with which environment, and how the sweep is sized for a given
card: an RTX 4090 (24 GB, sm_89) and a T4 (15 GB, sm_75, no bf16 tensor cores).
"""
import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
FORWARD = "tests/test_kernel_flash_forward.py"

FAKE_PYTHON = textwrap.dedent("""\
    import json, os, sys, types
    with open(os.environ["FAKE_CALLS"], "a") as log:
        log.write(json.dumps({"argv": sys.argv[1:], "env": {k: os.environ.get(k) for k in
                              ("ATTN_PIN_CONFIGS", "ATTN_AUTOTUNE", "TRITON_INTERPRET")}}) + "\\n")
    if sys.argv[1:] != ["-"]:
        if sys.argv[1:3] == ["-m", "pytest"]:
            print("3 passed in 1.0s")
        sys.exit(0)
    # The preflight, read from stdin, run for real against a torch.cuda that answers as FAKE_GPU.
    source = sys.stdin.read()
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.getcwd())
    import torch
    gpu = json.loads(os.environ["FAKE_GPU"])
    torch.cuda.is_available = lambda: True
    torch.cuda.get_device_name = lambda device=None: gpu["name"]
    torch.cuda.get_device_capability = lambda device=None: tuple(gpu["capability"])
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(
        total_memory=int(gpu["memory_gib"] * 2**30), multi_processor_count=gpu["sms"])
    torch.cuda.synchronize = lambda device=None: None
    randn = torch.randn
    torch.randn = lambda *shape, device=None, **kwargs: randn(*shape, **kwargs)  # device="cuda": the CPU
    exec(compile(source, "<preflight>", "exec"), {"__name__": "__main__"})
""")

RTX_4090 = dict(name="NVIDIA GeForce RTX 4090", capability=[8, 9], memory_gib=23.6, sms=128)
T4 = dict(name="Tesla T4", capability=[7, 5], memory_gib=14.6, sms=40)


def gpu_marked_files():
    """Test files with a gpu mark in their code (a decorator, pytestmark, or marks=), read by ast."""
    marked = []
    for name in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if not (name.startswith("test_") and name.endswith(".py")):
            continue
        tree = ast.parse(open(os.path.join(ROOT, "tests", name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "gpu" and (
                    isinstance(node.value, ast.Attribute) and node.value.attr == "mark"
                    or isinstance(node.value, ast.Name) and node.value.id == "mark"):
                marked.append(f"tests/{name}")
                break
    return marked


def stand_ins(tmp_path, gpu):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f"#!{sys.executable}\n{FAKE_PYTHON}")
    (bin_dir / "nvidia-smi").write_text(
        f'#!/bin/sh\ncase "$*" in *--query-gpu=name*) echo "{gpu["name"]}" ;; *) echo "nvidia-smi stand-in" ;; esac\n')
    for program in bin_dir.iterdir():
        program.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path / "out"),
               FAKE_CALLS=str(tmp_path / "calls.jsonl"), FAKE_GPU=json.dumps(gpu),
               ATTN_AUTOTUNE="1")  # a user's opt-in to runtime tuning must not reach the gpu tests
    env.pop("ATTN_PIN_CONFIGS", None)  # so that the script is seen not to set it
    return env


def run_check(tmp_path, gpu):
    env = stand_ins(tmp_path, gpu)
    run = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    return run, calls


def module_call(calls, module):
    found = [c for c in calls if c["argv"][:2] == ["-m", module]]
    assert len(found) == 1, (module, calls)
    return found[0]


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    text = open(SCRIPT).read()
    assert "pytest -m gpu" in text and '${OUT:-bench/results}' in text and "pipefail" in text
    assert "bench.tune" in text
    assert "ATTN_PIN_CONFIGS" not in text, "untimed launch configs are the default: nothing to pin"


def test_the_test_files_hold_gpu_marks_where_the_script_looks():
    marked = gpu_marked_files()
    assert FORWARD in marked and len(marked) >= 3, marked


@pytest.mark.skipif(torch.cuda.is_available(), reason="the preflight passes on a GPU machine")
def test_gpu_check_preflight_stops_with_one_line_without_a_gpu(tmp_path):
    # python3 on PATH must be this interpreter (with torch), so the preflight gets as far as the GPU.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path / "out"))
    run = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    failed = [line for line in run.stdout.splitlines() if line.startswith("preflight FAILED")]
    assert failed == ["preflight FAILED: torch sees no CUDA device"], run.stdout
    assert "pytest" not in run.stdout.split("== steps")[0].split("preflight FAILED")[1], "it must stop there"
    logs = os.listdir(tmp_path / "out")
    assert len(logs) == 1 and logs[0].startswith("gpu_check_") and logs[0].endswith(".log"), logs
    assert failed[0] in (tmp_path / "out" / logs[0]).read_text(), "the log is tee'd into $OUT"


def test_check_on_a_24_gb_card_runs_only_the_gpu_test_files_and_names_the_card(tmp_path):
    run, calls = run_check(tmp_path, RTX_4090)
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-2000:]
    assert "preflight ok: NVIDIA GeForce RTX 4090 (sm_89, 23.6 GiB), a tiny Triton launch checked" in out, out
    assert "GPU NVIDIA GeForce RTX 4090 | sm_89 | 23.6 GiB | 128 SMs" in out
    assert "== steps on NVIDIA GeForce RTX 4090 (total" in out

    # pytest imports the files that hold GPU tests and no other, the forward's first.
    pytest_call = module_call(calls, "pytest")
    argv = pytest_call["argv"]
    files = [a for a in argv if a.startswith("tests/")]
    assert files[0] == FORWARD and sorted(files) == sorted(gpu_marked_files()), files
    assert "-m" in argv[2:] and argv[argv.index("-m", 2) + 1] == "gpu"
    assert "--continue-on-collection-errors" in argv
    assert pytest_call["env"]["ATTN_AUTOTUNE"] is None, "the gpu tests run on the untimed default configs"
    assert pytest_call["env"]["ATTN_PIN_CONFIGS"] is None, "untimed is the default: nothing to pin"
    assert pytest_call["env"]["TRITON_INTERPRET"] is None, "the interpreter would time NumPy, not the GPU"

    # bf16 from sm_80 on; precompile workers: (24 - 16) GiB / 1 GiB each, at most the CPUs less two.
    sweep = module_call(calls, "bench")["argv"]
    assert "--dtype" not in sweep and sweep[sweep.index("--device") + 1] == "cuda"
    precompile = module_call(calls, "bench.precompile")["argv"]
    jobs = int(precompile[precompile.index("--jobs") + 1])
    assert jobs == max(1, min(os.cpu_count() - 2, 23 - 16)), precompile
    assert "expect OOM" not in out

    logs = [f for f in os.listdir(tmp_path / "out") if f.endswith(".log")]
    assert len(logs) == 1 and logs[0].startswith("gpu_check_nvidia-geforce-rtx-4090_"), logs


def test_check_below_sm80_sweeps_in_float16_and_warns_of_the_tests_memory(tmp_path):
    run, calls = run_check(tmp_path, T4)
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-2000:]
    assert "preflight ok: Tesla T4 (sm_75, 14.6 GiB)" in out, out
    assert "the sweep runs in float16" in out and "expect OOM failures" in out
    for module in ("bench", "bench.precompile"):
        argv = module_call(calls, module)["argv"]
        assert argv[argv.index("--dtype") + 1] == "float16", argv
    precompile = module_call(calls, "bench.precompile")["argv"]
    assert precompile[precompile.index("--jobs") + 1] == "1", "14 GiB leaves no room beside the tests: one worker"


# ----------------------------------------------------------------------------
# The Makefile: what `make -n` would run in a fresh virtual environment
# ----------------------------------------------------------------------------
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")


def make_dry_run(*args):
    run = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout.splitlines()


def pip_installs(lines):
    """{the package named first: argv} for every `pip install` line."""
    installs = {}
    for line in lines:
        words = shlex.split(line)
        if words[1:4] == ["-m", "pip", "install"]:
            values = {i + 1 for i, w in enumerate(words) if w in ("--extra-index-url", "--retries", "--timeout",
                                                                   "--target")}
            packages = [w for i, w in enumerate(words[4:], 4) if not w.startswith("-") and i not in values]
            installs[packages[0] if packages else "pip"] = words
    return installs


@needs_make
def test_make_takes_torch_alone_from_the_cpu_index_and_gives_up_on_it_fast(tmp_path):
    installs = pip_installs(make_dry_run("install", f"VENV={tmp_path / 'venv'}"))
    torch_words = installs["torch==2.13.0"]
    assert torch_words[torch_words.index("--extra-index-url") + 1] == CPU_INDEX
    assert int(torch_words[torch_words.index("--retries") + 1]) <= 1, "an unreachable index must cost about a second"
    assert int(torch_words[torch_words.index("--timeout") + 1]) <= 15
    assert "--no-deps" in torch_words, "torch's dependencies come from pip's own configuration, not the CPU index"
    others = [words for name, words in installs.items() if name != "torch==2.13.0"]
    assert len(others) >= 3 and not any("--extra-index-url" in words for words in others), installs


@needs_make
def test_make_torch_index_is_overridable_and_empty_skips_it(tmp_path):
    venv = f"VENV={tmp_path / 'venv'}"
    other = pip_installs(make_dry_run("install", venv, "TORCH_INDEX=https://example.invalid/whl"))["torch==2.13.0"]
    assert other[other.index("--extra-index-url") + 1] == "https://example.invalid/whl"
    plain = pip_installs(make_dry_run("install", venv, "TORCH_INDEX="))["torch==2.13.0"]
    assert not {"--extra-index-url", "--no-deps", "--retries"} & set(plain), plain


@needs_make
def test_make_compile_matrix_compiles_on_both_tritons(tmp_path):
    python = f"{tmp_path / 'venv'}/bin/python"
    lines = make_dry_run("compile-matrix", f"VENV={tmp_path / 'venv'}")
    compiles = [line for line in lines if "-m tests.gpu_compile" in line]
    assert compiles == [f"{python} -m tests.gpu_compile --workers 2 --write-footprints",
                        f"PYTHONPATH=.triton39 {python} -m tests.gpu_compile --workers 2 --write-footprints"], lines
    if "touch .triton39/.installed" in lines:  # not yet installed in this checkout: it comes first
        assert lines.index("touch .triton39/.installed") < lines.index(compiles[1])
