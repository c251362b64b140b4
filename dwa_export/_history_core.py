"""The rules of the two-epoch loss history, shared by every runtime.

This module must not import torch: the torch-free runtime (``dwa_export.runtime``)
builds on it. Subclasses own the per-batch accumulator (a device tensor, a NumPy
array, ...); this class owns everything that happens once per epoch: turning the
accumulated sums into an epoch average, validating it, rolling the history, and
the checkpoint format.

The checkpoint (``state_dict()``) is a plain, JSON-serialisable dict, identical in
every runtime::

    {
        "format": "dwa_export.history",
        "version": 1,
        "num_tasks": int | None,            # K, once known
        "averages": [[float] * K, ...],     # 0-2 epoch averages, oldest first
        "dtype": str | None,                # accumulator dtype, e.g. "float32"
        "epoch_sum": [float] * K | None,    # running (weighted) loss sum of this epoch
        "epoch_weight": float,              # running weight sum (plain Python numbers)
        "epoch_tensor_weight": float | None # running weight sum (weights given as arrays)
    }
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["HistoryCore", "LossHistoryError", "check_temperature"]

STATE_FORMAT = "dwa_export.history"
STATE_VERSION = 1
_STATE_KEYS = frozenset(
    {
        "format",
        "version",
        "num_tasks",
        "averages",
        "dtype",
        "epoch_sum",
        "epoch_weight",
        "epoch_tensor_weight",
    }
)


class LossHistoryError(ValueError):
    """An epoch average that DWA cannot use; raised by ``step()``.

    The history and the running sums are left exactly as they were. Attributes
    name the offending task so that a caller can log or react to it.

    Attributes:
        task: index of the offending task (``None`` for a problem with the batch weights).
        average: the epoch averages of all tasks that ``step()`` computed.
        previous: the previous epoch's averages, or ``None`` during warm-up.
    """

    def __init__(
        self,
        message: str,
        task: int | None,
        average: Sequence[float],
        previous: Sequence[float] | None,
    ) -> None:
        super().__init__(message)
        self.task = task
        self.average = tuple(average)
        self.previous = None if previous is None else tuple(previous)


_REMEDY = (
    "The epoch was not added to the history and nothing was lost: call "
    "discard_epoch() to drop this epoch's batches, or reset() to restart the warm-up."
)


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float, or raise if it is not finite and > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(
            f"temperature must be a real number (the paper uses 2.0), got "
            f"{type(temperature).__name__} {temperature!r}"
        )
    value = float(temperature)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(
            f"temperature must be finite and > 0 (the paper uses 2.0), got {value!r}; "
            "T <= 0 inverts or breaks the weights and T = inf makes them uniform"
        )
    return value


def check_num_tasks(num_tasks: int | None) -> int | None:
    if num_tasks is None:
        return None
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive int (the number K of task losses), got {num_tasks!r}")
    return num_tasks


def check_batch_weight(weight: float) -> float:
    """A per-batch weight given as a plain number (e.g. the batch size)."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"weight must be a number or a tensor/array, got {type(weight).__name__} {weight!r}")
    value = float(weight)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"weight must be finite and >= 0 (e.g. the batch size), got {value!r}")
    return value


