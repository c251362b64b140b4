"""One checkpoint format, three loaders: DWAHistory, NumpyDWAHistory and dwa::History (C++) agree.

Every text in tests/state_corpus/ and every state a property-based generator
makes (valid states, then mutated ones) is loaded by all three. They must give
the same verdict (accept or reject), never crash, and when they accept, write
back the same state (compared as values, not as text) and give the same
inputs() bits. Error messages are not compared.

Strict JSON is what both Python's json module and nlohmann/json (C++) read alike:
a text is strict when ``json.loads`` reads it without a NaN or Infinity constant
and every float in it is finite (1e400 reads as inf in Python; nlohmann refuses it).
Only strict texts must get the same verdict in C++; the Python histories agree on all.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dwa_export import DWAHistory
from dwa_export.runtime import NumpyDWAHistory
from test_cpp import (  # noqa: F401  (binaries: the shared, cached C++ build)
    assert_same,
    binaries,
    inputs_as_written,
    nan_script,
    run_driver,
    run_python,
)

CORPUS = Path(__file__).parent / "state_corpus"
CASES = sorted(CORPUS.glob("*/*.json"))


def load_python(cls, text: bytes) -> dict:
    """What ``cls`` makes of a checkpoint file: the state it writes back and its inputs, or an error."""
    try:
        state = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        return {"error": f"not JSON: {error}"}
    history = cls()
    try:
        history.load_state_dict(state)
    except ValueError as error:  # any other exception is a crash and fails the test
        return {"error": str(error)}
    inputs = None
    if history.num_tasks is not None:
        inputs = inputs_as_written(history.inputs())
    return {"ok": json.loads(json.dumps(history.state_dict())), "inputs": inputs}


def load_cpp(binaries: Path, texts: list[bytes]) -> list[dict]:
    """The same through dwa::History (or dwa::History64 for a float64 state), in one process."""
    framed = b"".join(f"{len(text)}\n".encode() + text for text in texts)
    result = subprocess.run(
        [str(binaries / "history_driver"), "loader"], input=framed, capture_output=True, timeout=300
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]  # a crash (e.g. SIGSEGV) fails here
    lines = result.stdout.decode().splitlines()
    assert len(lines) == len(texts)
    return [json.loads(line) for line in lines]


def _refuse(constant: str):
    raise ValueError(constant)


def strict(text: bytes) -> bool:
    """Whether ``text`` is JSON that Python's json module and nlohmann/json read alike."""

    def finite(value) -> bool:
        if isinstance(value, float):
            return math.isfinite(value)
        if isinstance(value, list):
            return all(map(finite, value))
        if isinstance(value, dict):
            return all(map(finite, value.values()))
        return True

    try:
        return finite(json.loads(text.decode("utf-8"), parse_constant=_refuse))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False


def assert_agree(texts: list[bytes], binaries: Path) -> list[bool]:
    """The Python histories agree on every text, C++ on every strict one; returns Python's verdicts."""
    accepted = []
    for text, from_cpp in zip(texts, load_cpp(binaries, texts), strict=True):
        torch_result, numpy_result = load_python(DWAHistory, text), load_python(NumpyDWAHistory, text)
        shown = text[:300]
        assert ("ok" in torch_result) == ("ok" in numpy_result), (shown, torch_result, numpy_result)
        if "ok" in torch_result:
            assert repr(torch_result) == repr(numpy_result), shown  # repr: NaN equals NaN
        if strict(text):
            assert ("ok" in torch_result) == ("ok" in from_cpp), (shown, torch_result, from_cpp)
            if "ok" in torch_result:  # the float64 bits round-trip through JSON exactly
                assert torch_result == from_cpp, (shown, torch_result, from_cpp)
        accepted.append("ok" in torch_result)
    return accepted


def test_the_corpus_covers_every_kind():
    counts = {kind: len(list(CORPUS.glob(f"{kind}/*.json"))) for kind in ("valid", "invalid", "python_only")}
    assert counts["valid"] >= 25 and counts["invalid"] >= 90 and counts["python_only"] >= 5, counts


def test_every_corpus_state_gets_the_same_verdict_and_bits_in_all_three(binaries):  # noqa: F811
    texts = [path.read_bytes() for path in CASES]
    cpp = load_cpp(binaries, texts)
    for path, text, from_cpp in zip(CASES, texts, cpp, strict=True):
        kind = path.parent.name
        assert strict(text) == (kind != "python_only") or kind == "invalid", path.name
        torch_result, numpy_result = load_python(DWAHistory, text), load_python(NumpyDWAHistory, text)
        assert ("ok" in torch_result) == ("ok" in numpy_result) == (kind != "invalid"), (path.name, torch_result)
        assert ("ok" in from_cpp) == (kind == "valid"), (path.name, from_cpp)
        if kind == "valid":
            assert torch_result == numpy_result == from_cpp, path.name
        elif kind == "python_only":
            assert repr(torch_result) == repr(numpy_result), path.name


