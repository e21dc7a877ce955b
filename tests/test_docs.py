"""The README and the tutorial stay true: every command runs, every line reference points at its code.

Commands are the lines of ```sh blocks and the backticked commands after
"Run:" and "Proof:" in the tutorial. `make test` and `make bench` are run by
CI (.ci/run); pytest commands are collected here (running pytest inside
pytest would run the suite twice); everything else is executed. The pdb
session is driven through its standard input by tests/test_tutorial_scripts.py.
"""
import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "kernels" / "README.md"]
RUN_BY_CI = {"make test", "make bench"}


def shell_commands(doc: Path):
    text = doc.read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            command = line.split("  #")[0].strip()
            if command:
                commands.append(command)
    commands += re.findall(r"(?:Run|Proof): `([^`]+)`", text)
    commands += re.findall(r"\)\s+and\s+`(\.venv/bin/python -m pytest[^`]+)`", text)
    return commands


ALL_COMMANDS = [(doc.relative_to(ROOT).as_posix(), c) for doc in DOCS for c in shell_commands(doc)]


def as_argv(command: str):
    """Split a documented command into (env, argv), running .venv/bin/python as this interpreter."""
    env = dict(os.environ)
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words and words[0] == ".venv/bin/python":
        words[0] = sys.executable
    return env, words


def test_the_docs_document_commands():
    assert len(ALL_COMMANDS) >= 20, ALL_COMMANDS


@pytest.mark.slow
@pytest.mark.parametrize("doc, command", ALL_COMMANDS, ids=[c[:60] for _, c in ALL_COMMANDS])
def test_documented_command_works(doc, command):
    if command in RUN_BY_CI:
        assert command in (ROOT / ".ci" / "run").read_text(), f"{command} is run neither by a test nor by CI"
        return
    if "-m pdb" in command:
        assert "pdb" in (ROOT / "tests" / "test_tutorial_scripts.py").read_text()
        return
    env, argv = as_argv(command)
    if argv[1:3] == ["-m", "pytest"]:
        argv = [word for word in argv if word != "-q"] + ["--collect-only", "-q", "-p", "no:cacheprovider"]
    run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{doc}: `{command}` failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    if "--collect-only" in argv:
        collected = re.search(r"(\d+) tests? collected", run.stdout)
        assert collected and int(collected.group(1)) > 0, f"{doc}: `{command}` selects no test"


LINK = re.compile(r"\[`?([\w./]+)`?\]\(([\w./]+)#L(\d+)-L(\d+)\)")


def definition_spans(path: Path):
    """{name: (first line including decorators, last line)} of the top-level defs and classes."""
    tree = ast.parse(path.read_text())
    return {node.name: (node.decorator_list[0].lineno if node.decorator_list else node.lineno, node.end_lineno)
            for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_line_references_point_at_their_code(doc):
    links = LINK.findall(doc.read_text())
    assert links or doc.name == "README.md" and doc.parent == ROOT
    for name, target, first, last in links:
        path = (doc.parent / target).resolve()
        assert path.exists(), f"{doc.name}: {target} does not exist"
        first, last = int(first), int(last)
        if name.endswith(".py"):
            assert 1 <= first <= last <= len(path.read_text().splitlines()), f"{target}#L{first}-L{last}"
        else:
            span = definition_spans(path).get(name)
            assert span == (first, last), f"{doc.name}: `{name}` is at lines {span} of {target}, not {first}-{last}"


def test_python_examples_run(tmp_path):
    """The README's Python blocks, on the CPU under the interpreter when there is no GPU."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks
    for block in blocks:
        if not torch.cuda.is_available():
            block = block.replace('device="cuda"', 'device="cpu"')
        script = tmp_path / "example.py"
        script.write_text(block)
        env = dict(os.environ, TRITON_INTERPRET="1" if not torch.cuda.is_available() else "0",
                   PYTHONPATH=str(ROOT))
        run = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, f"README example failed:\n{block}\n{run.stderr[-2000:]}"