def _format(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def check_epoch_average(average: Sequence[float], previous: Sequence[float] | None) -> None:
    """Raise :class:`LossHistoryError` if ``average`` cannot enter the history.

    DWA divides each task's average by the previous epoch's, so every average
    must be finite and non-zero, and keep the sign it had the epoch before (a
    negative rate has no meaning as a rate of decrease).
    """
    for task, value in enumerate(average):
        if not math.isfinite(value):
            raise LossHistoryError(
                f"epoch-average loss of task {task} is {value!r} (all tasks: {_format(average)}): "
                f"a NaN or infinite loss was recorded this epoch. {_REMEDY}",
                task,
                average,
                previous,
            )
        if value == 0.0:
            raise LossHistoryError(
                f"epoch-average loss of task {task} is 0.0 (all tasks: {_format(average)}): DWA "
                "divides by it to get next epoch's rate L(t-1)/L(t-2). Offset that task's loss "
                f"so that it stays away from zero. {_REMEDY}",
                task,
                average,
                previous,
            )
        if previous is not None and (value > 0.0) != (previous[task] > 0.0):
            raise LossHistoryError(
                f"epoch-average loss of task {task} changed sign from {previous[task]:.6g} to "
                f"{value:.6g} (all tasks: {_format(average)}): the rate L(t-1)/L(t-2) would be "
                "negative, which DWA cannot read as a rate of decrease. Offset that task's loss "
                f"so that it keeps one sign. {_REMEDY}",
                task,
                average,
                previous,
            )


class HistoryCore:
    """Once-per-epoch logic of a DWA loss history; subclasses add ``record()``.

    A subclass implements the accumulator hooks:

    * ``_epoch_totals() -> (sums, weight) | None``: this epoch's (globally reduced)
      loss sums and weight as host floats, or ``None`` if nothing can have been
      recorded. Must not change any state.
    * ``_clear_epoch()``: zero the accumulator.
    * ``_epoch_state() -> (dtype, sums, weight, tensor_weight)`` and
      ``_load_epoch_state(dtype, sums, weight, tensor_weight)`` for checkpoints.
    """

    def __init__(self, num_tasks: int | None = None) -> None:
        self._fixed_num_tasks = check_num_tasks(num_tasks)
        self._num_tasks = self._fixed_num_tasks
        self._averages: tuple[tuple[float, ...], ...] = ()

    # ------------------------------------------------------------------ queries
    @property
    def num_tasks(self) -> int | None:
        """K, the number of tasks: given to the constructor or fixed by the first ``record``."""
        return self._num_tasks

    @property
    def ready(self) -> bool:
        """Whether two epoch averages exist, i.e. whether the weights are past the warm-up."""
        return len(self._averages) == 2

    @property
    def averages(self) -> tuple[tuple[float, ...], ...]:
        """The stored epoch averages as floats, oldest first (at most two)."""
        return self._averages

    def _host_inputs(self) -> tuple[Sequence[float], Sequence[float]]:
        """``(L(t-1), L(t-2))`` as floats; all ones (uniform weights) during warm-up."""
        if self._num_tasks is None:
            raise RuntimeError(
                "the number of tasks is not known yet: record() a batch first, or pass "
                "num_tasks=K to the constructor"
            )
        if not self.ready:
            ones = (1.0,) * self._num_tasks
            return ones, ones
        return self._averages[1], self._averages[0]

    # ------------------------------------------------------------------ per batch
    def _check_num_tasks(self, num_tasks: int) -> None:
        """Fix K on first use; a later change is an error. Host-only metadata."""
        if self._num_tasks is None:
            self._num_tasks = num_tasks
        elif num_tasks != self._num_tasks:
            if self._fixed_num_tasks is None:
                remedy = "call reset() first to start a new history with a different K"
            else:
                remedy = f"this history was created with num_tasks={self._fixed_num_tasks}; create a new one"
            raise ValueError(
                f"losses have {num_tasks} tasks in their last dimension but this history has "
                f"K={self._num_tasks}; {remedy}"
            )

    # ------------------------------------------------------------------ per epoch
    def step(self) -> None:
        """Close the epoch: average what was recorded and roll the history.

        ``L(t-2) <- L(t-1) <- this epoch's average``. A no-op when nothing was
        recorded (zero total weight). Raises :class:`LossHistoryError`, changing
        nothing, when the average is non-finite, zero, or changed sign.
        """
        totals = self._epoch_totals()
        if totals is None:
            return
        sums, weight = totals
        if weight == 0.0:
            self._clear_epoch()  # nothing with a weight was recorded
            return
        if not (math.isfinite(weight) and weight > 0.0):
            raise LossHistoryError(
                f"the batch weights recorded this epoch sum to {weight!r}; they must be "
                f"finite and >= 0. {_REMEDY}",
                None,
                sums,
                self._averages[-1] if self._averages else None,
            )
        average = tuple(s / weight for s in sums)
        check_epoch_average(average, self._averages[-1] if self._averages else None)
        self._averages = (*self._averages, average)[-2:]
        self._clear_epoch()

    def discard_epoch(self) -> None:
        """Drop what was recorded since the last ``step()``; the history stays."""
        self._clear_epoch()

    def reset(self) -> None:
        """Forget everything: the history, this epoch's batches and a K learned from data.

        A K given to the constructor is kept.
        """
        self._num_tasks = self._fixed_num_tasks
        self._averages = ()
        self._clear_epoch()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The whole state, mid-epoch included, as a JSON-serialisable dict."""
        dtype, sums, weight, tensor_weight = self._epoch_state()
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "num_tasks": self._num_tasks,
            "averages": [list(a) for a in self._averages],
            "dtype": dtype,
            "epoch_sum": None if sums is None else list(sums),
            "epoch_weight": weight,
            "epoch_tensor_weight": tensor_weight,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``; raises ``ValueError`` (changing nothing) if it is malformed."""
        state = _parse_state(state_dict, self._fixed_num_tasks)
        # Validated in full above, so the assignments below cannot fail half-way.
        self._load_epoch_state(state["dtype"], state["epoch_sum"], state["epoch_weight"], state["epoch_tensor_weight"])
        self._num_tasks = state["num_tasks"]
        self._averages = state["averages"]

    # ------------------------------------------------------------------ hooks
    def _epoch_totals(self) -> tuple[Sequence[float], float] | None:
        raise NotImplementedError

    def _clear_epoch(self) -> None:
        raise NotImplementedError

    def _epoch_state(self) -> tuple[str | None, Sequence[float] | None, float, float | None]:
        raise NotImplementedError

    def _load_epoch_state(
        self, dtype: str | None, sums: Sequence[float] | None, weight: float, tensor_weight: float | None
    ) -> None:
        raise NotImplementedError


def _bad_state(message: str) -> ValueError:
    return ValueError(f"malformed DWA history state_dict: {message}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _float_list(value: object, length: int, what: str) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != length or not all(map(_is_number, value)):
        raise _bad_state(f"{what} must be a list of {length} numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _parse_state(state: Mapping[str, Any], fixed_num_tasks: int | None) -> dict[str, Any]:
    if not isinstance(state, Mapping):
        raise _bad_state(f"expected a dict from state_dict(), got {type(state).__name__}")
    if state.get("format") != STATE_FORMAT:
        raise _bad_state(f"'format' is {state.get('format')!r}, expected {STATE_FORMAT!r}")
    if state.get("version") != STATE_VERSION:
        raise _bad_state(
            f"'version' is {state.get('version')!r}; this dwa_export reads version {STATE_VERSION}"
        )
    missing = _STATE_KEYS - state.keys()
    unknown = state.keys() - _STATE_KEYS
    if missing or unknown:
        raise _bad_state(f"missing keys {sorted(missing)}, unexpected keys {sorted(unknown)}")

    num_tasks = state["num_tasks"]
    if num_tasks is not None:
        try:
            check_num_tasks(num_tasks)
        except ValueError as error:
            raise _bad_state(str(error)) from None
    if fixed_num_tasks is not None and num_tasks != fixed_num_tasks:
        raise ValueError(
            f"the checkpoint holds K={num_tasks} tasks but this history was created with "
            f"num_tasks={fixed_num_tasks}"
        )

    averages = state["averages"]
    if not isinstance(averages, (list, tuple)) or len(averages) > 2:
        raise _bad_state(f"'averages' must be a list of at most 2 epoch averages, got {averages!r}")
    if averages and num_tasks is None:
        raise _bad_state("'averages' is not empty but 'num_tasks' is None")
    parsed_averages = tuple(_float_list(a, num_tasks, "each entry of 'averages'") for a in averages)
    for i, average in enumerate(parsed_averages):
        try:
            check_epoch_average(average, parsed_averages[i - 1] if i else None)
        except LossHistoryError as error:
            raise _bad_state(f"stored average {i}: {error}") from None

    epoch_sum = state["epoch_sum"]
    dtype = state["dtype"]
    if epoch_sum is not None:
        if num_tasks is None:
            raise _bad_state("'epoch_sum' is set but 'num_tasks' is None")
        epoch_sum = _float_list(epoch_sum, num_tasks, "'epoch_sum'")
        if not isinstance(dtype, str):
            raise _bad_state(f"'dtype' must name the accumulator dtype when 'epoch_sum' is set, got {dtype!r}")
    elif dtype is not None and not isinstance(dtype, str):
        raise _bad_state(f"'dtype' must be a string or None, got {dtype!r}")

    weight = state["epoch_weight"]
    if not _is_number(weight) or not weight >= 0.0:
        raise _bad_state(f"'epoch_weight' must be a number >= 0, got {weight!r}")
    tensor_weight = state["epoch_tensor_weight"]
    if tensor_weight is not None and not _is_number(tensor_weight):
        raise _bad_state(f"'epoch_tensor_weight' must be a number or None, got {tensor_weight!r}")
    if epoch_sum is None and (weight != 0.0 or tensor_weight):
        raise _bad_state("a non-zero epoch weight without an 'epoch_sum'")

    return {
        "num_tasks": num_tasks,
        "averages": parsed_averages,
        "dtype": dtype,
        "epoch_sum": epoch_sum,
        "epoch_weight": float(weight),
        "epoch_tensor_weight": None if tensor_weight is None else float(tensor_weight),
    }
