"""C++ consumers: dwa/history.hpp against DWAHistory and NumpyDWAHistory, the header's
build matrix, its CMake package (README.md's snippet, built outside the repository), a
LibTorch trainer against the Python path, and the ONNX files through ONNX Runtime's C++ API.

One CMake build directory, outside the source tree, is reused between runs (set
DWA_CPP_BUILD_DIR to choose it). A cold build takes about half a minute on 2 cores,
nearly all of it LibTorch's headers, compiled once: exported/README.md's LibTorch
snippet is compiled into the trainer's translation unit (tests/test_exported_readme.py
runs it). The build matrix's compiles run beside it. Without cmake, a C++ compiler
or nlohmann/json these tests skip locally and fail in CI.

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
import glob
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import conformance
import dwa_export
from dwa_export import DWAHistory, DWAWeights, LossHistoryError, NonFiniteLossWarning
from dwa_export.runtime import NumpyDWAHistory
from reference import dwa_weights
from state_corpus.generate import BASE, EMPTY_LOG, V2, V3, V3_EMPTY_LOG, partial, partial_v3

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cpp"
HEADER = Path(dwa_export.include_dir()) / "dwa" / "history.hpp"
EXPORTED_README = ROOT / "exported" / "README.md"


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


def nlohmann_header() -> Path:
    for folder in [*os.environ.get("CPATH", "").split(":"), "/usr/local/include", "/usr/include"]:
        if folder and (Path(folder) / "nlohmann" / "json.hpp").is_file():
            return Path(folder) / "nlohmann" / "json.hpp"
    unavailable("nlohmann/json.hpp not found: install nlohmann/json >= 3.10 (Debian/Ubuntu: nlohmann-json3-dev)")
    raise AssertionError  # unreachable


# --------------------------------------------------------------------------- building


def snippet(heading: str) -> tuple[list[str], list[str]]:
    """(#include lines, other lines) of exported/README.md's C++ block under ``heading``."""
    block = EXPORTED_README.read_text().split(heading, 1)[1].split("```cpp\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    return [line for line in lines if line.startswith("#include")], [
        line for line in lines if not line.startswith("#include")
    ]


def write_if_changed(path: Path, text: str) -> None:
    """Leaves an unchanged file alone, so that make does not rebuild what includes it."""
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def write_snippets(folder: Path) -> None:
    """exported/README.md's C++ snippets as the build's DWA_SNIPPET_DIR (see tests/cpp/CMakeLists.txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    includes, body = snippet("### LibTorch, C++")
    printing = 'for (int64_t i = 0; i < weights.numel(); ++i) std::printf("%.9g\\n", weights[i].item<float>());'
    lines = ["// exported/README.md's LibTorch snippet (written by tests/test_cpp.py)", *includes, "#include <cstdio>"]
    write_if_changed(
        folder / "readme_libtorch.inc",
        "\n".join([*lines, "inline void readme_libtorch_snippet() {", *body, printing, "}", ""]),
    )
    includes, body = snippet("### ONNX Runtime, C++")
    printing = 'for (int64_t i = 0; i < k; ++i) std::printf("%.9g\\n", static_cast<double>(weights[i]));'
    lines = ["// exported/README.md's ONNX Runtime snippet (written by tests/test_cpp.py)", *includes]
    write_if_changed(
        folder / "readme_onnxruntime.cpp",
        "\n".join([*lines, "#include <cstdio>", "#include <vector>", "int main() {", *body, printing, "}", ""]),
    )


def cmake_tools() -> None:
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not found: install cmake and a C++17 compiler (g++) to build the C++ tests")
    nlohmann_header()


def cmake_build(build: Path, *options: str, targets: tuple[str, ...] = ()) -> Path:
    cmake_tools()
    write_snippets(build / "snippets")
    configure = ["cmake", "-S", str(SOURCE), "-B", str(build), f"-Ddwa_export_DIR={dwa_export.cmake_dir()}",
                 f"-DDWA_SNIPPET_DIR={build / 'snippets'}", *options]  # fmt: skip
    stamp = build / "dwa_configure.json"  # configure again when the options change
    if not (build / "CMakeCache.txt").exists() or not stamp.is_file() or json.loads(stamp.read_text()) != configure:
        result = subprocess.run(configure, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        stamp.write_text(json.dumps(configure))
    command = ["cmake", "--build", str(build), "-j", "2"] + (["--target", *targets] if targets else [])
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return build


@pytest.fixture(scope="module")
def binaries(request) -> Path:
    matrix = start_build_matrix()  # beside the build, on the core LibTorch leaves idle
    request.addfinalizer(matrix.wait)  # no compile outlives the tests
    return cmake_build(build_dir(), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}")


def test_include_dir_holds_the_one_header():
    assert sorted(p.name for p in HEADER.parent.iterdir()) == ["history.hpp"]


# --------------------------------------------------------------------------- the CMake package

README = (ROOT / "README.md").read_text()


def cmake_version() -> str:
    """dwa_export.__version__ as CMake has it: numbers only."""
    return re.match(r"\d+(\.\d+)*", dwa_export.__version__).group()


def configure(project: Path, *command: str) -> str:
    result = subprocess.run(command, cwd=project, capture_output=True, text=True)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return result.stdout + result.stderr


def test_the_readme_cmake_snippet_builds_with_the_header_cxx17_and_nlohmann_json(tmp_path):
    # README.md's CMake snippet and configure command, in a project outside the repository, building
    # README.md's C++ example. CMAKE_CXX_FLAGS asks for C++14: C++17 can only come from dwa_export::history.
    cmake_tools()
    (cmake_block,) = re.findall(r"```cmake\n(.*?)```", README, flags=re.S)
    lines = ["cmake_minimum_required(VERSION 3.14)", "project(consumer CXX)", cmake_block]
    (tmp_path / "CMakeLists.txt").write_text("\n".join([*lines, 'message(STATUS "version ${dwa_export_VERSION}")']))
    (cpp_block,) = re.findall(r"```cpp\n(.*?)```", README, flags=re.S)  # tests/test_readme.py runs it too
    includes = [line for line in cpp_block.splitlines() if line.startswith("#include")]
    body = [line for line in cpp_block.splitlines() if not line.startswith("#include")]
    printing = 'std::printf("%ld %zu %g\\n", static_cast<long>(__cplusplus), loss_t1.size(), loss_t1[0]);'
    source = [*includes, "#include <cstdio>", "int main() {", *body, printing, "}"]
    (tmp_path / "train.cpp").write_text("\n".join(source))
    command = re.search(r"Configure with `(cmake -S \. -B build -Ddwa_export_DIR=.+?)`", README).group(1)
    command = command.replace("python -c", f"{shlex.quote(sys.executable)} -c")  # this Python's dwa_export
    configured = configure(tmp_path, "bash", "-c", f"{command} -DCMAKE_CXX_FLAGS=-std=c++14")
    assert f"version {cmake_version()}" in configured  # read from dwa_export/__init__.py
    configure(tmp_path, "cmake", "--build", "build")
    standard, tasks, first_input = subprocess.check_output([str(tmp_path / "build" / "train")], text=True).split()
    assert int(standard) >= 201703  # though the project asked for C++14
    assert (tasks, first_input) == ("2", "1")  # warm-up: ones


def this_release_probes() -> dict[str, bool]:
    """find_package(dwa_export <request> CONFIG) requests and whether this release serves them."""
    major, minor = (int(part) for part in cmake_version().split(".")[:2])
    series, following = (f"0.{minor}", f"0.{minor + 1}") if major == 0 else (f"{major}", f"{major + 1}")
    return {series: True, f"{cmake_version()} EXACT": True, following: False}


# The version file's rules, for other releases too (a copy of it beside an __init__.py of that version):
# a release serves its own series (major.minor while the major is 0, then the major), never a newer version.
OTHER_RELEASE_PROBES = {
    "0.1.3": {"0.1": True, "0.1.2": True, "0.1.3 EXACT": True, "0.1.2 EXACT": False, "0.1.4": False,
              "0.2": False, "0": False, "0.1...<0.2": True, "0.1...<0.3": True, "0.1...0.1.3": True,
              "0.1...<0.1.3": False},
    "1.2.3": {"1": True, "1.1": True, "1.2.4": False, "2": False, "0.1": False, "1.0...<2": True,
              "1.0...<1.2": False},
}  # fmt: skip

# Each probe sets dwa_export_DIR first, as a find_package() that fails forgets it.
PROBE = """set(dwa_export_DIR "{folder}" CACHE PATH "" FORCE)
find_package(dwa_export {request} CONFIG {quiet})
message(STATUS "probe {release} {request}: ${{dwa_export_FOUND}}")"""


def test_the_cmake_package_serves_its_own_series_and_says_why_not_another(tmp_path):
    cmake_tools()
    probes = {("this", request): (dwa_export.cmake_dir(), ok) for request, ok in this_release_probes().items()}
    for version, requests in OTHER_RELEASE_PROBES.items():
        folder = tmp_path / version / "cmake"
        folder.mkdir(parents=True)
        shutil.copy(Path(dwa_export.cmake_dir()) / "dwa_exportConfigVersion.cmake", folder)
        (folder / "dwa_exportConfig.cmake").write_text("")  # only the version file is under test
        (folder.parent / "__init__.py").write_text(f'"""A release."""\n\n__version__ = "{version}"\n')
        probes.update({(version, request): (str(folder), ok) for request, ok in requests.items()})
    lines = ["cmake_minimum_required(VERSION 3.19)", "project(probes NONE)"]  # 3.19: version ranges; NONE: no compiler
    lines += [PROBE.format(folder=f, request=r, release=v, quiet="QUIET") for (v, r), (f, _) in probes.items()]
    lines.append(PROBE.format(folder=dwa_export.cmake_dir(), request="99", release="this", quiet=""))  # says why not
    (tmp_path / "CMakeLists.txt").write_text("\n".join(lines))
    configured = configure(tmp_path, "cmake", "-S", ".", "-B", "build")
    served = {f"{release} {request}": str(int(ok)) for (release, request), (_, ok) in probes.items()}
    assert dict(re.findall(r"-- probe (.+): (\d)", configured)) == {**served, "this 99": "0"}
    assert 'compatible with requested version "99"' in configured
    assert f"dwa_exportConfig.cmake, version: {cmake_version()}" in configured


# --------------------------------------------------------------------------- the header vs Python


def run_driver(binaries: Path, script: list[str], *args: str) -> list[dict]:
    """One result per command, through dwa::History (or History64 with "float64")."""
    result = subprocess.run(
        [str(binaries / "history_driver"), *args], input="\n".join(script) + "\n", capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def parse_command(line: str) -> tuple[str, list[float], list[float], int, float | None]:
    """(command, values, row weights, rows, weight) of a driver command."""
    command, *words = line.split(" ")
    if command not in ("record", "rows", "roww"):
        return command, [float(w) for w in words] if command in ("step", "logw") else [], [], 1, None
    weight = next((float(w[7:]) for w in words if w.startswith("weight=")), None)
    words = [w for w in words if not w.startswith("weight=")]
    rows, row_weights = 1, []
    if command in ("rows", "roww"):
        rows, words = int(words[0]), words[1:]
    if command == "roww":
        row_weights, words = [float(w) for w in words[:rows]], words[rows:]
    return command, [float(w) for w in words], row_weights, rows, weight


def inputs_as_written(inputs) -> list[list]:
    """inputs() as history_driver writes them: float64 values, "inf", "-inf" or "nan" for the others."""

    def number(value: float):
        return value if math.isfinite(value) else "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"

    return [[number(v) for v in np.asarray(t, dtype=np.float64).tolist()] for t in inputs]


def plain(value):
    """A Python result as JSON values (tuples become lists)."""
    return json.loads(json.dumps(value))


def run_python(
    script: list[str], kind: str = "torch", float64: bool = False, tasks=None, nan_strategy: str = "error"
) -> list[dict]:
    """The driver's commands through DWAHistory (kind "torch") or NumpyDWAHistory ("numpy");
    a step() that warns (NonFiniteLossWarning) gives ``"warned": True``, as the driver does."""
    cls = DWAHistory if kind == "torch" else NumpyDWAHistory
    history = cls(tasks=tasks, nan_strategy=nan_strategy)
    np_dtype = np.float64 if float64 else np.float32

    def array(values, rows=None, dtype=np_dtype):
        values = np.array(values, dtype=dtype)
        values = values if rows is None else values.reshape(rows, -1)
        return torch.from_numpy(values) if kind == "torch" else values

    out = []
    for line in script:
        command, values, row_weights, rows, weight = parse_command(line)
        try:
            result, warned = None, False
            if command == "record":
                history.record(array(values), weight)
            elif command == "rows":
                history.record(array(values, rows), weight)
            elif command == "roww":
                history.record(array(values, rows), array(row_weights, dtype=np.float64))
            elif command == "step":
                with warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always")
                    history.step(*values)
                warned = any(issubclass(w.category, NonFiniteLossWarning) for w in seen)
            elif command == "logw":
                history.log_weights(values[0], values[1:])
            elif command == "discard":
                history.discard_epoch()
            elif command == "reset":
                history.reset()
            elif command == "inputs":
                result = inputs_as_written(history.inputs())
            elif command == "ready":
                result = history.ready
            elif command == "state":
                result = history.state_dict()
            elif command == "log":
                result = history.log
            elif command == "load":
                history.load_state_dict(json.loads(line.split(" ", 1)[1]))
            else:
                raise AssertionError(line)
            out.append({"ok": plain(result), "warned": True} if warned else {"ok": plain(result)})
        except LossHistoryError as error:
            out.append({"error": "LossHistoryError", "task": error.task})
        except (ValueError, TypeError):
            out.append({"error": "ValueError"})
        except RuntimeError:
            out.append({"error": "RuntimeError"})
    return out


def non_finite(value) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, list) and any(map(non_finite, value))


def assert_same(script: list[str], cpp: list[dict], python: list[dict]) -> None:
    """The same results, error kinds and LossHistoryError tasks; messages may differ."""
    assert len(cpp) == len(python) == len(script)
    for line, got, want in zip(script, cpp, python, strict=True):
        if got.get("error") == "DomainError":  # a state strict JSON cannot hold, which Python's json writes
            assert line == "state" and "ok" in want and non_finite(want["ok"]["partial"]), (line, got, want)
            continue
        if "ok" in want or "ok" in got:
            assert got == want, line
        else:
            assert (got["error"], got.get("task")) == (want["error"], want.get("task")), (line, got, want)


def state(base=BASE, **changes) -> str:
    """A state of the shared corpus (tests/state_corpus/generate.py), changed."""
    return json.dumps(dict(base, **changes))


SCRIPT = [
    "inputs",  # K unknown yet
    "state",
    "step",  # nothing recorded: a no-op
    "record",  # K = 0
    "record 1.5 2.25",
    "record 0.5 1.75 weight=3",
    "inputs",  # warm-up: ones
    "state",  # mid-epoch
    "step 2",  # with a temperature for the log
    "ready",
    "logw 2 0.9 1.1",
    "log",
    "record 0.25 1 weight=2",
    "rows 2 0.3 1.1 0.5 0.9",  # two per-sample rows, counting once each
    "roww 2 1 3 0.2 1 0.4 1.2",  # one weight per row
    "roww 3 0 0.5 2 0.1 0.2 0.3 0.4 0.5 0.6",  # a zero row weight is fine
    "state",
    "step",
    "ready",
    "inputs",
    "log",
    "logw 0 1 1",  # temperature not > 0
    "logw inf 1 1",
    "logw 2 1",  # not K weights
    "logw 2 1 -1",
    "logw 2 1 nan",
    "logw 1.5 0 2",  # replaces what the last entry held
    "log",
    "record 0 1",  # zero average
    "step",
    "state",  # the rejected epoch is still running
    "discard",
    "record nan 1",
    "step",
    "state",  # a NaN sum: Python writes it, C++ refuses (strict JSON)
    "discard",
    "record 1 inf",
    "step",
    "discard",
    "record -0.5 1",  # sign change
    "step",
    "discard",
    "record 1 2 3",  # K change
    "record 1 2 weight=-1",
    "record 1 2 weight=nan",
    "record 1 2 weight=inf",
    "rows 2 1 2 3 4 weight=2",  # one number for several rows: ambiguous
    "roww 2 1 -1 1 2 3 4",  # a negative row weight (numpy and C++ refuse it at once)
    "roww 2 1 nan 1 2 3 4",
    "record 1 2 weight=0",
    "rows 2 1 2 3 4",
    "discard",
    "record 1 2 weight=0",
    "step",  # only zero weights: the batches are dropped, no log entry
    "state",
    "record 0.125 0.75",
    "step 0.5",
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
    "load " + state(V2),  # version 2: dtype from its partial, no temperatures or weights
    "state",
    "log",
    "load " + state(V2, partial=None, averages=[], log={"batches": [], "weight": [], "averages": []}),
    "state",
    "load " + state(V3),  # version 3: one row per batch, none left out, no nonfinite_rows in the log
    "state",
    "log",
    "load " + state(V3, partial=None, averages=[], log=V3_EMPTY_LOG),
    "state",
    "load " + state(partial=partial(world_size=4)),  # the whole group's running epoch: one process takes it
    "state",
    "step",
    "load " + state(version=1),
    "load " + state(version=5),
    "load " + state(version=True),
    "load " + state(version=4.0),
    "load " + state(num_tasks=0),
    "load " + state(num_tasks=2**64),
    "load " + state(num_tasks=1e30),
    "load " + state(dtype="float16"),
    "load " + state(averages=[[1.0, 2.0], [-1.0, 2.0]]),
    "load " + state(averages=[[1.0, 2.0, 3.0]]),
    "load " + state(partial=partial(weight=-0.5)),
    "load " + state(partial=[None, 1, "float32", 2, 2.0, [0.75, 3.0]]),  # a version-2 partial
    "load " + state(partial=V3["partial"]),  # a version-3 partial in a version-4 state
    "load " + state(V3, partial=BASE["partial"]),  # and the other way round
    "load " + state(partial=partial(rows=2, nonfinite_rows=3)),  # more rows left out than recorded
    "load " + state(partial=partial(nonfinite_rows=-1)),
    "load " + state(partial=partial_v3(batches=2)),  # a version-3 partial, 5 long
    "load " + state(partial=partial(rank=0, world_size=2)),  # one rank's part of 2 processes
    "load " + state(partial=partial(rank=1, world_size=2)),
    "load " + state(partial=partial(rank=0)),
    "load " + state(tasks=["a", "a"]),
    "load " + state(log={**EMPTY_LOG, "batches": [1]}),
    "load " + state(log={"batches": [], "weight": [], "averages": []}),  # a version-2 log
    "load " + state(log=V3_EMPTY_LOG),  # a version-3 log
    "load " + state(log={**EMPTY_LOG, "nonfinite_rows": [1]}),
    "load " + state(extra=1),
    "load [1, 2]",
    'load {"format": "dwa_export.history", "version": 2, "version": 1}',
    "state",  # unchanged by the rejected loads
    "load " + state(tasks=["seg", "depth"]),  # a history without names takes a state's names
    "load " + state(tasks=["x", "y"]),  # and another state's
    "state",
    "load " + state(),  # a state without names: none
    "state",
    "load " + state(tasks=["seg", "depth"]),
    "reset",  # forgets names it was not given
    "state",
    "inputs",  # K unknown again
    "step -1",  # a bad temperature, even with nothing recorded
    "logw -1 1 1",  # the log is empty: RuntimeError first
    "record 4 5 6",
    "step nan",
    "state",
]


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_the_header_follows_the_python_rules(binaries, kind):
    script = SCRIPT
    if kind == "torch":  # torch cannot look at device data: a bad row weight poisons the epoch instead
        script = [line for line in SCRIPT if not line.startswith(("roww 2 1 -1", "roww 2 1 nan"))]
    cpp = run_driver(binaries, script)
    assert_same(script, cpp, run_python(script, kind))
    assert sum("error" in result for result in cpp) >= 35
    assert cpp[script.index("record nan 1") + 2]["error"] == "DomainError"


def test_torch_reports_a_bad_row_weight_at_step(binaries):
    script = ["record 1 2", "roww 2 1 -1 1 2 3 4", "step", "state"]
    cpp, python = run_driver(binaries, script), run_python(script, "torch")
    assert cpp[1]["error"] == "ValueError" and python[1] == {"ok": None}  # C++ and NumPy refuse it at once
    assert python[2] == {"error": "LossHistoryError", "task": None}  # torch: the epoch's weight sum is NaN
    assert cpp[2] == {"ok": None} and cpp[3]["ok"]["log"]["batches"] == [1]


# The same loss stream under each nan_strategy: rows with an infinity or a NaN, rows of weight 0
# holding them (left out under every strategy: a mask, never 0 * inf), per-sample [B, K] losses
# with a [B] weight mask, an overflow, and checkpoints with rows left out (of `dtype`).
def nan_script(dtype: str = "float32") -> list[str]:
    return [
        "record 1 2",
        "record inf 1",
        "record nan 2 weight=3",
        "record inf nan weight=0",
        "rows 3 0.5 1 inf 2 1.5 nan",  # per-sample losses, 2 of 3 rows non-finite
        "roww 3 2 0 1 1 2 inf nan 3 4",  # a [B] weight mask: the weight-0 row holds inf and NaN
        "roww 2 0 0 nan inf 1 2",  # weight-0 rows only
        "state",  # "error": NaN sums, which C++ refuses to write
        "step 2",  # "error": LossHistoryError; "warn": warns
        "log",
        "inputs",
        "discard",
        "roww 2 0 1 inf nan 0.5 1.5",  # every non-finite row has weight 0: kept under "error" too
        "record nan inf weight=0",
        "rows 2 0.25 1 0.75 2",
        "state",
        "step",
        "record 0.5 1 weight=2",
        "rows 2 -inf 1 0.25 0.5",
        "step",
        "discard",
        "record 0.5 1",
        "step",
        "ready",
        "inputs",
        "log",
        "state",
        "record inf 1",
        "record 1 2 weight=0",
        "step",  # every row with a weight is non-finite: LossHistoryError under every strategy
        "state",
        "discard",
        "roww 1 0 inf inf",
        "step",  # weight 0 alone: no entry
        "state",
        "record 3e38 3e38 weight=1e300",
        "step",  # finite losses whose sum overflows: LossHistoryError under every strategy
        "discard",
        "load " + state(dtype=dtype),  # a running epoch with a row left out, which step() counts ("warn" says so)
        "step",
        "log",
        "load " + state(dtype=dtype, partial=partial(batches=2, rows=4, nonfinite_rows=4, weight=0.0, sums=[0, 0])),
        "step",  # every row left out
        "state",
        "load " + state(V3, dtype=dtype),  # one row per batch, none left out
        "state",
        "step",
        "log",
    ]


@pytest.mark.parametrize("nan_strategy", ["error", "warn", "ignore"])
def test_the_header_follows_the_python_nan_strategy(binaries, nan_strategy):
    for dtype, args in (("float32", ()), ("float64", ("float64",))):
        script, float64 = nan_script(dtype), dtype == "float64"
        cpp = run_driver(binaries, script, *args, f"nan={nan_strategy}")
        for kind in ("torch", "numpy"):
            assert_same(script, cpp, run_python(script, kind, float64=float64, nan_strategy=nan_strategy))
    # What the three agree on (float64 here, the last run), by hand:
    at = {line: i for i, line in reversed(list(enumerate(script)))}  # each command's first index
    warned = [script[i] for i, result in enumerate(cpp) if result.get("warned")]
    assert warned == (["step 2", "step", "step"] if nan_strategy == "warn" else []), warned
    if nan_strategy == "error":
        assert cpp[at["state"]]["error"] == "DomainError"  # NaN sums: the weight-0 rows added none
        assert cpp[at["step 2"]] == {"error": "LossHistoryError", "task": 0, "message": cpp[at["step 2"]]["message"]}
    else:  # 12 rows, 4 left out (the weight-0 ones are not counted), weight 1 + 1 + 2 + 1
        assert cpp[at["state"]]["ok"]["partial"] == [None, 1, 7, 12, 4, 5.0, [6.5, 11.0]]
        assert cpp[at["log"]]["ok"][0] == {
            "epoch": 0, "averages": [1.3, 2.2], "batches": 7, "weight": 5.0, "temperature": 2.0, "weights": None,
            "nonfinite_rows": 4,
        }  # fmt: skip
    every_row_left_out = script.index("record 1 2 weight=0") + 1
    assert cpp[every_row_left_out]["error"] == "LossHistoryError"
    assert cpp[every_row_left_out]["task"] == (0 if nan_strategy == "error" else None)
    assert cpp[script.index("roww 1 0 inf inf") + 1] == {"ok": None}
    assert cpp[script.index("record 3e38 3e38 weight=1e300") + 1]["task"] == 0
    loaded = script.index("load " + state(dtype="float64"))
    assert cpp[loaded + 2]["ok"][-1]["nonfinite_rows"] == 1 and cpp[loaded + 4]["task"] is None
    assert cpp[-3]["ok"]["partial"] == [None, 1, 3, 3, 0, 3.0, [0.75, 3.0]]  # version 3
    assert cpp[-1]["ok"][-1]["nonfinite_rows"] == 0


def test_named_float64_histories_agree_too(binaries):
    names = {"averages": [], "partial": None, "log": EMPTY_LOG, "dtype": "float64"}
    script = [
        "record 0.1 0.2 0.3",
        "rows 2 0.1 0.2 0.3 0.4 0.5 0.6",
        "roww 2 0.5 0.25 0.1 0.2 0.3 0.4 0.5 0.6",
        "step",
        "record 0.05 0.2 0.35 weight=7",
        "state",
        "step 3",
        "logw 3 0.5 1 1.5",
        "record 0.07 0.1 0.2",
        "step",
        "inputs",
        "log",
        "state",
        "load " + state(**names, num_tasks=3, tasks=["x", "y", "z"]),  # other names
        "load " + state(**names, num_tasks=2, tasks=["a", "b"]),  # another K
        "load " + state(**names, num_tasks=3, tasks=["a", "b", "c"]),
        "load " + state(**names, num_tasks=3, tasks=None),  # no names: the history keeps its own
        "state",
        "reset",
        "state",
        "record 1 2",
    ]
    cpp = run_driver(binaries, script, "float64", "tasks=a,b,c")
    for kind in ("torch", "numpy"):
        assert_same(script, cpp, run_python(script, kind, float64=True, tasks=("a", "b", "c")))
    assert [result.get("error") for result in cpp[13:17]] == ["ValueError", "ValueError", None, None]


def test_the_float_history_refuses_a_float64_state(binaries):
    # dwa::History hands out float inputs; a float64 state (float64 losses) needs dwa::History64.
    float64 = "load " + state(dtype="float64")
    ((got,),) = [run_driver(binaries, [float64])]
    assert got["error"] == "ValueError" and "History64" in got["message"]
    assert run_driver(binaries, [float64, "inputs"], "float64")[1]["ok"] == [[0.5, 1.5], [1.0, 2.0]]
    assert run_driver(binaries, ["load " + state(), "state"], "float64")[1]["ok"]["dtype"] == "float64"


def test_the_driver_refuses_a_malformed_script(binaries):
    result = subprocess.run([str(binaries / "history_driver")], input="jump\n", capture_output=True, text=True)
    assert result.returncode == 2 and "jump" in result.stderr


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
def onnxruntime_build() -> Path:
    """The build folder of ort_weights and exported/README.md's ONNX Runtime snippet (ort_snippet):
    headers from npm, libonnxruntime.so.1 from the onnxruntime wheel."""
    include = onnxruntime_headers(onnxruntime_cache())
    runtime_api = int(ort.__version__.split(".")[1])  # ONNX Runtime 1.N serves C API versions up to N
    assert header_api_version(include) <= runtime_api, (
        f"headers in {include} are newer than onnxruntime {ort.__version__}"
    )
    (library,) = (Path(ort.__file__).parent / "capi").glob("libonnxruntime.so.1.*")
    lib = onnxruntime_cache() / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    link = lib / "libonnxruntime.so.1"  # the library's soname, a name the wheel does not provide
    if not link.exists() or link.resolve() != library.resolve():
        link.unlink(missing_ok=True)
        link.symlink_to(library)
    return cmake_build(
        onnxruntime_cache() / "build",
        "-DDWA_WITH_LIBTORCH=OFF",
        f"-DONNXRUNTIME_INCLUDE_DIR={include}",
        f"-DONNXRUNTIME_LIBRARY={link}",
        targets=("ort_weights", "ort_snippet"),
    )


def encode(*arrays: np.ndarray) -> str:
    """ort_weights' input: rank, dims, then the float32 values as exact hex floats."""
    words = []
    for array in arrays:
        values = (float(v).hex() for v in np.asarray(array, dtype=np.float32).ravel())
        words += [str(array.ndim), *map(str, array.shape), *values]
    return " ".join(words)


def run_ort_weights(build: Path, model: Path, cases: list[tuple[np.ndarray, ...]]) -> list[dict]:
    stdin = "\n".join(encode(*case) for case in cases) + "\n"
    result = subprocess.run(
        [str(build / "ort_weights"), str(model)], input=stdin, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    header, *lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert header == {"onnxruntime": ort.__version__}  # the wheel's library, not some other one
    assert len(lines) == len(cases)
    return lines


@pytest.mark.parametrize("model", ["dwa_weights.onnx", "dwa_weights_batched.onnx"])
def test_onnxruntime_cpp_api_matches_python_and_the_reference(onnxruntime_build, model):
    path = ROOT / "exported" / model
    batched = "batched" in model
    cases = [c for c in conformance.load() if c.dtype == "float32" and c.batched == batched]
    inputs = []
    for case in cases:
        temperature = case.temperature.reshape(1, 1) if batched and case.temperature.ndim == 0 else case.temperature
        inputs.append((case.loss_t1, case.loss_t2, temperature))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for case, (l1, l2, t), got in zip(cases, inputs, run_ort_weights(onnxruntime_build, path, inputs), strict=True):
        assert "weights" in got, (case, got)
        weights = np.array(got["weights"], dtype=np.float32).reshape(got["shape"])  # 9 digits: exact
        conformance.assert_conforms(case, weights)
        python = session.run(["weights"], {"loss_t1": l1, "loss_t2": l2, "temperature": t})[0]
        np.testing.assert_array_equal(weights, python, err_msg=repr(case))  # same library, same bits


def test_onnxruntime_cpp_api_rejects_mismatched_shapes(onnxruntime_build):
    ones = np.ones
    cases = [(ones(3), ones(2), np.array(2.0)), (ones(3), ones(3), np.array(2.0))]
    mismatch, fine = run_ort_weights(onnxruntime_build, ROOT / "exported" / "dwa_weights.onnx", cases)
    assert "error" in mismatch and "dimension" in mismatch["error"], mismatch
    assert fine == {"shape": [3], "weights": [1.0, 1.0, 1.0]}
    batched = [(ones((2, 3)), ones((3, 3)), ones((1, 1)))]
    (mismatch,) = run_ort_weights(onnxruntime_build, ROOT / "exported" / "dwa_weights_batched.onnx", batched)
    assert "error" in mismatch, mismatch


def test_the_exported_readme_cpp_snippet_compiles_and_runs(onnxruntime_build):
    # The exact snippet users copy from exported/README.md, wrapped in main() (write_snippets).
    result = subprocess.run(
        [str(onnxruntime_build / "ort_snippet")], cwd=ROOT, capture_output=True, text=True, check=True
    )
    weights = [float(w) for w in result.stdout.split()]  # run from the root, as exported/README.md says
    np.testing.assert_allclose(weights, dwa_weights(np.array([0.75, 0.86]), np.array([1.0, 1.0]), 2.0), atol=1e-6)
    np.testing.assert_allclose(weights, [0.9725, 1.0275], atol=5e-5)  # issue 2's hand-worked numbers


# --------------------------------------------------------------------------- the build matrix

# Every axis value at least once: compiler, standard library, C++ standard, optimisation.
# g++ -O3 -std=c++20 is where g++ 12 once saw a false -Wrestrict in string concatenation;
# g++'s optimiser warns, clang's warnings come from its front end, so clang runs at -O0.
# The fourth configuration, g++ (c++) with libstdc++, C++17 and -O0, is the CMake build of
# history_driver, with the same warnings. The compiles run one at a time beside the CMake
# build (the binaries fixture), on the core that LibTorch's one translation unit leaves idle:
# each takes 4 to 11 s (nlohmann/json), and more would outlast it.
MATRIX = [
    ("g++", "libstdc++", "c++20", "-O3"),
    ("clang++", "libc++", "c++17", "-O0"),
    ("clang++", "libstdc++", "c++20", "-O0"),
]
WARNINGS = ["-Wall", "-Wextra", "-Wshadow", "-Wpedantic", "-Wconversion", "-Wsign-conversion", "-Werror"]


def libcxx_available() -> bool:
    return bool(glob.glob("/usr/lib/llvm-*/include/c++/v1/vector") or glob.glob("/usr/include/c++/v1/vector"))


def matrix_command(compiler: str, library: str, standard: str, optimisation: str) -> list[str]:
    stdlib = ["-stdlib=libc++"] if library == "libc++" else []
    source = SOURCE / "build_matrix.cpp"
    return [
        compiler,
        f"-std={standard}",
        optimisation,
        *stdlib,
        *WARNINGS,
        f"-I{dwa_export.include_dir()}",
        "-c",
        str(source),
        "-o",
        os.devnull,
    ]


def matrix_key(command: list[str]) -> str:
    """What a cached success depends on: the sources, the command, the compiler and nlohmann/json."""
    version = subprocess.run([command[0], "--version"], capture_output=True, text=True).stdout
    parts = [HEADER.read_bytes(), (SOURCE / "build_matrix.cpp").read_bytes(), nlohmann_header().read_bytes()]
    return hashlib.sha256(b"|".join([*parts, " ".join(command).encode(), version.encode()])).hexdigest()


class BuildMatrix:
    """The build matrix's compiles, one at a time in a background thread: beside the CMake build,
    which leaves a core idle while LibTorch's translation unit compiles. Successes are cached."""

    def __init__(self) -> None:
        nlohmann_header()
        self.cache = Path(f"{build_dir()}-matrix")
        self.cache.mkdir(parents=True, exist_ok=True)
        self.missing, self.failures = [], []
        todo = []
        for config in MATRIX:
            if shutil.which(config[0]) is None:
                self.missing.append(f"{' '.join(config)}: {config[0]} not found")
            elif config[1] == "libc++" and not libcxx_available():
                self.missing.append(f"{' '.join(config)}: libc++ not found (Debian/Ubuntu: libc++-dev libc++abi-dev)")
            else:
                todo.append(matrix_command(*config))
        self.thread = threading.Thread(target=self._compile, args=(todo,), daemon=True)
        self.thread.start()

    def _compile(self, commands: list[list[str]]) -> None:
        for command in commands:
            success = self.cache / matrix_key(command)
            if not success.is_file():
                result = subprocess.run(command, capture_output=True, text=True, timeout=600)
                if result.returncode:
                    self.failures.append(f"{' '.join(command)}\n{(result.stdout + result.stderr)[-4000:]}")
                else:
                    success.touch()

    def wait(self) -> BuildMatrix:
        self.thread.join(timeout=1800)
        return self


_matrix: BuildMatrix | None = None


def start_build_matrix() -> BuildMatrix:
    """The build matrix, started once per session."""
    global _matrix
    if _matrix is None:
        _matrix = BuildMatrix()
    return _matrix


def test_the_header_compiles_warning_free_in_the_build_matrix():
    matrix = start_build_matrix().wait()
    assert not matrix.failures, "\n\n".join(matrix.failures)
    if matrix.missing:
        unavailable("build matrix configurations not compiled: " + "; ".join(matrix.missing))
