"""One owner per run: an exclusive lease in the run's storage directory, renewed by a heartbeat.

``vtd train`` takes the lease of ``<storage>/<name>`` before it touches the run (clean-up, Ray
Train) and holds it to the end; a pipeline stage takes the same lease with :func:`hold_lease`.
A second taker stops at once with :class:`LeaseHeldError` naming the holder (host, pid, since).

The lease is a sequence of small JSON files, ``<run>/.lease/<generation>.json``; the highest
generation is the lease. Taking it means creating the next generation's file *exclusively*, so of
two takers exactly one wins:

* local paths (and NFS): the file is written under a temporary name and hard-linked to its final
  name (``link`` fails when the name exists; the file appears complete or not at all). The run
  directory is resolved first (symlinks, ``./``, ``~``), though exclusivity does not depend on
  the spelling: every spelling names the same directory entry;
* other fsspec stores: ``open(path, "xb")``, a conditional create on stores that offer one (S3
  with s3fs >= 2025.7 — ``If-None-Match`` —, GCS with gcsfs, Azure with adlfs >= 2024.12, the
  in-memory store). On a store that ignores ``"x"`` the taker reads the file back and checks the
  token it wrote, which narrows but does not close the race.

A taker also checks, after creating its generation, that no higher one exists (a taker that read
an older state may create a stale generation; it then backs off).

The holder rewrites its own file every ``ttl_s / 4`` seconds (``renewed``). A lease is free when
its holder released it, when it was not renewed for ``ttl_s`` seconds (clocks of the hosts
involved must agree to well within ``ttl_s``), or at once when its holder ran on this host and
that process is gone. ``takeover=True`` (``vtd train --takeover``) takes a live lease; the old
holder's heartbeat then finds a higher generation and calls its ``on_lost``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime

from data_pipeline import fsio
from data_pipeline.errors import VTDInputError
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

LEASE_DIR = ".lease"
DEFAULT_TTL_S = 60.0


class LeaseHeldError(VTDInputError):
    """The run is owned by another live process."""


@dataclass(frozen=True)
class LeaseInfo:
    """One generation of a run's lease. ``since``/``renewed``: Unix times; ``pid_start``: the
    holder process's start time (tells a reused pid apart)."""

    gen: int
    token: str
    host: str
    pid: int
    pid_start: float
    owner: str
    since: float
    renewed: float
    ttl_s: float
    released: bool = False

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.since).astimezone().isoformat(timespec="seconds")
        return f"{self.owner} on host {self.host}, pid {self.pid}, since {since}"

    def holder_gone(self, now: float | None = None) -> str | None:
        """Why the lease is free (released, expired, holder process gone), or ``None`` when it is
        held."""
        now = time.time() if now is None else now
        if self.released:
            return "released"
        if now - self.renewed > self.ttl_s:
            return f"not renewed for {now - self.renewed:.0f} s (ttl {self.ttl_s:g} s)"
        if self.host == socket.gethostname() and not _process_alive(self.pid, self.pid_start):
            return f"process {self.pid} on this host is gone"
        return None


def _process_start(pid: int) -> float:
    import psutil

    return psutil.Process(pid).create_time()


def _process_alive(pid: int, start: float) -> bool:
    import psutil

    try:
        return abs(_process_start(pid) - start) < 1.0
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True


def _lease_dir(run_uri: str) -> str:
    return fsio.join(run_uri, LEASE_DIR)


def _gen_name(gen: int) -> str:
    return f"{gen:010d}.json"


def _generations(run_uri: str) -> list[int]:
    out = []
    for name in fsio.list_files(_lease_dir(run_uri)):
        stem = name.removesuffix(".json")
        if name.endswith(".json") and stem.isdigit():
            out.append(int(stem))
    return sorted(out)


def _read(run_uri: str, gen: int) -> LeaseInfo | None:
    try:
        doc = json.loads(fsio.read_bytes(fsio.join(_lease_dir(run_uri), _gen_name(gen))))
        return LeaseInfo(**doc)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:
        path = fsio.join(_lease_dir(run_uri), _gen_name(gen))
        raise VTDInputError(f"{path}: unreadable lease file ({e}); remove it if no run of this name is running") from None


def read_lease(run_uri: str) -> LeaseInfo | None:
    """The run's current lease (its highest generation, held or not); ``None`` when the run was
    never leased."""
    for gen in reversed(_generations(run_uri)):
        info = _read(run_uri, gen)
        if info is not None:
            return info
    return None


