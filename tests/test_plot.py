"""dwa-export plot: the picture and the CSV of a checkpoint's DWA log, and its one-line errors."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dwa_export import DWA, DWAHistory
from dwa_export._cli import main
from reference import dwa_weights

ROOT = Path(__file__).resolve().parents[1]


def trained(tasks=("seg", "depth", "normal"), epochs: int = 6) -> DWA:
    dwa = DWA(temperature=1.5, tasks=tasks)
    gen = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        for _ in range(4):
            dwa(torch.rand(3, generator=gen) / (1 + epoch * torch.tensor([1.0, 0.3, 0.05])))
        dwa.step()
    return dwa


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, DWA]:
    """A checkpoint the way a trainer writes one: the DWA state nested inside."""
    dwa = trained()
    path = tmp_path_factory.mktemp("plot") / "checkpoint.pt"
    torch.save({"epoch": 6, "model": torch.nn.Linear(2, 2).state_dict(), "dwa": dwa.state_dict()}, path)
    return path, dwa


def test_csv_is_the_log(checkpoint, capsys):
    path, dwa = checkpoint
    assert main(["plot", str(path), "--csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    header, body = rows[0], rows[1:]
    assert header[:5] == ["epoch", "batches", "weight", "nonfinite_rows", "temperature"]
    assert header[5:8] == ["average_seg", "average_depth", "average_normal"]
    assert len(body) == len(dwa.log) == 6
    for row, entry in zip(body, dwa.log, strict=True):
        cells = dict(zip(header, row, strict=True))
        assert int(cells["epoch"]) == entry["epoch"] and int(cells["batches"]) == entry["batches"] == 4
        assert int(cells["nonfinite_rows"]) == entry["nonfinite_rows"] == 0
        assert float(cells["temperature"]) == 1.5
        for name in ("seg", "depth", "normal"):
            assert float(cells[f"average_{name}"]) == entry["averages"][name]  # repr: exact
            assert float(cells[f"weight_{name}"]) == entry["weights"][name]
            assert cells[f"rate_{name}"] == ("" if entry["rates"] is None else repr(entry["rates"][name]))


def test_a_history_state_gets_weights_at_the_given_temperature(tmp_path, capsys):
    history = DWAHistory(num_tasks=2)
    for losses in ([1.0, 2.0], [0.5, 1.9], [0.25, 1.8]):
        history.record(torch.tensor(losses))
        history.step()
    path = tmp_path / "history.json"
    path.write_text(json.dumps(history.state_dict()))
    assert main(["plot", str(path), "--csv", "--temperature", "0.5"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["weight_task_0"] for row in rows[:1]] == ["1.0"]  # after one average: uniform
    averages = [np.array(h["averages"]) for h in history.log]
    for row, i in zip(rows[1:], (1, 2), strict=True):
        expected = dwa_weights(averages[i], averages[i - 1], 0.5)
        np.testing.assert_allclose([float(row["weight_task_0"]), float(row["weight_task_1"])], expected, rtol=1e-12)


def test_the_picture_is_written_and_is_not_blank(checkpoint, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    path, _ = checkpoint
    out = tmp_path / "weights.png"
    assert main(["plot", str(path), "-o", str(out)]) == 0
    assert "6 epochs, tasks seg, depth, normal" in capsys.readouterr().out
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (715, 880)  # 8 x 6.5 inches at 110 dpi
    rgb = image[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05 and len(np.unique(rgb.round(2), axis=0)) > 20  # lines, text, colours
    # The three task colours of the legend are there.
    for colour in ((0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17)):
        assert (np.abs(rgb - colour).max(axis=1) < 0.03).sum() > 100


def test_without_matplotlib_it_says_what_to_install(checkpoint, tmp_path):
    path, _ = checkpoint
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'matplotlib' or name.startswith('matplotlib.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    result = subprocess.run(
        [sys.executable, "-m", "dwa_export", "plot", str(path), "-o", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        'dwa-export plot: error: drawing needs matplotlib: pip install "dwa-export[plot]" (or use --csv)'
    )


class TookTooLong(Exception):
    """Not an OSError (as TimeoutError is), which plot would report as a file problem."""


@contextlib.contextmanager
def at_most(seconds: int):
    """Fail, instead of hanging, when the block takes longer than ``seconds``."""

    def expire(signum, frame):
        raise TookTooLong(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_list_shared_2_to_the_60_times_is_walked_once(checkpoint, tmp_path, capsys):
    # Issue 10: 60 levels of `node = [node, node]` (1.7 kB, safe under weights_only)
    # used to be walked along all 2^60 paths: plot hung before reaching the DWA state.
    _, dwa = checkpoint
    node: list = []
    for _ in range(60):
        node = [node, node]
    path = tmp_path / "shared.pt"
    torch.save({"junk": node, "dwa": dwa.state_dict()}, path)
    assert path.stat().st_size < 10_000
    with at_most(20):
        assert main(["plot", str(path), "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [float(row["weight_seg"]) for row in rows] == [entry["weights"]["seg"] for entry in dwa.log]


def test_a_list_that_contains_itself_is_no_loop(checkpoint, tmp_path, capsys):
    # Issue 10: it used to end in a RecursionError traceback.
    _, dwa = checkpoint
    loop: list = []
    loop.append(loop)
    path = tmp_path / "loop.pt"
    torch.save({"loop": loop, "dwa": dwa.state_dict()}, path)
    assert main(["plot", str(path), "--csv"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + len(dwa.log)
    torch.save({"loop": loop}, path)
    assert main(["plot", str(path), "--csv"]) == 2
    assert capsys.readouterr().err == (
        f"dwa-export plot: error: {path}: no DWA state in it: "
        "expected DWA.state_dict() or DWAHistory.state_dict() somewhere inside\n"
    )


def make_bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    nothing = tmp_path / "nothing.pt"
    torch.save({"model": torch.nn.Linear(2, 2).state_dict()}, nothing)
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps(dict(DWAHistory(num_tasks=2).state_dict(), averages=[[1.0, 0.0]])))
    pickled = tmp_path / "pickled.pt"
    torch.save({"dwa": Path("not allowed by weights_only")}, pickled)
    deep_json = tmp_path / "deep.json"
    deep_json.write_text("[" * 100_000 + "]" * 100_000)
    deep_value = tmp_path / "deep.pt"
    nested: list = []
    for _ in range(5_000):
        nested = [nested]
    state = trained(epochs=2).state_dict()
    state["_extra_state"]["temperature"] = nested
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # for torch.save's pickler only
    try:
        torch.save({"dwa": state}, deep_value)
    finally:
        sys.setrecursionlimit(limit)
    return {
        "missing": (tmp_path / "missing.pt", "no such file"),
        "corrupt": (corrupt, "not a checkpoint torch.load can read with weights_only=True"),
        "no state": (nothing, "no DWA state in it"),
        "invalid state": (invalid, "is not a valid DWA state: malformed DWA history state_dict: 'averages'[0]"),
        "unsafe pickle": (pickled, "weights_only=True"),
        "deep JSON": (deep_json, "not a valid JSON state (nested too deeply to read)"),
        "deep value in a state": (deep_value, "is not a valid DWA state: a value in it is nested too deeply"),
    }


BAD_FILES = ["missing", "corrupt", "no state", "invalid state", "unsafe pickle", "deep JSON", "deep value in a state"]


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_input_is_one_line_with_exit_status_2(tmp_path, case, capsys):
    path, message = make_bad_files(tmp_path)[case]
    assert main(["plot", str(path), "--csv"]) == 2  # an exception would fail the test: no traceback
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err and str(path) in err


def test_help_lists_plot(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "dwa-export plot STATE" in capsys.readouterr().out


def test_readme_picture_comes_from_the_documented_run(tmp_path, monkeypatch):
    # README shows tests/data/dwa_weights.png, made by tests/readme_run.py and dwa-export plot.
    # The script runs as `python tests/readme_run.py run.pt` would run it, in this process:
    # a new one would spend most of its time importing torch. Its 480 tiny steps take
    # 0.3 s on one thread and ten times that where intra-op threads fight over 2 cores.
    monkeypatch.setattr(sys, "argv", [str(ROOT / "tests" / "readme_run.py"), str(tmp_path / "run.pt")])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():  # the script seeds the global generator
            runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    fresh = torch.load(tmp_path / "run.pt", weights_only=True)["dwa"]
    committed = torch.load(ROOT / "tests" / "data" / "readme_run.pt", weights_only=True)["dwa"]
    fresh_log, committed_log = (state["_extra_state"]["history"]["log"] for state in (fresh, committed))
    assert fresh_log["batches"] == committed_log["batches"]  # the same run (to float rounding on another CPU)
    np.testing.assert_allclose(fresh_log["averages"], committed_log["averages"], rtol=1e-4)
    assert (ROOT / "tests" / "data" / "dwa_weights.png").stat().st_size > 10_000
