"""DWAHistory: averaging, warm-up, rolling, validation, checkpoints and the no-sync per-batch path."""

from __future__ import annotations

import gc
import io
import json
import math
import weakref

import numpy as np
import pytest
import torch

from dwa_export import DWAHistory, DWAWeights, LossHistoryError
from dwa_export.runtime import NumpyDWAHistory
from reference import dwa_weights, epoch_weights

KERNEL = DWAWeights()
T = torch.tensor(2.0)


def weights_of(history: DWAHistory) -> np.ndarray:
    return KERNEL(*history.inputs(), T).double().numpy()


def run(history: DWAHistory, epochs, batch_weights=None) -> list[np.ndarray]:
    """Weights in use during each epoch, recording each epoch's batches then stepping."""
    seen = []
    for e, batches in enumerate(epochs):
        for b, losses in enumerate(batches):
            weight = None if batch_weights is None else batch_weights[e][b]
            history.record(torch.tensor(losses), weight)
            if b == 0:  # the weights of this epoch depend on earlier epochs only
                seen.append(weights_of(history))
        history.step()
    return seen


EPOCHS = [
    [[1.0, 2.0, 0.5], [1.2, 2.2, 0.7]],
    [[0.9, 1.9, 0.5], [0.7, 2.1, 0.4], [0.8, 1.7, 0.45]],
    [[0.6, 1.8, 0.3]],
    [[0.5, 1.8, 0.2], [0.55, 1.6, 0.25]],
    [[0.4, 1.5, 0.2]],
]


def test_warm_up_is_exactly_uniform_then_follows_the_reference():
    history = DWAHistory()
    seen = run(history, EPOCHS)
    expected = epoch_weights(EPOCHS, 2.0)
    assert seen[0].tolist() == [1.0, 1.0, 1.0] and seen[1].tolist() == [1.0, 1.0, 1.0]
    for got, want in zip(seen, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=2e-6)
    assert not np.allclose(seen[2], 1.0, atol=1e-3)  # DWA really kicked in


def test_ready_and_averages_follow_the_epochs():
    history = DWAHistory()
    assert not history.ready and history.num_tasks is None
    history.record(torch.tensor([2.0, 4.0]))
    history.record(torch.tensor([4.0, 8.0]))
    history.step()
    assert not history.ready and history.averages == ((3.0, 6.0),)
    history.record(torch.tensor([1.5, 3.0]))
    history.step()
    assert history.ready and history.averages == ((3.0, 6.0), (1.5, 3.0))
    loss_t1, loss_t2 = history.inputs()
    assert loss_t1.tolist() == [1.5, 3.0] and loss_t2.tolist() == [3.0, 6.0]
    history.record(torch.tensor([1.0, 1.0]))
    history.step()  # roll: the oldest average is dropped
    assert history.averages == ((1.5, 3.0), (1.0, 1.0))


def test_plain_average_counts_batches_equally_and_weighted_average_uses_weights():
    plain, weighted, per_row = DWAHistory(), DWAHistory(), DWAHistory()
    batches, sizes = [[1.0, 10.0], [3.0, 30.0]], [1, 3]
    for losses, size in zip(batches, sizes, strict=True):
        plain.record(torch.tensor(losses))
        weighted.record(torch.tensor(losses), weight=size)
        per_row.record(torch.tensor(losses).expand(size, 2))  # rows count one each
    for h in (plain, weighted, per_row):
        h.step()
    assert plain.averages[-1] == (2.0, 20.0)
    assert weighted.averages[-1] == (2.5, 25.0)  # (1*1 + 3*3) / 4
    assert per_row.averages[-1] == (2.5, 25.0)


def test_tensor_weights_per_sample_and_per_batch():
    history = DWAHistory()
    history.record(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), weight=torch.tensor([1.0, 3.0]))
    history.record(torch.tensor([5.0, 6.0]), weight=torch.tensor(4.0))
    history.record(torch.tensor([7.0, 8.0]), weight=2)  # mixed with a plain number
    history.step()
    total = 1 + 3 + 4 + 2
    expected = ((1 * 1 + 3 * 3 + 4 * 5 + 2 * 7) / total, (1 * 2 + 3 * 4 + 4 * 6 + 2 * 8) / total)
    assert history.averages[-1] == pytest.approx(expected, rel=1e-7)


