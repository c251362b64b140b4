"""Writes the shared corpus of checkpoint states, loaded by DWAHistory, NumpyDWAHistory and dwa::History (C++):

- valid/*.json: all three accept them and agree on the state they write back and on inputs();
- invalid/*.json: all three reject them;
- python_only/*.json: not strict JSON (NaN or Infinity, a number beyond the double range)
  where the format allows a non-finite value: Python's json module reads them and the
  Python histories accept them; nlohmann/json, and so the C++ history, refuses them.

Fixed-K and task-name mismatches are not corpus cases: they depend on the loading
history, and tests/test_cpp.py covers them. tests/test_state_format.py loads every file.
Run this script after changing the format, then commit the files:
``python tests/state_corpus/generate.py``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

HERE = Path(__file__).parent

EMPTY_LOG = {"batches": [], "weight": [], "averages": [], "temperature": [], "weights": [], "nonfinite_rows": []}
# Version 4: 3 batches of 5 rows, 1 of them left out for a NaN or infinity; the log's second epoch left out 2.
BASE = {
    "format": "dwa_export.history",
    "version": 4,
    "num_tasks": 2,
    "tasks": None,
    "dtype": "float32",
    "averages": [[1.0, 2.0], [0.5, 1.5]],
    "partial": [None, 1, 3, 5, 1, 3.0, [0.75, 3.0]],
    "log": {
        "batches": [2, 3],
        "weight": [2.0, 3.0],
        "averages": [[1.0, 2.0], [0.5, 1.5]],
        "temperature": [None, 2.0],
        "weights": [None, [0.9, 1.1]],
        "nonfinite_rows": [0, 2],
    },
}
V3 = {
    "format": "dwa_export.history",
    "version": 3,
    "num_tasks": 2,
    "tasks": None,
    "dtype": "float32",
    "averages": [[1.0, 2.0], [0.5, 1.5]],
    "partial": [None, 1, 3, 3.0, [0.75, 3.0]],
    "log": {
        "batches": [2, 3],
        "weight": [2.0, 3.0],
        "averages": [[1.0, 2.0], [0.5, 1.5]],
        "temperature": [None, 2.0],
        "weights": [None, [0.9, 1.1]],
    },
}
V3_EMPTY_LOG = {"batches": [], "weight": [], "averages": [], "temperature": [], "weights": []}
V2 = {
    "format": "dwa_export.history",
    "version": 2,
    "num_tasks": 2,
    "tasks": None,
    "averages": [[1.0, 2.0], [0.5, 1.5]],
    "partial": [None, 1, "float32", 3, 3.0, [0.75, 3.0]],
    "log": {"batches": [2, 3], "weight": [2.0, 3.0], "averages": [[1.0, 2.0], [0.5, 1.5]]},
}
V2_EMPTY_LOG = {"batches": [], "weight": [], "averages": []}


def state(base=BASE, **changes) -> dict:
    out = copy.deepcopy(base)
    out.update(copy.deepcopy(changes))
    return out


def partial(**fields) -> list:
    """BASE's running epoch (version 4), changed."""
    names = ("rank", "world_size", "batches", "rows", "nonfinite_rows", "weight", "sums")
    values = dict(zip(names, BASE["partial"], strict=True), **fields)
    return [values[name] for name in names]


def partial_v3(**fields) -> list:
    names = ("rank", "world_size", "batches", "weight", "sums")
    values = dict(zip(names, V3["partial"], strict=True), **fields)
    return [values[name] for name in names]


def partial_v2(**fields) -> list:
    names = ("rank", "world_size", "dtype", "batches", "weight", "sums")
    values = dict(zip(names, V2["partial"], strict=True), **fields)
    return [values[name] for name in names]


def log(**columns) -> dict:
    """A one-entry version-4 log, changed."""
    entry = {"batches": [1], "weight": [1.0], "averages": [[1.0, 2.0]], "temperature": [None], "weights": [None]}
    return {**entry, "nonfinite_rows": [0], **columns}


def log_v3(**columns) -> dict:
    return {key: value for key, value in log(**columns).items() if key != "nonfinite_rows"}


def dumps(value) -> bytes:
    return json.dumps(value).encode()


