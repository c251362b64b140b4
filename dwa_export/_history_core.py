"""The rules of the two-epoch loss history, shared by every runtime.

This module must not import torch: the torch-free runtime (``dwa_export.runtime``)
builds on it. Subclasses own the per-batch accumulator (device tensors, a NumPy
array, ...); this class owns everything that happens once per epoch: turning the
accumulated sums into an epoch average, checking that the processes agree,
validating the average, rolling the history, the per-epoch log, and the
checkpoint format.

The checkpoint (``state_dict()``) is a plain, JSON-serialisable dict, identical in
every runtime (``dwa/history.hpp`` writes the same text as ``json.dumps``)::

    {
        "format": "dwa_export.history",
        "version": 2,
        "num_tasks": int | None,           # K, once known (1 <= K <= 2**20)
        "tasks": [str] * K | None,         # task names, if given
        "averages": [[float] * K, ...],    # 0-2 epoch averages, oldest first
        "partial": None | [rank, world_size, dtype, batches, weight, [float] * K],
        "log": {"batches": [int], "weight": [float], "averages": [[float] * K]},
    }

``partial`` is the running epoch (what was recorded since the last ``step()``):
``rank``/``world_size`` say whose it is (``rank`` is ``None`` when it holds the
whole group's running epoch: a single process, or after
``consolidate_state_dict()``), ``dtype`` the accumulator dtype (``"float32"``
or ``"float64"``; float32 sums are float32 values), ``batches`` the number of
``record()`` calls (>= 1), ``weight`` the summed batch weight (>= 0; NaN or
infinite when an invalid per-row weight was recorded, which ``step()`` then
reports), and the weighted loss sums (any float: ``step()`` judges them). It is
one JSON list, not a dict, so that ``torch.distributed.checkpoint``, which
stores each leaf of a nested dict separately, keeps it in one piece.

``log`` has one entry per successful ``step()`` since the start (or the last
``reset()``): the batch count, weight sum and average of that epoch.

Version 1 states (``dwa_export`` 0.1) still load; see ``_migrate_v1``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "HistoryCore",
    "LossHistoryError",
    "PartialEpochWarning",
    "RankMismatchError",
    "check_temperature",
]

STATE_FORMAT = "dwa_export.history"
STATE_VERSION = 2
STATE_KEYS = ("format", "version", "num_tasks", "tasks", "averages", "partial", "log")
LOG_KEYS = ("batches", "weight", "averages")
MAX_TASKS = 1 << 20
MAX_WORLD_SIZE = 1 << 24
MAX_COUNT = 1 << 53  # batch counts stay exact in a float64
ACCUMULATOR_DTYPES = ("float32", "float64")

# One process's row in the epoch packet that step() sums over the process group
# (all-reduce); see HistoryCore.step().
SLOT = ("num_tasks", "dtype", "epochs", "batches", "weight", "missing")
SLOT_SIZE = len(SLOT)
DTYPE_CODES = {"float32": 1.0, "float64": 2.0}
MIN_PAYLOAD = 64


def payload_size(num_tasks: int | None) -> int:
    """Length of the loss-sum part of the epoch packet.

    The same for every K up to 64 (and then per power of two), so that
    processes that disagree on K still exchange packets of one size and get a
    clear error instead of a hang or a size mismatch in the collective.
    """
    size = MIN_PAYLOAD
    while num_tasks is not None and size < num_tasks:
        size *= 2
    return size


class LossHistoryError(ValueError):
    """An epoch that DWA cannot use; raised by ``step()``.

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


class RankMismatchError(RuntimeError):
    """The processes of a distributed ``step()`` disagree; raised on every rank.

    Nothing was changed on any rank. ``counts`` holds each rank's number of
    batches recorded this epoch.
    """

    def __init__(self, message: str, counts: Sequence[int]) -> None:
        super().__init__(message)
        self.counts = tuple(counts)


class PartialEpochWarning(UserWarning):
    """A resumed epoch lacks batches that were recorded before the checkpoint."""


