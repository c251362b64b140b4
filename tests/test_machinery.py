"""A model holding DWA works with the PyTorch machinery.

Copies, pickles, EMA/SWA, devices, meta init, inference mode.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from dwa_export import DWA
from reference import epoch_weights

EPOCHS = [[[1.0, 2.0, 0.5], [1.2, 2.2, 0.7]], [[0.9, 1.9, 0.5]], [[0.6, 1.8, 0.3], [0.5, 1.9, 0.3]], [[0.5, 1.8, 0.2]]]


class Model(torch.nn.Module):
    def __init__(self, num_tasks: int | None = 3) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 3)
        self.dwa = DWA(num_tasks=num_tasks)


def train(dwa: DWA, epochs=EPOCHS) -> list[list[float]]:
    seen = []
    for batches in epochs:
        for losses in batches:
            dwa(torch.tensor(losses))
        dwa.step()
        seen.append(dwa.weights.tolist())
    return seen


def expected(epochs=EPOCHS) -> list[np.ndarray]:
    return epoch_weights(epochs + [[[1.0, 1.0, 1.0]]], 2.0)[1:]


@pytest.mark.parametrize("num_tasks", [3, None])
@pytest.mark.parametrize("trained", [False, True])
def test_deepcopy_pickle_torch_save_and_averaged_model(num_tasks, trained):
    model = Model(num_tasks)
    if trained:
        train(model.dwa, EPOCHS[:2])
        model.dwa(torch.tensor(EPOCHS[2][0]))  # mid-epoch
    copies = {
        "deepcopy": copy.deepcopy(model),
        "pickle": pickle.loads(pickle.dumps(model)),
        "AveragedModel": AveragedModel(model).module,
    }
    buffer = io.BytesIO()
    torch.save(model, buffer)
    copies["torch.save"] = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    rest = EPOCHS[2:] if trained else EPOCHS
    if trained:
        rest = [EPOCHS[2][1:]] + EPOCHS[3:]
    reference = train(model.dwa, rest)
    for name, other in copies.items():
        assert train(other.dwa, rest) == reference, name  # the copy carries on exactly, on its own state
    np.testing.assert_allclose(reference, expected()[len(expected()) - len(reference) :], atol=1e-6)


def test_a_copy_does_not_share_state_with_the_original():
    model = Model()
    twin = copy.deepcopy(model)
    train(model.dwa)
    assert twin.dwa.history.log == [] and twin.dwa.state_dict() == Model().dwa.state_dict()


def test_half_and_double_leave_the_state_and_its_device_alone():
    model = Model().to("meta").half()  # would copy out of meta if the dtype change moved the state
    assert model.dwa.history.device.type == "meta" and model.net.weight.dtype == torch.float16
    model = Model().double()
    assert model.dwa.history.dtype == torch.float32 and model.dwa.weights.dtype == torch.float32
    assert model.net.weight.dtype == torch.float64
    assert train(model.dwa) == train(Model().dwa)  # float32 losses, float32 weights, float64 sums as ever


@pytest.mark.parametrize("num_tasks", [3, None])
def test_meta_device_init_then_to_empty(num_tasks):
    with torch.device("meta"):
        model = Model(num_tasks)
    assert model.dwa.history.device.type == "meta"
    model.to_empty(device="cpu")
    assert model.dwa.history.device.type == "cpu"
    np.testing.assert_allclose(train(model.dwa), expected(), atol=1e-6)


def test_a_state_loaded_inside_inference_mode_trains_afterwards():
    source = DWA(num_tasks=3)
    train(source, EPOCHS[:2])
    source(torch.tensor([0.6, 1.8, 0.3], dtype=torch.float64))  # a float64 batch mid-epoch
    state = source.state_dict()
    resumed = DWA(num_tasks=3)
    with torch.inference_mode():
        resumed.load_state_dict(state)
    rest = [[[0.5, 1.9, 0.3]], EPOCHS[3]]
    assert train(resumed, rest) == train(source, rest)


def test_first_batches_inside_inference_mode_do_not_poison_the_state():
    dwa = DWA()
    with torch.inference_mode():
        dwa.history.record(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))  # K and sums made here
        dwa.eval()
        dwa(torch.tensor([5.0, 5.0, 5.0], dtype=torch.float64))  # a validation pass
    dwa.train()
    dwa(torch.tensor([1.2, 2.2, 0.7], dtype=torch.float64))
    dwa.step()
    train(dwa, EPOCHS[1:])
    assert dwa.history.averages[-1] == pytest.approx((0.5, 1.8, 0.2))
    np.testing.assert_allclose(dwa.weights.numpy(), expected()[-1], atol=1e-6)


def test_train_and_eval_follow_the_parent_module():
    model = Model()
    model.eval()
    model.dwa(torch.tensor([9.0, 9.0, 9.0]))
    assert model.dwa.history.state_dict()["partial"] is None  # eval mode records nothing
    model.train()
    model.dwa(torch.tensor([9.0, 9.0, 9.0]))
    assert model.dwa.history.state_dict()["partial"] is not None
