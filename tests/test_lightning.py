"""A real ``lightning.Trainer`` around tests/lightning_example.py, README.md's Lightning section.

One process: the weights and the logged metrics against a float64 reference,
and resuming from each kind of checkpoint (epoch end, validation end, mid-epoch,
an epoch's last batch) to exactly the uninterrupted run. Two DDP processes on
the CPU (``ddp_fork``: no re-import, well under a second): the same run with
each epoch summed over both ranks, and a mid-epoch checkpoint resumed exactly
through ``consolidate_state_dict()``.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("lightning.pytorch")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_example import MultiTaskModel, ResumableLoader  # noqa: E402
from reference import dwa_weights  # noqa: E402

# Lightning's own advice (num_workers, sync_dist, a loader that is not resumable) is not under test.
pytestmark = pytest.mark.filterwarnings("ignore:::lightning")

EPOCHS = 5
BATCHES = 4  # training batches per epoch, of 8 samples
STEP_EVERY = 6  # every_n_train_steps: step 6 is epoch 1's second batch, step 12 epoch 2's last


def dataset(samples: int, seed: int) -> TensorDataset:
    """A learnable task (its loss falls, its weight drops) and a noisy one (its loss stays)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 4, generator=gen)
    depth = x @ torch.tensor([1.0, -2.0, 0.5, 1.0])
    seg = 2.0 * torch.randn(samples, generator=gen)
    return TensorDataset(x, torch.stack([depth, seg], dim=1))


def train_loader() -> ResumableLoader:
    return ResumableLoader(DataLoader(dataset(8 * BATCHES, seed=0), batch_size=8))


def val_loader() -> DataLoader:
    return DataLoader(dataset(12, seed=1), batch_size=4)  # 3 batches, far from the training losses


