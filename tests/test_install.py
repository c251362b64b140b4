"""The distribution: what each install gives, what the wheel and the sdist hold, and torch-free use."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

import dwa_export
from dwa_export.runtime import DWAWeightsSession

ROOT = Path(__file__).resolve().parents[1]
HAND_WORKED = [0.9725069, 1.0274931]  # rates 0.75 and 0.86 at T = 2: 2 / (1 + e^0.055) and the rest

# A Python where torch is missing, as on a runtime-only install: the import fails as a real one does.
NO_TORCH = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
"""


def without_torch(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH + code, *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


def requirements(extra: str | None) -> set[str]:
    """The names the distribution requires for ``extra`` (``None``: the base install)."""
    from packaging.requirements import Requirement

    names = set()
    for text in importlib.metadata.requires("dwa-export") or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if (marker is None and extra is None) or (marker is not None and extra and marker.evaluate({"extra": extra})):
            names.add(requirement.name)
    return names


def test_each_user_gets_what_their_half_needs():
    assert requirements(None) == {"numpy"}  # no torch, no ONNX tooling
    assert requirements("runtime") == {"onnxruntime"}  # with numpy: the torch-free half
    assert requirements("torch") == {"torch"}
    assert requirements("export") == {"torch", "onnx", "onnxruntime", "onnxscript"}
    assert importlib.metadata.version("dwa-export") == dwa_export.__version__  # one version source


def test_the_shipped_kernels_load_without_a_path():
    folder = Path(dwa_export.exported_dir())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"dwa_weights.onnx", "dwa_weights_batched.onnx", "dwa_weights.pt"} <= set(manifest["artifacts"])
    single, batched = DWAWeightsSession(), DWAWeightsSession(batched=True)
    assert not single.batched and batched.batched and single.dtype == np.float32
    np.testing.assert_allclose(single([0.75, 0.86], [1.0, 1.0], 2.0), HAND_WORKED, atol=1e-6)
    np.testing.assert_allclose(batched([[0.75, 0.86]], [[1.0, 1.0]], 2.0), [HAND_WORKED], atol=1e-6)
    with pytest.raises(TypeError, match="batched= chooses a shipped kernel"):
        DWAWeightsSession(folder / "dwa_weights.onnx", batched=True)


def test_without_torch_the_runtime_works_and_the_rest_says_how_to_install_torch():
    result = without_torch(
        "import dwa_export\n"
        "from dwa_export import LossHistoryError\n"
        "from dwa_export.runtime import DWAWeightsSession\n"
        "print(DWAWeightsSession()([0.75, 0.86], [1.0, 1.0]).tolist())\n"
        "from dwa_export import DWA\n"
    )
    assert result.returncode == 1
    np.testing.assert_allclose(json.loads(result.stdout), HAND_WORKED, atol=1e-6)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: dwa_export.DWA needs PyTorch, which is not installed")
    assert "https://download.pytorch.org/whl/cpu" in last and 'pip install "dwa-export[torch]"' in last


@pytest.mark.parametrize("argv", [["--help"], [], ["bench", "--quick"]])
def test_dwa_export_without_the_export_extra_is_a_one_line_hint(argv):
    result = without_torch("from dwa_export._cli import main; raise SystemExit(main())", *argv)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(
        'dwa-export: error: this needs torch, which is not installed: pip install "dwa-export[export]"'
    )


def built(kind: str, tmp_path: Path) -> Path:
    """The wheel or sdist that ``python -m build`` makes of this checkout."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    pytest.importorskip("build")
    pytest.importorskip("hatchling")
    out = tmp_path / "dist"
    command = [sys.executable, "-m", "build", "--no-isolation", f"--{kind}", "--outdir", str(out), str(ROOT)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (path,) = out.iterdir()
    return path


def tracked(*folders: str) -> set[str]:
    listed = subprocess.run(["git", "ls-files", *folders], cwd=ROOT, capture_output=True, text=True, check=True)
    return {line for line in listed.stdout.splitlines() if (ROOT / line).is_file()}  # not files deleted since


def test_the_wheel_ships_the_kernels_the_header_and_the_licence(tmp_path):
    with zipfile.ZipFile(built("wheel", tmp_path)) as wheel:
        names = set(wheel.namelist())
        for name in sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "exported").iterdir()):
            packaged = "dwa_export/" + name
            assert packaged in names and wheel.read(packaged) == (ROOT / name).read_bytes(), name  # one source
        cmake = {"dwa_export/cmake/dwa_exportConfig.cmake", "dwa_export/cmake/dwa_exportConfigVersion.cmake"}
        assert {"dwa_export/include/dwa/history.hpp", "dwa_export/py.typed", *cmake} <= names
        assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert (
        "License-Expression: BSD-3-Clause" in metadata
        and "Classifier: Programming Language :: Python :: 3.10" in metadata
    )
    assert not [name for name in names if name.startswith("tests/") or "__pycache__" in name]


def test_the_sdist_holds_everything_the_tests_need(tmp_path):
    with tarfile.open(built("sdist", tmp_path)) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        names = {name.removeprefix(top + "/") for name in sdist.getnames()}
    needed = tracked("tests", "exported", "dwa_export", ".ci") | {
        "README.md",
        "CHANGELOG.md",
        "LICENSE",
        "pyproject.toml",
    }
    assert not needed - names, sorted(needed - names)[:20]