def _create_exclusive(uri: str, data: bytes) -> None:
    """Create file ``uri`` holding ``data`` unless it exists (``FileExistsError``)."""
    fs, path = fsio.resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}{fsio.TMP_MARKER}{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # no hard links on this filesystem: exclusive create, then write
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        finally:
            os.unlink(tmp)
        return
    with fs.open(path, "xb") as f:
        f.write(data)


class RunLease:
    """The lease of run directory ``run_uri`` for one holder (this process).

    ``owner``: what holds it, as the refusal will name it (``"vtd train"``, ``"pipeline stage
    pretrain"``). ``on_lost(new_holder)`` is called once, from the heartbeat thread, when another
    process took the lease (``--takeover``) or the heartbeat could not renew it within ``ttl_s``.
    """

    def __init__(self, run_uri: str, *, owner: str = "vtd train", ttl_s: float = DEFAULT_TTL_S,
                 on_lost: Callable[[LeaseInfo | None], None] | None = None):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.run_uri, self.owner, self.ttl_s, self.on_lost = run_uri, owner, float(ttl_s), on_lost
        self.info: LeaseInfo | None = None
        self.lost: bool = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- taking and giving back ---------------------------------------------------------------

    def acquire(self, *, takeover: bool = False) -> LeaseInfo | None:
        """Take the lease and start the heartbeat. Returns the previous holder's lease when this
        took over a lease that was not released (expired, dead holder, or ``takeover``), else
        ``None``. Raises :class:`LeaseHeldError` when it is held and ``takeover`` is false."""
        if self.info is not None:
            raise RuntimeError(f"{self.run_uri}: lease already held by this object")
        for _ in range(8):
            cur = read_lease(self.run_uri)
            if cur is not None and not takeover and cur.holder_gone() is None:
                age = time.time() - cur.renewed
                raise LeaseHeldError(
                    f"run {self.run_uri} is in use by {cur.describe()} (lease renewed {age:.0f} s ago, expires "
                    f"{cur.ttl_s:g} s after its last renewal; `vtd train --takeover` takes it now)"
                )
            now = time.time()
            mine = LeaseInfo(gen=(cur.gen if cur else 0) + 1, token=uuid.uuid4().hex, host=socket.gethostname(),
                             pid=os.getpid(), pid_start=_process_start(os.getpid()), owner=self.owner, since=now,
                             renewed=now, ttl_s=self.ttl_s)
            try:
                _create_exclusive(self._path(mine.gen), self._encode(mine))
            except FileExistsError:
                continue  # another taker won this generation: look again
            if _generations(self.run_uri)[-1] != mine.gen or _read(self.run_uri, mine.gen) != mine:
                fsio.remove(self._path(mine.gen))  # raced with a taker that saw a newer state
                continue
            self.info = mine
            self._forget_older(mine.gen)
            self._start_heartbeat()
            return cur if cur is not None and not cur.released else None
        raise LeaseHeldError(f"run {self.run_uri}: could not take the lease (other takers kept winning); try again")

    def release(self) -> None:
        """Stop the heartbeat and mark the lease released (unless it was lost)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self.info is not None and not self.lost and _generations(self.run_uri)[-1:] == [self.info.gen]:
                self._write(LeaseInfo(**{**asdict(self.info), "released": True, "renewed": time.time()}))
            self.info = None

    def __enter__(self) -> RunLease:
        if self.info is None:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- heartbeat ------------------------------------------------------------------------------

    def renew(self) -> bool:
        """Renew now; ``False`` (and ``on_lost``) when another process holds a newer generation."""
        with self._lock:
            if self.info is None or self.lost:
                return False
            newest = _generations(self.run_uri)
            if newest and newest[-1] != self.info.gen:
                self._lose(read_lease(self.run_uri))
                return False
            self.info = LeaseInfo(**{**asdict(self.info), "renewed": time.time()})
            self._write(self.info)
            return True

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat({self.run_uri})", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = self.ttl_s / 4
        last_ok = time.time()
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    return
                last_ok = time.time()
            except Exception as e:  # noqa: BLE001 - storage hiccup: retry until the lease would expire
                log.warning("lease %s: renewal failed: %s", self.run_uri, e)
                if time.time() - last_ok > self.ttl_s:
                    with self._lock:
                        self._lose(None)
                    return

    def _lose(self, holder: LeaseInfo | None) -> None:
        if self.lost:
            return
        self.lost = True
        who = holder.describe() if holder is not None else "nobody (it could not be renewed in time)"
        log.error("lease of run %s lost: now held by %s", self.run_uri, who)
        if self.on_lost is not None:
            self.on_lost(holder)

    # -- files ------------------------------------------------------------------------------------

    def _path(self, gen: int) -> str:
        return fsio.join(_lease_dir(self.run_uri), _gen_name(gen))

    @staticmethod
    def _encode(info: LeaseInfo) -> bytes:
        return (json.dumps(asdict(info), indent=2) + "\n").encode()

    def _write(self, info: LeaseInfo) -> None:
        fsio.write_bytes_atomic(self._path(info.gen), self._encode(info))

    def _forget_older(self, gen: int) -> None:
        for old in _generations(self.run_uri):
            if old < gen:
                fsio.remove(self._path(old))


@contextmanager
def hold_lease(run_uri: str, *, owner: str = "vtd train", takeover: bool = False, ttl_s: float = DEFAULT_TTL_S,
               on_lost: Callable[[LeaseInfo | None], None] | None = None,
               say: Callable[[str], None] = print) -> Iterator[RunLease]:
    """Hold run ``run_uri``'s lease for the ``with`` block (see :class:`RunLease`); taking over a
    lease that was not released is said through ``say`` in one line."""
    lease = RunLease(run_uri, owner=owner, ttl_s=ttl_s, on_lost=on_lost)
    previous = lease.acquire(takeover=takeover)
    if previous is not None:
        why = previous.holder_gone() or "taken over (--takeover)"
        say(f"vtd train: took over the lease of run {run_uri} from {previous.describe()}: {why}")
    try:
        yield lease
    finally:
        lease.release()
