"""The shard tar reader reads what webdataset reads, and names the shard when a tar is broken."""

from __future__ import annotations

import io
import tarfile

import pytest
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_pipeline.errors import DataError
from data_pipeline.loading.loader import iter_shard
from data_pipeline.shards.manifest import families_from_manifest
from data_pipeline.shards.tar_reader import iter_samples


def _webdataset(data: bytes, url: str) -> list[dict]:
    return list(group_by_keys(tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])))


def _ours(data: bytes, url: str) -> list[dict]:
    return list(iter_samples(io.BytesIO(data), url))


def _tar(members: list[tuple[str, bytes]], fmt: int, mtime: float = 0, extra: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        if extra:
            d = tarfile.TarInfo("somedir")
            d.type = tarfile.DIRTYPE
            tf.addfile(d)
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime = len(data), mtime
            tf.addfile(ti, io.BytesIO(data))
        if extra:
            s = tarfile.TarInfo("alink.txt")
            s.type, s.linkname = tarfile.SYMTYPE, "a.0.jpg"
            tf.addfile(s)
    return buf.getvalue()


def test_the_converters_shards_read_as_webdataset_reads_them(tiny_shards):
    n = 0
    for fam in families_from_manifest(tiny_shards, "train") + families_from_manifest(tiny_shards, "val"):
        for url in fam.urls:
            with open(url, "rb") as f:
                want = list(group_by_keys(tar_file_expander([{"url": url, "stream": f}])))
            assert list(iter_shard(url)) == want
            n += len(want)
        for url, offsets in zip(fam.urls, fam.shard_sample_offsets):  # the converter's record of where samples begin
            full = list(iter_shard(url))
            assert len(offsets) == len(full)
            assert all(list(iter_shard(url, offset)) == full[k:] for k, offset in enumerate(offsets))
    assert n > 0


LONG = "a" * 120 + "/" + "deep" * 30  # beyond ustar's 100-byte name field


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_dialects_read_as_webdataset_reads_them(fmt):
    members = [("a.0.jpg", b"\xff\xd8" * 300), ("a.clip.json", b"{}"), ("b.0.jpg", b""), ("b.clip.json", b"x" * 513),
               ("dir/c.CLIP.json", b"{1}")]
    if fmt != tarfile.USTAR_FORMAT:
        members.append((LONG + "/k.0.jpg", b"long"))
    for mtime in (0, 1.5):  # a float mtime makes PAX write an extended header per member
        data = _tar(members, fmt, mtime, extra=True)
        ours = _ours(data, "mem://x.tar")
        assert ours == _webdataset(data, "mem://x.tar")
        assert [s["__key__"] for s in ours][:3] == ["a", "b", "dir/c"] and ours[2]["clip.json"] == b"{1}"


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reading_from_a_samples_offset_gives_the_samples_from_there(fmt):
    members = [("a.0.jpg", b"\xff" * 5000), ("a.clip.json", b"{}"), ("b.0.jpg", b"\xfe" * 7000), ("b.clip.json", b"[]"),
               ("c.0.jpg", b"c" * 10), ("c.clip.json", b"{3}")]
    if fmt != tarfile.USTAR_FORMAT:
        members.append((LONG + "/k.0.jpg", b"long"))
    data = _tar(members, fmt, 1.5)
    want = _webdataset(data, "u.tar")
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:  # where each sample's first member (its extended header) begins
        starts = {}
        for m in tf.getmembers():
            starts.setdefault(m.name.split(".")[0], m.offset)
    assert len(starts) == len(want) >= 3
    for k, offset in enumerate(starts.values()):
        stream = io.BytesIO(data)
        stream.seek(offset)
        assert list(iter_samples(stream, "u.tar", offset)) == want[k:]
    jpeg_b = data.index(b"\xfe" * 100)
    stream = io.BytesIO(data[:jpeg_b + 100])  # cut inside b's JPEG: the error names the archive's byte
    stream.seek(starts["b"])
    with pytest.raises(DataError, match=f"truncated tar: member data at byte {jpeg_b}"):
        list(iter_samples(stream, "u.tar", starts["b"]))


def test_a_pax_size_record_overrides_the_header():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("a.bin")
        ti.size, ti.pax_headers = 700, {"size": "700"}
        tf.addfile(ti, io.BytesIO(b"z" * 700))
    data = bytearray(buf.getvalue())
    member = 2 * 512  # the PAX header block, its records, then the member's own header
    assert data[member:member + 5] == b"a.bin"
    data[member + 124:member + 136] = b"00000000000\0"  # the ustar size field now says 0 ...
    data[member + 148:member + 156] = b" " * 8
    data[member + 148:member + 156] = b"%06o\0 " % sum(data[member:member + 512])
    assert _ours(bytes(data), "u")[0]["bin"] == b"z" * 700  # ... the PAX record wins
    assert _ours(bytes(data), "u") == _webdataset(bytes(data), "u")


def test_a_truncated_shard_names_the_shard_and_offset():
    data = _tar([("a.0.jpg", b"j" * 2000), ("a.clip.json", b"{}")], tarfile.USTAR_FORMAT)
    with pytest.raises(DataError, match=r"s3://bucket/shard\.tar.*truncated tar: member data at byte 512"):
        _ours(data[:1500], "s3://bucket/shard.tar")
    with pytest.raises(DataError, match="truncated tar: header"):
        _ours(data[:512 * 5 + 100], "s3://bucket/shard.tar")


def test_a_corrupt_header_is_refused():
    data = bytearray(_tar([("a.0.jpg", b"j" * 10)], tarfile.USTAR_FORMAT))
    data[0:1] = b"b"  # the name changes, the stored checksum does not
    with pytest.raises(DataError, match="checksum mismatch"):
        _ours(bytes(data), "u.tar")
    data = bytearray(_tar([("a.0.jpg", b"j" * 10)], tarfile.USTAR_FORMAT))
    data[124:136] = b"notoctal\0\0\0\0"
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\0 " % sum(data[:512])  # a valid checksum over the bad size
    with pytest.raises(DataError, match="numeric field"):
        _ours(bytes(data), "u.tar")


def test_members_must_be_key_dot_suffix_and_unique_per_sample():
    with pytest.raises(DataError, match="not named KEY.SUFFIX"):
        _ours(_tar([("README", b"hi")], tarfile.USTAR_FORMAT), "u.tar")
    with pytest.raises(DataError, match="holds 'jpg' twice"):
        _ours(_tar([("a.jpg", b"1"), ("a.JPG", b"2")], tarfile.USTAR_FORMAT), "u.tar")