_REMEDY = (
    "The epoch was not added to the history and nothing was lost: call "
    "discard_epoch() to drop this epoch's batches, or reset() to restart the warm-up."
)


# --------------------------------------------------------------------------- argument checks


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float, or raise if it is not finite and > 0."""
    if not _is_real(temperature):
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
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, numbers.Integral) or not 1 <= num_tasks <= MAX_TASKS:
        raise ValueError(
            f"num_tasks must be a positive int (the number K of task losses, at most {MAX_TASKS}), got {num_tasks!r}"
        )
    return int(num_tasks)


def check_tasks(tasks: Sequence[str] | None, num_tasks: int | None) -> tuple[str, ...] | None:
    """Task names: distinct, non-empty strings, one per task."""
    if tasks is None:
        return None
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a sequence of task names, e.g. ('seg', 'depth'), got {tasks!r}")
    names = tuple(tasks)
    for name in names:
        if not isinstance(name, str) or not name or not _encodable(name):
            raise ValueError(f"each task name must be a non-empty string, got {_short(name)} in {_short(list(names))}")
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be distinct, got {_short(list(names))}")
    check_num_tasks(len(names))
    if num_tasks is not None and num_tasks != len(names):
        raise ValueError(f"num_tasks={num_tasks} but {len(names)} task names were given: {_short(list(names))}")
    return names


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: not representable in a UTF-8 checkpoint
        return False
    return True


def check_batch_weight(weight: object, batched: bool) -> float:
    """A weight given as one number: the weight of one row of K losses (e.g. the batch size).

    ``batched``: whether the losses have rows (``[B, K]``); a single number is
    then ambiguous (the weight of the batch, or of each row?) and is refused.
    """
    if not _is_real(weight):
        raise TypeError(f"weight must be a real number or a tensor/array, got {type(weight).__name__} {weight!r}")
    value = float(weight)  # type: ignore[arg-type]
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"weight must be finite and >= 0 (e.g. the batch size), got {weight!r}")
    if batched:
        raise ValueError(
            f"weight={weight!r} is one number, but the losses have rows of K losses (per-sample losses). "
            "Each row already counts once, so without a weight the epoch average is sample-weighted; "
            "for other per-row weights pass a tensor/array with one weight per row (the losses' shape "
            "without the last dimension). A single number weighs a [K] batch, e.g. batch-mean losses "
            "with weight=batch_size."
        )
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


# --------------------------------------------------------------------------- the running epoch


@dataclass(frozen=True)
class Partial:
    """A running epoch as saved in a checkpoint (see the module docstring)."""

    rank: int | None
    world_size: int
    dtype: str
    batches: int
    weight: float
    sums: tuple[float, ...]
    legacy: bool = False  # from a version-1 state, which did not say whose it was

    def to_state(self) -> list[Any]:
        return [self.rank, self.world_size, self.dtype, self.batches, self.weight, list(self.sums)]


def _world_change_error(partial: Partial, world_size: int) -> ValueError:
    return ValueError(
        f"this checkpoint was saved mid-epoch by rank {partial.rank} of {partial.world_size} processes and "
        f"holds only that rank's part of the running epoch, so it cannot be resumed exactly on "
        f"{world_size} process(es). Resume on {partial.world_size} processes (each loading its own "
        "state), or save mid-epoch checkpoints after consolidate_state_dict() (exact on any number "
        "of processes), or at an epoch boundary. To resume anyway without this epoch's earlier "
        "batches, set the history state's 'partial' to None before loading."
    )


# --------------------------------------------------------------------------- the history


class HistoryCore:
    """Once-per-epoch logic of a DWA loss history; subclasses add ``record()``.

    A subclass implements the accumulator hooks:

    * ``_epoch_packet() -> list[float] | None``: the epoch packet summed over
      the process group (see :meth:`step`), or ``None`` when nothing can have
      been recorded anywhere. Must not change any state.
    * ``_local_partial() -> (dtype, batches, weight, sums) | None``: this
      process's running epoch as host numbers (``None``: nothing recorded).
    * ``_set_partial(dtype, batches, weight, sums)``: replace the running epoch
      (``dtype None``: empty it).
    * ``_clear_epoch()``: empty the running epoch.
    * ``_process()``: ``(rank, world_size)`` of the group ``step()`` reduces over.
    """

    def __init__(self, num_tasks: int | None = None, tasks: Sequence[str] | None = None) -> None:
        num_tasks = check_num_tasks(num_tasks)
        self._tasks = check_tasks(tasks, num_tasks)
        if self._tasks is not None:
            num_tasks = len(self._tasks)
        self._fixed_num_tasks = num_tasks
        self._num_tasks = num_tasks
        self._averages: tuple[tuple[float, ...], ...] = ()
        self._log: list[tuple[int, float, tuple[float, ...]]] = []
        self._missing_partial = False  # a resumed epoch lacks this rank's batches from before the checkpoint
        self.allow_empty_ranks = False  # see DWAHistory

    # ------------------------------------------------------------------ queries
    @property
    def num_tasks(self) -> int | None:
        """K, the number of tasks: given to the constructor or fixed by the first ``record``."""
        return self._num_tasks

    @property
    def tasks(self) -> tuple[str, ...] | None:
        """The task names given to the constructor (or loaded from a checkpoint), if any."""
        return self._tasks

    @property
    def ready(self) -> bool:
        """Whether two epoch averages exist, i.e. whether the weights are past the warm-up."""
        return len(self._averages) == 2

    @property
    def averages(self) -> tuple[tuple[float, ...], ...]:
        """The stored epoch averages as floats, oldest first (at most two)."""
        return self._averages

    @property
    def log(self) -> list[dict[str, Any]]:
        """One JSON-friendly dict per successful ``step()``: ``epoch``, ``averages``, ``batches``, ``weight``.

        ``batches`` counts ``record()`` calls (of all processes, under
        ``torch.distributed``), ``weight`` the summed batch weight behind the
        averages. Saved in ``state_dict()``; ``reset()`` clears it.
        """
        return [
            {"epoch": epoch, "averages": list(average), "batches": batches, "weight": weight}
            for epoch, (batches, weight, average) in enumerate(self._log)
        ]

    def _host_inputs(self) -> tuple[Sequence[float], Sequence[float]]:
        """``(L(t-1), L(t-2))`` as floats; all ones (uniform weights) during warm-up."""
        if self._num_tasks is None:
            raise RuntimeError(
                "the number of tasks is not known yet: record() a batch first, or pass "
                "num_tasks=K (or tasks=names) to the constructor"
            )
        if not self.ready:
            ones = (1.0,) * self._num_tasks
            return ones, ones
        return self._averages[1], self._averages[0]

    # ------------------------------------------------------------------ per batch
    def _check_num_tasks(self, num_tasks: int) -> None:
        """Raise if ``num_tasks`` is not this history's K. Changes nothing."""
        if self._num_tasks is not None and num_tasks != self._num_tasks:
            if self._fixed_num_tasks is None:
                remedy = "call reset() first to start a new history with a different K"
            else:
                remedy = f"this history was created with num_tasks={self._fixed_num_tasks}; create a new one"
            raise ValueError(
                f"losses have {num_tasks} tasks in their last dimension but this history has "
                f"K={self._num_tasks}; {remedy}"
            )
        check_num_tasks(num_tasks)

    def _names_to_order(self, losses: Mapping[str, Any]) -> list[Any]:
        """The values of a ``{name: loss}`` batch in task order; raises (changing nothing) on other names."""
        if self._tasks is None:
            raise TypeError(
                "losses given as a mapping need task names: create the history with "
                f"tasks=(...), e.g. tasks={tuple(losses)!r}"
            )
        if losses.keys() != set(self._tasks):
            missing = [name for name in self._tasks if name not in losses]
            unexpected = [name for name in losses if name not in self._tasks]
            raise ValueError(
                f"losses must have exactly the task names {list(self._tasks)}; missing {missing}, "
                f"unexpected {unexpected}"
            )
        return [losses[name] for name in self._tasks]

    # ------------------------------------------------------------------ per epoch
    def step(self) -> None:
        """Close the epoch: average what was recorded and roll the history.

        ``L(t-2) <- L(t-1) <- this epoch's average``, and one entry is added to
        :attr:`log`. A no-op when nothing with a weight was recorded (in any
        process). Raises :class:`LossHistoryError`, changing nothing, when the
        average is non-finite, zero, or changed sign, or the weights are
        invalid; under ``torch.distributed``, :class:`RankMismatchError` on
        every rank when the processes disagree (see :meth:`_check_agreement`).
        """
        reduced = self._reduce()
        if reduced is None:
            return
        num_tasks, slots, batches, weight, sums = reduced
        previous = self._averages[-1] if self._averages else None
        if weight == 0.0:  # nothing, or only zero-weight batches: nothing to average
            self._clear_epoch()
            return
        if not (math.isfinite(weight) and weight > 0.0):
            raise LossHistoryError(
                f"the batch weights recorded this epoch sum to {weight!r}; every weight must be "
                "finite and >= 0 (a per-row weight tensor/array held a negative, NaN or infinite "
                f"value, or the sum overflowed). {_REMEDY}",
                None,
                sums,
                previous,
            )
        average = tuple(s / weight for s in sums)
        check_epoch_average(average, previous)
        _warn_if_partial_missing(slots)
        self._num_tasks = num_tasks
        self._averages = (*self._averages, average)[-2:]
        self._log.append((batches, weight, average))
        self._clear_epoch()

    def _reduce(
        self, mid_epoch: bool = False
    ) -> tuple[int, list[Sequence[float]], int, float, tuple[float, ...]] | None:
        """This epoch's (K, per-rank slots, batches, weight, loss sums) over the process group, after checking agreement.

        ``mid_epoch``: some ranks may legitimately have recorded nothing yet.
        """
        packet = self._epoch_packet()
        if packet is None:
            return None
        _, world_size = self._process()
        slots = [packet[r * SLOT_SIZE : (r + 1) * SLOT_SIZE] for r in range(world_size)]
        num_tasks = self._check_agreement(slots, allow_empty=mid_epoch or self.allow_empty_ranks)
        if num_tasks is None:
            return None
        batches = sum(int(slot[3]) for slot in slots)
        # math.fsum: one correctly rounded total, the same on every rank.
        weight = slots[0][4] if world_size == 1 else math.fsum(slot[4] for slot in slots)
        return num_tasks, slots, batches, weight, tuple(packet[world_size * SLOT_SIZE :][:num_tasks])

    def _slot(self, batches: float, weight: float, dtype: str | None) -> list[float]:
        """This process's row of the epoch packet (host numbers; the subclass may fill batches/weight on device)."""
        return [
            float(self._num_tasks or 0),
            DTYPE_CODES.get(dtype or "", 0.0),
            float(len(self._log)),
            batches,
            weight,
            1.0 if self._missing_partial else 0.0,
        ]

    def _check_agreement(self, slots: list[Sequence[float]], allow_empty: bool) -> int | None:
        """K over the group; raises :class:`RankMismatchError` where the processes disagree.

        Collectives pair by call order, so a rank that calls ``step()`` once too
        often pairs its empty epoch with the others' real one: that shows as
        some ranks with batches and some without.
        """
        counts = [int(slot[3]) for slot in slots]
        known = {int(slot[0]) for slot in slots if slot[0] > 0}
        if len(known) > 1:
            per_rank = ", ".join(f"rank {r}: K={int(s[0]) or None}" for r, s in enumerate(slots))
            raise RankMismatchError(
                f"the processes disagree on the number of tasks ({per_rank}); every rank must record "
                "losses with the same K (pass num_tasks=K to the constructor on every rank)",
                counts,
            )
        dtypes = {slot[1] for slot in slots if slot[3] > 0}
        if len(dtypes) > 1:
            names = {code: name for name, code in DTYPE_CODES.items()}
            per_rank = ", ".join(f"rank {r}: {names.get(s[1], 'nothing')}" for r, s in enumerate(slots))
            raise RankMismatchError(
                f"the processes accumulate losses in different dtypes ({per_rank}); record losses "
                "of one dtype on every rank",
                counts,
            )
        epochs = {int(slot[2]) for slot in slots}
        if len(epochs) > 1:
            per_rank = ", ".join(f"rank {r}: {int(s[2])}" for r, s in enumerate(slots))
            raise RankMismatchError(
                f"the processes have closed different numbers of epochs ({per_rank}): they resumed "
                "from different checkpoints, or a history was reset() on some ranks only",
                counts,
            )
        recorded = [r for r, slot in enumerate(slots) if slot[3] > 0]
        if recorded and len(recorded) < len(slots) and not allow_empty:
            empty = [r for r in range(len(slots)) if r not in recorded]
            per_rank = ", ".join(f"rank {r}: {counts[r]}" for r in range(len(slots)))
            raise RankMismatchError(
                f"step() found batches on some ranks and none on rank(s) {empty} (batches this epoch: "
                f"{per_rank}). The likely cause is a rank that called step() once more than the "
                "others: collectives pair by call order, so its extra step() met the others' "
                "end-of-epoch step(). Call step() exactly once per epoch on every rank. If some "
                "ranks really can see no batch in an epoch, create the history with "
                "allow_empty_ranks=True. Nothing was changed on any rank.",
                counts,
            )
        return known.pop() if known else None

    def discard_epoch(self) -> None:
        """Drop what was recorded since the last ``step()``; the history stays."""
        self._clear_epoch()

    def reset(self) -> None:
        """Forget everything: the history, the log, this epoch's batches and a K learned from data.

        A K (or task names) given to the constructor is kept.
        """
        self._num_tasks = self._fixed_num_tasks
        self._averages = ()
        self._log = []
        self._clear_epoch()

    def _clear_epoch(self) -> None:
        self._missing_partial = False

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The whole state, mid-epoch included, as a JSON-serialisable dict (see the module docstring).

        No collective: safe in ``if rank == 0: torch.save(...)``. Under
        ``torch.distributed`` the running epoch is this rank's part only; see
        ``consolidate_state_dict()`` for checkpoints that any rank can resume.
        """
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "num_tasks": self._num_tasks,
            "tasks": None if self._tasks is None else list(self._tasks),
            "averages": [list(a) for a in self._averages],
            "partial": None if (partial := self._partial_for_state()) is None else partial.to_state(),
            "log": {
                "batches": [entry[0] for entry in self._log],
                "weight": [entry[1] for entry in self._log],
                "averages": [list(entry[2]) for entry in self._log],
            },
        }

    def _partial_for_state(self) -> Partial | None:
        local = self._local_partial()
        if local is None:
            return None
        dtype, batches, weight, sums = local
        rank, world_size = self._process()
        return Partial(None if world_size == 1 else rank, world_size, dtype, batches, weight, tuple(sums))

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()`` (any version this release reads).

        Raises ``ValueError`` naming the field, the value and what was
        expected, changing nothing, if the state is malformed or does not fit
        this history (other K or task names). The running epoch is taken by
        the process it belongs to; see ``state_dict()``.
        """
        state = parse_state(state_dict, self._fixed_num_tasks, self._tasks)
        rank, world_size = self._process()
        partial, missing = _resolve_partial(state["partial"], rank, world_size)
        # Validated in full above, so the assignments below cannot fail half-way.
        self._set_partial(partial)
        self._missing_partial = missing
        self._num_tasks = state["num_tasks"]
        if state["tasks"] is not None:
            self._tasks = state["tasks"]
        self._averages = state["averages"]
        self._log = state["log"]

    # ------------------------------------------------------------------ hooks
    def _epoch_packet(self) -> list[float] | None:
        raise NotImplementedError

    def _local_partial(self) -> tuple[str, int, float, Sequence[float]] | None:
        raise NotImplementedError

    def _set_partial(self, partial: Partial | None) -> None:
        raise NotImplementedError

    def _process(self) -> tuple[int, int]:
        return 0, 1


