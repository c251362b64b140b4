"""NumpyDWAHistory: the torch history's rules for torch-free trainers, and what NumPy adds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dwa_export import DWAHistory, LossHistoryError
from dwa_export.runtime import NumpyDWAHistory


def test_numpy_history_shares_the_rules_of_the_torch_history():
    numpy_history, torch_history = NumpyDWAHistory(), DWAHistory()
    for losses, weight in (([2.0, 1.0], 3), ([4.0, 2.0], 1)):
        numpy_history.record(np.array(losses, np.float32), weight)
        torch_history.record(torch.tensor(losses), weight)
    numpy_history.step()
    torch_history.step()
    assert numpy_history.averages == torch_history.averages == ((2.5, 1.25),)
    assert numpy_history.log == torch_history.log
    for history, losses in (
        (numpy_history, np.array([0.0, 1.0], np.float32)),
        (torch_history, torch.tensor([0.0, 1.0])),
    ):
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


def test_weighted_and_per_row_records():
    history = NumpyDWAHistory()
    history.record(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), weight=np.array([1.0, 3.0]))
    history.record(np.array([5.0, 6.0], np.float32))
    history.step()
    assert history.averages[-1] == pytest.approx(((1 + 9 + 5) / 5, (2 + 12 + 6) / 5))
    with pytest.raises(ValueError, match=r"must have the batch shape \[2\]"):
        history.record(np.ones((2, 2), np.float32), weight=np.ones(3))
    with pytest.raises(ValueError, match="is one number, but the losses have rows"):
        history.record(np.ones((2, 2), np.float32), weight=2)
    with pytest.raises(ValueError, match="has K=2"):
        history.record(np.ones(3, np.float32))
    assert [a.dtype for a in history.inputs()] == [np.float32, np.float32]


@pytest.mark.parametrize("weight", [np.float32(2), np.int64(2), np.array(2.0), np.array(2), 2, 2.0])
def test_numpy_scalars_and_0d_arrays_are_numbers(weight):
    history = NumpyDWAHistory()
    history.record(np.array([1.0, 2.0], np.float32), weight=weight)
    history.record(np.array([4.0, 8.0], np.float32))
    history.step()
    assert history.averages[-1] == (2.0, 4.0)  # (2 * 1 + 4) / 3, (2 * 2 + 8) / 3
    assert history.log[-1]["weight"] == 3.0


@pytest.mark.parametrize(
    "weight,match",
    [
        (np.array([-1.0, 2.0]), "got -1.0 at row 0"),
        (np.array([1.0, math.nan]), "got nan at row 1"),
        (np.array(-5.0), "weight must be finite and >= 0"),
        (np.array(math.nan), "weight must be finite and >= 0"),
        (np.array(["a", "b"]), "real array"),
        (np.array(True), "real number"),
    ],
)
def test_invalid_weights_are_rejected_at_once_changing_nothing(weight, match):
    history = NumpyDWAHistory()
    history.record(np.ones(2, np.float32))
    before = history.state_dict()
    losses = np.ones((2, 2), np.float32) if np.ndim(weight) else np.ones(2, np.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        history.record(losses, weight=weight)
    assert history.state_dict() == before


def test_a_failed_first_record_does_not_fix_k():
    history = NumpyDWAHistory()
    with pytest.raises(ValueError, match="batch shape"):
        history.record(np.ones((2, 2), np.float32), weight=np.ones(3))
    assert history.num_tasks is None
    history.record(np.ones(3, np.float32))
    assert history.num_tasks == 3


def test_float64_losses_are_summed_and_handed_out_in_float64():
    history = NumpyDWAHistory()
    third = np.array([1 / 3, 2 / 3])
    for _ in range(3):
        history.record(third)
    history.step()
    assert history.averages[-1] == (1 / 3, 2 / 3)  # float32 sums would be off by ~1e-8
    history.record(third * 0.5)
    history.step()
    loss_t1, loss_t2 = history.inputs()
    assert loss_t1.dtype == np.float64 and loss_t1.tolist() == [1 / 6, 1 / 3] and loss_t2.tolist() == [1 / 3, 2 / 3]


def test_longdouble_losses_are_refused_so_the_state_stays_json():
    history = NumpyDWAHistory()
    with pytest.raises(TypeError, match="float128|longdouble|convert them to float32 or float64"):
        history.record(np.ones(2, dtype=np.longdouble))
    assert history.num_tasks is None
    json.dumps(history.state_dict())


def test_a_mid_epoch_torch_state_with_tensor_weights_moves_to_numpy_with_its_weight_sum():
    torch_history = DWAHistory()
    torch_history.record(torch.tensor([1.0, 2.0]))
    torch_history.step()
    torch_history.record(torch.tensor([[2.0, 4.0], [6.0, 8.0]]), weight=torch.tensor([0.5, 1.5]))
    torch_history.record(torch.tensor([1.0, 1.0]), weight=torch.tensor(3.0))
    numpy_history = NumpyDWAHistory()
    numpy_history.load_state_dict(json.loads(json.dumps(torch_history.state_dict())))
    assert numpy_history.state_dict()["partial"][2:6] == [2, 3, 0, 5.0]  # batches, rows, nonfinite_rows, weight
    for history, losses in (
        (torch_history, torch.tensor([2.0, 2.0])),
        (numpy_history, np.array([2.0, 2.0], np.float32)),
    ):
        history.record(losses)
        history.step()
    # (0.5 * 2 + 1.5 * 6 + 3 * 1 + 2) / 6 and (0.5 * 4 + 1.5 * 8 + 3 * 1 + 2) / 6
    assert numpy_history.averages[-1] == torch_history.averages[-1] == pytest.approx((15 / 6, 19 / 6))


def test_named_tasks_and_scalar_losses():
    history = NumpyDWAHistory(tasks=("seg", "depth"))
    history.record({"depth": 2.0, "seg": 1.0})
    history.record(np.array([3.0, 4.0], np.float32))
    with pytest.raises(ValueError, match=r"missing \['depth'\]"):
        history.record({"seg": 1.0})
    history.step()
    assert history.averages[-1] == (2.0, 3.0)
    single = NumpyDWAHistory()
    single.record(np.float32(0.5))
    assert single.num_tasks == 1


def test_number_weighted_records_round_alike_in_torch_and_numpy():
    # In float64, the product weight x loss, rounded, then the add, rounded: a fused
    # multiply-add (torch's add_(alpha=)) rounds once and gives ...607 here, not ...61.
    torch_history, numpy_history = DWAHistory(), NumpyDWAHistory()
    batches = [([1.0, 0.43319879426122676], None), ([1.0, 0.8442331511654346], 3.3)]
    for losses, weight in batches:
        torch_history.record(torch.tensor(losses, dtype=torch.float64), weight)
        numpy_history.record(np.array(losses), weight)
    assert torch_history.state_dict() == numpy_history.state_dict()
    assert (
        torch_history.state_dict()["partial"][6][1]
        == 0.43319879426122676 + 0.8442331511654346 * 3.3
        == 3.219168193107161
    )


def test_losses_of_any_float_dtype_are_summed_in_float64():
    history = NumpyDWAHistory()
    for dtype in (np.float16, np.float32):
        history.record(np.array([1 / 3, 2 / 3], dtype=dtype))
    history.step()
    expected = (float(np.float16(1 / 3)) + float(np.float32(1 / 3))) / 2
    assert history.averages[-1][0] == expected and history.dtype == np.float32
