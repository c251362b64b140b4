"""The stored conformance set: ``tests/data/conformance.npz``.

Inputs come from the package's deterministic grid (``dwa_export._conformance``);
the expected weights and error bounds are computed here, with the tests' own
float64 reference (``reference.py``), and stored. Regenerate after changing the
grid with ``python tests/conformance.py``.

Contract applied to the expected values (``valid`` below): a row whose
temperature is not finite and > 0, or whose losses include a zero, NaN or
infinite value in either epoch or change sign between them, or whose rate is
not representable in the inputs' dtype, is NaN.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from dwa_export._conformance import Case  # noqa: E402  (only the container: values are computed here)
from reference import dwa_weights  # noqa: E402

PATH = Path(__file__).parent / "data" / "conformance.npz"
DTYPES = ("float32", "float64")
BASE = {"float32": 1e-6, "float64": 1e-12}


def valid(loss_t1: np.ndarray, loss_t2: np.ndarray, temperature: np.ndarray) -> np.ndarray:
    """The contract's valid rows, written out from the losses themselves.

    A row is invalid when a loss in either epoch is zero, NaN or infinite, when a
    task's loss has opposite signs in the two epochs, or when its rate overflows
    or underflows to zero in the inputs' dtype (the kernel's compute dtype for
    float32/float64); or when its temperature is not finite and > 0.
    """
    l1, l2 = loss_t1.astype(np.float64), loss_t2.astype(np.float64)
    ok = np.isfinite(l1) & np.isfinite(l2) & (l1 != 0) & (l2 != 0) & ((l1 < 0) == (l2 < 0))
    with np.errstate(all="ignore"):
        rate = loss_t1 / loss_t2  # in the inputs' own dtype, like the kernel
    ok &= np.isfinite(rate) & (rate != 0)
    t = np.asarray(temperature, dtype=np.float64)
    return np.all(ok, axis=-1, keepdims=True) & np.isfinite(t) & (t > 0)


def expected_weights(loss_t1: np.ndarray, loss_t2: np.ndarray, temperature: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        weights = dwa_weights(loss_t1, loss_t2, temperature)
    return np.where(valid(loss_t1, loss_t2, temperature), weights, np.nan)


def bound(dtype: str, loss_t1: np.ndarray, loss_t2: np.ndarray, temperature: np.ndarray) -> float:
    """max(BASE, 2 * eps * max|r/T| * K) over the valid rows: exp(r/T) amplifies the rounding of r/T by |r/T|."""
    with np.errstate(all="ignore"):
        scaled = np.abs(loss_t1.astype(np.float64) / loss_t2 / temperature.astype(np.float64))
    scaled = scaled[np.broadcast_to(valid(loss_t1, loss_t2, temperature), scaled.shape)]
    worst = float(scaled.max()) if scaled.size else 0.0
    return max(BASE[dtype], 2 * float(np.finfo(dtype).eps) * worst * loss_t1.shape[-1])


def assert_conforms(case: Case, got: np.ndarray) -> float:
    """Check one runtime's weights for ``case``: dtype, shape, NaN rows, bound. Returns error / bound."""
    assert got.dtype == case.loss_t1.dtype and got.shape == case.expected.shape, case
    got = got.astype(np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(case.expected), err_msg=repr(case))
    finite = ~np.isnan(case.expected)
    if not finite.any():
        return 0.0
    error = np.max(np.abs(got[finite] - case.expected[finite]))
    assert error <= case.bound, f"{case}: error {error:.3g} > bound {case.bound:.3g}"
    return error / case.bound


def generate(path: Path = PATH) -> None:
    from dwa_export._conformance import case_inputs

    pool: dict[bytes, str] = {}
    arrays: dict[str, np.ndarray] = {}

    def put(array: np.ndarray) -> str:
        key = hashlib.sha256(array.dtype.str.encode() + str(array.shape).encode() + array.tobytes()).digest()
        if key not in pool:
            pool[key] = f"a{len(pool)}"
            arrays[pool[key]] = array
        return pool[key]

    table = []
    for dtype in DTYPES:
        for case in case_inputs(dtype):
            l1, l2, t = case.loss_t1, case.loss_t2, case.temperature
            table.append(
                (case.name, dtype, put(l1), put(l2), put(t), put(expected_weights(l1, l2, t)), bound(dtype, l1, l2, t))
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        names=np.array([row[0] for row in table]),
        dtypes=np.array([row[1] for row in table]),
        refs=np.array([row[2:6] for row in table]),
        bounds=np.array([row[6] for row in table]),
        **arrays,
    )


def load(path: Path = PATH) -> list[Case]:
    data = np.load(path)
    return [
        Case(str(name), str(dtype), *(data[key] for key in refs), float(b))
        for name, dtype, refs, b in zip(data["names"], data["dtypes"], data["refs"], data["bounds"], strict=True)
    ]


if __name__ == "__main__":
    generate()
    cases = load()
    print(f"wrote {PATH} ({PATH.stat().st_size / 1e3:.0f} kB, {len(cases)} cases)")
