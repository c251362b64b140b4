"""DWA under torch.compile: the per-batch path compiles once, a whole compiled train step works.

Graphs are counted with torch._dynamo's CompileCounter (which runs the captured
graph as it is: how many graphs dynamo makes does not depend on the backend); the
whole train step uses the default backend, inductor, as users run it. CUDA-only
checks skip cleanly without CUDA.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from dwa_export import DWA, DWAHistory, DWAWeights, LossHistoryError

K = 3
EPOCHS = 6
BATCHES = 12
KERNEL = DWAWeights()
SCALE = torch.tensor([1.0, 3.0, 0.5])  # tasks whose losses differ, so that DWA moves the weights


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def batches(epochs: int = EPOCHS, per_epoch: int = BATCHES, seed: int = 0):
    """(x, y, python weight, tensor weight) per batch; the targets shrink over the epochs."""
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for b in range(per_epoch):
            x = torch.randn(4, K, generator=gen)
            y = torch.randn(4, K, generator=gen) * SCALE / (1 + epoch) ** torch.tensor([0.2, 0.5, 1.0])
            yield epoch, b, x, y, 16 + b % 3, torch.tensor(1.0 + b % 4)


def per_sample_losses(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x - y).pow(2)  # [B, K]


def task_losses(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return per_sample_losses(x, y).mean(0)  # [K]


# Each form a user writes inside a compiled loss function: (name, body).
FORMS = {
    "dwa(losses)": lambda dwa, h, x, y, w, wt: dwa(task_losses(x, y)),
    "dwa(per-sample losses)": lambda dwa, h, x, y, w, wt: dwa(per_sample_losses(x, y)),
    "dwa(dict)": lambda dwa, h, x, y, w, wt: dwa(dict(zip(("a", "b", "c"), task_losses(x, y).unbind(), strict=True))),
    "dwa(float64 losses)": lambda dwa, h, x, y, w, wt: dwa(task_losses(x.double(), y.double())),
    "record(losses)": lambda dwa, h, x, y, w, wt: h.record(task_losses(x, y)),
    "record(losses, weight=int)": lambda dwa, h, x, y, w, wt: h.record(task_losses(x, y), weight=w),
    "record(losses, weight=float)": lambda dwa, h, x, y, w, wt: h.record(task_losses(x, y), weight=w / 4),
    "record(losses, weight=0-d tensor)": lambda dwa, h, x, y, w, wt: h.record(task_losses(x, y), weight=wt),
    "record(per-sample losses)": lambda dwa, h, x, y, w, wt: h.record(per_sample_losses(x, y)),
    "record(float64 losses)": lambda dwa, h, x, y, w, wt: h.record(task_losses(x.double(), y.double())),
}


def make(num_tasks):
    tasks = ("a", "b", "c")
    return DWA(num_tasks=num_tasks, tasks=tasks if num_tasks else None), DWAHistory(num_tasks)


def run(form, dwa, history, compile_with=None):
    """Replay the batches through ``form``; returns the weights and averages after each epoch."""
    body = FORMS[form]

    def loss_fn(x, y, w, wt):
        out = body(dwa, history, x, y, w, wt)
        return task_losses(x, y).sum() if out is None else out

    fn = loss_fn if compile_with is None else torch.compile(loss_fn, backend=compile_with, fullgraph=True)
    weights, averages, counts = [], [], []
    for _epoch, b, x, y, w, wt in batches():
        fn(x, y, w, wt)
        if b == BATCHES - 1:
            dwa.step()
            history.step()
            used = dwa if form.startswith("dwa") else history
            weights.append((dwa.weights if used is dwa else KERNEL(*history.inputs(), torch.tensor(2.0))).clone())
            averages.append(used.history.averages[-1] if used is dwa else used.averages[-1])
            counts.append(getattr(compile_with, "frame_count", 0))
    return weights, averages, counts


@pytest.mark.parametrize(
    "form,num_tasks",
    [(form, num_tasks) for form in FORMS for num_tasks in (K, None) if num_tasks or form != "dwa(dict)"],  # names fix K
    ids=lambda v: {K: "num_tasks=K", None: "K-from-first-batch"}.get(v, v) if not isinstance(v, str) else v,
)
def test_compiled_loss_function_compiles_at_most_twice_and_matches_eager(form, num_tasks):
    eager = run(form, *make(num_tasks))
    counter = CompileCounter()
    compiled = run(form, *make(num_tasks), compile_with=counter)
    assert counter.frame_count <= 2, f"{counter.frame_count} graphs"
    if form == "dwa(losses)" and num_tasks:
        assert counter.frame_count == 1  # the usual loop: one graph for every batch and epoch
    assert compiled[2][0] == compiled[2][-1], f"step() between epochs recompiled: {compiled[2]}"
    for got, want in zip(compiled[0], eager[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(compiled[1], eager[1], rtol=1e-6)
    assert not torch.allclose(compiled[0][-1].float(), torch.ones(K), atol=1e-3)  # DWA really moved the weights


@pytest.mark.parametrize("form", list(FORMS))
def test_no_graph_breaks(form):
    dwa, history = make(K)
    body = FORMS[form]
    _, _, x, y, w, wt = next(batches())

    def loss_fn(x, y, w, wt):
        out = body(dwa, history, x, y, w, wt)
        return task_losses(x, y).sum() if out is None else out

    explanation = torch._dynamo.explain(loss_fn)(x, y, w, wt)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# --------------------------------------------------------------------------- a whole compiled train step


def train(dwa: DWA, compiled: bool, epochs: int = 4, per_epoch: int = 6):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, K))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def train_step(x, y):
        losses = (model(x) - y).pow(2).mean(0)
        loss = dwa(losses)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return losses.detach()  # per-task losses for logging

    step = torch.compile(train_step) if compiled else train_step
    gen = torch.Generator().manual_seed(1)
    weights, logged = [], []
    for epoch in range(epochs):
        for _ in range(per_epoch):
            x = torch.randn(8, 6, generator=gen)
            y = torch.randn(8, K, generator=gen) * SCALE / (1 + epoch) ** torch.tensor([0.2, 0.5, 1.0])
            logged.append(step(x, y))
        dwa.step()
        weights.append(dwa.weights.clone())
    return weights, logged, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("num_tasks", [K, None], ids=["DWA(num_tasks=K)", "DWA()"])
def test_a_whole_compiled_train_step_runs_and_matches_eager(num_tasks):
    eager = train(DWA(num_tasks=num_tasks), compiled=False)
    compiled = train(DWA(num_tasks=num_tasks), compiled=True)
    for got, want in zip(compiled[0], eager[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    for got, want in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(compiled[2], eager[2], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(compiled[0][-1], torch.ones(K), atol=1e-3)


# --------------------------------------------------------------------------- what CUDA graphs need


def test_the_compiled_graph_reads_the_state_at_fixed_addresses():
    # CUDA graphs replay fixed addresses: every tensor the compiled code reads or
    # updates (the running sums, counts and weights) must be updated in place,
    # never replaced, across batches and step(). A backend that notes the graph
    # inputs' addresses on every call sees exactly that, on the CPU too.
    addresses = []

    def backend(graph, example_inputs):
        def run(*inputs):
            addresses.append(tuple(t.data_ptr() for t in inputs if isinstance(t, torch.Tensor)))
            return graph(*inputs)

        return run

    dwa = DWA(num_tasks=K)
    losses = torch.rand(K) + 0.5
    rows, weight = losses.expand(2, K), torch.tensor(3.0)
    compiled = torch.compile(
        lambda: (dwa(losses), dwa(rows), dwa.history.record(losses, weight=weight)), backend=backend, fullgraph=True
    )
    for _ in range(4):
        for _ in range(3):
            compiled()
        dwa.step()
        losses.mul_(SCALE / 3)  # in place too: the tasks' losses fall at different rates
    assert len(set(addresses)) == 1 and len(addresses) == 12, addresses
    assert len(addresses[0]) >= 6  # losses, rows, weight, and the state itself
    assert dwa.history.ready and not torch.equal(dwa.weights, torch.ones(K))


def test_the_state_is_marked_static_for_cuda_graphs_as_torch_marks_it():
    # dwa_export marks its state as torch._dynamo.mark_static_address would, without
    # importing torch._dynamo; this fails if torch changes what that function sets.
    from dwa_export._tensors import mark_static

    ours, torchs = torch.empty(0), torch.empty(0)
    mark_static(ours)
    torch._dynamo.mark_static_address(torchs, guard=False)
    assert vars(ours) == vars(torchs) == {"_dynamo_static_input_type": "unguarded"}


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_reduce_overhead_cuda_graphs_train_step_matches_eager():
    def run_on_cuda(compiled):
        dwa = DWA(num_tasks=K).cuda()
        model = torch.nn.Linear(6, K).cuda()
        torch.manual_seed(0)
        torch.nn.init.normal_(model.weight)

        def loss_step(x, y):
            return dwa((model(x) - y).pow(2).mean(0))

        fn = torch.compile(loss_step, mode="reduce-overhead") if compiled else loss_step
        gen = torch.Generator(device="cuda").manual_seed(0)
        for epoch in range(4):
            for _ in range(5):
                x = torch.randn(8, 6, device="cuda", generator=gen)
                y = torch.randn(8, K, device="cuda", generator=gen) / (1 + epoch)
                fn(x, y)
            dwa.step()
        return dwa.weights.cpu(), dwa.history.averages

    eager, compiled = run_on_cuda(False), run_on_cuda(True)
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(compiled[1], eager[1], rtol=1e-6)


@cuda
def test_the_cuda_per_batch_path_never_synchronises():
    dwa = DWA(num_tasks=K).cuda()
    history = DWAHistory(num_tasks=K)
    losses = (torch.rand(K, device="cuda") + 0.5).requires_grad_()
    dwa(losses)
    history.record(losses)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            dwa(losses)
            dwa(losses.expand(4, K))
            history.record(losses)
            history.record(losses, weight=2.0)
            history.record(losses.expand(4, K), weight=torch.ones(4, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    dwa.step()
    history.step()
    assert history.log[-1]["batches"] == 31


# --------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_autocast_bfloat16_epoch_means_match_a_float64_reference(compiled):
    dwa = DWA(num_tasks=K)
    model = torch.nn.Linear(6, K)
    recorded = []

    def loss_step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses = (model(x) - y.bfloat16()).pow(2).mean(0)  # bfloat16 all the way
        dwa(losses)
        return losses

    fn = torch.compile(loss_step, backend=CompileCounter(), fullgraph=True) if compiled else loss_step
    gen = torch.Generator().manual_seed(2)
    for _ in range(50):
        losses = fn(torch.randn(8, 6, generator=gen), torch.randn(8, K, generator=gen))
        assert losses.dtype == torch.bfloat16  # the losses really are in low precision
        recorded.append(losses.detach().double().numpy())
    dwa.step()
    reference = np.mean(recorded, axis=0)
    # Summed in float32: 50 roundings of a float32 relative error at most.
    # Summed in float64 from bfloat16 values: exact but for the division.
    np.testing.assert_allclose(dwa.history.averages[-1], reference, rtol=1e-12)
    assert dwa.history.dtype == torch.float32 and dwa.weights.dtype == torch.float32


def test_a_half_precision_module_keeps_float32_weights_and_follows_the_device_only():
    dwa = DWA(num_tasks=K).half()
    assert dwa.history.dtype == torch.float32 and dwa.weights.dtype == torch.float32
    out = dwa(torch.rand(K, dtype=torch.float16) + 0.5)
    assert out.dtype == torch.float16 and dwa.history.dtype == torch.float32
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), DWA(num_tasks=2)).to(torch.float64)
    assert model[1].history.dtype == torch.float32 and model[1].history.inputs()[0].dtype == torch.float32


def test_float64_losses_are_summed_in_float64():
    history = DWAHistory(num_tasks=2)
    third = torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    for _ in range(3):
        history.record(third)
    history.step()
    assert history.averages[-1] == (1 / 3, 2 / 3)  # float32 sums would be off by ~1e-8
    history.record(third / 2)
    history.step()
    loss_t1, loss_t2 = history.inputs()
    assert loss_t1.dtype == torch.float64 and loss_t1.tolist() == [1 / 6, 1 / 3] and loss_t2.tolist() == [1 / 3, 2 / 3]


# --------------------------------------------------------------------------- bad input in a compiled region


def test_bad_values_inside_a_compiled_region_are_reported_by_step():
    dwa = DWA(num_tasks=K)
    history = DWAHistory(num_tasks=K)

    @torch.compile(backend=CompileCounter(), fullgraph=True)
    def loss_fn(losses, w):
        history.record(losses, weight=w)
        return dwa(losses)

    good = torch.tensor([1.0, 2.0, 3.0])
    for _ in range(2):
        loss_fn(good, 1.0)
        dwa.step()
        history.step()
    loss_fn(torch.tensor([1.0, math.nan, 3.0]), 1.0)  # cannot raise here
    before = dwa.state_dict()
    with pytest.raises(LossHistoryError, match="task 1 is nan") as info:
        dwa.step()
    assert info.value.task == 1
    assert str(dwa.state_dict()) == str(before)  # untouched (NaN-aware comparison via repr)
    dwa.discard_epoch()

    loss_fn(good, -2.0)  # a negative weight: symbolic while compiling, so it poisons the epoch's weight
    with pytest.raises(LossHistoryError, match="weights recorded this epoch sum to nan"):
        history.step()
    assert history.ready and len(history.log) == 2


def test_compiled_and_eager_calls_can_be_mixed_in_one_epoch():
    dwa = DWA(num_tasks=K)
    compiled = torch.compile(lambda losses: dwa(losses), backend=CompileCounter(), fullgraph=True)
    reference = DWA(num_tasks=K)
    gen = torch.Generator().manual_seed(5)
    for epoch in range(4):
        for b in range(6):
            losses = torch.rand(K, generator=gen) + 1.0 / (epoch + 1)
            (compiled if b % 2 else dwa)(losses)
            reference(losses)
        dwa.step()
        reference.step()
    assert dwa.history.log == reference.history.log
    torch.testing.assert_close(dwa.weights, reference.weights, atol=0, rtol=0)
