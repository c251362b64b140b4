"""``DWAHistory``: per-batch loss sums on the device, epoch averages on the host."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._distributed import GroupEpoch, GroupSync, LocalEpoch, Operation, PartialEpochWarning, partial_epoch_message
from ._epochs import EpochHistory, check_batch_weight, check_temperature
from ._running import RunningSums
from ._state import HistoryState
from ._tensors import accumulator_dtype

__all__ = ["DWAHistory", "Losses"]

#: What ``record()`` and ``DWA`` accept as one batch of task losses.
Losses = Tensor | Sequence[Tensor] | Mapping[str, Tensor]


class DWAHistory:
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

    The per-batch path never synchronises with the device and compiles into the
    caller's graph: the running sums are float64 tensors (float32 on MPS, which
    has no float64) updated in place, at fixed addresses once K is known, as
    CUDA graphs need. Invalid per-row weights (negative, NaN) cannot raise there;
    they make the epoch's weight NaN and :meth:`step` raises.

    **NaN and infinite losses** (e.g. a batch that overflowed under mixed
    precision, which ``GradScaler`` skips): with ``nan_strategy="error"`` (the
    default) :meth:`step` raises :class:`LossHistoryError`; with ``"warn"`` or
    ``"ignore"`` each row of K losses holding one is left out of the epoch (all
    its tasks, its weight too), found on the device without a sync, and
    :meth:`step` says how many (``"warn"``: a :class:`NonFiniteLossWarning`). A
    row of weight 0 is left out under every strategy, whatever its losses: a mask.

    The state follows
    the device of the losses it records (or :meth:`to`). :meth:`inputs` are
    float32, or float64 once float64 losses were recorded.

    Under ``torch.distributed`` (initialised, ``distributed=True``), :meth:`step`
    sums every rank's epoch over ``process_group``, so that every rank gets the
    same averages; every rank must then call it together. It first checks that
    the ranks agree (K, task names, precision, closed epochs, temperature,
    ``allow_empty_ranks``, and that none recorded nothing while others recorded
    batches, the sign of a rank stepping twice), raising
    :class:`RankMismatchError` on every rank otherwise. :meth:`state_dict` holds
    this rank's running epoch and needs no collective; :meth:`consolidate_state_dict`
    makes mid-epoch checkpoints that any rank can resume, on any number of processes.

    Args:
        num_tasks: K. Fixed by the first :meth:`record` when not given.
        tasks: task names (fixes K): :meth:`record` then also takes a mapping
            ``{name: loss}``, and the names are saved in and checked by checkpoints.
        distributed: sum over the processes in :meth:`step` when
            ``torch.distributed`` is initialised. ``False`` keeps each rank's history local.
        process_group: the group to sum over (default: the world).
        allow_empty_ranks: accept an epoch in which some ranks recorded no batch
            (data that really is that uneven); by default that is an error.
        nan_strategy: ``"error"``, ``"warn"`` or ``"ignore"``: what a NaN or
            infinite loss does (see above); the names are torchmetrics'.

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
        nan_strategy: str = "error",
    ) -> None:
        self._epochs = EpochHistory(num_tasks, tasks, nan_strategy)
        self._running = RunningSums(self._epochs.num_tasks, skip_nonfinite=nan_strategy != "error")
        self._sync = GroupSync(distributed, process_group, allow_empty_ranks)
        self._dtype = torch.float32  # of inputs(); float64 once float64 losses were recorded

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
    def device(self) -> torch.device:
        """Where the running sums live."""
        return self._running.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of :meth:`inputs`: float32, or float64 once float64 losses were recorded."""
        return self._dtype

    @property
    def distributed(self) -> bool:
        """Whether :meth:`step` sums over the process group (when ``torch.distributed`` is initialised)."""
        return self._sync.distributed

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The group :meth:`step` sums over (``None``: the world)."""
        return self._sync.process_group

    @property
    def allow_empty_ranks(self) -> bool:
        """Whether ranks may record no batch in an epoch."""
        return self._sync.allow_empty_ranks

    @property
    def nan_strategy(self) -> str:
        """What a NaN or infinite loss does: ``"error"``, ``"warn"`` or ``"ignore"``."""
        return self._epochs.nan_strategy

    @property
    def log(self) -> list[dict[str, Any]]:
        """One JSON-friendly dict per successful :meth:`step`.

        ``epoch``, ``averages``, ``batches`` (``record()`` calls, of all ranks under
        ``torch.distributed``), ``weight`` (the weight sum of the rows kept),
        ``temperature`` and ``weights`` (``None`` unless :meth:`log_weights` was
        called, as ``DWA`` does), and ``nonfinite_rows`` (the rows left out for a
        NaN or infinite loss). Saved in :meth:`state_dict`; :meth:`reset` clears it.
        """
        return self._epochs.entries()

    # ------------------------------------------------------------------ per batch
    def as_losses(self, losses: Losses) -> Tensor:
        """``losses`` as one checked ``[..., K]`` tensor (stacking a list, tuple or mapping); changes nothing.

        Raises ``TypeError``/``ValueError`` for the losses :meth:`record` refuses
        for their form, dtype or K.
        """
        tasks = self._epochs.num_tasks
        if isinstance(losses, Tensor) and losses.dim() and losses.shape[-1] == tasks and losses.is_floating_point():
            return losses  # the per-batch case, checked first
        if isinstance(losses, Tensor):
            tensor = losses if losses.dim() else losses.reshape(1)
        else:
            if isinstance(losses, Mapping):
                losses = self._epochs.in_task_order(losses)
            if not (
                isinstance(losses, (list, tuple))
                and losses
                and all(isinstance(loss, Tensor) and loss.dim() == 0 for loss in losses)
            ):
                raise TypeError(
                    "losses must be a tensor of shape [..., K], a list/tuple of K 0-d tensors or, with task "
                    f"names, a mapping {{name: 0-d tensor}}; got {_describe(losses)}"
                )
            tensor = torch.stack(losses)
        if not tensor.is_floating_point() or tensor.shape[-1] == 0:
            raise ValueError(
                f"losses must be a floating-point tensor of shape [..., K] with K >= 1, got shape "
                f"{list(tensor.shape)} and dtype {tensor.dtype}; stack the task losses, "
                "e.g. torch.stack([loss_a, loss_b])"
            )
        self._epochs.check_num_tasks(tensor.shape[-1])
        return tensor

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
        rows = self.as_losses(losses).detach()
        if isinstance(weight, Tensor):
            weight = _checked_weight(weight, rows)
        elif weight is not None:  # symbolic while compiling: then checked on the device
            check_batch_weight(1.0 if torch.compiler.is_compiling() else weight, batched=rows.dim() > 1)
        # Everything is checked; what follows is decided on metadata, which the
        # compiler resolves while tracing: in the usual compiled loop, nothing.
        if rows.device != self._running.device:
            self.to(rows.device)
        if self._running.sums is None:  # the first batch fixes K (or takes the one step() learned)
            self._epochs.num_tasks = rows.shape[-1]
            self._running.resize(rows.shape[-1])
        if rows.dtype == torch.float64 and self._dtype != torch.float64:
            self._dtype = torch.float64
        self._running.add(rows, weight)

    def to(self, device: torch.device | str) -> DWAHistory:
        """Move the running sums to ``device``; returns ``self``. From the ``meta`` device, they start at zero.

        ``DWA.to(...)`` and ``.cuda()`` call this; the history also follows the
        device of the losses it records.
        """
        device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0"
        if device != self.device:
            self._running.to(device)
        return self

    # ------------------------------------------------------------------ per epoch
    def step(self, temperature: float | None = None) -> None:
        """Close the epoch: average what was recorded and roll the history.

        ``L(t-2) <- L(t-1) <- this epoch's average``, and one entry is added to
        :attr:`log`. A no-op when nothing was recorded (on any rank); only
        zero-weight rows are dropped without an entry. Raises
        :class:`LossHistoryError`, changing nothing, when the average is
        non-finite, zero or changed sign, the weights are invalid, or every row
        was left out for a NaN or infinity; warns (:class:`NonFiniteLossWarning`)
        under ``nan_strategy="warn"`` when rows were left out; under
        ``torch.distributed``, :class:`RankMismatchError` on every rank when the
        ranks disagree, and :class:`PartialEpochWarning` when a resumed epoch
        lacks some ranks' earlier batches.

        Args:
            temperature: the temperature the next weights are computed with
                (``DWA`` passes its own): saved in the log entry and, under
                ``torch.distributed``, checked to be the same on every rank.
        """
        temperature = None if temperature is None else check_temperature(temperature)
        epoch = self._sync.epoch(Operation.STEP, self._local(), temperature)
        if epoch.totals.batches == 0:
            return
        self._epochs.close(
            epoch.totals,
            temperature,
            largest_loss=torch.finfo(getattr(torch, epoch.dtype)).max,
            largest_sum=torch.finfo(accumulator_dtype(self.device)).max,
        )
        self._adopt(epoch)
        if epoch.missing:
            warnings.warn(partial_epoch_message(epoch.missing), PartialEpochWarning, stacklevel=2)
        self.discard_epoch()

    def log_weights(self, temperature: float, weights: Sequence[float] | Tensor) -> None:
        """Store the temperature and the weights computed from the last :meth:`step` in its log entry.

        ``DWA`` calls it after each step; with a kernel of your own, call it
        too, so that the log (and ``dwa-export plot``) shows the weights.
        """
        self._epochs.log_weights(temperature, weights.tolist() if isinstance(weights, Tensor) else weights)

    def inputs(self, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """``(loss_t1, loss_t2)`` for :class:`DWAWeights`: the averages of epochs t-1 and t-2.

        All ones (exactly uniform weights) during the warm-up; in :attr:`dtype`, on
        ``device`` (default: the history's). Call it once per epoch, after :meth:`step`.
        """
        pair = torch.tensor(self._epochs.inputs(), dtype=torch.float64, device="cpu").to(self._dtype)
        loss_t1, loss_t2 = pair.to(self.device if device is None else device).unbind()
        return loss_t1, loss_t2

    def discard_epoch(self) -> None:
        """Drop the batches recorded since the last :meth:`step`; the history stays."""
        self._running.clear()
        self._sync.clear()

    def reset(self) -> None:
        """Forget the history, the log, this epoch's batches and a K learned from data.

        A K (or task names) given to the constructor is kept.
        """
        self._epochs.reset()
        self._running.resize(self._epochs.num_tasks)  # K may change after a reset
        self.discard_epoch()

    def consolidate_state_dict(self) -> None:
        """Gather every rank's running epoch so that any rank's :meth:`state_dict` resumes exactly.

        A collective: call it on every rank, right before saving a mid-epoch
        checkpoint, like ``ZeroRedundancyOptimizer.consolidate_state_dict``.
        Until this rank records again, :meth:`state_dict` then holds the whole
        group's running epoch, so the file of rank 0 alone, or a
        ``torch.distributed.checkpoint``, resumes exactly on any number of
        processes. Training is not changed. A no-op without ``torch.distributed``.
        """
        epoch = self._sync.consolidate(self._local())
        if epoch is not None:
            self._adopt(epoch)

    def _local(self) -> LocalEpoch:
        dtype = str(self._dtype)[6:]  # "torch.float32" -> "float32"
        return LocalEpoch(self.num_tasks, self.tasks, dtype, self.epochs, self.nan_strategy, self._running.read())

    def _adopt(self, epoch: GroupEpoch) -> None:
        """Take the group's K and precision (a rank that recorded nothing may not know them)."""
        if self._epochs.num_tasks is None:
            self._epochs.num_tasks = epoch.num_tasks
        self._dtype = getattr(torch, epoch.dtype)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The whole state, mid-epoch included, as a JSON-serialisable dict (format: ``dwa_export._state``).

        No collective: safe in ``if rank == 0: torch.save(...)``. Under
        ``torch.distributed`` the running epoch is this rank's part only; see
        :meth:`consolidate_state_dict` for checkpoints that any rank can resume.
        """
        partial = self._sync.partial(self._running.read())
        epochs = self._epochs
        dtype = str(self._dtype)[6:]  # "torch.float32" -> "float32"
        return HistoryState(
            epochs.num_tasks, epochs.tasks, dtype, epochs.averages, partial, tuple(epochs.log)
        ).to_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (format version 2, 3 or 4).

        Raises ``ValueError`` naming the field, the value and what was expected,
        changing nothing, if the state is malformed or does not fit this history
        (another K or task names than the constructor's). The running epoch is
        taken by the rank it belongs to (see :meth:`consolidate_state_dict`).
        """
        state = HistoryState.from_dict(state_dict)
        self._epochs.check_fits(state)
        partial, share = self._sync.resolve(state.partial)
        # Validated in full: the assignments below cannot fail half-way.
        self._epochs.restore(state)
        self._dtype = getattr(torch, state.dtype)
        self._running.load(state.num_tasks, None if partial is None else partial.totals)
        self._sync.clear(share)

    def __repr__(self) -> str:
        tasks = "" if self.tasks is None else f", tasks={list(self.tasks)}"
        return (
            f"{type(self).__name__}(num_tasks={self.num_tasks}{tasks}, epochs_stored={len(self.averages)}, "
            f"device={self.device}, distributed={self.distributed}, nan_strategy={self.nan_strategy!r})"
        )


def _describe(value: object) -> str:
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_describe(v) for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"{type(value).__name__} [{inner}]"
    if isinstance(value, Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return type(value).__name__


def _checked_weight(weight: Tensor, losses: Tensor) -> Tensor:
    """A detached tensor weight with exactly one weight per row of ``losses``."""
    batch_shape = losses.shape[:-1]
    if weight.device != losses.device:
        raise ValueError(f"weight is on {weight.device} but losses are on {losses.device}; move it")
    if weight.is_complex() or weight.dtype == torch.bool:
        raise TypeError(f"weight must be a real tensor, got dtype {weight.dtype}")
    if weight.shape != batch_shape:
        raise ValueError(
            f"weight of shape {list(weight.shape)} must have the batch shape {list(batch_shape)} of "
            f"losses {list(losses.shape)}: one weight per row of K losses"
            + ("" if batch_shape else " (a 0-d tensor for [K] losses)")
        )
    return weight.detach()
