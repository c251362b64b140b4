"""C++ consumers: dwa/history.hpp against DWAHistory, a LibTorch trainer against
the Python path, and the ONNX files through ONNX Runtime's C++ API.

The CMake build directory lives outside the source tree and is reused between
runs (set DWA_CPP_BUILD_DIR to choose it); a first build takes about half a
minute. Without cmake or a C++ compiler these tests skip locally and fail in CI.

The onnxruntime wheel ships libonnxruntime.so but not its C/C++ headers, and
neither PyPI nor Debian has them. The npm registry does, inside the MIT-licensed
Unity package com.github.asus4.onnxruntime (Microsoft's headers, unmodified):
the ONNX Runtime tests fetch it once into the build cache with ``npm pack``,
check its pinned sha512 and keep only the headers; nothing is vendored here.
Set ONNXRUNTIME_INCLUDE_DIR to use headers you already have. Without npm these
tests skip locally and fail in CI.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import conformance
import dwa_export
from dwa_export import DWAHistory, DWAWeights, LossHistoryError
from dwa_export.runtime import NumpyDWAHistory
from state_corpus.generate import BASE, V1
from reference import dwa_weights

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cpp"


def build_dir() -> Path:
    configured = os.environ.get("DWA_CPP_BUILD_DIR")
    if configured:
        return Path(configured)
    key = hashlib.sha256(f"{sys.executable}|{torch.__version__}|{SOURCE}".encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"dwa_export-cpp-build-{key}"


def unavailable(message: str) -> None:
    """Skip locally; in CI, where .ci/run installs the tools, fail instead."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def cmake_build(build: Path, *options: str, target: str | None = None) -> Path:
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not found: install cmake and a C++17 compiler (g++) to build the C++ tests")
    if not (build / "CMakeCache.txt").exists():
        configure = ["cmake", "-S", str(SOURCE), "-B", str(build), f"-DDWA_INCLUDE_DIR={dwa_export.include_dir()}"]
        subprocess.run([*configure, *options], check=True, capture_output=True)
    command = ["cmake", "--build", str(build), "-j", "2"] + (["--target", target] if target else [])
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return build


@pytest.fixture(scope="module")
def binaries() -> Path:
    return cmake_build(build_dir(), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}")


def test_include_dir_holds_the_header():
    assert (Path(dwa_export.include_dir()) / "dwa" / "history.hpp").is_file()


# --------------------------------------------------------------------------- the header vs Python