def test_step_without_batches_is_a_no_op():
    history = DWAHistory()
    history.step()
    assert history.state_dict() == DWAHistory().state_dict()
    history.record(torch.tensor([1.0, 2.0]))
    history.step()
    before = history.state_dict()
    history.step()
    history.step()
    assert history.state_dict() == before
    history.record(torch.tensor([1.0, 2.0]), weight=0)  # zero total weight: nothing to average
    history.step()
    assert history.state_dict() == before


def test_reset_and_discard_epoch():
    history = DWAHistory()
    run(history, EPOCHS[:3])
    history.record(torch.tensor([9.0, 9.0, 9.0]))
    history.discard_epoch()
    assert history.ready
    history.record(torch.tensor([0.5, 1.0, 0.25]))
    history.step()
    assert history.averages[-1] == (0.5, 1.0, 0.25)  # the discarded batch left no trace
    history.reset()
    assert not history.ready and history.num_tasks is None
    assert weights_of(DWAHistory(num_tasks=3)).tolist() == [1.0, 1.0, 1.0]
    history.record(torch.tensor([1.0, 2.0]))  # a new K after reset() is fine
    assert history.num_tasks == 2


def test_a_shape_change_raises_and_tells_the_user_to_reset():
    history = DWAHistory()
    history.record(torch.ones(3))
    with pytest.raises(ValueError, match=r"2 tasks .* K=3; call reset\(\)"):
        history.record(torch.ones(2))
    with pytest.raises(ValueError, match="created with num_tasks=4"):
        DWAHistory(num_tasks=4).record(torch.ones(3))


@pytest.mark.parametrize(
    "losses,weight,match",
    [
        (torch.ones(0), None, "K >= 1"),
        (torch.tensor([1, 2]), None, "floating-point"),
        ([1.0, 2.0], None, "a list/tuple of K 0-d tensors"),
        ([torch.ones(2), torch.ones(2)], None, "a list/tuple of K 0-d tensors"),
        ({"a": torch.tensor(1.0)}, None, "need task names"),
        (torch.ones(2), -1.0, "weight must be finite and >= 0"),
        (torch.ones(2), math.nan, "weight must be finite"),
        (torch.ones(2), True, "weight must be a real number"),
        (torch.ones(2), "2", "weight must be a real number"),
        (torch.ones(3, 2), torch.ones(2), r"must have the batch shape \[3\]"),
        (torch.ones(3, 2), torch.ones(3, 1), r"must have the batch shape \[3\]"),
        (torch.ones(3, 2), torch.tensor(2.0), r"must have the batch shape \[3\]"),
        (torch.ones(3, 2), 3, "is one number, but the losses have rows"),
        (torch.ones(1, 2), 3.0, "is one number, but the losses have rows"),
        (torch.ones(2), torch.ones(1), r"a 0-d tensor for \[K\] losses"),
        (torch.ones(2), torch.tensor([True]).squeeze(), "real tensor"),
    ],
)
def test_bad_record_input_raises_clearly_and_changes_nothing(losses, weight, match):
    fresh = DWAHistory()
    with pytest.raises((ValueError, TypeError), match=match):
        fresh.record(losses, weight)
    assert fresh.state_dict() == DWAHistory().state_dict()  # not even K was fixed
    history = DWAHistory()
    history.record(torch.tensor([1.0, 1.0]))
    before = history.state_dict()
    with pytest.raises((ValueError, TypeError), match=match):
        history.record(losses, weight)
    assert history.state_dict() == before


@pytest.mark.parametrize(
    "bad,match",
    [
        ([math.nan, 1.0], "task 0 is nan"),
        ([1.0, math.inf], "task 1 is inf"),
        ([1.0, 0.0], "task 1 is 0.0"),
        ([1.0, -0.5], "task 1 changed sign from 1 to -0.5"),
    ],
)
def test_invalid_epoch_average_raises_and_leaves_everything_as_it_was(bad, match):
    history = DWAHistory()
    history.record(torch.tensor([2.0, 1.0]))
    history.step()
    history.record(torch.tensor([1.0, 1.0]))
    history.step()
    history.record(torch.tensor(bad))
    before = json.dumps(history.state_dict())  # JSON, because NaN != NaN
    with pytest.raises(LossHistoryError, match=match) as info:
        history.step()
    assert "discard_epoch()" in str(info.value) and "reset()" in str(info.value)
    assert info.value.previous == (1.0, 1.0)
    assert json.dumps(history.state_dict()) == before  # history and running sum untouched
    history.discard_epoch()
    history.record(torch.tensor([0.5, 0.5]))
    history.step()
    assert history.averages == ((1.0, 1.0), (0.5, 0.5))


