"""The epoch rules of a DWA history, shared by the torch and NumPy histories (no torch here).

Each history keeps its own per-batch running sums; everything that happens once
per epoch lives here: what an epoch average may be, how the two-epoch history
rolls, the warm-up, and the per-epoch log. The C++ header follows the same rules
(``tests/test_cpp.py`` checks that it does).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._state import HistoryState

__all__ = [
    "NAN_STRATEGIES",
    "EpochHistory",
    "LogEntry",
    "LossHistoryError",
    "NonFiniteLossWarning",
    "Totals",
    "check_batch_weight",
    "check_temperature",
]

MAX_TASKS = 1 << 20
#: What a row of K losses with a NaN or infinity does (torchmetrics' names): "error" makes
#: step() raise; "warn" and "ignore" leave the row out of the epoch, "warn" saying so at step().
NAN_STRATEGIES = ("error", "warn", "ignore")
FLOAT32_MAX = 3.4028234663852886e38
FLOAT64_MAX = 1.7976931348623157e308
_REMEDY = "Nothing was changed: call discard_epoch() to drop this epoch's batches, or reset() to restart the warm-up."


class LossHistoryError(ValueError):
    """An epoch that DWA cannot use, raised by ``step()``, which then changes nothing.

    Attributes:
        task: index of the offending task (``None`` for a problem with the batch weights).
        average: the epoch averages of all tasks (the loss sums, for a weight problem).
        previous: the previous epoch's averages, or ``None`` during the warm-up.
    """

    def __init__(
        self, message: str, task: int | None, average: Sequence[float], previous: Sequence[float] | None
    ) -> None:
        super().__init__(message)
        self.task = task
        self.average = tuple(average)
        self.previous = None if previous is None else tuple(previous)


class NonFiniteLossWarning(UserWarning):
    """``step()`` left rows with a NaN or infinite loss out of the epoch (``nan_strategy="warn"``)."""


@dataclass(frozen=True)
class Totals:
    """What the batches recorded in an epoch (or one rank's part of it) add up to."""

    batches: int = 0  # record() calls
    rows: int = 0  # the rows of K losses they held
    nonfinite_rows: int = 0  # rows left out for a NaN or infinite loss (nan_strategy "warn" or "ignore")
    weight: float = 0.0  # the weight sum of the rows kept
    sums: tuple[float, ...] = ()  # their weighted loss sums, one per task (empty without batches)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_temperature(temperature: object) -> float:
    """``temperature`` as a float; raises unless it is a real number, finite and > 0."""
    if not _is_real(temperature):
        raise TypeError(
            f"temperature must be a real number (the paper uses 2.0), got {type(temperature).__name__} {temperature!r}"
        )
    value = float(temperature)  # type: ignore[arg-type]  # a numbers.Real
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(
            f"temperature must be finite and > 0 (the paper uses 2.0), got {value!r}; "
            "T <= 0 inverts or breaks the weights and T = inf makes them uniform"
        )
    return value


def check_nan_strategy(nan_strategy: object) -> str:
    if nan_strategy not in NAN_STRATEGIES or not isinstance(nan_strategy, str):
        raise ValueError(
            f"nan_strategy must be one of {', '.join(map(repr, NAN_STRATEGIES))}, got {_short(nan_strategy)}: "
            '"error" makes step() raise on an epoch with a NaN or infinite loss, "warn" and "ignore" leave '
            'each row of K losses holding one out of the epoch average ("warn" says how many at step())'
        )
    return nan_strategy


def check_num_tasks(num_tasks: object) -> int | None:
    if num_tasks is None:
        return None
    if (
        isinstance(num_tasks, bool)
        or not isinstance(num_tasks, numbers.Integral)
        or not 1 <= int(num_tasks) <= MAX_TASKS
    ):
        raise ValueError(
            f"num_tasks must be an int from 1 to {MAX_TASKS} (the number K of task losses), got {num_tasks!r}"
        )
    return int(num_tasks)


def check_tasks(tasks: object, num_tasks: int | None = None) -> tuple[str, ...] | None:
    """Task names: distinct, non-empty strings (UTF-8, as checkpoints store them), one per task."""
    if tasks is None:
        return None
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a sequence of task names, e.g. ('seg', 'depth'), got {tasks!r}")
    names = tuple(tasks)
    for name in names:
        if not isinstance(name, str) or not name or not _utf8(name):
            raise ValueError(f"each task name must be a non-empty string, got {name!r} in {_short(list(names))}")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be distinct, got {_short(list(names))}")
    check_num_tasks(len(names))
    if num_tasks is not None and num_tasks != len(names):
        raise ValueError(f"num_tasks={num_tasks} but {len(names)} task names were given: {_short(list(names))}")
    return names


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which a UTF-8 checkpoint cannot hold
        return False
    return True


def _short(value: object) -> str:
    """``repr(value)``, cut short for an error message."""
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def check_batch_weight(weight: object, batched: bool) -> float:
    """A weight given as one number: the weight of one row of K losses (e.g. the batch size).

    ``batched``: whether the losses have several rows (``[B, K]``); one number is
    then ambiguous (the weight of the batch, or of each row?) and is refused.
    """
    if not _is_real(weight):
        raise TypeError(f"weight must be a real number or a tensor/array, got {type(weight).__name__} {weight!r}")
    value = float(weight)  # type: ignore[arg-type]  # a numbers.Real
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"weight must be finite and >= 0 (e.g. the batch size), got {weight!r}")
    if batched:
        raise ValueError(
            f"weight={weight!r} is one number, but the losses have rows of K losses (per-sample losses). "
            "Each row already counts once, so without a weight the epoch average is sample-weighted; for other "
            "per-row weights pass a tensor/array with one weight per row (the losses' shape without the last "
            "dimension). A single number weighs a [K] batch, e.g. batch-mean losses with weight=batch_size."
        )
    return value


