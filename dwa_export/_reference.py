"""A float64 NumPy reference for DWA weights, independent of the torch kernel.

Used by ``dwa-export`` to verify every exported artifact in its own runtime. It
states the contract for invalid input explicitly, from the losses rather than
from the kernel's arithmetic: a row is NaN when its temperature is not finite
and > 0, when either loss of the row has a zero, NaN or infinite entry, when a
task's loss changed sign between the two epochs, or when a rate is not
representable in the kernel's compute dtype (overflows, or underflows to 0).
"""

from __future__ import annotations

import numpy as np

__all__ = ["compute_dtype", "reference_weights", "valid_rows"]


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype the kernel computes rates in: float64 for float64, float32 otherwise."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def valid_rows(loss_t1: np.ndarray, loss_t2: np.ndarray) -> np.ndarray:
    """``[..., 1]`` booleans: the row's losses give DWA weights at all.

    A row is valid iff every ``loss_t1[k]`` and ``loss_t2[k]`` is finite and
    nonzero, has the same sign in both epochs, and ``loss_t1[k] / loss_t2[k]``
    is finite and nonzero in the compute dtype of the inputs' dtype (float32
    for float16/float32, float64 for float64: a rate beyond ~3.4e38 or below
    ~1.4e-45 in float32 is not representable).
    """
    l1, l2 = np.asarray(loss_t1), np.asarray(loss_t2)
    dtype = compute_dtype(np.result_type(l1.dtype, l2.dtype) if l1.dtype.kind == "f" else np.dtype(np.float64))
    a, b = l1.astype(np.float64), l2.astype(np.float64)
    ok = np.isfinite(a) & np.isfinite(b) & (a != 0) & (b != 0) & (np.signbit(a) == np.signbit(b))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        rate = l1.astype(dtype) / l2.astype(dtype)
    ok &= np.isfinite(rate) & (rate != 0)
    rows: np.ndarray = np.all(ok, axis=-1, keepdims=True)
    return rows


def reference_weights(loss_t1: np.ndarray, loss_t2: np.ndarray, temperature: np.ndarray | float) -> np.ndarray:
    """``w = K * softmax(r / T)`` over the last axis, ``r = loss_t1 / loss_t2``, in float64 via log-sum-exp.

    NaN rows where :func:`valid_rows` is false or the row's temperature is not
    finite and > 0.
    """
    l1 = np.asarray(loss_t1, dtype=np.float64)
    l2 = np.asarray(loss_t2, dtype=np.float64)
    t = np.asarray(temperature, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        z = (l1 / l2) / t
        top = np.max(z, axis=-1, keepdims=True)
        log_sum = top + np.log(np.sum(np.exp(z - top), axis=-1, keepdims=True))
        weights = l1.shape[-1] * np.exp(z - log_sum)
    temperature_ok = np.isfinite(t) & (t > 0)
    rows_ok = valid_rows(np.asarray(loss_t1), np.asarray(loss_t2))
    return np.where(rows_ok & temperature_ok, weights, np.nan)
