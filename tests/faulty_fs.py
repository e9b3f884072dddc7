"""A fault-injecting fsspec filesystem for the tests: local files whose writes run out of space,
or come back truncated or changed, and whose deletes may be refused.

:func:`install` routes every ``data_pipeline.fsio`` path under a directory to a
:class:`FaultyFileSystem` (the production code resolves every URI through ``fsio.resolve``), so
the code under test writes through it unchanged.
"""

from __future__ import annotations

import errno
import fnmatch
import os
from typing import Any

from fsspec.implementations.local import LocalFileSystem


class FaultyFileSystem(LocalFileSystem):
    """Local files with faults:

    * ``space``: bytes that may still be written, over all files; the write that goes past it
      stores what fits and raises ``OSError(ENOSPC)`` naming no file, as ``write()`` does;
    * ``truncate`` / ``corrupt``: glob patterns of base names whose files, once closed, are cut
      to half their size / have one byte inverted in the middle (a store that lost or changed
      bytes without an error);
    * ``refuse_rm``: deletes raise ``PermissionError``.
    """

    cachable = False

    def __init__(self, *, space: int | None = None, truncate: tuple[str, ...] = (), corrupt: tuple[str, ...] = (),
                 refuse_rm: bool = False, **kw: Any):
        super().__init__(**kw)
        self.space, self.truncate, self.corrupt, self.refuse_rm = space, truncate, corrupt, refuse_rm
        self.written: list[str] = []

    def _open(self, path, mode="rb", **kw):
        f = super()._open(path, mode, **kw)
        return _FaultyWriter(f, self, self._strip_protocol(path)) if "w" in mode or "a" in mode else f

    def rm(self, path, recursive=False, maxdepth=None):
        if self.refuse_rm:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return super().rm(path, recursive=recursive, maxdepth=maxdepth)

    def rm_file(self, path):
        if self.refuse_rm:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return super().rm_file(path)


class _FaultyWriter:
    def __init__(self, f, fs: FaultyFileSystem, path: str):
        self.f, self.fs, self.path = f, fs, path

    def write(self, data) -> int:
        data = bytes(data)
        if self.fs.space is not None:
            if len(data) > self.fs.space:
                self.f.write(data[: self.fs.space])
                self.fs.space = 0
                raise OSError(errno.ENOSPC, "No space left on device")
            self.fs.space -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    @property
    def closed(self) -> bool:
        return self.f.closed

    def close(self) -> None:
        if self.f.closed:
            return
        self.f.close()
        self.fs.written.append(self.path)
        name = os.path.basename(self.path).split(".tmp-")[0]
        if any(fnmatch.fnmatch(name, p) for p in self.fs.truncate):
            os.truncate(self.path, os.path.getsize(self.path) // 2)
        if any(fnmatch.fnmatch(name, p) for p in self.fs.corrupt):
            with open(self.path, "r+b") as g:
                g.seek(os.path.getsize(self.path) // 2)
                b = g.read(1)
                g.seek(-1, os.SEEK_CUR)
                g.write(bytes([b[0] ^ 0xFF]))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def install(monkeypatch, root: str, **faults: Any) -> FaultyFileSystem:
    """Route ``data_pipeline.fsio`` paths under local directory ``root`` to a new
    :class:`FaultyFileSystem` with ``faults``; returns it (its ``space`` etc. may be changed)."""
    from data_pipeline import fsio

    fs = FaultyFileSystem(**faults)
    real = fsio.resolve
    root = os.path.abspath(root)

    def resolve(uri: str):
        path = str(uri)
        if os.path.abspath(path) == root or os.path.abspath(path).startswith(root + os.sep):
            return fs, os.path.abspath(path)
        return real(uri)

    monkeypatch.setattr(fsio, "resolve", resolve)
    return fs