def _listed(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]"


def check_epoch_average(
    average: Sequence[float], previous: Sequence[float] | None, nonfinite: str = "a NaN or infinite loss was recorded"
) -> None:
    """Raise :class:`LossHistoryError` unless ``average`` can follow ``previous`` in the history.

    DWA divides each task's average by the previous epoch's, so every average must
    be finite and non-zero and keep the sign it had the epoch before (a negative
    rate means nothing as a rate of decrease). ``nonfinite`` says how a NaN or
    infinite average came about.
    """
    for task, value in enumerate(average):
        if not math.isfinite(value):
            problem = f"is {value!r}: {nonfinite}"
        elif value == 0.0:
            problem = (
                "is 0.0: DWA divides by it to get next epoch's rate L(t-1)/L(t-2); "
                "offset that task's loss so that it stays away from zero"
            )
        elif previous is not None and (value > 0.0) != (previous[task] > 0.0):
            problem = (
                f"changed sign from {previous[task]:.6g} to {value:.6g}: the rate L(t-1)/L(t-2) would be "
                "negative, which DWA cannot read as a rate of decrease; offset that task's loss so that it keeps "
                "one sign"
            )
        else:
            continue
        message = f"epoch-average loss of task {task} {problem} (all tasks: {_listed(average)}). {_REMEDY}"
        raise LossHistoryError(message, task, average, previous)


def check_epoch_weight(weight: float, sums: Sequence[float], previous: Sequence[float] | None) -> None:
    if not (math.isfinite(weight) and weight >= 0.0):
        raise LossHistoryError(
            f"the batch weights recorded this epoch sum to {weight!r}; every weight must be finite and >= 0 "
            f"(a per-row weight held a negative, NaN or infinite value, or the sum overflowed). {_REMEDY}",
            None,
            sums,
            previous,
        )