def _warn_if_partial_missing(slots: Sequence[Sequence[float]]) -> None:
    missing = [r for r, slot in enumerate(slots) if slot[5] > 0]
    if missing:
        warnings.warn(
            f"the epoch resumed from a checkpoint lacks the batches that rank(s) {missing} "
            "recorded before it was saved: the checkpoint held another rank's running epoch "
            "only (the 'rank 0 saves, every rank loads' recipe, or torch.distributed.checkpoint "
            "without consolidate_state_dict()). This epoch's average is formed from the batches "
            "that were kept. To resume mid-epoch exactly, save every rank's state_dict(), or call "
            "consolidate_state_dict() on every rank before saving.",
            PartialEpochWarning,
            stacklevel=3,
        )


def _resolve_partial(partial: Partial | None, rank: int, world_size: int) -> tuple[Partial | None, bool]:
    """Which part of a saved running epoch this process takes, and whether its own part is missing."""
    if partial is None:
        return None, False
    if partial.legacy:
        if world_size > 1:
            warnings.warn(
                "a version-1 state saved mid-epoch does not say which process it came from; this "
                "rank takes its running sums as its own. If every rank loaded the same file, the "
                "batches before the checkpoint are counted once per rank this epoch.",
                PartialEpochWarning,
                stacklevel=3,
            )
        return partial, False
    if partial.rank is None:  # the whole group's running epoch: taken once
        return (partial if rank == 0 else None), False
    if partial.world_size != world_size:
        raise _world_change_error(partial, world_size)
    if partial.rank == rank:
        return partial, False
    return None, True


