"""What the ranks of a distributed DWA history exchange in ``step()`` and ``consolidate_state_dict()``.

Two collectives, once per epoch. First a fixed-size :class:`Header` from every
rank (an all-reduce in which each rank fills its own row), so that every rank
sees the same facts and reaches the same verdict: if the ranks disagree, each
raises the same :class:`RankMismatchError` before anything else is exchanged,
so nothing hangs or aborts and nothing changes. Then the K loss sums.
"""

from __future__ import annotations

import enum
import math
import zlib
from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields

import torch
import torch.distributed as dist

from ._epochs import NAN_STRATEGIES, Totals
from ._state import RunningEpoch, Share, resolve_partial

__all__ = ["GroupEpoch", "GroupSync", "LocalEpoch", "Operation", "PartialEpochWarning", "RankMismatchError"]

DTYPES = ("float32", "float64")  # Header.dtype is the index + 1


class RankMismatchError(RuntimeError):
    """The ranks of a distributed ``step()`` or ``consolidate_state_dict()`` disagree; raised on every rank.

    Nothing was changed on any rank. ``counts`` holds each rank's number of
    batches recorded this epoch.
    """

    def __init__(self, message: str, counts: Sequence[int]) -> None:
        super().__init__(message)
        self.counts = tuple(counts)


class PartialEpochWarning(UserWarning):
    """A resumed epoch lacks batches that were recorded before the checkpoint."""


class Operation(enum.IntEnum):
    STEP = 1
    CONSOLIDATE = 2


@dataclass(frozen=True)
class Header:
    """One rank's facts, exchanged before the loss sums (every field is exact as a float64)."""

    operation: int  # an Operation
    num_tasks: int  # K, 0 while not known
    tasks: int  # a code of the task names in order (names_code), 0 without names
    dtype: int  # the precision of inputs(): DTYPES index + 1
    epochs: int  # epochs closed so far
    temperature: float  # the temperature given to step(), 0.0 without
    allow_empty_ranks: int
    nan_strategy: int  # its NAN_STRATEGIES index
    batches: int  # recorded this epoch
    rows: int  # the rows of K losses in them
    nonfinite_rows: int  # rows left out for a NaN or infinity
    weight: float  # the weight sum of the rows kept
    share: int  # a Share: where this rank's part of a resumed epoch is

    def row(self) -> list[float]:
        return [float(value) for value in astuple(self)]

    @classmethod
    def from_row(cls, row: Sequence[float]) -> Header:
        values = [value if field.type == "float" else int(value) for field, value in zip(fields(cls), row, strict=True)]
        return cls(*values)  # type: ignore[arg-type]  # each field takes the type it declares


@dataclass(frozen=True)
class GroupEpoch:
    """The running epoch of the whole group, the same on every rank."""

    num_tasks: int | None
    dtype: str
    totals: Totals
    missing: tuple[int, ...]  # ranks whose batches before a checkpoint were lost with it


@dataclass(frozen=True)
class LocalEpoch:
    """What a history knows of itself and of this rank's running epoch."""

    num_tasks: int | None
    tasks: tuple[str, ...] | None
    dtype: str
    epochs: int
    nan_strategy: str
    totals: Totals


