"""Torch-free DWA for runtime trainers: the exported ONNX kernel plus a NumPy loss history.

Nothing here imports torch. :class:`DWAWeightsSession` runs ``dwa_weights.onnx``
(or ``dwa_weights_batched.onnx``) in ONNX Runtime after checking its inputs;
:class:`NumpyDWAHistory` keeps the epoch averages with exactly the rules of
:class:`dwa_export.DWAHistory` (same validation, same ``state_dict`` format).

Example:
    >>> import numpy as np
    >>> from dwa_export.runtime import DWAWeightsSession, NumpyDWAHistory
    >>> kernel = DWAWeightsSession("exported/dwa_weights.onnx")
    >>> history = NumpyDWAHistory()
    >>> for losses in ([1.0, 1.0], [0.8, 0.9], [0.6, 0.8]):  # one batch per epoch here
    ...     history.record(np.array(losses, dtype=np.float32))
    ...     history.step()
    >>> kernel(*history.inputs(), temperature=2.0)  # rates 0.75, 0.889: 2 / (1 + e^0.0694)
    array([0.9652..., 1.0347...], dtype=float32)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from os import PathLike
from typing import Any

import numpy as np

from ._history_core import HistoryCore, LossHistoryError, check_batch_weight

__all__ = ["DWAWeightsSession", "LossHistoryError", "NumpyDWAHistory"]

_ONNX_TYPES = {"tensor(float)": np.dtype(np.float32), "tensor(double)": np.dtype(np.float64), "tensor(float16)": np.dtype(np.float16)}


class DWAWeightsSession:
    """An ONNX Runtime session for an exported DWA kernel, with input validation.

    Args:
        path: ``dwa_weights.onnx`` (inputs ``[K]``) or ``dwa_weights_batched.onnx``
            (inputs ``[N, K]``), in any dtype that ``dwa-export`` writes.
        providers: ONNX Runtime execution providers (default: CPU).
        session_options: an ``onnxruntime.SessionOptions``.

    Calling it checks, before ONNX Runtime runs, that the losses have the
    model's rank and dtype and the same shape, and that the temperature is
    finite and > 0, raising ``ValueError``/``TypeError`` that name the problem.
    """

    def __init__(
        self,
        path: str | PathLike[str],
        *,
        providers: Sequence[str] | None = None,
        session_options: Any = None,
    ) -> None:
        import onnxruntime

        self._session = onnxruntime.InferenceSession(
            str(path), session_options, providers=list(providers or ["CPUExecutionProvider"])
        )
        inputs = {i.name: i for i in self._session.get_inputs()}
        if set(inputs) != {"loss_t1", "loss_t2", "temperature"}:
            raise ValueError(
                f"{path} is not a DWA kernel: inputs {sorted(inputs)}, expected loss_t1, loss_t2, temperature"
            )
        self.dtype: np.dtype = _ONNX_TYPES[inputs["loss_t1"].type]
        self.batched: bool = len(inputs["loss_t1"].shape) == 2
        self._temperature_rank = len(inputs["temperature"].shape)
        self._output_names = [o.name for o in self._session.get_outputs()]

    @property
    def session(self) -> Any:
        """The underlying ``onnxruntime.InferenceSession``."""
        return self._session

    def __call__(self, loss_t1: Any, loss_t2: Any, temperature: Any = 2.0) -> np.ndarray:
        """Weights ``K * softmax(loss_t1 / loss_t2 / T)`` over the last axis."""
        loss_t1 = self._losses(loss_t1, "loss_t1")
        loss_t2 = self._losses(loss_t2, "loss_t2")
        if loss_t1.shape != loss_t2.shape:
            raise ValueError(f"loss_t1 and loss_t2 must have the same shape, got {loss_t1.shape} and {loss_t2.shape}")
        temperature = self._temperature(temperature, loss_t1.shape)
        feeds = {"loss_t1": loss_t1, "loss_t2": loss_t2, "temperature": temperature}
        return self._session.run(self._output_names, feeds)[0]

    def _losses(self, value: Any, name: str) -> np.ndarray:
        array = value if isinstance(value, np.ndarray) else np.asarray(value, dtype=self.dtype)
        if array.dtype != self.dtype:
            raise TypeError(f"{name} must be {self.dtype} for this model, got {array.dtype}; convert it with .astype")
        rank = 2 if self.batched else 1
        if array.ndim != rank or array.shape[-1] == 0 or array.size == 0:
            expected = "[N, K]" if self.batched else "[K]"
            raise ValueError(f"{name} must have shape {expected} with K >= 1 for this model, got {array.shape}")
        return array

    def _temperature(self, value: Any, shape: tuple[int, ...]) -> np.ndarray:
        array = np.asarray(value, dtype=self.dtype)
        if array.size == 1:
            scalar = float(array.reshape(()))
            if not (math.isfinite(scalar) and scalar > 0.0):
                raise ValueError(f"temperature must be finite and > 0 (the paper uses 2.0), got {scalar!r}")
            return array.reshape((1,) * self._temperature_rank)
        if not (self.batched and array.shape == (shape[0], 1)):
            allowed = "a scalar or [N, 1]" if self.batched else "a scalar"
            raise ValueError(f"temperature must be {allowed}, got shape {array.shape}")
        bad = ~(np.isfinite(array) & (array > 0))
        if bad.any():
            raise ValueError(
                f"temperature must be finite and > 0 (the paper uses 2.0), got {float(array[bad][0])!r} "
                f"in row {int(np.argmax(bad))}"
            )
        return array


class NumpyDWAHistory(HistoryCore):
    """:class:`dwa_export.DWAHistory` for NumPy: ``record`` per batch, ``step`` per epoch.

    The rules (epoch averages, warm-up, validation, roll, ``state_dict`` format)
    are those of the torch history, shared through one implementation; a
    checkpoint from either loads into the other. Sums are kept in float32
    (float64 for float64 losses), like the torch history.
    """

    def __init__(self, num_tasks: int | None = None) -> None:
        super().__init__(num_tasks)
        self._sum: np.ndarray | None = None
        self._weight = 0.0

    def record(self, losses: Any, weight: float | np.ndarray | None = None) -> None:
        """Add one batch of per-task losses (``[..., K]``); see :meth:`DWAHistory.record`."""
        losses = np.asarray(losses)
        if losses.ndim == 0 or losses.shape[-1] == 0 or losses.dtype.kind != "f":
            raise ValueError(
                f"losses must be a floating-point array of shape [..., K] with K >= 1, got shape "
                f"{list(losses.shape)} and dtype {losses.dtype}"
            )
        if weight is not None and not isinstance(weight, np.ndarray):
            weight = check_batch_weight(weight)  # before anything changes
        num_tasks = losses.shape[-1]
        self._check_num_tasks(num_tasks)
        if self._sum is None:
            self._sum = np.zeros(num_tasks, dtype=np.promote_types(losses.dtype, np.float32))
        rows = losses.reshape(-1, num_tasks)
        if weight is None:
            self._sum += rows.sum(axis=0, dtype=self._sum.dtype)
            self._weight += len(rows)
        elif isinstance(weight, np.ndarray):
            batch_shape = losses.shape[:-1]
            try:
                weights = np.broadcast_to(weight, batch_shape).reshape(-1).astype(self._sum.dtype)
            except ValueError:
                raise ValueError(
                    f"weight of shape {list(weight.shape)} does not broadcast to the batch shape "
                    f"{list(batch_shape)} of losses {list(losses.shape)} (one weight per row of K losses)"
                ) from None
            self._sum += (rows * weights[:, None]).sum(axis=0, dtype=self._sum.dtype)
            self._weight += float(weights.sum(dtype=np.float64))
        else:
            self._sum += rows.sum(axis=0, dtype=self._sum.dtype) * self._sum.dtype.type(weight)
            self._weight += weight * len(rows)

    def inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """``(loss_t1, loss_t2)`` for the kernel; all ones (uniform weights) during warm-up."""
        loss_t1, loss_t2 = self._host_inputs()
        dtype = np.float32 if self._sum is None else self._sum.dtype
        return np.asarray(loss_t1, dtype=dtype), np.asarray(loss_t2, dtype=dtype)

    def reset(self) -> None:
        super().reset()
        self._sum = None  # K may change after a reset

    def _epoch_totals(self) -> tuple[Sequence[float], float] | None:
        if self._sum is None:
            return None
        return self._sum.tolist(), self._weight

    def _clear_epoch(self) -> None:
        if self._sum is not None:
            self._sum[:] = 0
        self._weight = 0.0

    def _epoch_state(self) -> tuple[str | None, Sequence[float] | None, float, float | None]:
        if self._sum is None:
            return None, None, self._weight, None
        return self._sum.dtype.name, self._sum.tolist(), self._weight, None

    def _load_epoch_state(
        self, dtype: str | None, sums: Sequence[float] | None, weight: float, tensor_weight: float | None
    ) -> None:
        if dtype is not None:
            try:
                np_dtype = np.dtype(dtype)
            except TypeError:
                np_dtype = None
            if np_dtype is None or np_dtype.kind != "f":
                raise ValueError(f"malformed DWA history state_dict: 'dtype' {dtype!r} is not a floating dtype")
        self._sum = None if sums is None else np.asarray(sums, dtype=dtype)
        self._weight = weight + (tensor_weight or 0.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_tasks={self._num_tasks}, epochs_stored={len(self._averages)})"
