"""The loop's bookkeeping (spar_pl.callbacks): when last.ckpt is written, the results file."""

import lightning as L
import pytest
import torch

from spar_pl.callbacks import LastCheckpoint


class Linear(L.LightningModule):
    """Six batches an epoch of a one-layer regression: the smallest run that steps and checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(6, 2), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SavedSteps(L.Callback):
    def __init__(self) -> None:
        self.steps = []

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.steps.append(trainer.global_step)


@pytest.mark.parametrize(
    ("every", "limits", "expected"),
    [
        (4, {"max_epochs": 2}, [4, 6, 8, 12]),  # step 12 is both a step and an epoch end: written once
        (0, {"max_epochs": 2}, [6, 12]),
        (4, {"max_steps": 5}, [4, 5]),  # a run stopped between epoch ends keeps its last step
    ],
)
def test_last_checkpoint_every_n_steps_and_every_epoch_end(tmp_path, every, limits, expected):
    saved = SavedSteps()
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LastCheckpoint(every, dirpath=str(tmp_path)), saved],
        **limits,
    )
    trainer.fit(Linear())
    assert saved.steps == expected
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == expected[-1]


def test_last_checkpoint_refuses_a_negative_interval():
    with pytest.raises(ValueError, match="every_n_train_steps must be >= 0"):
        LastCheckpoint(-1)