# --------------------------------------------------------------------------- the state format


def _bad_state(message: str) -> ValueError:
    return ValueError(f"malformed DWA history state_dict: {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _to_float(value: object, what: str) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:  # an int beyond the float range, e.g. 10**400
        raise _bad_state(f"{what} holds {_short(value)}, which is beyond the float range") from None


def _float_list(value: object, length: int, what: str, finite: bool = True) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != length or not all(map(_is_number, value)):
        raise _bad_state(f"{what} must be a list of {length} numbers, got {_short(value)}")
    floats = tuple(_to_float(v, what) for v in value)
    if finite and not all(map(math.isfinite, floats)):
        raise _bad_state(f"{what} must hold finite numbers, got {_format(floats)}")
    return floats


def _count(value: object, what: str, low: int = 0, high: int = MAX_COUNT) -> int:
    if not _is_int(value) or not low <= value <= high:  # type: ignore[operator]
        raise _bad_state(f"{what} must be an int from {low} to {high}, got {_short(value)}")
    return int(value)  # type: ignore[arg-type]


def _check_averages(averages: Sequence[Sequence[float]], what: str) -> None:
    for i, average in enumerate(averages):
        try:
            check_epoch_average(average, averages[i - 1] if i else None)
        except LossHistoryError as error:
            raise _bad_state(f"{what} {i}: {error}") from None


def _float32_exact(values: Sequence[float]) -> bool:
    import struct

    try:
        packed = struct.pack(f"<{len(values)}f", *values)
    except OverflowError:
        return False
    unpacked = struct.unpack(f"<{len(values)}f", packed)
    return all(a == b or (a != a and b != b) for a, b in zip(values, unpacked))


def _parse_partial(value: object, num_tasks: int | None) -> Partial | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 6:
        raise _bad_state(
            f"'partial' must be None or [rank, world_size, dtype, batches, weight, sums], got {_short(value)}"
        )
    rank, world_size, dtype, batches, weight, sums = value
    world_size = _count(world_size, "the world_size in 'partial'", 1, MAX_WORLD_SIZE)
    if rank is not None:
        if world_size == 1:
            raise _bad_state(f"the rank in 'partial' must be None for a single process (world_size 1), got {_short(rank)}")
        rank = _count(rank, "the rank in 'partial'", 0, world_size - 1)
    if dtype not in ACCUMULATOR_DTYPES:
        raise _bad_state(f"the dtype in 'partial' must be one of {list(ACCUMULATOR_DTYPES)}, got {_short(dtype)}")
    batches = _count(batches, "the batch count in 'partial'", 1)
    if not _is_number(weight):
        raise _bad_state(f"the weight in 'partial' must be a number, got {_short(weight)}")
    weight = _to_float(weight, "the weight in 'partial'") + 0.0  # canonical: -0.0 is 0.0
    if weight < 0.0 or weight == -math.inf:
        raise _bad_state(
            f"the weight in 'partial' must be >= 0 (or NaN/inf after an invalid per-row weight), got {_short(weight)}"
        )
    if num_tasks is None:
        raise _bad_state("'partial' is set but 'num_tasks' is None")
    sums = _float_list(sums, num_tasks, "the sums in 'partial'", finite=False)
    if dtype == "float32" and not _float32_exact(sums):
        raise _bad_state(f"the sums in 'partial' must be float32 values for dtype 'float32', got {_format(sums)}")
    return Partial(rank, world_size, dtype, batches, weight, sums)


def _parse_log(value: object, num_tasks: int | None) -> list[tuple[int, float, tuple[float, ...]]]:
    if not isinstance(value, Mapping) or set(value.keys()) != set(LOG_KEYS):
        raise _bad_state(f"'log' must be a dict with keys {list(LOG_KEYS)}, got {_short(value)}")
    columns = [value[key] for key in LOG_KEYS]
    if not all(isinstance(column, (list, tuple)) for column in columns) or len({len(c) for c in columns}) != 1:
        raise _bad_state(f"the columns of 'log' must be lists of one length, got {_short(value)}")
    batches, weights, averages = columns
    if batches and num_tasks is None:
        raise _bad_state("'log' is not empty but 'num_tasks' is None")
    entries = []
    for i, (count, weight, average) in enumerate(zip(batches, weights, averages)):
        count = _count(count, f"log batches[{i}]", 1)
        if not _is_number(weight) or not (math.isfinite(_to_float(weight, "log weight")) and weight > 0):
            raise _bad_state(f"log weight[{i}] must be a finite number > 0, got {_short(weight)}")
        entries.append((count, float(weight), _float_list(average, num_tasks, f"log averages[{i}]")))  # type: ignore[arg-type]
    _check_averages([entry[2] for entry in entries], "log averages")
    return entries


def _check_keys(state: Mapping[str, Any], keys: Iterable[str], suffix: str = "") -> None:
    """Raise unless ``state`` has exactly ``keys``; the C++ header says the same."""
    missing = set(keys) - state.keys()
    unknown = state.keys() - set(keys)
    if missing or unknown:
        raise _bad_state(f"missing keys {sorted(missing)}, unexpected keys {sorted(map(str, unknown))}{suffix}")


def _parse_num_tasks(value: object) -> int | None:
    if value is not None and not (_is_int(value) and 1 <= value <= MAX_TASKS):  # type: ignore[operator]
        raise _bad_state(f"'num_tasks' must be None or an int from 1 to {MAX_TASKS}, got {_short(value)}")
    return value  # type: ignore[return-value]


def _short(value: object) -> str:
    """repr(value) for an error message, or a summary of a long one (the C++ header says the same)."""
    text = repr(value)
    if len(text) <= 120:
        return text
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)} items"
    return text[:120] + "..."


