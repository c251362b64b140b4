"""``DWA``: the drop-in loss module for eager and compiled training loops."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._history import DWAHistory, Losses, _is_compiling, _mark_static
from ._history_core import _short, check_temperature
from ._kernel import DWAWeights

__all__ = ["DWA"]

_STATE_KEYS = frozenset({"temperature", "history", "log"})


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

    The state (temperature, history, this epoch's running sums, the log) is
    saved by ``state_dict()`` as extra state, also when ``DWA`` is a submodule
    of a model. ``.to(device)`` moves it; its precision never drops (``.half()``
    leaves the float32 sums alone).

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
        tasks: Sequence[str] | None = None,
        distributed: bool = True,
        process_group: dist.ProcessGroup | None = None,
        allow_empty_ranks: bool = False,
    ) -> None:
        super().__init__()
        self.history = DWAHistory(
            num_tasks,
            tasks=tasks,
            distributed=distributed,
            process_group=process_group,
            allow_empty_ranks=allow_empty_ranks,
        )
        self.kernel = DWAWeights()
        self._temperature = check_temperature(temperature)
        # [K] weights of the current epoch on the history's device: a view of a
        # buffer that exists from construction on (64 entries while K is not
        # known), updated in place once per epoch so that compiled graphs read
        # the new values and never allocate.
        self._weights_buffer = torch.ones(self.history.num_tasks or 64)
        self._weights: Tensor | None = None
        self._hot_weights: Tensor | None = None  # _weights in the dtype of the last [K] losses
        # (history log entry, T, next weights) for each step() of this module: matched to
        # the history's log by identity, so that a history stepped or reset directly
        # (without DWA) leaves no misplaced temperature or weights.
        self._weight_log: list[tuple[Any, float, tuple[float, ...]]] = []
        if self.history.num_tasks is not None:
            self._update_weights()

    # ------------------------------------------------------------------ properties
    @property
    def temperature(self) -> float:
        """T; assigning a new value validates it and recomputes the current weights."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = check_temperature(value)
        self._update_weights()
        history_log = self.history._log
        if self._weight_log and history_log and self._weight_log[-1][0] is history_log[-1] and self._weights is not None:
            self._weight_log[-1] = (history_log[-1], self._temperature, tuple(self._weights.tolist()))

    @property
    def tasks(self) -> tuple[str, ...] | None:
        """The task names, if given."""
        return self.history.tasks

    @property
    def weights(self) -> Tensor:
        """The ``[K]`` weights of the current epoch (all ones during warm-up)."""
        if self._weights is None:
            self.history._host_inputs()  # raises if K is not known yet
            self._update_weights()
        assert self._weights is not None
        return self._weights

    def weights_dict(self, prefix: str = "") -> dict[str, float]:
        """The current weights as ``{prefix + name: float}``, for loggers.

        Names are the task names, or ``"task_0"``, ``"task_1"``, ... E.g.
        ``self.log_dict(dwa.weights_dict("dwa/"))`` in Lightning, or
        ``writer.add_scalars("dwa", dwa.weights_dict(), epoch)``. It reads the
        weights to the host (a device sync): call it once per epoch, after
        :meth:`step`, not per batch.
        """
        names = self.tasks or [f"task_{k}" for k in range(self.weights.shape[0])]
        return {prefix + name: value for name, value in zip(names, self.weights.tolist())}

    @property
    def log(self) -> list[dict[str, Any]]:
        """One JSON-friendly dict per successful :meth:`step`.

        ``epoch``, ``averages`` (that epoch's average loss per task),
        ``rates`` (``averages / previous averages``; ``None`` in the warm-up),
        ``temperature`` and ``weights`` (the weights the next epoch uses),
        ``batches`` and ``weight`` (the batch count and weight sum behind the
        averages). With task names, ``averages``, ``rates`` and ``weights``
        are dicts ``{name: value}``. Saved in ``state_dict()``; identical on
        every rank under ``torch.distributed``.
        """
        entries = self.history.log
        names = self.tasks
        out = []
        previous = None
        for entry, (temperature, weights) in zip(entries, self._aligned_weight_log()):
            average = entry["averages"]
            rates = None if previous is None else [a / p for a, p in zip(average, previous)]
            previous = average

            def named(values: Sequence[float] | None) -> Any:
                if values is None or names is None:
                    return None if values is None else list(values)
                return dict(zip(names, values))

            out.append(
                {
                    "epoch": entry["epoch"],
                    "averages": named(average),
                    "rates": named(rates),
                    "temperature": temperature,
                    "weights": named(weights),
                    "batches": entry["batches"],
                    "weight": entry["weight"],
                }
            )
        return out

    def _aligned_weight_log(self) -> list[tuple[float | None, tuple[float, ...] | None]]:
        """(T, weights) for each history log entry; None where ``history.step()`` was called directly."""
        known = {id(entry): (temperature, weights) for entry, temperature, weights in self._weight_log}
        return [known.get(id(entry), (None, None)) for entry in self.history._log]

    # ------------------------------------------------------------------ per batch
    def forward(self, losses: Losses, weight: float | Tensor | None = None) -> Tensor:
        """Record ``losses`` (in training mode) and return their weighted sum, a 0-d tensor.

        ``losses``: a ``[..., K]`` tensor, a 0-d tensor (K = 1), a list/tuple
        of K 0-d tensors, or, with ``tasks``, a mapping ``{name: loss}``.
        Leading dims are samples: the result is the mean over them of
        ``sum_k w_k * losses[..., k]``. ``weight`` is passed to
        :meth:`DWAHistory.record` (e.g. the batch size). No host-device
        synchronisation.
        """
        hot = self._hot_weights
        if hot is not None and weight is None and isinstance(losses, Tensor) and not _is_compiling():
            # The hot path: an unweighted [K] batch like the last one, one add and one dot.
            if not self.training or self.history._record_fast(losses):
                try:
                    return torch.dot(losses, hot)
                except RuntimeError:  # recorded, but of another dtype than the last losses
                    return self._weighted_sum(losses)
        if not isinstance(losses, Tensor) or losses.dim() == 0:
            losses = self.history.as_losses(losses)
        if self.training:
            self.history.record(losses, weight)
        return self._weighted_sum(losses)

    def _weighted_sum(self, losses: Tensor) -> Tensor:
        if losses.dim() == 0:
            losses = losses.view(1)
        weights = self._weights
        accumulator = self.history._buffer.dtype
        if weights is None or weights.device != losses.device or weights.dtype != accumulator:
            num_tasks = self.history.num_tasks
            if num_tasks is None:  # eval mode before any batch: uniform weights
                return losses.sum(-1).mean()
            if self._weights_buffer.device != losses.device:
                self._to_device(losses.device)
            if self._weights_buffer.dtype != accumulator:  # float64 losses widened the sums: follow now,
                self._weights_buffer = self._weights_buffer.to(accumulator)  # not at step() (one graph less)
                _mark_static(self._weights_buffer)
                self._weights = None
            if self._weights is None:
                # K was just fixed by this first batch (the weights are the warm-up's
                # ones, which the buffer holds), or the buffer was replaced.
                self._bind_weights(num_tasks)
            weights = self._weights
            assert weights is not None
        if weights.dtype != losses.dtype:
            weights = weights.to(losses.dtype)
        if losses.dim() == 1:
            if not _is_compiling():
                self._hot_weights = weights
            return torch.dot(losses, weights)
        if not _is_compiling():
            self._hot_weights = None  # batched losses: no dot attempt on the next call
        return torch.matmul(losses, weights).mean()

    # ------------------------------------------------------------------ per epoch
    def step(self) -> None:
        """Close the epoch (see :meth:`DWAHistory.step`) and compute the next epoch's weights.

        Call it once per epoch, outside any ``torch.compile``'d function.
        """
        logged = len(self.history._log)
        self.history.step()
        if self.history.num_tasks is not None:
            self._update_weights()
        if len(self.history._log) > logged and self._weights is not None:
            if len(self._weight_log) >= len(self.history._log):  # the history was reset behind DWA's back
                current = {id(entry) for entry in self.history._log}
                self._weight_log = [item for item in self._weight_log if id(item[0]) in current]
            self._weight_log.append((self.history._log[-1], self._temperature, tuple(self._weights.tolist())))

    def discard_epoch(self) -> None:
        """Drop the batches recorded since the last :meth:`step`."""
        self.history.discard_epoch()

    def reset(self) -> None:
        """Forget the history and the log; the weights return to uniform."""
        self.history.reset()
        self._weight_log = []
        self._update_weights()

    def consolidate_state_dict(self) -> None:
        """See :meth:`DWAHistory.consolidate_state_dict` (a collective: call it on every rank)."""
        self.history.consolidate_state_dict()

    def _update_weights(self) -> None:
        """Recompute the current weights from the history, in place."""
        self._hot_weights = None
        num_tasks = self.history.num_tasks
        if num_tasks is None:
            self._weights = None
            self._weights_buffer.fill_(1.0)
            return
        loss_t1, loss_t2 = self.history.inputs()
        temperature = torch.tensor(self._temperature, dtype=loss_t1.dtype, device=loss_t1.device)
        new = self.kernel(loss_t1, loss_t2, temperature)
        buffer = self._weights_buffer
        if (buffer.dtype, buffer.device) != (new.dtype, new.device) or buffer.shape[0] < num_tasks:
            self._weights_buffer = torch.ones(max(num_tasks, buffer.shape[0]), dtype=new.dtype, device=new.device)
            _mark_static(self._weights_buffer)
            self._weights = None
        self._bind_weights(num_tasks)
        assert self._weights is not None
        self._weights.copy_(new)  # same storage: compiled graphs and CUDA graphs see the new values

    def _bind_weights(self, num_tasks: int) -> None:
        buffer = self._weights_buffer
        if self._weights is None or self._weights.shape[0] != num_tasks:
            self._weights = buffer if buffer.shape[0] == num_tasks else buffer[:num_tasks]
            _mark_static(self._weights)

    # ------------------------------------------------------------------ device
    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> DWA:
        # The state is not a buffer: DDP would broadcast rank 0's running sums
        # over every rank's, and .half() would lower their precision. Follow
        # the device only.
        super()._apply(fn, recurse)
        device = fn(torch.empty(0)).device
        self._to_device(device)
        return self

    def _to_device(self, device: torch.device) -> None:
        self.history.to(device)
        if self._weights_buffer.device != device:
            self._weights_buffer = self._weights_buffer.to(device)
            _mark_static(self._weights_buffer)
            if self._weights is not None:
                num_tasks = self._weights.shape[0]
                self._weights = None
                self._bind_weights(num_tasks)
        self._hot_weights = None

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        weight_log = self._aligned_weight_log()
        return {
            "temperature": self._temperature,
            "history": self.history.state_dict(),
            "log": {
                "temperature": [t for t, _ in weight_log],
                "weights": [None if w is None else list(w) for _, w in weight_log],
            },
        }

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or not {"temperature", "history"} <= state.keys() <= _STATE_KEYS:
            raise ValueError(
                "malformed DWA state: expected the dict saved by DWA.state_dict() with keys "
                f"'temperature', 'history' and 'log', got {_short(state)}"
            )
        temperature = check_temperature(state["temperature"])
        weight_log = _parse_weight_log(state.get("log"), state["history"])
        self.history.load_state_dict(state["history"])
        self._temperature = temperature
        self._weight_log = [
            (entry, t, w) for entry, (t, w) in zip(self.history._log, weight_log) if t is not None and w is not None
        ]
        self._update_weights()

    def __repr__(self) -> str:
        # As torchjd's DWA writes it ("DWA(temperature=2.0)"), plus the arguments given.
        history = self.history
        args = [f"temperature={self._temperature}"]
        if history._fixed_num_tasks is not None and history._tasks is None:
            args.append(f"num_tasks={history._fixed_num_tasks}")
        if history._tasks is not None:
            args.append(f"tasks={history._tasks!r}")
        if not history.distributed:
            args.append("distributed=False")
        if history.allow_empty_ranks:
            args.append("allow_empty_ranks=True")
        return f"{type(self).__name__}({', '.join(args)})"

    def __str__(self) -> str:
        return type(self).__name__


