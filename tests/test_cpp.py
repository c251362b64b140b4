"""C++ consumers: dwa/history.hpp against DWAHistory, and a LibTorch trainer against the Python path.

The CMake build directory lives outside the source tree and is reused between
runs (set DWA_CPP_BUILD_DIR to choose it); a first build takes about half a
minute. Without cmake or a C++ compiler these tests skip locally and fail in CI.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import dwa_export
from dwa_export import DWAHistory, DWAWeights, LossHistoryError

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cpp"


def build_dir() -> Path:
    configured = os.environ.get("DWA_CPP_BUILD_DIR")
    if configured:
        return Path(configured)
    key = hashlib.sha256(f"{sys.executable}|{torch.__version__}|{SOURCE}".encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"dwa_export-cpp-build-{key}"


@pytest.fixture(scope="module")
def binaries() -> Path:
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        message = f"{', '.join(missing)} not found: install cmake and a C++17 compiler (g++) to build the C++ tests"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    build = build_dir()
    if not (build / "CMakeCache.txt").exists():
        subprocess.run(
            [
                "cmake",
                "-S",
                str(SOURCE),
                "-B",
                str(build),
                f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                f"-DDWA_INCLUDE_DIR={dwa_export.include_dir()}",
            ],
            check=True,
            capture_output=True,
        )
    result = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return build


def test_include_dir_holds_the_header():
    assert (Path(dwa_export.include_dir()) / "dwa" / "history.hpp").is_file()


# --------------------------------------------------------------------------- the header vs Python


def run_driver(binaries: Path, script: list[str]) -> list[dict]:
    result = subprocess.run(
        [str(binaries / "history_driver")], input="\n".join(script) + "\n", capture_output=True, text=True, check=True
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


def run_python(script: list[str]) -> list[dict]:
    """The driver's commands, through dwa_export.DWAHistory."""
    history = DWAHistory()
    out = []
    for line in script:
        command, _, rest = line.partition(" ")
        try:
            result = None
            if command == "record":
                words = rest.split()
                weight = next((float(w[7:]) for w in words if w.startswith("weight=")), None)
                losses = [float(w) for w in words if not w.startswith("weight=")]
                history.record(torch.tensor(losses, dtype=torch.float32), weight)
            elif command == "step":
                history.step()
            elif command == "discard":
                history.discard_epoch()
            elif command == "reset":
                history.reset()
            elif command == "inputs":
                result = [t.tolist() for t in history.inputs()]
            elif command == "ready":
                result = history.ready
            elif command == "state":
                result = history.state_dict()
            elif command == "load":
                history.load_state_dict(json.loads(rest))
            out.append({"ok": result})
        except LossHistoryError as error:
            out.append({"error": "LossHistoryError", "task": error.task, "message": str(error)})
        except (ValueError, TypeError) as error:
            out.append({"error": "ValueError", "message": str(error)})
        except RuntimeError as error:
            out.append({"error": "RuntimeError", "message": str(error)})
    return out


def state(**changes) -> str:
    base = {
        "format": "dwa_export.history",
        "version": 1,
        "num_tasks": 2,
        "averages": [[1.0, 2.0], [0.5, 1.5]],
        "dtype": "float32",
        "epoch_sum": [0.75, 3.0],
        "epoch_weight": 2.0,
        "epoch_tensor_weight": None,
    }
    base.update(changes)
    return json.dumps(base)


SCRIPT = [
    "inputs",  # K unknown yet
    "record 1.5 2.25",
    "record 0.5 1.75 weight=3",
    "inputs",
    "state",
    "step",
    "ready",
    "record 0.25 1 weight=2",
    "record 0.3 1.1",
    "step",
    "ready",
    "inputs",
    "record 0 1",  # zero average
    "step",
    "state",
    "discard",
    "record nan 1",
    "step",
    "discard",
    "record -0.5 1",  # sign change
    "step",
    "discard",
    "record 1 2 3",  # K change
    "record 1 2 weight=-1",
    "record 1 2 weight=0",
    "step",  # zero weight: a no-op
    "record 0.125 0.75",
    "step",
    "inputs",
    "state",
    "load " + state(),
    "state",
    "inputs",
    "record 0.25 1",
    "step",
    "inputs",
    "load " + state(version=2),
    "load " + state(num_tasks=0),
    "load " + state(averages=[[1.0, 2.0], [-1.0, 2.0]]),
    "load " + state(averages=[[1.0, 2.0, 3.0]]),
    "load " + state(epoch_weight=-1),
    "state",  # unchanged by the failed loads
    "reset",
    "record 4 5 6",
    "state",
]


def test_the_header_follows_the_python_rules_and_messages(binaries):
    cpp, python = run_driver(binaries, SCRIPT), run_python(SCRIPT)
    assert len(cpp) == len(python) == len(SCRIPT)
    same_message = 0
    for line, got, want in zip(SCRIPT, cpp, python):
        if "ok" in want:
            assert got == want, line
            continue
        assert got["error"] == want["error"], (line, got, want)
        assert got["message"] == want["message"], line
        assert got.get("task") == want.get("task"), line
        same_message += 1
    assert same_message >= 10


def test_the_header_refuses_a_checkpoint_it_cannot_resume_exactly(binaries):
    # dwa::History sums in float; a float64 checkpoint needs dwa::BasicHistory<double>.
    (got,) = run_driver(binaries, ["load " + state(dtype="float64")])
    assert got["error"] == "ValueError" and "BasicHistory<double>" in got["message"]


# --------------------------------------------------------------------------- the LibTorch trainer


def test_cpp_trainer_weights_equal_the_python_path(binaries):
    result = subprocess.run(
        [str(binaries / "dwa_trainer"), str(ROOT / "exported" / "dwa_weights.pt"), "6", "2.0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    epochs, final = lines[:-1], lines[-1]["final_weights"]
    assert len(epochs) == 6

    # Replay the C++ run's batch losses through the Python history and kernel.
    history, kernel = DWAHistory(num_tasks=3), DWAWeights()
    temperature = torch.tensor(2.0)
    for epoch in epochs:
        python_weights = kernel(*history.inputs(), temperature).tolist()
        assert epoch["weights"] == python_weights, f"epoch {epoch['epoch']}"  # bit-identical
        for losses in epoch["batch_losses"]:
            history.record(torch.tensor(losses, dtype=torch.float32))
        history.step()
    assert final == kernel(*history.inputs(), temperature).tolist()
    assert epochs[0]["weights"] == epochs[1]["weights"] == [1.0, 1.0, 1.0]  # warm-up
    assert max(abs(w - 1.0) for w in epochs[2]["weights"]) > 0.01  # DWA really moved them
