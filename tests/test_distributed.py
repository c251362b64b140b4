"""Multi-process training with real process groups (gloo on 127.0.0.1; NCCL where 2 GPUs exist).

Each group of processes runs the scenarios of distributed_worker.py in one go, as
a DDP script would: uninterrupted training, mid-epoch checkpoints resumed by each
recipe (per-rank files, rank 0's file, torch.distributed.checkpoint, with and
without consolidate_state_dict()), a changed number of processes (2 -> 1, 1 -> 2),
and the mistakes step() must catch on every rank.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from distributed_worker import BATCHES, EPOCHS, STOP, K, global_batches, train
from dwa_export import DWA
from reference import dwa_weights

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

SCENARIOS_2 = [
    "uninterrupted",
    "per_rank_files",
    "rank0_file",
    "rank0_file_consolidated",
    "dcp",
    "dcp_consolidated",
    "dcp_model_state",
    "save_for_one_process",
    "load_from_one_process",
    "extra_step",
    "k_mismatch",
    "k_mismatch_large",
    "tasks_order",
    "temperature_mismatch",
    "allow_empty_mismatch",
    "nan_strategy_mismatch",
    "nonfinite_rows",
    "uneven_opt_in",
    "empty_rank_without_k",
    "consolidate_at_the_last_batch",
    "rank0_file_at_the_last_batch",
    "consolidate_paired_with_step",
    "not_a_member",
    "state_after_destroy",  # last: it destroys the process group
]
SCENARIOS_3 = ["uninterrupted", "per_rank_files", "rank0_file_consolidated", "extra_step"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(world_size: int, scenarios: list[str], workdir: Path, backend: str = "gloo") -> list[dict[str, dict]]:
    """Run the scenarios on ``world_size`` processes; returns, per rank, {scenario: result}."""
    init_method = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    worker = Path(__file__).with_name("distributed_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(rank), str(world_size), init_method, backend, str(workdir), *scenarios],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(world_size)
    ]
    try:
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:  # a hung rank must not outlive the test
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    results = []
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        by_name = {line.pop("scenario"): line for line in lines}
        for name, result in by_name.items():
            assert "crash" not in result, f"{name}: {result['crash']}"
        assert list(by_name) == scenarios
        results.append(by_name)
    return results


def pooled_reference(epochs: int = EPOCHS, temperature: float = 2.0) -> list[np.ndarray]:
    """Weights after each step from every batch of every rank, pooled (float64)."""
    averages, out = [], []
    for epoch in range(epochs):
        rows = np.array(global_batches(epoch), dtype=np.float32).astype(np.float64)
        averages.append(rows.mean(0))
        out.append(np.ones(K) if len(averages) < 2 else dwa_weights(averages[-1], averages[-2], temperature))
    return out


def lost_rank_reference(kept_before_stop: list[int], stop=STOP) -> list[np.ndarray]:
    """The documented outcome when only some ranks' batches before ``stop`` survive the checkpoint."""
    averages, out = [], []
    for epoch in range(EPOCHS):
        batches = global_batches(epoch)
        if epoch == stop[0]:
            batches = [b for i, b in enumerate(batches) if i >= stop[1] or i in kept_before_stop]
        averages.append(np.array(batches, dtype=np.float32).astype(np.float64).mean(0))
        out.append(np.ones(K) if len(averages) < 2 else dwa_weights(averages[-1], averages[-2], 2.0))
    return out


@pytest.fixture(scope="module")
def one_process_checkpoint(tmp_path_factory) -> Path:
    """A single process (no process group) trained up to STOP mid-epoch: the 1 -> 2 case."""
    workdir = tmp_path_factory.mktemp("distributed")
    dwa = DWA(num_tasks=K)
    train(dwa, 0, 1, stop=STOP)
    torch.save(dwa.state_dict(), workdir / "from_one.pt")
    return workdir