def edited(value, old: bytes, new: bytes) -> bytes:
    """``value``'s JSON text with its one ``old`` replaced: a text no dict can make."""
    text = dumps(value)
    assert text.count(old) == 1, (text, old)
    return text.replace(old, new)


VALID: dict[str, bytes] = {
    "fresh": dumps(state(num_tasks=None, averages=[], partial=None, log=EMPTY_LOG)),
    "k_known_nothing_recorded": dumps(state(averages=[], partial=None, log=EMPTY_LOG)),
    "warm_up_one_average": dumps(state(averages=[[1.0, 2.0]], log=log())),
    "ready_mid_epoch_float32": dumps(BASE),
    "ready_at_epoch_boundary": dumps(state(partial=None)),
    "mid_epoch_float64": dumps(state(dtype="float64", partial=partial(sums=[0.1, 1 / 3]))),
    "float64_at_epoch_boundary": dumps(
        state(dtype="float64", partial=None, averages=[[0.1, 0.2], [1 / 3, 0.7]], log=EMPTY_LOG)
    ),
    "float32_sums_of_any_double": dumps(state(partial=partial(sums=[0.1, 1 / 3]))),
    "named_tasks": dumps(state(tasks=["seg", "depth"])),
    "unicode_task_names": dumps(state(tasks=["\u00e9t\u00e9", "\U0001f600"])),
    "escaped_key": edited(state(), b'"format"', b'"\\u0066ormat"'),
    "duplicate_key_last_wins": edited(state(), b'"version": 4', b'"version": 3, "version": 4'),
    "integers_as_floats": dumps(
        state(averages=[[1, 2], [3, 4]], log=log(weight=[2], averages=[[1, 2]], temperature=[3], weights=[[0, 2]]))
    ),
    "minus_zero_integer_in_sums": edited(state(partial=partial(sums=[0, 1])), b"[0, 1]", b"[-0, 1]"),
    "underflow_to_zero_in_sums": edited(state(partial=partial(sums=[0.0, 1.0])), b"[0.0, 1.0]", b"[1e-400, 1.0]"),
    "big_integer_in_sums": dumps(state(partial=partial(sums=[10**30, 2**64]))),
    "zero_weight_batch": dumps(state(partial=partial(batches=1, rows=1, nonfinite_rows=0, weight=0.0, sums=[0, 0]))),
    "partial_weight_minus_zero": dumps(state(partial=partial(weight=-0.0))),  # written back as 0.0
    "negative_losses_one_sign": dumps(state(averages=[[-1.0, 2.0], [-0.5, 1.5]], log=EMPTY_LOG)),
    "consolidated_group_epoch": dumps(state(partial=partial(world_size=4))),
    "largest_counts": dumps(
        state(
            partial=partial(world_size=2**24, batches=2**53, rows=2**53, nonfinite_rows=2**53),
            log=log(batches=[2**53], nonfinite_rows=[2**53]),
        )
    ),
    "log_weights_zero_and_tiny_weight": dumps(state(log=log(weight=[5e-324], weights=[[0.0, 2.0]], temperature=[0.5]))),
    "whitespace_everywhere": json.dumps(BASE, indent="\t").replace("\n", "\r\n").encode(),
    "thousand_tasks": dumps(state(num_tasks=1000, averages=[[1.0] * 1000], partial=None, log=EMPTY_LOG)),
    # Rows left out for a NaN or infinity (nan_strategy "warn" or "ignore").
    "no_row_left_out": dumps(state(partial=partial(nonfinite_rows=0), log=log(nonfinite_rows=[0]))),
    "every_row_left_out_mid_epoch": dumps(
        state(partial=partial(batches=2, rows=4, nonfinite_rows=4, weight=0.0, sums=[0.0, 0.0]))
    ),  # step() then raises: every weighted row was left out
    "rows_left_out_and_zero_weight_rows": dumps(state(partial=partial(rows=9, nonfinite_rows=2, weight=1.5))),
    "partial_rows_zero": dumps(state(partial=partial(rows=0, nonfinite_rows=0))),  # the format asks rows >= 0 only
    "log_nonfinite_rows_beyond_batches": dumps(state(log=log(batches=[1], nonfinite_rows=[10**6]))),  # rows of batches
    # Version 3: no row counts; a running epoch reads as one row per batch, none left out.
    "version_3_mid_epoch_float32": dumps(V3),
    "version_3_mid_epoch_float64": dumps(state(V3, dtype="float64", partial=partial_v3(sums=[0.1, 1 / 3]))),
    "version_3_epoch_boundary": dumps(state(V3, partial=None)),
    "version_3_fresh": dumps(state(V3, num_tasks=None, averages=[], partial=None, log=V3_EMPTY_LOG)),
    "version_3_named_tasks": dumps(state(V3, tasks=["seg", "depth"])),
    "version_3_consolidated_group_epoch": dumps(state(V3, partial=partial_v3(world_size=4))),
    "version_3_zero_weight_batch": dumps(state(V3, partial=partial_v3(batches=2, weight=0.0, sums=[0.0, 0.0]))),
    "version_3_largest_counts": dumps(state(V3, partial=partial_v3(batches=2**53), log=log_v3(batches=[2**53]))),
    # Version 2: dtype from the running epoch, float32 without one; no temperatures or weights.
    "version_2_mid_epoch_float32": dumps(V2),
    "version_2_mid_epoch_float64": dumps(state(V2, partial=partial_v2(dtype="float64", sums=[0.1, 1 / 3]))),
    "version_2_epoch_boundary": dumps(state(V2, partial=None)),
    "version_2_fresh": dumps(state(V2, num_tasks=None, averages=[], partial=None, log=V2_EMPTY_LOG)),
    "version_2_named_tasks": dumps(state(V2, tasks=["seg", "depth"])),
    "version_2_float32_sums_of_any_double": dumps(state(V2, partial=partial_v2(sums=[0.1, 1.0]))),
    "version_2_consolidated_group_epoch": dumps(state(V2, partial=partial_v2(world_size=2))),
}

