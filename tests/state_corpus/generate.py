"""Writes the shared corpus of checkpoint states: valid/*.json load in every history, invalid/*.json in none.

tests/test_state_format.py loads each file into DWAHistory, NumpyDWAHistory and
dwa::History (C++) and checks that all three agree. Run this script after
changing the format, then commit the files: ``python tests/state_corpus/generate.py``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

HERE = Path(__file__).parent

BASE = {
    "format": "dwa_export.history",
    "version": 2,
    "num_tasks": 2,
    "tasks": None,
    "averages": [[1.0, 2.0], [0.5, 1.5]],
    "partial": [None, 1, "float32", 3, 3.0, [0.75, 3.0]],
    "log": {"batches": [2, 3], "weight": [2.0, 3.0], "averages": [[1.0, 2.0], [0.5, 1.5]]},
}
V1 = {
    "format": "dwa_export.history",
    "version": 1,
    "num_tasks": 2,
    "averages": [[1.0, 2.0], [0.5, 1.5]],
    "dtype": "float32",
    "epoch_sum": [0.75, 3.0],
    "epoch_weight": 1.0,
    "epoch_tensor_weight": 2.0,
}
EMPTY_LOG = {"batches": [], "weight": [], "averages": []}


def state(base=BASE, **changes) -> dict:
    out = copy.deepcopy(base)
    out.update(copy.deepcopy(changes))
    return out


def partial(**fields) -> list:
    names = ("rank", "world_size", "dtype", "batches", "weight", "sums")
    values = dict(zip(names, BASE["partial"]), **fields)
    return [values[name] for name in names]


def dumps(value) -> bytes:
    return json.dumps(value).encode()


VALID: dict[str, bytes] = {
    "fresh": dumps(state(num_tasks=None, averages=[], partial=None, log=EMPTY_LOG)),
    "k_known_nothing_recorded": dumps(state(averages=[], partial=None, log=EMPTY_LOG)),
    "warm_up_one_average": dumps(state(averages=[[1.0, 2.0]], log={"batches": [1], "weight": [1.0], "averages": [[1.0, 2.0]]})),
    "ready_mid_epoch_float32": dumps(BASE),
    "ready_at_epoch_boundary": dumps(state(partial=None)),
    "mid_epoch_float64": dumps(state(partial=partial(dtype="float64", sums=[0.1, 1 / 3]))),
    "named_tasks": dumps(state(tasks=["seg", "depth"])),
    "unicode_task_names": dumps(state(tasks=["\u00e9t\u00e9", "\U0001f600"])),
    "escaped_key": dumps(state()).replace(b'"format"', b'"\\u0066ormat"'),
    "duplicate_key_last_wins": dumps(state()).replace(b'"version": 2', b'"version": 3, "version": 2'),
    "integers_as_floats": dumps(state(averages=[[1, 2], [3, 4]], log={"batches": [1, 1], "weight": [1, 2], "averages": [[1, 2], [3, 4]]})),
    "minus_zero_integer_in_sums": dumps(state(partial=partial(sums=[-0, 1]))).replace(b"[0, 1]", b"[-0, 1]"),
    "underflow_to_zero_in_sums": dumps(state(partial=partial(sums=[0.0, 1.0]))).replace(b"[0.0, 1.0]", b"[1e-400, 1.0]"),
    "invalid_weight_marker_nan": dumps(state(partial=partial(weight=math.nan))),
    "infinite_sums": dumps(state(partial=partial(sums=[math.inf, 1.0]))),
    "zero_weight_batch": dumps(state(partial=partial(batches=1, weight=0.0, sums=[0.0, 0.0]))),
    "partial_weight_minus_zero": dumps(state(partial=partial(weight=-0.0))),  # written back as 0.0
    "negative_losses_one_sign": dumps(state(averages=[[-1.0, 2.0], [-0.5, 1.5]], log=EMPTY_LOG)),
    "consolidated_group_epoch": dumps(state(partial=partial(world_size=4))),
    "whitespace_everywhere": json.dumps(BASE, indent="\t").replace("\n", "\r\n").encode(),
    "thousand_tasks": dumps(state(num_tasks=1000, averages=[[1.0] * 1000], partial=None, log=EMPTY_LOG)),
    "version_1_mid_epoch": dumps(V1),
    "version_1_epoch_boundary": dumps(state(V1, epoch_sum=[0.0, 0.0], epoch_weight=0.0, epoch_tensor_weight=None)),
    "version_1_nothing_recorded": dumps(state(V1, num_tasks=None, averages=[], dtype=None, epoch_sum=None, epoch_weight=0.0, epoch_tensor_weight=None)),
    "version_1_nan_tensor_weight": dumps(state(V1, epoch_tensor_weight=math.nan)),
}

INVALID: dict[str, bytes] = {
    "not_a_dict": b"[1, 2]",
    "format_missing": dumps({k: v for k, v in BASE.items() if k != "format"}),
    "format_wrong": dumps(state(format="dwa_export.other")),
    "version_3": dumps(state(version=3)),
    "version_true": dumps(state(version=True)),
    "version_float": dumps(state(version=2.0)),
    "version_string": dumps(state(version="2")),
    "key_missing": dumps({k: v for k, v in BASE.items() if k != "log"}),
    "key_extra": dumps(state(extra=1)),
    "num_tasks_zero": dumps(state(num_tasks=0)),
    "num_tasks_negative": dumps(state(num_tasks=-1)),
    "num_tasks_4e9": dumps(state(num_tasks=4_000_000_000)),
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
    "averages_three": dumps(state(averages=[[1.0, 2.0]] * 3)),
    "averages_wrong_length": dumps(state(averages=[[1.0, 2.0, 3.0]])),
    "averages_zero": dumps(state(averages=[[1.0, 0.0]])),
    "averages_nan": dumps(state(averages=[[1.0, math.nan]])),
    "averages_overflow_to_inf": dumps(state(averages=[[1.0, 2.0]])).replace(b"[[1.0, 2.0]]", b"[[1.0, 1e400]]"),
    "averages_underflow_to_zero": dumps(state(averages=[[1.0, 2.0]])).replace(b"[[1.0, 2.0]]", b"[[1.0, 1e-400]]"),
    "averages_sign_change": dumps(state(averages=[[1.0, 2.0], [-1.0, 2.0]])),
    "averages_huge_integer": dumps(state(averages=[[1.0, 10**400]])),
    "averages_bool": dumps(state(averages=[[1.0, True]])),
    "averages_without_num_tasks": dumps(state(num_tasks=None, partial=None, log=EMPTY_LOG)),
    "partial_as_dict": dumps(state(partial={"sums": [1.0, 1.0]})),
    "partial_wrong_arity": dumps(state(partial=BASE["partial"][:5])),
    "partial_dtype_float": dumps(state(partial=partial(dtype="float"))),
    "partial_dtype_float16": dumps(state(partial=partial(dtype="float16"))),
    "partial_dtype_bfloat16": dumps(state(partial=partial(dtype="bfloat16"))),
    "partial_dtype_float8": dumps(state(partial=partial(dtype="float8_e4m3fn"))),
    "partial_dtype_int64": dumps(state(partial=partial(dtype="int64"))),
    "partial_dtype_bogus": dumps(state(partial=partial(dtype="bogus"))),
    "partial_weight_negative": dumps(state(partial=partial(weight=-0.5))),
    "partial_weight_minus_infinity": dumps(state(partial=partial(weight=-math.inf))),
    "partial_weight_string": dumps(state(partial=partial(weight="1"))),
    "partial_weight_huge_integer": dumps(state(partial=partial(weight=10**400))),
    "partial_batches_zero": dumps(state(partial=partial(batches=0))),
    "partial_batches_float": dumps(state(partial=partial(batches=1.0))),
    "partial_batches_bool": dumps(state(partial=partial(batches=True))),
    "partial_batches_beyond_2e53": dumps(state(partial=partial(batches=2**60))),
    "partial_rank_with_one_process": dumps(state(partial=partial(rank=0))),
    "partial_rank_out_of_range": dumps(state(partial=partial(rank=2, world_size=2))),
    "partial_world_zero": dumps(state(partial=partial(world_size=0))),
    "partial_world_huge": dumps(state(partial=partial(world_size=2**30))),
    "partial_rank_of_another_world": dumps(state(partial=partial(rank=1, world_size=2))),
    "partial_sums_wrong_length": dumps(state(partial=partial(sums=[1.0]))),
    "partial_sums_not_float32": dumps(state(partial=partial(sums=[0.1, 1.0]))),
    "partial_sums_huge_integer": dumps(state(partial=partial(sums=[10**400, 1.0]))),
    "partial_without_num_tasks": dumps(state(num_tasks=None, averages=[], log=EMPTY_LOG)),
    "log_as_list": dumps(state(log=[])),
    "log_key_missing": dumps(state(log={"batches": [], "weight": []})),
    "log_key_extra": dumps(state(log=dict(EMPTY_LOG, epoch=[]))),
    "log_lengths_differ": dumps(state(log={"batches": [1], "weight": [], "averages": []})),
    "log_batches_zero": dumps(state(log={"batches": [0], "weight": [1.0], "averages": [[1.0, 2.0]]})),
    "log_weight_zero": dumps(state(log={"batches": [1], "weight": [0.0], "averages": [[1.0, 2.0]]})),
    "log_weight_nan": dumps(state(log={"batches": [1], "weight": [math.nan], "averages": [[1.0, 2.0]]})),
    "log_averages_wrong_length": dumps(state(log={"batches": [1], "weight": [1.0], "averages": [[1.0]]})),
    "log_averages_sign_change": dumps(state(log={"batches": [1, 1], "weight": [1.0, 1.0], "averages": [[1.0, 2.0], [1.0, -2.0]]})),
    "log_without_num_tasks": dumps(state(num_tasks=None, averages=[], partial=None)),
    "version_1_weight_negative": dumps(state(V1, epoch_weight=-0.5)),
    "version_1_tensor_weight_string": dumps(state(V1, epoch_tensor_weight="x")),
    "version_1_dtype_bogus_without_sums": dumps(state(V1, dtype="bogus", epoch_sum=None, epoch_weight=0.0, epoch_tensor_weight=None)),
    "version_1_dtype_float": dumps(state(V1, dtype="float")),
    "version_1_num_tasks_zero": dumps(state(V1, num_tasks=0)),
    "version_1_key_missing": dumps({k: v for k, v in V1.items() if k != "dtype"}),
    "version_1_weight_without_sums": dumps(state(V1, epoch_sum=None)),
    "version_1_with_version_2_keys": dumps(state(V1, partial=None)),
    # Texts that are not JSON, as Python's json module sees it.
    "json_leading_dot": dumps(state(partial=partial(weight=0.5))).replace(b"0.5", b".5"),
    "json_trailing_dot": dumps(state(partial=partial(weight=3.0))).replace(b"3.0, [", b"3., ["),
    "json_leading_zero": dumps(state(partial=partial(batches=3))).replace(b'"float32", 3', b'"float32", 03'),
    "json_raw_newline_in_string": dumps(state(tasks=["a", "b"])).replace(b'"b"', b'"b\nc"'),
    "json_raw_tab_in_string": dumps(state(tasks=["a", "b"])).replace(b'"b"', b'"b\tc"'),
    "json_invalid_utf8": dumps(state(tasks=["a", "b"])).replace(b'"b"', b'"b\xff"'),
    "json_invalid_escape": dumps(state(tasks=["a", "b"])).replace(b'"b"', b'"\\y"'),
    "json_trailing_comma": dumps(BASE)[:-1] + b", }",
    "json_truncated": dumps(BASE)[:-7],
    "json_byte_order_mark": b"\xef\xbb\xbf" + dumps(BASE),
    "json_empty": b"",
    "json_two_values": dumps(BASE) + b" {}",
}


def main() -> None:
    for kind, cases in (("valid", VALID), ("invalid", INVALID)):
        folder = HERE / kind
        for old in folder.glob("*.json"):
            old.unlink()
        folder.mkdir(exist_ok=True)
        for name, text in cases.items():
            (folder / f"{name}.json").write_bytes(text)
    print(f"wrote {len(VALID)} valid and {len(INVALID)} invalid states under {HERE}")


if __name__ == "__main__":
    main()
