"""``NumpyDWAHistory``: the loss history for torch-free trainers (NumPy arrays on the host)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._history_core import ACCUMULATOR_DTYPES, HistoryCore, Partial, check_batch_weight

__all__ = ["NumpyDWAHistory"]


class NumpyDWAHistory(HistoryCore):
    """:class:`dwa_export.DWAHistory` for NumPy: ``record`` per batch, ``step`` per epoch.

    The rules (sample weighting, epoch averages, warm-up, validation, roll,
    log, ``state_dict`` format) are those of the torch history, shared through
    one implementation; a checkpoint from either loads into the other. Sums
    are kept in float32, or float64 for float64 losses, like the torch
    history. Everything is on the host, so invalid per-row weights are
    rejected by :meth:`record` at once (the torch history reports them in
    ``step()``, to avoid a device sync).

    Args:
        num_tasks: K. Fixed by the first :meth:`record` when not given.
        tasks: task names (fixes K); :meth:`record` then also takes ``{name: loss}``.
    """

    def __init__(self, num_tasks: int | None = None, *, tasks: Sequence[str] | None = None) -> None:
        super().__init__(num_tasks, tasks)
        self._sums: np.ndarray | None = None
        self._weight = 0.0
        self._batches = 0

    def record(self, losses: Any, weight: Any = None) -> None:
        """Add one batch of per-task losses; see :meth:`dwa_export.DWAHistory.record`.

        ``losses``: a ``[..., K]`` array (a 0-d array is K = 1), a sequence of
        K numbers, or with ``tasks`` a mapping ``{name: loss}``. ``weight``:
        ``None``, a number ``>= 0`` (NumPy scalars and 0-d arrays included)
        for ``[K]`` losses, or an array of the batch shape with one weight per
        row. Raises, changing nothing, on anything else.
        """
        if isinstance(losses, Mapping):
            losses = self._names_to_order(losses)
        array = np.asarray(losses)
        if array.ndim == 0:
            array = array.reshape(1)
        if array.shape[-1] == 0 or array.dtype.kind != "f":
            raise ValueError(
                f"losses must be a floating-point array of shape [..., K] with K >= 1, got shape "
                f"{list(array.shape)} and dtype {array.dtype}"
            )
        dtype = np.promote_types(array.dtype, np.float32)
        if dtype.name not in ACCUMULATOR_DTYPES:
            raise TypeError(f"losses of dtype {array.dtype} are not supported: convert them to float32 or float64")
        num_tasks = array.shape[-1]
        batched = array.ndim > 1
        rows = array.reshape(-1, num_tasks)
        row_weights = None if weight is None else self._check_weight(weight, array.shape[:-1], batched)
        self._check_num_tasks(num_tasks)  # everything checked: now change
        self._num_tasks = num_tasks
        sums = self._accumulator(num_tasks, dtype)
        if row_weights is None:
            sums += rows.sum(axis=0, dtype=sums.dtype)
            self._weight += float(len(rows))
        elif row_weights.ndim == 0:  # one number for a [K] batch
            with np.errstate(over="ignore"):  # a float cast, as in torch: beyond float32, inf
                sums += rows[0].astype(sums.dtype) * sums.dtype.type(row_weights)
            self._weight += float(row_weights)
        else:
            with np.errstate(over="ignore"):
                per_row = row_weights.reshape(-1).astype(sums.dtype)
                sums += (rows.astype(sums.dtype) * per_row[:, None]).sum(axis=0, dtype=sums.dtype)
            self._weight += float(per_row.sum(dtype=np.float64))
        self._batches += 1

    @staticmethod
    def _check_weight(weight: Any, batch_shape: tuple[int, ...], batched: bool) -> np.ndarray:
        if isinstance(weight, np.ndarray) and weight.ndim > 0:
            if weight.shape != batch_shape:
                raise ValueError(
                    f"weight of shape {list(weight.shape)} must have the batch shape {list(batch_shape)} "
                    "of the losses: one weight per row of K losses"
                )
            if weight.dtype.kind not in "fiu":
                raise TypeError(f"weight must be a real array, got dtype {weight.dtype}")
            values = weight.astype(np.float64)
            bad = ~(np.isfinite(values) & (values >= 0))
            if bad.any():
                row = int(np.argmax(bad.reshape(-1)))  # counted over the flattened rows, as in C++
                raise ValueError(f"every weight must be finite and >= 0, got {float(values.reshape(-1)[row])!r} at row {row}")
            return values
        if isinstance(weight, np.ndarray):  # 0-d: a number
            weight = weight.item() if weight.dtype.kind in "fiu" else weight
        return np.float64(check_batch_weight(weight, batched))

    def _accumulator(self, num_tasks: int, dtype: np.dtype) -> np.ndarray:
        sums = self._sums
        if sums is None:
            sums = self._sums = np.zeros(num_tasks, dtype=dtype)
        elif sums.dtype != dtype and np.promote_types(sums.dtype, dtype) == dtype:
            sums = self._sums = sums.astype(dtype)  # float32 -> float64 is exact
        return sums

    def inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """``(loss_t1, loss_t2)`` for the kernel; all ones (uniform weights) during warm-up."""
        loss_t1, loss_t2 = self._host_inputs()
        dtype = np.float32 if self._sums is None else self._sums.dtype
        with np.errstate(over="ignore"):  # a float cast, as in torch: beyond float32, inf
            return np.asarray(loss_t1, dtype=dtype), np.asarray(loss_t2, dtype=dtype)

    def reset(self) -> None:
        super().reset()
        self._sums = None  # K may change after a reset

    def _epoch_packet(self) -> list[float] | None:
        if self._sums is None:
            return None
        return [*self._slot(float(self._batches), self._weight, self._sums.dtype.name), *self._sums.tolist()]

    def _local_partial(self) -> tuple[str, int, float, Sequence[float]] | None:
        if self._sums is None or self._batches == 0:
            return None
        return self._sums.dtype.name, self._batches, self._weight, self._sums.tolist()

    def _set_partial(self, partial: Partial | None) -> None:
        self._clear_epoch()
        if partial is not None:
            self._sums = np.asarray(partial.sums, dtype=partial.dtype)
            self._weight, self._batches = partial.weight, partial.batches

    def _clear_epoch(self) -> None:
        super()._clear_epoch()
        if self._sums is not None:
            self._sums[:] = 0
        self._weight = 0.0
        self._batches = 0

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._sums is not None and (self._num_tasks is None or len(self._sums) != self._num_tasks):
            self._sums = None if self._num_tasks is None else np.zeros(self._num_tasks, dtype=self._sums.dtype)

    def __repr__(self) -> str:
        tasks = "" if self._tasks is None else f", tasks={list(self._tasks)}"
        return f"{type(self).__name__}(num_tasks={self._num_tasks}{tasks}, epochs_stored={len(self._averages)})"