def _nonfinite_cause(nan_strategy: str, largest_loss: float, largest_sum: float, weight: float) -> str:
    """How an epoch average came to be NaN or infinite, for the message of step()'s error."""
    # |sum| <= weight * the largest finite loss: beyond the sums' range only then.
    overflow = f"the running sum overflowed (losses up to {largest_loss:.3g} in sums up to {largest_sum:.3g})"
    if nan_strategy != "error":  # the rows with a NaN or infinite loss were left out
        return f"{overflow}; scale that task's loss down"
    cause = "a NaN or infinite loss was recorded this epoch"
    if weight * largest_loss > largest_sum:
        cause += f", or {overflow}"
    return (
        f'{cause}. nan_strategy="warn" (or "ignore") leaves each row of K losses with a NaN or infinity '
        "out of the epoch, e.g. a batch that overflowed under mixed precision"
    )


@dataclass(frozen=True)
class LogEntry:
    """One closed epoch: its batch count, weight sum and averages, and the weights computed from them.

    ``temperature`` and ``weights`` (those of the next epoch) are set by
    ``log_weights()``, which :class:`dwa_export.DWA` calls after each ``step()``.
    ``nonfinite_rows`` counts the rows of K losses left out for a NaN or infinity.
    """

    batches: int
    weight: float
    averages: tuple[float, ...]
    temperature: float | None = None
    weights: tuple[float, ...] | None = None
    nonfinite_rows: int = 0


