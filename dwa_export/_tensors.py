"""State tensors that ``torch.compile``, CUDA graphs and ``torch.inference_mode()`` can live with."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["accumulator_dtype", "mark_static", "state_tensor"]


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for running sums, where the device has it (MPS has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def mark_static(tensor: Tensor) -> None:
    """Let CUDA graphs (``torch.compile(mode="reduce-overhead")``) update ``tensor`` in place.

    What ``torch._dynamo.mark_static_address(tensor, guard=False)`` does, without
    importing ``torch._dynamo`` (two seconds) into programs that never compile; no
    public API does this, and ``tests/test_compile.py`` checks that the two stay the
    same. The tensor must then keep its storage, which is how the state is kept.
    Skipped while compiling (a traced tensor takes no attributes).
    """
    if not torch.compiler.is_compiling():
        tensor._dynamo_static_input_type = "unguarded"  # type: ignore[attr-defined]  # see above


def state_tensor(make: Callable[[], Tensor]) -> Tensor:
    """``make()``, as a normal tensor marked static.

    Inside ``torch.inference_mode()`` a new tensor would be an inference tensor,
    which training could not update in place afterwards.
    """
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            tensor = make()
    else:
        tensor = make()
    mark_static(tensor)
    return tensor
