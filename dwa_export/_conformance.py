"""The conformance cases every runtime of the kernel must pass.

A case is a set of kernel inputs in one dtype plus the float64 reference weights
computed on those same rounded inputs, and an error bound. ``case_inputs()`` is
deterministic, so ``dwa-export`` and the stored test data (``tests/conformance``)
use the same grid.

Error bound: ``max(BASE[dtype], 2 * eps * max|r/T| * K)``. ``BASE`` (1e-6 for
float32, 1e-12 for float64) holds where |r/T| is of order 1; the second term
covers ill-conditioned cases (tiny T, rates spread over decades), since exp(r/T)
amplifies the rounding of r/T by |r/T| and a weight can reach K.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from ._reference import reference_weights, valid_rows

__all__ = ["Case", "case_inputs", "error_bound", "make_case"]

NUM_TASKS = (1, 2, 3, 16, 1000)
TEMPERATURES = (1e-4, 1e-2, 0.5, 2.0, 100.0, 1e6)
BASE = {"float16": 4e-3, "float32": 1e-6, "float64": 1e-12}
# float16 cannot hold T = 1e6 (max 65504) and flushes tiny rates.
FLOAT16_TEMPERATURES = (1e-2, 0.5, 2.0, 100.0)


@dataclass(frozen=True)
class Case:
    name: str
    dtype: str
    loss_t1: np.ndarray
    loss_t2: np.ndarray
    temperature: np.ndarray
    expected: np.ndarray  # float64; NaN where the contract says NaN
    bound: float

    @property
    def batched(self) -> bool:
        return self.loss_t1.ndim == 2

    @property
    def invalid_temperature(self) -> bool:
        """Eager and TorchScript raise for this case; exported graphs return NaN rows."""
        t = self.temperature.astype(np.float64)
        return not bool(np.all(np.isfinite(t) & (t > 0)))

    def __repr__(self) -> str:  # names the case in assertion messages, not its arrays
        return f"{self.dtype}:{self.name}"


def error_bound(dtype: str, loss_t1: np.ndarray, loss_t2: np.ndarray, temperature: np.ndarray) -> float:
    """``max(BASE[dtype], 2 * eps * max|r/T| * K)`` over the rows that get finite weights."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scaled = np.abs((loss_t1.astype(np.float64) / loss_t2) / temperature.astype(np.float64))
    rows = valid_rows(loss_t1, loss_t2) & np.isfinite(temperature.astype(np.float64)) & (temperature > 0)
    finite = scaled[np.broadcast_to(rows, scaled.shape) & np.isfinite(scaled)]
    worst = float(finite.max()) if finite.size else 0.0
    return float(max(BASE[dtype], 2.0 * float(np.finfo(dtype).eps) * worst * loss_t1.shape[-1]))


def make_case(name: str, dtype: str, loss_t1: ArrayLike, loss_t2: ArrayLike, temperature: ArrayLike) -> Case:
    """Round the inputs to ``dtype`` and attach the reference computed on the rounded values."""
    l1 = np.asarray(loss_t1, dtype=dtype)
    l2 = np.asarray(loss_t2, dtype=dtype)
    t = np.asarray(temperature, dtype=dtype)
    return Case(name, dtype, l1, l2, t, reference_weights(l1, l2, t), error_bound(dtype, l1, l2, t))


