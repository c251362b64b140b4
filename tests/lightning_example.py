"""DWA in a Lightning module: the example of README.md's Lightning section, run by tests/test_lightning.py.

Why these hooks (Lightning 2.6; paths under lightning/pytorch/):

* Validation runs inside the training epoch, after its last batch
  (loops/training_epoch_loop.py, ``on_advance_end``), before the epoch end. It
  uses the weights the epoch trained with and, in eval mode, records nothing:
  ``step()`` in ``on_train_epoch_end`` closes the training batches only.
* At the epoch end (loops/fit_loop.py, ``on_advance_end``) Lightning calls the
  callbacks' ``on_train_epoch_end``, then the module's, then that of the
  monitoring callbacks, ``ModelCheckpoint`` among them: its epoch-end checkpoint
  is saved after ``step()``, the epoch closed. Where it saves at validation end
  instead (validation more than once per epoch, ``check_val_every_n_epoch != 1``
  or ``save_on_train_epoch_end=False``), the file holds the epoch's running
  sums, and the resumed run calls ``on_train_epoch_end`` first, which closes
  them: exact either way.
* ``every_n_train_steps`` saves in ``ModelCheckpoint.on_train_batch_end``, with
  the running sums. When that is an epoch's last batch, the resumed run calls
  neither that epoch's ``on_train_epoch_end`` nor the next one's
  ``on_train_epoch_start`` (loops/fit_loop.py, ``reset`` and
  ``on_advance_start``: the epoch counts as finished, the run as restarted
  mid-epoch), but it starts at batch index 0. Hence ``step()`` at batch 0: it
  closes that epoch; at every other epoch start nothing is recorded and it is a
  no-op (under DDP, two small all-reduces).
* ``Trainer.save_checkpoint`` (trainer/trainer.py) runs ``dump_checkpoint`` on
  every rank, and only rank 0 writes the file (strategies/strategy.py,
  ``save_checkpoint``). ``dump_checkpoint``
  (trainer/connectors/checkpoint_connector.py) takes ``checkpoint["state_dict"]``
  first, then calls the module's ``on_save_checkpoint`` on every rank: a
  collective can run there, and the hook puts the consolidated state in again.
* A plain ``DataLoader`` starts from its first batch when a run resumes
  mid-epoch, while the batch index goes on from the checkpoint's (Lightning
  warns: loops/training_epoch_loop.py, ``reset``). A loader with
  ``state_dict()``/``load_state_dict()`` is saved in the checkpoint and restored
  (loops/fit_loop.py, ``_load_combined_loader_states``): :class:`ResumableLoader`
  below, or torchdata's ``StatefulDataLoader``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch import nn

try:
    import lightning.pytorch as pl
except ImportError:  # pytest imports every file under tests/ for its doctests
    import pytest

    pytest.skip("Lightning is not installed", allow_module_level=True)

from dwa_export import DWA

__all__ = ["MultiTaskModel", "ResumableLoader"]


class MultiTaskModel(pl.LightningModule):
    """Two regression tasks on one linear layer, weighted by DWA."""

    def __init__(self, temperature: float = 2.0, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)  # one output per task
        self.dwa = DWA(temperature, tasks=["depth", "seg"])  # a submodule: its state is in every checkpoint
        self.lr = lr

    def task_losses(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return (self.net(x) - y).pow(2).mean(0)  # [K]: one loss per task

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.dwa(self.task_losses(batch))  # records the losses (training mode)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.dwa(self.task_losses(batch)))  # eval mode: the current weights, records nothing

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.dwa.step()  # a no-op, but after resuming from a checkpoint saved at an epoch's last batch

    def on_train_epoch_end(self) -> None:
        self.dwa.step()  # once per epoch; under DDP a collective, on every rank
        self.log_dict(self.dwa.weights_dict("dwa/"))  # the same on every rank: no sync_dist needed

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.dwa.consolidate_state_dict()  # a collective under DDP: Lightning calls this hook on every rank
        checkpoint["state_dict"].update(self.dwa.state_dict(prefix="dwa."))  # taken before this hook: again

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ResumableLoader:
    """A sized iterable of batches that a Lightning checkpoint saves and restores its place in.

    Lightning stores ``state_dict()`` of a training loader that has one and
    calls ``load_state_dict()`` on resuming, so a run resumed mid-epoch gets the
    batches after the checkpoint's, not the loader's first ones again. (Lightning
    does not prefetch from a loader with a length, so the place is exact.)
    """

    def __init__(self, loader: Any) -> None:
        assert isinstance(loader, Sized)
        self.loader = loader
        self.served = 0  # batches of this epoch handed out
        self.skip = 0  # batches to skip at the next iter(), set by load_state_dict()

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        skip, self.skip, self.served = self.skip, 0, 0
        for index, batch in enumerate(self.loader):
            if index >= skip:
                self.served = index + 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"served": self.served % len(self)}  # at the epoch's end: the next epoch starts afresh

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skip = state["served"]
