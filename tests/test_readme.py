"""README.md's examples run as written, in order, and CI runs the README's test command.

The Python blocks run one after another in one namespace, as a reader would run
them, in a scratch folder holding a copy of exported/ (they write checkpoint.pt).
The multi-process block runs under torchrun with 2 processes, the C++ block is
compiled against dwa/history.hpp and run. The Lightning block is an excerpt of
tests/lightning_example.py, which tests/test_lightning.py trains.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dwa_export
from dwa_export import DWA

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TORCHRUN_MARKER = "<!-- torchrun-example -->\n```python\n"
TORCHRUN_BLOCK = README.split(TORCHRUN_MARKER, 1)[1].split("```", 1)[0]
LIGHTNING_MARKER = "<!-- lightning-example -->\n```python\n"
LIGHTNING_BLOCK = README.split(LIGHTNING_MARKER, 1)[1].split("```", 1)[0]
PYTHON_BLOCKS = [
    block
    for block in re.findall(r"```python\n(.*?)```", README, flags=re.S)
    if block not in (TORCHRUN_BLOCK, LIGHTNING_BLOCK)
]
CPP_BLOCKS = re.findall(r"```cpp\n(.*?)```", README, flags=re.S)


def marked_command(marker: str, text: str = README) -> str:
    match = re.search(rf"<!-- {marker} -->\n```bash\n(.+?)\n```", text)
    assert match, f"README.md lost its <!-- {marker} --> block"
    return match.group(1)


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    shutil.copytree(ROOT / "exported", tmp_path / "exported")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_python_examples_run_in_order(scratch, capsys):
    assert len(PYTHON_BLOCKS) == 7  # quick start, resume, validation, seeing, mixed precision, compile, runtime
    namespace: dict = {"__name__": "__readme__"}
    for index, block in enumerate(PYTHON_BLOCKS):
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    # The quick start says what it prints: the weights of the next epoch, uniform through the warm-up.
    assert printed[0] == "after epoch 0, the weights of epoch 1: [1.0, 1.0, 1.0]"
    assert printed[3].startswith("after epoch 3, the weights of epoch 4: ") and "1.0, 1.0, 1.0" not in printed[3]
    assert (scratch / "checkpoint.pt").is_file()
    assert isinstance(namespace["dwa"], DWA) and namespace["dwa"].history.ready  # the compiled loop stepped


def test_the_multi_process_example_runs_under_torchrun(scratch):
    script = scratch / "train.py"
    script.write_text(TORCHRUN_BLOCK)
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=scratch)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(scratch / "checkpoint.pt", weights_only=True)["dwa"]
    history = state["_extra_state"]["history"]
    assert [entry for entry in history["log"]["batches"]] == [8, 8, 8]  # both ranks' batches, every epoch
    assert history["partial"] is None  # saved at an epoch boundary


def test_the_lightning_example_is_the_tested_files_code():
    # No Lightning needed: each paragraph of the excerpt is, to the character, a whole one of the file's.
    example = (ROOT / "tests" / "lightning_example.py").read_text()
    paragraphs = LIGHTNING_BLOCK.strip("\n").split("\n\n")
    assert len(paragraphs) == 6  # the class line, __init__, training_step and the three hooks
    for paragraph in paragraphs:
        assert f"\n\n{paragraph}\n\n" in example, paragraph


def test_the_cpp_example_compiles_and_runs(tmp_path):
    (block,) = CPP_BLOCKS
    compiler = shutil.which("c++")
    if compiler is None:
        if os.environ.get("CI"):
            pytest.fail("no C++ compiler (c++) found")
        pytest.skip("no C++ compiler (c++) found")
    includes = [line for line in block.splitlines() if line.startswith("#include")]
    body = [line for line in block.splitlines() if not line.startswith("#include")]
    printing = 'std::printf("%s\\n%zu %g\\n", checkpoint.c_str(), loss_t1.size(), loss_t1[0]);'
    source = tmp_path / "snippet.cpp"
    source.write_text("\n".join([*includes, "#include <cstdio>", "int main() {", *body, printing, "}"]))
    binary = tmp_path / "snippet"
    built = subprocess.run(
        [compiler, "-std=c++17", "-Wall", "-Werror", f"-I{dwa_export.include_dir()}", str(source), "-o", str(binary)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr
    checkpoint, inputs = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert inputs == "2 1"  # warm-up: ones
    history = DWA(num_tasks=2).history
    import json

    history.load_state_dict(json.loads(checkpoint))  # the C++ checkpoint loads in Python
    assert history.averages == ((0.8999999761581421, 1.7999999523162842),)


def test_ci_runs_the_readme_test_command():
    command = marked_command("test-command")
    assert "pip install torch==2.13.0 && " in command and command.endswith("python -m pytest")
    assert '".[test,plot,lint]"' in command  # CI installs the plot extra, so the picture test runs there
    # Lint and types before the tests: a finding fails CI.
    assert "&& ruff check && ruff format --check && mypy && python -m pytest" in command
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text()


def test_the_first_screen_is_the_quick_start():
    lines = README.splitlines()
    quick_start = next(i for i, line in enumerate(lines) if line == "## Quick start")
    first_example_end = next(i for i, line in enumerate(lines) if "dwa.step()" in line and "once per epoch" in line)
    assert quick_start < 10 and first_example_end < 45
    assert "on our build machines" not in README
