"""``DWAHistory``: per-batch loss accumulation on the device, epoch averages on the host."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ._history_core import (
    DTYPE_CODES,
    SLOT_SIZE,
    HistoryCore,
    Partial,
    check_batch_weight,
    payload_size,
)

__all__ = ["DWAHistory", "Losses"]

#: What ``record()`` and ``DWA`` accept as one batch of task losses.
Losses = Union[Tensor, Sequence[Tensor], Mapping[str, Tensor]]

_add_ = Tensor.add_  # bound once: the per-batch path is a few microseconds
_is_compiling = torch.compiler.is_compiling


def _mark_static(tensor: Tensor) -> None:
    """Let CUDA graphs (``torch.compile(mode="reduce-overhead")``) update ``tensor`` in place.

    What ``torch._dynamo.mark_static_address(tensor, guard=False)`` does, without
    importing torch._dynamo (two seconds) into programs that never compile;
    tests/test_compile.py checks that the two stay the same. The storage must
    then not change between calls, which is how the state is kept anyway.
    Skipped while compiling (the attribute cannot be set on a traced tensor).
    """
    if not _is_compiling():
        tensor._dynamo_static_input_type = "unguarded"  # type: ignore[attr-defined]


class DWAHistory(HistoryCore):
    r"""Epoch-average task losses for Dynamic Weight Average, fed to :class:`DWAWeights`.

    Call :meth:`record` every batch and :meth:`step` once per epoch, like a
    ``torch.optim.lr_scheduler``. :meth:`step` forms the epoch average

    .. math::
        L_k(t) = \frac{\sum_b w_b\, \ell_{b,k}}{\sum_b w_b}

    over the rows ``b`` recorded this epoch (``w_b = 1`` unless a ``weight`` is
    given) and rolls the history ``L(t-2) <- L(t-1) <- L(t)``. :meth:`inputs`
    returns the pair ``(L(t-1), L(t-2))`` for the kernel, or a pair that gives
    exactly uniform weights while fewer than two averages exist.

    **Sample weighting, one rule:** every row of K losses has one weight. A
    ``[K]`` batch is one row: ``weight`` may be a number or a 0-d tensor (e.g.
    ``weight=batch_size`` with batch-mean losses gives a sample-weighted
    average). ``[..., K]`` per-sample losses have one row per sample, each
    counting once without a weight (already sample-weighted); a ``weight`` for
    them is a tensor of exactly the batch shape ``losses.shape[:-1]``, and a
    single number is refused as ambiguous.

    The per-batch path never synchronises with the device and is
    ``torch.compile``-friendly: the running sums live in tensors that are
    updated in place (their storage never changes between batches or epochs,
    as CUDA graphs need), no Python number changes per batch, and nothing
    branches on data. Invalid per-row weights (negative, NaN) cannot raise
    there; they make the epoch's weight NaN and :meth:`step` raises. The state
    follows the device of the losses it records (or ``DWA.to(device)``); sums
    are kept in float32, or float64 for float64 losses (half-precision losses
    are summed in float32).

    Under ``torch.distributed`` (initialised, ``distributed=True``),
    :meth:`step` sums every rank's epoch over ``process_group`` in one
    all-reduce, so that every rank gets the same global average and weights;
    then every rank must call :meth:`step` together. The same all-reduce
    checks that the ranks agree on K, dtype and the number of closed epochs,
    and that no rank recorded nothing while others recorded batches (the sign
    of a rank stepping twice), raising :class:`RankMismatchError` on every
    rank otherwise. :meth:`state_dict` holds this rank's running epoch and
    needs no collective; :meth:`consolidate_state_dict` makes mid-epoch
    checkpoints that any rank can resume, on any number of processes.

    Args:
        num_tasks: K. Fixed by the first :meth:`record` when not given.
        tasks: task names (fixes K): :meth:`record` then also takes a mapping
            ``{name: loss}``, and the names are saved in and checked by checkpoints.
        distributed: all-reduce across processes in :meth:`step` when
            ``torch.distributed`` is initialised. ``False`` keeps each rank's history local.
        process_group: the group to reduce over (default: the world).
        allow_empty_ranks: accept an epoch in which some ranks recorded no batch
            (data that really is that uneven); by default that is an error.

    Example:
        >>> import torch
        >>> from dwa_export import DWAHistory, DWAWeights
        >>> history, kernel = DWAHistory(), DWAWeights()
        >>> for epoch_losses in ([1.0, 2.0], [0.5, 1.8], [0.4, 1.7]):
        ...     history.record(torch.tensor(epoch_losses))
        ...     history.step()
        >>> history.ready
        True
        >>> kernel(*history.inputs(), torch.tensor(2.0))  # rates 0.8 and 0.944...
        tensor([0.9639, 1.0361])
    """

    def __init__(
        self,
        num_tasks: int | None = None,
        *,
        tasks: Sequence[str] | None = None,
        distributed: bool = True,
        process_group: dist.ProcessGroup | None = None,
        allow_empty_ranks: bool = False,
    ) -> None:
        super().__init__(num_tasks, tasks)
        self.distributed = distributed
        self.process_group = process_group
        self.allow_empty_ranks = allow_empty_ranks
        # The running epoch: loss sums, and (weight, batches) in float64. The
        # tensors exist from construction on, so that a compiled caller only
        # updates them in place; ``_sums`` is a view of the first K entries of
        # ``_buffer`` once K is known (64 entries are kept while it is not).
        self._buffer = self._stats = self._unit = self._bases = torch.empty(0)
        self._host_counter: Any = None
        self._sums: Tensor | None = None
        self._consolidated: Partial | None = None
        self._replace(self._num_tasks or payload_size(None), torch.float32, torch.device("cpu"), keep=False)
        if self._num_tasks is not None:
            self._bind(self._num_tasks)

    # ------------------------------------------------------------------ per batch
    def record(self, losses: Losses, weight: float | Tensor | None = None) -> None:
        """Add one batch of per-task losses to this epoch's running sums.

        Args:
            losses: a ``[..., K]`` tensor (leading dims are samples, see the
                class docstring), a 0-d tensor (K = 1), a list/tuple of K 0-d
                tensors, or, with ``tasks``, a mapping ``{name: 0-d tensor}``.
                Detached; the sums stay on their device.
            weight: ``None`` (every row counts once), a number ``>= 0`` or 0-d
                tensor for ``[K]`` losses, or a tensor of the batch shape with
                one weight per row. Tensor weights are checked in :meth:`step`.

        Never synchronises with the device. Raises (changing nothing) for
        losses or weights of the wrong kind, shape, dtype or device.
        """
        if weight is None and not _is_compiling() and self._record_fast(losses):
            return
        self._record(self.as_losses(losses), weight)

    def _record_fast(self, losses: Losses) -> bool:
        """Record an unweighted ``[K]`` batch of the sums' dtype and device; False if it is not one.

        The hot path, shared with ``DWA.forward``: one in-place add, and on the
        CPU one count through a memoryview of the stats tensor. ``.data``
        reads the values without autograd, at half the cost of ``.detach()``.
        """
        sums = self._sums
        try:
            if losses.shape == sums.shape and losses.dtype is sums.dtype:  # type: ignore[union-attr]
                _add_(sums, losses.data)  # type: ignore[arg-type, union-attr]
                counter = self._host_counter
                if counter is None:
                    _add_(self._stats, self._unit)
                else:  # the same float64 element, without a dispatcher call
                    counter[2] += 1.0
                return True
        except (AttributeError, RuntimeError):  # not a tensor, no K yet, or on another device
            pass
        return False

    def as_losses(self, losses: Losses) -> Tensor:
        """``losses`` as one ``[..., K]`` tensor (stacking a list, tuple or named mapping); changes nothing."""
        if isinstance(losses, Tensor):
            return losses.view(1) if losses.dim() == 0 else losses
        if isinstance(losses, Mapping):
            losses = self._names_to_order(losses)
        if isinstance(losses, (list, tuple)) and losses and all(
            isinstance(loss, Tensor) and loss.dim() == 0 for loss in losses
        ):
            return torch.stack(losses)
        raise TypeError(
            "losses must be a tensor of shape [..., K], a list/tuple of K 0-d tensors or, with task "
            f"names, a mapping {{name: 0-d tensor}}; got {_describe(losses)}"
        )

    def _record(self, losses: Tensor, weight: float | Tensor | None) -> None:
        if losses.dim() == 0 or losses.shape[-1] == 0 or not losses.is_floating_point():
            raise ValueError(
                f"losses must be a floating-point tensor of shape [..., K] with K >= 1, got shape "
                f"{list(losses.shape)} and dtype {losses.dtype}; stack the task losses, "
                "e.g. torch.stack([loss_a, loss_b])"
            )
        num_tasks = losses.shape[-1]
        batched = losses.dim() > 1
        if isinstance(weight, Tensor):  # checked before anything changes
            weight = _check_weight(weight, losses)
        elif weight is not None and not _is_compiling():
            weight = check_batch_weight(weight, batched)
        elif weight is not None:
            # A number is symbolic while compiling: its value cannot be checked
            # here, so an invalid one poisons the epoch's weight below.
            check_batch_weight(1.0, batched)
        self._check_num_tasks(num_tasks)
        self._follow(losses, num_tasks)
        if self._num_tasks is None:
            self._num_tasks = num_tasks  # fixed by the first batch; validated above
        sums, stats, bases = self._sums, self._stats, self._bases
        assert sums is not None and stats is not None and bases is not None
        losses = losses.detach()
        rows = losses.reshape(-1, num_tasks) if batched else losses

        if weight is None and not batched:
            _add_(sums, rows)
            _add_(stats, self._unit)
        elif weight is None:
            _add_(sums, rows.sum(0, dtype=sums.dtype))
            _add_(stats, bases[1] + bases[0] * rows.shape[0])  # weight += rows, batches += 1
        elif isinstance(weight, Tensor):
            # A negative or NaN per-row weight cannot raise here without a host
            # sync: it turns the epoch's weight into NaN, which step() reports.
            checked = torch.where(weight >= 0, weight, torch.nan).to(sums.dtype)
            weighted = rows.to(sums.dtype) * checked.reshape(-1, 1) if batched else rows.to(sums.dtype) * checked
            _add_(sums, weighted.sum(0) if batched else weighted)
            # where(), not bases[0] * total: 0 * NaN would poison the batch count too.
            _add_(stats, bases[1] + torch.where(bases[0] > 0, checked.sum(dtype=stats.dtype), 0.0))
        else:
            # The product in the accumulator dtype, not alpha=weight: it is then
            # rounded as in the NumPy and C++ histories (alpha= may fuse it), and
            # the compiler does not specialise on the number (one graph per batch size).
            _add_(sums, rows.to(sums.dtype) * weight)
            increment = bases[0] * weight
            if _is_compiling():  # symbolic there, so unchecked: an invalid one poisons the weight
                increment = torch.where(increment >= 0, increment, torch.nan)
            _add_(stats, bases[1] + increment)

    def _replace(self, capacity: int, dtype: torch.dtype, device: torch.device, keep: bool = True) -> None:
        """New state tensors (copying the running epoch when ``keep``), then rebind ``_sums``."""
        old_sums, old_stats = self._sums, self._stats
        stats_dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self._buffer = torch.zeros(capacity, dtype=dtype, device=device)
        # (weight of the other batches, their count, count of unweighted [K] batches):
        # the commonest batch then updates one element.
        self._stats = torch.zeros(3, dtype=stats_dtype, device=device)
        self._unit = torch.tensor([0.0, 0.0, 1.0], dtype=stats_dtype, device=device)
        self._bases = torch.eye(2, 3, dtype=stats_dtype, device=device)  # (weight, count) increments
        # On the CPU the eager hot path counts through a view of the same memory,
        # at a twentieth of the cost of a tensor op.
        # (Not while compiling, where the compiled path counts with tensor ops.)
        self._host_counter = memoryview(self._stats.numpy()) if device.type == "cpu" and not _is_compiling() else None
        for tensor in (self._buffer, self._stats, self._unit, self._bases):
            _mark_static(tensor)
        self._sums = None
        if old_sums is not None:
            self._bind(old_sums.shape[0])
            if keep:
                self._sums.copy_(old_sums)  # type: ignore[union-attr]  # float32 -> float64 is exact
                self._stats.copy_(old_stats)

    def _totals(self) -> Tensor:
        """(batches, weight) of the running epoch, on the device."""
        other_weight, other_batches, plain_batches = self._stats.unbind()
        return torch.stack((other_batches + plain_batches, other_weight + plain_batches))

    def _bind(self, num_tasks: int) -> None:
        """Point ``_sums`` at the first K entries of the buffer (a view: no new storage)."""
        if num_tasks > self._buffer.shape[0]:
            self._replace(num_tasks, self._buffer.dtype, self._buffer.device, keep=False)
        self._sums = self._buffer if num_tasks == self._buffer.shape[0] else self._buffer[:num_tasks]

    def _follow(self, losses: Tensor, num_tasks: int) -> None:
        """Bind the sums to K, move them to the losses' device and widen them to their precision.

        Decided on metadata only (device, dtype), so the compiler resolves it
        while tracing. Only binding happens in the usual compiled loop, and it
        creates a view of existing storage: a compiled train step can then
        also run backward() in the same graph.
        """
        if self._buffer.device != losses.device:
            self.to(losses.device)
        dtype = torch.promote_types(losses.dtype, torch.float32)
        if self._buffer.dtype != dtype and torch.promote_types(self._buffer.dtype, dtype) == dtype:
            self._replace(self._buffer.shape[0], dtype, self._buffer.device)
        if self._sums is None:
            self._bind(num_tasks)

    def to(self, device: torch.device | str) -> DWAHistory:
        """Move the running sums to ``device`` (their dtype never changes); returns ``self``.

        ``DWA.to(...)``/``.cuda()`` call this. The history also follows the
        device of the losses it records.
        """
        device = torch.device(device)
        if self._buffer.device != device:
            buffer = self._buffer
            self._replace(buffer.shape[0], buffer.dtype, device)
            self._buffer.copy_(buffer)
        return self

    @property
    def device(self) -> torch.device:
        """Where the running sums live."""
        return self._buffer.device

    # ------------------------------------------------------------------ per epoch
    def inputs(self) -> tuple[Tensor, Tensor]:
        """``(loss_t1, loss_t2)`` for :class:`DWAWeights`: the averages of epochs t-1 and t-2.

        All ones (exactly uniform weights) during warm-up. On the device and in
        the accumulation dtype (float32, or float64 for float64 losses) of the
        recorded losses. Call it once per epoch, after :meth:`step`.
        """
        loss_t1, loss_t2 = self._host_inputs()
        dtype, device = self._buffer.dtype, self._buffer.device
        pair = torch.tensor([loss_t1, loss_t2], dtype=torch.float64).to(dtype=dtype, device=device)
        return pair[0], pair[1]

    def _process(self) -> tuple[int, int]:
        if self.distributed and dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        return 0, 1

    def _epoch_packet(self) -> list[float] | None:
        """Every rank's slot and the summed loss sums, in one all-reduce (the epoch's one host sync)."""
        rank, world_size = self._process()
        if world_size == 1 and self._sums is None:
            return None
        device = self._collective_device()
        dtype = torch.float32 if device.type == "mps" else torch.float64
        slots = torch.zeros(world_size, SLOT_SIZE, dtype=dtype, device=device)
        payload = torch.zeros(payload_size(self._num_tasks), dtype=dtype, device=device)
        accumulator = None if self._sums is None else str(self._sums.dtype).removeprefix("torch.")
        slots[rank] = torch.tensor(self._slot(0.0, 0.0, accumulator), dtype=dtype).to(device)
        if self._sums is not None:
            slots[rank, 3:5] = self._totals().to(device=device, dtype=dtype)
            payload[: self._sums.shape[0]] = self._sums.to(device=device, dtype=dtype)
        packet = torch.cat((slots.view(-1), payload))
        if world_size > 1:
            dist.all_reduce(packet, op=dist.ReduceOp.SUM, group=self.process_group)
        return packet.tolist()

    def _collective_device(self) -> torch.device:
        if self._process()[1] > 1 and dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return self._buffer.device

    def consolidate_state_dict(self) -> None:
        """Gather every rank's running epoch so that any rank's :meth:`state_dict` resumes exactly.

        A collective (one all-reduce): call it on every rank, right before
        saving a mid-epoch checkpoint, like
        ``ZeroRedundancyOptimizer.consolidate_state_dict``. Afterwards (until
        the next :meth:`record` on this rank) :meth:`state_dict` holds the whole
        group's running epoch, so the file of rank 0 alone, or a
        ``torch.distributed.checkpoint`` (which keeps one copy of such values),
        resumes exactly on any number of processes. Training continues
        unchanged: rank 0 keeps the group's sums, the others restart theirs.
        A no-op without ``torch.distributed``.
        """
        rank, world_size = self._process()
        if world_size == 1:
            return
        reduced = self._reduce(mid_epoch=True)  # checks K, dtype and epochs agree
        self._consolidated = None
        if reduced is None:
            return
        num_tasks, slots, batches, weight, sums = reduced
        if batches == 0:
            return
        dtypes = {code: name for name, code in DTYPE_CODES.items()}
        dtype = dtypes[next(slot[1] for slot in slots if slot[3] > 0)]
        if self._sums is None:
            self._check_num_tasks(num_tasks)
            self._num_tasks = num_tasks
        # Rounded to the accumulator's precision, as one more add would be.
        sums = tuple(torch.tensor(sums, dtype=torch.float64).to(getattr(torch, dtype)).tolist())
        partial = Partial(None, world_size, dtype, batches, weight, sums)
        self._set_partial(partial if rank == 0 else None)
        self._consolidated = partial

    def _partial_for_state(self) -> Partial | None:
        consolidated = self._consolidated
        if consolidated is not None:
            rank, _ = self._process()
            local = self._local_partial()
            expected = (consolidated.batches, consolidated.weight) if rank == 0 else None
            if (None if local is None else (local[1], local[2])) == expected:
                return consolidated  # nothing recorded here since consolidate_state_dict()
        return super()._partial_for_state()

    def _local_partial(self) -> tuple[str, int, float, Sequence[float]] | None:
        if self._sums is None:
            return None
        batches, weight = self._totals().tolist()
        if batches == 0:
            return None
        return str(self._sums.dtype).removeprefix("torch."), int(batches), weight, self._sums.tolist()

    def _set_partial(self, partial: Partial | None) -> None:
        self._consolidated = None
        self._buffer.zero_()
        self._stats.zero_()
        if partial is None:
            return
        dtype = getattr(torch, partial.dtype)
        if self._buffer.dtype != dtype:
            self._replace(self._buffer.shape[0], dtype, self._buffer.device, keep=False)
        self._sums = None
        self._bind(len(partial.sums))
        assert self._sums is not None
        self._sums.copy_(torch.tensor(partial.sums, dtype=dtype))
        self._stats.copy_(torch.tensor([partial.weight, float(partial.batches), 0.0], dtype=self._stats.dtype))

    def reset(self) -> None:
        super().reset()
        if self._fixed_num_tasks is None:
            self._sums = None  # K may change after a reset

    def _clear_epoch(self) -> None:
        super()._clear_epoch()
        self._consolidated = None
        self._buffer.zero_()
        self._stats.zero_()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._num_tasks is None:
            self._sums = None
        elif self._sums is None or self._sums.shape[0] != self._num_tasks:
            self._sums = None
            self._bind(self._num_tasks)

    def __repr__(self) -> str:
        tasks = "" if self._tasks is None else f", tasks={list(self._tasks)}"
        return (
            f"{type(self).__name__}(num_tasks={self._num_tasks}{tasks}, epochs_stored={len(self._averages)}, "
            f"device={self.device}, distributed={self.distributed})"
        )


def _describe(value: object) -> str:
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_describe(v) for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"{type(value).__name__} [{inner}]"
    if isinstance(value, Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return type(value).__name__


def _check_weight(weight: Tensor, losses: Tensor) -> Tensor:
    """A detached tensor weight with exactly one weight per row of ``losses``."""
    batch_shape = losses.shape[:-1]
    if weight.device != losses.device:
        raise ValueError(f"weight is on {weight.device} but losses are on {losses.device}; move it")
    if not (weight.is_floating_point() or weight.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8)):
        raise TypeError(f"weight must be a real tensor, got dtype {weight.dtype}")
    if weight.shape != batch_shape:
        raise ValueError(
            f"weight of shape {list(weight.shape)} must have the batch shape {list(batch_shape)} of "
            f"losses {list(losses.shape)}: one weight per row of K losses"
            + ("" if batch_shape else " (a 0-d tensor for [K] losses)")
        )
    return weight.detach()
