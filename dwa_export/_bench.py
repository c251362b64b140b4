"""``dwa-export bench``: per-batch overhead, kernel latency, batched throughput, start-up.

Machines are shared and noisy, so every figure is a median over repeated runs,
and every comparison is a ratio of two things timed side by side, interleaved,
in this process. Targets are printed next to the figures; nothing here is a
pass/fail unit test.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from torch import nn

from . import DWA, DWAHistory, DWAWeights
from ._export import quiet_exporters
from ._reference import reference_weights
from .runtime import DWAWeightsSession

__all__ = ["main"]


@dataclass
class Row:
    section: str
    name: str
    value: float
    unit: str
    target: str = ""
    ok: bool | None = None  # None: no target


@dataclass
class Config:
    repeats: int = 21
    batches: int = 3000  # per timed loop on the per-batch path
    calls: int = 300  # per timed loop for kernel latency
    rows: int = 1_000_000  # batched throughput
    export: bool = True  # time a full dwa-export run
    steps: int = 200  # per timed loop of a compiled train step
    backend: str = "inductor"  # torch.compile's default; aot_eager compiles in seconds (smoke runs)
    log_epochs: int = 10_000  # epochs in the log of the checkpoint-size figures
    long_epoch: int = 400_000  # batches per epoch of the drift figure

    @classmethod
    def quick(cls) -> Config:
        return cls(
            repeats=3, batches=50, calls=20, rows=10_000, export=False, steps=5, backend="aot_eager", log_epochs=200,
            long_epoch=1_000,
        )  # fmt: skip


def _per_call(fn: Callable[[], Any], loops: int) -> float:
    start = time.perf_counter()
    for _ in range(loops):
        fn()
    return (time.perf_counter() - start) / loops


def compare(
    fns: dict[str, Callable[[], Any]], loops: int, repeats: int, sync: Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """Per-call seconds of each function, timed interleaved (rotating order), ``repeats`` times."""
    names = list(fns)
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            sync()
            times[name].append(_per_call(fns[name], loops))
            sync()
    return times


def ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    """Median over repeats of the side-by-side ratio name / base."""
    return statistics.median(a / b for a, b in zip(times[name], times[base], strict=True))


class RecomputeEveryBatch(nn.Module):
    """The pattern of published DWA implementations, for comparison: recompute
    the softmax from the stored history on every batch, and accumulate the
    epoch sum out of place."""

    def __init__(self, averages: list[torch.Tensor], temperature: float = 2.0) -> None:
        super().__init__()
        self.averages = averages  # [L(t-2), L(t-1)]: past the warm-up
        self.temperature = temperature
        self.loss_sum: torch.Tensor | None = None
        self.batches = 0

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        if len(self.averages) < 2:
            weights = torch.ones_like(losses)
        else:
            if self.averages[0].shape != losses.shape:
                raise ValueError("the shape of the losses changed")
            rates = (self.averages[1] / self.averages[0]).flatten()
            weights = losses.numel() * torch.softmax(rates / self.temperature, dim=0).reshape(losses.shape)
        detached = losses.detach()
        if self.loss_sum is not None and self.loss_sum.shape != detached.shape:
            raise ValueError("the shape of the losses changed within an epoch")
        self.loss_sum = detached.clone() if self.loss_sum is None else self.loss_sum + detached
        self.batches += 1
        return (weights * losses).sum()


def per_batch(config: Config, device: str) -> list[Row]:
    return [row for k in (3, 16) for row in _per_batch(config, device, k)]


def _per_batch(config: Config, device: str, k: int) -> list[Row]:
    rows = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    section = f"per-batch overhead, K={k}, {device}"
    losses = (torch.rand(k, device=device) + 0.5).requires_grad_()
    averages = [torch.rand(k, device=device) + 0.5 for _ in range(2)]  # steady state
    history = DWAHistory(num_tasks=k)
    history.record(losses)
    weights = torch.ones(k, device=device)
    dwa = DWA(num_tasks=k)
    naive = RecomputeEveryBatch(averages)
    for _ in range(2):  # past the warm-up too
        dwa(losses)
        dwa.step()

    def record_and_weight() -> torch.Tensor:
        history.record(losses)
        return torch.dot(weights, losses)

    times = compare(
        {
            "losses.sum()": lambda: losses.sum(),
            "record + weighted sum": record_and_weight,
            "dwa(losses)": lambda: dwa(losses),
            "recompute every batch": lambda: naive(losses),
        },
        config.batches,
        config.repeats,
        sync,
    )
    base = statistics.median(times["losses.sum()"])
    rows.append(Row(section, "losses.sum()", base * 1e6, "us/batch"))
    record_ratio = ratio(times, "record + weighted sum", "losses.sum()")
    call_ratio = ratio(times, "dwa(losses)", "losses.sum()")
    naive_ratio = ratio(times, "recompute every batch", "losses.sum()")
    rows.append(Row(section, "DWAHistory.record + weighted sum", record_ratio, "x sum"))
    rows.append(Row(section, "dwa(losses) via nn.Module.__call__", call_ratio, "x sum"))
    rows.append(Row(section, "recompute softmax every batch", naive_ratio, "x sum"))
    speedup_record = ratio(times, "recompute every batch", "record + weighted sum")
    speedup_call = ratio(times, "recompute every batch", "dwa(losses)")
    rows.append(Row(section, "recompute / (record + weighted sum)", speedup_record, "x"))
    rows.append(Row(section, "recompute / dwa(losses)", speedup_call, "x"))
    if device == "cuda":
        rows.append(_cuda_syncs(section, dwa, history, weights, losses, config.batches))
    return rows


def _cuda_syncs(section: str, dwa: Any, history: Any, weights: Any, losses: Any, batches: int) -> Row:
    """Run a whole epoch with torch's sync debug mode set to raise on any host-device sync."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(batches):
            dwa(losses)
            history.record(losses)
            torch.dot(weights, losses)
        syncs = 0
    except RuntimeError:
        syncs = 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return Row(section, "host-device syncs in an epoch (sync debug mode)", syncs, "count", "0", syncs == 0)


