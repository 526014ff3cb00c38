"""Plain helpers shared by test modules (fixtures live in ``conftest.py``), and the callbacks the subprocess
tests load through the CLI (``--trainer.callbacks+=tests.helpers.RecordIds``)."""

import os
import signal
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "distill" / "tiny.yaml")


def fit_args(images: Path, root: Path, *extra: str) -> list[str]:
    """``spar-cli fit`` arguments for the tiny distillation config on the ``images`` fixture's folders."""
    return [
        "fit",
        "--config",
        TINY,
        "--data.init_args.train_source",
        str(images / "train"),
        "--data.init_args.val_source",
        str(images / "val"),
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


class RecordIds(L.Callback):
    """Append ``epoch id`` lines of every training image to ``<out>/rank<r>.txt``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with (self.out / f"rank{trainer.global_rank}.txt").open("a") as fh:
            fh.writelines(f"{trainer.current_epoch} {i}\n" for i in batch["id"])


class Interrupt(L.Callback):
    """Stop a run at the start of global step ``step``: with an error, as a crash would, or (``kill``) with SIGKILL,
    as ``kill -9`` would (no hook, no flush: only what was on disk survives)."""

    def __init__(self, step: int, kill: bool = False) -> None:
        self.step, self.kill = step, kill

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"interrupted at step {self.step}")
