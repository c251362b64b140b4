"""nan_strategy: a batch with a NaN or infinite loss need not cost the epoch; a weight-0 row is a mask."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter

from dwa_export import DWA, DWAHistory, LossHistoryError, NonFiniteLossWarning
from dwa_export.runtime import NumpyDWAHistory

INF, NAN = math.inf, math.nan
STRATEGIES = ("error", "warn", "ignore")


def stepped(history, **kwargs):
    """step(), returning the NonFiniteLossWarning messages it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history.step(**kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, NonFiniteLossWarning)]


def amp_epoch(dwa: DWA, epoch: int, overflow_at: int | None) -> list[np.ndarray]:
    """One epoch of 8 float16-autocast batches with GradScaler; returns the [K] losses DWA saw, as float64."""
    torch.manual_seed(epoch)
    model = amp_epoch.model
    scaler, optimizer = amp_epoch.scaler, amp_epoch.optimizer
    seen = []
    for b in range(8):
        x, y = torch.randn(16, 4), torch.randn(16, 3)
        if b == overflow_at:
            x = x * 1e4  # predictions ~1e4: their squares overflow float16's 65504
        with torch.autocast("cpu", dtype=torch.float16):
            losses = (model(x) - y.half()).pow(2).mean(0)  # [K], float16
            loss = dwa(losses)
        seen.append(losses.detach().double().numpy())
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # skipped for the overflowing batch: its gradients are inf
        scaler.update()
    return seen


@pytest.fixture
def amp_loop():
    torch.manual_seed(0)
    amp_epoch.model = torch.nn.Linear(4, 3)
    amp_epoch.optimizer = torch.optim.SGD(amp_epoch.model.parameters(), lr=1e-3)
    amp_epoch.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    return amp_epoch


def test_an_overflowing_float16_batch_under_grad_scaler_is_left_out_with_one_warning(amp_loop):
    dwa = DWA(num_tasks=3, nan_strategy="warn")
    seen = amp_loop(dwa, 0, overflow_at=5)
    assert not np.isfinite(seen[5]).all() and all(np.isfinite(s).all() for i, s in enumerate(seen) if i != 5)
    scale = amp_loop.scaler.get_scale()
    assert scale < 2.0**8  # GradScaler saw the overflow and backed off
    (message,) = stepped(dwa)
    assert message.startswith("1 of this epoch's 8 rows of K losses held a NaN or infinite loss")
    finite = np.array([s for i, s in enumerate(seen) if i != 5])
    np.testing.assert_allclose(dwa.history.averages[-1], finite.mean(0), rtol=1e-12)  # the 7 finite rows
    (entry,) = dwa.log
    assert entry["nonfinite_rows"] == 1 and entry["batches"] == 8 and entry["weight"] == 7.0
    # Training goes on: two more epochs, one clean, and DWA moves the weights.
    for epoch in (1, 2):
        amp_loop(dwa, epoch, overflow_at=None)
        assert stepped(dwa) == []
    assert dwa.history.ready and not torch.allclose(dwa.weights, torch.ones(3))
    assert [e["nonfinite_rows"] for e in dwa.log] == [1, 0, 0]


def test_by_default_the_overflowing_epoch_is_an_error_that_names_the_option(amp_loop):
    dwa = DWA(num_tasks=3)
    amp_loop(dwa, 0, overflow_at=2)
    before = dwa.state_dict()
    with pytest.raises(LossHistoryError, match=r'is inf: a NaN or infinite loss was recorded .*nan_strategy="warn"'):
        dwa.step()
    assert str(dwa.state_dict()) == str(before)  # nothing changed (NaN-safe comparison)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("bad", [INF, NAN, -INF])
