"""``dwa-export plot STATE``: draw (or print as CSV) the per-epoch log of a DWA checkpoint."""

from __future__ import annotations

import argparse
import csv
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["find_state", "load_log", "main"]

HISTORY_FORMAT = "dwa_export.history"


class PlotError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def _walk(root: Any) -> Iterator[tuple[Callable[[], str], Any]]:
    """Every dict, list and tuple inside ``root``, each object once, depth first in order.

    Yields (a function giving the object's path, the object). Each object is
    entered once however often it is referenced (a checkpoint may share one
    list between many places, 2^60 paths in 1.7 KB), a container holding
    itself is no loop, and no recursion means no depth limit. Paths are only
    built when asked for, so a deep chain costs no quadratic string building.
    """
    seen: set[int] = set()
    parents: dict[int, tuple[int, str]] = {}  # id -> (id of the container it was reached from, the step)
    stack: list[tuple[Any, int | None, str]] = [(root, None, "")]
    while stack:
        value, parent, step = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if parent is not None:
            parents[id(value)] = (parent, step)
        yield functools.partial(_path, parents, id(value)), value
        if isinstance(value, dict):
            children = [(child, f"[{key!r}]") for key, child in value.items()]
        elif isinstance(value, (list, tuple)):
            children = [(child, f"[{index}]") for index, child in enumerate(value)]
        else:
            continue
        stack.extend(
            (child, id(value), step) for child, step in reversed(children) if isinstance(child, (dict, list, tuple))
        )


def _path(parents: dict[int, tuple[int, str]], key: int) -> str:
    steps = []
    while key in parents:
        key, step = parents[key]
        steps.append(step)
    path = "".join(reversed(steps))
    return path if len(path) <= 200 else f"{path[:100]}...{path[-97:]}"


def find_state(checkpoint: Any) -> tuple[str, dict[str, Any], bool]:
    """The first DWA (or DWAHistory) state inside ``checkpoint``: (path, state, whether it is a DWA's).

    Found by the history format marker, so ``{"model": ..., "dwa": dwa.state_dict()}``
    works as it is.
    """
    for path, value in _walk(checkpoint):
        if not isinstance(value, dict):
            continue
        history = value.get("history")
        if isinstance(history, dict) and history.get("format") == HISTORY_FORMAT and "temperature" in value:
            return path(), value, True
        if value.get("format") == HISTORY_FORMAT:
            return path(), value, False
    raise PlotError("no DWA state in it: expected DWA.state_dict() or DWAHistory.state_dict() somewhere inside")


def read_checkpoint(path: Path) -> Any:
    """A JSON history state, or anything ``torch.load(..., weights_only=True)`` reads."""
    if not path.is_file():
        raise PlotError("no such file")
    data = path.read_bytes()
    if data[:1] in (b"{", b"[") or path.suffix == ".json":
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise PlotError(f"not a valid JSON state ({error})") from None
        except RecursionError:
            raise PlotError("not a valid JSON state (nested too deeply to read)") from None
    import io

    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many kinds for a bad file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PlotError(f"not a checkpoint torch.load can read with weights_only=True ({reason})") from None


def load_log(checkpoint: Any, temperature: float = 2.0) -> tuple[list[dict[str, Any]], list[str], str]:
    """The DWA log of the state inside ``checkpoint``, task names, and a note on where it came from.

    A ``DWAHistory`` state holds weights only where ``log_weights()`` was called;
    the others are computed from its averages at ``temperature`` (the note says so).
    """
    path, state, is_dwa = find_state(checkpoint)
    where = f"the state at {path or 'the top level'}"
    try:
        if is_dwa:
            from ._loss import DWA

            dwa = DWA()
            dwa.set_extra_state(state)
            return dwa.log, _names(dwa.tasks, dwa.history.num_tasks), where
        from ._epochs import check_temperature
        from ._numpy_history import NumpyDWAHistory

        check_temperature(temperature)
        history = NumpyDWAHistory()  # the same rules, without torch
        history.load_state_dict(state)
    except (TypeError, ValueError) as error:
        raise PlotError(f"{where} is not a valid DWA state: {error}") from None
    except RecursionError:  # e.g. a message that names a value nested thousands deep
        raise PlotError(f"{where} is not a valid DWA state: a value in it is nested too deeply") from None
    except Exception as error:  # noqa: BLE001 - whatever else a malformed state trips over: still one line
        raise PlotError(f"{where} is not a valid DWA state: {type(error).__name__}: {error}") from None
    from ._reference import reference_weights

    log, computed = [], False
    for i, entry in enumerate(history.log):
        previous = history.log[i - 1]["averages"] if i else None
        rates = None if previous is None else [a / p for a, p in zip(entry["averages"], previous, strict=True)]
        if entry["weights"] is None:
            computed = True
            entry = dict(entry, temperature=temperature)
            if previous is None:  # the first average leaves the weights of the next epoch uniform
                entry["weights"] = [1.0] * len(entry["averages"])
            else:
                entry["weights"] = reference_weights(entry["averages"], previous, temperature).tolist()
        log.append(dict(entry, rates=rates))
    note = f"{where} (a DWAHistory state: weights computed at T={temperature:g})" if computed else where
    return log, _names(history.tasks, history.num_tasks), note


