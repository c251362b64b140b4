"""DWA, the drop-in loss module."""

from __future__ import annotations

import io
import json
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


@pytest.mark.parametrize("num_tasks", [None, 3])
def test_weights_are_computed_once_per_epoch(monkeypatch, num_tasks):
    calls = []
    original = DWAWeights.forward
    monkeypatch.setattr(DWAWeights, "forward", lambda self, *a: calls.append(1) or original(self, *a))
    dwa = DWA(num_tasks=num_tasks)
    for _epoch in range(3):
        for _ in range(10):
            dwa(torch.rand(3) + 0.5)
        dwa.step()
    # One per step, plus the warm-up weights when K is given (without K, the
    # first batch takes the uniform warm-up weights without a kernel call).
    assert len(calls) == 3 + (num_tasks is not None)


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


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda s: s.pop("history"), "malformed DWA state"),
        (lambda s: s.update(temperature=-1.0), "temperature must be finite and > 0"),
        (lambda s: s["history"].update(version=7), "'version' is 7"),
        (lambda s: s["history"].update(tasks=["p", "q"]), r"task names \['p', 'q'\] differ"),
        (lambda s: s["history"]["log"].update(weights=[]), "columns of 'log' must be lists of one length"),
        (lambda s: s["history"]["log"]["weights"].__setitem__(0, [1.0, -1.0]), "numbers >= 0"),
        (lambda s: s.update(log={"temperature": [], "weights": []}), "needs a version-2 history"),
    ],
)
def test_a_rejected_state_changes_nothing(mutate, match):
    source = DWA(temperature=1.5, tasks=("a", "b"))
    for losses in ([1.0, 2.0], [0.5, 1.9], [0.4, 1.7]):
        source(torch.tensor(losses))
        source.step()
    source(torch.tensor([0.3, 1.6]))
    state = source.state_dict()
    mutate(state["_extra_state"])
    # A target whose every field differs from the source's: temperature, history, log, running sums.
    target = DWA(temperature=4.0, tasks=("a", "b"))
    for losses in ([9.0, 8.0], [7.0, 9.0]):
        target(torch.tensor(losses))
        target.step()
    target(torch.tensor([5.0, 5.0]), weight=3.0)
    before = (target.temperature, target.state_dict(), target.weights.clone(), target.log)
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    assert target.temperature == before[0] == 4.0
    assert str(target.state_dict()) == str(before[1])
    assert torch.equal(target.weights, before[2]) and target.log == before[3]


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
        _ = DWA().weights
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


# --------------------------------------------------------------------------- validation loops


def test_eval_mode_returns_the_weighted_sum_and_records_nothing():
    def train(validate: bool) -> tuple[list[float], list[float]]:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        dwa = DWA()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(1)
        val_losses = []
        for epoch in range(4):
            model.train()
            dwa.train()
            for _ in range(5):
                x = torch.randn(8, 4, generator=gen)
                losses = (model(x) - torch.tensor([1.0, 2.0, 3.0]) / (epoch + 1)).pow(2).mean(0)
                optimizer.zero_grad()
                dwa(losses).backward()
                optimizer.step()
            dwa.step()
            if validate:  # a validation pass with the same DWA, as Lightning's loop runs it
                model.eval()
                dwa.eval()
                with torch.no_grad():
                    for _ in range(3):
                        x = torch.randn(8, 4) * 10  # validation losses far from the training ones
                        losses = (model(x) - 5.0).pow(2).mean(0)
                        val_losses.append(dwa(losses).item())
                        expected = float(torch.dot(losses, dwa.weights))
                        assert val_losses[-1] == pytest.approx(expected, rel=1e-6)
        return dwa.weights.tolist(), val_losses

    plain, _ = train(validate=False)
    with_validation, val_losses = train(validate=True)
    assert with_validation == plain  # validation batches did not move the weights
    assert len(val_losses) == 12


def test_eval_mode_before_any_training_batch_uses_uniform_weights():
    dwa = DWA().eval()
    assert dwa(torch.tensor([1.0, 2.0])).item() == 3.0
    assert dwa(torch.tensor([[1.0, 2.0], [3.0, 4.0]])).item() == 5.0
    assert dwa.history.num_tasks is None  # nothing was recorded


# --------------------------------------------------------------------------- input forms