def test_a_row_of_weight_zero_is_left_out_whatever_its_loss(strategy, bad):
    for history, make in (
        (DWAHistory(nan_strategy=strategy), torch.tensor),
        (NumpyDWAHistory(nan_strategy=strategy), np.array),
    ):
        history.record(make([1.0, 2.0]))
        history.record(make([bad, 2.0]), weight=make(0.0) if make is torch.tensor else 0.0)
        history.record(make([[3.0, 4.0], [bad, bad], [5.0, 6.0]]), weight=make([1.0, 0.0, 2.0]))
        assert stepped(history) == []  # a mask is not a non-finite row
        # (1 + 3 + 2*5) / 4, (2 + 4 + 2*6) / 4: by hand
        assert history.averages[-1] == (14 / 4, 18 / 4)
        assert history.log[-1]["nonfinite_rows"] == 0 and history.log[-1]["weight"] == 4.0


@pytest.mark.parametrize("strategy", ["warn", "ignore"])
def test_per_sample_rows_with_a_nan_or_infinity_are_left_out_whole(strategy):
    losses = [[1.0, 2.0], [INF, 1.0], [3.0, NAN], [5.0, 6.0]]
    for history, make in (
        (DWAHistory(nan_strategy=strategy), torch.tensor),
        (NumpyDWAHistory(nan_strategy=strategy), np.array),
    ):
        history.record(make(losses))
        history.record(make(losses), weight=make([2.0, 1.0, 1.0, 0.0]))
        messages = stepped(history)
        assert len(messages) == (strategy == "warn")
        if messages:
            assert messages[0].startswith("4 of this epoch's 8 rows")  # the 0-weight row is not one of them
        # Kept: rows 0 and 3 once, row 0 twice more: (1 + 5 + 2) / 4, (2 + 6 + 4) / 4.
        assert history.averages[-1] == (8 / 4, 12 / 4)
        assert history.log[-1]["nonfinite_rows"] == 4


@pytest.mark.parametrize("strategy", ["warn", "ignore"])
def test_an_epoch_whose_every_weighted_row_is_non_finite_is_an_error(strategy):
    history = DWAHistory(nan_strategy=strategy)
    history.record(torch.tensor([1.0, 2.0]))
    history.step()
    history.record(torch.tensor([INF, 2.0]))
    history.record(torch.tensor([3.0, 2.0]), weight=0.0)
    before = history.state_dict()
    with pytest.raises(LossHistoryError, match=r"every row .* held a NaN or infinite loss \(1 of 2 rows"):
        history.step()
    assert history.state_dict() == before


def test_an_invalid_weight_still_raises_under_warn():
    history = DWAHistory(nan_strategy="warn")
    history.record(torch.tensor([[INF, 1.0], [1.0, 1.0]]), weight=torch.tensor([NAN, 1.0]))
    with pytest.raises(LossHistoryError, match="the batch weights recorded this epoch sum to nan"):
        history.step()


def test_finite_float32_losses_cannot_overflow_the_float64_sums():
    # Ten batches of 1e38 overflowed float32 running sums; the sums are float64 now.
    for history, make in ((DWAHistory(), torch.tensor), (NumpyDWAHistory(), np.array)):
        for _ in range(10):
            history.record(make([1e38, 1.0], dtype=torch.float32 if make is torch.tensor else np.float32))
        history.step()
        assert history.averages[-1] == (float(np.float32(1e38)), 1.0)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_float64_sums_that_overflow_say_so(strategy):
    history = DWAHistory(nan_strategy=strategy)
    history.record(torch.tensor([1e308, 1.0], dtype=torch.float64))
    history.record(torch.tensor([1e308, 1.0], dtype=torch.float64))
    with pytest.raises(LossHistoryError, match="the running sum overflowed") as error:
        history.step()
    assert ("a NaN or infinite loss was recorded" in str(error.value)) == (strategy == "error")


def test_the_message_leaves_overflow_out_where_the_sum_cannot_overflow():
    history = DWAHistory()
    history.record(torch.tensor([INF, 1.0]))  # float32 losses, float64 sums
    with pytest.raises(LossHistoryError) as error:
        history.step()
    assert "the running sum overflowed" not in str(error.value)


