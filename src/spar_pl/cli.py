"""``spar-cli``: the command line, a thin shell over library functions.

``spar-cli fit|validate|test|predict --config ...`` is a LightningCLI (``spar-cli fit --help``); ``spar-cli cache
--config ...`` runs the distillation config's teacher into its feature cache. Every other command calls the library
function named beside it with the same arguments: its options are the function's parameters, its model options
(``--backbone``, ``--model-name``, ...) the fields of :class:`spar_pl.ModelSpec`, so the command line, the Python API
and the notebook take one road.

  quickstart      the whole feature path on one image, then SPAR's effect (spar_pl.quickstart)
  segment         overlays and label PNGs for your images and class names (spar_pl.api.segment_images)
  features        dense features of your images as safetensors (spar_pl.api.write_feature_files)
  demo            segmentation in the browser (Gradio; spar_pl.demo.serve)
  table           the paper's table for a backbone or recipe (spar_pl.table.table)
  export          a distilled student as open_clip safetensors or a Hub folder (spar_pl.hub.export)
  models          the backbone families and the models each takes (spar_pl.catalog.models)
  config          the shipped configs, listed or printed self-contained (spar_pl.runner.show_config)
  tiny-data       generated images for the tiny distillation config (spar_pl.testing.write_tiny_data)
  reproduce-tiny  single pass vs sliding window vs SPAR on generated scenes (spar_pl.reproduce.reproduce_tiny)
  pretrain-tiny   re-create the shipped tiny pretrained model (spar_pl.reproduce.pretrain_tiny)

Options are spelled ``--max-side`` or ``--max_side``; a list takes its values one after another (``--classes road
car "person, pedestrian"``); a yes/no option is ``--save-probs`` / ``--no-save-probs`` (or ``--save-probs false``).
``spar-cli COMMAND --help`` lists a command's options.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import logging
import re
import sys
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from spar_pl.runner import UsageError, command_help, end_process_group, lightning_cli


@dataclass(frozen=True)
class Command:
    """A ``spar-cli`` command: the library function it calls (``module:function``), the parameters given as
    positional arguments (in order; a list parameter takes all that remain), and parameters it does not offer."""

    target: str
    usage: str
    positionals: tuple[str, ...] = ()
    skip: frozenset[str] = frozenset()

    def function(self) -> Callable:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


COMMANDS = {
    "quickstart": Command("spar_pl.quickstart:quickstart", "spar-cli quickstart [options]"),
    "segment": Command(
        "spar_pl.api:segment_images",
        'spar-cli segment IMAGE_OR_DIR... --classes road car "person, man" --out DIR [options]',
        ("inputs",),
    ),
    "features": Command(
        "spar_pl.api:write_feature_files", "spar-cli features IMAGE_OR_DIR... --out DIR [options]", ("inputs",)
    ),
    "demo": Command("spar_pl.demo:serve", "spar-cli demo [options]", skip=frozenset({"scene"})),
    "table": Command("spar_pl.table:table", "spar-cli table --backbone B [--ckpt SPAR.ckpt] [--tiny] [options]"),
    "export": Command(
        "spar_pl.hub:export",
        "spar-cli export CHECKPOINT [OUT.safetensors] [--hub-dir DIR] [--push-to-hub ORG/NAME] [options]",
        ("checkpoint", "out"),
    ),
    "models": Command("spar_pl.catalog:models", "spar-cli models [--family F] [--all]"),
    "config": Command("spar_pl.runner:show_config", "spar-cli config [NAME]", ("name",)),
    "tiny-data": Command("spar_pl.testing:write_tiny_data", "spar-cli tiny-data [OUT] [options]", ("out",)),
    "reproduce-tiny": Command(
        "spar_pl.reproduce:reproduce_tiny", "spar-cli reproduce-tiny [options]", skip=frozenset({"log", "students"})
    ),
    "pretrain-tiny": Command("spar_pl.reproduce:pretrain_tiny", "spar-cli pretrain-tiny [options]"),
}
#: LightningCLI's subcommands, and ``cache`` (a LightningCLI config run as the teacher-cache task).
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


# -- a command line from a signature --------------------------------------------------------------------------


def _kind(hint) -> tuple[str, type | None]:
    """``("bool", None)``, ``("list", element type)`` or ``("value", None)`` for a parameter's type hint."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if hint is bool:
        return "bool", None
    if typing.get_origin(hint) in (list, tuple, Sequence, typing.Sequence):
        element = (typing.get_args(hint) or (str,))[0]
        return "list", element if element in (int, float) else str
    return "value", None


