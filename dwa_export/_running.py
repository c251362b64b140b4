"""``RunningSums``: this epoch's loss sums on the device, updated in place, never read per batch."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._state import RunningEpoch
from ._tensors import accumulator_dtype, state_tensor

__all__ = ["RunningSums"]


class RunningSums:
    """This epoch's weighted loss sums and its (weight, batches), in float64 tensors on one device.

    Every batch updates them in place (their storage stays put once K is known, as
    CUDA graphs need) and nothing per batch reads them: :meth:`read` is the host
    read, once per epoch.
    """

    def __init__(self, num_tasks: int | None = None) -> None:
        dtype = accumulator_dtype(torch.get_default_device())
        self.counts = state_tensor(lambda: torch.zeros(2, dtype=dtype))  # (weight, batches)
        self.device = self.counts.device  # kept beside the tensors: read on every batch
        self.sums: Tensor | None = None  # [K], once K is known
        self.resize(num_tasks)

    def resize(self, num_tasks: int | None) -> None:
        """Empty sums for K tasks (none for ``None``), in place when K stays."""
        if num_tasks is None:
            self.sums = None
        elif self.sums is None or self.sums.shape[0] != num_tasks:
            device, dtype = self.device, accumulator_dtype(self.device)
            self.sums = state_tensor(lambda: torch.zeros(num_tasks, dtype=dtype, device=device))

    def add(self, rows: Tensor, weight: float | Tensor | None) -> None:
        """Add ``[..., K]`` detached losses with no weight, one per row (a tensor), or one number for a ``[K]`` batch.

        The sums must exist (:meth:`resize`) on the losses' device; the weights are
        checked by the caller except for their values on the device.
        """
        sums = self.sums
        assert sums is not None
        if weight is None and rows.dim() == 1:  # the commonest batch: two in-place adds
            sums.add_(rows)
            self.counts.add_(1.0)  # (weight, batches) += (1, 1)
            return
        rows = rows.reshape(-1, rows.shape[-1]).to(sums.dtype)
        if weight is None:  # every row counts once
            sums.add_(rows.sum(0))
            total = torch.full((), rows.shape[0], dtype=sums.dtype, device=sums.device)
        else:
            if not isinstance(weight, Tensor):  # a number: symbolic while compiling, so checked here too
                weight = torch.full((), weight, dtype=sums.dtype, device=sums.device)
            # A negative or NaN weight cannot raise without a host sync: it makes the epoch's
            # weight NaN, which step() reports. The product is rounded before the add, as in the
            # NumPy and C++ histories (add_(alpha=) may fuse the two).
            weight = torch.where(weight >= 0, weight.to(sums.dtype), math.nan).reshape(-1, 1)
            sums.add_((rows * weight).sum(0))
            total = weight.sum()
        self.counts.add_(torch.stack((total, torch.ones_like(total))))

    def to(self, device: torch.device) -> None:
        """Move to ``device``; from the ``meta`` device, which holds no values, they start at zero."""
        dtype, fresh = accumulator_dtype(device), self.device.type == "meta"

        def moved(tensor: Tensor) -> Tensor:
            if fresh:
                return state_tensor(lambda: torch.zeros(tensor.shape, dtype=dtype, device=device))
            return state_tensor(lambda: tensor.to(device=device, dtype=dtype))

        self.counts = moved(self.counts)
        if self.sums is not None:
            self.sums = moved(self.sums)
        self.device = self.counts.device

    def clear(self) -> None:
        if self.sums is not None:
            self.sums.zero_()
        self.counts.zero_()

    def read(self) -> tuple[int, float, tuple[float, ...]]:
        """``(batches, weight, sums)`` as host numbers: a device sync, once per epoch."""
        weight, batches = self.counts.tolist()
        sums = () if self.sums is None or batches == 0 else tuple(self.sums.tolist())
        return int(batches), weight, sums

    def load(self, num_tasks: int | None, partial: RunningEpoch | None) -> None:
        """Start from a checkpoint's running epoch (or from nothing) for K tasks."""
        self.resize(num_tasks)
        self.clear()
        if partial is not None:
            assert self.sums is not None
            self.sums.copy_(torch.tensor(partial.sums, dtype=torch.float64))
            self.counts.copy_(torch.tensor([partial.weight, float(partial.batches)], dtype=torch.float64))
