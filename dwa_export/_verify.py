"""Verifying an exported artifact by loading it in its own runtime and comparing numbers."""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._conformance import Case, case_inputs
from ._export import (
    DTYPES,
    FORMATS,
    INPUT_NAMES,
    MANIFEST,
    OUTPUT_NAMES,
    README,
    Artifact,
    describe,
    manifest_text,
    packaged_readme,
    plan,
    quiet_exporters,
    sha256,
    toolchain,
)

__all__ = ["Verification", "entry_problems", "manifest_problems", "readme_problems", "verify"]

Runner = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Verification:
    filename: str
    runtime: str
    cases: int = 0
    failed_cases: int = 0
    max_error: float = 0.0  # max |weights - float64 reference| over finite entries
    worst_ratio: float = 0.0  # max error / bound over all cases (<= 1 passes)
    load_s: float = float("nan")
    call_s: float = float("nan")  # median of one K=3 call
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _runtime(artifact: Artifact) -> str:
    if artifact.format == "torchscript":
        return "torch.jit.load"
    if artifact.format.startswith("onnx"):
        return "onnxruntime"
    return "torch.export.load"


def _load(artifact: Artifact, path: Path) -> Runner:
    if artifact.format.startswith("onnx"):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4  # the rejection checks below fail on purpose; errors still raise
        with contextlib.redirect_stdout(io.StringIO()):  # its "EP Error" banner for a file it cannot load
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run_onnx(l1: np.ndarray, l2: np.ndarray, t: np.ndarray) -> np.ndarray:
            weights: np.ndarray = session.run(list(OUTPUT_NAMES), dict(zip(INPUT_NAMES, (l1, l2, t), strict=True)))[0]
            return weights

        return run_onnx

    import torch

    module = torch.jit.load(str(path)) if artifact.format == "torchscript" else torch.export.load(str(path)).module()

    def run_torch(l1: np.ndarray, l2: np.ndarray, t: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out: torch.Tensor = module(torch.from_numpy(l1), torch.from_numpy(l2), torch.from_numpy(t))
        return out.numpy()

    return run_torch


def _cases_for(artifact: Artifact, dtypes: Sequence[str]) -> list[Case]:
    if artifact.format == "torchscript":
        return [case for dtype in dtypes for case in case_inputs(dtype)]
    assert artifact.dtype is not None
    return [case for case in case_inputs(artifact.dtype) if case.batched == artifact.batched]


def _adapt(artifact: Artifact, case: Case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give a case's temperature the rank the artifact declares."""
    temperature = case.temperature
    if artifact.format == "onnx-batched" and temperature.ndim == 0:
        temperature = temperature.reshape(1, 1)
    elif artifact.format == "pt2-batched":
        temperature = np.broadcast_to(temperature, (case.loss_t1.shape[0], 1)).copy()
    return case.loss_t1, case.loss_t2, temperature


def _check_case(result: Verification, artifact: Artifact, run: Runner, case: Case) -> None:
    raises = artifact.format == "torchscript" and case.invalid_temperature
    try:
        got = run(*_adapt(artifact, case))
    except Exception as error:  # noqa: BLE001 - any runtime's error type
        if not raises:
            result.problems.append(f"{case.name}: raised {type(error).__name__}: {str(error).strip()[:200]}")
        elif "temperature must be finite and > 0" not in str(error):
            result.problems.append(f"{case.name}: raised without naming the temperature: {str(error)[:200]}")
        return
    if raises:
        result.problems.append(f"{case.name}: an invalid temperature did not raise")
        return
    if got.shape != case.expected.shape or got.dtype != case.loss_t1.dtype:
        result.problems.append(
            f"{case.name}: got {got.dtype}{list(got.shape)}, expected {case.loss_t1.dtype}{list(case.expected.shape)}"
        )
        return
    got = got.astype(np.float64)
    if not np.array_equal(np.isnan(got), np.isnan(case.expected)):
        result.problems.append(
            f"{case.name}: NaN pattern {np.isnan(got).tolist()} != expected {np.isnan(case.expected).tolist()}"
        )
        return
    finite = ~np.isnan(case.expected)
    if finite.any():
        worst = float(np.max(np.abs(got[finite] - case.expected[finite])))
        result.max_error = max(result.max_error, worst)
        result.worst_ratio = max(result.worst_ratio, worst / case.bound)
        if not worst <= case.bound:
            result.problems.append(f"{case.name}: max abs error {worst:.3g} exceeds the bound {case.bound:.3g}")


def _rejects_mismatched_shapes(artifact: Artifact, run: Runner) -> bool:
    dtype = artifact.dtype or "float32"
    shape = (2, 3) if artifact.batched else (3,)
    l1 = np.ones(shape, dtype=dtype)
    l2 = np.ones(shape[:-1] + (1,), dtype=dtype)  # would broadcast against l1
    t = np.ones((2, 1) if artifact.batched else (), dtype=dtype)
    try:
        run(l1, l2, t)
    except Exception:  # noqa: BLE001
        return True
    return False


def _median_call(run: Runner, artifact: Artifact, repeats: int = 50) -> float:
    dtype = artifact.dtype or "float32"
    shape = (3, 3) if artifact.batched else (3,)
    l1, l2 = np.full(shape, 0.8, dtype=dtype), np.ones(shape, dtype=dtype)
    t = np.full((3, 1) if artifact.batched else (), 2.0, dtype=dtype)
    run(l1, l2, t)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(l1, l2, t)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def verify(
    out_dir: Path,
    artifact: Artifact,
    manifest: dict[str, Any] | None,
    dtypes: Sequence[str] = ("float32",),
) -> Verification:
    """Load ``artifact`` from ``out_dir`` in its own runtime and check it against the reference.

    Checks: the file's manifest entry (its sha256, and every other field against
    what the file itself says), every conformance case (within
    its bound, NaN exactly where the contract says), invalid temperatures (raise
    in TorchScript, NaN rows elsewhere), and that mismatched shapes are rejected.
    """
    path = out_dir / artifact.filename
    result = Verification(artifact.filename, _runtime(artifact))
    if not path.exists():
        result.problems.append("missing")
        return result
    entry = (manifest or {}).get("artifacts", {}).get(artifact.filename)
    if entry is None:
        result.problems.append(f"in the folder but not listed in {out_dir / MANIFEST}")
    else:
        result.problems += entry_problems(artifact, path, entry)
    with quiet_exporters():
        start = time.perf_counter()
        try:
            run = _load(artifact, path)
        except Exception as error:  # noqa: BLE001
            result.problems.append(f"cannot be loaded by {result.runtime}: {str(error).strip()[:300]}")
            return result
        result.load_s = time.perf_counter() - start
        if artifact.format.startswith("onnx"):
            import onnx

            try:
                onnx.checker.check_model(str(path), full_check=True)
            except Exception as error:  # noqa: BLE001
                result.problems.append(f"onnx.checker: {str(error).strip()[:300]}")
        cases = _cases_for(artifact, dtypes)
        for case in cases:
            before = len(result.problems)
            _check_case(result, artifact, run, case)
            result.failed_cases += len(result.problems) > before
        result.cases = len(cases)
        if not _rejects_mismatched_shapes(artifact, run):
            result.problems.append("loss_t1 and loss_t2 of different shapes were broadcast instead of rejected")
        result.call_s = _median_call(run, artifact)
    return result


def entry_problems(artifact: Artifact, path: Path, entry: Any) -> list[str]:
    """Each field of the manifest ``entry`` of ``path`` that is not what :func:`describe` reads from the file."""
    if not isinstance(entry, dict):
        return [f"its entry in {MANIFEST} is {type(entry).__name__} {entry!r:.80}, not an object"]
    problems = []
    if entry.get("sha256") != sha256(path):
        problems.append(f"sha256 differs from {MANIFEST}: the file was modified after export")
    try:
        actual = describe(artifact, path)
    except Exception as error:  # noqa: BLE001 - a corrupt file: its runtime's load says more
        return [*problems, f"cannot be read to compare with its {MANIFEST} entry: {str(error).strip()[:200]}"]
    del actual["sha256"]
    recorded = {key: value for key, value in entry.items() if key != "sha256"}
    problems += [f"{MANIFEST} {difference}" for difference in _differences(recorded, actual)]
    return problems


def _differences(recorded: Any, actual: Any, where: str = "") -> list[str]:
    """Where the JSON values ``recorded`` and ``actual`` differ, as phrases (``True`` is not ``1``, nor ``1.0``)."""
    if isinstance(recorded, dict) and isinstance(actual, dict):

        def at(key: Any) -> str:
            return f"{where}[{key!r:.80}]" if where else f"{key!s:.80}"

        out = [f"has no {at(key)}; the file's is {actual[key]!r:.120}" for key in actual if key not in recorded]
        out += [f"has {at(key)}, which dwa-export does not write" for key in recorded if key not in actual]
        for key in actual:
            if key in recorded:
                out += _differences(recorded[key], actual[key], at(key))
        return out
    if isinstance(recorded, list) and isinstance(actual, list) and len(recorded) == len(actual):
        return [
            d
            for i, pair in enumerate(zip(recorded, actual, strict=False))
            for d in _differences(*pair, f"{where}[{i}]")
        ]
    if json.dumps(recorded) == json.dumps(actual):
        return []
    return [f"says {where} is {recorded!r:.120}, the file has {actual!r:.120}"]


_TOP_LEVEL = ("generator", "contract", "toolchain", "artifacts")
_CONTRACT = "see README.md beside this file"


def manifest_problems(text: str, manifest: dict[str, Any]) -> list[str]:
    """What is wrong with ``manifest.json`` as a whole (its entries are checked with their files by :func:`verify`).

    ``text`` must be exactly what dwa-export writes for ``manifest`` (so a
    changed space, key order or duplicate key shows), with dwa-export's fields,
    a generator that matches the recorded dwa_export version, the recorded
    toolchain's names, and only file names that dwa-export writes. The toolchain
    versions themselves are recorded, not checkable: no file carries them.
    """
    problems = []
    expected = manifest_text(manifest)
    if text != expected:
        lines, wanted = text.splitlines(), expected.splitlines()
        line = next(
            (i for i, (a, b) in enumerate(zip(lines, wanted, strict=False)) if a != b), min(len(lines), len(wanted))
        )
        problems.append(
            f"line {line + 1} is not laid out as dwa-export writes it (edited by hand or another tool?); "
            "dwa-export rewrites it"
        )
    if list(manifest) != list(_TOP_LEVEL):
        problems.append(f"has the fields {list(manifest)}, dwa-export writes {list(_TOP_LEVEL)}")
    recorded = manifest.get("toolchain")
    if not isinstance(recorded, dict) or list(recorded) != list(toolchain()):
        problems.append(f"its toolchain is {recorded!r:.200}, expected an object with the fields {list(toolchain())}")
    elif not all(value is None or isinstance(value, str) for value in recorded.values()):
        problems.append(f"its toolchain versions must be strings or null, got {recorded!r:.200}")
    elif manifest.get("generator") != f"dwa_export {recorded['dwa_export']}":
        problems.append(
            f"its generator is {manifest.get('generator')!r:.80}, expected 'dwa_export {recorded['dwa_export']}' "
            "(the dwa_export version its toolchain records)"
        )
    if manifest.get("contract") != _CONTRACT:
        problems.append(f"its contract field is {manifest.get('contract')!r:.80}, dwa-export writes {_CONTRACT!r}")
    known = {artifact.filename for artifact in plan(FORMATS, DTYPES)}
    entries = manifest.get("artifacts", {})
    if not entries:
        problems.append("lists no artifacts")
    for name in entries:
        if name not in known:
            problems.append(f"lists {name!r:.80}, which is not a file dwa-export writes")
    return problems


def readme_problems(out_dir: Path, exported_by: object) -> list[str]:
    """Whether ``README.md`` beside the artifacts is the one this dwa_export writes.

    ``exported_by``: the dwa_export version the manifest records, named when it is not this one.
    """
    path = out_dir / README
    if not path.is_file():
        return ["missing (dwa-export writes it beside the artifacts)"]
    if path.read_bytes() == packaged_readme():
        return []
    running = toolchain()["dwa_export"]
    if exported_by != running:
        return [
            f"differs from the README of dwa_export {running} (the folder was exported by {exported_by!r:.40}): "
            "run dwa-export"
        ]
    return [f"differs from the README that dwa_export {running} writes: modified after export? dwa-export rewrites it"]
