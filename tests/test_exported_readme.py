"""exported/README.md: every snippet runs from the repository root, as the README says, and its links resolve."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from reference import dwa_weights
from test_cpp import binaries  # noqa: F401  (the shared, cached C++ build)

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "exported" / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
CPP_BLOCKS = re.findall(r"```cpp\n(.*?)```", README, flags=re.S)
# Rates 0.75 and 0.86 at T = 2, by hand: w = 2 / (1 + e^0.055), 2 - w.
HAND_WORKED = [0.9725069, 1.0274931]


def test_the_readme_says_where_the_snippets_run_and_every_path_exists_from_there():
    assert "relative to the root of\nthe dwa_export repository" in README
    paths = re.findall(r'"(exported/[^"]+)"', "".join(PYTHON_BLOCKS + CPP_BLOCKS))
    assert len(paths) == 5, paths  # every snippet opens its file from the root
    for path in paths:
        assert (ROOT / path).is_file(), path
    # No snippet opens a bare file name, which only works from inside exported/.
    assert not re.search(r'"dwa_weights[^"]*"', "".join(PYTHON_BLOCKS + CPP_BLOCKS))


def test_links_resolve_and_none_is_a_placeholder():
    links = re.findall(r"\]\(([^)]+)\)", README)
    assert links, "the README links to the library"
    for link in links:
        assert link not in ("https://github.com/", "#", ""), link
        if not link.startswith(("http://", "https://")):
            assert (ROOT / "exported" / link).resolve().is_file(), link


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_snippets_run_from_the_repository_root(index, monkeypatch, capsys):
    assert len(PYTHON_BLOCKS) == 3  # ONNX Runtime, torch.export, TorchScript
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "__exported_readme__"}
    exec(compile(PYTHON_BLOCKS[index], f"exported/README.md python block {index}", "exec"), namespace)
    weights = np.asarray(namespace["weights"], dtype=np.float64)
    np.testing.assert_allclose(weights, dwa_weights([0.75, 0.86], [1.0, 1.0], 2.0), atol=1e-6)
    np.testing.assert_allclose(weights, HAND_WORKED, atol=1e-6)
    printed = capsys.readouterr().out
    comment = re.search(r"print\(weights\)\s+# (.+)", PYTHON_BLOCKS[index])
    if comment:  # what the README says it prints is what it prints
        assert printed.strip() == comment.group(1).strip()


def test_libtorch_snippet_compiles_and_runs_from_the_repository_root(binaries):  # noqa: F811
    # test_cpp.write_snippets wraps the snippet in a function that dwa_trainer compiles in:
    # one LibTorch translation unit for the trainer and the snippet, in the shared CMake build.
    (block,) = [block for block in CPP_BLOCKS if "torch::jit::load" in block]
    assert block.startswith("#include <torch/script.h>\n"), block
    result = subprocess.run(
        [str(binaries / "dwa_trainer"), "--readme-snippet"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose([float(w) for w in result.stdout.split()], HAND_WORKED, atol=1e-6)
