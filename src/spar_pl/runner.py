"""Running LightningCLI and finding configs: what ``spar-cli`` and the table runner share (imports nothing of theirs).

:func:`lightning_cli` builds the LightningCLI behind ``spar-cli fit|validate|test|predict`` (output folders checked
before any work, ``--ckpt_path last`` resumed in the same run). The shipped YAML configs are package data
(``spar_pl/configs``, read through :mod:`importlib.resources`); :func:`config_path` finds one by name, and a
``--config configs/...`` path that does not exist in the current folder is read from the package, said in one line.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

#: The folder name of the shipped configs, in the package and (a link to it) at the repository root.
CONFIGS = "configs"
_files = contextlib.ExitStack()  # packaged files made available as paths, for the life of the process
atexit.register(_files.close)


class UsageError(ValueError):
    """A wrong argument of a command (a bad class list, an unknown mode, a value out of range): ``spar-cli`` answers
    it as a usage error (one line, exit status 2); in Python it is a ``ValueError``."""


def command_help(doc: str) -> str:
    """A docstring as ``--help`` shows it: Sphinx roles (``:func:`x```) and double backquotes dropped."""
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", doc).replace("``", "")


def config_path(name: str | Path) -> Path:
    """The packaged config ``name`` (``distill/tiny.yaml``, ``eval/voc21.yaml``, ...) as a file path."""
    parts = Path(name).parts
    ref = resources.files("spar_pl").joinpath(CONFIGS, *parts)
    if not ref.is_file():
        raise FileNotFoundError(f"no packaged config {'/'.join(parts)} (spar-cli config lists them)")
    return Path(_files.enter_context(resources.as_file(ref)))


def packaged_configs() -> list[str]:
    """The names of the shipped configs, ``<folder>/<name>.yaml`` (fragments included)."""
    root = resources.files("spar_pl").joinpath(CONFIGS)
    return sorted(
        f"{folder.name}/{item.name}"
        for folder in root.iterdir()
        if folder.is_dir()
        for item in folder.iterdir()
        if item.name.endswith(".yaml")
    )


def show_config(name: str | None = None) -> str:
    """The shipped configs (package data), listed, or one printed self-contained (``spar-cli config``).

    ``spar-cli config distill/siglip2.yaml > my.yaml`` writes one to edit, the fragments it reads written in place,
    so ``spar-cli fit --config my.yaml`` runs from any folder. ``--config configs/NAME`` works from any folder too: a
    path that does not exist there is read from the package.

    Args:
        name: a config, e.g. ``distill/siglip2.yaml``, ``eval/voc21.yaml`` (``configs/`` optional); none lists them.
    """
    if name is None:
        text = "\n".join(packaged_configs())
        print(f"{text}\n(packaged under {config_path('eval/voc21.yaml').parents[1]})")
        return text
    path = Path(name)
    path = Path(*path.parts[1:]) if path.parts[:1] == (CONFIGS,) else path
    text = self_contained_config(config_path(path))
    sys.stdout.write(text)
    return text


def _inline(value: object, folder: Path) -> object:
    """``value`` with every string naming a YAML file (relative to ``folder``) replaced by that file's content."""
    import yaml

    if isinstance(value, dict):
        return {k: _inline(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_inline(v, folder) for v in value]
    if isinstance(value, str) and value.endswith((".yaml", ".yml")) and (folder / value).is_file():
        path = (folder / value).resolve()
        return _inline(yaml.safe_load(path.read_text(encoding="utf-8")), path.parent)
    return value


def self_contained_config(path: str | Path) -> str:
    """The YAML text of config ``path`` with the fragments it reads by relative path
    (``data: ../fragments/data-tiny.yaml``) written in place: a file that parses from any folder. The config's
    leading comment block is kept."""
    import yaml

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    body = yaml.safe_dump(_inline(yaml.safe_load(text), path.parent), sort_keys=False, allow_unicode=True)
    note = f"# Written by spar-cli config from {path.parent.name}/{path.name}, its fragments written in place."
    return "\n".join([*header, note, body])


def resolve_configs(args: Sequence[str]) -> list[str]:
    """``args`` with each ``--config configs/...`` (or ``-c``) that does not exist in the current folder replaced by
    the packaged file of that name (a wheel install has no ``configs/`` folder), said in one line on stderr."""
    out, used = list(args), []
    for i, arg in enumerate(out):
        key, sep, value = arg.partition("=")
        if sep and key in ("--config", "-c"):
            index = i
        elif i > 0 and out[i - 1] in ("--config", "-c"):
            index, value = i, arg
        else:
            continue
        path = Path(value)
        if path.is_absolute() or path.exists() or not path.parts or path.parts[0] != CONFIGS:
            continue
        try:
            packaged = config_path(Path(*path.parts[1:]))
        except FileNotFoundError:
            continue  # jsonargparse names the missing file
        out[index] = f"{key}={packaged}" if sep else str(packaged)
        used.append((value, packaged.parents[len(path.parts) - 2]))
    if used:
        names = ", ".join(value for value, _ in used)
        print(f"spar-cli: {names} not in this folder: using the packaged copy ({used[0][1]})", file=sys.stderr)
    return out


def check_writable(folder: str | Path, what: str) -> Path:
    """Check, before any work, that files can be written in ``folder`` (an existing folder is tried with a
    temporary file; a missing one needs a writable existing parent folder; nothing is created). Raises
    ``NotADirectoryError``/``PermissionError`` naming it; ``ValueError`` for an empty name."""
    if not str(folder).strip():
        raise ValueError(f"{what}: an empty name; give a folder (. for this one)")
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise NotADirectoryError(f"{what} {folder} is a file, not a folder")
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise PermissionError(f"{what} {folder} is not writable ({err.strerror or err})") from err
        return folder
    parent = folder.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        reason = "is a file" if not parent.is_dir() else "is not writable"
        raise PermissionError(f"{what} {folder} cannot be created: {parent} {reason}")
    return folder


def check_output_folders(trainer, model) -> None:
    """Check the run's output folders before any work: the logs and checkpoints (``default_root_dir``, the logger's
    folder), evaluation results (``results_dir``) and a teacher cache."""
    check_writable(trainer.default_root_dir, "output folder (trainer.default_root_dir)")
    for logger in trainer.loggers:
        if getattr(logger, "save_dir", None):
            check_writable(logger.save_dir, "log folder")
    hparams = getattr(model, "hparams", {})
    if hparams.get("results_dir"):
        check_writable(hparams["results_dir"], "results folder (model.init_args.results_dir)")
    if hparams.get("teacher_cache"):
        check_writable(hparams["teacher_cache"], "teacher cache folder (model.init_args.teacher_cache)")


def configured_logger(config) -> dict | None:
    """The init arguments of a run's one logger as configured (``trainer.logger`` of a LightningCLI config): ``{}``
    for Lightning's default logger, ``None`` for no logger or several."""
    if config is None or config is True:
        return {}
    if isinstance(config, (list, tuple)):
        return configured_logger(config[0]) if len(config) == 1 else None
    init_args = getattr(config, "init_args", None)
    if init_args is None:
        return None
    return dict(vars(init_args)) if not isinstance(init_args, dict) else dict(init_args)


def continue_last_run(trainer, configured: dict | None) -> Path | None:
    """Make ``--ckpt_path last`` resume in the same root: give the trainer a logger of the same kind and arguments
    writing to the run (version folder) holding the newest ``last*.ckpt``, so Lightning finds that checkpoint and the
    run's logs and checkpoints continue in the same folder. A CSV logger's ``metrics.csv`` keeps the run's history
    (:class:`~spar_pl.callbacks.MetricsHistory`). ``configured``: the logger's init arguments as configured
    (:func:`configured_logger`). Returns the checkpoint, or ``None`` (no logger, an explicit version, or no run yet).
    """
    from lightning.pytorch.loggers import CSVLogger

    from spar_pl.callbacks import MetricsHistory

    logger = trainer.logger
    if logger is None or configured is None or configured.get("version") is not None:
        return None
    if not hasattr(logger, "root_dir") or not hasattr(logger, "save_dir"):
        return None
    found = [p for p in Path(logger.root_dir).glob("*/checkpoints/last*.ckpt") if p.is_file()]
    if not found:
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime)
    arguments = configured or {"save_dir": logger.save_dir, "name": logger.name}
    folder = newest.parents[1].name
    number = folder.removeprefix("version_")
    # version_N as the number N: the progress bar shows an int version as it is, a string by its last 4 characters
    trainer.logger = type(logger)(**{**arguments, "version": int(number) if number.isdigit() else folder})
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    metrics = Path(trainer.logger.log_dir) / "metrics.csv"
    if isinstance(trainer.logger, CSVLogger) and metrics.is_file():
        # the CSV logger replaces a run folder's metrics.csv when it opens it: log the run's history again
        trainer.callbacks.append(MetricsHistory(metrics.read_text(encoding="utf-8"), trainer.logger))
    return newest


