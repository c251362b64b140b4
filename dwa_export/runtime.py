"""Torch-free DWA for runtime trainers: the exported ONNX kernel plus a NumPy loss history.

Nothing here imports torch. :class:`DWAWeightsSession` runs ``dwa_weights.onnx``
(or ``dwa_weights_batched.onnx``) in ONNX Runtime after checking its inputs;
:class:`NumpyDWAHistory` keeps the epoch averages with exactly the rules of
:class:`dwa_export.DWAHistory` (same validation, same ``state_dict`` format).

Example:
    >>> import numpy as np
    >>> from dwa_export.runtime import DWAWeightsSession, NumpyDWAHistory
    >>> kernel = DWAWeightsSession()  # the float32 kernel shipped with the package
    >>> history = NumpyDWAHistory()
    >>> for losses in ([1.0, 1.0], [0.8, 0.9], [0.6, 0.8]):  # one batch per epoch here
    ...     history.record(np.array(losses, dtype=np.float32))
    ...     history.step()
    >>> kernel(*history.inputs(), temperature=2.0)  # rates 0.75, 0.889: 2 / (1 + e^0.0694)
    array([0.9652..., 1.0347...], dtype=float32)
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from . import exported_dir
from ._epochs import LossHistoryError, NonFiniteLossWarning
from ._numpy_history import NumpyDWAHistory

__all__ = ["DWAWeightsSession", "LossHistoryError", "NonFiniteLossWarning", "NumpyDWAHistory"]

_ONNX_TYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
}
_INPUTS = ("loss_t1", "loss_t2", "temperature")
_OUTPUTS = ("weights",)
_PRODUCER = "dwa_export"
# Rates 0.75 and 0.86 at T = 2: w = 2 / (1 + e^0.055), and 0.5 for the batched file's second row.
_PROBE_WEIGHTS = (2 / (1 + math.exp(0.055)), 2 / (1 + math.exp(0.22)))


def _manifest_sha256(path: Path) -> str | None:
    """The sha256 that ``manifest.json`` beside ``path`` records for it, if there is one."""
    try:
        manifest = json.loads((path.parent / "manifest.json").read_text())
        entry = manifest["artifacts"][path.name]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entry if isinstance(entry, str) else None


def _real_array(value: Any, name: str) -> np.ndarray:
    """``value`` as a NumPy array of real numbers (float or int), or ``TypeError`` naming ``name``."""
    if isinstance(value, (str, bytes, bool, np.bool_)):
        raise TypeError(f"{name} must be a real number or an array of them, got {type(value).__name__} {value!r}")
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} cannot be read as an array: {error}") from None
    if array.dtype.kind not in "fiu":
        raise TypeError(
            f"{name} must hold real numbers (float or int), got dtype {array.dtype} from {type(value).__name__}"
        )
    return array


class DWAWeightsSession:
    """An ONNX Runtime session for an exported DWA kernel, with input validation.

    Args:
        path: ``dwa_weights.onnx`` (inputs ``[K]``) or ``dwa_weights_batched.onnx``
            (inputs ``[N, K]``), in any dtype that ``dwa-export`` writes. Default:
            the float32 kernel shipped with the package (``dwa_export.exported_dir()``).
        batched: without a ``path``, take the shipped batched kernel instead.
        providers: ONNX Runtime execution providers (default: CPU).
        session_options: an ``onnxruntime.SessionOptions``.

    The weights are ``w = K * softmax(loss_t1 / loss_t2 / T)`` over the last axis.

    Opening the file checks that it is a DWA kernel written by ``dwa-export``:
    its inputs ``loss_t1``, ``loss_t2``, ``temperature`` and output ``weights``
    with one float dtype and ranks 1, 1, 0 -> 1 (or 2, 2, 2 -> 2 batched), its
    producer ``dwa_export``, and then either its sha256 against the
    ``manifest.json`` beside it (when that lists the file) or, without one, its
    output for the hand-worked example (rates 0.75, 0.86 at T = 2 give
    ``2 / (1 + e^0.055)``). Anything else raises ``ValueError`` naming what
    differs.

    Calling it checks, before ONNX Runtime runs, that the losses are real
    numbers with the model's rank and dtype and the same shape, and that the
    temperature is a real number (not a bool or a string), finite, > 0 and
    representable in the model's dtype, raising ``TypeError``/``ValueError``
    that name the argument and the value.
    """

    def __init__(
        self,
        path: str | PathLike[str] | None = None,
        *,
        batched: bool | None = None,
        providers: Sequence[str] | None = None,
        session_options: Any = None,
    ) -> None:
        import onnxruntime

        if path is None:
            path = Path(exported_dir()) / ("dwa_weights_batched.onnx" if batched else "dwa_weights.onnx")
        elif batched is not None:
            raise TypeError("batched= chooses a shipped kernel: give it without a path (a file has its own layout)")
        path = Path(path)
        self._session = onnxruntime.InferenceSession(
            str(path), session_options, providers=list(providers or ["CPUExecutionProvider"])
        )
        self.dtype: np.dtype = self._check_signature(path)
        self.batched: bool = len(self._session.get_inputs()[0].shape) == 2
        self._temperature_rank = 2 if self.batched else 0
        self._temperature_shape = (1,) * self._temperature_rank
        info = np.finfo(self.dtype)
        self._smallest_temperature = float(info.smallest_subnormal)  # [these, max] survive the cast unchanged
        self._largest_temperature = float(info.max)
        self._output_names = list(_OUTPUTS)
        recorded = _manifest_sha256(path)
        if recorded is not None:
            actual = hashlib.sha256(path.read_bytes()).hexdigest()
            if actual != recorded:
                raise ValueError(
                    f"{path} is not the DWA kernel that {path.parent / 'manifest.json'} describes: its sha256 is "
                    f"{actual}, the manifest records {recorded} (modified after export? run dwa-export --check)"
                )
        else:
            self._probe(path)

    def _check_signature(self, path: Path) -> np.dtype:
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        names = tuple(i.name for i in inputs), tuple(o.name for o in outputs)
        problems = []
        if names != (_INPUTS, _OUTPUTS):
            problems.append(
                f"inputs {list(names[0])} and outputs {list(names[1])}, expected {list(_INPUTS)} and {list(_OUTPUTS)}"
            )
        else:
            types = sorted({v.type for v in (*inputs, *outputs)})
            if len(types) != 1 or types[0] not in _ONNX_TYPES:
                problems.append(
                    f"element types {types}, expected one of {', '.join(_ONNX_TYPES)} for all inputs and the output"
                )
            ranks = tuple(len(v.shape) for v in (*inputs, *outputs))
            if ranks not in ((1, 1, 0, 1), (2, 2, 2, 2)):
                problems.append(
                    f"ranks {ranks} for (loss_t1, loss_t2, temperature, weights), expected (1, 1, 0, 1) or (2, 2, 2, 2)"
                )
        producer = self._session.get_modelmeta().producer_name
        if producer != _PRODUCER:
            problems.append(f"producer {producer!r}, expected {_PRODUCER!r}")
        if problems:
            raise ValueError(f"{path} is not a DWA kernel written by dwa-export: {'; '.join(problems)}")
        return _ONNX_TYPES[inputs[0].type]

    def _probe(self, path: Path) -> None:
        """Without a manifest to vouch for the file: does it compute DWA on a hand-worked example?"""
        l1 = np.array([0.75, 0.86], self.dtype)
        l2 = np.ones(2, self.dtype)
        if self.batched:
            feeds = (np.stack([l1, l1]), np.stack([l2, l2]), np.array([[2.0], [0.5]], self.dtype))
            expected = np.array([[w, 2 - w] for w in _PROBE_WEIGHTS])
        else:
            feeds = (l1, l2, np.array(2.0, self.dtype))
            expected = np.array([_PROBE_WEIGHTS[0], 2 - _PROBE_WEIGHTS[0]])
        tolerance = 2e-3 if self.dtype == np.float16 else 1e-5
        try:
            got = self._session.run(self._output_names, dict(zip(_INPUTS, feeds, strict=True)))[0]
            ok = got.shape == expected.shape and bool(np.all(np.abs(got.astype(np.float64) - expected) <= tolerance))
        except Exception as error:  # noqa: BLE001 - any ONNX Runtime failure means: not our kernel
            got, ok = f"an error ({str(error).strip()[:200]})", False
        if not ok:
            raise ValueError(
                f"{path} is not a DWA kernel: for rates 0.75, 0.86 at T = 2 it returns {got}, DWA gives "
                f"{expected.round(6).tolist()} (and there is no manifest.json beside it listing the file)"
            )

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
        weights: np.ndarray = self._session.run(self._output_names, feeds)[0]
        return weights

    def _losses(self, value: Any, name: str) -> np.ndarray:
        if isinstance(value, np.ndarray):
            array = value
            if array.dtype != self.dtype:
                raise TypeError(
                    f"{name} must be {self.dtype} for this model, got {array.dtype}; convert it with .astype"
                )
        else:
            raw = _real_array(value, name)
            with np.errstate(over="ignore"):
                array = raw.astype(self.dtype)
            lost = np.isfinite(raw) & ~np.isfinite(array)
            if lost.any():
                raise ValueError(
                    f"{name} value {float(raw[lost].flat[0])!r} does not fit this model's {self.dtype} "
                    f"(largest finite {float(np.finfo(self.dtype).max):.8g})"
                )
        rank = 2 if self.batched else 1
        if array.ndim != rank or array.shape[-1] == 0 or array.size == 0:
            expected = "[N, K]" if self.batched else "[K]"
            raise ValueError(f"{name} must have shape {expected} with K >= 1 for this model, got {array.shape}")
        return array

    def _temperature(self, value: Any, shape: tuple[int, ...]) -> np.ndarray:
        # Fast path for the usual call (a Python or NumPy real scalar well inside
        # the dtype's range): a per-epoch call should cost little more than ONNX
        # Runtime's own run. Everything else takes the full check below.
        if type(value) is float or type(value) is int or isinstance(value, (np.floating, np.integer)):
            scalar = float(value)
            if self._smallest_temperature <= scalar <= self._largest_temperature:
                return np.array(scalar, self.dtype).reshape(self._temperature_shape)
        raw = _real_array(value, "temperature").astype(np.float64)
        info = np.finfo(self.dtype)
        if raw.size == 1:
            scalar = float(raw.reshape(()))
            if not (math.isfinite(scalar) and scalar > 0.0):
                raise ValueError(f"temperature must be finite and > 0 (the paper uses 2.0), got {scalar!r}")
            self._check_range(raw, info, "")
            return raw.astype(self.dtype).reshape((1,) * self._temperature_rank)
        if not (self.batched and raw.shape == (shape[0], 1)):
            allowed = "a scalar or [N, 1]" if self.batched else "a scalar"
            raise ValueError(f"temperature must be {allowed}, got shape {raw.shape}")
        bad = ~(np.isfinite(raw) & (raw > 0))
        if bad.any():
            row = int(np.argmax(bad[:, 0]))
            raise ValueError(
                f"temperature must be finite and > 0 (the paper uses 2.0), got {float(raw[row, 0])!r} in row {row}"
            )
        self._check_range(raw, info, " in row {row}")
        return raw.astype(self.dtype)

    def _check_range(self, raw: np.ndarray, info: np.finfo, where: str) -> None:
        """A valid float64 temperature that the model's dtype turns into inf or 0 is an error, not NaN rows."""
        with np.errstate(over="ignore", under="ignore"):
            cast = raw.astype(self.dtype)
        lost = ~np.isfinite(cast) | (cast == 0)
        if lost.any():
            index = int(np.argmax(lost.reshape(-1)))
            value = float(raw.reshape(-1)[index])
            raise ValueError(
                f"temperature {value!r}{where.format(row=index)} is outside the range of this model's {self.dtype}: "
                f"a temperature must lie between {float(info.smallest_subnormal):.3g} and {float(info.max):.8g}"
            )