class GroupSync:
    """A history's link to its process group: which rank this is, and where its part of the running epoch is.

    It remembers the rank and world size, so that a checkpoint taken after the
    group is gone still says whose running epoch it holds.
    """

    def __init__(self, distributed: bool, process_group: dist.ProcessGroup | None, allow_empty_ranks: bool) -> None:
        self.distributed = distributed
        self.process_group = process_group
        self.allow_empty_ranks = allow_empty_ranks
        self.share = Share.OWN  # where this rank's part of a resumed running epoch is
        self.consolidated: tuple[int, RunningEpoch] | None = None  # (this rank's batches then, the group's epoch)
        self.process = (0, 1)  # (rank, world_size), as last seen
        self.live()

    def live(self) -> bool:
        """Whether there are other ranks to agree with now; refreshes :attr:`process`."""
        if not (self.distributed and dist.is_available() and dist.is_initialized()):
            return False
        rank = dist.get_rank(self.process_group)
        if rank < 0:
            raise RuntimeError(
                f"this process (global rank {dist.get_rank()}) is not a member of the history's process_group, "
                "so it cannot take part in step(): create the history with distributed=False on processes outside it"
            )
        self.process = rank, dist.get_world_size(self.process_group)
        return self.process[1] > 1

    def epoch(self, operation: Operation, local: LocalEpoch, temperature: float | None = None) -> GroupEpoch:
        """The group's running epoch: a collective when other ranks are live, else this rank's own."""
        if not self.live():
            return GroupEpoch(local.num_tasks, local.dtype, local.totals, ())
        totals = local.totals
        header = Header(
            operation=operation,
            num_tasks=local.num_tasks or 0,
            tasks=names_code(local.tasks),
            dtype=DTYPES.index(local.dtype) + 1,
            epochs=local.epochs,
            temperature=temperature or 0.0,
            allow_empty_ranks=int(self.allow_empty_ranks),
            nan_strategy=NAN_STRATEGIES.index(local.nan_strategy),
            batches=totals.batches,
            rows=totals.rows,
            nonfinite_rows=totals.nonfinite_rows,
            weight=totals.weight,
            share=self.share.value,
        )
        return _exchange(header, totals.sums, *self.process, self.process_group)

    def consolidate(self, local: LocalEpoch) -> GroupEpoch | None:
        """Gather the group's running epoch for :meth:`partial` (a collective); ``None`` without other ranks."""
        if not self.live():
            return None
        epoch = self.epoch(Operation.CONSOLIDATE, local)
        group = RunningEpoch(None, self.process[1], epoch.totals)
        self.consolidated = (local.totals.batches, group) if epoch.totals.batches else None
        return epoch

    def partial(self, totals: Totals) -> RunningEpoch | None:
        """The running epoch a checkpoint of this rank holds: the group's after :meth:`consolidate`, if this
        rank recorded nothing since, else its own part."""
        self.live()
        if self.consolidated is not None and self.consolidated[0] == totals.batches:
            return self.consolidated[1]
        if totals.batches == 0:
            return None
        rank, world_size = self.process
        return RunningEpoch(None if world_size == 1 else rank, world_size, totals)

    def resolve(self, partial: RunningEpoch | None) -> tuple[RunningEpoch | None, Share]:
        """What this rank takes of a checkpoint's running epoch (see ``resolve_partial``); changes nothing."""
        self.live()
        return resolve_partial(partial, *self.process)

    def clear(self, share: Share = Share.OWN) -> None:
        self.share = share
        self.consolidated = None


def names_code(tasks: Sequence[str] | None) -> int:
    """The same number on every rank for the same names in the same order (unlike ``hash``)."""
    return 0 if tasks is None else (1 << 32) | zlib.crc32("\0".join(tasks).encode())


def _exchange(
    header: Header, sums: tuple[float, ...], rank: int, world_size: int, process_group: dist.ProcessGroup | None
) -> GroupEpoch:
    """Every rank's header, checked for agreement, then the summed loss sums."""
    device = _collective_device(process_group)
    rows = torch.zeros(world_size, len(fields(Header)), dtype=torch.float64, device=device)
    rows[rank] = torch.tensor(header.row(), dtype=torch.float64)
    dist.all_reduce(rows, group=process_group)
    headers = [Header.from_row(row) for row in rows.tolist()]
    num_tasks, dtype = agree(headers)
    total: tuple[float, ...] = ()
    if num_tasks is not None:  # known to every rank now, so every rank sends K sums
        payload = torch.tensor(sums or (0.0,) * num_tasks, dtype=torch.float64, device=device)
        dist.all_reduce(payload, group=process_group)
        total = tuple(payload.tolist())
    totals = Totals(
        sum(h.batches for h in headers),
        sum(h.rows for h in headers),
        sum(h.nonfinite_rows for h in headers),
        math.fsum(h.weight for h in headers),  # correctly rounded: the same on every rank
        total if any(h.batches for h in headers) else (),
    )
    return GroupEpoch(
        num_tasks, dtype, totals, tuple(r for r, h in enumerate(headers) if h.share == Share.MISSING.value)
    )


