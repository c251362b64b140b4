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

from ._reference import reference_weights

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
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.abs((loss_t1.astype(np.float64) / loss_t2) / temperature.astype(np.float64))
    finite = scaled[np.isfinite(scaled)]
    worst = float(finite.max()) if finite.size else 0.0
    return max(BASE[dtype], 2.0 * float(np.finfo(dtype).eps) * worst * loss_t1.shape[-1])


def make_case(name: str, dtype: str, loss_t1, loss_t2, temperature) -> Case:
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


def _special(dtype: str) -> Iterator[Case]:
    """Zero, NaN, infinite inputs and invalid temperatures: NaN rows, never plausible weights."""
    nan, inf = float("nan"), float("inf")
    good = ([0.5, 0.8, 0.9], [1.0, 1.0, 1.0])
    rows = {
        "zero-denominator": ([1.0, 0.8, 0.9], [0.0, 1.0, 1.0]),
        "negative-over-zero": ([-1.0, 0.8, 0.9], [0.0, 1.0, 1.0]),
        "zero-over-zero": ([0.0, 0.8, 0.9], [0.0, 1.0, 1.0]),
        "nan-loss": ([nan, 0.8, 0.9], [1.0, 1.0, 1.0]),
        "inf-loss": ([inf, 0.8, 0.9], [1.0, 1.0, 1.0]),
        "minus-inf-loss": ([-inf, 0.8, 0.9], [1.0, 1.0, 1.0]),
    }
    for name, (l1, l2) in rows.items():
        yield make_case(f"special/{name}", dtype, l1, l2, 2.0)
        yield make_case(f"special/{name}/batched", dtype, [l1, good[0]], [l2, good[1]], 2.0)
    for t in (0.0, -0.0, -2.0, inf, -inf, nan):
        yield make_case(f"special/temperature={t}", dtype, *good, t)
        yield make_case(f"special/temperature={t}/per-row", dtype, [good[0], good[0]], [good[1], good[1]], [[2.0], [t]])


def case_inputs(dtype: str = "float32") -> list[Case]:
    """The conformance grid in ``dtype``: [K] and [N, K] layouts, regular and special cases."""
    rng = np.random.default_rng(20190616)  # fixed: the grid must not change between runs
    temperatures = FLOAT16_TEMPERATURES if dtype == "float16" else TEMPERATURES
    families = ("near-one", "typical", "negative") if dtype == "float16" else ("near-one", "typical", "decades", "negative")
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