def test_a_sign_change_is_judged_against_the_previous_epoch_only():
    history = DWAHistory()
    for losses in ([-2.0, 1.0], [-1.0, 0.5], [-0.5, 0.25]):  # negative but consistent: fine
        history.record(torch.tensor(losses))
        history.step()
    assert history.ready
    np.testing.assert_allclose(weights_of(history), dwa_weights([-0.5, 0.25], [-1.0, 0.5], 2.0), atol=1e-6)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_an_invalid_per_row_weight_is_reported_by_step_with_nothing_changed(bad):
    # Tensor weights cannot be checked per batch without a device sync: a
    # negative, NaN or infinite one makes the epoch's weight invalid instead,
    # even when the total would look fine (-1 + 2 = 1).
    history = DWAHistory()
    history.record(torch.tensor([1.0, 1.0]))
    history.step()
    history.record(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), weight=torch.tensor([bad, 2.0]))
    before = json.dumps(history.state_dict())
    with pytest.raises(LossHistoryError, match=r"weights recorded this epoch sum to (nan|inf).*per-row weight"):
        history.step()
    assert json.dumps(history.state_dict()) == before
    assert len(history.log) == 1
    history.discard_epoch()
    history.record(torch.tensor([0.5, 0.5]))
    history.step()
    assert history.averages[-1] == (0.5, 0.5)


