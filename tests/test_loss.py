"""DWA, the drop-in loss module."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from dwa_export import DWA, DWAWeights
from reference import epoch_weights

EPOCHS = [
    [[1.0, 2.0, 0.5], [1.2, 2.2, 0.7]],
    [[0.9, 1.9, 0.5], [0.7, 2.1, 0.4]],
    [[0.6, 1.8, 0.3], [0.5, 1.9, 0.3]],
    [[0.5, 1.8, 0.2]],
    [[0.4, 1.5, 0.2]],
]


def test_returns_the_weighted_sum_with_the_reference_weights():
    # The torchjd call pattern: loss = dwa(losses) per batch, dwa.step() per epoch.
    dwa = DWA(temperature=0.5)
    expected = epoch_weights(EPOCHS, 0.5)
    for epoch, batches in enumerate(EPOCHS):
        for losses in batches:
            out = dwa(torch.tensor(losses))
            assert out.dim() == 0
            assert out.item() == pytest.approx(float(np.dot(expected[epoch], losses)), rel=1e-6)
        np.testing.assert_allclose(dwa.weights.numpy(), expected[epoch], atol=1e-6)
        dwa.step()


def test_gradient_flows_through_the_current_losses_only():
    dwa = DWA()
    for losses in ([1.0, 2.0], [0.5, 1.9]):
        dwa(torch.tensor(losses))
        dwa.step()
    losses = torch.tensor([0.4, 1.8], requires_grad=True)
    dwa(losses).backward()
    torch.testing.assert_close(losses.grad, dwa.weights)
    assert not dwa.weights.requires_grad


def test_leading_dims_are_averaged_samples():
    dwa = DWA(num_tasks=2)
    per_sample = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert dwa(per_sample).item() == pytest.approx((1 + 2 + 3 + 6) / 2)


def test_weights_are_computed_once_per_epoch(monkeypatch):
    calls = []
    original = DWAWeights.forward
    monkeypatch.setattr(DWAWeights, "forward", lambda self, *a: calls.append(1) or original(self, *a))
    dwa = DWA()
    for epoch in range(3):
        for _ in range(10):
            dwa(torch.rand(3) + 0.5)
        dwa.step()
    assert len(calls) == 1 + 3  # first batch (warm-up weights) + one per step


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_temperature_is_validated_on_construction_and_assignment(bad):
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        DWA(temperature=bad)
    dwa = DWA()
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        dwa.temperature = bad
    assert dwa.temperature == 2.0
    with pytest.raises(TypeError, match="temperature must be a real number"):
        DWA(temperature="2")


def test_assigning_a_temperature_changes_the_current_weights():
    dwa = DWA(temperature=2.0)
    for losses in ([1.0, 1.0], [0.75, 0.86]):
        dwa(torch.tensor(losses))
        dwa.step()
    assert dwa.weights[0].item() == pytest.approx(2 / (1 + math.exp(0.055)), abs=1e-6)
    dwa.temperature = 0.5
    assert dwa.weights[0].item() == pytest.approx(2 / (1 + math.exp(0.22)), abs=1e-6)


def test_state_dict_round_trip_inside_a_model_mid_epoch():
    def make():
        torch.manual_seed(0)
        return torch.nn.ModuleDict({"net": torch.nn.Linear(3, 2), "dwa": DWA(temperature=1.5)})

    def batches(epoch):
        gen = torch.Generator().manual_seed(epoch)
        return [torch.rand(2, generator=gen) + 0.5 for _ in range(4)]

    reference = make()
    outputs = []
    for epoch in range(5):
        for losses in batches(epoch):
            outputs.append(reference["dwa"](losses))
        reference["dwa"].step()

    first = make()
    resumed_outputs = []
    for epoch in range(3):
        for losses in batches(epoch):
            resumed_outputs.append(first["dwa"](losses))
        first["dwa"].step()
    for losses in batches(3)[:2]:
        resumed_outputs.append(first["dwa"](losses))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)

    second = make()
    second["dwa"].temperature = 9.0  # overwritten by the checkpoint
    second.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert second["dwa"].temperature == 1.5
    for losses in batches(3)[2:]:
        resumed_outputs.append(second["dwa"](losses))
    second["dwa"].step()
    for losses in batches(4):
        resumed_outputs.append(second["dwa"](losses))
    second["dwa"].step()
    assert [o.item() for o in resumed_outputs] == [o.item() for o in outputs]
    assert torch.equal(second["dwa"].weights, reference["dwa"].weights)


def test_malformed_extra_state_raises():
    with pytest.raises(ValueError, match="malformed DWA state"):
        DWA().load_state_dict({"_extra_state": {"temperature": 2.0}})


def test_reset_returns_to_uniform():
    dwa = DWA()
    for losses in ([1.0, 2.0], [0.2, 1.9]):
        dwa(torch.tensor(losses))
        dwa.step()
    assert not torch.equal(dwa.weights, torch.ones(2))
    dwa.reset()
    dwa(torch.tensor([1.0, 1.0]))
    assert torch.equal(dwa.weights, torch.ones(2))


def test_weights_before_any_batch_need_num_tasks():
    with pytest.raises(RuntimeError, match="num_tasks"):
        DWA().weights
    assert DWA(num_tasks=3).weights.tolist() == [1.0, 1.0, 1.0]


def test_half_precision_losses_get_a_half_precision_loss():
    dwa = DWA()
    losses = torch.tensor([0.5, 0.25], dtype=torch.float16, requires_grad=True)
    out = dwa(losses)
    assert out.dtype == torch.float16 and out.item() == 0.75



def test_the_weighted_sum_follows_each_call_s_shape_and_dtype():
    # The per-batch path caches the weights for the last losses' dtype; a call
    # with another dtype or with batched losses must not reuse them wrongly.
    dwa = DWA(temperature=0.5)
    for losses in ([1.0, 2.0, 0.5], [0.9, 1.9, 0.5]):
        dwa(torch.tensor(losses))
        dwa.step()
    w = epoch_weights([[[1.0, 2.0, 0.5]], [[0.9, 1.9, 0.5]], [[0.0, 0.0, 0.0]]], 0.5)[2]
    calls = [
        (torch.tensor([0.8, 1.7, 0.4]), torch.float32),
        (torch.tensor([0.8, 1.7, 0.4]), torch.float32),
        (torch.tensor([0.7, 1.6, 0.4], dtype=torch.float64), torch.float64),
        (torch.tensor([[0.7, 1.6, 0.4], [0.9, 1.8, 0.2]]), torch.float32),
        (torch.tensor([0.6, 1.5, 0.3], dtype=torch.bfloat16), torch.bfloat16),
        (torch.tensor([0.6, 1.5, 0.3]), torch.float32),
    ]
    for losses, dtype in calls:
        out = dwa(losses)
        expected = float(np.mean(losses.double().numpy() @ w))
        assert out.dtype == dtype and out.dim() == 0
        assert out.item() == pytest.approx(expected, rel=1e-2 if dtype is torch.bfloat16 else 1e-6)
    dwa.temperature = 4.0  # new weights: the cached ones must go
    losses = torch.tensor([0.6, 1.5, 0.3])
    w4 = epoch_weights([[[1.0, 2.0, 0.5]], [[0.9, 1.9, 0.5]], [[0.0, 0.0, 0.0]]], 4.0)[2]
    assert dwa(losses).item() == pytest.approx(float(losses.double().numpy() @ w4), rel=1e-6)