def test_a_list_or_tuple_of_scalar_losses_is_stacked_and_gradients_reach_each():
    dwa = DWA(temperature=0.5)
    for losses in ([1.0, 2.0], [0.9, 1.9]):
        dwa(torch.tensor(losses))
        dwa.step()
    seg = torch.tensor(0.8, requires_grad=True)
    depth = torch.tensor(1.7, requires_grad=True)
    out = dwa([seg, depth])
    out.backward()
    w = dwa.weights
    assert out.item() == pytest.approx(float(w[0] * 0.8 + w[1] * 1.7), rel=1e-6)
    assert seg.grad.item() == pytest.approx(w[0].item()) and depth.grad.item() == pytest.approx(w[1].item())
    assert dwa((seg, depth)).item() == pytest.approx(out.item())
    with pytest.raises(TypeError, match=r"got list \[float, float\]"):
        dwa([0.8, 1.7])


def test_a_scalar_loss_is_one_task_as_in_torchjd():
    dwa = DWA()
    loss = torch.tensor(0.7, requires_grad=True)
    out = dwa(loss)
    assert out.item() == pytest.approx(0.7) and dwa.history.num_tasks == 1
    out.backward()
    assert loss.grad.item() == 1.0


def test_named_losses_give_the_same_losses_and_weights_as_the_tensor():
    names = ("seg", "depth", "normal")
    named, plain = DWA(tasks=names), DWA(num_tasks=3)
    gen = torch.Generator().manual_seed(4)
    for epoch in range(4):
        for _ in range(3):
            losses = torch.rand(3, generator=gen) / (1 + epoch * torch.tensor([0.1, 0.5, 1.0]))
            by_name = dict(zip(names, losses.unbind(), strict=True))
            assert named(by_name).item() == plain(losses).item()
        named.step()
        plain.step()
    assert torch.equal(named.weights, plain.weights)
    assert named.weights_dict("dwa/") == {f"dwa/{n}": w for n, w in zip(names, plain.weights.tolist(), strict=True)}
    assert plain.weights_dict() == {f"task_{k}": w for k, w in enumerate(plain.weights.tolist())}


def test_the_log_holds_what_each_step_computed_and_survives_a_checkpoint():
    names = ("a", "b", "c")
    dwa = DWA(temperature=0.5, tasks=names)
    for batches in EPOCHS[:3]:
        for losses in batches:
            dwa(torch.tensor(losses))
        dwa.step()
    buffer = io.BytesIO()
    torch.save(dwa.state_dict(), buffer)
    resumed = DWA(tasks=names)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    for batches in EPOCHS[3:]:
        for losses in batches:
            dwa(torch.tensor(losses))
            resumed(torch.tensor(losses))
        dwa.step()
        resumed.step()
    assert resumed.log == dwa.log
    log = dwa.log
    assert len(log) == len(EPOCHS)
    expected = epoch_weights(EPOCHS + [[[1.0, 1.0, 1.0]]], 0.5)
    averages = [np.array(b, dtype=np.float32).astype(np.float64).mean(0) for b in EPOCHS]
    for i, entry in enumerate(log):
        assert entry["epoch"] == i and entry["temperature"] == 0.5 and entry["batches"] == len(EPOCHS[i])
        np.testing.assert_allclose(list(entry["averages"].values()), averages[i], rtol=1e-6)
        np.testing.assert_allclose(list(entry["weights"].values()), expected[i + 1], atol=1e-6)
        if i == 0:
            assert entry["rates"] is None
        else:
            np.testing.assert_allclose(list(entry["rates"].values()), averages[i] / averages[i - 1], rtol=1e-6)
    assert json.loads(json.dumps(log)) == log


def test_a_temperature_change_updates_the_last_log_entry():
    dwa = DWA(temperature=2.0)
    for losses in ([1.0, 2.0], [0.5, 1.9], [0.4, 1.8]):
        dwa(torch.tensor(losses))
        dwa.step()
    dwa.temperature = 0.25
    assert dwa.log[-1]["temperature"] == 0.25
    assert dwa.log[-1]["weights"] == dwa.weights.tolist()
    assert dwa.log[-2]["temperature"] == 2.0