@pytest.mark.parametrize("stop_after_batches", [0, 1, 2])
@pytest.mark.parametrize("stop_in_epoch", [0, 1, 2, 3])
def test_resuming_from_a_checkpoint_reproduces_the_weights_exactly(stop_in_epoch, stop_after_batches):
    gen = torch.Generator().manual_seed(7)
    epochs = [[torch.rand(4, generator=gen) + 0.5 for _ in range(3)] for _ in range(6)]
    weights = [torch.rand((), generator=gen) * 10 for _ in range(3)]

    def train(history, start=(0, 0), stop=None):
        outputs = []
        for e in range(start[0], len(epochs)):
            for b in range(start[1] if e == start[0] else 0, 3):
                if (e, b) == stop:
                    return outputs
                history.record(epochs[e][b], weight=weights[b] if e % 2 else float(b + 1))
            history.step()
            outputs.append(KERNEL(*history.inputs(), T))
        return outputs

    uninterrupted = train(DWAHistory())
    stop = (stop_in_epoch, stop_after_batches)
    first = DWAHistory()
    before = train(first, stop=stop)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    state = json.loads(json.dumps(torch.load(io.BytesIO(buffer.getvalue()))))  # survives JSON too
    resumed = DWAHistory()
    resumed.load_state_dict(state)
    after = train(resumed, start=stop)
    assert len(before + after) == len(uninterrupted)
    for got, want in zip(before + after, uninterrupted, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda s: s.pop("averages"), "missing keys"),
        (lambda s: s.update(version=99), "version"),
        (lambda s: s.update(version=True), "version"),
        (lambda s: s.update(version=2.0), "version"),
        (lambda s: s.update(format="something else"), "format"),
        (lambda s: s.update(extra=1), "unexpected keys"),
        (lambda s: s.update(averages=[[1.0, 2.0, 3.0]]), "list of 2 numbers"),
        (lambda s: s.update(averages=[[1.0, 2.0], [1.0, -2.0]]), "changed sign"),
        (lambda s: s.update(averages=[[1.0, 0.0]]), "task 1 is 0.0"),
        (lambda s: s.update(averages=[[1.0, 10**400]]), "beyond the float range"),
        (lambda s: s.update(num_tasks=0), "'num_tasks' must be None or an int from 1"),
        (lambda s: s.update(num_tasks=4_000_000_000), "'num_tasks' must be None or an int from 1"),
        (lambda s: s.update(num_tasks=2.0), "'num_tasks' must be None or an int from 1"),
        (lambda s: s.update(tasks=["a", "a"]), "distinct"),
        (lambda s: s.update(tasks=["a"]), "num_tasks=2 but 1 task names"),
        (lambda s: s.update(tasks=["a", "\ud800"]), "non-empty string"),
        (lambda s: s.update(dtype="float16"), "'dtype' must be one of"),
        (lambda s: s.update(dtype=None), "'dtype' must be one of"),
        (lambda s: s["partial"].__setitem__(5, -0.5), "weight in 'partial' must be >= 0"),
        (lambda s: s["partial"].__setitem__(3, -1), "row count in 'partial' must be an int from 0"),
        (lambda s: s["partial"].__setitem__(4, 2), "nonfinite_rows in 'partial' must be an int from 0 to 1"),
        (lambda s: s["partial"].__setitem__(4, -1), "nonfinite_rows in 'partial' must be an int from 0"),
        (lambda s: s["log"].update(nonfinite_rows=[0, -1, 0]), r"log nonfinite_rows\[1\] must be an int from 0"),
        (lambda s: s["log"].pop("nonfinite_rows"), "'log' must be a dict with keys"),
        (lambda s: s["partial"].__setitem__(2, 0), "batch count in 'partial' must be an int from 1"),
        (lambda s: s["partial"].__setitem__(2, True), "batch count in 'partial' must be an int"),
        (lambda s: s["partial"].__setitem__(6, [1.0]), "sums in 'partial' must be a list of 2"),
        (lambda s: s["partial"].__setitem__(6, [10**400, 1.0]), "beyond the float range"),
        (lambda s: s["partial"].insert(2, "float32"), "'partial' must be None or"),  # a version-2 partial
        (lambda s: s["log"]["temperature"].__setitem__(0, -1.0), r"log temperature\[0\] must be None or finite"),
        (lambda s: s["log"]["weights"].__setitem__(1, [1.0]), r"log weights\[1\] must be a list of 2"),
        (lambda s: s["log"]["weights"].__setitem__(1, [1.0, -1.0]), r"log weights\[1\] must be None or numbers >= 0"),
        (lambda s: s["log"].pop("weights"), "'log' must be a dict with keys"),
        (lambda s: s["partial"].__setitem__(0, 3), "rank in 'partial' must be None for a single process"),
        (lambda s: s.update(partial={"sums": [1.0, 1.0]}), "'partial' must be None or"),
        (lambda s: s["log"].update(weight=[1.0]), "columns of 'log' must be lists of one length"),
        (lambda s: s["log"].update(batches=[1, 0, 1]), r"log batches\[1\] must be an int from 1"),
        (lambda s: s["log"].update(weight=[1.0, math.nan, 1.0]), r"log weight\[1\] must be a finite number > 0"),
        (lambda s: s["log"]["averages"].__setitem__(1, [1.0, -1.0]), "changed sign"),
        (lambda s: s.update(log=[]), "'log' must be a dict"),
    ],
)
def test_malformed_state_raises_and_changes_nothing(mutate, match):
    source = DWAHistory()
    run(source, [[[1.0, 2.0]], [[0.5, 1.5]], [[0.4, 1.4]]])
    source.record(torch.tensor([0.4, 1.0]))
    state = json.loads(json.dumps(source.state_dict()))
    mutate(state)
    # A target whose every field differs from the rejected state's.
    target = DWAHistory(tasks=("x", "y"))
    run(target, [[[7.0, 8.0]], [[6.0, 9.0]]])
    target.record(torch.tensor([3.0, 3.0], dtype=torch.float64), weight=2.5)
    before = target.state_dict()
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(state)
    assert target.state_dict() == before


def test_loading_a_checkpoint_with_another_k_into_a_fixed_k_history_raises():
    source = DWAHistory()
    source.record(torch.ones(3))
    with pytest.raises(ValueError, match="holds K=3 tasks but this history was created with num_tasks=2"):
        DWAHistory(num_tasks=2).load_state_dict(source.state_dict())


def test_inputs_use_the_accumulation_dtype():
    for dtype, acc in [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)]:
        history = DWAHistory()
        history.record(torch.ones(2, dtype=dtype))
        assert history.inputs()[0].dtype == acc
    with pytest.raises(RuntimeError, match="num_tasks"):
        DWAHistory().inputs()


