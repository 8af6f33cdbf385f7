"""Files the project writes and reads whole: weights, checkpoints, statistics and exports.

Writes are atomic and durable: written to a temporary file in the same directory, flushed to disk (fsync of the
file, then of the directory after the rename), so a crash or a full disk leaves the previous file intact. A failed
write raises ``WriteError``, one line naming the file and the cause. ``load_tensors`` reads a ``torch.save`` file
without unpickling code and says whether a file it refuses is damaged or holds objects that could run code.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch


class WriteError(OSError):
    """A file could not be written (no space, no permission, read-only file system ...); the old file is intact."""

    def __init__(self, path: str | os.PathLike, code: int | None, cause: str):
        super().__init__(code, cause, str(path))
        self.message = f"cannot write {path}: {cause} (the previous file, if any, is intact)"

    def __str__(self) -> str:
        return self.message


class UnsafeFileError(ValueError):
    """A ``torch.save`` file that holds pickled objects (which could run code when loaded): it was not loaded."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], object], suffix: str = ".tmp") -> Path:
    """``write(tmp)`` to a temporary file in the same directory, fsync it, rename it over ``path``, fsync the
    directory. ``suffix`` matters to writers that append one (``np.savez`` adds .npz). Raises ``WriteError``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as err:
        error = _write_error(path, err)
        if error is None:
            raise
        raise error from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable. Some file systems cannot fsync a directory: nothing to do there."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _write_error(path: Path, err: BaseException) -> WriteError | None:
    """The failure as a WriteError when it came from the operating system; None for anything else (a bug)."""
    if isinstance(err, WriteError):
        return err
    if isinstance(err, OSError):
        code = err.errno
        return WriteError(path, code, err.strerror or (os.strerror(code) if code else str(err)))
    # Writers in other languages report the OS error inside their message (safetensors: "... (os error 28)").
    found = re.search(r"os error (\d+)", str(err))
    if found:
        code = int(found.group(1))
        return WriteError(path, code, os.strerror(code))
    return None


class _RecordingSink:
    """A file object for ``torch.save`` that keeps the OSError of a failed write: torch reports only its own
    'unexpected pos' RuntimeError, which hides a full disk."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def save_tensors(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that raises the underlying OSError (with its errno) when the write fails."""
    with open(path, "wb") as f:
        sink = _RecordingSink(f)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


def load_tensors(path: str | os.PathLike, what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU with one-line errors: missing, holding pickled objects
    (``UnsafeFileError``: never loaded), or truncated / corrupt (``ValueError``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        with warnings.catch_warnings():  # torch's own note on files of a newer pickle protocol asks for a bug report
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower():
            refused = re.search(r"GLOBAL (\S+)", str(err))
            protocol = re.search(r"Unsupported operand (\d+)", str(err))
            content = (f"was written with a pickle protocol the safe reader does not read (opcode {protocol[1]}), "
                       "so it may hold pickled Python objects" if protocol and not refused else
                       "holds pickled Python objects" + (f" (a pickled {refused[1]})" if refused else ""))
            raise UnsafeFileError(
                f"{what} {path} {content}, which could run code when loaded, so it was not loaded; gear only loads "
                "files of plain tensors and numbers (if you trust its source, save just its state dict with "
                "torch.save's default protocol, or a .safetensors file, and load that)"
            ) from None
        raise _damaged(path, what, err) from None
    except Exception as err:  # torch raises many types for a damaged zip or pickle
        raise _damaged(path, what, err) from None


def _damaged(path: Path, what: str, err: BaseException) -> ValueError:
    return ValueError(f"{what} {path} is unreadable ({type(err).__name__}); it is truncated or corrupt")