def test_a_dwa_checkpoint_of_the_previous_format_loads_with_its_log():
    # Format version 2: DWA kept the log's temperatures and weights beside the history.
    v2 = {
        "_extra_state": {
            "temperature": 1.5,
            "history": {
                "format": "dwa_export.history",
                "version": 2,
                "num_tasks": 2,
                "tasks": None,
                "averages": [[1.0, 2.0], [0.75, 1.5]],
                "partial": None,
                "log": {"batches": [4, 4], "weight": [4.0, 4.0], "averages": [[1.0, 2.0], [0.75, 1.5]]},
            },
            "log": {"temperature": [1.5, 1.5], "weights": [[1.0, 1.0], [0.9, 1.1]]},
        }
    }
    dwa = DWA()
    dwa.load_state_dict(v2)
    assert dwa.temperature == 1.5
    assert [entry["temperature"] for entry in dwa.log] == [1.5, 1.5] and dwa.log[1]["weights"] == [0.9, 1.1]
    expected = epoch_weights([[[1.0, 2.0]], [[0.75, 1.5]], [[1, 1]]], 1.5)[2]
    np.testing.assert_allclose(dwa.weights.numpy(), expected, atol=1e-6)


def test_the_log_stays_aligned_when_the_history_is_reset_or_stepped_directly():
    dwa = DWA(num_tasks=2)
    for losses in ([1.0, 2.0], [0.5, 1.9], [0.4, 1.8]):
        dwa(torch.tensor(losses))
        dwa.step()
    dwa.history.reset()  # behind DWA's back: its log columns must not be reused
    dwa(torch.tensor([1.0, 1.0]))
    dwa.step()
    assert len(dwa.log) == 1 and dwa.log[0]["weights"] == [1.0, 1.0] and dwa.log[0]["averages"] == [1.0, 1.0]
    dwa(torch.tensor([0.5, 1.0]))
    dwa.history.step()  # stepped directly: DWA knows no temperature or weights for it
    assert dwa.log[-1]["weights"] is None and dwa.log[-1]["temperature"] is None
    assert dwa.log[0]["weights"] == [1.0, 1.0]


# --------------------------------------------------------------------------- what reviews found


def test_many_tasks_without_num_tasks():
    k = 100
    gen = torch.Generator().manual_seed(0)
    epochs = [[(torch.rand(k, generator=gen) + 0.5).tolist() for _ in range(2)] for _ in range(4)]
    dwa = DWA()
    for batches in epochs:
        for losses in batches:
            dwa(torch.tensor(losses))
        dwa.step()
    np.testing.assert_allclose(dwa.weights.numpy(), epoch_weights(epochs + [[[1.0] * k]], 2.0)[-1], atol=1e-6)
    before = dwa.state_dict()
    with pytest.raises(ValueError, match="losses have 101 tasks"):
        dwa(torch.ones(k + 1))
    assert str(dwa.state_dict()) == str(before)  # the failed call recorded nothing


@pytest.mark.parametrize("losses", [torch.tensor([3, 4]), torch.tensor([True, False]), torch.tensor([1 + 2j, 3 + 0j])])
def test_training_and_eval_mode_refuse_the_same_losses(losses):
    dwa = DWA(num_tasks=2)
    messages = []
    for mode in (dwa.train, dwa.eval):
        mode()
        with pytest.raises(ValueError, match="floating-point tensor") as info:
            dwa(losses)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    with pytest.raises(ValueError, match="losses have 3 tasks"):
        dwa.eval()(torch.ones(3))


def test_the_weights_handed_out_do_not_change_afterwards():
    dwa = DWA()
    kept = []
    for batches in EPOCHS:
        for losses in batches:
            dwa(torch.tensor(losses))
        dwa.step()
        kept.append(dwa.weights)
    expected = epoch_weights(EPOCHS + [[[1.0, 1.0, 1.0]]], 2.0)[1:]
    np.testing.assert_allclose(torch.stack(kept).numpy(), expected, atol=1e-6)
    assert not torch.equal(kept[2], kept[3])


def test_the_log_keeps_its_temperatures_when_the_history_state_round_trips():
    dwa = DWA(temperature=0.5)
    for batches in EPOCHS[:3]:
        for losses in batches:
            dwa(torch.tensor(losses))
        dwa.step()
    log = dwa.log
    dwa.history.load_state_dict(dwa.history.state_dict())
    assert dwa.log == log and [entry["temperature"] for entry in log] == [0.5, 0.5, 0.5]
    fresh = DWA()
    fresh.history.load_state_dict(json.loads(json.dumps(dwa.history.state_dict())))
    assert fresh.log == log
