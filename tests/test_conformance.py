"""Every runtime of the kernel against the stored conformance set (tests/data/conformance.npz)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import conformance
from dwa_export import DWAWeights
from dwa_export._export import Artifact, export_artifact, quiet_exporters
from dwa_export._reference import reference_weights

ROOT = Path(__file__).resolve().parents[1]
EXPORTED = ROOT / "exported"
CASES = conformance.load()


def by(dtype: str, batched: bool | None = None) -> list[conformance.Case]:
    return [c for c in CASES if c.dtype == dtype and (batched is None or c.batched == batched)]


def torch_runner(module):
    def run(l1, l2, t):
        with torch.no_grad():
            return module(torch.from_numpy(l1), torch.from_numpy(l2), torch.from_numpy(t)).numpy()

    return run


def onnx_runner(path: Path):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(l1, l2, t):
        if l1.ndim == 2 and t.ndim == 0:
            t = t.reshape(1, 1)  # the batched file takes T as [1, 1] or [N, 1]
        return session.run(["weights"], {"loss_t1": l1, "loss_t2": l2, "temperature": t})[0]

    return run


def per_row_runner(run):
    """torch.export's batched program takes T as [N, 1]."""
    return lambda l1, l2, t: run(l1, l2, np.broadcast_to(t, (l1.shape[0], 1)).copy())


def check(run, cases, raises_on_invalid_temperature: bool) -> float:
    """Run every case; return the worst error / bound."""
    assert cases
    worst = 0.0
    for case in cases:
        if raises_on_invalid_temperature and case.invalid_temperature:
            with pytest.raises(Exception, match="temperature must be finite and > 0"):
                run(case.loss_t1, case.loss_t2, case.temperature)
            continue
        worst = max(worst, conformance.assert_conforms(case, run(case.loss_t1, case.loss_t2, case.temperature)))
    return worst


def test_the_stored_set_covers_what_the_contract_names():
    names = {c.name for c in CASES}
    assert {c.dtype for c in CASES} == {"float32", "float64"}
    for k in (1, 2, 3, 16, 1000):
        assert any(n.startswith(f"K={k}/") for n in names)
    for fragment in ("near-one", "decades", "negative", "T=0.0001", "T=1e+06", "per-row", "special/mixed-batch"):
        assert any(fragment in n for n in names), fragment
    assert any(np.isnan(c.expected).any() for c in CASES) and any(c.batched for c in CASES)
    # Every invalid value in each input and each position, a sign change each way,
    # alone ([K]) and between good rows ([N, K]), in both dtypes.
    for dtype in ("float32", "float64"):
        for where in ("first", "middle", "last"):
            spots = [
                f"{side}={value}/{where}"
                for side in ("loss_t1", "loss_t2")
                for value in ("0", "-0", "nan", "inf", "-inf")
            ]
            spots += [f"sign-change/+to-/{where}", f"sign-change/-to+/{where}"]
            for spot in spots:
                for suffix in ("", "/batched"):
                    assert f"special/{spot}{suffix}" in {c.name for c in by(dtype)}, (dtype, spot, suffix)


