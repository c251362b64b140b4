"""One rank of the two-process gloo test (run by test_distributed.py, not by pytest).

Usage: python distributed_worker.py RANK WORLD_SIZE INIT_METHOD
Prints one JSON line: the weights this rank used in each epoch.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from dwa_export import DWA, DWAHistory, DWAWeights


def rank_batches(rank: int, epoch: int) -> list[list[float]]:
    """Different losses and a different number of batches on each rank; rank 1 skips epoch 3."""
    if rank == 1 and epoch == 3:
        return []
    base = [1.0 / (epoch + 1), 2.0 / (epoch + 1) ** 0.5, 0.5 + 0.1 * epoch]
    return [[b * (1 + 0.3 * rank + 0.1 * i) for b in base] for i in range(rank + 2)]


def main() -> None:
    rank, world_size, init_method = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    kernel = DWAWeights()
    dwa = DWA(temperature=2.0, num_tasks=3)  # num_tasks: a rank may see no batch in an epoch
    weighted = DWAHistory(num_tasks=3)
    local = DWAHistory(num_tasks=3, distributed=False)
    result = {"dwa": [], "weighted": [], "local": []}
    for epoch in range(6):
        batches = rank_batches(rank, epoch)
        for losses in batches:
            dwa(torch.tensor(losses))
            weighted.record(torch.tensor(losses), weight=torch.tensor(float(rank + 1)))
            local.record(torch.tensor(losses))
        dwa.step()
        weighted.step()
        local.step()
        result["dwa"].append(dwa.weights.tolist())
        result["weighted"].append(kernel(*weighted.inputs(), torch.tensor(2.0)).tolist())
        result["local"].append(kernel(*local.inputs(), torch.tensor(2.0)).tolist())
    dist.destroy_process_group()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