INVALID: dict[str, bytes] = {
    "not_a_dict": b"[1, 2]",
    "format_missing": dumps({k: v for k, v in BASE.items() if k != "format"}),
    "format_wrong": dumps(state(format="dwa_export.other")),
    "version_1_is_a_clear_error": dumps(
        {
            "format": "dwa_export.history",
            "version": 1,
            "num_tasks": 2,
            "averages": [],
            "dtype": None,
            "epoch_sum": None,
            "epoch_weight": 0.0,
            "epoch_tensor_weight": None,
        }
    ),  # fmt: skip
    "version_5": dumps(state(version=5)),
    "version_missing": dumps({k: v for k, v in BASE.items() if k != "version"}),
    "version_true": dumps(state(version=True)),
    "version_float": dumps(state(version=4.0)),
    "version_string": dumps(state(version="4")),
    "key_missing": dumps({k: v for k, v in BASE.items() if k != "log"}),
    "key_extra": dumps(state(extra=1)),
    "dtype_missing": dumps({k: v for k, v in BASE.items() if k != "dtype"}),
    "dtype_float16": dumps(state(dtype="float16")),
    "dtype_null": dumps(state(dtype=None)),
    "num_tasks_zero": dumps(state(num_tasks=0)),
    "num_tasks_negative": dumps(state(num_tasks=-1)),
    "num_tasks_beyond_2e20": dumps(state(num_tasks=2**20 + 1, averages=[], partial=None, log=EMPTY_LOG)),
    "num_tasks_10e19": dumps(state(num_tasks=10**19)),
    "num_tasks_2e64": dumps(state(num_tasks=2**64)),
    "num_tasks_1e30_float": dumps(state(num_tasks=1e30)),
    "num_tasks_float": dumps(state(num_tasks=2.0)),
    "num_tasks_bool": dumps(state(num_tasks=True)),
    "tasks_duplicate": dumps(state(tasks=["a", "a"])),
    "tasks_empty_name": dumps(state(tasks=["a", ""])),
    "tasks_wrong_count": dumps(state(tasks=["a"])),
    "tasks_not_a_list": dumps(state(tasks="ab")),
    "tasks_not_strings": dumps(state(tasks=["a", 5])),
    "tasks_lone_surrogate": dumps(state(tasks=["a", "\ud800"])),
    "tasks_without_num_tasks": dumps(state(num_tasks=None, tasks=["a", "b"], averages=[], partial=None, log=EMPTY_LOG)),
    "averages_three": dumps(state(averages=[[1.0, 2.0]] * 3)),
    "averages_wrong_length": dumps(state(averages=[[1.0, 2.0, 3.0]])),
    "averages_zero": dumps(state(averages=[[1.0, 0.0]])),
    "averages_overflow_to_inf": edited(state(averages=[[1.0, 2.0]]), b"[[1.0, 2.0]], ", b"[[1.0, 1e400]], "),
    "averages_nan": dumps(state(averages=[[1.0, math.nan]])),
    "averages_underflow_to_zero": edited(state(averages=[[1.0, 2.0]]), b"[[1.0, 2.0]], ", b"[[1.0, 1e-400]], "),
    "averages_sign_change": dumps(state(averages=[[1.0, 2.0], [-1.0, 2.0]])),
    "averages_huge_integer": dumps(state(averages=[[1.0, 10**400]])),
    "averages_bool": dumps(state(averages=[[1.0, True]])),
    "averages_without_num_tasks": dumps(state(num_tasks=None, partial=None, log=EMPTY_LOG)),
    "partial_as_dict": dumps(state(partial={"sums": [1.0, 1.0]})),
    "partial_too_short": dumps(state(partial=BASE["partial"][:6])),
    "partial_too_long": dumps(state(partial=[*BASE["partial"], 0])),
    "partial_of_version_3_in_version_4": dumps(state(partial=V3["partial"])),
    "partial_of_version_2_in_version_4": dumps(state(partial=V2["partial"])),
    "partial_weight_negative": dumps(state(partial=partial(weight=-0.5))),
    "partial_weight_minus_infinity": dumps(state(partial=partial(weight=-math.inf))),
    "partial_weight_string": dumps(state(partial=partial(weight="1"))),
    "partial_weight_huge_integer": dumps(state(partial=partial(weight=10**400))),
    "partial_batches_zero": dumps(state(partial=partial(batches=0))),
    "partial_batches_float": dumps(state(partial=partial(batches=1.0))),
    "partial_batches_bool": dumps(state(partial=partial(batches=True))),
    "partial_batches_beyond_2e53": dumps(state(partial=partial(batches=2**53 + 1))),
    "partial_rows_negative": dumps(state(partial=partial(rows=-1, nonfinite_rows=0))),
    "partial_rows_float": dumps(state(partial=partial(rows=5.0))),
    "partial_rows_bool": dumps(state(partial=partial(rows=True, nonfinite_rows=0))),
    "partial_rows_null": dumps(state(partial=partial(rows=None))),
    "partial_rows_beyond_2e53": dumps(state(partial=partial(rows=2**53 + 1))),
    "partial_nonfinite_rows_beyond_rows": dumps(state(partial=partial(rows=2, nonfinite_rows=3))),
    "partial_nonfinite_rows_negative": dumps(state(partial=partial(nonfinite_rows=-1))),
    "partial_nonfinite_rows_float": dumps(state(partial=partial(nonfinite_rows=1.0))),
    "partial_nonfinite_rows_bool": dumps(state(partial=partial(nonfinite_rows=False))),
    "partial_nonfinite_rows_string": dumps(state(partial=partial(nonfinite_rows="1"))),
    "partial_nonfinite_rows_2e64": dumps(state(partial=partial(nonfinite_rows=2**64))),
    "partial_rank_with_one_process": dumps(state(partial=partial(rank=0))),
    "partial_rank_out_of_range": dumps(state(partial=partial(rank=2, world_size=2))),
    "partial_rank_negative": dumps(state(partial=partial(rank=-1, world_size=2))),
    "partial_world_zero": dumps(state(partial=partial(world_size=0))),
    "partial_world_beyond_2e24": dumps(state(partial=partial(world_size=2**24 + 1))),
    "partial_rank_0_of_2_on_one_process": dumps(state(partial=partial(rank=0, world_size=2))),
    "partial_rank_1_of_2_on_one_process": dumps(state(partial=partial(rank=1, world_size=2))),
    "partial_sums_wrong_length": dumps(state(partial=partial(sums=[1.0]))),
    "partial_sums_huge_integer": dumps(state(partial=partial(sums=[10**400, 1.0]))),
    "partial_sums_string": dumps(state(partial=partial(sums=["1", 1.0]))),
    "partial_without_num_tasks": dumps(state(num_tasks=None, averages=[], log=EMPTY_LOG)),
    "log_as_list": dumps(state(log=[])),
    "log_key_missing": dumps(state(log={k: v for k, v in EMPTY_LOG.items() if k != "weights"})),
    "log_key_extra": dumps(state(log=dict(EMPTY_LOG, epoch=[]))),
    "log_of_version_3_in_version_4": dumps(state(log=V3_EMPTY_LOG)),
    "log_of_version_2_in_version_4": dumps(state(log=V2_EMPTY_LOG)),
    "log_lengths_differ": dumps(state(log=log(weights=[]))),
    "log_column_not_a_list": dumps(state(log=log(temperature=None))),
    "log_batches_zero": dumps(state(log=log(batches=[0]))),
    "log_batches_float": dumps(state(log=log(batches=[1.0]))),
    "log_weight_zero": dumps(state(log=log(weight=[0.0]))),
    "log_weight_nan": dumps(state(log=log(weight=[math.nan]))),
    "log_averages_wrong_length": dumps(state(log=log(averages=[[1.0]]))),
    "log_averages_sign_change": dumps(
        state(
            log={
                "batches": [1, 1],
                "weight": [1.0, 1.0],
                "averages": [[1.0, 2.0], [1.0, -2.0]],
                "temperature": [None, None],
                "weights": [None, None],
                "nonfinite_rows": [0, 0],
            }
        )
    ),  # fmt: skip
    "log_temperature_zero": dumps(state(log=log(temperature=[0.0]))),
    "log_temperature_negative": dumps(state(log=log(temperature=[-2.0]))),
    "log_temperature_infinite": dumps(state(log=log(temperature=[math.inf]))),
    "log_temperature_string": dumps(state(log=log(temperature=["2"]))),
    "log_temperature_bool": dumps(state(log=log(temperature=[True]))),
    "log_weights_wrong_length": dumps(state(log=log(weights=[[1.0]]))),
    "log_weights_negative": dumps(state(log=log(weights=[[1.0, -1.0]]))),
    "log_weights_nan": dumps(state(log=log(weights=[[1.0, math.nan]]))),
    "log_weights_bool": dumps(state(log=log(weights=[[1.0, False]]))),
    "log_nonfinite_rows_negative": dumps(state(log=log(nonfinite_rows=[-1]))),
    "log_nonfinite_rows_float": dumps(state(log=log(nonfinite_rows=[1.0]))),
    "log_nonfinite_rows_bool": dumps(state(log=log(nonfinite_rows=[True]))),
    "log_nonfinite_rows_null": dumps(state(log=log(nonfinite_rows=[None]))),
    "log_nonfinite_rows_beyond_2e53": dumps(state(log=log(nonfinite_rows=[2**53 + 1]))),
    "log_nonfinite_rows_length_differs": dumps(state(log=log(nonfinite_rows=[0, 0]))),
    "log_nonfinite_rows_not_a_list": dumps(state(log=log(nonfinite_rows=0))),
    "log_without_num_tasks": dumps(state(num_tasks=None, averages=[], partial=None)),
    # Version 3.
    "version_3_partial_of_version_4": dumps(state(V3, partial=BASE["partial"])),
    "version_3_partial_of_version_2": dumps(state(V3, partial=V2["partial"])),
    "version_3_log_of_version_4": dumps(state(V3, log=EMPTY_LOG)),
    "version_3_log_of_version_2": dumps(state(V3, log=V2_EMPTY_LOG)),
    "version_3_dtype_missing": dumps({k: v for k, v in V3.items() if k != "dtype"}),
    "version_3_partial_batches_zero": dumps(state(V3, partial=partial_v3(batches=0))),
    "version_3_partial_weight_negative": dumps(state(V3, partial=partial_v3(weight=-1.0))),
    "version_3_partial_rank_of_another_world": dumps(state(V3, partial=partial_v3(rank=1, world_size=2))),
    "version_3_log_lengths_differ": dumps(state(V3, log=log_v3(weights=[]))),
    "version_3_log_temperature_zero": dumps(state(V3, log=log_v3(temperature=[0.0]))),
    "version_3_averages_sign_change": dumps(state(V3, averages=[[1.0, 2.0], [-1.0, 2.0]])),
    # Version 2.
    "version_2_with_dtype": dumps(state(V2, dtype="float32")),
    "version_2_partial_of_version_3": dumps(state(V2, partial=V3["partial"])),
    "version_2_partial_of_version_4": dumps(state(V2, partial=BASE["partial"])),
    "version_2_partial_dtype_float": dumps(state(V2, partial=partial_v2(dtype="float"))),
    "version_2_partial_dtype_float16": dumps(state(V2, partial=partial_v2(dtype="float16"))),
    "version_2_partial_dtype_bogus": dumps(state(V2, partial=partial_v2(dtype=5))),
    "version_2_partial_rank_of_another_world": dumps(state(V2, partial=partial_v2(rank=1, world_size=2))),
    "version_2_partial_weight_negative": dumps(state(V2, partial=partial_v2(weight=-1.0))),
    "version_2_log_of_version_3": dumps(state(V2, log=V3_EMPTY_LOG)),
    "version_2_log_of_version_4": dumps(state(V2, log=EMPTY_LOG)),
    "version_2_log_lengths_differ": dumps(state(V2, log={"batches": [1], "weight": [], "averages": []})),
    "version_2_averages_sign_change": dumps(state(V2, averages=[[1.0, 2.0], [-1.0, 2.0]])),
    # Texts that are not JSON for Python's json module nor for nlohmann/json.
    "json_leading_dot": edited(state(partial=partial(weight=0.5)), b"1, 0.5, [", b"1, .5, ["),
    "json_trailing_dot": edited(state(partial=partial(weight=3.0)), b"3.0, [", b"3., ["),
    "json_leading_zero": edited(state(partial=partial(batches=3)), b"1, 3, 5", b"1, 03, 5"),
    "json_raw_newline_in_string": edited(state(tasks=["a", "b"]), b'"b"', b'"b\nc"'),
    "json_raw_tab_in_string": edited(state(tasks=["a", "b"]), b'"b"', b'"b\tc"'),
    "json_invalid_utf8": edited(state(tasks=["a", "b"]), b'"b"', b'"b\xff"'),
    "json_invalid_escape": edited(state(tasks=["a", "b"]), b'"b"', b'"\\y"'),
    "json_trailing_comma": dumps(BASE)[:-1] + b", }",
    "json_truncated": dumps(BASE)[:-7],
    "json_empty": b"",
    "json_two_values": dumps(BASE) + b" {}",
    "json_comment": b"// a comment\n" + dumps(BASE),
}