def test_a_bad_strategy_is_a_clear_error():
    for make in (DWA, DWAHistory, NumpyDWAHistory):
        with pytest.raises(ValueError, match=r"nan_strategy must be one of 'error', 'warn', 'ignore', got 'skip'"):
            make(nan_strategy="skip")
    assert DWA(nan_strategy="ignore").history.nan_strategy == "ignore"
    assert "nan_strategy='warn'" in repr(DWA(nan_strategy="warn"))


def test_the_count_survives_a_checkpoint_in_every_history():
    source = DWAHistory(nan_strategy="ignore")
    source.record(torch.tensor([[1.0, 2.0], [NAN, 2.0]]))
    source.step()
    source.record(torch.tensor([INF, 1.0]))
    source.record(torch.tensor([2.0, 1.0]))
    state = source.state_dict()
    assert state["version"] == 4 and state["partial"][2:5] == [2, 2, 1]  # batches, rows, nonfinite_rows
    assert state["log"]["nonfinite_rows"] == [1]
    for target in (DWAHistory(nan_strategy="warn"), NumpyDWAHistory(nan_strategy="warn")):
        target.load_state_dict(state)
        (message,) = stepped(target)  # the resumed epoch's left-out row counts
        assert message.startswith("1 of this epoch's 2 rows")
        assert [e["nonfinite_rows"] for e in target.log] == [1, 1]
        assert target.averages[-1] == (2.0, 1.0)


def test_a_version_3_state_loads_with_one_row_per_batch_and_none_left_out():
    history = DWAHistory()
    history.record(torch.tensor([1.0, 2.0]))
    state = history.state_dict()
    v3 = dict(state, version=3, partial=[None, 1, 1, 1.0, [1.0, 2.0]])
    v3["log"] = {key: value for key, value in state["log"].items() if key != "nonfinite_rows"}
    for target in (DWAHistory(), NumpyDWAHistory()):
        target.load_state_dict(v3)
        assert target.state_dict() == state


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiled_each_strategy_makes_at_most_two_graphs_and_matches_eager(strategy):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    stream = []
    for epoch in range(4):
        for b in range(6):
            losses = torch.rand(3, generator=gen) / (1 + epoch) + 0.1
            if strategy != "error" and b == 2:
                losses[1] = INF if epoch % 2 else NAN
            weight = torch.tensor(0.0 if b == 4 else 1.0 + b)
            stream.append((epoch, b, losses, weight))

    def run(compiled: bool):
        dwa = DWA(num_tasks=3, nan_strategy=strategy)
        history = DWAHistory(num_tasks=3, nan_strategy=strategy)

        def body(losses, weight):
            history.record(losses.unsqueeze(0).expand(2, 3), weight=weight.expand(2))  # [B, K] with a [B] mask
            return dwa(losses)

        counter = CompileCounter()
        fn = torch.compile(body, backend=counter, fullgraph=True) if compiled else body
        out = []
        for _epoch, b, losses, weight in stream:
            fn(losses, weight)
            if b == 5:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", NonFiniteLossWarning)
                    dwa.step()
                    history.step()
                out.append((dwa.weights, dwa.log[-1]["nonfinite_rows"], history.log[-1]))
        return out, counter.frame_count

    eager, _ = run(False)
    compiled, graphs = run(True)
    assert graphs <= 2, f"{graphs} graphs"
    for (w_c, n_c, log_c), (w_e, n_e, log_e) in zip(compiled, eager, strict=True):
        torch.testing.assert_close(w_c, w_e, atol=1e-6, rtol=0)
        assert n_c == n_e == (0 if strategy == "error" else 1)
        assert log_c["nonfinite_rows"] == log_e["nonfinite_rows"] == (0 if strategy == "error" else 2)
        np.testing.assert_allclose(log_c["averages"], log_e["averages"], rtol=1e-12)
        assert log_c["weight"] == log_e["weight"]
    torch._dynamo.reset()