def parse_state(
    state: Mapping[str, Any], fixed_num_tasks: int | None, fixed_tasks: tuple[str, ...] | None
) -> dict[str, Any]:
    """Validate a state completely against the format; returns its parsed fields. Changes nothing."""
    if not isinstance(state, Mapping):
        raise _bad_state(f"expected a dict from state_dict(), got {type(state).__name__}")
    if state.get("format") != STATE_FORMAT or not isinstance(state.get("format"), str):
        raise _bad_state(f"'format' is {_short(state.get('format'))}, expected {_short(STATE_FORMAT)}")
    version = state.get("version")
    if not _is_int(version) or version not in (1, STATE_VERSION):
        raise _bad_state(f"'version' is {_short(version)}; this dwa_export reads versions 1 and {STATE_VERSION}")
    legacy = None
    if version == 1:
        state, legacy = _migrate_v1(state)
    _check_keys(state, STATE_KEYS)

    num_tasks = _parse_num_tasks(state["num_tasks"])
    if fixed_num_tasks is not None and num_tasks != fixed_num_tasks:
        raise ValueError(
            f"the checkpoint holds K={num_tasks} tasks but this history was created with "
            f"num_tasks={fixed_num_tasks}"
        )
    tasks = state["tasks"]
    if tasks is not None:
        if not isinstance(tasks, list) or num_tasks is None:
            raise _bad_state(f"'tasks' must be None or a list of num_tasks names, got {_short(tasks)}")
        try:
            tasks = check_tasks(tasks, num_tasks)
        except (TypeError, ValueError) as error:
            raise _bad_state(f"'tasks': {error}") from None
        if fixed_tasks is not None and tasks != fixed_tasks:
            raise ValueError(
                f"the checkpoint's task names {list(tasks)} differ from this history's {list(fixed_tasks)}"
            )

    averages = state["averages"]
    if not isinstance(averages, (list, tuple)) or len(averages) > 2:
        raise _bad_state(f"'averages' must be a list of at most 2 epoch averages, got {_short(averages)}")
    if averages and num_tasks is None:
        raise _bad_state("'averages' is not empty but 'num_tasks' is None")
    parsed_averages = tuple(_float_list(a, num_tasks, "each entry of 'averages'") for a in averages)  # type: ignore[arg-type]
    _check_averages(parsed_averages, "stored average")

    return {
        "num_tasks": num_tasks,
        "tasks": tasks,
        "averages": parsed_averages,
        "partial": legacy or _parse_partial(state["partial"], num_tasks),
        "log": _parse_log(state["log"], num_tasks),
    }


