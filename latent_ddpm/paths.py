"""Writing outputs safely: refuse a path whose replacement would destroy an input or the working folder, swap a
finished result in so that the old one goes only once the new one is in place, and lock what only one process
may write at a time."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .errors import UserInputError


def check_replaceable(out: str | os.PathLike, flag: str, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """`out` as a Path, or `UserInputError` naming `flag` when replacing it would delete the current folder (or a
    folder above it) or one of `inputs` (it is that input, a folder holding it, or a folder inside an input
    folder). Call it before anything runs, with or without an overwrite flag: such an output is wrong either
    way."""
    out = Path(out)
    target, cwd = out.resolve(), Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise UserInputError(f"{flag} {out}: is the current folder or a folder above it, which would be replaced; "
                             "name a new folder")
    for source in inputs:
        if source is None or not os.path.lexists(source):
            continue
        path = Path(source).resolve()
        if path == target or target in path.parents:
            raise UserInputError(f"{flag} {out}: would replace the input {source}; choose another output path")
        if path.is_dir() and path in target.parents:
            raise UserInputError(f"{flag} {out}: is inside the input folder {source}, which it would change; "
                                 "choose an output path outside it")
    return out


def unwritable_folder(folder: str | os.PathLike) -> str | None:
    """Why files cannot be created in `folder` (made if missing): its nearest existing ancestor is a file or is
    not writable; None when they can."""
    for path in (Path(folder), *Path(folder).parents):
        if os.path.lexists(path):
            if path.is_symlink() and not path.exists():
                return f"{path} is a broken link"
            if not path.is_dir():
                return f"{path} is a file, not a folder"
            if not os.access(path, os.W_OK | os.X_OK):
                return f"{path} is not writable"
            return None
    return None


def remove_path(path: str | os.PathLike) -> None:
    """Delete `path`: a folder with its contents, or a file or link (a link to a folder: the link only)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `path` through a hidden temporary file beside it and a rename: a kill or a full disk never leaves
    half of it, and a failed write leaves no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_with(new: str | os.PathLike, out: str | os.PathLike) -> None:
    """Move the finished `new` (file or folder) to `out`. An existing `out` is first renamed aside in the same
    folder and deleted only after the move, so an interruption leaves the old or the new one, never neither."""
    new, out = Path(new), Path(out)
    if not os.path.lexists(out):
        os.replace(new, out)
        return
    aside = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    os.replace(out, aside)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(aside, out)  # the old one back: never neither
        raise
    remove_path(aside)


class OutputLock:
    """An exclusive lock file (`path`, holding "host pid") for something only one process may write at a time: a
    second writer refuses to start, naming `holder` and `advice`; a stale lock (its process is gone) is taken
    over. Released at exit, or by `release`."""

    def __init__(self, path: str | os.PathLike, holder: str, advice: str):
        self.path, self.holder, self.advice, self.held = Path(path), holder, advice, False

    def acquire(self) -> None:
        """Take the lock, or raise `UserInputError` naming its holder; a stale lock is taken over."""
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                self._create(me)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                holder = self.path.read_text().strip() if self.path.exists() else "?"
                raise UserInputError(f"{self.path.parent} is in use by {self.holder} (host, pid: {holder}); "
                                     f"{self.advice}") from None
            self.held = True
            atexit.register(self.release)  # also on errors; a killed process leaves a stale lock, taken over later
            return

    def _create(self, content: str) -> None:
        """Create the lock file with `content` in one step (a hard link of a finished temporary file), so that
        no other process ever reads it empty and takes it for stale; `FileExistsError` if it exists. Where the
        file system has no hard links, an exclusive create followed by the write."""
        tmp = self.path.with_name(f"{self.path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        try:
            tmp.write_text(content)
            os.link(tmp, self.path)
        except FileExistsError:
            raise
        except OSError:  # no hard links here
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            with os.fdopen(fd, "w") as fh:
                fh.write(content)
        finally:
            tmp.unlink(missing_ok=True)

    def _stale(self) -> bool:
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return True
        if host != socket.gethostname():
            return False  # another machine's process: we cannot tell, so respect it
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        """Give the lock up (a no-op when not held)."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


#: Bytes copied per read when assembling a final .npz (`write_npz`): bounds the writer's memory.
COPY_CHUNK_BYTES = 8 * 2**20


def partial_path(output: Path) -> Path:
    """Where the samples are gathered before the final .npz is written (next to it, hidden)."""
    return output.with_name(f".{output.name}.partial.npy")


def remove_abandoned_partials(folder: Path) -> list[Path]:
    """Delete the hidden gathering files (`partial_path`) in `folder` that killed runs left behind, and their
    decoded-image work folders, so that they do not pile up beside other outputs. One is abandoned when its
    lock is gone or stale; it is taken (`OutputLock`) while deleted, so a run starting on it is never touched.
    Returns the outputs whose leftovers went."""
    removed = []
    for partial in sorted(folder.glob(".*.npz.partial.npy")):
        output = folder / partial.name[1:-len(".partial.npy")]
        lock = OutputLock(partial.with_suffix(".lock"), "", "")
        try:
            lock.acquire()
        except UserInputError:  # a live run writes it
            continue
        try:
            partial.unlink(missing_ok=True)
            shutil.rmtree(folder / f".{output.stem}_images.partial", ignore_errors=True)
            removed.append(output)
        finally:
            lock.release()
    return removed


class NpyRowWriter:
    """A `.npy` file of a known shape filled row-range by row-range with seek + write (no memory map).

    The main process `create`s it (header + a sparse file of the full size); then any process may
    `write(start, rows)` its own disjoint rows, in any order.
    """

    def __init__(self, path: str | os.PathLike, shape: Sequence[int], dtype=np.float32, create: bool = False):
        self.path, self.shape, self.dtype = Path(path), tuple(int(s) for s in shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:
                np.lib.format.write_array_header_2_0(f, header)
                self.offset = f.tell()
                f.truncate(self.offset + self.shape[0] * self.row_bytes)
        else:
            with open(self.path, "rb") as f:
                np.lib.format.read_magic(f)
                np.lib.format.read_array_header_2_0(f)
                self.offset = f.tell()

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write `rows` (n, *shape[1:]) at row `start`."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or not 0 <= start <= start + len(rows) <= self.shape[0]:
            raise ValueError(f"rows {rows.shape} at {start} do not fit a {self.shape} array")
        with open(self.path, "r+b") as f:
            f.seek(self.offset + start * self.row_bytes)
            f.write(rows.tobytes())


def write_npz(output: str | os.PathLike, arrays: dict[str, np.ndarray | str | os.PathLike]) -> Path:
    """Write a normal (uncompressed, zip64) `.npz` atomically: temp file, then rename.

    Each value is an array (written whole: keep those small) or the path of a `.npy` file, copied in
    `COPY_CHUNK_BYTES` pieces, so memory stays bounded whatever its size.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, value in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as dst:
                    if isinstance(value, (str, os.PathLike)):
                        with open(value, "rb") as src:
                            shutil.copyfileobj(src, dst, COPY_CHUNK_BYTES)
                    else:
                        np.lib.format.write_array(dst, np.asarray(value), allow_pickle=False)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output