def _rates(family: str, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    loss_t2 = rng.uniform(0.05, 5.0, shape)
    if family == "near-one":
        rates = 1.0 + rng.uniform(-1e-3, 1e-3, shape)
    elif family == "typical":
        rates = rng.uniform(0.5, 1.2, shape)
    elif family == "decades":
        rates = 10.0 ** rng.uniform(-3, 3, shape)
    elif family == "negative":  # both epochs negative: positive rates
        rates, loss_t2 = rng.uniform(0.5, 1.5, shape), -loss_t2
    else:
        raise ValueError(family)
    return loss_t2 * rates, loss_t2


GOOD_ROW = ([0.5, 0.8, 0.9], [1.0, 1.0, 1.0])
GOOD_ROW_2 = ([1.2, 0.7, 1.05], [1.5, 1.0, 1.0])
# Values that make a row invalid wherever they sit, in either input.
BAD_VALUES = {"0": 0.0, "-0": -0.0, "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
COLUMNS = ("first", "middle", "last")


def invalid_rows(dtype: str) -> dict[str, tuple[list[float], list[float]]]:
    """Named [3]-task rows the kernel must turn into NaN (one bad spot each, plus a few combined).

    Every value of ``BAD_VALUES`` in ``loss_t1`` and in ``loss_t2``, and a change
    of sign each way, in the first, middle and last column; 0/0, NaN/NaN, inf/inf;
    and valid losses whose rate is not representable in the dtype's compute dtype.
    """
    rows: dict[str, tuple[list[float], list[float]]] = {}
    for column, where in enumerate(COLUMNS):
        for label, value in BAD_VALUES.items():
            l1, l2 = list(GOOD_ROW[0]), list(GOOD_ROW[1])
            l1[column] = value
            rows[f"loss_t1={label}/{where}"] = (l1, list(GOOD_ROW[1]))
            l2[column] = value
            rows[f"loss_t2={label}/{where}"] = (list(GOOD_ROW[0]), l2)
        l1 = list(GOOD_ROW[0])
        l1[column] = -l1[column]
        rows[f"sign-change/+to-/{where}"] = (l1, list(GOOD_ROW[1]))  # was positive (t-2), now negative
        l2 = list(GOOD_ROW[1])
        l2[column] = -l2[column]
        rows[f"sign-change/-to+/{where}"] = (list(GOOD_ROW[0]), l2)
    nan, inf = float("nan"), float("inf")
    rows["zero-over-zero"] = ([0.0, 0.8, 0.9], [0.0, 1.0, 1.0])
    rows["negative-over-zero"] = ([-1.0, 0.8, 0.9], [0.0, 1.0, 1.0])
    rows["nan-over-nan"] = ([nan, 0.8, 0.9], [nan, 1.0, 1.0])
    rows["inf-over-inf"] = ([inf, 0.8, 0.9], [inf, 1.0, 1.0])
    rows["all-negative-but-one"] = ([-0.5, -0.8, 0.9], [-1.0, -1.0, -1.0])
    # Valid losses, rate not representable in the compute dtype (float32 for float16).
    info = np.finfo(np.float64 if dtype == "float64" else np.float32)
    if dtype != "float16":  # float16 losses cannot make a float32 rate overflow or underflow
        rows["rate-overflows"] = ([float(info.max) / 4, 0.8, 0.9], [0.125, 1.0, 1.0])
        rows["rate-underflows-to-zero"] = ([float(info.smallest_subnormal), 0.8, 0.9], [4.0, 1.0, 1.0])
    return rows


def valid_edge_rows(dtype: str) -> dict[str, tuple[list[float], list[float]]]:
    """Rows near the invalid set that must still get finite weights."""
    rows = {
        "both-negative": ([-0.5, -0.8, -0.9], [-1.0, -1.0, -1.0]),
        "negative-column": ([-0.5, 0.8, 0.9], [-1.0, 1.0, 1.0]),
    }
    if dtype != "float16":
        info = np.finfo(np.float64 if dtype == "float64" else np.float32)
        rows["subnormal-rate"] = ([float(info.smallest_subnormal) * 8, 0.8, 0.9], [1.0, 1.0, 1.0])
        rows["large-rate"] = ([float(info.max) / 4, 0.8, 0.9], [1.0, 1.0, 1.0])
        rows["tiny-losses"] = (
            [float(info.tiny) * 0.5, float(info.tiny), 0.9],
            [float(info.tiny), float(info.tiny), 1.0],
        )
    return rows


def _special(dtype: str) -> Iterator[Case]:
    """Invalid losses and temperatures: NaN rows exactly where the contract says, never plausible weights."""
    bad = invalid_rows(dtype)
    for name, (l1, l2) in {**bad, **valid_edge_rows(dtype)}.items():
        yield make_case(f"special/{name}", dtype, l1, l2, 2.0)
        # Batched, between good rows: only the bad row goes NaN.
        yield make_case(
            f"special/{name}/batched", dtype, [GOOD_ROW[0], l1, GOOD_ROW_2[0]], [GOOD_ROW[1], l2, GOOD_ROW_2[1]], 2.0
        )
    # Every invalid row in one batch, each followed by a good row.
    names = sorted(bad)
    l1s = [row for name in names for row in (bad[name][0], GOOD_ROW_2[0])]
    l2s = [row for name in names for row in (bad[name][1], GOOD_ROW_2[1])]
    yield make_case("special/mixed-batch", dtype, l1s, l2s, 2.0)
    nan, inf = float("nan"), float("inf")
    for t in (0.0, -0.0, -2.0, inf, -inf, nan):
        yield make_case(f"special/temperature={t}", dtype, *GOOD_ROW, t)
        yield make_case(
            f"special/temperature={t}/per-row",
            dtype,
            [GOOD_ROW[0], GOOD_ROW[0]],
            [GOOD_ROW[1], GOOD_ROW[1]],
            [[2.0], [t]],
        )
    # Bad losses, bad temperatures and good rows with their own temperatures, in one batch.
    picks = ("loss_t1=0/first", "loss_t2=inf/middle", "sign-change/-to+/last", "loss_t1=nan/last")
    rows = [bad[p] for p in picks] + [GOOD_ROW, GOOD_ROW_2, GOOD_ROW, GOOD_ROW_2]
    temperatures = [[2.0], [0.5], [1.0], [2.0], [-1.0], [0.5], [nan], [1.0]]
    yield make_case("special/mixed-batch/per-row-T", dtype, [r[0] for r in rows], [r[1] for r in rows], temperatures)


def case_inputs(dtype: str = "float32") -> list[Case]:
    """The conformance grid in ``dtype``: [K] and [N, K] layouts, regular and special cases."""
    rng = np.random.default_rng(20190616)  # fixed: the grid must not change between runs
    temperatures = FLOAT16_TEMPERATURES if dtype == "float16" else TEMPERATURES
    families = (
        ("near-one", "typical", "negative") if dtype == "float16" else ("near-one", "typical", "decades", "negative")
    )
    cases = []
    for k in NUM_TASKS:
        for family in families:
            l1, l2 = _rates(family, (k,), rng)
            for t in temperatures:
                cases.append(make_case(f"K={k}/{family}/T={t:g}", dtype, l1, l2, t))
            l1, l2 = _rates(family, (3, k), rng)
            cases.append(make_case(f"K={k}/{family}/N=3/T=2", dtype, l1, l2, 2.0))
            per_row = np.array(temperatures[:3])[:, None]
            cases.append(make_case(f"K={k}/{family}/N=3/T=per-row", dtype, l1, l2, per_row))
    cases.extend(_special(dtype))
    return cases