_V1_KEYS = frozenset(
    {"format", "version", "num_tasks", "averages", "dtype", "epoch_sum", "epoch_weight", "epoch_tensor_weight"}
)


def _migrate_v1(state: Mapping[str, Any]) -> tuple[dict[str, Any], Partial | None]:
    """Version 1 (dwa_export 0.1) -> 2.

    Version 1 kept the weight sums of number and tensor weights apart
    (``epoch_weight``, ``epoch_tensor_weight``), did not count batches, had
    no task names or log, and did not say which process a running epoch came
    from. The migration adds the two weight sums, counts a running epoch as
    one batch, starts an empty log, and lets whichever process loads the state
    take its running epoch (as version 1 did).
    """
    _check_keys(state, _V1_KEYS, " (version 1)")
    num_tasks = _parse_num_tasks(state["num_tasks"])
    if state["dtype"] is not None and state["dtype"] not in ACCUMULATOR_DTYPES:
        raise _bad_state(f"'dtype' must be None or one of {list(ACCUMULATOR_DTYPES)}, got {_short(state['dtype'])}")
    weight, tensor_weight = state["epoch_weight"], state["epoch_tensor_weight"]
    if not _is_number(weight) or not _to_float(weight, "'epoch_weight'") >= 0.0:
        raise _bad_state(f"'epoch_weight' must be a number >= 0, got {_short(weight)}")
    if tensor_weight is not None and not _is_number(tensor_weight):
        raise _bad_state(f"'epoch_tensor_weight' must be a number or None, got {_short(tensor_weight)}")
    total = float(weight) + (0.0 if tensor_weight is None else _to_float(tensor_weight, "'epoch_tensor_weight'"))
    partial = None
    if state["epoch_sum"] is not None and (total != 0.0 or tensor_weight is not None):
        parsed = _parse_partial([None, 1, state["dtype"], 1, total, state["epoch_sum"]], num_tasks)
        assert parsed is not None
        partial = Partial(None, 1, parsed.dtype, 1, parsed.weight, parsed.sums, legacy=True)
    elif state["epoch_sum"] is None and total != 0.0:
        raise _bad_state("a non-zero epoch weight without an 'epoch_sum'")
    migrated = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "num_tasks": num_tasks,
        "tasks": None,
        "averages": state["averages"],
        "partial": None,
        "log": {"batches": [], "weight": [], "averages": []},
    }
    return migrated, partial
