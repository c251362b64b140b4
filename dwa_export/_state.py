"""The checkpoint format of a DWA history, shared by the torch, NumPy and C++ histories (no torch here).

``state_dict()`` is a plain, JSON-serialisable dict (version 4)::

    {
        "format": "dwa_export.history",
        "version": 4,
        "num_tasks": int | None,          # K, once known (1 <= K <= 2**20)
        "tasks": [str] * K | None,        # task names, if given
        "dtype": "float32" | "float64",   # the precision of inputs(): float64 once float64 losses were recorded
        "averages": [[float] * K, ...],   # 0-2 epoch averages, oldest first
        "partial": None | [rank, world_size, batches, rows, nonfinite_rows, weight, [float] * K],
        "log": {"batches": [int], "weight": [float], "averages": [[float] * K],
                "temperature": [float | None], "weights": [[float] * K | None], "nonfinite_rows": [int]},
    }

``partial`` is the running epoch (the batches recorded since the last
``step()``): ``rank`` is ``None`` when it holds the whole group's running epoch
(one process, or after ``consolidate_state_dict()``), else the one rank of
``world_size`` processes whose part it is; ``batches`` counts ``record()``
calls, ``rows`` the rows of K losses in them, ``nonfinite_rows`` those left out
for a NaN or infinite loss (``nan_strategy`` "warn" or "ignore"), ``weight`` is
the weight sum of the rows kept (NaN or infinite after an invalid per-row
weight, which ``step()`` then reports) and the sums are float64. It is one JSON
list, not a dict, because ``torch.distributed.checkpoint`` stores each leaf of a
nested dict separately and could then mix the fields of different ranks.

``log`` has one entry per successful ``step()``: its batch count, weight sum and
averages, the temperature and weights computed from them (``None`` unless
``log_weights()`` was called, as ``DWA`` does) and its rows left out.

Versions 2 and 3 load too. Version 3 counted no rows: its running epoch reads as
one row per batch, none left out. Version 2 also had no ``dtype`` (``partial``
held it third) and a log without temperatures and weights. Version 1 is refused.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._epochs import MAX_TASKS, LogEntry, LossHistoryError, Totals, _short, check_epoch_average, check_tasks

__all__ = ["HistoryState", "RunningEpoch", "Share", "resolve_partial"]

FORMAT = "dwa_export.history"
VERSION = 4
MAX_WORLD_SIZE = 1 << 24
MAX_COUNT = 1 << 53  # counts stay exact as float64
DTYPES = ("float32", "float64")
_KEYS = {
    2: ("format", "version", "num_tasks", "tasks", "averages", "partial", "log"),
    3: ("format", "version", "num_tasks", "tasks", "dtype", "averages", "partial", "log"),
}
_KEYS[4] = _KEYS[3]
_LOG_KEYS = {
    2: ("batches", "weight", "averages"),
    3: ("batches", "weight", "averages", "temperature", "weights"),
    4: ("batches", "weight", "averages", "temperature", "weights", "nonfinite_rows"),
}
_PARTIAL = "[rank, world_size, batches, rows, nonfinite_rows, weight, sums]"


@dataclass(frozen=True)
class RunningEpoch:
    """The batches recorded since the last ``step()``, as a checkpoint holds them."""

    rank: int | None  # None: the whole group's running epoch
    world_size: int
    totals: Totals


@dataclass(frozen=True)
class HistoryState:
    """A history's whole state, validated; ``to_dict()`` gives the checkpoint format above."""

    num_tasks: int | None
    tasks: tuple[str, ...] | None
    dtype: str
    averages: tuple[tuple[float, ...], ...]
    partial: RunningEpoch | None
    log: tuple[LogEntry, ...]

    def to_dict(self) -> dict[str, Any]:
        partial, totals = self.partial, None if self.partial is None else self.partial.totals
        return {
            "format": FORMAT,
            "version": VERSION,
            "num_tasks": self.num_tasks,
            "tasks": None if self.tasks is None else list(self.tasks),
            "dtype": self.dtype,
            "averages": [list(average) for average in self.averages],
            "partial": None
            if partial is None or totals is None
            else [
                partial.rank,
                partial.world_size,
                totals.batches,
                totals.rows,
                totals.nonfinite_rows,
                totals.weight,
                list(totals.sums),
            ],
            "log": {
                "batches": [entry.batches for entry in self.log],
                "weight": [entry.weight for entry in self.log],
                "averages": [list(entry.averages) for entry in self.log],
                "temperature": [entry.temperature for entry in self.log],
                "weights": [None if entry.weights is None else list(entry.weights) for entry in self.log],
                "nonfinite_rows": [entry.nonfinite_rows for entry in self.log],
            },
        }

    @classmethod
    def from_dict(cls, state: object) -> HistoryState:
        """Validate a ``state_dict()`` (version 2, 3 or 4) completely; raises ``ValueError`` naming the problem."""
        state = upgrade(state)
        if not isinstance(state, Mapping):
            raise _bad(f"expected the dict of a state_dict(), got {type(state).__name__}")
        if state.get("format") != FORMAT or not isinstance(state.get("format"), str):
            raise _bad(f"'format' is {_short(state.get('format'))}, expected {FORMAT!r}")
        if not _is_int(state.get("version")) or state["version"] != VERSION:
            raise _bad(f"'version' is {_short(state.get('version'))}; this dwa_export reads versions 2 to 4")
        _check_keys(state, _KEYS[4])
        num_tasks = state["num_tasks"]
        if num_tasks is not None and not (_is_int(num_tasks) and 1 <= num_tasks <= MAX_TASKS):
            raise _bad(f"'num_tasks' must be None or an int from 1 to {MAX_TASKS}, got {_short(num_tasks)}")
        tasks = state["tasks"]
        if tasks is not None:
            if not isinstance(tasks, (list, tuple)) or num_tasks is None:
                raise _bad(f"'tasks' must be None or a list of num_tasks names, got {_short(tasks)}")
            try:
                tasks = check_tasks(tasks, num_tasks)
            except (TypeError, ValueError) as error:
                raise _bad(f"'tasks': {error}") from None
        if state["dtype"] not in DTYPES:
            raise _bad(f"'dtype' must be one of {list(DTYPES)}, got {_short(state['dtype'])}")
        averages = state["averages"]
        if not isinstance(averages, (list, tuple)) or len(averages) > 2:
            raise _bad(f"'averages' must be a list of at most 2 epoch averages, got {_short(averages)}")
        parsed = tuple(_numbers(average, num_tasks, "each entry of 'averages'") for average in averages)
        _check_chain(parsed, "'averages'")
        return cls(
            num_tasks,
            tasks,
            state["dtype"],
            parsed,
            _parse_partial(state["partial"], num_tasks),
            _parse_log(state["log"], num_tasks),
        )


