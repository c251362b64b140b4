"""``RunningSums``: this epoch's loss sums on the device, updated in place, never read per batch."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._epochs import Totals
from ._tensors import accumulator_dtype, state_tensor

__all__ = ["RunningSums"]

#: What a batch of one row with no weight adds to ``counts``.
_ONE_ROW = (1.0, 1.0, 1.0, 0.0)


class RunningSums:
    """This epoch's weighted loss sums and its counts, in float64 tensors on one device.

    ``counts`` is ``(weight, batches, rows, nonfinite_rows)``. Every batch updates
    them in place (their storage stays put once K is known, as CUDA graphs need)
    and nothing per batch reads them: :meth:`read` is the host read, once per epoch.

    A row of K losses is left out of the sums (a mask, not a product: ``0 * inf``
    is NaN) when its weight is 0, and with ``skip_nonfinite`` when it holds a NaN
    or an infinity; those are counted in ``nonfinite_rows``.
    """

    def __init__(self, num_tasks: int | None = None, skip_nonfinite: bool = False) -> None:
        dtype = accumulator_dtype(torch.get_default_device())
        self.counts = state_tensor(lambda: torch.zeros(4, dtype=dtype))
        self.one_row = state_tensor(lambda: torch.tensor(_ONE_ROW, dtype=dtype))  # a constant, made once
        self.device = self.counts.device  # kept beside the tensors: read on every batch
        self.sums: Tensor | None = None  # [K], once K is known
        self.skip_nonfinite = skip_nonfinite
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
        if weight is None and rows.dim() == 1 and not self.skip_nonfinite:  # the commonest batch: two adds
            sums.add_(rows)
            self.counts.add_(self.one_row)
            return
        rows = rows.reshape(-1, rows.shape[-1]).to(sums.dtype)
        count = torch.full((), rows.shape[0], dtype=sums.dtype, device=sums.device)
        if weight is None and not self.skip_nonfinite:  # per-sample losses, each row counting once
            sums.add_(rows.sum(0))
            self.counts.add_(torch.stack((count, torch.ones_like(count), count, torch.zeros_like(count))))
            return
        if weight is None:
            weight = torch.ones((), dtype=sums.dtype, device=sums.device)
        elif not isinstance(weight, Tensor):  # a number: symbolic while compiling, so checked here too
            weight = torch.full((), weight, dtype=sums.dtype, device=sums.device)
        # A negative or NaN weight cannot raise without a host sync: it makes the epoch's
        # weight NaN, which step() reports (such a row is always kept, to be seen there).
        weight = torch.where(weight >= 0, weight.to(sums.dtype), math.nan).reshape(-1, 1).expand(rows.shape[0], 1)
        weighted = weight != 0
        kept = weighted
        if self.skip_nonfinite:
            kept = kept & (rows.isfinite().all(-1, keepdim=True) | weight.isnan())
        # The product is rounded before the sum, as in the NumPy and C++ histories.
        sums.add_(torch.where(kept, rows * weight, 0.0).sum(0))
        total = torch.where(kept, weight, 0.0).sum()
        left_out = (weighted & ~kept).sum().to(sums.dtype)
        self.counts.add_(torch.stack((total, torch.ones_like(total), count, left_out)))

    def to(self, device: torch.device) -> None:
        """Move to ``device``; from the ``meta`` device, which holds no values, they start at zero."""
        dtype, fresh = accumulator_dtype(device), self.device.type == "meta"

        def moved(tensor: Tensor) -> Tensor:
            if fresh:
                return state_tensor(lambda: torch.zeros(tensor.shape, dtype=dtype, device=device))
            return state_tensor(lambda: tensor.to(device=device, dtype=dtype))

        self.counts = moved(self.counts)
        self.one_row = state_tensor(lambda: torch.tensor(_ONE_ROW, dtype=dtype, device=device))
        if self.sums is not None:
            self.sums = moved(self.sums)
        self.device = self.counts.device

    def clear(self) -> None:
        if self.sums is not None:
            self.sums.zero_()
        self.counts.zero_()

    def read(self) -> Totals:
        """This epoch's totals as host numbers: a device sync, once per epoch."""
        weight, batches, rows, nonfinite_rows = self.counts.tolist()
        sums = () if self.sums is None or batches == 0 else tuple(self.sums.tolist())
        return Totals(int(batches), int(rows), int(nonfinite_rows), weight, sums)

    def load(self, num_tasks: int | None, partial: Totals | None) -> None:
        """Start from a checkpoint's running epoch (or from nothing) for K tasks."""
        self.resize(num_tasks)
        self.clear()
        if partial is not None:
            assert self.sums is not None
            self.sums.copy_(torch.tensor(partial.sums, dtype=torch.float64))
            counts = (partial.weight, partial.batches, partial.rows, partial.nonfinite_rows)
            self.counts.copy_(torch.tensor(counts, dtype=torch.float64))