class _Model(nn.Module):
    """A small multi-task MLP: a shared trunk and K heads, as in the paper's setting."""

    def __init__(self, features: int, hidden: int, tasks: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.Linear(hidden, tasks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.heads(self.trunk(x))  # Module.__call__ is typed Any
        return out


def train_steps(config: Config, device: str) -> list[Row]:
    """A whole train step (forward, loss, backward, optimizer) with DWA vs with losses.sum(), eager and compiled."""
    k, batch, features, hidden = 3, 64, 64, 256
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x = torch.randn(batch, features, device=device)
    y = torch.randn(batch, k, device=device)

    def make(weighting: str, compiled: bool, mode: str | None) -> Callable[[], Any]:
        torch.manual_seed(0)
        model = _Model(features, hidden, k).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        dwa = DWA(num_tasks=k).to(device)

        def step() -> torch.Tensor:
            losses: torch.Tensor = (model(x) - y).pow(2).mean(0)
            loss: torch.Tensor = dwa(losses) if weighting == "dwa" else losses.sum()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            return losses.detach()

        fn = torch.compile(step, backend=config.backend, mode=mode) if compiled else step
        for _ in range(3):  # compile, and let CUDA graphs record
            fn()
        dwa.step()  # an epoch boundary between calls must not recompile
        fn()
        return fn

    rows = []
    for compiled in (False, True):
        mode = "reduce-overhead" if compiled and device == "cuda" else None
        section = f"{'compiled' if compiled else 'eager'} train step, K={k}, {device}"
        if compiled:
            section += f", backend={config.backend}" + (f", mode={mode}" if mode else "")
        with quiet_exporters():  # inductor's own warnings
            fns = {"losses.sum()": make("sum", compiled, mode), "dwa(losses)": make("dwa", compiled, mode)}
            times = compare(fns, config.steps, config.repeats, sync)
        base = statistics.median(times["losses.sum()"])
        overhead = ratio(times, "dwa(losses)", "losses.sum()")
        target = 1.05 if compiled else 1.02
        step_name = "compiled step" if compiled else "step"
        rows.append(Row(section, f"{step_name} with losses.sum() (64-256-256, 3 heads)", base * 1e6, "us/step"))
        rows.append(
            Row(section, "the same step with dwa(losses)", overhead, "x sum step", f"<= {target}", overhead <= target)
        )
    return rows


def long_epoch(config: Config) -> list[Row]:
    """Weights after two epochs of many batches each, against a float64 reference (the running sums' drift)."""
    batches, k = config.long_epoch, 3
    section = f"two epochs of {batches:,} batches, 1% noise, K={k}"
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 2.0, 0.5])
    dwa = DWA(num_tasks=k)
    averages = []
    for rate in (torch.ones(k), torch.tensor([0.9, 0.8, 0.95])):
        losses = (1 + 0.01 * torch.randn(batches, k, generator=gen)) * scale * rate
        for row in losses:
            dwa(row)
        dwa.step()
        averages.append(losses.double().mean(0).numpy())
    reference = reference_weights(averages[1], averages[0], 2.0)
    error = float(np.abs(dwa.weights.double().numpy() - reference).max())
    return [Row(section, "max |weights - float64 reference|", error, "", "<= 2e-5", error <= 2e-5)]


