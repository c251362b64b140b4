"""``DWAHistory``: per-batch loss accumulation on the device, epoch averages on the host."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ._history_core import HistoryCore, check_batch_weight

__all__ = ["DWAHistory"]


class DWAHistory(HistoryCore):
    r"""Epoch-average task losses for Dynamic Weight Average, fed to :class:`DWAWeights`.

    Call :meth:`record` every batch and :meth:`step` once per epoch, like a
    ``torch.optim.lr_scheduler``. :meth:`step` forms the epoch average

    .. math::
        L_k(t) = \frac{\sum_b w_b\, \ell_{b,k}}{\sum_b w_b}

    (``w_b = 1`` unless a ``weight`` such as the batch size is given) and rolls
    the history ``L(t-2) <- L(t-1) <- L(t)``. :meth:`inputs` returns the pair
    ``(L(t-1), L(t-2))`` for the kernel, or a pair that gives exactly uniform
    weights while fewer than two averages exist.

    The per-batch path never synchronises with the device: the running sum stays
    on the losses' device and is read once per epoch, in :meth:`step`. The
    history follows the device of the losses it records (a checkpoint loaded on
    the CPU moves to the GPU with the first recorded batch).

    When ``torch.distributed`` is initialised, :meth:`step` all-reduces the sums
    and weights (one collective per epoch) so that every rank gets the same
    global average; then every rank must call :meth:`step` together, and a rank
    that may record no batch needs ``num_tasks``.

    Args:
        num_tasks: K. Fixed by the first :meth:`record` when not given.
        distributed: all-reduce across processes in :meth:`step` when
            ``torch.distributed`` is initialised. ``False`` keeps each rank's history local.
        process_group: the group to reduce over (default: the world).

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
        distributed: bool = True,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(num_tasks)
        self.distributed = distributed
        self.process_group = process_group
        self._sum: Tensor | None = None
        self._weight = 0.0  # weights given as Python numbers: no device work at all
        self._tensor_weight: Tensor | None = None  # weights given as tensors: stay on device
        self._dtype: torch.dtype | None = None  # the (floating) dtype of the last recorded losses

    # ------------------------------------------------------------------ per batch
    def record(self, losses: Tensor, weight: float | Tensor | None = None) -> None:
        """Add one batch of per-task losses to this epoch's running sum.

        Args:
            losses: shape ``[..., K]``; leading dims are more samples (each row
                counts as one batch of weight ``weight``). Detached; the sum stays
                on their device.
            weight: ``None`` (every row counts once), a number ``>= 0`` such as the
                batch size, or a tensor broadcastable to ``losses.shape[:-1]``
                (e.g. per-sample weights). Tensor weights are checked in :meth:`step`.

        Never synchronises with the device.
        """
        total = self._sum
        if weight is None and total is not None:
            # The hot path: one [K] batch like the last one. ``.data`` reads the
            # values without autograd, at half the cost of ``.detach()``.
            try:
                if losses.dtype is self._dtype and losses.shape == total.shape:
                    total.add_(losses.data)
                    self._weight += 1
                    return
            except (AttributeError, RuntimeError):  # not a tensor, or on another device
                pass
        self._record(losses, weight)

    def _record(self, losses: Tensor, weight: float | Tensor | None) -> None:
        if not isinstance(losses, Tensor):
            raise TypeError(f"losses must be a tensor of shape [..., K], got {type(losses).__name__}")
        if losses.dim() == 0 or losses.shape[-1] == 0 or not losses.is_floating_point():
            raise ValueError(
                f"losses must be a floating-point tensor of shape [..., K] with K >= 1, got shape "
                f"{list(losses.shape)} and dtype {losses.dtype}; stack the task losses, "
                "e.g. torch.stack([loss_a, loss_b])"
            )
        if weight is not None:  # checked before anything changes
            weight = self._check_weight(weight, losses)
        num_tasks = losses.shape[-1]
        self._check_num_tasks(num_tasks)
        losses = losses.detach()
        if self._sum is None or self._sum.device != losses.device:
            self._follow(losses)
        total = self._sum
        assert total is not None
        self._dtype = losses.dtype

        if isinstance(weight, Tensor):
            weighted = losses * weight.to(total.dtype).unsqueeze(-1)
            total.add_(weighted if weighted.dim() == 1 else weighted.reshape(-1, num_tasks).sum(0))
            if self._tensor_weight is None:
                self._tensor_weight = torch.zeros((), dtype=total.dtype, device=total.device)
            self._tensor_weight.add_(weight.sum(dtype=total.dtype))
            return
        rows = losses.numel() // num_tasks
        row_sum = losses if losses.dim() == 1 else losses.reshape(-1, num_tasks).sum(0, dtype=total.dtype)
        if weight is None:
            total.add_(row_sum)  # the common case: one in-place add, no allocation
            self._weight += rows
        else:
            total.add_(row_sum, alpha=weight)
            self._weight += weight * rows

    @staticmethod
    def _check_weight(weight: float | Tensor, losses: Tensor) -> float | Tensor:
        """A number, or a detached tensor expanded to the batch shape of ``losses``."""
        if not isinstance(weight, Tensor):
            return check_batch_weight(weight)
        batch_shape = losses.shape[:-1]
        if weight.device != losses.device:
            raise ValueError(f"weight is on {weight.device} but losses are on {losses.device}; move it")
        try:
            broadcast = torch.broadcast_shapes(weight.shape, batch_shape)
        except RuntimeError:
            broadcast = None
        if broadcast != batch_shape:
            raise ValueError(
                f"weight of shape {list(weight.shape)} does not broadcast to the batch shape "
                f"{list(batch_shape)} of losses {list(losses.shape)} (one weight per row of K losses)"
            )
        return weight.detach().expand(batch_shape)

    def _follow(self, losses: Tensor) -> None:
        """Allocate the accumulator, or move the state to the losses' device."""
        if self._sum is None:
            dtype = torch.promote_types(losses.dtype, torch.float32)
            self._sum = torch.zeros(losses.shape[-1], dtype=dtype, device=losses.device)
        else:
            self._sum = self._sum.to(losses.device)
            if self._tensor_weight is not None:
                self._tensor_weight = self._tensor_weight.to(losses.device)

    # ------------------------------------------------------------------ per epoch
    def inputs(self) -> tuple[Tensor, Tensor]:
        """``(loss_t1, loss_t2)`` for :class:`DWAWeights`: the averages of epochs t-1 and t-2.

        All ones (exactly uniform weights) during warm-up. On the device and in
        the accumulation dtype (float32, or float64 for float64 losses) of the
        recorded losses. Call it once per epoch, after :meth:`step`.
        """
        loss_t1, loss_t2 = self._host_inputs()
        if self._sum is None:
            dtype, device = torch.float32, torch.device("cpu")
        else:
            dtype, device = self._sum.dtype, self._sum.device
        pair = torch.tensor([loss_t1, loss_t2], dtype=torch.float64).to(dtype=dtype, device=device)
        return pair[0], pair[1]

    def _epoch_totals(self) -> tuple[Sequence[float], float] | None:
        if self._num_tasks is None:
            return None
        distributed = self._distributed_active()
        if self._sum is None and not distributed:
            return None
        if self._sum is None:  # nothing recorded on this rank, but it must join the collective
            packed = torch.zeros(self._num_tasks + 2, dtype=torch.float64)
        else:
            # float64 keeps batch counts above 2**24 exact; MPS has no float64.
            dtype = torch.float32 if self._sum.device.type == "mps" else torch.float64
            tensor_weight = self._sum.new_zeros(1) if self._tensor_weight is None else self._tensor_weight.view(1)
            python_weight = torch.tensor([self._weight], dtype=dtype, device=self._sum.device)
            packed = torch.cat((self._sum.to(dtype), tensor_weight.to(dtype), python_weight))
        if distributed:
            packed = self._all_reduce(packed)
        host = packed.tolist()  # the one host-device synchronisation of the epoch
        return host[:-2], host[-2] + host[-1]

    def _distributed_active(self) -> bool:
        return self.distributed and dist.is_available() and dist.is_initialized()

    def _all_reduce(self, packed: Tensor) -> Tensor:
        """Sum ``packed`` over the process group; returns a new tensor."""
        if dist.get_backend(self.process_group) == "nccl":
            reduced = packed.to(torch.device("cuda", torch.cuda.current_device()), copy=True)
        else:
            reduced = packed.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=self.process_group)
        return reduced

    def reset(self) -> None:
        super().reset()
        self._sum = None  # K may change after a reset

    def _clear_epoch(self) -> None:
        if self._sum is not None:
            self._sum.zero_()
        self._weight = 0.0
        self._tensor_weight = None

    # ------------------------------------------------------------------ checkpoints
    def _epoch_state(self) -> tuple[str | None, Sequence[float] | None, float, float | None]:
        if self._sum is None:
            return None, None, self._weight, None
        dtype = str(self._sum.dtype).removeprefix("torch.")
        tensor_weight = None if self._tensor_weight is None else self._tensor_weight.item()
        return dtype, self._sum.tolist(), self._weight, tensor_weight

    def _load_epoch_state(
        self, dtype: str | None, sums: Sequence[float] | None, weight: float, tensor_weight: float | None
    ) -> None:
        torch_dtype = None if dtype is None else getattr(torch, dtype, None)
        if dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
            raise ValueError(f"malformed DWA history state_dict: 'dtype' {dtype!r} is not a torch floating dtype")
        device = torch.device("cpu") if self._sum is None else self._sum.device
        self._sum = None if sums is None else torch.tensor(sums, dtype=torch_dtype, device=device)
        self._weight = weight
        self._tensor_weight = (
            None if tensor_weight is None else torch.tensor(tensor_weight, dtype=torch_dtype, device=device)
        )

    def __repr__(self) -> str:
        device = None if self._sum is None else self._sum.device
        return (
            f"{type(self).__name__}(num_tasks={self._num_tasks}, epochs_stored={len(self._averages)}, "
            f"device={device}, distributed={self.distributed})"
        )
