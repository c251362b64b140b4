"""torchjd's own DWA test cases (torchjd 0.18, tests/unit/scalarization/test_dwa.py), run against dwa_export.DWA.

DWA is documented as a drop-in for torchjd's DWA scalarizer. These are that
project's behaviour tests, ported: its assertion helpers are written out here and
the three that read torchjd's private attributes check the same behaviour
through the public API. Where dwa_export differs on purpose (README, "Coming
from torchjd"), the test says so.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from dwa_export import DWA


def tensor_(values) -> Tensor:
    return torch.tensor(values, dtype=torch.float32)


ALL_INPUTS = [torch.randn(shape, generator=torch.Generator().manual_seed(0)) for shape in ([], [5], [3, 4], [2, 3, 4])]


def assert_returns_scalar(scalarizer, losses: Tensor) -> None:
    out = scalarizer(losses)
    assert out.dim() == 0
    assert out.isfinite()


def assert_grad_flow(scalarizer, losses: Tensor) -> None:
    leaf = losses.detach().requires_grad_()
    out = scalarizer(leaf)
    out.backward()
    assert leaf.grad is not None
    assert leaf.grad.isfinite().all()


def test_value_bootstrap():
    # Before two epochs have completed, DWA uses uniform weights (so it acts like a sum).
    values = tensor_([1.0, 2.0, 4.0])
    torch.testing.assert_close(DWA()(values), tensor_(7.0))


def test_uniform_weights_for_first_two_epochs():
    dwa = DWA(temperature=2.0)
    torch.testing.assert_close(dwa(tensor_([1.0, 3.0])), tensor_(4.0))
    dwa.step()
    torch.testing.assert_close(dwa(tensor_([2.0, 5.0])), tensor_(7.0))
    dwa.step()


def test_weights_from_previous_two_epochs():
    dwa = DWA(temperature=2.0)
    dwa(tensor_([1.0, 1.0]))
    dwa.step()  # Epoch 1 average = [1, 1].
    dwa(tensor_([1.0, 4.0]))
    dwa.step()  # Epoch 2 average = [1, 4].
    losses = tensor_([3.0, 5.0])  # Epoch 3: rates = [1, 4] / [1, 1] = [1, 4].
    expected_weights = 2.0 * torch.softmax(tensor_([1.0, 4.0]) / 2.0, dim=0)
    torch.testing.assert_close(dwa(losses), (expected_weights * losses).sum())


def test_uses_per_epoch_average():
    dwa = DWA(temperature=2.0)
    dwa(tensor_([2.0, 2.0]))
    dwa(tensor_([0.0, 0.0]))
    dwa.step()  # Epoch 1 average = [1, 1].
    dwa(tensor_([2.0, 6.0]))
    dwa(tensor_([0.0, 2.0]))
    dwa.step()  # Epoch 2 average = [1, 4].
    losses = tensor_([3.0, 5.0])
    expected_weights = 2.0 * torch.softmax(tensor_([1.0, 4.0]) / 2.0, dim=0)
    torch.testing.assert_close(dwa(losses), (expected_weights * losses).sum())


def test_step_discards_oldest_epoch():
    dwa = DWA(temperature=2.0)
    dwa(tensor_([9.0, 9.0]))
    dwa.step()
    dwa(tensor_([1.0, 1.0]))
    dwa.step()
    dwa(tensor_([1.0, 4.0]))
    dwa.step()
    losses = tensor_([3.0, 5.0])  # Epoch 4 uses only epochs 2 and 3.
    expected_weights = 2.0 * torch.softmax(tensor_([1.0, 4.0]) / 2.0, dim=0)
    torch.testing.assert_close(dwa(losses), (expected_weights * losses).sum())


def test_weights_sum_to_numel():
    dwa = DWA()
    dwa(tensor_([1.0, 2.0]))
    dwa.step()
    dwa(tensor_([2.0, 1.0]))
    dwa.step()
    torch.testing.assert_close(dwa(torch.ones(2)), tensor_(2.0))


@pytest.mark.parametrize("values", ALL_INPUTS, ids=lambda v: str(list(v.shape)))
def test_expected_structure(values):
    # Shapes [3, 4] and [2, 3, 4] are samples of K = 4 tasks here (torchjd: 12 and 24 tasks).
    assert_returns_scalar(DWA(), values)


@pytest.mark.parametrize("values", ALL_INPUTS, ids=lambda v: str(list(v.shape)))
def test_grad_flow(values):
    assert_grad_flow(DWA(), values)


def test_grad_flows_with_computed_weights():
    dwa = DWA(temperature=2.0)
    dwa(tensor_([1.0, 1.0]))
    dwa.step()
    dwa(tensor_([1.0, 4.0]))
    dwa.step()
    assert_grad_flow(dwa, tensor_([3.0, 5.0]))


def test_reset():
    # torchjd checks its private _previous_averages, _loss_sum and _n_batches.
    dwa = DWA()
    dwa(tensor_([1.0, 2.0]))
    dwa.step()
    dwa(tensor_([3.0, 4.0]))
    dwa.reset()
    assert dwa.history.averages == () and dwa.history.state_dict()["partial"] is None
    dwa.step()
    assert dwa.history.averages == ()


def test_step_without_forward_is_noop():
    dwa = DWA()
    dwa.step()
    assert dwa.history.averages == () and dwa.log == []


def test_has_no_learnable_parameters():
    assert list(DWA().parameters()) == []


def test_does_not_raise_on_negative_input():
    assert_returns_scalar(DWA(), tensor_([-1.0, -2.0, 3.0]))


def test_raises_on_shape_change_within_epoch():
    dwa = DWA()
    dwa(tensor_([1.0, 2.0]))
    with pytest.raises(ValueError):
        dwa(tensor_([1.0, 2.0, 3.0]))


def test_raises_on_shape_change_between_epochs():
    dwa = DWA()
    dwa(tensor_([1.0, 2.0]))
    dwa.step()
    dwa(tensor_([2.0, 1.0]))
    dwa.step()
    with pytest.raises(ValueError):
        dwa(tensor_([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_raises_on_non_positive_temperature(temperature):
    with pytest.raises(ValueError):
        DWA(temperature=temperature)


def test_representations():
    assert repr(DWA()) == "DWA(temperature=2.0)"
    assert repr(DWA(temperature=1.5)) == "DWA(temperature=1.5)"
    assert str(DWA()) == "DWA"
    # What dwa_export adds shows only when given.
    assert repr(DWA(num_tasks=3)) == "DWA(temperature=2.0, num_tasks=3)"
    assert repr(DWA(tasks=("seg", "depth"))) == "DWA(temperature=2.0, tasks=('seg', 'depth'))"
    assert "(dwa): DWA(temperature=2.0)" in repr(torch.nn.ModuleDict({"dwa": DWA()}))
