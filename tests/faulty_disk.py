"""A small disk that tests can fill and make read-only: a real tmpfs where the tests run as root and
may mount, a fault-injecting file layer otherwise (SELAVPR_FAULT_DISK=injected forces it).

Both give the same operations: `fill` (the disk is full from now on), `release`, `read_only`,
`used_bytes` (without the ballast that `fill` wrote).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SIZE_BYTES = 3 * 2**20
CHUNK = 64 * 1024


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


class TmpfsDisk:
    kind = "tmpfs"

    def __init__(self, root: Path, size_bytes: int = SIZE_BYTES) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(root)], check=True)
        self.ballast = root / ".ballast"

    def used_bytes(self) -> int:
        stat = os.statvfs(self.root)
        used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
        return used - (self.ballast.stat().st_blocks * 512 if self.ballast.exists() else 0)

    def fill(self, leave: int = 0) -> None:
        """Write ballast until the disk is full, then give back `leave` bytes of it."""
        with open(self.ballast, "ab") as f:
            try:
                while True:
                    f.write(b"\0" * CHUNK)
                    f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        if leave:
            size = self.ballast.stat().st_size
            os.truncate(self.ballast, max(0, size - leave))

    def release(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def read_only(self, on: bool = True) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if on else 'rw'}", str(self.root)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.root)], check=False)


class InjectedDisk:
    """Python's file layer wrapped for paths under `root`: a capacity of SIZE_BYTES counted over the
    files there, ENOSPC beyond it or while filled, EROFS while read-only. Writers in C (FAISS, SQLite)
    are checked as their files close: the functions writing them are wrapped to raise the same."""

    kind = "injected"

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root.resolve()
        root.mkdir(parents=True, exist_ok=True)
        self.full = False
        self.spare = 0  # bytes still writable while full
        self.readonly = False
        self._open = builtins.open
        self._fdopen = os.fdopen
        monkeypatch.setattr(builtins, "open", self._wrap(builtins.open))
        monkeypatch.setattr(io, "open", self._wrap(io.open))
        monkeypatch.setattr(os, "fdopen", self._wrap_fd(os.fdopen))
        monkeypatch.setattr(os, "mkdir", self._guard_path(os.mkdir))
        monkeypatch.setattr(tempfile, "mkstemp", self._guard_dir_kw(tempfile.mkstemp))
        from app import service
        from app.routers import index as index_router
        from index_builder.store import cleanup, space, versions

        for module in (space, cleanup, index_router, service):  # every holder of `free_bytes`
            monkeypatch.setattr(module, "free_bytes", self.free_bytes)
        for name in ("write_global_index", "write_metadata"):
            monkeypatch.setattr(versions, name, self._check_after(getattr(versions, name)))

    def _mine(self, path) -> bool:
        try:
            return Path(os.fspath(path)).resolve().is_relative_to(self.root)
        except TypeError:  # a file descriptor
            return False

    def _allowance(self) -> int:
        if self.full:
            return self.spare
        return max(0, SIZE_BYTES - self._files_bytes())

    def _files_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def charge(self, count: int) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        if count > self._allowance():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.full:
            self.spare -= count

    def _wrap(self, opener):
        def wrapped(file, mode="r", *args, **kwargs):
            f = opener(file, mode, *args, **kwargs)
            if any(m in mode for m in "wax+") and self._mine(file):
                if self.readonly:
                    f.close()
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
                return _Charged(f, self)
            return f

        return wrapped

    def _wrap_fd(self, opener):
        def wrapped(fd, mode="r", *args, **kwargs):
            f = opener(fd, mode, *args, **kwargs)
            path = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
            return _Charged(f, self) if any(m in mode for m in "wax+") and self._mine(path) else f

        return wrapped

    def _guard_path(self, fn):
        def wrapped(path, *args, **kwargs):
            if self.readonly and self._mine(path):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return fn(path, *args, **kwargs)

        return wrapped

    def _guard_dir_kw(self, fn):
        def wrapped(*args, **kwargs):
            if self.readonly and self._mine(kwargs.get("dir") or ""):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return fn(*args, **kwargs)

        return wrapped

    def _check_after(self, writer):
        def wrapped(*args, **kwargs):
            if self.readonly:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            before = self._allowance()
            result = writer(*args, **kwargs)
            path = Path(args[1] if writer.__name__ == "write_global_index" else args[0])
            if path.stat().st_size > before:
                raise RuntimeError("write failed: No space left on device")  # as FAISS/SQLite word it
            if self.full:
                self.spare -= path.stat().st_size
            return result

        return wrapped

    def free_bytes(self, path) -> int:
        return self._allowance()

    def used_bytes(self) -> int:
        return self._files_bytes()

    def fill(self, leave: int = 0) -> None:
        self.full, self.spare = True, leave

    def release(self) -> None:
        self.full = False

    def read_only(self, on: bool = True) -> None:
        self.readonly = on

    def close(self) -> None:
        pass


class _Charged(io.RawIOBase):
    """A writable file whose writes count against the disk's capacity."""

    def __init__(self, f, disk: InjectedDisk) -> None:
        self._f, self._disk = f, disk

    def write(self, data) -> int:
        self._disk.charge(len(data))
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)

    def close(self) -> None:
        self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def fileno(self) -> int:
        return self._f.fileno()

    def flush(self) -> None:
        self._f.flush()

    def seek(self, *args) -> int:
        return self._f.seek(*args)

    def tell(self) -> int:
        return self._f.tell()

    def readable(self) -> bool:
        return self._f.readable()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._f.seekable()

    def read(self, *args):
        return self._f.read(*args)


@contextmanager
def small_disk(root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TmpfsDisk | InjectedDisk]:
    """A 3 MiB disk at `root`, unmounted however the test ends."""
    forced = os.environ.get("SELAVPR_FAULT_DISK")
    disk: TmpfsDisk | InjectedDisk | None = None
    if forced != "injected" and can_mount():
        try:
            disk = TmpfsDisk(root)
        except subprocess.CalledProcessError:  # root without the right to mount (a container)
            disk = None
    disk = disk or InjectedDisk(root, monkeypatch)
    print(f"fault disk: {disk.kind}")  # the test says which it used (pytest -s, and its report)
    try:
        yield disk
    finally:
        disk.release()
        disk.read_only(False)
        disk.close()