#: ``--ckpt_path`` values Lightning resolves itself (not files).
_CKPT_NAMES = ("last", "best", "hpc", "registry", "null", "None")


def check_ckpt_path(args: Sequence[str]) -> None:
    """Check a ``--ckpt_path FILE`` argument before any work: a missing file, or one that is neither a PyTorch nor a
    safetensors file, raises ``FileNotFoundError``/``ValueError`` naming it (Lightning reads it first to find its
    hyperparameters, and then fails with a traceback)."""
    for i, arg in enumerate(args):
        key, sep, value = arg.partition("=")
        if key != "--ckpt_path" or (not sep and i + 1 >= len(args)):
            continue
        value = value if sep else args[i + 1]
        if value in _CKPT_NAMES or value.startswith("registry:"):
            continue
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint (--ckpt_path) not found: {path}")
        check_lightning_checkpoint(path)


def check_lightning_checkpoint(path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` unless it is a Lightning checkpoint PyTorch reads with
    ``weights_only=True`` (what Lightning does when it resumes)."""
    import torch

    from spar_pl.weights import CheckpointError, sniff_format

    kind = sniff_format(path)  # not a checkpoint at all: raises naming it
    if kind == "safetensors":
        raise CheckpointError(f"{path} is a safetensors file: --ckpt_path resumes a Lightning .ckpt (spar-cli fit's)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except Exception as err:  # damaged files and unsafe pickles raise many kinds
        reason = str(err).strip().split("\n", 1)[0][:200]
        raise CheckpointError(f"cannot resume from {path}: {type(err).__name__}: {reason}") from None
    if not isinstance(obj, dict) or "state_dict" not in obj or "pytorch-lightning_version" not in obj:
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (no state_dict and version): --ckpt_path needs one"
        )


def check_config_files(args: Sequence[str]) -> None:
    """Parse each ``--config FILE`` as YAML before any work: a file that is not valid YAML raises ``ValueError``
    naming it and the line (jsonargparse's own message names neither)."""
    import yaml

    for i, arg in enumerate(args):
        key, sep, value = arg.partition("=")
        if key not in ("--config", "-c") or (not sep and i + 1 >= len(args)):
            continue
        path = Path(value if sep else args[i + 1])
        if not path.is_file():
            continue  # jsonargparse names a missing file
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            problem = getattr(err, "problem", None) or type(err).__name__
            raise ValueError(f"config {path} is not valid YAML{where}: {problem}") from None


def lightning_cli(args: Sequence[str] | None, run: bool = True):
    """The LightningCLI behind ``fit``/``validate``/``test``/``predict`` (configs compose with ``--config``;
    ``configs/...`` falls back to the packaged configs, :func:`resolve_configs`)."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    argv = sys.argv[1:] if args is None else list(args)
    resolved = resolve_configs(argv)
    if resolved != argv:
        args = resolved

    class SparCLI(LightningCLI):
        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            theme = getattr(trainer.progress_bar_callback, "theme", None)
            if theme is not None and getattr(theme, "metrics_format", None) == ".3f":
                theme.metrics_format = ".3g"  # a feature MSE of 6e-05 is not "0.000"
            return trainer

        def before_fit(self) -> None:
            check_output_folders(self.trainer, self.model)
            if self.config_init[self.subcommand].get("ckpt_path") == "last":
                continue_last_run(self.trainer, configured_logger(self.config[self.subcommand].trainer.logger))

        def before_validate(self) -> None:
            check_output_folders(self.trainer, self.model)

        def before_test(self) -> None:
            check_output_folders(self.trainer, self.model)
            if hasattr(self.model, "config_files"):  # recorded in the results entry (spar_pl.evaluate)
                self.model.config_files = [os.fspath(str(p)) for p in self.config[self.subcommand].get("config") or []]

        before_predict = before_validate

    check_config_files(args if args is not None else argv)
    check_ckpt_path(argv)
    subcommands = ("fit", "validate", "test", "predict")
    return SparCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        save_config_kwargs={"overwrite": True},
        # a training run records its config beside its logs; test/validate/predict runs write no config.yaml
        save_config_callback=SaveConfigCallback if argv[:1] == ["fit"] else None,
        auto_configure_optimizers=False,
        # a parsing error raises (spar-cli prints it in one line) instead of printing the whole usage
        parser_kwargs={"exit_on_error": False, **{name: {"exit_on_error": False} for name in subcommands}},
        run=run,
    )


def end_process_group() -> None:
    """End a DDP process group a command started: left to interpreter exit, a run on gloo now and then aborts after
    its work is done ("terminate called without an active exception", exit status -6)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_lightning(args: Sequence[str]) -> None:
    """Run one LightningCLI command (``["test", "--config", ...]``) in this process, as ``spar-cli`` would; a
    process group it started is ended afterwards."""
    lightning_cli(args)
    end_process_group()