def test_float16_losses_are_summed_in_float32():
    history = DWAHistory()
    for _ in range(4096):  # 2048 + 1 is not representable in float16
        history.record(torch.tensor([1.0, 0.5], dtype=torch.float16))
    history.step()
    assert history.averages[-1] == (1.0, 0.5)


SYNCING = [
    "item",
    "tolist",
    "numpy",
    "cpu",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__array__",
    "synchronize",
]


def test_the_per_batch_path_never_synchronises(monkeypatch):
    history = DWAHistory(num_tasks=3)
    history.record(torch.ones(3))  # allocation happens on first use
    history.step()

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} called on the per-batch path")

        return fail

    for name in SYNCING:
        if hasattr(torch.Tensor, name):
            monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden("cuda.synchronize"))
    losses = torch.tensor([0.5, 0.7, 0.9], requires_grad=True)
    for _ in range(3):
        history.record(losses)
        history.record(losses * 2, weight=16)
        history.record(losses.expand(4, 3), weight=torch.arange(4.0))
    monkeypatch.undo()
    history.step()
    assert history.averages[-1] == pytest.approx((0.5 + 16 * 1.0 + 6 * 0.5) / 23 * np.array([1.0, 1.4, 1.8]))


def test_record_keeps_no_autograd_graph_alive():
    # The sums are detached: the graphs of the recorded losses are freed with them.
    history = DWAHistory()
    leaf = torch.tensor([0.5, 0.7], requires_grad=True)
    for weight in (None, torch.tensor(2.0, requires_grad=True)):
        factor = torch.tensor(3.0)
        losses = leaf * factor  # its graph holds on to factor, for the gradient of leaf
        alive = weakref.ref(factor)
        history.record(losses, weight)
        del losses, factor
        gc.collect()
        assert alive() is None
    history.record(leaf.expand(2, 2), weight=torch.tensor([1.0, 2.0], requires_grad=True))
    history.step()
    assert history.averages[-1] == pytest.approx((1.5 * 3 / 6 + 0.5 * 3 / 6, 2.1 * 3 / 6 + 0.7 * 3 / 6))
    assert not any(t.requires_grad for t in history.inputs()) and leaf.grad is None


# --------------------------------------------------------------------------- input forms


def test_a_0d_tensor_is_one_task_and_a_list_of_0d_tensors_is_k_tasks():
    single, listed, tupled, stacked = DWAHistory(), DWAHistory(), DWAHistory(), DWAHistory()
    for losses in ([1.0, 2.0], [0.5, 1.9], [0.4, 1.8]):
        a, b = torch.tensor(losses[0]), torch.tensor(losses[1])
        single.record(a)
        listed.record([a, b])
        tupled.record((a, b))
        stacked.record(torch.stack([a, b]))
        for h in (single, listed, tupled, stacked):
            h.step()
    assert single.num_tasks == 1 and single.averages[-1] == (float(np.float32(0.4)),)
    assert listed.state_dict() == tupled.state_dict() == stacked.state_dict()


def test_named_losses_in_any_order_equal_the_tensor_in_task_order():
    named, plain = DWAHistory(tasks=("seg", "depth", "normal")), DWAHistory(num_tasks=3)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for _ in range(4):
            seg, depth, normal = (torch.rand(3, generator=gen) + 0.5).unbind()
            named.record({"normal": normal, "seg": seg, "depth": depth})
            plain.record(torch.stack([seg, depth, normal]))
        named.step()
        plain.step()
    assert named.log == plain.log and named.averages == plain.averages
    assert named.state_dict()["tasks"] == ["seg", "depth", "normal"]


@pytest.mark.parametrize(
    "batch,match",
    [
        ({"seg": 1.0, "depth": 1.0}, r"missing \['normal'\], unexpected \[\]"),
        ({"seg": 1.0, "depth": 1.0, "normal": 1.0, "edges": 1.0}, r"missing \[\], unexpected \['edges'\]"),
        ({"seg": 1.0, "dpeth": 1.0, "normal": 1.0}, r"missing \['depth'\], unexpected \['dpeth'\]"),
        ({"seg": [1.0, 2.0], "depth": 1.0, "normal": 1.0}, "list/tuple of K 0-d tensors"),
    ],
)
def test_a_malformed_named_batch_is_rejected_naming_the_tasks_and_records_nothing(batch, match):
    history = DWAHistory(tasks=("seg", "depth", "normal"))
    history.record(torch.ones(3))
    before = history.state_dict()
    batch = {k: torch.tensor(v) for k, v in batch.items()}
    with pytest.raises((ValueError, TypeError), match=match) as info:
        history.record(batch)
    if "missing" in match:
        assert "['seg', 'depth', 'normal']" in str(info.value)
    assert history.state_dict() == before