PYTHON_ONLY: dict[str, bytes] = {
    "partial_weight_nan": dumps(state(partial=partial(weight=math.nan))),
    "partial_weight_infinity": dumps(state(partial=partial(weight=math.inf))),
    "partial_sums_infinity": dumps(state(partial=partial(sums=[math.inf, 1.0]))),
    "partial_sums_nan": dumps(state(partial=partial(sums=[-math.inf, math.nan]))),
    "partial_sums_beyond_the_double_range": edited(
        state(partial=partial(sums=[0.0, 1.0])), b"[0.0, 1.0]", b"[1e400, 1.0]"
    ),
    "partial_weight_beyond_the_double_range": edited(state(partial=partial(weight=3.0)), b"3.0, [", b"1e400, ["),
    "version_3_partial_sums_nan": dumps(state(V3, partial=partial_v3(sums=[math.nan, 1.0]))),
    "version_2_partial_weight_nan": dumps(state(V2, partial=partial_v2(weight=math.nan))),
}


def main() -> None:
    for kind, cases in (("valid", VALID), ("invalid", INVALID), ("python_only", PYTHON_ONLY)):
        folder = HERE / kind
        folder.mkdir(exist_ok=True)
        for old in folder.glob("*.json"):
            old.unlink()
        for name, text in cases.items():
            (folder / f"{name}.json").write_bytes(text)
    print(f"wrote {len(VALID)} valid, {len(INVALID)} invalid and {len(PYTHON_ONLY)} Python-only states under {HERE}")


if __name__ == "__main__":
    main()