def _kinds(func: Callable, skip: frozenset[str]) -> dict[str, tuple[str, type | None]]:
    """The kind of every option of ``func`` (and of :class:`~spar_pl.encoders.ModelSpec` when it takes a model)."""
    from spar_pl.encoders import ModelSpec

    hints = typing.get_type_hints(func)
    names = [n for n in inspect.signature(func).parameters if n not in skip and n != "model"]
    kinds = {name: _kind(hints.get(name)) for name in names}
    if _takes_model(func):
        model_hints = typing.get_type_hints(ModelSpec)
        kinds |= {f.name: _kind(model_hints[f.name]) for f in dataclasses.fields(ModelSpec)}
    return kinds


def _takes_model(func: Callable) -> bool:
    return "model" in inspect.signature(func).parameters


def _list_value(values: list[str], element: type | None, option: str) -> str:
    """A list option's values as the JSON list jsonargparse reads (numbers as numbers)."""
    if len(values) == 1 and values[0].lstrip().startswith("["):
        return values[0]  # already a list: --seeds "[0, 1]"
    try:
        return json.dumps([element(v) if element in (int, float) else v for v in values])
    except ValueError:
        kind = "an integer" if element is int else "a number"
        bad = next(v for v in values if not _converts(element, v))
        raise UsageError(f"{option}: {bad!r} is not {kind}") from None


def _converts(element: type, value: str) -> bool:
    try:
        element(value)
    except ValueError:
        return False
    return True


def normalise_args(argv: Sequence[str], kinds: dict, positionals: Sequence[str]) -> list[str]:
    """``argv`` as jsonargparse reads it: ``--max-side`` spelled ``--max_side``, a list option's values one after
    another as one JSON list, a yes/no option alone as ``true`` (``--no-X``: ``false``), positional arguments as
    the options they stand for; after ``--`` every argument is positional (a file named ``-x``). What it does not
    know (``--help``, a misspelt option) passes unchanged, for jsonargparse to answer.

    Raises:
        UsageError: a positional argument the command does not take, or a list value that is not a number.
    """
    out: list[str] = []
    bare: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            bare += argv[i:]
            break
        if not token.startswith("--"):
            (out if token.startswith("-") and token != "-" else bare).append(token)
            continue
        name, eq, value = token[2:].partition("=")
        key = name.replace("-", "_")
        if not eq and key.startswith("no_") and kinds.get(key[3:], ("",))[0] == "bool":
            out += [f"--{key[3:]}", "false"]
            continue
        if key not in kinds:  # jsonargparse names it, with the values that follow it
            out.append(token)
            while not eq and i < len(argv) and not argv[i].startswith("-"):
                out.append(argv[i])
                i += 1
            continue
        kind, element = kinds[key]
        if eq:
            values = [value]
        elif kind == "bool":
            given = i < len(argv) and argv[i].lower() in ("true", "false", "yes", "no")
            values = [argv[i] if given else "true"]
            i += given
        elif kind == "list":
            values = []
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
        elif i < len(argv):
            values = [argv[i]]
            i += 1
        else:
            out.append(f"--{key}")  # jsonargparse says the value is missing
            continue
        value = _list_value(values, element, f"--{name}") if kind == "list" else values[0]
        out.append(f"--{key}={value}")  # one token: a value such as "-x" is not taken for an option
    for name in positionals:
        if not bare:
            break
        kind, element = kinds[name]
        if kind == "list":
            out.append(f"--{name}={_list_value(bare, element, name.upper())}")
            bare = []
        else:
            out.append(f"--{name}={bare.pop(0)}")  # one token: a value such as "-x" is not taken for an option
    if bare:
        raise UsageError(f"unexpected arguments: {' '.join(bare)}")
    return out


def parser_message(message: str) -> str:
    """jsonargparse's error message in one line, options as users type them: ``Parser key "max_side": Expected a
    <class 'int'>. Got value: x`` -> ``--max-side: expected an int, got 'x'``."""
    text = re.sub(r'Parser key "(\w+)":', lambda m: f"--{m.group(1).replace('_', '-')}:", message)
    kinds = {"int": "an integer", "float": "a number", "bool": "true or false"}
    text = re.sub(
        r"Expected a <class '(\w+)'>\. Got value: (.*)",
        lambda m: f"expected {kinds.get(m.group(1), m.group(1))}, got {m.group(2)!r}",
        text,
    )
    return " ".join(text.split())


