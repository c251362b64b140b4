"""Two gloo processes on 127.0.0.1 record different losses and end with identical, global weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from distributed_worker import rank_batches
from reference import dwa_weights

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def global_reference(world_size: int, weight_of_rank, epochs: int = 6) -> list[np.ndarray]:
    """Weights after each step, from the losses of all ranks pooled (sample-weighted)."""
    averages, out = [], []
    for epoch in range(epochs):
        rows, weights = [], []
        for rank in range(world_size):
            for losses in rank_batches(rank, epoch):
                rows.append(losses)
                weights.append(weight_of_rank(rank))
        rows, weights = np.array(rows), np.array(weights)
        averages.append((rows * weights[:, None]).sum(0) / weights.sum())
        out.append(np.ones(3) if len(averages) < 2 else dwa_weights(averages[-1], averages[-2], 2.0))
    return out


def local_reference(rank: int, epochs: int = 6) -> list[np.ndarray]:
    averages, out = [], []
    for epoch in range(epochs):
        batches = rank_batches(rank, epoch)
        if batches:
            averages.append(np.mean(batches, axis=0))
        out.append(np.ones(3) if len(averages) < 2 else dwa_weights(averages[-1], averages[-2], 2.0))
    return out


def test_two_gloo_ranks_agree_on_the_global_weights():
    world_size = 2
    init_method = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", PYTHONPATH=os.pathsep.join(sys.path))
    worker = Path(__file__).with_name("distributed_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(rank), str(world_size), init_method],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for rank in range(world_size)
    ]
    try:
        outputs = [proc.communicate(timeout=180) for proc in procs]
    finally:  # a hung rank must not outlive the test
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    results = []
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))

    for key in ("dwa", "weighted"):
        assert results[0][key] == results[1][key], f"ranks disagree on {key}"  # bit-identical
    plain = global_reference(world_size, lambda rank: 1.0)
    weighted = global_reference(world_size, lambda rank: rank + 1.0)
    np.testing.assert_allclose(np.array(results[0]["dwa"]), np.array(plain), atol=2e-6)
    np.testing.assert_allclose(np.array(results[0]["weighted"]), np.array(weighted), atol=2e-6)
    assert not np.allclose(plain, weighted, atol=1e-4)  # the weighting really matters here
    # distributed=False keeps each rank's own history.
    for rank in range(world_size):
        np.testing.assert_allclose(np.array(results[rank]["local"]), np.array(local_reference(rank)), atol=2e-6)
    assert not np.allclose(results[0]["local"], results[1]["local"], atol=1e-4)
