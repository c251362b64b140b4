"""Independent float64 NumPy reference for DWA, written from the paper's formula.

Deliberately not the library's formulation: it divides by T before shifting by
the max and normalises with an explicit sum, times K.
"""

from __future__ import annotations

import numpy as np


def dwa_weights(loss_t1, loss_t2, temperature) -> np.ndarray:
    """w_k = K exp(r_k / T) / sum_j exp(r_j / T), r_k = L_k(t-1) / L_k(t-2), in float64."""
    l1 = np.asarray(loss_t1, dtype=np.float64)
    l2 = np.asarray(loss_t2, dtype=np.float64)
    t = np.asarray(temperature, dtype=np.float64)
    z = (l1 / l2) / t
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return l1.shape[-1] * e / e.sum(axis=-1, keepdims=True)


def epoch_weights(batches_per_epoch, temperature, batch_weights=None) -> list[np.ndarray]:
    """The weights used during each epoch of a run, from the raw per-batch losses.

    ``batches_per_epoch[e]`` is a list of [K] loss vectors; ``batch_weights[e]``
    (optional) the matching per-batch weights. Epochs 0 and 1 are uniform.
    """
    averages = []
    weights = []
    for epoch, batches in enumerate(batches_per_epoch):
        k = len(batches[0])
        if len(averages) < 2:
            weights.append(np.ones(k))
        else:
            weights.append(dwa_weights(averages[-1], averages[-2], temperature))
        b = np.asarray(batches, dtype=np.float64)
        w = np.ones(len(b)) if batch_weights is None else np.asarray(batch_weights[epoch], dtype=np.float64)
        averages.append((b * w[:, None]).sum(0) / w.sum())
    return weights