def test_a_state_nested_100000_deep_is_a_clean_error(binaries):  # noqa: F811
    deep = b"[" * 100_000 + b"]" * 100_000
    (got,) = load_cpp(binaries, [deep])
    assert "error" in got
    assert "error" in load_python(DWAHistory, deep)


# --------------------------------------------------------------------------- property-based: generated states

finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6).filter(lambda v: v != 0)
anything = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6,
)


@st.composite
def states(draw) -> dict:
    """A valid state, version 4 mostly, else 3 or 2 (K from 1 to 4), with or without a running epoch,
    names and log.

    Its partial weight may be NaN or infinite and its sums anything: some are not strict JSON.
    """
    k = draw(st.integers(1, 4))
    version = draw(st.sampled_from([4, 4, 4, 3, 2]))
    sign = draw(st.sampled_from([1.0, -1.0]))
    positive = st.floats(min_value=1e-6, max_value=1e6)
    average = st.lists(positive.map(lambda v: sign * v), min_size=k, max_size=k)
    log_averages = draw(st.lists(average, max_size=3))
    n = len(log_averages)
    dtype = draw(st.sampled_from(["float32", "float64"]))
    partial = draw(
        st.none()
        | st.tuples(
            st.just(None),  # the whole group's: what one process can take
            st.integers(1, 4),
            st.integers(1, 2**53),
            st.integers(0, 2**53).flatmap(lambda rows: st.tuples(st.just(rows), st.integers(0, rows))),
            st.floats(min_value=0) | st.just(math.nan),
            st.lists(st.floats(), min_size=k, max_size=k),
        ).map(list)
    )
    log = {
        "batches": draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n)),
        "weight": draw(st.lists(st.floats(min_value=1e-3, max_value=1e9), min_size=n, max_size=n)),
        "averages": log_averages,
    }
    state = {
        "format": "dwa_export.history",
        "version": version,
        "num_tasks": k,
        "tasks": draw(st.none() | st.just([f"t{i}" for i in range(k)])),
        "averages": log_averages[-2:],
    }
    if partial is not None:  # [rank, world_size, batches, (rows, nonfinite_rows), weight, sums]
        partial = [*partial[:3], *partial[3], *partial[4:]] if version == 4 else [*partial[:3], *partial[4:]]
    if version == 2:
        return {**state, "partial": partial and [*partial[:2], dtype, *partial[2:]], "log": log}
    weights = st.lists(st.floats(min_value=0, max_value=10), min_size=k, max_size=k)
    log["temperature"] = draw(st.lists(st.none() | st.floats(min_value=1e-3, max_value=1e3), min_size=n, max_size=n))
    log["weights"] = draw(st.lists(st.none() | weights, min_size=n, max_size=n))
    if version == 4:
        log["nonfinite_rows"] = draw(st.lists(st.integers(0, 10**6), min_size=n, max_size=n))
    return {**state, "dtype": dtype, "partial": partial, "log": log}


@st.composite
def mutated(draw) -> bytes:
    """A generated state with one or two leaves or keys changed, then maybe some bytes changed."""
    state = copy.deepcopy(draw(states()))
    for _ in range(draw(st.integers(0, 2))):
        paths = list(_paths(state))
        path = draw(st.sampled_from(paths))
        parent = state
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "extreme"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "extreme":
            parent[path[-1]] = draw(
                st.sampled_from(
                    [
                        0,
                        -0.0,
                        -1,
                        2**53 + 1,
                        2**64,
                        10**30,
                        1e308,
                        5e-324,
                        math.inf,
                        -math.inf,
                        math.nan,
                        True,
                        "",
                        None,
                    ]
                )
            )
        else:
            parent[path[-1]] = draw(anything)
    text = json.dumps(state).encode()
    if draw(st.integers(0, 4)) == 0 and text:
        position = draw(st.integers(0, len(text) - 1))
        edit = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        byte = bytes([draw(st.integers(0, 255))])
        if edit == "flip":
            text = text[:position] + byte + text[position + 1 :]
        elif edit == "insert":
            text = text[:position] + byte + text[position:]
        elif edit == "delete":
            text = text[:position] + text[position + 1 :]
        else:
            text = text[:position]
    return text


