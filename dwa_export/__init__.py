"""Dynamic Weight Average (Liu et al., CVPR 2019) for eager PyTorch, TorchScript, ONNX and C++.

* :class:`DWAWeights`: the stateless weight kernel (scriptable, exportable).
* :class:`DWAHistory`: per-batch loss accumulation and the two-epoch history.
* :class:`DWA`: both combined into a drop-in loss module.

Names are imported on first use, so ``import dwa_export.runtime`` (the torch-free
ONNX Runtime path) never imports torch.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "DWAWeights": "._kernel",
    "DWAHistory": "._history",
    "DWA": "._loss",
    "LossHistoryError": "._epochs",
    "NonFiniteLossWarning": "._epochs",
    "PartialEpochWarning": "._distributed",
    "RankMismatchError": "._distributed",
}

__all__ = [
    "DWA",
    "DWAHistory",
    "DWAWeights",
    "LossHistoryError",
    "NonFiniteLossWarning",
    "PartialEpochWarning",
    "RankMismatchError",
    "__version__",
    "cmake_dir",
    "exported_dir",
    "include_dir",
]

_HERE = Path(__file__).resolve().parent

if TYPE_CHECKING:
    from ._distributed import PartialEpochWarning, RankMismatchError
    from ._epochs import LossHistoryError, NonFiniteLossWarning
    from ._history import DWAHistory
    from ._kernel import DWAWeights
    from ._loss import DWA


def include_dir() -> str:
    """The folder holding the C++ header ``dwa/history.hpp`` (add it with ``-I``).

    For a compiler line: ``c++ -std=c++17 -I"$(python -c "import dwa_export;
    print(dwa_export.include_dir())")" train.cpp``; CMake projects use :func:`cmake_dir`.
    """
    return str(_HERE / "include")


def cmake_dir() -> str:
    """The folder of ``dwa_exportConfig.cmake``: ``cmake -Ddwa_export_DIR=...`` for ``find_package(dwa_export)``."""
    return str(_HERE / "cmake")


def exported_dir() -> str:
    """The folder of the exported kernels (``dwa_weights.onnx``, ``dwa_weights.pt``, ...) and their manifest.

    The wheel ships a copy of ``exported/`` inside the package; a checkout (or an
    editable install) has it beside the package.
    """
    for folder in (_HERE / "exported", _HERE.parent / "exported"):
        if (folder / "manifest.json").is_file():
            return str(folder)
    raise FileNotFoundError(
        f"no exported kernels beside {_HERE}: reinstall dwa-export, or run dwa-export in a checkout"
    )


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dwa_export' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module, __name__), name)
    except ModuleNotFoundError as error:
        if error.name != "torch":
            raise
        raise ImportError(
            f"dwa_export.{name} needs PyTorch, which is not installed. Install the build for your machine "
            "(https://pytorch.org/get-started/locally/; CPU only: pip install torch --index-url "
            'https://download.pytorch.org/whl/cpu), or pip install "dwa-export[torch]" for PyPI\'s default '
            'build. Without torch, dwa_export.runtime runs the shipped ONNX kernel: pip install "dwa-export[runtime]".'
        ) from error
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