def command_parser(name: str, command: Command):
    """The jsonargparse parser of a command: the function's parameters (and :class:`~spar_pl.encoders.ModelSpec`'s
    fields for a function taking ``model``), with their types, defaults and docstring help."""
    from jsonargparse import ArgumentParser

    from spar_pl.encoders import ModelSpec

    func = command.function()
    doc = inspect.getdoc(func) or ""

    class Parser(ArgumentParser):
        def format_help(self) -> str:  # options as users type them: --max-side
            text = command_help(super().format_help())
            for key in _kinds(func, command.skip):
                if "_" in key:  # the option itself and its name in other options' help
                    text = re.sub(rf"(?<![\w-])(--)?{key}\b", f"--{key.replace('_', '-')}", text)
            return text

        def error(self, message: str, ex: Exception | None = None) -> typing.NoReturn:
            text = parser_message(message)
            if "arguments are required" in text:
                text += f" (usage: {command.usage})"
            raise UsageError(text) from ex  # one line, as every other wrong argument

    parser = Parser(prog=f"spar-cli {name}", usage=command.usage, description=command_help(doc.split("\n\n")[0]))
    parser.add_function_arguments(func, skip=set(command.skip) | {"model"}, as_group=False)
    if _takes_model(func):
        parser.add_class_arguments(ModelSpec, None)
    return parser


def call(name: str, argv: Sequence[str]):
    """Parse ``argv`` for command ``name`` and call its library function; returns what it returns."""
    from spar_pl.encoders import ModelSpec

    command = COMMANDS[name]
    func = command.function()
    parser = command_parser(name, command)
    kwargs = parser.parse_args(normalise_args(argv, _kinds(func, command.skip), command.positionals)).as_dict()
    if _takes_model(func):
        kwargs["model"] = ModelSpec(**{f.name: kwargs.pop(f.name) for f in dataclasses.fields(ModelSpec)})
    return func(**kwargs)


def cache(argv: Sequence[str] | None = None) -> dict[str, float]:
    """``spar-cli cache --config CFG [overrides]``: the distillation config's teacher over its training set, into
    ``model.teacher_cache`` (:func:`spar_pl.distill.fill_teacher_cache`), with the config's trainer."""
    from spar_pl.distill import fill_teacher_cache

    cli = lightning_cli(list(argv or []), run=False)
    return fill_teacher_cache(cli.model, cli.datamodule, cli.trainer)


# Known noise: advertisements, facts a user did not ask about, warnings about internals that do not apply here.
_NOISE_LOGS = (
    "💡 Tip:",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "No pretrained weights loaded",
    "Failed to read schema from",  # datasets on a damaged parquet shard: the run's own error line names it
)
_NOISE_WARNINGS = (
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",  # the CSV logger is what this project uses
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning
    r"LightningCLI's args parameter is intended to run from within Python",  # quickstart/table run it in-process
    r"Your `IterableDataset` has `__len__` defined",  # StreamingImages' length is exact per rank and worker
    r"Found \d+ module\(s\) in eval mode at the start of training",  # the frozen teacher, in eval mode on purpose
    r"Total length of `list` across ranks is zero",  # DistillDataModule's empty validation list (no val_source)
    r"Couldn't infer the batch indices",  # spar-cli cache's writer names entries by image id, not by index
    r"'set_vital' is deprecated",  # torch's, inside torchdata's StatefulDataLoader (the training loader)
)


