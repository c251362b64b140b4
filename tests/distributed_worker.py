"""One rank of the multi-process tests (run by test_distributed.py, not by pytest).

Usage: python distributed_worker.py RANK WORLD_SIZE INIT_METHOD BACKEND WORKDIR SCENARIO [SCENARIO ...]

Every rank runs the same scenarios in order, as a DDP training script would, and
prints one JSON line per scenario: what this rank saw (weights after each epoch,
the log, warnings, errors). The data is split across ranks by global batch index
(batch i of an epoch goes to rank i % WORLD_SIZE), so that runs on different
numbers of processes see the same batches in all.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from dwa_export import DWA, DWAHistory, PartialEpochWarning, RankMismatchError

K = 3
EPOCHS = 6
BATCHES = 5  # per epoch, over all ranks
STOP = (3, 2)  # mid-epoch checkpoint: epoch 3, after global batches 0 and 1


def global_batches(epoch: int) -> list[list[float]]:
    """The epoch's batches of K task losses; the tasks fall at different speeds."""
    base = [1.0 / (epoch + 1), 2.0 / (epoch + 1) ** 0.5, 0.5 + 0.1 * epoch]
    return [[b * (1 + 0.13 * i + 0.05 * k) for k, b in enumerate(base)] for i in range(BATCHES)]


def train(dwa: DWA, rank: int, world_size: int, start=(0, 0), stop=None, device="cpu") -> list[list[float]]:
    """Record this rank's share from ``start`` (epoch, global batch) up to ``stop``; weights after each step."""
    weights = []
    for epoch in range(start[0], EPOCHS):
        for i, losses in enumerate(global_batches(epoch)):
            if (epoch, i) < start or i % world_size != rank:
                continue
            if stop is not None and (epoch, i) >= stop:
                return weights
            dwa(torch.tensor(losses, device=device))
        if stop is not None and (epoch, BATCHES) >= stop:
            return weights
        dwa.step()
        weights.append(dwa.weights.tolist())
    return weights