def _names(tasks: Sequence[str] | None, num_tasks: int | None) -> list[str]:
    return list(tasks) if tasks else [f"task_{k}" for k in range(num_tasks or 0)]


def _values(entry_value: Any, names: list[str]) -> list[float | None]:
    if entry_value is None:
        return [None] * len(names)
    if isinstance(entry_value, dict):
        return [entry_value[name] for name in names]
    return list(entry_value)


def write_csv(log: list[dict[str, Any]], names: list[str], out: Any) -> None:
    """One header line, one line per epoch: epoch, batches, weight, nonfinite_rows, temperature, then per task."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["epoch", "batches", "weight", "nonfinite_rows", "temperature"]
        + [f"average_{n}" for n in names]
        + [f"rate_{n}" for n in names]
        + [f"weight_{n}" for n in names]
    )
    for entry in log:
        cells = [
            entry["epoch"],
            entry["batches"],
            repr(entry["weight"]),
            entry["nonfinite_rows"],
            "" if entry["temperature"] is None else repr(entry["temperature"]),
        ]
        for key in ("averages", "rates", "weights"):
            cells += ["" if v is None else repr(v) for v in _values(entry[key], names)]
        writer.writerow(cells)


def draw(log: list[dict[str, Any]], names: list[str], output: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    epochs = len(log)
    # The weights an entry holds are those of the next epoch; epochs 0 and 1 are the warm-up.
    used_in = list(range(1, epochs + 1))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, constrained_layout=True)
    # Uniform weights until the first entry that has rates (two averages), i.e. epochs 0 and 1.
    warm_up_end = next((e for e, entry in zip(used_in, log, strict=True) if entry["rates"] is not None), epochs + 1) - 1
    for axis in (top, bottom):
        axis.axvspan(-0.5, warm_up_end + 0.5, color="0.9", zorder=0, label="_nolegend_")
        axis.grid(True, alpha=0.3)
    columns = list(zip(*[_values(entry["weights"], names) for entry in log], strict=True)) if log else [()] * len(names)
    for name, weights in zip(names, columns, strict=True):
        top.plot([0, *used_in], [1.0, *[math.nan if w is None else w for w in weights]], marker=".", label=name)
    top.set_ylabel("weight used in the epoch")
    top.set_title(title, fontsize=10)
    top.legend(loc="best", fontsize=8)
    averages = (
        list(zip(*[_values(entry["averages"], names) for entry in log], strict=True)) if log else [()] * len(names)
    )
    positive = all(v > 0 for column in averages for v in column)
    for name, values in zip(names, averages, strict=True):
        bottom.plot(range(epochs), values, marker=".", label=name)
    if positive and epochs:
        bottom.set_yscale("log")
    bottom.set_ylabel("epoch-average loss" + (" (log scale)" if positive else ""))
    bottom.set_xlabel("epoch (shaded: warm-up, uniform weights)")
    figure.savefig(output, dpi=110)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dwa-export plot",
        description=(
            "Draw the DWA weights and epoch-average losses per task over the epochs of a checkpoint: a "
            "torch.save'd file holding DWA.state_dict() or DWAHistory.state_dict() anywhere inside "
            "(e.g. {'model': ..., 'dwa': dwa.state_dict()}), or a JSON history state."
        ),
    )
    parser.add_argument("state", type=Path, help="the checkpoint file")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("dwa_weights.png"),
        help="the image to write (default: dwa_weights.png)",
    )
    parser.add_argument("--csv", action="store_true", help="print the log as CSV instead of drawing")
    parser.add_argument(
        "--temperature",
        type=float,
        default=2.0,
        help="T for the weights of a DWAHistory state, which stores none (default: 2.0)",
    )
    args = parser.parse_args(argv)
    if not args.csv:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                'dwa-export plot: error: drawing needs matplotlib: pip install "dwa-export[plot]" (or use --csv)',
                file=sys.stderr,
            )
            return 2
    try:
        log, names, where = load_log(read_checkpoint(args.state), args.temperature)
        if args.csv:
            write_csv(log, names, sys.stdout)
            return 0
        if not log:
            raise PlotError("the DWA log is empty (no epoch has been stepped yet)")
        draw(log, names, args.output, f"{args.state.name}: {len(log)} epochs, {where}")
    except PlotError as error:
        print(f"dwa-export plot: error: {args.state}: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. --csv | head: the reader has all it wants
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit
        return 0
    except OSError as error:
        print(f"dwa-export plot: error: {error.filename or args.output}: {error.strerror}", file=sys.stderr)
        return 2
    print(f"wrote {args.output} ({len(log)} epochs, tasks {', '.join(names)}; from {where})")
    return 0