def test_task_names_are_checked_on_load_and_fix_k():
    source = DWAHistory(tasks=("seg", "depth"))
    source.record({"seg": torch.tensor(1.0), "depth": torch.tensor(2.0)})
    with pytest.raises(
        ValueError, match=r"task names \['seg', 'depth'\] differ from this history's \['depth', 'seg'\]"
    ):
        DWAHistory(tasks=("depth", "seg")).load_state_dict(source.state_dict())
    unnamed = DWAHistory()
    unnamed.load_state_dict(source.state_dict())
    assert unnamed.tasks == ("seg", "depth")
    with pytest.raises(ValueError, match="num_tasks=3 but 2 task names"):
        DWAHistory(num_tasks=3, tasks=("a", "b"))
    with pytest.raises(ValueError, match="distinct"):
        DWAHistory(tasks=("a", "a"))


# --------------------------------------------------------------------------- the sample-weighting rule


def test_the_sample_weighting_rule_by_hand():
    # Batch 1: batch-mean losses [1, 10] of 2 samples -> weight=2.
    # Batch 2: per-sample losses [[3, 30], [5, 50], [7, 70]] -> each row once.
    # Sample-weighted average of task 0: (2 * 1 + 3 + 5 + 7) / (2 + 3) = 17 / 5 = 3.4.
    history = DWAHistory()
    history.record(torch.tensor([1.0, 10.0]), weight=2)
    history.record(torch.tensor([[3.0, 30.0], [5.0, 50.0], [7.0, 70.0]]))
    history.step()
    assert history.averages[-1] == pytest.approx((3.4, 34.0))
    assert history.log[-1]["batches"] == 2 and history.log[-1]["weight"] == 5.0
    # Per-row weights: rows 3 and 5 with weights 1 and 3: (3 + 15) / 4 = 4.5.
    history.record(torch.tensor([[3.0, 30.0], [5.0, 50.0]]), weight=torch.tensor([1.0, 3.0]))
    history.step()
    assert history.averages[-1] == pytest.approx((4.5, 45.0))


# --------------------------------------------------------------------------- the log


