"""The one atomic writer of the package: files, JSON and whole directories appear complete or not at all.

Every write goes to a temporary name beside its target (same directory, so the rename is a same-filesystem
rename), is fsynced, then renamed over the target with os.replace; the parent directory is fsynced after the
rename so the rename itself survives a crash. Readers see the old content or the complete new one, never a prefix.
A write that fails (a full disk, a read-only directory) removes its temporary file, leaves the target as it was,
and raises an OSError that names the target.

Fault injection, for the crash-safety tests (python_tests/data/test_crash.py) and nothing else: with the environment
variable CROSSDIFF_FAULT set, every step of the write protocol (a temporary file created, its data written, fsynced,
renamed; a temporary directory complete, renamed) is a numbered fault point of this process.
  CROSSDIFF_FAULT=kill:N     SIGKILL this process at its Nth write step (after truncating a just-written temporary
                             file to half its length: a kill in the middle of the write), with one line on stderr
  CROSSDIFF_FAULT=enospc:N   the Nth file write fails as on a full disk: half the data, then OSError(ENOSPC)
  CROSSDIFF_FAULT=count      count the steps only (fault_steps), to choose N
Unset, a write step costs one environment lookup.
"""

import errno
import json
import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, Union

from .errors import InputError

FAULT_ENV = "CROSSDIFF_FAULT"
fault_steps = 0  # write steps (and, separately, file writes) this process took while CROSSDIFF_FAULT was set
fault_writes = 0


def fault_point(stage: str, path: str) -> None:
    """A numbered step of the write protocol: a no-op unless CROSSDIFF_FAULT is set (see the module docstring).

    Args:
        stage: What has just happened: "created", "written", "synced", "renamed", "dir-complete", "dir-renamed".
        path: The temporary file or directory (or, once renamed, the target) the step is about.

    Raises:
        OSError: ENOSPC, at the file write that CROSSDIFF_FAULT=enospc:N names.
        InputError: CROSSDIFF_FAULT holds something else than kill:N, enospc:N or count.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    global fault_steps, fault_writes
    kind, _, n = spec.partition(":")
    if kind not in ("kill", "enospc", "count") or (kind != "count" and not n.isdigit()):
        raise InputError(f"{FAULT_ENV} must be kill:N, enospc:N or count, got {spec!r}")
    fault_steps += 1
    fault_writes += stage == "written"
    hit = (kind == "kill" and fault_steps == int(n)) or (
        kind == "enospc" and stage == "written" and fault_writes == int(n)
    )
    if not hit:
        return
    if stage == "written":
        os.truncate(path, os.path.getsize(path) // 2)
    if kind == "kill":
        os.write(2, f"{FAULT_ENV}: SIGKILL at write step {fault_steps} ({stage} {path})\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def _out_of_space(path):
    """Whether the filesystem holding `path` has no block left for an unprivileged writer."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 2 * max(st.f_bsize, 4096)


def _naming(err, path, full):
    """The OSError to raise for a failed write of `path`: it names the path and keeps the errno (and so the
    subclass, e.g. PermissionError); a writer's own error on a full disk (torch.save and safetensors raise
    RuntimeError-like errors without an errno or a path) becomes ENOSPC."""
    if isinstance(err, OSError) and err.errno is not None:
        return OSError(err.errno, f"cannot write {path}: {err.strerror or err}")
    if full:
        return OSError(errno.ENOSPC, f"cannot write {path}: no space left on device ({type(err).__name__}: {err})")
    return OSError(f"cannot write {path}: {err}")


def temp_beside(path: Union[os.PathLike, str], write: Callable[[str], object]) -> str:
    """Run write(tmp) on a fresh temporary file beside `path`, fsync it and return its name (not yet renamed: a
    caller that replaces several files writes them all first, then renames, see save_pretrained).

    Args:
        path: The target the temporary file will be renamed to.
        write: A callback that writes the file at the path it is given.

    Returns:
        The temporary file's path.

    Raises:
        OSError: The file could not be written (full disk, read-only directory, ...): the message names `path`,
            the errno is kept (ENOSPC when the writer failed on a full disk); the temporary file is removed.
    """
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    try:
        # Not mkstemp: its 0600 mode would survive the rename; mode 0666 here gets the umask like a plain open().
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as err:
        raise _naming(err, path, False) from err
    try:
        fault_point("created", tmp)
        mode = os.stat(tmp).st_mode
        write(tmp)
        fault_point("written", tmp)
        os.chmod(tmp, mode)  # writers that recreate the file (safetensors' save_file) leave it 0600
        with open(tmp, "rb+") as f:  # the writer closed its own handle: reopen to flush to disk
            os.fsync(f.fileno())
        fault_point("synced", tmp)
        return tmp
    except Exception as err:
        full = _out_of_space(tmp)  # before the temporary file gives its blocks back
        remove(tmp)
        if isinstance(err, OSError) or full:
            raise _naming(err, path, full) from err
        raise
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
            fault_point("renamed", path)
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
    fault_point("dir-complete", os.fspath(tmp))
    if replace and os.path.exists(final):  # os.replace cannot rename over a non-empty directory
        shutil.rmtree(final)
    os.replace(tmp, final)
    fault_point("dir-renamed", os.fspath(final))
    fsync_dir(os.path.dirname(os.path.abspath(final)))
    return final
