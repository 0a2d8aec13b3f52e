"""Command-line flags generated from TrainConfig's fields: one flag per field, its default, help and check taken
from the field, so the library and the command line cannot drift apart.

A field `warmup_steps` becomes `--warmup-steps`; an optional number also takes the word `none`; a bool becomes
`--name / --no-name`; `betas` takes two numbers; `log` takes one or more names. `checkpoint_dir` and `progress`
are the subcommand's own `--out` and `--quiet`.
"""

import argparse
import dataclasses
import typing
from typing import Any, Callable, Optional

from ..training import TrainConfig

# Fields set by flags every training subcommand has anyway.
FROM_OTHER_FLAGS = {"checkpoint_dir": "--out", "progress": "--quiet"}


def flag_name(field_name: str) -> str:
    """The flag of a TrainConfig field.

    Args:
        field_name: The field, e.g. "warmup_steps".

    Returns:
        Its flag, e.g. "--warmup-steps" (or the other flag that sets it: --out, --quiet).
    """
    return FROM_OTHER_FLAGS.get(field_name, "--" + field_name.replace("_", "-"))


def _word_parser(kind: type, optional: bool) -> Callable[[str], Any]:
    """An argparse type for one word: an int, float or str, and `none` for None when the field is optional."""

    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            article = "an" if kind is int else "a"
            name = {int: "int", float: "number"}.get(kind, kind.__name__)
            raise argparse.ArgumentTypeError(
                f"expected {article} {name}{' or none' if optional else ''}, got {text!r}"
            ) from None

    return parse


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """(T, True) for Optional[T], else (annotation, False)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return annotation, False


def _help(field: dataclasses.Field) -> str:
    default = field.default
    shown = "none" if default is None else " ".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{field.metadata['doc']} (default: {shown})".replace("%", "%%")


def _metavar(field: dataclasses.Field, kind: type) -> str:
    choices = getattr(field.metadata["check"], "choices", None)
    if choices:
        return "{" + ",".join("none" if c is None else str(c) for c in choices) + "}"
    return {int: "N", float: "X"}.get(kind, "PATH")


def add_train_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per TrainConfig field (but those in FROM_OTHER_FLAGS) to a subcommand's parser.

    Args:
        parser: The subcommand's parser; each flag's dest is the field's name.
    """
    group = parser.add_argument_group("training settings (TrainConfig)")
    for field in dataclasses.fields(TrainConfig):
        if field.name in FROM_OTHER_FLAGS:
            continue
        kind, optional = _unwrap_optional(field.type)
        options: dict[str, Any] = dict(dest=field.name, default=field.default, help=_help(field))
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple and typing.get_args(kind)[1:] == (Ellipsis,):  # names, e.g. --log
            options.update(nargs="+", metavar=_metavar(field, str))  # validate() names a bad one
        elif typing.get_origin(kind) is tuple:
            options.update(nargs=len(typing.get_args(kind)), type=_word_parser(float, False), metavar="X")
        else:
            options.update(type=_word_parser(kind, optional), metavar=_metavar(field, kind))
        group.add_argument(flag_name(field.name), **options)


def train_config_from_args(args: argparse.Namespace, checkpoint_dir: Optional[str], progress: bool) -> TrainConfig:
    """The TrainConfig the generated flags describe, checked; a bad value is named by its flag.

    Args:
        args: The parsed arguments (with a value for every generated flag).
        checkpoint_dir: The run's checkpoint directory (the subcommand's --out).
        progress: Whether to show a progress bar (not --quiet).

    Returns:
        The validated TrainConfig.

    Raises:
        InputError: A value is out of range, e.g. `--steps: expected an int >= 1, got 0`.
    """
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in FROM_OTHER_FLAGS}
    for name in ("betas", "log"):
        if isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    config = TrainConfig(**values, checkpoint_dir=checkpoint_dir, progress=progress)
    config.validate(names={f.name: flag_name(f.name) for f in dataclasses.fields(TrainConfig)})
    return config