class CountingAllReduce:
    """Counts the all-reduces that step() issues (the test asserts two per epoch)."""

    def __init__(self) -> None:
        self.calls = 0
        self.original = dist.all_reduce

    def __enter__(self) -> CountingAllReduce:
        def counted(*args, **kwargs):
            self.calls += 1
            return self.original(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self.original


def resume(dwa: DWA, rank: int, world_size: int, device: str, start=STOP) -> dict:
    """Continue from ``start`` with a freshly loaded DWA, catching the warnings of the resumed epoch."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        weights = train(dwa, rank, world_size, start=start, device=device)
    messages = [str(w.message) for w in caught if issubclass(w.category, PartialEpochWarning)]
    return {"weights": weights, "log": dwa.log, "warnings": messages}


# Histories that differ between ranks, each caught by step() on every rank.
MISMATCHES = {
    "k_mismatch": lambda rank: DWA(num_tasks=K if rank == 0 else K - 1),
    "k_mismatch_large": lambda rank: DWA(num_tasks=100 if rank == 0 else 99),
    "tasks_order": lambda rank: DWA(tasks=("a", "b") if rank == 0 else ("b", "a")),
    "temperature_mismatch": lambda rank: DWA(temperature=2.0 if rank == 0 else 1.0, num_tasks=K),
    "allow_empty_mismatch": lambda rank: DWA(num_tasks=K, allow_empty_ranks=rank == 0),
    "nan_strategy_mismatch": lambda rank: DWA(num_tasks=K, nan_strategy="warn" if rank == 0 else "error"),
}


def scenario(name: str, rank: int, world_size: int, workdir: Path, device: str) -> dict:
    barrier = dist.barrier
    if name == "uninterrupted":
        dwa = DWA(num_tasks=K).to(device)
        with CountingAllReduce() as counter:
            weights = train(dwa, rank, world_size, device=device)
        return {"weights": weights, "log": dwa.log, "all_reduce_per_step": counter.calls / EPOCHS}

    if name in ("per_rank_files", "rank0_file", "rank0_file_consolidated"):
        dwa = DWA(num_tasks=K).to(device)
        train(dwa, rank, world_size, stop=STOP, device=device)
        folder = workdir / name
        folder.mkdir(exist_ok=True)
        if name == "rank0_file_consolidated":
            dwa.consolidate_state_dict()  # collective: every rank
        if name == "per_rank_files":
            torch.save(dwa.state_dict(), folder / f"rank{rank}.pt")
        elif rank == 0:  # the common DDP idiom
            torch.save({"model": dwa.state_dict()}, folder / "checkpoint.pt")
        barrier()
        path = folder / (f"rank{rank}.pt" if name == "per_rank_files" else "checkpoint.pt")
        state = torch.load(path, weights_only=True)
        fresh = DWA(num_tasks=K).to(device)
        fresh.load_state_dict(state if name == "per_rank_files" else state["model"])
        return resume(fresh, rank, world_size, device)

    if name in ("dcp", "dcp_consolidated", "dcp_model_state"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        def model():
            torch.manual_seed(0)
            return torch.nn.ModuleDict({"net": torch.nn.Linear(2, 2), "dwa": DWA(num_tasks=K)}).to(device)

        trained = model()
        train(trained["dwa"], rank, world_size, stop=STOP, device=device)
        if name != "dcp":
            trained["dwa"].consolidate_state_dict()
        folder = workdir / name
        if name == "dcp_model_state":
            dcp.save({"model": get_model_state_dict(trained)}, checkpoint_id=folder)
            fresh = model()
            state = {"model": get_model_state_dict(fresh)}
            dcp.load(state, checkpoint_id=folder)
            set_model_state_dict(fresh, state["model"])
        else:
            dcp.save({"dwa": trained["dwa"]}, checkpoint_id=folder)  # DWA itself, as a Stateful
            fresh = model()
            dcp.load({"dwa": fresh["dwa"]}, checkpoint_id=folder)
        return resume(fresh["dwa"], rank, world_size, device)

    if name == "save_for_one_process":  # 2 -> 1: files the test loads in a single process
        for consolidated in (False, True):
            dwa = DWA(num_tasks=K).to(device)
            train(dwa, rank, world_size, stop=STOP, device=device)
            if consolidated:
                dwa.consolidate_state_dict()
            torch.save(
                dwa.state_dict(), workdir / f"to_one_{'consolidated' if consolidated else 'local'}_rank{rank}.pt"
            )
        return {}

    if name == "load_from_one_process":  # 1 -> 2: a file the test saved in a single process
        dwa = DWA(num_tasks=K).to(device)
        dwa.load_state_dict(torch.load(workdir / "from_one.pt", weights_only=True))
        return resume(dwa, rank, world_size, device)

    if name == "extra_step":  # a bug in the user's loop: one rank steps once more
        dwa = DWA(num_tasks=K).to(device)
        try:
            for epoch in range(3):
                for i, losses in enumerate(global_batches(epoch)):
                    if i % world_size == rank:
                        dwa(torch.tensor(losses, device=device))
                dwa.step()
                if epoch == 0 and rank == world_size - 1:
                    dwa.step()
        except RankMismatchError as error:
            return {"error": type(error).__name__, "message": str(error), "counts": list(error.counts)}
        return {"error": None}

    if name == "uneven_opt_in":  # data that really is uneven: the last rank sees nothing in epoch 1
        dwa = DWA(num_tasks=K, allow_empty_ranks=True).to(device)
        weights = []
        for epoch in range(4):
            for i, losses in enumerate(global_batches(epoch)):
                if i % world_size == rank and not (epoch == 1 and rank == world_size - 1):
                    dwa(torch.tensor(losses, device=device))
            dwa.step()
            weights.append(dwa.weights.tolist())
        return {"weights": weights, "log": dwa.log}

    if name == "empty_rank_without_k":  # the same, without num_tasks, and the last rank empty in epoch 0
        dwa = DWA(allow_empty_ranks=True).to(device)
        weights = []
        for epoch in range(4):
            for i, losses in enumerate(global_batches(epoch)):
                if i % world_size == rank and not (epoch == 0 and rank == world_size - 1):
                    dwa(torch.tensor(losses, device=device))
            dwa.step()
            weights.append(dwa.weights.tolist())
        return {"weights": weights, "log": dwa.log}

    if name in MISMATCHES:  # the ranks' histories differ: every rank must raise, nothing may hang
        dwa = MISMATCHES[name](rank)
        try:
            dwa(torch.ones(dwa.history.num_tasks, device=device))
            dwa.step()
        except RankMismatchError as error:
            return {"error": type(error).__name__, "message": str(error), "log": dwa.log}
        return {"error": None}

    if name == "nonfinite_rows":  # nan_strategy="warn": rank 1 records an overflowed batch and a masked one
        dwa = DWA(num_tasks=K, nan_strategy="warn")
        for i, losses in enumerate(global_batches(0)):
            if i % world_size == rank:
                dwa(torch.tensor(losses, device=device))
        if rank == 1:
            dwa(torch.tensor([math.inf, 1.0, 1.0], device=device))  # left out, counted
            dwa.history.record(torch.tensor([[math.nan, 1.0, 1.0]], device=device), weight=torch.zeros(1))  # a mask
        dwa.consolidate_state_dict()
        partial = dwa.state_dict()["_extra_state"]["history"]["partial"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dwa.step()
        return {"partial": partial, "log": dwa.log, "warnings": [str(w.message) for w in caught]}

    if name == "consolidate_at_the_last_batch":  # a checkpoint on the epoch's last batch, then its step()
        dwa = DWA(num_tasks=K).to(device)
        stop = (STOP[0], BATCHES)  # every batch of the epoch recorded, step() not yet called
        train(dwa, rank, world_size, stop=stop, device=device)
        dwa.consolidate_state_dict()
        state = dwa.state_dict()
        weights = train(dwa, rank, world_size, start=stop, device=device)  # carries on unchanged
        fresh = DWA(num_tasks=K).to(device)
        fresh.load_state_dict(state)
        return {"weights": weights, "resumed": resume(fresh, rank, world_size, device, start=stop)}

    if name == "rank0_file_at_the_last_batch":  # e.g. Lightning's validation-end checkpoint under DDP
        dwa = DWA(num_tasks=K).to(device)
        stop = (STOP[0], BATCHES)
        train(dwa, rank, world_size, stop=stop, device=device)
        if rank == 0:
            torch.save(dwa.state_dict(), workdir / "last_batch.pt")
        barrier()
        fresh = DWA(num_tasks=K).to(device)
        fresh.load_state_dict(torch.load(workdir / "last_batch.pt", weights_only=True))
        return resume(fresh, rank, world_size, device, start=stop)

    if name == "consolidate_paired_with_step":  # a collective called on some ranks only
        dwa = DWA(num_tasks=K).to(device)
        train(dwa, rank, world_size, stop=STOP, device=device)
        before = dwa.state_dict()
        try:
            dwa.consolidate_state_dict() if rank == 0 else dwa.step()
        except RankMismatchError as error:
            return {"error": type(error).__name__, "message": str(error), "unchanged": dwa.state_dict() == before}
        return {"error": None}

    if name == "not_a_member":  # a history over a group this rank is not in
        group = dist.new_group([0])
        try:
            history = DWAHistory(process_group=group)
        except RuntimeError as error:
            return {"error": str(error)}
        history.record(torch.ones(2))
        history.step()  # a group of one: local
        return {"error": None, "log": history.log}

    if name == "state_after_destroy":  # last: the process group is gone afterwards
        dwa = DWA(num_tasks=K).to(device)
        train(dwa, rank, world_size, stop=STOP, device=device)
        dist.destroy_process_group()
        torch.save(dwa.state_dict(), workdir / f"after_destroy_rank{rank}.pt")
        return {}

    raise ValueError(f"unknown scenario {name}")


def main() -> None:
    rank, world_size, init_method, backend, workdir = sys.argv[1:6]
    rank, world_size = int(rank), int(world_size)
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    try:
        for name in sys.argv[6:]:
            try:
                result = scenario(name, rank, world_size, Path(workdir), device)
            except Exception:  # report, and keep the ranks in step for the next scenario
                result = {"crash": traceback.format_exc()}
            print(json.dumps({"scenario": name, **result}), flush=True)
            if dist.is_initialized():
                dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