def _not_noise(record: logging.LogRecord) -> bool:
    return not any(text in record.getMessage() for text in _NOISE_LOGS)


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record is emitted (redirected or captured streams
    replace it; a handler holding the old one would write to a closed stream)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _add_console_handler(logger: logging.Logger) -> None:
    """Give ``logger`` the console handler (warnings and errors, known noise dropped), once, in place of plain
    stream handlers."""
    for handler in list(logger.handlers):
        if type(handler) is logging.StreamHandler:
            logger.removeHandler(handler)
    if not any(getattr(h, "spar_console", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        handler.addFilter(_not_noise)
        handler.spar_console = True
        logger.addHandler(handler)


def configure_console() -> None:
    """A quiet, truthful console for ``spar-cli``: each log line once, known noise dropped.

    Lightning prints its INFO lines through its own handlers; a root handler (which ``logging.warning`` in a library
    would otherwise create with ``basicConfig``, printing every Lightning line a second time) shows warnings and
    errors only. open_clip's "No pretrained weights loaded" is dropped: the tiny models are random by design (the
    commands say so) and a SPAR checkpoint or weights file is loaded after it.
    """
    root = logging.getLogger()
    if _not_noise not in root.filters:
        root.addFilter(_not_noise)
    _add_console_handler(root)  # before Lightning's import, which adds handlers of its own only if there is none
    import datasets  # noqa: F401  (its handler exists once it is imported)
    import lightning.pytorch  # noqa: F401  (its handlers exist once it is imported)

    # The console handler replaces plain stream handlers bound to the stderr of their creation: the root's (a
    # library's logging.warning runs basicConfig) and datasets' own, which also printed a damaged shard's error
    # before the run's own line named it.
    _add_console_handler(logging.getLogger("datasets"))

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if _not_noise not in handler.filters:
                handler.addFilter(_not_noise)
            if type(handler) is logging.StreamHandler:
                handler.stream = sys.stderr  # Lightning binds its handlers at import; print where stderr is now
    for message in _NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


USER_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError)
_UNION_DUMP = "Does not validate against any of the Union subtypes"


_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def worker_message(text: str) -> str:
    """The original error of a DataLoader worker (PyTorch re-raises it with the worker's whole traceback in its
    message): the last exception line(s) after the traceback, without the type name."""
    if _WORKER_TRACEBACK not in text:
        return text
    lines = text.split(_WORKER_TRACEBACK, 1)[1].splitlines()
    indented = [i for i, line in enumerate(lines) if line.startswith(" ")]
    last = " ".join(lines[indented[-1] + 1 :] if indented else lines).strip()
    head, sep, rest = last.partition(": ")
    return rest if sep and head.replace(".", "").replace("_", "").isalnum() else last


def user_message(err: BaseException) -> str:
    """One line for an ordinary mistake: jsonargparse's dump of a failed class instantiation ("Union subtypes")
    is replaced by the error that caused it (a checkpoint that does not match, a missing file, ...); an error raised
    in a DataLoader worker is its original message, without the worker's traceback."""
    while _UNION_DUMP in str(err) and err.__cause__ is not None:
        err = err.__cause__
    text = worker_message(str(err).strip())
    if _UNION_DUMP in text:  # no cause attached: its "Errors:" list holds the reasons
        reasons = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
        text = reasons[0] if reasons else text.splitlines()[0]
    if isinstance(err, OSError) and err.filename and str(err.filename) not in text:
        text = f"{text}: {err.filename}"
    return " ".join(text.split()) or type(err).__name__


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of ``spar-cli``. An ordinary user error (a missing or unreadable file or folder, a value out of
    range, a checkpoint that does not match) prints one line naming it on stderr and exits with status 1; a wrong
    argument (:class:`~spar_pl.runner.UsageError`, as the parser's own errors) with status 2."""
    argv = list(sys.argv[1:] if args is None else args)
    names = ",".join([*LIGHTNING_COMMANDS, "cache", *COMMANDS])
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: spar-cli {" + names + "} [options]\n\n" + command_help(__doc__.strip()))
        raise SystemExit(0)
    command = argv[0]
    configure_console()
    if command not in LIGHTNING_COMMANDS and command != "cache" and command not in COMMANDS:
        print(f"spar-cli: unknown command {command!r}; choose from {{{names}}} (spar-cli --help)", file=sys.stderr)
        raise SystemExit(2)
    try:
        if command in LIGHTNING_COMMANDS:
            lightning_cli(args)
        elif command == "cache":
            cache(argv[1:])
        else:
            call(command, argv[1:])
        end_process_group()
    except UsageError as err:  # a wrong argument: a usage error, as the parser's own
        print(f"spar-cli {command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except (*USER_ERRORS, argparse.ArgumentError) as err:
        print(f"spar-cli {command}: error: {user_message(err)}", file=sys.stderr)
        raise SystemExit(1) from None
    except SystemExit as exc:
        if not isinstance(exc.code, str):  # argparse / jsonargparse usage errors and plain exits
            raise
        print(f"spar-cli {command}: error: {exc.code}", file=sys.stderr)  # a message the command raised
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