def _collective_device(process_group: dist.ProcessGroup | None) -> torch.device:
    backend = str(dist.get_backend(process_group))
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    accelerator = torch.accelerator.current_accelerator()  # NCCL and the like take device tensors
    assert accelerator is not None, f"the {backend} backend needs an accelerator"
    return torch.device(accelerator.type, torch.accelerator.current_device_index())


def agree(headers: list[Header]) -> tuple[int | None, str]:
    """The group's K and precision; raises :class:`RankMismatchError` where the ranks disagree.

    Every rank runs this on the same headers, so every rank raises alike.
    """
    counts = [h.batches for h in headers]

    def same(values: list[object], what: str, remedy: str, among: list[bool] | None = None) -> None:
        considered = [v for v, use in zip(values, among or [True] * len(values), strict=True) if use]
        if len(set(considered)) > 1:
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise RankMismatchError(
                f"the ranks disagree on {what} ({per_rank}): {remedy}. Nothing was changed on any rank.", counts
            )

    names = {Operation.STEP: "step()", Operation.CONSOLIDATE: "consolidate_state_dict()"}
    same(
        [names[Operation(h.operation)] for h in headers],
        "the collective they called",
        "step() and consolidate_state_dict() are collectives: call each on every rank, in the same order",
    )
    same(
        [f"K={h.num_tasks or None}" for h in headers],
        "the number of tasks",
        "every rank must record losses with the same K (pass num_tasks=K to the constructor on every rank)",
        [h.num_tasks > 0 for h in headers],
    )
    same(
        [f"names {h.tasks:#x}" if h.tasks else "no names" for h in headers],
        "the task names or their order (shown as a code of the names)",
        "create the history with the same tasks=(...) on every rank",
    )
    same([h.epochs for h in headers], "the number of closed epochs",
         "they resumed from different checkpoints, or a history was reset() on some ranks only")  # fmt: skip
    same([h.temperature or None for h in headers], "the temperature", "give DWA the same temperature on every rank")
    same([bool(h.allow_empty_ranks) for h in headers], "allow_empty_ranks", "create the histories alike on every rank")
    same([NAN_STRATEGIES[h.nan_strategy] for h in headers], "nan_strategy", "create the histories alike on every rank")
    same(
        [DTYPES[h.dtype - 1] for h in headers],
        "the precision of the recorded losses",
        "record losses of one dtype on every rank",
        [h.batches > 0 for h in headers],
    )
    _check_no_empty_rank(headers, counts)
    known = {h.num_tasks for h in headers if h.num_tasks}
    return (known.pop() if known else None), DTYPES[max(h.dtype for h in headers) - 1]


def _check_no_empty_rank(headers: list[Header], counts: list[int]) -> None:
    """Collectives pair by call order: a rank that calls step() once too often meets the others'
    end-of-epoch step() with nothing recorded."""
    empty = [r for r, h in enumerate(headers) if h.batches == 0 and h.share == Share.OWN.value]
    first = headers[0]
    if not empty or len(empty) == len(headers) or first.allow_empty_ranks or first.operation != Operation.STEP:
        return
    per_rank = ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
    raise RankMismatchError(
        f"step() found batches on some ranks and none on rank(s) {empty} (batches this epoch: {per_rank}). The "
        "likely cause is a rank that called step() once more than the others: collectives pair by call order, so "
        "its extra step() met the others' end-of-epoch step(). Call step() exactly once per epoch on every rank. If "
        "some ranks really can see no batch in an epoch, create the history with allow_empty_ranks=True on every "
        "rank. Nothing was changed on any rank.",
        counts,
    )


def partial_epoch_message(missing: Sequence[int]) -> str:
    return (
        f"the epoch resumed from a checkpoint lacks the batches that rank(s) {list(missing)} recorded before it "
        "was saved: the checkpoint held another rank's running epoch only (the 'rank 0 saves, every rank loads' "
        "recipe, or torch.distributed.checkpoint, without consolidate_state_dict()). This epoch's average is "
        "formed from the batches that were kept. To resume mid-epoch exactly, save every rank's state_dict(), or "
        "call consolidate_state_dict() on every rank before saving."
    )
