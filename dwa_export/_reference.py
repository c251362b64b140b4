"""A float64 NumPy reference for DWA weights, independent of the torch kernel.

Used by ``dwa-export`` to verify every exported artifact in its own runtime. It
states the contract for invalid input explicitly: rows whose temperature is not
finite and > 0, or whose rates are not all finite, are NaN.
"""

from __future__ import annotations

import numpy as np

__all__ = ["reference_weights"]


def reference_weights(loss_t1: np.ndarray, loss_t2: np.ndarray, temperature: np.ndarray | float) -> np.ndarray:
    """``K * softmax(r / T)`` over the last axis, in float64, via log-sum-exp."""
    l1 = np.asarray(loss_t1, dtype=np.float64)
    l2 = np.asarray(loss_t2, dtype=np.float64)
    t = np.asarray(temperature, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        z = (l1 / l2) / t
        top = np.max(z, axis=-1, keepdims=True)
        log_sum = top + np.log(np.sum(np.exp(z - top), axis=-1, keepdims=True))
        weights = l1.shape[-1] * np.exp(z - log_sum)
        rates_ok = np.all(np.isfinite(l1 / l2), axis=-1, keepdims=True)
    temperature_ok = np.isfinite(t) & (t > 0)
    return np.where(rates_ok & temperature_ok, weights, np.nan)
