"""dwa_export.runtime: the torch-free ONNX Runtime path."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dwa_export import DWAHistory, DWAWeights, LossHistoryError
from dwa_export.runtime import DWAWeightsSession, NumpyDWAHistory
from reference import dwa_weights, epoch_weights

ROOT = Path(__file__).resolve().parents[1]
ONNX = ROOT / "exported" / "dwa_weights.onnx"
BATCHED = ROOT / "exported" / "dwa_weights_batched.onnx"


def loss_sequence(seed: int = 3, epochs: int = 6, batches: int = 4, k: int = 3) -> list[list[list[float]]]:
    rng = np.random.default_rng(seed)
    return [
        [(rng.uniform(0.5, 1.5, k) / (1 + e * rng.uniform(0.1, 0.5, k))).astype(np.float32).tolist() for _ in range(batches)]
        for e in range(epochs)
    ]


TORCH_FREE_SCRIPT = """
import importlib.abc, json, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not available on this runtime trainer")

sys.meta_path.insert(0, NoTorch())
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("the import blocker did not work")

import numpy as np
from dwa_export.runtime import DWAWeightsSession, NumpyDWAHistory

kernel = DWAWeightsSession(sys.argv[1])
history = NumpyDWAHistory()
weights = []
for epoch in json.loads(sys.argv[2]):
    for losses in epoch:
        history.record(np.array(losses, dtype=np.float32))
    history.step()
    weights.append(kernel(*history.inputs(), temperature=2.0).tolist())
print(json.dumps({"weights": weights, "torch_loaded": "torch" in sys.modules, "state": history.state_dict()}))
"""


def test_runs_where_torch_cannot_be_imported_and_matches_the_torch_path():
    epochs = loss_sequence()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_SCRIPT, str(ONNX), json.dumps(epochs)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["torch_loaded"] is False

    history, kernel = DWAHistory(), DWAWeights()
    torch_weights = []
    for epoch in epochs:
        for losses in epoch:
            history.record(torch.tensor(losses))
        history.step()
        torch_weights.append(kernel(*history.inputs(), torch.tensor(2.0)).tolist())
    np.testing.assert_allclose(out["weights"], torch_weights, rtol=0, atol=1e-6)
    # The same averages, so the checkpoints agree too (and load into each other).
    np.testing.assert_allclose(out["state"]["averages"], history.state_dict()["averages"], rtol=1e-7)
    # Weights after epoch e's step are those used in epoch e + 1.
    np.testing.assert_allclose(out["weights"][:-1], epoch_weights(epochs, 2.0)[1:], atol=2e-6)


def test_import_dwa_export_runtime_does_not_import_torch():
    code = "import sys, dwa_export.runtime, dwa_export; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.stdout.strip() == "False", result.stderr


def test_session_matches_the_reference_single_and_batched():
    single, batched = DWAWeightsSession(ONNX), DWAWeightsSession(BATCHED)
    assert not single.batched and batched.batched and single.dtype == np.float32
    np.testing.assert_allclose(single([0.75, 0.86], [1.0, 1.0], 2.0), [0.9725069, 1.0274931], atol=1e-6)
    l1 = np.array([[0.75, 0.86], [0.2, 0.9], [1.0, 1.0]], np.float32)
    l2 = np.ones((3, 2), np.float32)
    np.testing.assert_allclose(batched(l1, l2, 2.0), dwa_weights(l1, l2, 2.0), atol=1e-6)
    per_row = np.array([[2.0], [0.5], [1.0]], np.float32)
    np.testing.assert_allclose(batched(l1, l2, per_row), dwa_weights(l1, l2, per_row), atol=1e-6)


@pytest.mark.parametrize(
    "args,error,match",
    [
        (([1.0, 1.0], [1.0, 1.0], 0.0), ValueError, "temperature must be finite and > 0.*got 0.0"),
        (([1.0, 1.0], [1.0, 1.0], -2.0), ValueError, "got -2.0"),
        (([1.0, 1.0], [1.0, 1.0], math.inf), ValueError, "got inf"),
        (([1.0, 1.0], [1.0, 1.0], math.nan), ValueError, "got nan"),
        (([1.0, 1.0], [1.0, 1.0, 1.0], 2.0), ValueError, r"same shape, got \(2,\) and \(3,\)"),
        ((np.ones(2), np.ones(2), 2.0), TypeError, "loss_t1 must be float32 for this model, got float64"),
        ((np.ones((2, 2), np.float32), np.ones((2, 2), np.float32), 2.0), ValueError, r"shape \[K\]"),
        ((np.ones(0, np.float32), np.ones(0, np.float32), 2.0), ValueError, "K >= 1"),
        (([1.0, 1.0], [1.0, 1.0], [2.0, 2.0]), ValueError, "temperature must be a scalar"),
    ],
)
def test_session_validates_inputs_before_onnxruntime(args, error, match):
    with pytest.raises(error, match=match):
        DWAWeightsSession(ONNX)(*args)


def test_batched_session_validates_per_row_temperature():
    kernel = DWAWeightsSession(BATCHED)
    ones = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"got -1.0 in row 1"):
        kernel(ones, ones, np.array([[1.0], [-1.0]], np.float32))
    with pytest.raises(ValueError, match=r"a scalar or \[N, 1\]"):
        kernel(ones, ones, np.ones((3, 1), np.float32))


def test_numpy_history_shares_the_rules_of_the_torch_history():
    numpy_history, torch_history = NumpyDWAHistory(), DWAHistory()
    for losses, weight in (([2.0, 1.0], 3), ([4.0, 2.0], 1)):
        numpy_history.record(np.array(losses, np.float32), weight)
        torch_history.record(torch.tensor(losses), weight)
    numpy_history.step()
    torch_history.step()
    assert numpy_history.averages == torch_history.averages == ((2.5, 1.25),)
    for history, losses in ((numpy_history, np.array([0.0, 1.0], np.float32)), (torch_history, torch.tensor([0.0, 1.0]))):
        history.record(losses)
        with pytest.raises(LossHistoryError, match="task 0 is 0.0") as info:
            history.step()
        assert info.value.task == 0
    # A checkpoint from one loads into the other, mid-epoch.
    restored = DWAHistory()
    restored.load_state_dict(json.loads(json.dumps(numpy_history.state_dict())))
    assert restored.state_dict() == torch_history.state_dict()
    back = NumpyDWAHistory()
    back.load_state_dict(torch_history.state_dict())
    assert back.state_dict() == numpy_history.state_dict()


def test_numpy_history_weighted_and_per_row_records():
    history = NumpyDWAHistory()
    history.record(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), weight=np.array([1.0, 3.0]))
    history.record(np.array([5.0, 6.0], np.float32))
    history.step()
    assert history.averages[-1] == pytest.approx(((1 + 9 + 5) / 5, (2 + 12 + 6) / 5))
    with pytest.raises(ValueError, match="does not broadcast"):
        history.record(np.ones((2, 2), np.float32), weight=np.ones(3))
    with pytest.raises(ValueError, match="has K=2"):
        history.record(np.ones(3, np.float32))
    assert [a.dtype for a in history.inputs()] == [np.float32, np.float32]