def test_only_the_bad_rows_of_a_mixed_batch_are_nan():
    (case,) = [c for c in by("float32") if c.name == "special/mixed-batch"]
    rows = np.isnan(case.expected).all(-1)
    assert rows.tolist() == [True, False] * (len(rows) // 2) and len(rows) >= 40
    assert not np.isnan(case.expected[~rows]).any()
    np.testing.assert_allclose(case.expected[~rows].sum(-1), 3.0)
    (case,) = [c for c in by("float32") if c.name == "special/mixed-batch/per-row-T"]
    # Rows 0-3: bad losses; rows 4 and 6: T = -1 and NaN; rows 5 and 7: good.
    assert np.isnan(case.expected).all(-1).tolist() == [True] * 5 + [False, True, False]


def test_hand_worked_invalid_and_edge_rows():
    """The stored expectations of a few cases, by hand: what issue 11 reported, and what stays valid."""
    named = {c.name: c for c in by("float32")}
    for name in (
        "special/loss_t2=inf/first",
        "special/loss_t1=0/first",
        "special/sign-change/+to-/middle",
        "special/rate-overflows",
    ):
        assert np.isnan(named[name].expected).all(), name
    # Both epochs negative: rates 0.5, 0.8, 0.9 as for GOOD_ROW. T = 2:
    # w = 3 exp(r/2) / sum exp(r/2).
    e = np.exp(np.array([0.5, 0.8, 0.9]) / 2)
    np.testing.assert_allclose(named["special/both-negative"].expected, 3 * e / e.sum(), rtol=1e-7)
    # A rate of 8 * 2^-149 (subnormal) is valid; ~0 next to 0.8 and 0.9.
    e = np.exp(np.array([0.0, 0.8, 0.9]) / 2)
    np.testing.assert_allclose(named["special/subnormal-rate"].expected, 3 * e / e.sum(), rtol=1e-7)


def test_the_package_reference_used_by_dwa_export_agrees_with_the_tests_reference():
    for case in CASES:
        got = reference_weights(case.loss_t1, case.loss_t2, case.temperature)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(case.expected))
        finite = ~np.isnan(case.expected)
        np.testing.assert_allclose(got[finite], case.expected[finite], rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_eager(dtype):
    assert check(torch_runner(DWAWeights()), by(dtype), raises_on_invalid_temperature=True) <= 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_scripted_and_scripted_after_save_load(dtype, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(DWAWeights())
        torch.jit.save(scripted, str(tmp_path / "k.pt"))
        loaded = torch.jit.load(str(tmp_path / "k.pt"))
    check(torch_runner(scripted), by(dtype), raises_on_invalid_temperature=True)
    check(torch_runner(loaded), by(dtype), raises_on_invalid_temperature=True)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_committed_torchscript_file(dtype):
    module = torch.jit.load(str(EXPORTED / "dwa_weights.pt"))
    check(torch_runner(module), by(dtype), raises_on_invalid_temperature=True)


def test_committed_onnx_files_in_onnxruntime():
    check(onnx_runner(EXPORTED / "dwa_weights.onnx"), by("float32", batched=False), raises_on_invalid_temperature=False)
    check(
        onnx_runner(EXPORTED / "dwa_weights_batched.onnx"),
        by("float32", batched=True),
        raises_on_invalid_temperature=False,
    )


def reference_evaluator_runner(path: Path):
    """ONNX's own Python reference implementation of the operators: a second ONNX runtime."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(str(path))

    def run(l1, l2, t):
        if l1.ndim == 2 and t.ndim == 0:
            t = t.reshape(1, 1)
        with np.errstate(all="ignore"):  # log(-x), inf - inf: NaN on purpose
            return evaluator.run(["weights"], {"loss_t1": l1, "loss_t2": l2, "temperature": t})[0]

    return run


def test_committed_onnx_files_in_the_onnx_reference_evaluator():
    single, batched = EXPORTED / "dwa_weights.onnx", EXPORTED / "dwa_weights_batched.onnx"
    check(reference_evaluator_runner(single), by("float32", batched=False), raises_on_invalid_temperature=False)
    check(reference_evaluator_runner(batched), by("float32", batched=True), raises_on_invalid_temperature=False)


def test_committed_torch_export_programs():
    single = torch.export.load(str(EXPORTED / "dwa_weights.pt2")).module()
    batched = torch.export.load(str(EXPORTED / "dwa_weights_batched.pt2")).module()
    check(torch_runner(single), by("float32", batched=False), raises_on_invalid_temperature=False)
    check(per_row_runner(torch_runner(batched)), by("float32", batched=True), raises_on_invalid_temperature=False)


@pytest.fixture(scope="module")
def float64_artifacts(tmp_path_factory):
    out = tmp_path_factory.mktemp("float64")
    with quiet_exporters():
        for fmt in ("onnx", "onnx-batched", "pt2", "pt2-batched"):
            export_artifact(Artifact(fmt, "float64"), out)
    return out


def test_float64_onnx_and_torch_export(float64_artifacts):
    out = float64_artifacts
    check(
        onnx_runner(out / "dwa_weights_float64.onnx"), by("float64", batched=False), raises_on_invalid_temperature=False
    )
    check(
        onnx_runner(out / "dwa_weights_batched_float64.onnx"),
        by("float64", batched=True),
        raises_on_invalid_temperature=False,
    )
    check(
        reference_evaluator_runner(out / "dwa_weights_batched_float64.onnx"),
        by("float64", batched=True),
        raises_on_invalid_temperature=False,
    )
    single = torch.export.load(str(out / "dwa_weights_float64.pt2")).module()
    batched = torch.export.load(str(out / "dwa_weights_batched_float64.pt2")).module()
    check(torch_runner(single), by("float64", batched=False), raises_on_invalid_temperature=False)
    check(per_row_runner(torch_runner(batched)), by("float64", batched=True), raises_on_invalid_temperature=False)
