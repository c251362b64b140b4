"""Verifying an exported artifact by loading it in its own runtime and comparing numbers."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._conformance import Case, case_inputs
from ._export import INPUT_NAMES, OUTPUT_NAMES, Artifact, quiet_exporters, sha256

__all__ = ["Verification", "verify"]

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
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run_onnx(l1: np.ndarray, l2: np.ndarray, t: np.ndarray) -> np.ndarray:
            return session.run(list(OUTPUT_NAMES), dict(zip(INPUT_NAMES, (l1, l2, t))))[0]

        return run_onnx

    import torch

    if artifact.format == "torchscript":
        module = torch.jit.load(str(path))
    else:
        module = torch.export.load(str(path)).module()

    def run_torch(l1: np.ndarray, l2: np.ndarray, t: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = module(torch.from_numpy(l1), torch.from_numpy(l2), torch.from_numpy(t))
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
        result.problems.append(f"{case.name}: got {got.dtype}{list(got.shape)}, expected {case.loss_t1.dtype}{list(case.expected.shape)}")
        return
    got = got.astype(np.float64)
    if not np.array_equal(np.isnan(got), np.isnan(case.expected)):
        result.problems.append(f"{case.name}: NaN pattern {np.isnan(got).tolist()} != expected {np.isnan(case.expected).tolist()}")
        return
    finite = ~np.isnan(case.expected)
    if finite.any():
        error = float(np.max(np.abs(got[finite] - case.expected[finite])))
        result.max_error = max(result.max_error, error)
        result.worst_ratio = max(result.worst_ratio, error / case.bound)
        if not error <= case.bound:
            result.problems.append(f"{case.name}: max abs error {error:.3g} exceeds the bound {case.bound:.3g}")


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

    Checks: the sha256 recorded in the manifest, every conformance case (within
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
        result.problems.append(f"not listed in {out_dir / 'manifest.json'}")
    elif entry.get("sha256") != sha256(path):
        result.problems.append("sha256 differs from manifest.json: the file was modified after export")
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