def checkpoint_size(config: Config) -> list[Row]:
    """DWA.state_dict() with a long log: its size and the time to write and restore it."""
    import io

    epochs, k = config.log_epochs, 16
    section = f"checkpoint with a {epochs}-epoch log, K={k}"
    dwa = DWA(num_tasks=k)
    gen = torch.Generator().manual_seed(0)
    speeds = torch.linspace(0.1, 1.0, k)
    for epoch in range(epochs):  # losses that fall at different speeds, with a little noise
        dwa((1 + 0.01 * torch.rand(k, generator=gen)) / (1 + epoch * speeds))
        dwa.step()
    state = dwa.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    fresh = DWA(num_tasks=k)
    times = compare(
        {"state_dict()": lambda: dwa.state_dict(), "load_state_dict()": lambda: fresh.load_state_dict(state)},
        1,
        max(3, config.repeats // 3),
    )
    return [
        Row(section, "torch.save size", len(buffer.getvalue()) / 1e6, "MB"),
        Row(section, "JSON size of the state", len(json.dumps(state["_extra_state"])) / 1e6, "MB"),
        Row(section, "state_dict()", statistics.median(times["state_dict()"]) * 1e3, "ms"),
        Row(
            section,
            "load_state_dict() (validates every entry)",
            statistics.median(times["load_state_dict()"]) * 1e3,
            "ms",
        ),
    ]


def kernel_latency(config: Config, artifacts: Path) -> list[Row]:
    section = "kernel call latency, K=3, CPU"
    l1, l2, t = torch.tensor([0.75, 0.86, 0.5]), torch.ones(3), torch.tensor(2.0)
    eager = DWAWeights()
    with quiet_exporters():
        scripted = torch.jit.load(str(artifacts / "dwa_weights.pt"))
    program = torch.export.load(str(artifacts / "dwa_weights.pt2")).module()
    session = onnxruntime.InferenceSession(str(artifacts / "dwa_weights.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"loss_t1": l1.numpy(), "loss_t2": l2.numpy(), "temperature": t.numpy()}
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, onnxruntime.OrtValue.ortvalue_from_numpy(value))
    binding.bind_output("weights")
    wrapper = DWAWeightsSession(artifacts / "dwa_weights.onnx")
    wrapper_inputs = (feeds["loss_t1"], feeds["loss_t2"], np.float32(2.0))
    bare = wrapper.session
    times = compare(
        {
            "eager": lambda: eager(l1, l2, t),
            "TorchScript": lambda: scripted(l1, l2, t),
            "torch.export": lambda: program(l1, l2, t),
            "ONNX Runtime run": lambda: session.run(None, feeds),
            "ONNX Runtime I/O binding": lambda: session.run_with_iobinding(binding),
            "bare InferenceSession.run": lambda: bare.run(None, feeds),
            "DWAWeightsSession": lambda: wrapper(*wrapper_inputs),
        },
        config.calls,
        config.repeats,
    )
    rows = [Row(section, "eager DWAWeights", statistics.median(times["eager"]) * 1e6, "us/call")]
    for name in ("TorchScript", "torch.export", "ONNX Runtime run", "ONNX Runtime I/O binding"):
        rows.append(Row(section, name, ratio(times, name, "eager"), "x eager"))
    overhead = ratio(times, "DWAWeightsSession", "bare InferenceSession.run")
    rows.append(Row(section, "runtime.DWAWeightsSession / bare run", overhead, "x", "<= 1.25", overhead <= 1.25))
    return rows


def throughput(config: Config, artifacts: Path) -> list[Row]:
    n, k = config.rows, 4
    section = f"batched throughput, [{n}, {k}] float32, CPU"
    gen = torch.Generator().manual_seed(0)
    l1, l2 = torch.rand(n, k, generator=gen) + 0.5, torch.rand(n, k, generator=gen) + 0.5
    t = torch.tensor(2.0)
    moved = 3 * n * k * 4  # two inputs read, one output written
    src = torch.empty(moved // 2 // 4)  # a copy reads and writes: the same bytes moved
    dst = torch.empty_like(src)
    eager = DWAWeights()
    with quiet_exporters():
        scripted = torch.jit.load(str(artifacts / "dwa_weights.pt"))
    session = onnxruntime.InferenceSession(
        str(artifacts / "dwa_weights_batched.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds = {"loss_t1": l1.numpy(), "loss_t2": l2.numpy(), "temperature": np.full((1, 1), 2.0, np.float32)}
    reference = (l1 / l2 / 2.0).softmax(-1) * k
    times = compare(
        {
            "copy": lambda: dst.copy_(src),
            "eager": lambda: eager(l1, l2, t),
            "TorchScript": lambda: scripted(l1, l2, t),
            "ONNX Runtime": lambda: session.run(None, feeds),
            "torch.softmax": lambda: (l1 / l2 / 2.0).softmax(-1) * k,
        },
        1,
        max(3, config.repeats // 2),
    )
    assert torch.allclose(eager(l1, l2, t), reference, atol=1e-5)
    copy_speed = moved / statistics.median(times["copy"]) / 1e9
    rows = [Row(section, "plain tensor copy (bandwidth reference)", copy_speed, "GB/s")]
    for name in ("eager", "TorchScript", "ONNX Runtime"):
        speed = moved / statistics.median(times[name]) / 1e9
        rows.append(Row(section, name, speed, "GB/s"))
        rows.append(Row(section, f"{name} / copy", 1 / ratio(times, name, "copy"), "fraction"))
    rows.append(
        Row(
            section, "eager / the textbook softmax formula in torch", ratio(times, "torch.softmax", "eager"), "x faster"
        )
    )
    return rows


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def startup(config: Config, artifacts: Path, export_seconds: float | None) -> list[Row]:
    section = "export and start-up"
    rows = []
    if export_seconds is not None:
        rows.append(Row(section, "full dwa-export run (export + verify)", export_seconds, "s"))
    heavy = ("onnx", "onnxruntime", "onnxscript", "torch.onnx", "torch._dynamo")
    measure = (
        "import sys, time, json; t = time.perf_counter(); {stmt}; "
        "print(json.dumps([time.perf_counter() - t, [m for m in {mods!r} if m in sys.modules]]))"
    )
    for stmt, forbidden in (
        ("import dwa_export", ("torch", *heavy)),
        ("from dwa_export import DWA, DWAHistory, DWAWeights", heavy),
        ("import dwa_export.runtime", ("torch", "onnx", "onnxruntime")),
    ):
        seconds = []
        loaded: list[str] = []
        for _ in range(3 if config.export else 1):
            elapsed, loaded = json.loads(_python(measure.format(stmt=stmt, mods=forbidden)))
            seconds.append(elapsed)
        rows.append(Row(section, f"`{stmt}`", statistics.median(seconds) * 1e3, "ms"))
        rows.append(
            Row(section, f"  imports none of {', '.join(forbidden)}", float(len(loaded)), "loaded", "0", not loaded)
        )
    return rows


def _format(rows: list[Row]) -> str:
    lines = []
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            lines.append(f"\n{section}")
        value = f"{row.value:.3g}" if not math.isnan(row.value) else "-"
        status = "" if row.ok is None else ("ok" if row.ok else "MISSED")
        target = f"target {row.target}" if row.target else ""
        lines.append(f"  {row.name:<48} {value:>9} {row.unit:<9} {target:<14} {status}")
    return "\n".join(lines)


def run(
    config: Config,
    devices: Sequence[str] = ("cpu",),
    progress: Callable[[str], None] = print,
    artifacts: Path | None = None,
) -> list[Row]:
    """All sections. Exports the artifacts it loads into a temporary folder, unless given a folder of them."""
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as folder:
        export_seconds = None
        if artifacts is None:
            artifacts = Path(folder)
            progress("exporting artifacts ...")
            start = time.perf_counter()
            command = [sys.executable, "-m", "dwa_export", "--out", str(artifacts), "--quiet"]
            if not config.export:
                command += ["--formats", "torchscript,onnx,onnx-batched,pt2"]
            subprocess.run(command, check=True)
            export_seconds = time.perf_counter() - start if config.export else None
        for device in devices:
            progress(f"per-batch overhead on {device} ...")
            rows += per_batch(config, device)
            progress(f"train steps on {device} (compiles first) ...")
            rows += train_steps(config, device)
        progress("long epochs ...")
        rows += long_epoch(config)
        progress("checkpoint with a long log ...")
        rows += checkpoint_size(config)
        progress("kernel latency ...")
        rows += kernel_latency(config, artifacts)
        progress("batched throughput ...")
        rows += throughput(config, artifacts)
        progress("start-up ...")
        rows += startup(config, artifacts, export_seconds)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dwa-export bench",
        description=(
            "Benchmark the per-batch overhead, the kernel in every runtime, batched throughput and "
            "start-up. Medians over repeated runs; comparisons are side-by-side ratios."
        ),
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--quick", action="store_true", help="a tiny, fast configuration (figures are not meaningful)")
    parser.add_argument(
        "--artifacts", type=Path, help="time the files in this folder (e.g. exported) instead of exporting them anew"
    )
    args = parser.parse_args(argv)

    config = Config.quick() if args.quick else Config()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    started = time.perf_counter()
    rows = run(config, devices, lambda message: print(message, file=sys.stderr, flush=True), args.artifacts)
    print(f"dwa_export benchmark: torch {torch.__version__}, {torch.get_num_threads()} threads" + _format(rows))
    missed = [row for row in rows if row.ok is False]
    print(f"\n{len(rows)} figures in {time.perf_counter() - started:.0f} s; {len(missed)} targets missed")
    if args.json:
        args.json.write_text(
            json.dumps({"torch": torch.__version__, "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
        )
    return 0
