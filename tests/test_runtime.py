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

from dwa_export import DWAHistory, DWAWeights
from dwa_export.runtime import DWAWeightsSession
from reference import dwa_weights, epoch_weights

ROOT = Path(__file__).resolve().parents[1]
ONNX = ROOT / "exported" / "dwa_weights.onnx"
BATCHED = ROOT / "exported" / "dwa_weights_batched.onnx"


def loss_sequence(seed: int = 3, epochs: int = 6, batches: int = 4, k: int = 3) -> list[list[list[float]]]:
    rng = np.random.default_rng(seed)
    return [
        [
            (rng.uniform(0.5, 1.5, k) / (1 + e * rng.uniform(0.1, 0.5, k))).astype(np.float32).tolist()
            for _ in range(batches)
        ]
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
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
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


@pytest.mark.parametrize(
    "temperature,match",
    [
        ([[1.0], [-1.0]], r"got -1.0 in row 1"),
        ([[1.0], [math.nan]], r"got nan in row 1"),
        ([[math.inf], [1.0]], r"got inf in row 0"),
        ([[2.0], [-math.inf]], r"got -inf in row 1"),
        ([[0.0], [2.0]], r"got 0.0 in row 0"),
        ([[2.0], [1e39]], r"temperature 1e\+39 in row 1 is outside the range of this model's float32"),
    ],
)
def test_batched_session_validates_per_row_temperature(temperature, match):
    kernel = DWAWeightsSession(BATCHED)
    ones = np.ones((2, 3), np.float32)
    for value in (np.array(temperature, np.float64), temperature):  # an array, or nested lists
        with pytest.raises(ValueError, match=match):
            kernel(ones, ones, value)
    with pytest.raises(ValueError, match=r"a scalar or \[N, 1\]"):
        kernel(ones, ones, np.ones((3, 1), np.float32))
    # One bad row spoils the call, but a good per-row temperature still works.
    np.testing.assert_allclose(kernel(ones * 0.5, ones, [[2.0], [0.5]]), 1.0)


@pytest.mark.parametrize(
    "temperature", [True, False, np.True_, np.array(True), "2.0", "abc", b"2", 2 + 0j, np.complex64(2)]
)
def test_session_rejects_temperatures_that_are_not_real_numbers(temperature):
    # The rest of the library rejects bool/str T with TypeError; so does the session, naming the argument.
    with pytest.raises(TypeError, match="temperature must be a real number|temperature must hold real numbers"):
        DWAWeightsSession(ONNX)([1.0, 1.0], [1.0, 1.0], temperature)


@pytest.mark.parametrize(
    "temperature,match",
    [
        (
            1e308,
            r"temperature 1e\+308 is outside the range of this model's float32: .* between 1.4e-45 and 3.4028235e\+38",
        ),
        (1e-50, r"temperature 1e-50 is outside the range of this model's float32"),
        (np.float64(5e38), r"temperature 5e\+38 is outside"),
    ],
)
def test_session_names_a_temperature_the_model_dtype_cannot_hold(temperature, match):
    with pytest.raises(ValueError, match=match):
        DWAWeightsSession(ONNX)([1.0, 1.0], [1.0, 1.0], temperature)


def test_session_accepts_numbers_of_every_real_kind_as_temperature():
    kernel = DWAWeightsSession(ONNX)
    expected = kernel([0.75, 0.86], [1.0, 1.0], 2.0)
    np.testing.assert_allclose(expected, [0.9725069, 1.0274931], atol=1e-6)
    for temperature in (2, np.int64(2), np.float16(2), np.float32(2), np.array(2.0), np.array([2.0])):
        np.testing.assert_array_equal(kernel([0.75, 0.86], [1.0, 1.0], temperature), expected)
    # The extremes of float32 are (silly but) representable temperatures: uniform, and all to the max.
    np.testing.assert_allclose(kernel([0.75, 0.86], [1.0, 1.0], 3e38), [1.0, 1.0])
    np.testing.assert_array_equal(kernel([0.75, 0.86], [1.0, 1.0], 1.5e-45), [0.0, 2.0])


@pytest.mark.parametrize(
    "losses,error,match",
    [
        (["a", "b"], TypeError, r"loss_t1 must hold real numbers .*got dtype <U1"),
        ("0.5", TypeError, r"loss_t1 must be a real number or an array of them, got str"),
        ([True, False], TypeError, r"loss_t1 must hold real numbers .*got dtype bool"),
        ([1 + 1j, 2], TypeError, r"loss_t1 must hold real numbers .*complex128"),
        ([[1.0, 2.0], [3.0]], ValueError, r"loss_t1 cannot be read as an array"),
        (
            [1e39, 1.0],
            ValueError,
            r"loss_t1 value 1e\+39 does not fit this model's float32 \(largest finite 3.4028235e\+38\)",
        ),
    ],
)
def test_session_names_the_loss_argument_that_is_not_numbers(losses, error, match):
    with pytest.raises(error, match=match):
        DWAWeightsSession(ONNX)(losses, [1.0, 1.0], 2.0)


def test_session_passes_invalid_losses_to_the_kernel_which_returns_nan_rows():
    # Valid arguments whose values are outside DWA's domain: the kernel's NaN rows, as in every runtime.
    batched = DWAWeightsSession(BATCHED)
    l1 = np.array([[1.0, 2.0], [0.0, 1.0], [-1.0, 2.0], [0.75, 0.86]], np.float32)
    l2 = np.array([[math.inf, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]], np.float32)
    out = batched(l1, l2, 2.0)
    assert np.isnan(out[:3]).all() and np.isfinite(out[3]).all()


# --------------------------------------------------------------------------- which files the session opens


def make_model(path: Path, elem_type: int = 1, producer: str = "", body: str = "Add", ranks=(1, 1, 0)) -> Path:
    """A model with the kernel's input and output names whose graph is not DWA."""
    import onnx
    from onnx import helper

    dims = {0: [], 1: ["K"], 2: ["N", "K"]}
    inputs = [
        helper.make_tensor_value_info(n, elem_type, dims[r])
        for n, r in zip(("loss_t1", "loss_t2", "temperature"), ranks, strict=True)
    ]
    output = helper.make_tensor_value_info("weights", elem_type, dims[ranks[0]])
    if body == "Add":
        nodes = [helper.make_node("Add", ["loss_t1", "loss_t2"], ["weights"])]
    else:  # a softmax without K: plausible, wrong
        nodes = [
            helper.make_node("Div", ["loss_t1", "loss_t2"], ["rates"]),
            helper.make_node("Div", ["rates", "temperature"], ["scaled"]),
            helper.make_node("Softmax", ["scaled"], ["weights"], axis=-1),
        ]
    graph = helper.make_graph(nodes, "foreign", inputs, [output])
    model = helper.make_model(graph, producer_name=producer, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"elem_type": 7}, r"element types \['tensor\(int64\)'\], expected one of tensor\(float\)"),  # was KeyError
        ({}, r"producer '', expected 'dwa_export'"),  # an Add graph: was accepted
        ({"ranks": (2, 2, 0), "producer": "dwa_export"}, r"ranks \(2, 2, 0, 2\)"),
        ({"producer": "dwa_export"}, r"for rates 0.75, 0.86 at T = 2 it returns \[1.75 1.86\]"),
        ({"producer": "dwa_export", "body": "softmax"}, r"is not a DWA kernel: for rates 0.75, 0.86"),
    ],
)
def test_session_refuses_a_foreign_model_with_the_right_names(tmp_path, kwargs, match):
    path = make_model(tmp_path / "dwa_weights.onnx", **kwargs)
    with pytest.raises(ValueError, match=match) as info:
        DWAWeightsSession(path)
    assert str(path) in str(info.value)