def upgrade(state: object) -> object:
    """A version-2 or -3 state in the version-4 layout; any other value as it is.

    Version 3 counted no rows: a running epoch reads as one row per batch, none
    left out, and so does each log entry.
    """
    state = _upgrade_2(state)
    if not (isinstance(state, Mapping) and _is_int(state.get("version")) and state["version"] == 3):
        return state
    _check_keys(state, _KEYS[3])
    partial = state["partial"]
    if partial is not None:
        if not isinstance(partial, (list, tuple)) or len(partial) != 5:
            raise _bad(f"'partial' must be None or [rank, world_size, batches, weight, sums], got {_short(partial)}")
        partial = [*partial[:3], partial[2], 0, *partial[3:]]
    log = state["log"]
    if not isinstance(log, Mapping) or set(log) != set(_LOG_KEYS[3]):
        raise _bad(f"'log' must be a dict with keys {list(_LOG_KEYS[3])}, got {_short(log)}")
    rows = len(log["batches"]) if isinstance(log["batches"], (list, tuple)) else 0
    return {**state, "version": VERSION, "partial": partial, "log": {**log, "nonfinite_rows": [0] * rows}}


def _upgrade_2(state: object) -> object:
    """A version-2 state in the version-3 layout; any other value as it is.

    Version 2 had no ``dtype``: a running epoch held it as its third field
    (float32 without one). Its log had no temperatures or weights.
    """
    if not (isinstance(state, Mapping) and _is_int(state.get("version")) and state["version"] == 2):
        return state
    _check_keys(state, _KEYS[2])
    partial, dtype = state["partial"], "float32"
    if partial is not None:
        if not isinstance(partial, (list, tuple)) or len(partial) != 6:
            raise _bad(
                f"'partial' must be None or [rank, world_size, dtype, batches, weight, sums], got {_short(partial)}"
            )
        dtype, partial = partial[2], [*partial[:2], *partial[3:]]
        if dtype not in DTYPES:
            raise _bad(f"the dtype in 'partial' must be one of {list(DTYPES)}, got {_short(dtype)}")
    log = state["log"]
    if not isinstance(log, Mapping) or set(log) != set(_LOG_KEYS[2]):
        raise _bad(f"'log' must be a dict with keys {list(_LOG_KEYS[2])}, got {_short(log)}")
    rows = len(log["batches"]) if isinstance(log["batches"], (list, tuple)) else 0
    log = {**log, "temperature": [None] * rows, "weights": [None] * rows}
    return {**state, "version": 3, "dtype": dtype, "partial": partial, "log": log}