def run_driver(binaries: Path, script: list[str], *args: str) -> list[tuple[dict, str]]:
    """(result, raw line) per command, through dwa::History (or History64 with "float64")."""
    result = subprocess.run(
        [str(binaries / "history_driver"), *args], input="\n".join(script) + "\n", capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return [(json.loads(line), line) for line in result.stdout.splitlines()]


def parse_command(line: str) -> tuple[str, list[float], list[float], int, float | None]:
    """(command, values, row weights, rows, weight) of a driver command."""
    command, *words = line.split(" ")
    if command not in ("record", "rows", "roww"):
        return command, [], [], 1, None
    weight = next((float(w[7:]) for w in words if w.startswith("weight=")), None)
    words = [w for w in words if not w.startswith("weight=")]
    rows, row_weights = 1, []
    if command in ("rows", "roww"):
        rows, words = int(words[0]), words[1:]
    if command == "roww":
        row_weights, words = [float(w) for w in words[:rows]], words[rows:]
    return command, [float(w) for w in words], row_weights, rows, weight


def run_python(script: list[str], kind: str = "torch", float64: bool = False, tasks=None) -> list[dict]:
    """The driver's commands through DWAHistory (kind "torch") or NumpyDWAHistory ("numpy")."""
    history = DWAHistory(tasks=tasks) if kind == "torch" else NumpyDWAHistory(tasks=tasks)
    np_dtype = np.float64 if float64 else np.float32

    def losses(values, rows, batched):
        array = np.array(values, dtype=np_dtype)
        if batched:
            array = array.reshape(rows, -1)
        return torch.from_numpy(array) if kind == "torch" else array

    out = []
    for line in script:
        command, values, row_weights, rows, weight = parse_command(line)
        batched = command in ("rows", "roww")
        try:
            result = None
            if command in ("record", "rows"):
                history.record(losses(values, rows, batched), weight)
            elif command == "roww":
                w = np.array(row_weights)
                history.record(losses(values, rows, True), torch.from_numpy(w) if kind == "torch" else w)
            elif command == "step":
                history.step()
            elif command == "discard":
                history.discard_epoch()
            elif command == "reset":
                history.reset()
            elif command == "inputs":
                result = [np.asarray(t).tolist() for t in history.inputs()]
            elif command == "ready":
                result = history.ready
            elif command == "state":
                result = history.state_dict()
            elif command == "log":
                result = history.log
            elif command == "load":
                history.load_state_dict(json.loads(line.split(" ", 1)[1]))
            out.append({"ok": result})
        except LossHistoryError as error:
            out.append({"error": "LossHistoryError", "task": error.task, "message": str(error)})
        except (ValueError, TypeError) as error:
            out.append({"error": "ValueError", "message": str(error)})
        except RuntimeError as error:
            out.append({"error": "RuntimeError", "message": str(error)})
    return out


def state(**changes) -> str:
    """A version-2 state of the shared corpus (tests/state_corpus/generate.py), changed."""
    return json.dumps(dict(BASE, **changes))


V1_STATE = json.dumps(V1)

SCRIPT = [
    "inputs",  # K unknown yet
    "record 1.5 2.25",
    "record 0.5 1.75 weight=3",
    "inputs",
    "state",
    "step",
    "ready",
    "record 0.25 1 weight=2",
    "rows 2 0.3 1.1 0.5 0.9",  # two per-sample rows, counting once each
    "roww 2 1 3 0.2 1 0.4 1.2",  # one weight per row
    "step",
    "ready",
    "inputs",
    "log",
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
    "record 1 2 weight=nan",
    "rows 2 1 2 3 4 weight=2",  # one number for several rows: ambiguous
    "record 1 2 weight=0",
    "step",  # zero weight: a no-op
    "record 0.125 0.75",
    "step",
    "inputs",
    "state",
    "log",
    "load " + state(),
    "state",
    "inputs",
    "record 0.25 1",
    "step",
    "inputs",
    "log",
    "load " + V1_STATE,
    "state",
    "load " + state(version=3),
    "load " + state(version=True),
    "load " + state(num_tasks=0),
    "load " + state(num_tasks=2**64),
    "load " + state(num_tasks=1e30),
    "load " + state(averages=[[1.0, 2.0], [-1.0, 2.0]]),
    "load " + state(averages=[[1.0, 2.0, 3.0]]),
    "load " + state(partial=[None, 1, "float32", 2, -0.5, [0.75, 3.0]]),
    "load " + state(partial=[None, 1, "float", 2, 2.0, [0.75, 3.0]]),
    "load " + state(partial=[None, 1, "float32", 2, 2.0, [0.1, 3.0]]),
    "load " + state(partial=[0, 2, "float32", 2, 2.0, [0.75, 3.0]]),
    "load " + state(partial=[3, 1, "float32", 2, 2.0, [0.75, 3.0]]),
    "load " + state(tasks=["a", "a"]),
    "load " + state(log={"batches": [1], "weight": [1.0, 2.0], "averages": [[1.0, 2.0]]}),
    "load " + state(extra=1),
    "load [1, 2]",
    "load {\"format\": \"dwa_export.history\", \"version\": 2, \"version\": 1}",
    "state",  # unchanged by the failed loads
    "reset",
    "record 4 5 6",
    "state",
]


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_the_header_follows_the_python_rules_and_messages(binaries, kind):
    cpp, python = run_driver(binaries, SCRIPT), run_python(SCRIPT, kind)
    assert len(cpp) == len(python) == len(SCRIPT)
    same_message = 0
    for line, (got, raw), want in zip(SCRIPT, cpp, python):
        if "ok" in want:
            assert got == want, line
            if line == "state":  # the canonical text: exactly what json.dumps writes
                assert raw == json.dumps(want), line
            continue
        assert got["error"] == want["error"], (line, got, want)
        assert got["message"] == want["message"], line
        assert got.get("task") == want.get("task"), line
        same_message += 1
    assert same_message >= 25


def test_named_float64_histories_agree_too(binaries):
    script = [
        "record 0.1 0.2 0.3",
        "rows 2 0.1 0.2 0.3 0.4 0.5 0.6",
        "step",
        "record 0.05 0.2 0.35",
        "state",
        "step",
        "record 0.07 0.1 0.2",
        "step",
        "inputs",
        "log",
        "state",
        "load " + json.dumps(dict(json.loads(state(num_tasks=3, averages=[], log={"batches": [], "weight": [], "averages": []}, partial=None)), tasks=["x", "y", "z"])),
    ]
    cpp = run_driver(binaries, script, "float64", "tasks=a,b,c")
    for kind in ("torch", "numpy"):
        python = run_python(script, kind, float64=True, tasks=("a", "b", "c"))
        for line, (got, raw), want in zip(script, cpp, python):
            assert got == want, (kind, line)
            if line == "state":
                assert raw == json.dumps(want)
    assert "differ from this history's ['a', 'b', 'c']" in cpp[-1][0]["message"]


def test_the_header_refuses_a_checkpoint_it_cannot_resume_exactly(binaries):
    # dwa::History sums in float; a float64 running epoch needs dwa::BasicHistory<double>.
    ((got, _),) = run_driver(binaries, ["load " + state(partial=[None, 1, "float64", 2, 2.0, [0.1, 3.0]])])
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


# --------------------------------------------------------------------------- ONNX Runtime's C++ API

ORT_HEADERS_PACKAGE = "com.github.asus4.onnxruntime@0.4.9"
ORT_HEADERS_SHA512 = "sha512-BkzxduSZ9IkeDP6Q8lz2TFU2ie7hSSvS7ZIfzMooExoq0CNzJnuuGaUJ7IsojBgqO4ouD1jXah8OYyJbCN29Fg=="
ORT_HEADERS_IN_PACKAGE = "package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers/"


def onnxruntime_cache() -> Path:
    return Path(f"{build_dir()}-onnxruntime")


def onnxruntime_headers(cache: Path) -> Path:
    configured = os.environ.get("ONNXRUNTIME_INCLUDE_DIR")
    if configured:
        return Path(configured)
    include = cache / "include"
    if (include / "onnxruntime_cxx_api.h").is_file():
        return include
    npm = shutil.which("npm")
    if npm is None:
        unavailable(f"npm not found: install Node.js's npm to fetch ONNX Runtime's C++ headers ({ORT_HEADERS_PACKAGE})")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        packed = subprocess.run(
            [npm, "pack", ORT_HEADERS_PACKAGE, "--json", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if packed.returncode != 0:
            unavailable(f"npm pack {ORT_HEADERS_PACKAGE} failed: {packed.stderr.strip()[-500:]}")
        tarball = Path(tmp) / json.loads(packed.stdout)[0]["filename"]
        digest = hashlib.sha512()
        with tarball.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        assert "sha512-" + base64.b64encode(digest.digest()).decode() == ORT_HEADERS_SHA512, tarball
        staging = Path(tmp) / "include"
        with tarfile.open(tarball) as tar:
            headers = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(ORT_HEADERS_IN_PACKAGE)]
            for member in headers:
                member.name = member.name[len(ORT_HEADERS_IN_PACKAGE) :]
            tar.extractall(staging, members=headers, filter="data")
        staging.rename(include)  # atomic: a half-extracted folder is never taken for a cache hit
    return include


def header_api_version(include: Path) -> int:
    for line in (include / "onnxruntime_c_api.h").read_text().splitlines():
        if line.startswith("#define ORT_API_VERSION"):
            return int(line.split()[-1])
    raise AssertionError(f"no ORT_API_VERSION in {include}")


@pytest.fixture(scope="module")
def onnxruntime_cpp() -> tuple[Path, Path]:
    """(include dir, lib dir): headers from npm, libonnxruntime.so.1 from the onnxruntime wheel."""
    include = onnxruntime_headers(onnxruntime_cache())
    runtime_api = int(ort.__version__.split(".")[1])  # ONNX Runtime 1.N serves C API versions up to N
    assert header_api_version(include) <= runtime_api, f"headers in {include} are newer than onnxruntime {ort.__version__}"
    (library,) = (Path(ort.__file__).parent / "capi").glob("libonnxruntime.so.1.*")
    lib = onnxruntime_cache() / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    link = lib / "libonnxruntime.so.1"  # the library's soname, a name the wheel does not provide
    if not link.exists() or link.resolve() != library.resolve():
        link.unlink(missing_ok=True)
        link.symlink_to(library)
    return include, lib


@pytest.fixture(scope="module")
def ort_weights(onnxruntime_cpp) -> Path:
    include, lib = onnxruntime_cpp
    build = cmake_build(
        onnxruntime_cache() / "build",
        "-DDWA_WITH_LIBTORCH=OFF",
        f"-DONNXRUNTIME_INCLUDE_DIR={include}",
        f"-DONNXRUNTIME_LIBRARY={lib / 'libonnxruntime.so.1'}",
        target="ort_weights",
    )
    return build / "ort_weights"


def encode(*arrays: np.ndarray) -> str:
    """ort_weights' input: rank, dims, then the float32 values as exact hex floats."""
    words = []
    for array in arrays:
        values = (float(v).hex() for v in np.asarray(array, dtype=np.float32).ravel())
        words += [str(array.ndim), *map(str, array.shape), *values]
    return " ".join(words)


def run_ort_weights(binary: Path, model: Path, cases: list[tuple[np.ndarray, ...]]) -> list[dict]:
    stdin = "\n".join(encode(*case) for case in cases) + "\n"
    result = subprocess.run([str(binary), str(model)], input=stdin, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    header, *lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert header == {"onnxruntime": ort.__version__}  # the wheel's library, not some other one
    assert len(lines) == len(cases)
    return lines


@pytest.mark.parametrize("model", ["dwa_weights.onnx", "dwa_weights_batched.onnx"])
def test_onnxruntime_cpp_api_matches_python_and_the_reference(ort_weights, model):
    path = ROOT / "exported" / model
    batched = "batched" in model
    cases = [c for c in conformance.load() if c.dtype == "float32" and c.batched == batched]
    inputs = []
    for case in cases:
        temperature = case.temperature.reshape(1, 1) if batched and case.temperature.ndim == 0 else case.temperature
        inputs.append((case.loss_t1, case.loss_t2, temperature))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for case, (l1, l2, t), got in zip(cases, inputs, run_ort_weights(ort_weights, path, inputs)):
        assert "weights" in got, (case, got)
        weights = np.array(got["weights"], dtype=np.float32).reshape(got["shape"])  # 9 digits: exact
        conformance.assert_conforms(case, weights)
        python = session.run(["weights"], {"loss_t1": l1, "loss_t2": l2, "temperature": t})[0]
        np.testing.assert_array_equal(weights, python, err_msg=repr(case))  # same library, same bits


def test_onnxruntime_cpp_api_rejects_mismatched_shapes(ort_weights):
    ones = np.ones
    cases = [(ones(3), ones(2), np.array(2.0)), (ones(3), ones(3), np.array(2.0))]
    mismatch, fine = run_ort_weights(ort_weights, ROOT / "exported" / "dwa_weights.onnx", cases)
    assert "error" in mismatch and "dimension" in mismatch["error"], mismatch
    assert fine == {"shape": [3], "weights": [1.0, 1.0, 1.0]}
    batched = [(ones((2, 3)), ones((3, 3)), ones((1, 1)))]
    (mismatch,) = run_ort_weights(ort_weights, ROOT / "exported" / "dwa_weights_batched.onnx", batched)
    assert "error" in mismatch, mismatch


def test_the_exported_readme_cpp_snippet_compiles_and_runs(onnxruntime_cpp, tmp_path):
    # The exact snippet users copy from exported/README.md, wrapped in main().
    include, lib = onnxruntime_cpp
    text = (ROOT / "exported" / "README.md").read_text()
    snippet = text.split("### ONNX Runtime, C++", 1)[1].split("```cpp\n", 1)[1].split("```", 1)[0].splitlines()
    includes = [line for line in snippet if line.startswith("#include")]
    body = [line for line in snippet if not line.startswith("#include")]
    printing = 'for (int64_t i = 0; i < k; ++i) std::printf("%.9g\\n", weights[i]);'
    source = tmp_path / "snippet.cpp"
    source.write_text("\n".join([*includes, "#include <cstdio>", "#include <vector>", "int main() {", *body, printing, "}"]))
    compiler = shutil.which("c++")
    if compiler is None:
        unavailable("no C++ compiler (c++) found")
    binary = tmp_path / "snippet"
    command = [compiler, "-std=c++17", f"-I{include}", str(source), "-o", str(binary)]
    built = subprocess.run([*command, str(lib / "libonnxruntime.so.1"), f"-Wl,-rpath,{lib}"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    result = subprocess.run([str(binary)], cwd=ROOT, capture_output=True, text=True, check=True)  # as exported/README.md says
    weights = [float(w) for w in result.stdout.split()]
    np.testing.assert_allclose(weights, dwa_weights(np.array([0.75, 0.86]), np.array([1.0, 1.0]), 2.0), atol=1e-6)
    np.testing.assert_allclose(weights, [0.9725, 1.0275], atol=5e-5)  # issue 2's hand-worked numbers
