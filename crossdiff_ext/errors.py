"""The errors that bad input causes, as distinct from bugs.

A missing or corrupt file (an activation store, a shard, a checkpoint, a config, a data file), an output that
already exists, a setting out of range, inputs that do not fit together: the library raises one of the classes
below, with a message that names the culprit (the file, and where it helps the line, row or batch). The
`crossdiff` command prints that message on one line and exits with status 2; every other exception is a bug
and keeps its traceback (exit status 1).

Each class also derives from the built-in exception that the same check raised before (ValueError,
FileNotFoundError, FileExistsError), so code that catches those keeps working.
"""

__all__ = ["InputError", "MissingInputError", "OutputExistsError", "require_int"]


class InputError(ValueError):
    """Bad input: a corrupt or inconsistent file, a setting out of range, inputs that do not fit together."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or directory the input names does not exist."""


class OutputExistsError(InputError, FileExistsError):
    """The output path already holds results that the call would not overwrite."""


def require_int(name: str, value: object, low: int) -> None:
    """Check a setting that must be an int >= low (a bool is not an int here).

    Args:
        name: The setting's name, for the message.
        value: Its value.
        low: The smallest value allowed.

    Raises:
        InputError: value is not an int >= low.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InputError(f"{name} must be an int >= {low}, got {value!r}")
