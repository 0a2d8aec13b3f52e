"""The one atomic writer of the package: files, JSON and whole directories appear complete or not at all.

Every write goes to a temporary name beside its target (same directory, so the rename is a same-filesystem
rename), is fsynced, then renamed over the target with os.replace; the parent directory is fsynced after the
rename so the rename itself survives a crash. Readers see the old content or the complete new one, never a prefix.
"""

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, Union


def temp_beside(path: Union[os.PathLike, str], write: Callable[[str], object]) -> str:
    """Run write(tmp) on a fresh temporary file beside `path`, fsync it and return its name (not yet renamed: a
    caller that replaces several files writes them all first, then renames, see save_pretrained)."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    # Not mkstemp: its 0600 mode would survive the rename; mode 0666 here gets the umask like a plain open().
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = os.stat(tmp).st_mode
        write(tmp)
        os.chmod(tmp, mode)  # writers that recreate the file (safetensors' save_file) leave it 0600
        with open(tmp, "rb+") as f:  # the writer closed its own handle: reopen to flush to disk
            os.fsync(f.fileno())
        return tmp
    except BaseException:
        remove(tmp)
        raise


def remove(path: Union[os.PathLike, str]) -> None:
    """Delete a file if it exists."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def fsync_dir(directory: Union[os.PathLike, str]) -> None:
    """Make the renames inside `directory` durable (best effort: directories cannot be opened on Windows)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_all(pairs: Sequence[tuple[str, str]]) -> None:
    """Rename each (tmp, path) into place, then fsync the directories once; temp files left by a failure
    are removed."""
    try:
        for tmp, path in pairs:
            os.replace(tmp, path)
    finally:
        for tmp, _ in pairs:
            remove(tmp)  # a no-op after a successful rename
    for directory in sorted({os.path.dirname(os.path.abspath(path)) for _, path in pairs}):
        fsync_dir(directory)


def save(path: Union[os.PathLike, str], write: Callable[[str], object]) -> str:
    """Write `path` atomically through write(tmp), a callback that creates the file at the path it is given."""
    path = os.fspath(path)
    replace_all([(temp_beside(path, write), path)])
    return path


def write_bytes(path: Union[os.PathLike, str], data: bytes) -> str:
    """Write `data` to `path` atomically; returns the path."""

    def write(tmp):
        with open(tmp, "wb") as fh:
            fh.write(data)

    return save(path, write)


def write_text(path: Union[os.PathLike, str], text: str, encoding: str = "utf-8") -> str:
    """Write `text` to `path` atomically; returns the path."""

    def write(tmp):
        with open(tmp, "w", encoding=encoding) as fh:
            fh.write(text)

    return save(path, write)


def write_json(path: Union[os.PathLike, str], obj: Any, **dump_kwargs: Any) -> str:
    """json.dump(obj, **dump_kwargs) plus a final newline, atomically."""
    return write_text(path, json.dumps(obj, **dump_kwargs) + "\n")


def temp_dir(parent: Union[os.PathLike, str], name: str) -> str:
    """A fresh temporary directory beside parent/name, for a directory that will be renamed into place."""
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{name}.", dir=parent)


def replace_dir(
    tmp: Union[os.PathLike, str], final: Union[os.PathLike, str], *, replace: bool = True
) -> Union[os.PathLike, str]:
    """Rename the complete directory `tmp` to `final`, then fsync the parent. replace=True replaces a previous
    `final` whole; replace=False keeps it (the rename raises OSError: the first writer wins)."""
    if replace and os.path.exists(final):  # os.replace cannot rename over a non-empty directory
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(os.path.abspath(final)))
    return final
