"""``NumpyDWAHistory``: the loss history for torch-free trainers (NumPy arrays on the host)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from ._epochs import EpochHistory, Totals, check_batch_weight, check_temperature
from ._state import HistoryState, RunningEpoch, resolve_partial

__all__ = ["NumpyDWAHistory"]


class NumpyDWAHistory:
    """:class:`dwa_export.DWAHistory` for NumPy: :meth:`record` per batch, :meth:`step` per epoch.

    The rules (sample weighting, epoch averages, warm-up, validation, roll, log,
    ``state_dict`` format) are those of the torch history, shared with it in
    ``dwa_export._epochs`` and ``dwa_export._state``; a checkpoint from either
    loads into the other. Sums are float64; :meth:`inputs` are float32, or
    float64 once float64 losses were recorded. Everything is on the host, so
    invalid per-row weights are rejected by :meth:`record` at once (the torch
    history reports them in ``step()``, to avoid a device sync).

    Args:
        num_tasks: K. Fixed by the first :meth:`record` when not given.
        tasks: task names (fixes K); :meth:`record` then also takes ``{name: loss}``.
        nan_strategy: ``"error"``, ``"warn"`` or ``"ignore"``, as for the torch history:
            ``"warn"`` and ``"ignore"`` leave each row of K losses holding a NaN or
            infinity out of the epoch. A row of weight 0 is left out under every strategy.
    """

    def __init__(
        self, num_tasks: int | None = None, *, tasks: Sequence[str] | None = None, nan_strategy: str = "error"
    ) -> None:
        self._epochs = EpochHistory(num_tasks, tasks, nan_strategy)
        self._dtype: np.dtype[np.floating[Any]] = np.dtype(np.float32)  # of inputs()
        self._sums: np.ndarray | None = None  # float64 [K], once K is known
        self._totals = Totals()  # of this epoch, but its sums (in _sums)

    @property
    def num_tasks(self) -> int | None:
        """K: given, or fixed by the first batch or a checkpoint."""
        return self._epochs.num_tasks

    @property
    def tasks(self) -> tuple[str, ...] | None:
        """The task names (given or loaded from a checkpoint), if any."""
        return self._epochs.tasks

    @property
    def ready(self) -> bool:
        """Whether two epoch averages exist: the weights are past the warm-up."""
        return self._epochs.ready

    @property
    def averages(self) -> tuple[tuple[float, ...], ...]:
        """The stored epoch averages as floats, oldest first (at most two)."""
        return self._epochs.averages

    @property
    def epochs(self) -> int:
        """The number of epochs closed since the start (or :meth:`reset`)."""
        return len(self._epochs.log)

    @property
    def log(self) -> list[dict[str, Any]]:
        """One JSON-friendly dict per successful :meth:`step`; see :attr:`dwa_export.DWAHistory.log`."""
        return self._epochs.entries()

    @property
    def nan_strategy(self) -> str:
        """What a NaN or infinite loss does: ``"error"``, ``"warn"`` or ``"ignore"``."""
        return self._epochs.nan_strategy

    @property
    def dtype(self) -> np.dtype[np.floating[Any]]:
        """The dtype of :meth:`inputs`: float32, or float64 once float64 losses were recorded."""
        return self._dtype

    def record(self, losses: Any, weight: Any = None) -> None:
        """Add one batch of per-task losses; see :meth:`dwa_export.DWAHistory.record`.

        ``losses``: a ``[..., K]`` array (a 0-d array is K = 1), a sequence of
        K numbers, or with ``tasks`` a mapping ``{name: loss}``. ``weight``:
        ``None``, a number ``>= 0`` (NumPy scalars and 0-d arrays included)
        for ``[K]`` losses, or an array of the batch shape with one weight per
        row, each finite and ``>= 0``. Raises, changing nothing, on anything else.
        """
        if isinstance(losses, Mapping):
            losses = self._epochs.in_task_order(losses)
        array = np.asarray(losses)
        array = array.reshape(1) if array.ndim == 0 else array
        if array.shape[-1] == 0 or array.dtype.kind != "f":
            raise ValueError(
                f"losses must be a floating-point array of shape [..., K] with K >= 1, got shape "
                f"{list(array.shape)} and dtype {array.dtype}"
            )
        if array.dtype.itemsize > 8:
            raise TypeError(f"losses of dtype {array.dtype} are not supported: convert them to float32 or float64")
        num_tasks = array.shape[-1]
        rows = array.reshape(-1, num_tasks).astype(np.float64)
        weights = None if weight is None else _checked_weight(weight, array.shape[:-1])
        self._epochs.check_num_tasks(num_tasks)
        # Everything is checked: now change.
        if self._sums is None:
            self._epochs.num_tasks = num_tasks
            self._sums = np.zeros(num_tasks)
        if array.dtype == np.float64:
            self._dtype = np.dtype(np.float64)
        weights = np.ones(len(rows)) if weights is None else np.broadcast_to(weights, (len(rows),))
        weighted = weights != 0  # a mask, not a product: 0 * inf is NaN
        kept = weighted & np.isfinite(rows).all(axis=1) if self.nan_strategy != "error" else weighted
        with np.errstate(over="ignore", invalid="ignore"):  # a NaN or infinite average, which step() reports
            self._sums += np.where(kept[:, None], rows * weights[:, None], 0.0).sum(axis=0)
        totals = self._totals
        self._totals = Totals(
            totals.batches + 1,
            totals.rows + len(rows),
            totals.nonfinite_rows + int(np.count_nonzero(weighted & ~kept)),
            totals.weight + float(weights[kept].sum()),
        )

    def step(self, temperature: float | None = None) -> None:
        """Close the epoch; see :meth:`dwa_export.DWAHistory.step`."""
        temperature = None if temperature is None else check_temperature(temperature)
        if self._totals.batches == 0 or self._sums is None:
            return
        # The sums are float64: close()'s default largest_sum.
        self._epochs.close(self._epoch_totals(), temperature, largest_loss=float(np.finfo(self._dtype).max))
        self.discard_epoch()

    def _epoch_totals(self) -> Totals:
        assert self._sums is not None
        return replace(self._totals, sums=tuple(self._sums.tolist()))

    def log_weights(self, temperature: float, weights: Sequence[float] | np.ndarray) -> None:
        """Store the temperature and weights computed from the last step in its log entry."""
        self._epochs.log_weights(temperature, np.asarray(weights, dtype=np.float64).tolist())

    def inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """``(loss_t1, loss_t2)`` for the kernel in :attr:`dtype`; all ones (uniform weights) during warm-up."""
        loss_t1, loss_t2 = self._epochs.inputs()
        with np.errstate(over="ignore"):  # a float cast, as in torch: beyond float32, inf
            return np.asarray(loss_t1, dtype=self._dtype), np.asarray(loss_t2, dtype=self._dtype)

    def discard_epoch(self) -> None:
        """Drop the batches recorded since the last :meth:`step`."""
        if self._sums is not None:
            self._sums[:] = 0.0
        self._totals = Totals()

    def reset(self) -> None:
        """Forget everything but a K (or task names) given to the constructor."""
        self._epochs.reset()
        self._sums = None if self._epochs.num_tasks is None else np.zeros(self._epochs.num_tasks)
        self.discard_epoch()

    def state_dict(self) -> dict[str, Any]:
        """The whole state as a JSON-serialisable dict, in the format of ``DWAHistory.state_dict()``."""
        partial = None
        if self._totals.batches > 0 and self._sums is not None:
            partial = RunningEpoch(None, 1, self._epoch_totals())
        epochs = self._epochs
        return HistoryState(
            epochs.num_tasks, epochs.tasks, self._dtype.name, epochs.averages, partial, tuple(epochs.log)
        ).to_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a state of any of the three histories; raises ``ValueError``, changing nothing, if invalid."""
        state = HistoryState.from_dict(state_dict)
        self._epochs.check_fits(state)
        partial, _ = resolve_partial(state.partial, 0, 1)
        self._epochs.restore(state)
        self._dtype = np.dtype(state.dtype)
        self._sums = None if state.num_tasks is None else np.zeros(state.num_tasks)
        self.discard_epoch()
        if partial is not None:
            self._sums = np.array(partial.totals.sums, dtype=np.float64)
            self._totals = replace(partial.totals, sums=())

    def __repr__(self) -> str:
        tasks = "" if self.tasks is None else f", tasks={list(self.tasks)}"
        return (
            f"{type(self).__name__}(num_tasks={self.num_tasks}{tasks}, epochs_stored={len(self.averages)}, "
            f"nan_strategy={self.nan_strategy!r})"
        )


def _checked_weight(weight: Any, batch_shape: tuple[int, ...]) -> np.ndarray:
    """One float64 weight per row (an array of the batch shape), or a 0-d one for a [K] batch."""
    if isinstance(weight, np.ndarray) and weight.ndim > 0:
        if weight.shape != batch_shape:
            raise ValueError(
                f"weight of shape {list(weight.shape)} must have the batch shape {list(batch_shape)} "
                "of the losses: one weight per row of K losses"
            )
        if weight.dtype.kind not in "fiu":
            raise TypeError(f"weight must be a real array, got dtype {weight.dtype}")
        values = weight.astype(np.float64).reshape(-1)
        bad = ~(np.isfinite(values) & (values >= 0))
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(f"every weight must be finite and >= 0, got {float(values[row])!r} at row {row}")
        return values
    if isinstance(weight, np.ndarray):  # 0-d: a number
        weight = weight.item() if weight.dtype.kind in "fiu" else weight
    return np.asarray(check_batch_weight(weight, batched=len(batch_shape) > 0), dtype=np.float64)