def _paths(value, prefix=()):
    """Every (key or index) path into a JSON value."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return
    for key, child in items:
        yield prefix + (key,)
        yield from _paths(child, prefix + (key,))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(states().map(lambda s: json.dumps(s).encode()), min_size=40, max_size=40))
def test_generated_valid_states_load_identically_everywhere(binaries, texts):  # noqa: F811
    assert all(assert_agree(texts, binaries))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(mutated(), min_size=60, max_size=60))
def test_generated_mutated_states_get_the_same_verdict_everywhere(binaries, texts):  # noqa: F811
    assert_agree(texts, binaries)


# --------------------------------------------------------------------------- what a history writes reloads


@pytest.mark.filterwarnings("ignore::dwa_export.NonFiniteLossWarning")  # nan_strategy="warn"
@settings(max_examples=15, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["record", "rows", "weighted", "per_row", "step", "tstep", "discard", "nonfinite", "masked"]
            ),
            st.lists(st.floats(0.25, 100.0, width=32), min_size=6, max_size=6),
            st.sampled_from([torch.float32, torch.float64]),
        ),
        max_size=25,
    ),
    st.sampled_from(["error", "warn", "ignore"]),
)
def test_a_state_any_history_writes_reloads_in_all_three(binaries, steps, nan_strategy):  # noqa: F811
    torch_history = DWAHistory(num_tasks=3, nan_strategy=nan_strategy)
    numpy_history = NumpyDWAHistory(num_tasks=3, nan_strategy=nan_strategy)
    texts = []
    for command, values, dtype in steps:
        losses = torch.tensor(values, dtype=dtype)
        bad = losses.clone()
        bad[1], bad[3] = (math.inf, math.nan) if values[0] < 50 else (math.nan, values[3])  # 1 or 2 rows
        try:
            if command == "nonfinite":
                torch_history.record(bad.view(2, 3))
                numpy_history.record(bad.view(2, 3).numpy())
            elif command == "masked":  # the weight-0 row holds the NaN or infinity
                masked, row_weights = torch.cat((bad[:3], losses[3:])), torch.tensor([0.0, values[5]]).double()
                torch_history.record(masked.view(2, 3), row_weights)
                numpy_history.record(masked.view(2, 3).numpy(), row_weights.numpy())
            elif command == "record":
                torch_history.record(losses[:3])
                numpy_history.record(losses[:3].numpy())
            elif command == "rows":
                torch_history.record(losses.view(2, 3))
                numpy_history.record(losses.view(2, 3).numpy())
            elif command == "weighted":
                torch_history.record(losses[:3], weight=values[3])
                numpy_history.record(losses[:3].numpy(), weight=values[3])
            elif command == "per_row":
                row_weights = torch.tensor(values[4:], dtype=torch.float64)
                torch_history.record(losses.view(2, 3), row_weights)
                numpy_history.record(losses.view(2, 3).numpy(), row_weights.numpy())
            elif command == "step":
                torch_history.step()
                numpy_history.step()
            elif command == "tstep":  # as DWA does: a temperature, then the weights it computed
                torch_history.step(temperature=values[5])
                numpy_history.step(temperature=values[5])
                torch_history.log_weights(values[5], values[:3])
                numpy_history.log_weights(values[5], values[:3])
            else:
                torch_history.discard_epoch()
                numpy_history.discard_epoch()
        except (ValueError, RuntimeError):  # e.g. a sign change, or log_weights() on an empty log: both alike
            torch_history.discard_epoch()
            numpy_history.discard_epoch()
        text = json.dumps(torch_history.state_dict()).encode()  # as text: NaN sums (nan_strategy "error")
        assert text == json.dumps(numpy_history.state_dict()).encode()
        texts.append(text)
    if texts:
        assert all(assert_agree(texts, binaries))


@pytest.mark.parametrize("nan_strategy", ["error", "warn", "ignore"])
def test_states_written_under_each_nan_strategy_resume_everywhere(binaries, nan_strategy):  # noqa: F811
    # The states tests/test_cpp.py's nan_script() has each history write (rows left out, weight-0 rows,
    # NaN sums under "error") load alike in all three, and each resumes in every other: the same step().
    texts = []
    for dtype, args in (("float32", ()), ("float64", ("float64",))):
        script = nan_script(dtype)
        runs = [run_driver(binaries, script, *args, f"nan={nan_strategy}")]
        runs += [run_python(script, kind, dtype == "float64", nan_strategy=nan_strategy) for kind in ("torch", "numpy")]
        for run in runs:
            texts += [json.dumps(result["ok"]).encode() for line, result in zip(script, run, strict=True)
                      if line == "state" and "ok" in result]  # fmt: skip
    assert len(texts) == 3 * 2 * 7 - (4 if nan_strategy == "error" else 0)  # C++ writes no NaN or inf sums
    assert all(assert_agree(texts, binaries))
    warned = 0
    for dtype, args in (("float32", ()), ("float64", ("float64",))):  # History or History64
        resume = [f"{command} {text.decode()}" if command == "load" else command
                  for text in texts if strict(text) and json.loads(text)["dtype"] == dtype
                  for command in ("load", "step", "log", "state")]  # fmt: skip
        cpp = run_driver(binaries, resume, *args, f"nan={nan_strategy}")
        for kind in ("torch", "numpy"):
            assert_same(resume, cpp, run_python(resume, kind, dtype == "float64", nan_strategy=nan_strategy))
        warned += sum(result.get("warned", False) for result in cpp)
    # The one resumed epoch with rows left out whose step() succeeds: the first mid-epoch state,
    # from each of 3 writers in 2 precisions.
    assert warned == (6 if nan_strategy == "warn" else 0)
