"""Small fsspec helpers: every path here is a URI string (a local path or any fsspec URI such as
``s3://bucket/x`` or ``memory://x``), so the converter and the shard reader run unchanged on a
laptop, on a cluster's object store and in tests.

Writes that other processes may observe go through :func:`atomic_open`: the bytes land in
``<path>.tmp-<uuid>`` first and are moved onto ``<path>`` only once complete, so a reader (or a
resumed conversion) never sees half a file under the final name. A write that fails (a full
disk, a quota, a denied permission) raises an ``OSError`` naming the file (:func:`naming`:
``write()`` and ``close()`` errors name none by themselves).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

#: Marker between a final path and the random suffix of its temporary file.
TMP_MARKER = ".tmp-"


def resolve(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """``uri`` → (filesystem, path inside it)."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path


def join(uri: str, *parts: str) -> str:
    """Join URI parts with ``/`` (fsspec paths are always ``/``-separated)."""
    out = str(uri).rstrip("/")
    for p in parts:
        if p:
            out = f"{out}/{p.strip('/')}"
    return out


def is_process_local(uri: str) -> bool:
    """True where the filesystem lives in this process only (``memory://``): worker processes
    would write into their own copy, so such outputs must be written in-process."""
    fs, _ = resolve(uri)
    return isinstance(fs, MemoryFileSystem)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return bool(fs.exists(path))


def size(uri: str) -> int:
    fs, path = resolve(uri)
    return int(fs.size(path))


def read_bytes(uri: str) -> bytes:
    """The whole file; raises ``FileNotFoundError`` when it is absent."""
    fs, path = resolve(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def open_read(uri: str) -> IO[bytes]:
    """A binary stream for reading (the caller closes it). A local file is opened directly:
    fsspec's wrapper forwards every ``read``/``readinto`` through Python code, which the shard
    reader, several calls per tar member, would pay about 30 µs per sample for."""
    fs, path = resolve(uri)
    if isinstance(fs, LocalFileSystem):
        return open(path, "rb")
    return fs.open(path, "rb")


def remove(uri: str) -> None:
    """Delete one file; absent files are fine."""
    fs, path = resolve(uri)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def list_files(uri: str, *, recursive: bool = False) -> list[str]:
    """Files under directory ``uri`` as sorted ``/``-separated paths relative to it.

    A missing directory lists as empty. ``recursive=False`` lists the directory's own files only.
    """
    fs, path = resolve(uri)
    base = path.rstrip("/")
    try:
        if not fs.isdir(base):
            return []
        if recursive:
            found = fs.find(base, withdirs=False)
        else:
            found = [e["name"] for e in fs.ls(base, detail=True) if e.get("type") == "file"]
    except FileNotFoundError:
        return []
    prefix = base + "/"
    rel = []
    for p in found:
        p = p.rstrip("/")
        # Some filesystems return paths without the leading "/" that the base has (memory://).
        if not p.startswith(prefix) and ("/" + p).startswith(prefix):
            p = "/" + p
        if p.startswith(prefix):
            rel.append(p[len(prefix):])
    return sorted(rel)


def list_dirs(uri: str) -> list[str]:
    """Names of the immediate subdirectories of ``uri``, sorted (missing directory → empty)."""
    fs, path = resolve(uri)
    base = path.rstrip("/")
    try:
        if not fs.isdir(base):
            return []
        entries = fs.ls(base, detail=True)
    except FileNotFoundError:
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")


@contextmanager
def naming(uri: str) -> Iterator[None]:
    """Within the block, an ``OSError`` that names no file (``write()``, ``flush()``, ``close()``:
    "No space left on device") is raised again naming ``uri``, same errno and type."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or not e.errno:
            raise
        raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(uri)) from e


@contextmanager
def atomic_open(uri: str, mode: str = "wb") -> Iterator[IO]:
    """Open ``<uri>.tmp-<uuid>`` for writing; on a clean exit move it onto ``uri``.

    On an exception the temporary file is removed and ``uri`` is left untouched. The move is an
    atomic rename on local disks; on object stores the final object appears in one PUT/COPY.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}{TMP_MARKER}{uuid.uuid4().hex}"
    try:
        with naming(uri):
            with fs.open(tmp, mode) as f:
                yield f
            fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm_file(tmp)
        except (FileNotFoundError, OSError):
            pass
        raise


def write_bytes_atomic(uri: str, data: bytes) -> None:
    with atomic_open(uri, "wb") as f:
        f.write(data)


def write_json_atomic(uri: str, obj: Any) -> None:
    """Pretty, key-order-preserving UTF-8 JSON, written atomically."""
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