def _check_keys(state: Mapping[str, Any], keys: Sequence[str]) -> None:
    if set(state) != set(keys):
        missing, unknown = set(keys) - set(state), set(state) - set(keys)
        raise _bad(f"missing keys {sorted(missing)}, unexpected keys {sorted(map(str, unknown))}")


def _bad(message: str) -> ValueError:
    return ValueError(f"malformed DWA history state_dict: {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _bad(f"{what} must be a number, got {_short(value)}")
    try:
        return float(value) + 0.0  # + 0.0: -0.0 reads as 0.0
    except OverflowError:  # an int beyond the float range, e.g. 10**400
        raise _bad(f"{what} holds {_short(value)}, which is beyond the float range") from None


def _numbers(value: object, length: int | None, what: str, finite: bool = True) -> tuple[float, ...]:
    if length is None:
        raise _bad(f"{what} is set but 'num_tasks' is None")
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise _bad(f"{what} must be a list of {length} numbers, got {_short(value)}")
    numbers = tuple(_number(v, what) for v in value)
    if finite and not all(map(math.isfinite, numbers)):
        raise _bad(f"{what} must hold finite numbers, got {_short(list(numbers))}")
    return numbers


def _count(value: object, what: str, low: int, high: int = MAX_COUNT) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(f"{what} must be an int from {low} to {high}, got {_short(value)}")
    return value


def _check_chain(averages: Sequence[Sequence[float]], what: str) -> None:
    for i, average in enumerate(averages):
        try:
            check_epoch_average(average, averages[i - 1] if i else None)
        except LossHistoryError as error:
            raise _bad(f"{what}[{i}]: {error}") from None


def _parse_partial(value: object, num_tasks: int | None) -> RunningEpoch | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 7:
        raise _bad(f"'partial' must be None or {_PARTIAL}, got {_short(value)}")
    rank, world_size, batches, rows, nonfinite_rows, weight, sums = value
    world_size = _count(world_size, "the world_size in 'partial'", 1, MAX_WORLD_SIZE)
    if rank is not None:
        if world_size == 1:
            raise _bad(f"the rank in 'partial' must be None for a single process (world_size 1), got {_short(rank)}")
        rank = _count(rank, "the rank in 'partial'", 0, world_size - 1)
    batches = _count(batches, "the batch count in 'partial'", 1)
    rows = _count(rows, "the row count in 'partial'", 0)
    nonfinite_rows = _count(nonfinite_rows, "the nonfinite_rows in 'partial'", 0, rows)
    weight = _number(weight, "the weight in 'partial'")
    if weight < 0.0:  # NaN and +inf mark a poisoned epoch, which step() reports
        raise _bad(f"the weight in 'partial' must be >= 0, got {weight!r}")
    sums = _numbers(sums, num_tasks, "the sums in 'partial'", finite=False)
    return RunningEpoch(rank, world_size, Totals(batches, rows, nonfinite_rows, weight, sums))


def _parse_log(value: object, num_tasks: int | None) -> tuple[LogEntry, ...]:
    keys = _LOG_KEYS[4]
    if not isinstance(value, Mapping) or set(value) != set(keys):
        raise _bad(f"'log' must be a dict with keys {list(keys)}, got {_short(value)}")
    columns = [value[key] for key in keys]
    if not all(isinstance(column, (list, tuple)) for column in columns) or len({len(c) for c in columns}) != 1:
        raise _bad(f"the columns of 'log' must be lists of one length, got {_short(value)}")
    entries = []
    for i, (batches, weight, average, temperature, entry_weights, nonfinite_rows) in enumerate(
        zip(*columns, strict=True)
    ):
        total = _number(weight, f"log weight[{i}]")
        if not (math.isfinite(total) and total > 0.0):
            raise _bad(f"log weight[{i}] must be a finite number > 0, got {_short(weight)}")
        if temperature is not None:
            temperature = _number(temperature, f"log temperature[{i}]")
            if not (math.isfinite(temperature) and temperature > 0.0):
                raise _bad(f"log temperature[{i}] must be None or finite and > 0, got {temperature!r}")
        if entry_weights is not None:
            entry_weights = _numbers(entry_weights, num_tasks, f"log weights[{i}]")
            if not all(w >= 0.0 for w in entry_weights):
                raise _bad(f"log weights[{i}] must be None or numbers >= 0, got {_short(list(entry_weights))}")
        entries.append(
            LogEntry(
                _count(batches, f"log batches[{i}]", 1),
                total,
                _numbers(average, num_tasks, f"log averages[{i}]"),
                temperature,
                entry_weights,
                _count(nonfinite_rows, f"log nonfinite_rows[{i}]", 0),
            )
        )
    _check_chain([entry.averages for entry in entries], "log averages")
    return tuple(entries)


class Share(enum.Enum):
    """What became of this rank's part of a running epoch resumed from a checkpoint."""

    OWN = 0  # it holds its own batches, or none were recorded
    HELD = 1  # rank 0 holds them: the checkpoint held the whole group's running epoch
    MISSING = 2  # lost: the checkpoint held another rank's part only


def resolve_partial(partial: RunningEpoch | None, rank: int, world_size: int) -> tuple[RunningEpoch | None, Share]:
    """The part of a saved running epoch that ``rank`` of ``world_size`` processes takes, and its share.

    Raises ``ValueError`` for one rank's part of a run on another number of processes.
    """
    if partial is None:
        return None, Share.OWN
    if partial.rank is None:  # the whole group's: rank 0 takes it once
        return (partial, Share.OWN) if rank == 0 else (None, Share.HELD)
    if partial.world_size != world_size:
        raise ValueError(
            f"this checkpoint was saved mid-epoch by rank {partial.rank} of {partial.world_size} processes and holds "
            f"only that rank's part of the running epoch, so it cannot be resumed exactly on {world_size} process(es). "
            f"Resume on {partial.world_size} processes (each loading its own state), or save mid-epoch checkpoints "
            "after consolidate_state_dict() (exact on any number of processes), or at an epoch boundary. To resume "
            "anyway without this epoch's earlier batches, set the history state's 'partial' to None before loading."
        )
    return (partial, Share.OWN) if partial.rank == rank else (None, Share.MISSING)
