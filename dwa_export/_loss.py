"""``DWA``: the drop-in loss module for eager and compiled training loops."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._epochs import _short, check_temperature
from ._history import DWAHistory, Losses
from ._kernel import DWAWeights
from ._state import upgrade
from ._tensors import state_tensor

__all__ = ["DWA"]


class DWA(nn.Module):
    r"""Dynamic Weight Average as a loss module: ``loss = dwa(losses)``, ``dwa.step()`` per epoch.

    In training mode each call records the batch's task losses and returns
    :math:`\sum_k w_k L_k`, with the weights :math:`w` of the current epoch

    .. math::
        w_k = \frac{K \exp(r_k / T)}{\sum_j \exp(r_j / T)}, \qquad
        r_k = \frac{L_k(t-1)}{L_k(t-2)},

    computed once per epoch in :meth:`step` by :class:`DWAWeights` from a
    :class:`DWAHistory`. The weights are uniform (all 1) until two epochs have
    been stepped. The gradient flows through the current losses only. The call
    pattern is that of torchjd's ``DWA`` scalarizer.

    Like ``BatchNorm``'s running statistics, recording follows the module's
    mode: in ``eval()`` mode (validation), ``dwa(losses)`` returns the weighted
    sum with the current weights and changes nothing.

    Under ``torch.compile`` the per-batch call compiles into the caller's graph
    (no graph break, no recompilation from one batch or epoch to the next);
    :meth:`step` stays outside the compiled function, once per epoch.

    Args:
        temperature: T > 0 (the paper uses 2.0); validated here and on assignment.
        num_tasks: K, if known (otherwise fixed by the first batch).
        tasks: task names; then a batch may also be a mapping ``{name: loss}``,
            and :meth:`weights_dict` and :attr:`log` use the names.
        distributed, process_group, allow_empty_ranks: see :class:`DWAHistory`.
        nan_strategy: ``"error"`` (the default), ``"warn"`` or ``"ignore"``: whether a
            batch with a NaN or infinite loss (e.g. one that overflowed under mixed
            precision) makes :meth:`step` raise, or is left out of the epoch; see
            :class:`DWAHistory`. The returned loss is that batch's as it is.

    The state (temperature, history, this epoch's running sums, the log) is
    saved by ``state_dict()`` as extra state, also when ``DWA`` is a submodule
    of a model. ``.to(device)`` moves it; ``.half()`` and ``.double()`` leave
    it alone (the sums are float64, the weights float32 or float64).

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
        >>> dwa.weights.shape, round(float(dwa.weights.sum()), 5)  # the weights sum to K
        (torch.Size([2]), 2.0)
    """

    def __init__(
        self,
        temperature: float = 2.0,
        num_tasks: int | None = None,
        *,
        tasks: Sequence[str] | None = None,
        distributed: bool = True,
        process_group: dist.ProcessGroup | None = None,
        allow_empty_ranks: bool = False,
        nan_strategy: str = "error",
    ) -> None:
        super().__init__()
        self.history = DWAHistory(
            num_tasks,
            tasks=tasks,
            distributed=distributed,
            process_group=process_group,
            allow_empty_ranks=allow_empty_ranks,
            nan_strategy=nan_strategy,
        )
        self.kernel = DWAWeights()
        self._temperature = check_temperature(temperature)
        # The [K] weights of the current epoch, in the history's dtype, updated in
        # place by step() so that compiled code and CUDA graphs read the new values.
        self._weights: Tensor | None = None
        self._arguments = [f"num_tasks={num_tasks}"] if num_tasks is not None and tasks is None else []
        self._arguments += [f"tasks={tuple(tasks)!r}"] if tasks is not None else []
        self._arguments += [] if distributed else ["distributed=False"]
        self._arguments += ["allow_empty_ranks=True"] if allow_empty_ranks else []
        self._arguments += [f"nan_strategy={nan_strategy!r}"] if nan_strategy != "error" else []
        self._update_weights()

    # ------------------------------------------------------------------ properties
    @property
    def temperature(self) -> float:
        """T; assigning a new value validates it and recomputes the current weights (and the last log entry's)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = check_temperature(value)
        self._update_weights(log=self.history.epochs > 0)

    @property
    def tasks(self) -> tuple[str, ...] | None:
        """The task names, if given."""
        return self.history.tasks

    @property
    def weights(self) -> Tensor:
        """A copy of the ``[K]`` weights of the current epoch (all ones during warm-up)."""
        if self._weights is None:
            self.history.inputs()  # raises if K is not known yet
            self._update_weights()
        assert self._weights is not None
        return self._weights.clone()

    def weights_dict(self, prefix: str = "") -> dict[str, float]:
        """The current weights as ``{prefix + name: float}``, for loggers.

        Names are the task names, or ``"task_0"``, ``"task_1"``, ... E.g.
        ``self.log_dict(dwa.weights_dict("dwa/"))`` in Lightning, or
        ``writer.add_scalars("dwa", dwa.weights_dict(), epoch)``. It reads the
        weights to the host (a device sync): call it once per epoch, after
        :meth:`step`, not per batch.
        """
        weights = self.weights.tolist()
        names = self.tasks or [f"task_{k}" for k in range(len(weights))]
        return {prefix + name: value for name, value in zip(names, weights, strict=True)}

    @property
    def log(self) -> list[dict[str, Any]]:
        """One JSON-friendly dict per successful :meth:`step`.

        ``epoch``, ``averages`` (that epoch's average loss per task),
        ``rates`` (``averages / previous averages``; ``None`` in the warm-up),
        ``temperature`` and ``weights`` (the weights the next epoch uses),
        ``batches`` and ``weight`` (the batch count and weight sum behind the
        averages), ``nonfinite_rows`` (rows left out for a NaN or infinite
        loss, see ``nan_strategy``). With task names, ``averages``, ``rates`` and ``weights``
        are dicts ``{name: value}``. Saved in ``state_dict()``; identical on
        every rank under ``torch.distributed``.
        """
        names = self.tasks

        def named(values: Sequence[float] | None) -> Any:
            return values if values is None or names is None else dict(zip(names, values, strict=True))

        out: list[dict[str, Any]] = []
        previous: list[float] | None = None
        rates: list[float] | None
        for entry in self.history.log:
            averages = entry["averages"]
            rates = None if previous is None else [a / p for a, p in zip(averages, previous, strict=True)]
            previous = averages
            out.append(
                {
                    "epoch": entry["epoch"],
                    "averages": named(averages),
                    "rates": named(rates),
                    "temperature": entry["temperature"],
                    "weights": named(entry["weights"]),
                    "batches": entry["batches"],
                    "weight": entry["weight"],
                    "nonfinite_rows": entry["nonfinite_rows"],
                }
            )
        return out

    # ------------------------------------------------------------------ per batch
    def forward(self, losses: Losses, weight: float | Tensor | None = None) -> Tensor:
        """Record ``losses`` (in training mode) and return their weighted sum, a 0-d tensor.

        ``losses``: a ``[..., K]`` tensor, a 0-d tensor (K = 1), a list/tuple
        of K 0-d tensors, or, with ``tasks``, a mapping ``{name: loss}``.
        Leading dims are samples: the result is the mean over them of
        ``sum_k w_k * losses[..., k]``. ``weight`` is passed to
        :meth:`DWAHistory.record` (e.g. the batch size). No host-device
        synchronisation. Both modes check the losses alike.
        """
        losses = self.history.as_losses(losses)
        if self.training:
            self.history.record(losses, weight)
        weights = self._weights
        if weights is None or weights.dtype != losses.dtype or weights.device != losses.device:
            if self.history.num_tasks is None:  # eval mode before any training batch: uniform weights
                return losses.sum(-1).mean()
            weights = self._weights_for(losses)
        return torch.dot(losses, weights) if losses.dim() == 1 else torch.matmul(losses, weights).mean()

    def _weights_for(self, losses: Tensor) -> Tensor:
        """The current weights on the losses' device and in their dtype.

        The weights follow the device and precision of the losses once (a new
        tensor, which the compiler resolves while tracing), so that later
        epochs update them in place.
        """
        weights = self._weights
        dtype = self.history.dtype
        if weights is None:  # the first batch fixed K: the warm-up's uniform weights
            num_tasks = losses.shape[-1]
            weights = self._weights = state_tensor(lambda: torch.ones(num_tasks, dtype=dtype, device=losses.device))
        elif weights.device != losses.device or weights.dtype != dtype:
            old = weights
            weights = self._weights = state_tensor(lambda: old.to(device=losses.device, dtype=dtype))
        return weights if weights.dtype == losses.dtype else weights.to(losses.dtype)

    # ------------------------------------------------------------------ per epoch
    def step(self) -> None:
        """Close the epoch (see :meth:`DWAHistory.step`) and compute the next epoch's weights.

        Call it once per epoch, outside any ``torch.compile``'d function (it
        reads the epoch's sums to the host).
        """
        closed = self.history.epochs
        self.history.step(temperature=self._temperature)
        self._update_weights(log=self.history.epochs > closed)

    def discard_epoch(self) -> None:
        """Drop the batches recorded since the last :meth:`step`."""
        self.history.discard_epoch()

    def reset(self) -> None:
        """Forget the history and the log; the weights return to uniform."""
        self.history.reset()
        self._update_weights()

    def consolidate_state_dict(self) -> None:
        """See :meth:`DWAHistory.consolidate_state_dict` (a collective: call it on every rank)."""
        self.history.consolidate_state_dict()

    def _update_weights(self, log: bool = False) -> None:
        """Recompute the current weights from the history, in place; ``log``: also in its last log entry.

        Computed on the CPU (a few scalars, once per epoch), so that every rank and
        device gets the same bits and a ``meta`` or compiled module needs no kernel run.
        """
        if self.history.num_tasks is None:
            self._weights = None
            return
        loss_t1, loss_t2 = self.history.inputs(device="cpu")
        temperature = torch.tensor(self._temperature, dtype=loss_t1.dtype, device="cpu")
        new = self.kernel(loss_t1, loss_t2, temperature)
        if log:
            self.history.log_weights(self._temperature, new.tolist())
        weights = self._weights
        if weights is None or weights.shape != new.shape or weights.dtype != new.dtype or weights.is_meta:
            device = self.history.device if weights is None else weights.device
            self._weights = state_tensor(lambda: new.to(device, copy=True))
        else:
            weights.copy_(new)  # same storage: compiled graphs and CUDA graphs see the new values

    # ------------------------------------------------------------------ device
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> DWA:
        # The state is not registered as buffers: DDP would broadcast rank 0's running
        # sums over every rank's, and .half() would lower their precision. It follows
        # the device only: fn applied to a probe on the state's own device says where to.
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # torch leaves Module._apply unannotated
        device = fn(torch.empty(0, device=self.history.device)).device
        self.history.to(device)
        weights = self._weights
        if weights is not None and weights.device != self.history.device:
            if weights.is_meta:  # nothing to copy: recompute them
                self._weights = None
                self._update_weights()
            else:
                self._weights = state_tensor(lambda: weights.to(self.history.device))
        return self

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        return {"temperature": self._temperature, "history": self.history.state_dict()}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or not {"temperature", "history"} <= state.keys() <= {
            "temperature",
            "history",
            "log",
        }:
            raise ValueError(
                "malformed DWA state: expected the dict saved by DWA.state_dict() with keys 'temperature' and "
                f"'history', got {_short(state)}"
            )
        temperature = check_temperature(state["temperature"])
        history = state["history"]
        if "log" in state:  # saved beside a version-2 history, which had no temperatures or weights
            history = _with_dwa_log(history, state["log"])
        self.history.load_state_dict(history)  # raises, changing nothing, if invalid
        self._temperature = temperature
        self._update_weights()

    def __repr__(self) -> str:
        # As torchjd's DWA writes it ("DWA(temperature=2.0)"), plus the arguments given.
        return f"{type(self).__name__}({', '.join([f'temperature={self._temperature}', *self._arguments])})"

    def __str__(self) -> str:
        return type(self).__name__


def _with_dwa_log(history: Any, log: Any) -> Any:
    """A version-2 history state with the temperatures and weights that DWA kept beside it, as version 3."""
    if not (isinstance(history, dict) and history.get("version") == 2):
        raise ValueError(
            f"malformed DWA state: a 'log' beside the history needs a version-2 history, got {_short(history)}"
        )
    if not (isinstance(log, dict) and set(log) == {"temperature", "weights"}):
        raise ValueError(
            f"malformed DWA state: 'log' must be {{'temperature': [...], 'weights': [...]}}, got {_short(log)}"
        )
    upgraded = upgrade(history)
    assert isinstance(upgraded, dict)
    return {**upgraded, "log": {**upgraded["log"], **log}}
