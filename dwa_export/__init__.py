"""Dynamic Weight Average (Liu et al., CVPR 2019) for eager PyTorch, TorchScript, ONNX and C++.

* :class:`DWAWeights`: the stateless weight kernel (scriptable, exportable).
* :class:`DWAHistory`: per-batch loss accumulation and the two-epoch history.
* :class:`DWA`: both combined into a drop-in loss module.

Names are imported on first use, so ``import dwa_export.runtime`` (the torch-free
ONNX Runtime path) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "DWAWeights": "._kernel",
    "DWAHistory": "._history",
    "DWA": "._loss",
    "LossHistoryError": "._epochs",
    "PartialEpochWarning": "._distributed",
    "RankMismatchError": "._distributed",
}

__all__ = [
    "DWA",
    "DWAHistory",
    "DWAWeights",
    "LossHistoryError",
    "PartialEpochWarning",
    "RankMismatchError",
    "__version__",
    "include_dir",
]

if TYPE_CHECKING:
    from ._distributed import PartialEpochWarning, RankMismatchError
    from ._epochs import LossHistoryError
    from ._history import DWAHistory
    from ._kernel import DWAWeights
    from ._loss import DWA


def include_dir() -> str:
    """The folder holding the C++ header ``dwa/history.hpp`` (add it with ``-I``).

    Like ``torch.utils.cmake_prefix_path``: ``cmake -DDWA_INCLUDE_DIR=$(python -c
    "import dwa_export; print(dwa_export.include_dir())")``.
    """
    from pathlib import Path

    return str(Path(__file__).resolve().parent / "include")


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dwa_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