def _parse_weight_log(value: Any, history: Any) -> list[tuple[float, tuple[float, ...]]]:
    """The DWA columns of the log: (temperature, weights) per history log entry."""
    if value is None:  # saved by dwa_export 0.1, which had no log
        return []
    log = history.get("log") if isinstance(history, dict) else None
    entries = log.get("batches", []) if isinstance(log, dict) else []
    num_tasks = history.get("num_tasks") if isinstance(history, dict) else None
    if (
        not isinstance(value, dict)
        or set(value) != {"temperature", "weights"}
        or not isinstance(value["temperature"], list)
        or not isinstance(value["weights"], list)
        or not len(value["temperature"]) == len(value["weights"]) == len(entries)
    ):
        raise ValueError(
            "malformed DWA state: 'log' must be {'temperature': [...], 'weights': [...]} with one entry "
            f"per history log entry ({len(entries)}), got {_short(value)}"
        )
    out = []
    for i, (temperature, weights) in enumerate(zip(value["temperature"], value["weights"])):
        if temperature is None and weights is None:
            out.append((None, None))
            continue
        check_temperature(temperature)
        if not isinstance(weights, list) or len(weights) != num_tasks or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in weights
        ):
            raise ValueError(
                f"malformed DWA state: log weights[{i}] must be a list of {num_tasks} finite numbers >= 0, got {_short(weights)}"
            )
        out.append((float(temperature), tuple(float(w) for w in weights)))
    return out  # type: ignore[return-value]