@pytest.fixture(scope="module")
def two_ranks(one_process_checkpoint) -> list[dict[str, dict]]:
    return spawn(2, SCENARIOS_2, one_process_checkpoint)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory) -> list[dict[str, dict]]:
    return spawn(3, SCENARIOS_3, tmp_path_factory.mktemp("three"))


def assert_weights(got: list[list[float]], want: list[np.ndarray], atol: float = 1e-6) -> None:
    assert len(got) == len(want)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=atol, rtol=0)


def assert_logs_match(got: list[dict], want: list[dict]) -> None:
    """Same entries; numbers within float32 rounding (consolidated sums are rounded once more)."""
    assert [(e["epoch"], e["batches"], e["weight"], e["temperature"]) for e in got] == [
        (e["epoch"], e["batches"], e["weight"], e["temperature"]) for e in want
    ]
    for key in ("averages", "weights"):
        np.testing.assert_allclose([e[key] for e in got], [e[key] for e in want], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- uninterrupted


@pytest.mark.parametrize("world", ["two_ranks", "three_ranks"])
def test_every_rank_gets_the_pooled_weights_and_the_same_log_with_two_small_all_reduces_per_step(world, request):
    results = request.getfixturevalue(world)
    first = results[0]["uninterrupted"]
    assert_weights(first["weights"], pooled_reference())
    for other in results[1:]:
        assert other["uninterrupted"]["weights"] == first["weights"]  # bit-identical across ranks
        assert other["uninterrupted"]["log"] == first["log"]
    assert [entry["batches"] for entry in first["log"]] == [BATCHES] * EPOCHS
    assert all(r["uninterrupted"]["all_reduce_per_step"] == 2 for r in results)  # the header, then the K sums


# --------------------------------------------------------------------------- mid-epoch checkpoint recipes


EXACT = ["per_rank_files", "rank0_file_consolidated", "dcp_consolidated", "dcp_model_state"]


@pytest.mark.parametrize("recipe", EXACT)
def test_mid_epoch_resume_is_exact(two_ranks, recipe):
    uninterrupted = two_ranks[0]["uninterrupted"]
    for rank_results in two_ranks:
        resumed = rank_results[recipe]
        assert resumed["warnings"] == []
        assert_weights(resumed["weights"], uninterrupted["weights"][STOP[0] :], atol=1e-6)
        assert_logs_match(resumed["log"], uninterrupted["log"])
        if recipe == "per_rank_files":  # nothing was rounded: bit-identical
            assert resumed["log"] == uninterrupted["log"]


@pytest.mark.parametrize("recipe", ["per_rank_files", "rank0_file_consolidated"])
def test_mid_epoch_resume_on_three_ranks_is_exact(three_ranks, recipe):
    uninterrupted = three_ranks[0]["uninterrupted"]
    for rank_results in three_ranks:
        assert_weights(rank_results[recipe]["weights"], uninterrupted["weights"][STOP[0] :])


@pytest.mark.parametrize("recipe", ["rank0_file", "dcp"])
def test_a_checkpoint_holding_one_rank_s_running_epoch_warns_on_every_rank_with_the_documented_outcome(
    two_ranks, recipe
):
    # Rank 0 recorded global batch 0 before STOP, rank 1 batch 1. "rank 0 saves,
    # every rank loads" keeps rank 0's; DCP keeps one rank's copy (which one is
    # DCP's choice), and consolidate_state_dict() was not called.
    weights = [r[recipe]["weights"] for r in two_ranks]
    assert weights[0] == weights[1]
    outcomes = {rank: lost_rank_reference([rank]) for rank in (0, 1)}
    matches = [rank for rank, want in outcomes.items() if np.allclose(weights[0], want[STOP[0] :], atol=1e-6, rtol=0)]
    assert len(matches) == 1, matches
    if recipe == "rank0_file":
        assert matches == [0]
    lost = 1 - matches[0]
    for rank_results in two_ranks:
        (message,) = rank_results[recipe]["warnings"]
        assert f"rank(s) [{lost}]" in message and "consolidate_state_dict()" in message
    assert not np.allclose(outcomes[0], pooled_reference(), atol=1e-4)  # the loss really shows


# --------------------------------------------------------------------------- another number of processes


def test_two_to_one_process(two_ranks, one_process_checkpoint):
    workdir = one_process_checkpoint
    uninterrupted = two_ranks[0]["uninterrupted"]["weights"]
    local = torch.load(workdir / "to_one_local_rank0.pt", weights_only=True)
    with pytest.raises(ValueError, match="saved mid-epoch by rank 0 of 2 processes .* consolidate_state_dict"):
        DWA(num_tasks=K).load_state_dict(local)
    for rank in (0, 1):  # after consolidate_state_dict(), any rank's file will do
        dwa = DWA(num_tasks=K)
        dwa.load_state_dict(torch.load(workdir / f"to_one_consolidated_rank{rank}.pt", weights_only=True))
        assert_weights(train(dwa, 0, 1, start=STOP), uninterrupted[STOP[0] :])
    # An epoch-boundary checkpoint needs nothing at all.
    boundary = dict(local)
    boundary["_extra_state"] = dict(local["_extra_state"])
    boundary["_extra_state"]["history"] = dict(local["_extra_state"]["history"], partial=None)
    DWA(num_tasks=K).load_state_dict(boundary)


def test_one_to_two_processes(two_ranks):
    single = DWA(num_tasks=K)
    expected = train(single, 0, 1)
    for rank_results in two_ranks:
        resumed = rank_results["load_from_one_process"]
        assert resumed["warnings"] == []
        assert_weights(resumed["weights"], expected[STOP[0] :])


# --------------------------------------------------------------------------- mistakes caught on every rank


@pytest.mark.parametrize("world", ["two_ranks", "three_ranks"])
def test_a_rank_that_steps_once_too_often_raises_on_every_rank(world, request):
    results = request.getfixturevalue(world)
    world_size = len(results)
    for rank_results in results:
        outcome = rank_results["extra_step"]
        assert outcome["error"] == "RankMismatchError", outcome
        assert f"none on rank(s) [{world_size - 1}]" in outcome["message"]
        assert "called step() once more than the others" in outcome["message"]
        assert outcome["counts"][-1] == 0 and all(c > 0 for c in outcome["counts"][:-1])


@pytest.mark.parametrize(
    "case,message",
    [
        ("k_mismatch", "the number of tasks (rank 0: K=3, rank 1: K=2)"),
        ("k_mismatch_large", "the number of tasks (rank 0: K=100, rank 1: K=99)"),  # no abort inside gloo
        ("tasks_order", "the task names or their order"),
        ("temperature_mismatch", "the temperature (rank 0: 2.0, rank 1: 1.0)"),
        ("allow_empty_mismatch", "allow_empty_ranks (rank 0: True, rank 1: False)"),
        ("nan_strategy_mismatch", "nan_strategy (rank 0: warn, rank 1: error)"),
    ],
)
def test_ranks_whose_histories_differ_get_a_clear_error_on_every_rank(two_ranks, case, message):
    for rank_results in two_ranks:
        outcome = rank_results[case]
        assert outcome["error"] == "RankMismatchError" and message in outcome["message"], outcome
        assert outcome["log"] == []  # nothing changed


def test_rows_left_out_for_a_nan_or_infinity_are_summed_over_the_ranks(two_ranks):
    # Rank 1's infinite row is left out and counted; its NaN row of weight 0 is a mask, not counted.
    results = [r["nonfinite_rows"] for r in two_ranks]
    finite = np.array(global_batches(0), dtype=np.float32).astype(np.float64)  # 5 finite batches, over the ranks
    for result in results:
        # consolidate_state_dict(): the group's running epoch, counts included (7 rows, 1 left out).
        assert result["partial"][:6] == [None, 2, 7, 7, 1, 5.0]
        (entry,) = result["log"]
        assert entry["nonfinite_rows"] == 1 and entry["batches"] == 7 and entry["weight"] == 5.0
        np.testing.assert_allclose(entry["averages"], finite.mean(0), rtol=1e-12)
        (message,) = result["warnings"]  # one warning, the same on every rank
        assert message.startswith("1 of this epoch's 7 rows of K losses held a NaN or infinite loss")
    assert results[0]["log"] == results[1]["log"]


def test_really_uneven_data_can_opt_in(two_ranks):
    results = [r["uneven_opt_in"] for r in two_ranks]
    assert results[0] == results[1]
    assert results[0]["log"][1]["batches"] == 3  # rank 1's two batches of epoch 1 never happened


def test_an_empty_rank_without_num_tasks_learns_k_from_the_others(two_ranks):
    results = [r["empty_rank_without_k"] for r in two_ranks]
    assert results[0] == results[1]
    assert [entry["batches"] for entry in results[0]["log"]] == [3, 5, 5, 5]


def test_a_checkpoint_on_the_last_batch_of_an_epoch(two_ranks):
    uninterrupted = two_ranks[0]["uninterrupted"]["weights"][STOP[0] :]
    for rank_results in two_ranks:
        consolidated = rank_results["consolidate_at_the_last_batch"]
        assert_weights(consolidated["weights"], uninterrupted)  # consolidate_state_dict() changed nothing
        assert consolidated["resumed"]["warnings"] == []
        assert_weights(consolidated["resumed"]["weights"], uninterrupted)
        # Rank 0's file without consolidation, where Lightning's validation-end checkpoint lands:
        # the documented warning and outcome, not an error.
        plain = rank_results["rank0_file_at_the_last_batch"]
        (message,) = plain["warnings"]
        assert "rank(s) [1]" in message
        kept = [i for i in range(BATCHES) if i % 2 == 0]  # rank 0's
        assert_weights(plain["weights"], lost_rank_reference(kept, stop=(STOP[0], BATCHES))[STOP[0] :])


def test_a_collective_called_on_some_ranks_only_is_caught_on_every_rank(two_ranks):
    for rank_results in two_ranks:
        outcome = rank_results["consolidate_paired_with_step"]
        assert outcome["error"] == "RankMismatchError" and outcome["unchanged"], outcome
        assert "rank 0: consolidate_state_dict(), rank 1: step()" in outcome["message"]


def test_a_rank_outside_the_process_group_gets_a_clear_error(two_ranks):
    assert two_ranks[0]["not_a_member"]["error"] is None
    assert "not a member of the history's process_group" in two_ranks[1]["not_a_member"]["error"]


def test_a_mid_epoch_state_taken_after_the_group_is_gone_says_whose_it_is(two_ranks, one_process_checkpoint):
    for rank in (0, 1):
        state = torch.load(one_process_checkpoint / f"after_destroy_rank{rank}.pt", weights_only=True)
        assert state["_extra_state"]["history"]["partial"][:2] == [rank, 2]  # this rank's part of 2
        with pytest.raises(ValueError, match=f"saved mid-epoch by rank {rank} of 2 processes"):
            DWA(num_tasks=K).load_state_dict(state)


# --------------------------------------------------------------------------- NCCL


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(), reason="needs 2 GPUs and NCCL")
def test_the_same_scenarios_run_unchanged_on_nccl(tmp_path):
    results = spawn(2, ["uninterrupted", "per_rank_files", "rank0_file_consolidated", "extra_step"], tmp_path, "nccl")
    assert_weights(results[0]["uninterrupted"]["weights"], pooled_reference())
    assert results[0]["uninterrupted"]["weights"] == results[1]["uninterrupted"]["weights"]
    for rank_results in results:
        assert_weights(rank_results["per_rank_files"]["weights"], results[0]["uninterrupted"]["weights"][STOP[0] :])
        assert rank_results["extra_step"]["error"] == "RankMismatchError"