def model(seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    return MultiTaskModel()


def trainer(root: Path, callbacks: Sequence[Any] = (), **options: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": EPOCHS,
        "logger": False,
        "enable_checkpointing": bool(callbacks),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": root,  # never lightning_logs/ or checkpoints/ in the repository
    }
    return pl.Trainer(callbacks=list(callbacks), **{**settings, **options})


def dwa_state(module: MultiTaskModel) -> dict[str, Any]:
    return module.dwa.state_dict()["_extra_state"]


class Recording(MultiTaskModel):
    """The example, recording each training batch's task losses and the loss it returned."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: dict[int, list[list[float]]] = {}
        self.returned: dict[int, list[float]] = {}

    def task_losses(self, batch: Any) -> torch.Tensor:
        losses = super().task_losses(batch)
        if self.training:
            self.losses.setdefault(self.current_epoch, []).append(losses.tolist())
        return losses

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.returned.setdefault(self.current_epoch, []).append(loss.item())
        return loss


def test_a_fit_weights_and_logs_as_the_float64_reference(tmp_path):
    torch.manual_seed(0)
    module = Recording()
    fit = trainer(tmp_path, logger=CSVLogger(tmp_path))
    fit.fit(module, train_loader(), val_loader())

    # The float64 reference from the recorded losses. after[e]: the weights step() gives after epoch e,
    # those of epoch e + 1; uniform after epoch 0 (the warm-up: epochs 0 and 1 train with uniform weights).
    averages = [np.mean(np.asarray(module.losses[epoch], dtype=np.float64), axis=0) for epoch in range(EPOCHS)]
    after = [np.ones(2)] + [dwa_weights(averages[e], averages[e - 1], 2.0) for e in range(1, EPOCHS)]
    log = module.dwa.log
    assert [entry["batches"] for entry in log] == [BATCHES] * EPOCHS  # validation recorded nothing
    for entry, average, weights in zip(log, averages, after, strict=True):
        assert list(entry["averages"].values()) == pytest.approx(average, rel=1e-12)  # float64 sums
        assert list(entry["weights"].values()) == pytest.approx(weights, rel=1e-6)  # float32 weights
    assert not np.allclose(after[-1], 1.0, atol=1e-3)  # the weights moved
    assert module.dwa.weights.tolist() == list(log[-1]["weights"].values())

    # Each epoch trained with the weights computed after the one before.
    for epoch in range(EPOCHS):
        weights = np.ones(2) if epoch == 0 else after[epoch - 1]
        expected = np.asarray(module.losses[epoch]) @ weights
        assert module.returned[epoch] == pytest.approx(expected, rel=1e-6)

    # self.log_dict(self.dwa.weights_dict("dwa/")) wrote one row per epoch: the weights of the next.
    with open(Path(fit.logger.log_dir) / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["dwa/depth"]]
    assert [int(row["epoch"]) for row in rows] == list(range(EPOCHS))
    for row, entry in zip(rows, log, strict=True):
        assert {"depth": float(row["dwa/depth"]), "seg": float(row["dwa/seg"])} == entry["weights"]
    assert fit.callback_metrics["dwa/seg"].item() == log[-1]["weights"]["seg"]
    assert "val_loss" in fit.callback_metrics


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[MultiTaskModel, dict[str, Path]]:
    """One run of EPOCHS epochs that saves every kind of checkpoint on the way (saving changes nothing)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    callbacks = [
        ModelCheckpoint(root / "epoch_end", "{epoch}", save_top_k=-1),  # train epoch end: after step()
        # At validation end, before step() (monitor: a key of its own, which Lightning requires of each).
        ModelCheckpoint(root / "val_end", "{epoch}", "val_loss", save_top_k=-1, save_on_train_epoch_end=False),
        ModelCheckpoint(root / "steps", "{step}", save_top_k=-1, every_n_train_steps=STEP_EVERY),
    ]
    module = model()
    trainer(root, callbacks).fit(module, train_loader(), val_loader())
    files = {
        "epoch end": root / "epoch_end" / "epoch=1.ckpt",
        "validation end": root / "val_end" / "epoch=1.ckpt",
        "mid-epoch": root / "steps" / f"step={STEP_EVERY}.ckpt",
        "an epoch's last batch": root / "steps" / f"step={2 * STEP_EVERY}.ckpt",
    }
    return module, files


@pytest.mark.parametrize("kind", ["epoch end", "validation end", "mid-epoch", "an epoch's last batch"])
def test_resuming_from_a_checkpoint_gives_the_uninterrupted_run(uninterrupted, kind, tmp_path):
    full, files = uninterrupted
    saved = torch.load(files[kind], weights_only=False)
    partial = saved["state_dict"]["dwa._extra_state"]["history"]["partial"]
    # What each file holds: a closed epoch (epoch end), or the running epoch's batches (step() had not run).
    assert (partial is None) == (kind == "epoch end")
    if partial is not None:
        assert partial[2] == {"validation end": BATCHES, "mid-epoch": 2, "an epoch's last batch": BATCHES}[kind]

    resumed = model(seed=1)  # other initial weights: the checkpoint must replace them
    trainer(tmp_path).fit(resumed, train_loader(), val_loader(), ckpt_path=files[kind])

    for mine, theirs in zip(resumed.parameters(), full.parameters(), strict=True):
        assert torch.equal(mine, theirs)  # the same batches in the same order: Lightning resumed exactly
    assert dwa_state(resumed) == dwa_state(full)  # history, log and temperature, bit for bit
    assert resumed.dwa.log == full.dwa.log and len(full.dwa.log) == EPOCHS
    assert torch.equal(resumed.dwa.weights, full.dwa.weights)


@pytest.fixture
def fresh_environment(monkeypatch) -> Iterator[None]:
    """Lightning's launcher writes MASTER_ADDR, MASTER_PORT and the like into os.environ: undo it."""
    before = dict(os.environ)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # as tests/test_distributed.py: gloo on loopback
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="ddp_fork needs fork")
def test_two_ddp_processes_resume_a_consolidated_mid_epoch_checkpoint(uninterrupted, fresh_environment, tmp_path):
    # The loader is not a DataLoader, so Lightning adds no DistributedSampler: both ranks train on the same
    # batches, DDP's averaged gradients equal one process's, and the run is the single-process one, twice.
    single, _ = uninterrupted
    ddp = {"devices": 2, "strategy": "ddp_fork"}
    steps = ModelCheckpoint(tmp_path / "steps", "{step}", save_top_k=-1, every_n_train_steps=STEP_EVERY)
    full = model()
    trainer(tmp_path / "full", [steps], **ddp).fit(full, train_loader())  # the main process gets rank 0's state
    doubled = [{**entry, "batches": 2 * entry["batches"], "weight": 2 * entry["weight"]} for entry in single.dwa.log]
    assert full.dwa.log == doubled  # every epoch summed over both ranks, exactly

    # Rank 0's mid-epoch file holds both ranks' running epoch: on_save_checkpoint consolidated it.
    file = tmp_path / "steps" / f"step={STEP_EVERY}.ckpt"
    rank, world_size, batches, *_ = torch.load(file, weights_only=False)["state_dict"]["dwa._extra_state"]["history"][
        "partial"
    ]
    assert (rank, world_size, batches) == (None, 2, 2 * 2)  # the whole group's: 2 batches on each rank

    resumed = model(seed=1)
    trainer(tmp_path / "resumed", **ddp).fit(resumed, train_loader(), ckpt_path=file)  # each rank loads the file
    assert dwa_state(resumed) == dwa_state(full)
    assert torch.equal(resumed.dwa.weights, full.dwa.weights)
