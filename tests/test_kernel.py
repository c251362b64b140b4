"""DWAWeights against the float64 reference, hand-worked numbers and DWA's properties."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dwa_export import DWAWeights
from reference import dwa_weights

EAGER = DWAWeights()
SCRIPTED = torch.jit.script(DWAWeights())
KERNELS = pytest.mark.parametrize("kernel", [EAGER, SCRIPTED], ids=["eager", "scripted"])


def t(values, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


@KERNELS
def test_hand_worked_numbers(kernel):
    # Rates 0.75 and 0.86, T = 2: w1 = 2 / (1 + exp((0.86 - 0.75) / 2)) = 2 / (1 + e^0.055).
    w1 = 2 / (1 + math.exp(0.055))
    assert w1 == pytest.approx(0.97251, abs=1e-5)
    out = kernel(t([0.75, 0.86]), t([1.0, 1.0]), t(2.0))
    assert out.tolist() == pytest.approx([0.9725, 1.0275], abs=1e-4)
    assert out.tolist() == pytest.approx([w1, 2 - w1], abs=1e-6)
    # The same rates from other losses: only the ratio matters.
    out = kernel(t([1.5, 0.43]), t([2.0, 0.5]), t(2.0))
    assert out.tolist() == pytest.approx([w1, 2 - w1], abs=1e-6)


@KERNELS
def test_smaller_temperature_widens_the_spread(kernel):
    loss_t1, loss_t2 = t([0.75, 0.86]), t([1.0, 1.0])
    spread = [float(kernel(loss_t1, loss_t2, t(temp)).diff()) for temp in (2.0, 0.5, 0.1)]
    assert 0 < spread[0] < spread[1] < spread[2] < 2
    # T = 0.5 by hand: 2 / (1 + e^0.22) = 0.8904...
    assert kernel(loss_t1, loss_t2, t(0.5))[0].item() == pytest.approx(2 / (1 + math.exp(0.22)), abs=1e-6)


@KERNELS
@pytest.mark.parametrize("shape", [(1,), (2,), (3,), (16,), (1000,), (4, 3), (2, 5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_float64_reference(kernel, shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    loss_t2 = torch.rand(shape, generator=gen, dtype=torch.float64) * 3 + 0.1
    loss_t1 = loss_t2 * (torch.rand(shape, generator=gen, dtype=torch.float64) * 0.6 + 0.6)
    loss_t1, loss_t2 = loss_t1.to(dtype), loss_t2.to(dtype)
    for temperature in (0.1, 2.0, 50.0):
        temperature = torch.tensor(temperature, dtype=dtype)
        out = kernel(loss_t1, loss_t2, temperature)
        assert out.dtype == dtype and out.shape == shape
        # Reference on the same rounded inputs.
        expected = dwa_weights(loss_t1.double().numpy(), loss_t2.double().numpy(), temperature.item())
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        np.testing.assert_allclose(out.double().numpy(), expected, rtol=0, atol=tol * max(1, shape[-1] ** 0.5))


@KERNELS
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_low_precision_dtypes(kernel, dtype, tol):
    loss_t1, loss_t2 = t([0.75, 0.86, 0.5, 1.2], dtype), t([1.0, 1.0, 0.9, 1.1], dtype)
    out = kernel(loss_t1, loss_t2, torch.tensor(2.0))
    assert out.dtype == dtype
    expected = dwa_weights(loss_t1.double().numpy(), loss_t2.double().numpy(), 2.0)
    np.testing.assert_allclose(out.double().numpy(), expected, atol=tol * 4, rtol=0)


@KERNELS
def test_per_row_temperature(kernel):
    loss_t1 = t([[0.75, 0.86], [0.75, 0.86], [0.2, 0.9]])
    loss_t2 = torch.ones(3, 2)
    temperature = t([[2.0], [0.5], [1.0]])
    out = kernel(loss_t1, loss_t2, temperature)
    expected = np.stack(
        [dwa_weights(loss_t1[i].numpy(), loss_t2[i].numpy(), temperature[i, 0].item()) for i in range(3)]
    )
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


@given(
    rates=st.lists(st.floats(0.05, 20.0), min_size=1, max_size=12),
    temperature=st.floats(1e-2, 1e3),
    scale=st.floats(1e-3, 1e3),
)
@settings(max_examples=200, deadline=None)
def test_properties(rates, temperature, scale):
    loss_t2 = torch.full((len(rates),), scale, dtype=torch.float64)
    loss_t1 = torch.tensor(rates, dtype=torch.float64) * scale
    out = EAGER(loss_t1, loss_t2, torch.tensor(temperature, dtype=torch.float64))
    k = len(rates)
    assert torch.all(out >= 0) and torch.all(torch.isfinite(out))
    assert out.sum().item() == pytest.approx(k, rel=1e-12)
    # Monotone in the rate: a task whose loss fell less never gets less weight.
    order = torch.argsort(loss_t1 / loss_t2)
    assert torch.all(out[order].diff() >= -1e-12)
    # Permutation equivariance.
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k))
    torch.testing.assert_close(EAGER(loss_t1[perm], loss_t2[perm], torch.tensor(temperature)), out[perm])
    np.testing.assert_allclose(out.numpy(), dwa_weights(loss_t1.numpy(), loss_t2.numpy(), temperature), atol=1e-12 * k)


@KERNELS
def test_equal_rates_give_exactly_uniform_weights(kernel):
    loss_t2 = t([0.3, 2.0, 7.0, 0.01])
    out = kernel(loss_t2 * 0.5, loss_t2, t(2.0))
    assert out.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert kernel(torch.ones(5), torch.ones(5), t(1e-6)).tolist() == [1.0] * 5


@KERNELS
def test_infinite_temperature_limit_is_uniform(kernel):
    loss_t1, loss_t2 = t([0.1, 0.9, 3.0], torch.float64), t([1.0, 1.0, 1.0], torch.float64)
    out = kernel(loss_t1, loss_t2, torch.tensor(1e12, dtype=torch.float64))
    np.testing.assert_allclose(out.numpy(), 1.0, atol=1e-11)
    assert not np.allclose(kernel(loss_t1, loss_t2, torch.tensor(1.0)).numpy(), 1.0, atol=1e-3)


@KERNELS
def test_tiny_temperature_does_not_overflow(kernel):
    out = kernel(t([0.5, 0.9, 0.7]), torch.ones(3), t(1e-6))
    assert out.tolist() == [0.0, 3.0, 0.0]  # exp(-0.4e6) underflows; the max task takes all K
    out = kernel(t([0.9, 0.9, 0.7]), torch.ones(3), t(1e-30))
    assert out.tolist() == [1.5, 1.5, 0.0]


@KERNELS
@pytest.mark.parametrize("temperature", [0.0, -0.0, -1.0, math.inf, -math.inf, math.nan])
def test_invalid_temperature_raises(kernel, temperature):
    with pytest.raises(Exception, match="temperature must be finite and > 0") as info:
        kernel(t([0.75, 0.86]), t([1.0, 1.0]), t(temperature))
    assert isinstance(info.value, (ValueError, torch.jit.Error))


@KERNELS
def test_invalid_per_row_temperature_names_the_value(kernel):
    with pytest.raises(Exception, match=r"got -3\.0? \(1 of 2 values invalid\)"):
        kernel(torch.ones(2, 3), torch.ones(2, 3), t([[1.0], [-3.0]]))


def test_compiled_code_poisons_rows_instead_of_raising(monkeypatch):
    # Under torch.compile / torch.export the check cannot raise; the graph itself
    # must make invalid rows NaN. Simulate the compiling branch in eager.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out = EAGER(torch.ones(3, 2) * t([[0.5, 1.0]]), torch.ones(3, 2), t([[2.0], [-1.0], [math.inf]]))
    assert torch.isfinite(out[0]).all()
    assert torch.isnan(out[1:]).all()
    # Invalid losses take the same (stacking) path to NaN rows.
    loss_t1 = t([[0.5, 1.0]] + [pair[0] for pair in INVALID_PAIRS])
    loss_t2 = t([[1.0, 1.0]] + [pair[1] for pair in INVALID_PAIRS])
    out = EAGER(loss_t1, loss_t2, t(2.0))
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()


INVALID_PAIRS = [
    # issue 11's reports: finite weights before
    ([1.0, 2.0], [math.inf, 1.0]),  # rate 0 from an infinite loss_t2
    ([0.0, 1.0], [1.0, 1.0]),  # rate 0 from a zero loss_t1
    ([-1.0, 2.0], [1.0, 1.0]),  # sign change, positive -> negative
    ([1.0, 2.0], [1.0, -1.0]),  # sign change, negative -> positive
    ([1.0, -0.0], [1.0, 1.0]),  # -0.0 is a zero too
    ([1.0, 2.0], [1.0, -math.inf]),
    # already NaN before
    ([1.0, 2.0], [0.0, 1.0]),  # +inf rate
    ([-1.0, 2.0], [0.0, 1.0]),  # -inf rate: would silently get weight 0
    ([0.0, 2.0], [0.0, 1.0]),  # 0 / 0
    ([math.nan, 2.0], [1.0, 1.0]),
    ([2.0, 1.0], [1.0, math.nan]),
    ([math.inf, 2.0], [1.0, 1.0]),
    ([-math.inf, 2.0], [1.0, 1.0]),
]


@KERNELS
@pytest.mark.parametrize("loss_t1,loss_t2", INVALID_PAIRS)
def test_invalid_losses_make_the_row_nan(kernel, loss_t1, loss_t2):
    # The averages DWAHistory.step() rejects: a zero, NaN or infinite loss in
    # either epoch, or a change of sign. Alone, and as one row among good ones.
    assert torch.isnan(kernel(t(loss_t1), t(loss_t2), t(2.0))).all()
    out = kernel(t([[0.75, 0.86], loss_t1, [0.5, 0.6]]), t([[1.0, 1.0], loss_t2, [1.0, 1.0]]), t(2.0))
    assert torch.isnan(out[1]).all(), out
    assert torch.isfinite(out[[0, 2]]).all()
    np.testing.assert_allclose(
        out[[0, 2]].numpy(), dwa_weights([[0.75, 0.86], [0.5, 0.6]], np.ones((2, 2)), 2.0), atol=1e-6
    )


@KERNELS
def test_negative_losses_that_keep_their_sign_are_valid(kernel):
    # Rates 0.75 and 0.86 again, from negative losses: the hand-worked weights.
    w1 = 2 / (1 + math.exp(0.055))
    assert kernel(t([-0.75, -0.86]), t([-1.0, -1.0]), t(2.0)).tolist() == pytest.approx([w1, 2 - w1], abs=1e-6)
    assert kernel(t([-0.75, 0.86]), t([-1.0, 1.0]), t(2.0)).tolist() == pytest.approx([w1, 2 - w1], abs=1e-6)


@KERNELS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_rate_the_dtype_cannot_hold_makes_the_row_nan_and_a_subnormal_one_does_not(kernel, dtype):
    info = torch.finfo(dtype)
    ones = torch.ones(2, dtype=dtype)
    # Valid losses (finite, nonzero, same sign) whose rate overflows / underflows to 0.
    assert torch.isnan(
        kernel(torch.tensor([info.max / 4, 1.0], dtype=dtype), torch.tensor([0.125, 1.0], dtype=dtype), t(2.0))
    ).all()
    tiniest = info.smallest_normal * info.eps  # the smallest subnormal
    assert torch.isnan(
        kernel(torch.tensor([tiniest, 1.0], dtype=dtype), torch.tensor([4.0, 1.0], dtype=dtype), t(2.0))
    ).all()
    # A subnormal rate is a rate: weights as for rate 0 vs 1, 2 / (1 + e^(1/2)) and the rest.
    out = kernel(torch.tensor([tiniest * 8, 1.0], dtype=dtype), ones, t(2.0))
    w0 = 2 / (1 + math.exp(0.5))
    assert out.tolist() == pytest.approx([w0, 2 - w0], abs=1e-6)
    # The largest finite rate, too: all weight to that task.
    assert kernel(torch.tensor([info.max, 1.0], dtype=dtype), ones, t(2.0)).tolist() == [2.0, 0.0]


@KERNELS
@pytest.mark.parametrize("shape", [(0,), (3, 0), (2, 4, 0)])
def test_no_tasks_is_a_clear_error(kernel, shape):
    with pytest.raises(Exception, match=r"K >= 1 tasks, got shape") as info:
        kernel(torch.ones(shape), torch.ones(shape), t(2.0))
    assert isinstance(info.value, (ValueError, torch.jit.Error))  # TorchScript wraps the ValueError
    if kernel is EAGER:
        assert isinstance(info.value, ValueError)


@KERNELS
def test_mismatched_shapes_raise_instead_of_broadcasting(kernel):
    with pytest.raises(Exception, match="same shape"):
        kernel(torch.ones(3), torch.ones(1), t(2.0))
    with pytest.raises(Exception, match="same shape"):
        kernel(torch.ones(2, 3), torch.ones(3), t(2.0))


@KERNELS
def test_mismatched_or_integer_dtypes_raise(kernel):
    with pytest.raises(Exception, match="same dtype"):
        kernel(torch.ones(3), torch.ones(3, dtype=torch.float64), t(2.0))
    with pytest.raises(Exception, match="floating point"):
        kernel(torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64), t(2.0))


def test_output_dtype_follows_loss_t1_even_with_a_float64_per_row_temperature():
    out = EAGER(torch.rand(4, 3) + 0.5, torch.rand(4, 3) + 0.5, torch.full((4, 1), 2.0, dtype=torch.float64))
    assert out.dtype == torch.float32


def test_eager_accepts_a_plain_number_as_temperature():
    torch.testing.assert_close(
        EAGER(t([0.75, 0.86]), t([1.0, 1.0]), 2.0), EAGER(t([0.75, 0.86]), t([1.0, 1.0]), t(2.0))
    )


def test_has_no_state():
    kernel = DWAWeights()
    assert list(kernel.parameters()) == [] and list(kernel.buffers()) == [] and kernel.state_dict() == {}


def test_scripted_matches_eager_and_survives_save_load():
    buffer = io.BytesIO()
    torch.jit.save(SCRIPTED, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    gen = torch.Generator().manual_seed(0)
    for shape in [(2,), (7,), (3, 5)]:
        loss_t1, loss_t2 = torch.rand(shape, generator=gen) + 0.1, torch.rand(shape, generator=gen) + 0.1
        expected = EAGER(loss_t1, loss_t2, t(1.5))
        torch.testing.assert_close(SCRIPTED(loss_t1, loss_t2, t(1.5)), expected, rtol=0, atol=0)
        torch.testing.assert_close(loaded(loss_t1, loss_t2, t(1.5)), expected, rtol=0, atol=0)
    with pytest.raises(torch.jit.Error, match="temperature must be finite"):
        loaded(torch.ones(2), torch.ones(2), t(-1.0))


@KERNELS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(kernel, dtype):
    # Half-precision inputs are upcast, computed in float32 and rounded once at the
    # end: bit for bit what the float32 kernel gives on the same (upcast) values.
    gen = torch.Generator().manual_seed(1)
    loss_t2 = (torch.rand(64, 7, generator=gen) + 0.5).to(dtype)
    loss_t1 = (loss_t2.float() * (torch.rand(64, 7, generator=gen) * 0.6 + 0.6)).to(dtype)
    temperature = torch.tensor(0.5)
    out = kernel(loss_t1, loss_t2, temperature)
    assert out.dtype == dtype
    assert torch.equal(out, kernel(loss_t1.float(), loss_t2.float(), temperature).to(dtype))