def test_the_log_has_one_entry_per_successful_step_equal_to_a_float64_reference():
    history = DWAHistory()
    weights = [[1.0, 2.0], [3.0, 1.0, 0.5], [1.0], [2.0, 1.0], [4.0]]
    seen = run(history, EPOCHS, batch_weights=weights)
    assert len(seen) == len(EPOCHS)
    log = history.log
    assert [entry["epoch"] for entry in log] == list(range(len(EPOCHS)))
    for entry, batches, w in zip(log, EPOCHS, weights, strict=True):
        rows = np.array(batches, dtype=np.float32).astype(np.float64)
        w = np.array(w)
        np.testing.assert_allclose(entry["averages"], (rows * w[:, None]).sum(0) / w.sum(), rtol=1e-6)
        assert entry["batches"] == len(batches) and entry["weight"] == w.sum()
    json.dumps(log)  # JSON-friendly

    history.record(torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(LossHistoryError):
        history.step()
    assert history.log == log  # a failed step adds no entry
    history.discard_epoch()
    history.step()  # nothing recorded: no entry either
    assert history.log == log
    history.reset()
    assert history.log == []
    assert history.state_dict()["log"] == {
        "batches": [],
        "weight": [],
        "averages": [],
        "temperature": [],
        "weights": [],
        "nonfinite_rows": [],
    }


def test_the_log_survives_a_checkpoint():
    first = DWAHistory()
    run(first, EPOCHS[:3])
    resumed = DWAHistory()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    run(resumed, EPOCHS[3:])
    uninterrupted = DWAHistory()
    run(uninterrupted, EPOCHS)
    assert resumed.log == uninterrupted.log


# --------------------------------------------------------------------------- older checkpoints


def test_a_version_2_checkpoint_loads_and_resumes_exactly():
    # What the previous format wrote mid-epoch after two epochs and 3 batches, by hand:
    # the dtype third in 'partial', and a log without temperatures and weights.
    v2 = {
        "format": "dwa_export.history",
        "version": 2,
        "num_tasks": 2,
        "tasks": ["seg", "depth"],
        "averages": [[1.0, 2.0], [0.75, 1.5]],
        "partial": [None, 1, "float64", 3, 4.0, [2.0, 4.0]],
        "log": {"batches": [2, 3], "weight": [2.0, 3.0], "averages": [[1.0, 2.0], [0.75, 1.5]]},
    }
    history = DWAHistory()
    history.load_state_dict(v2)
    assert history.tasks == ("seg", "depth") and history.dtype == torch.float64
    assert history.log[1] == {
        "epoch": 1,
        "averages": [0.75, 1.5],
        "batches": 3,
        "weight": 3.0,
        "temperature": None,
        "weights": None,
        "nonfinite_rows": 0,
    }
    history.record(torch.tensor([1.0, 1.0]))
    history.step()
    assert history.averages == ((0.75, 1.5), (3.0 / 5, 5.0 / 5))  # (2 + 1) / (4 + 1), (4 + 1) / 5
    assert history.log[-1]["batches"] == 4
    assert history.state_dict()["version"] == 4
    with pytest.raises(ValueError, match=r"the dtype in 'partial' must be one of"):
        history.load_state_dict(dict(v2, partial=[None, 1, "float16", 3, 4.0, [2.0, 4.0]]))
    with pytest.raises(ValueError, match=r"'partial' must be None or \[rank, world_size, dtype"):
        history.load_state_dict(dict(v2, partial=[None, 1, 3, 4.0, [2.0, 4.0]]))  # a version-3 partial


def test_a_version_1_checkpoint_is_a_clear_error_naming_its_version():
    v1 = {"format": "dwa_export.history", "version": 1, "num_tasks": 2, "averages": [], "dtype": None,
          "epoch_sum": None, "epoch_weight": 0.0, "epoch_tensor_weight": None}  # fmt: skip
    history = DWAHistory()
    with pytest.raises(ValueError, match="'version' is 1; this dwa_export reads versions 2 to 4"):
        history.load_state_dict(v1)
    assert history.num_tasks is None


@pytest.mark.parametrize("mid_epoch", [True, False])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_a_history_in_use_takes_the_k_of_a_checkpoint_it_loads(kind, mid_epoch):
    make, losses = (DWAHistory, torch.tensor) if kind == "torch" else (NumpyDWAHistory, np.float32)
    source = make()
    for epoch in ([1.0, 2.0, 3.0], [0.5, 1.5, 2.5]):
        source.record(losses(epoch))
        source.step()
    if mid_epoch:
        source.record(losses([0.4, 1.4, 2.4]))
    target = make()
    target.record(losses([9.0, 9.0]))  # K = 2, mid-epoch
    target.load_state_dict(source.state_dict())
    assert target.num_tasks == 3 and target.state_dict() == source.state_dict()
    target.record(losses([0.6, 1.6, 2.6]))
    target.step()
    assert target.averages[-1] == pytest.approx((0.5, 1.5, 2.5) if mid_epoch else (0.6, 1.6, 2.6))


def test_float64_sums_hold_a_long_epoch():
    # 100,000 batches of ~1 with 1% noise: float32 running sums drift by ~1e-4
    # relative here; float64 ones stay at the rounding of the float32 losses.
    gen = torch.Generator().manual_seed(0)
    losses = (1 + 0.01 * torch.randn(100_000, 3, generator=gen)) * torch.tensor([1.0, 2.0, 0.5])
    history = DWAHistory(num_tasks=3)
    for row in losses:
        history.record(row)
    history.step()
    reference = losses.double().numpy().mean(0)
    np.testing.assert_allclose(history.averages[-1], reference, rtol=1e-12)


def test_repr_names_the_state():
    history = DWAHistory(tasks=("a", "b"))
    assert repr(history) == (
        "DWAHistory(num_tasks=2, tasks=['a', 'b'], epochs_stored=0, device=cpu, distributed=True, nan_strategy='error')"
    )