class EpochHistory:
    """The once-per-epoch half of a DWA history: K, task names, the nan_strategy, the last two averages and the log."""

    def __init__(
        self, num_tasks: int | None = None, tasks: Sequence[str] | None = None, nan_strategy: str = "error"
    ) -> None:
        self.nan_strategy = check_nan_strategy(nan_strategy)
        self.fixed_tasks = check_tasks(tasks, check_num_tasks(num_tasks))  # given to the constructor
        self.fixed_num_tasks = len(self.fixed_tasks) if self.fixed_tasks else check_num_tasks(num_tasks)
        self.tasks = self.fixed_tasks
        self.num_tasks = self.fixed_num_tasks
        self.averages: tuple[tuple[float, ...], ...] = ()  # at most two, oldest first
        self.log: list[LogEntry] = []

    def check_num_tasks(self, num_tasks: int) -> None:
        """Raise unless a batch of ``num_tasks`` losses fits this history. Changes nothing."""
        if num_tasks == self.num_tasks:  # the per-batch case, first
            return
        if self.num_tasks is not None:
            if self.fixed_num_tasks is None:
                remedy = "call reset() first to start a new history with another K"
            else:
                remedy = f"this history was created with num_tasks={self.fixed_num_tasks}"
            raise ValueError(
                f"losses have {num_tasks} tasks in their last dimension but this history has "
                f"K={self.num_tasks}; {remedy}"
            )
        check_num_tasks(num_tasks)

    def in_task_order(self, losses: Mapping[str, Any]) -> list[Any]:
        """The values of a ``{name: loss}`` batch in task order; raises, changing nothing, on other names."""
        if self.tasks is None:
            raise TypeError(
                "losses given as a mapping need task names: create the history with tasks=(...), "
                f"e.g. tasks={tuple(losses)!r}"
            )
        if losses.keys() != set(self.tasks):
            missing = [name for name in self.tasks if name not in losses]
            unexpected = [name for name in losses if name not in self.tasks]
            raise ValueError(
                f"losses must have exactly the task names {list(self.tasks)}; missing {missing}, "
                f"unexpected {unexpected}"
            )
        return [losses[name] for name in self.tasks]

    def close(
        self,
        totals: Totals,
        temperature: float | None = None,
        largest_loss: float = FLOAT32_MAX,
        largest_sum: float = FLOAT64_MAX,
    ) -> None:
        """Average an epoch's sums, check the average, roll the history and log it.

        Zero-weight rows alone (``weight == 0``) leave no entry; if rows were left
        out for a NaN or infinity and none is left, that is an error. Raises
        :class:`LossHistoryError`, changing nothing, on an invalid weight or average;
        warns (:class:`NonFiniteLossWarning`) under ``nan_strategy="warn"`` when
        rows were left out. ``largest_loss``, ``largest_sum``: the largest finite
        values of the recorded losses' and of the sums' dtypes (can the sum overflow?).
        """
        previous = self.averages[-1] if self.averages else None
        nan_strategy, weight, sums, left_out = self.nan_strategy, totals.weight, totals.sums, totals.nonfinite_rows
        check_epoch_weight(weight, sums, previous)
        if weight == 0.0 and left_out:
            raise LossHistoryError(
                f"every row of this epoch's losses that had a weight held a NaN or infinite loss ({left_out} of "
                f"{totals.rows} rows; the others had weight 0), so there is no epoch average. {_REMEDY}",
                None,
                sums,
                previous,
            )
        if weight == 0.0:
            return
        average = tuple(s / weight for s in sums)
        check_epoch_average(average, previous, _nonfinite_cause(nan_strategy, largest_loss, largest_sum, weight))
        self.averages = (*self.averages, average)[-2:]
        self.log.append(LogEntry(totals.batches, weight, average, temperature, nonfinite_rows=left_out))
        if left_out and nan_strategy == "warn":
            warnings.warn(
                f"{left_out} of this epoch's {totals.rows} rows of K losses held a NaN or infinite loss and were "
                'left out of its average (nan_strategy="warn"; "ignore" leaves them out without this warning)',
                NonFiniteLossWarning,
                stacklevel=3,
            )

    @property
    def ready(self) -> bool:
        """Whether two epoch averages exist: the weights are past the warm-up."""
        return len(self.averages) == 2

    def inputs(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(L(t-1), L(t-2))`` for the kernel; all ones (exactly uniform weights) during the warm-up."""
        if self.num_tasks is None:
            raise RuntimeError(
                "the number of tasks is not known yet: record() a batch first, or pass num_tasks=K "
                "(or tasks=names) to the constructor"
            )
        if not self.ready:
            ones = (1.0,) * self.num_tasks
            return ones, ones
        return self.averages[1], self.averages[0]

    def log_weights(self, temperature: float, weights: Sequence[float]) -> None:
        """Store the temperature and the weights computed from the last closed epoch in its log entry."""
        if not self.log:
            raise RuntimeError("log_weights() needs a closed epoch: call step() first")
        temperature = check_temperature(temperature)
        values = tuple(float(w) for w in weights)
        if len(values) != self.num_tasks or not all(math.isfinite(w) and w >= 0.0 for w in values):
            raise ValueError(f"weights must be {self.num_tasks} finite numbers >= 0, got {_short(list(values))}")
        self.log[-1] = replace(self.log[-1], temperature=temperature, weights=values)

    def reset(self) -> None:
        """Forget everything but the K and task names given to the constructor."""
        self.tasks = self.fixed_tasks
        self.num_tasks = self.fixed_num_tasks
        self.averages = ()
        self.log = []

    def check_fits(self, state: HistoryState) -> None:
        """Raise unless a checkpoint's K and task names fit those given to the constructor. Changes nothing."""
        if self.fixed_num_tasks is not None and state.num_tasks != self.fixed_num_tasks:
            raise ValueError(
                f"the checkpoint holds K={state.num_tasks} tasks but this history was created with "
                f"num_tasks={self.fixed_num_tasks}"
            )
        if self.fixed_tasks is not None and state.tasks is not None and state.tasks != self.fixed_tasks:
            raise ValueError(
                f"the checkpoint's task names {list(state.tasks)} differ from this history's {list(self.fixed_tasks)}"
            )

    def restore(self, state: HistoryState) -> None:
        """Take a validated checkpoint's K, task names, averages and log (after :meth:`check_fits`)."""
        self.num_tasks = state.num_tasks
        self.tasks = state.tasks if state.tasks is not None else self.fixed_tasks
        self.averages = state.averages
        self.log = list(state.log)

    def entries(self) -> list[dict[str, Any]]:
        """The log as JSON-friendly dicts, one per closed epoch."""
        return [
            {
                "epoch": epoch,
                "averages": list(entry.averages),
                "batches": entry.batches,
                "weight": entry.weight,
                "temperature": entry.temperature,
                "weights": None if entry.weights is None else list(entry.weights),
                "nonfinite_rows": entry.nonfinite_rows,
            }
            for epoch, entry in enumerate(self.log)
        ]
