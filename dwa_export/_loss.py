"""``DWA``: the drop-in loss module for eager training loops."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._history import DWAHistory
from ._history_core import check_temperature
from ._kernel import DWAWeights

__all__ = ["DWA"]


class DWA(nn.Module):
    r"""Dynamic Weight Average as a loss module: ``loss = dwa(losses)``, ``dwa.step()`` per epoch.

    Each call records the batch's task losses and returns
    :math:`\sum_k w_k L_k`, with the weights :math:`w` of the current epoch

    .. math::
        w_k = \frac{K \exp(r_k / T)}{\sum_j \exp(r_j / T)}, \qquad
        r_k = \frac{L_k(t-1)}{L_k(t-2)},

    computed once per epoch in :meth:`step` by :class:`DWAWeights` from a
    :class:`DWAHistory`. The weights are uniform (all 1) until two epochs have
    been stepped. The gradient flows through the current losses only. The call
    pattern is that of torchjd's ``DWA`` scalarizer.

    Args:
        temperature: T > 0 (the paper uses 2.0); validated here and on assignment.
        num_tasks: K, if known (otherwise fixed by the first batch).
        distributed, process_group: see :class:`DWAHistory`.

    The state (temperature, history, this epoch's running sum) is saved by
    ``state_dict()`` as extra state, also when ``DWA`` is a submodule of a model.

    Example:
        >>> import torch
        >>> from dwa_export import DWA
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> dwa = DWA(temperature=2.0)
        >>> for epoch in range(3):
        ...     for _ in range(5):
        ...         losses = model(torch.randn(8, 4)).pow(2).mean(0)  # one loss per task
        ...         loss = dwa(losses)
        ...         optimizer.zero_grad()
        ...         loss.backward()
        ...         optimizer.step()
        ...     dwa.step()
        >>> dwa.weights.shape, float(dwa.weights.sum())
        (torch.Size([2]), 2.0)
    """

    def __init__(
        self,
        temperature: float = 2.0,
        num_tasks: int | None = None,
        *,
        distributed: bool = True,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.history = DWAHistory(num_tasks, distributed=distributed, process_group=process_group)
        self.kernel = DWAWeights()
        self._temperature = check_temperature(temperature)
        self._weights: Tensor | None = None  # on the history's device, None until needed
        self._hot_weights: Tensor | None = None  # _weights as the last [K] losses need them

    @property
    def temperature(self) -> float:
        """T; assigning a new value validates it and recomputes the current weights."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = check_temperature(value)
        self._set_weights(None)  # recomputed on next use

    @property
    def weights(self) -> Tensor:
        """The ``[K]`` weights of the current epoch (all ones during warm-up)."""
        if self._weights is None:
            self._update_weights()  # raises if K is not known yet
        assert self._weights is not None
        return self._weights

    def forward(self, losses: Tensor, weight: float | Tensor | None = None) -> Tensor:
        """Record ``losses`` (``[..., K]``) and return their weighted sum, a 0-d tensor.

        Leading dims are samples: the result is the mean over them of
        ``sum_k w_k * losses[..., k]``. ``weight`` is passed to
        :meth:`DWAHistory.record` (e.g. the batch size). No host-device
        synchronisation.
        """
        self.history.record(losses, weight)
        hot = self._hot_weights
        if hot is not None:
            try:  # the hot path: [K] losses of the dtype and device of the last ones
                return torch.dot(losses, hot)
            except RuntimeError:
                pass
        return self._weighted_sum(losses)

    def _weighted_sum(self, losses: Tensor) -> Tensor:
        weights = self._weights
        if weights is None or weights.device != losses.device:
            self._update_weights()
            weights = self._weights
            assert weights is not None
        weights = weights.to(losses.dtype)
        if losses.dim() == 1:
            self._hot_weights = weights
            return torch.dot(losses, weights)
        self._hot_weights = None  # batched losses: no dot attempt on the next call
        return torch.matmul(losses, weights).mean()

    def step(self) -> None:
        """Close the epoch (see :meth:`DWAHistory.step`) and compute the next epoch's weights."""
        self.history.step()
        if self.history.num_tasks is not None:
            self._update_weights()

    def discard_epoch(self) -> None:
        """Drop the batches recorded since the last :meth:`step`."""
        self.history.discard_epoch()

    def reset(self) -> None:
        """Forget the history; the weights return to uniform."""
        self.history.reset()
        self._set_weights(None)

    def _update_weights(self) -> None:
        loss_t1, loss_t2 = self.history.inputs()
        temperature = torch.tensor(self._temperature, dtype=loss_t1.dtype, device=loss_t1.device)
        self._set_weights(self.kernel(loss_t1, loss_t2, temperature))

    def _set_weights(self, weights: Tensor | None) -> None:
        self._weights = weights
        self._hot_weights = None

    def get_extra_state(self) -> dict[str, Any]:
        return {"temperature": self._temperature, "history": self.history.state_dict()}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or set(state) != {"temperature", "history"}:
            raise ValueError(
                "malformed DWA state: expected the dict saved by DWA.state_dict() with keys "
                f"'temperature' and 'history', got {state!r}"
            )
        temperature = check_temperature(state["temperature"])
        self.history.load_state_dict(state["history"])
        self._temperature = temperature
        self._set_weights(None)  # recomputed on next use, on the device of the next losses

    def extra_repr(self) -> str:
        return f"temperature={self._temperature}, num_tasks={self.history.num_tasks}, ready={self.history.ready}"