def test_session_refuses_a_file_that_differs_from_the_manifest_beside_it(tmp_path):
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "manifest.json").write_text((ROOT / "exported" / "manifest.json").read_text())
    # The right graph, one byte of documentation changed: the numbers are right, the file is not the one exported.
    import onnx

    model = onnx.load(str(ONNX))
    model.doc_string += " "
    onnx.save(model, str(folder / "dwa_weights.onnx"))
    with pytest.raises(
        ValueError, match=r"is not the DWA kernel that .*manifest.json describes: its sha256 is [0-9a-f]{64}"
    ):
        DWAWeightsSession(folder / "dwa_weights.onnx")
    # Without the manifest, the hand-worked example vouches for it.
    (folder / "manifest.json").unlink()
    np.testing.assert_allclose(
        DWAWeightsSession(folder / "dwa_weights.onnx")([0.75, 0.86], [1.0, 1.0]), [0.9725069, 1.0274931], atol=1e-6
    )


def test_session_opens_the_exported_files_with_or_without_their_manifest(tmp_path):
    for source in (ONNX, BATCHED):
        alone = tmp_path / source.name
        alone.write_bytes(source.read_bytes())
        for path in (source, alone):  # beside manifest.json (sha256), and alone (hand-worked example)
            kernel = DWAWeightsSession(path)
            assert kernel.batched == ("batched" in source.name) and kernel.dtype == np.float32
