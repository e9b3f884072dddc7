"""Streaming reader of WebDataset tar shards: grouped samples of raw bytes.

Reads the same samples as ``webdataset``'s ``tar_file_expander`` + ``group_by_keys`` (the
tests check this against webdataset on the converter's shards and on PAX and GNU tars), at a
fraction of the cost: webdataset drives :mod:`tarfile`'s streaming mode, whose header parsing
and small reads cost about 0.1 ms per member in Python, about a tenth of a JPEG decode per det
frame (benchmarks/RESULTS.md). Here a member is one 512-byte header parsed with slicing, its
checksum verified, and two reads. Reading may begin at any sample (the converter records
where each begins).

Supported: POSIX ustar and GNU headers (``typeflag`` 0/7 regular files), PAX extended headers
(``path`` and ``size`` records; global headers are ignored) and GNU long names. Directories,
links and other special members are skipped, as webdataset does. A corrupt header or a bad
checksum raises :class:`~data_pipeline.errors.DataError` naming the shard and the byte offset; an
archive whose data ends inside a member raises its subclass :class:`TruncatedTarError`, which
also says where the data ended. The archive's end is its first zero block (or, leniently, the end
of the data after a complete member, or inside the end-of-archive blocks): whether the blocks are
all there is ``vtd data inspect``'s check (:mod:`data_pipeline.shards.inspect`), not the loader's, which
stops reading a shard after its last sample.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import IO, Any, NamedTuple

from data_pipeline.errors import DataError

BLOCK = 512
_ZERO = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
#: ``key.suffix``: the key is everything up to the first dot of the base name (webdataset).
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class TruncatedTarError(DataError):
    """A tar archive whose data ends inside a member (its header, data or padding); ``at``: the
    archive's byte where the data ended."""

    def __init__(self, file: str, message: str, *, at: int = -1):
        super().__init__(file, message)
        self.at = at

    def __reduce__(self):
        return (TruncatedTarError, (self.file, self.message), {"at": self.at})


class TarEntry(NamedTuple):
    """A regular file of a tar archive: ``start``, the archive's byte where its headers begin (a
    PAX or GNU long-name header before its own included), ``end``, the byte after its data's
    padding, ``name`` and ``data``."""

    start: int
    end: int
    name: str
    data: bytearray


def _number(field: bytes, where: str, offset: int) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 (high bit set)."""
    if field and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise DataError(where, f"corrupt tar header at byte {offset}: numeric field {field!r}") from None


def _checksum_ok(header: bytes, stored: int) -> bool:
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if unsigned == stored:
        return True
    signed = unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b > 127)
    return signed == stored


def _pax_records(data: bytes, where: str, offset: int) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records of a PAX header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise DataError(where, f"corrupt PAX header at byte {offset}") from None
        if length <= 0 or space < 0 or pos + length > len(data):
            raise DataError(where, f"corrupt PAX header at byte {offset}")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _read(stream: IO[bytes], n: int, where: str, offset: int, what: str) -> bytearray:
    """``n`` bytes into a fresh (writable) buffer: decoders wrap it without another copy."""
    data = bytearray(n)
    view, got = memoryview(data), 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            raise TruncatedTarError(where, f"truncated tar: {what} at byte {offset} needs {n} bytes, {got} left",
                                    at=offset + got)
        got += k
    return data


def iter_members(stream: IO[bytes], where: str, offset: int = 0) -> Iterator[TarEntry]:
    """Every regular file of the tar stream, in order, as a :class:`TarEntry` (``data`` a fresh
    ``bytearray``: equal to the member's bytes, writable, owned by the caller). ``offset``: the
    byte of the archive the stream stands at, a member's header."""
    long_name: str | None = None
    pax: dict[str, str] = {}
    start = offset  # where the current member's headers begin
    while True:
        header = stream.read(BLOCK)
        if not header.strip(b"\0"):  # end of archive (zero blocks; or no more data)
            return
        if len(header) != BLOCK:
            raise TruncatedTarError(where, f"truncated tar: header at byte {offset} has {len(header)} of {BLOCK} bytes",
                                    at=offset + len(header))
        if not _checksum_ok(header, _number(header[148:156], where, offset)):
            raise DataError(where, f"corrupt tar header at byte {offset}: checksum mismatch")
        typeflag = header[156:157]
        size = int(pax["size"]) if "size" in pax and typeflag in _REGULAR else _number(header[124:136], where, offset)
        data = _read(stream, size, where, offset + BLOCK, "member data")
        pad = -size % BLOCK
        if pad and (got := len(stream.read(pad))) != pad:
            raise TruncatedTarError(where, f"truncated tar: member padding at byte {offset + BLOCK + size} needs {pad} bytes",
                                    at=offset + BLOCK + size + got)
        member_offset, offset = offset, offset + BLOCK + size + pad
        if typeflag == b"x":
            pax = _pax_records(data, where, member_offset)
            continue
        if typeflag == b"L":
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if typeflag == b"g":
            continue
        if "path" in pax:
            name = pax["path"]
        elif long_name is not None:
            name = long_name
        else:
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if prefix:
                    name = f"{prefix}/{name}"
        pax, long_name = {}, None
        if typeflag in _REGULAR:
            yield TarEntry(start, offset, name, data)
        start = offset


def group_samples(entries: Iterable[TarEntry], url: str) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Consecutive members sharing a key, as ``(start, end, sample)``: the archive's bytes where
    the sample's first member begins and its last one ends, and ``{"__key__", "__url__", suffix:
    data}`` (suffixes lower-cased, as webdataset does)."""
    sample: dict[str, Any] | None = None
    start = end = 0
    for entry in entries:
        m = _KEY_RE.match(entry.name)
        if m is None:
            raise DataError(url, f"tar member {entry.name!r} is not named KEY.SUFFIX")
        key, suffix = m.group(1), m.group(2).lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield start, end, sample
            sample, start = {"__key__": key, "__url__": url}, entry.start
        elif suffix in sample:
            raise DataError(url, f"sample {key!r} holds {suffix!r} twice")
        sample[suffix] = entry.data
        end = entry.end
    if sample is not None:
        yield start, end, sample


def iter_samples(stream: IO[bytes], url: str, offset: int = 0) -> Iterator[dict[str, Any]]:
    """Samples of a WebDataset tar (:func:`group_samples`; data as a ``bytearray``). The stream
    may start at a later sample's first header, the archive's byte ``offset`` (a loader worker
    whose part of a set begins inside the shard)."""
    for _, _, sample in group_samples(iter_members(stream, url, offset), url):
        yield sample
