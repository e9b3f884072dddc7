"""One owner per run: the lease in the run's storage directory (no Ray needed: the lease is taken
before Ray starts).

Two takers of one run (the second refused naming the holder's host, pid and since, also through
``vtd train``), however the run's path is spelled; racing takers (exactly one wins); a holder
that died (same host: at once) or stopped renewing (another host: after the ttl) is taken over;
``--takeover`` takes a live lease and the old holder learns it lost it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from vtd_train.train.lease import LEASE_DIR, LeaseHeldError, LeaseInfo, RunLease, hold_lease, read_lease
from vtd_train.train.recovery import run_uri

ROOT = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from vtd_train.train.lease import RunLease
lease = RunLease({run!r}, owner="vtd train (stage joint)", ttl_s=30)
lease.acquire()
print("held", flush=True)
time.sleep(300)
"""


@pytest.fixture
def holder_process(tmp_path):
    """Start a separate process that takes a run's lease and keeps it (renewing) until killed."""
    procs = []

    def start(run: str) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), run=run)], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _tiny_config(tmp_path: Path, shards: str) -> str:
    doc = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    doc["data"]["uri"] = shards
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_a_second_vtd_train_of_a_run_stops_at_once_naming_the_holder(tmp_path, tiny_shards, holder_process, capsys, monkeypatch):
    """A live process holds run 'r'; ``vtd train`` of the same run, whatever the spelling of the
    storage path (a symlink, ``./``), stops before starting Ray with one line naming the holder;
    once the holder is SIGKILLed the next taker takes the lease over at once (same host, process
    gone) and says so."""
    from vtd_train.cli import main

    storage = tmp_path / "runs"
    storage.mkdir()
    (tmp_path / "link").symlink_to(storage)
    holder = holder_process(run_uri(str(storage), "r"))
    config = _tiny_config(tmp_path, tiny_shards)
    monkeypatch.chdir(tmp_path)
    for spelling in (str(storage), str(tmp_path / "link"), "./link/../runs"):
        t = time.monotonic()
        rc = main(["train", "--config", config, "--storage", spelling, "--name", "r"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.splitlines() == [err], err
        assert err.startswith(f"vtd: error: run {storage / 'r'} is in use by vtd train (stage joint)"), err
        assert f"on host {socket.gethostname()}, pid {holder.pid}, since 20" in err and "--takeover" in err, err
        assert time.monotonic() - t < 15, "refused only after starting the run"
    assert not list((storage / "r").glob("checkpoint*")), "the refused run wrote into the run"

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    said: list[str] = []
    with hold_lease(run_uri(str(tmp_path / "link"), "r"), say=said.append) as lease:
        assert lease.info.pid == os.getpid() and lease.info.gen == 2
        assert len(said) == 1 and f"from vtd train (stage joint) on host {socket.gethostname()}, pid {holder.pid}" in said[0]
        assert f"process {holder.pid} on this host is gone" in said[0], said
    assert read_lease(run_uri(str(storage), "r")).released


def test_racing_takers_exactly_one_wins(tmp_path):
    run = str(tmp_path / "r")
    n = 8
    barrier, won, refused = threading.Barrier(n), [], []

    def take(k: int) -> None:
        lease = RunLease(run, owner=f"taker {k}", ttl_s=30)
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeldError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=take, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == n - 1, (won, refused)
    assert all(won[0].owner in r for r in refused)
    assert [p.name for p in (tmp_path / "r" / LEASE_DIR).iterdir()] == ["0000000001.json"]
    won[0].release()


def _plant(run: Path, **fields) -> LeaseInfo:
    """A lease file as another host's holder would have left it."""
    now = time.time()
    info = LeaseInfo(**{"gen": 3, "token": "t", "host": "other-host", "pid": 4242, "pid_start": 0.0,
                        "owner": "pipeline stage pretrain", "since": now - 3600, "renewed": now, "ttl_s": 60.0, **fields})
    (run / LEASE_DIR).mkdir(parents=True, exist_ok=True)
    (run / LEASE_DIR / f"{info.gen:010d}.json").write_text(json.dumps(info.__dict__))
    return info


def test_a_lease_not_renewed_within_its_ttl_is_taken_over(tmp_path):
    run = tmp_path / "r"
    _plant(run)  # another host, renewed just now: held
    with pytest.raises(LeaseHeldError, match=r"in use by pipeline stage pretrain on host other-host, pid 4242, since 20"):
        RunLease(str(run)).acquire()
    _plant(run, renewed=time.time() - 61)  # its holder stopped renewing: expired
    said: list[str] = []
    with hold_lease(str(run), say=said.append) as lease:
        assert lease.info.gen == 4
        assert len(said) == 1 and "from pipeline stage pretrain on host other-host" in said[0] and "not renewed for 61 s" in said[0]
    assert sorted(p.name for p in (run / LEASE_DIR).iterdir()) == ["0000000004.json"]  # older generations cleaned


def test_takeover_takes_a_live_lease_and_the_old_holder_learns_it(tmp_path):
    run = str(tmp_path / "r")
    lost = threading.Event()
    got: list = []

    def on_lost(holder):
        got.append(holder)
        lost.set()

    old = RunLease(run, owner="old", ttl_s=0.4, on_lost=on_lost)
    old.acquire()
    time.sleep(0.3)
    assert read_lease(run).renewed > old.info.since, "the heartbeat does not renew"
    new = RunLease(run, owner="new", ttl_s=30)
    with pytest.raises(LeaseHeldError, match="in use by old"):
        new.acquire()
    previous = new.acquire(takeover=True)
    assert previous.owner == "old" and not previous.released
    assert lost.wait(2.0), "the old holder never learnt that it lost the lease"
    assert got[0].owner == "new" and old.lost
    old.release()  # a lost lease is not marked released: the new holder keeps it
    assert read_lease(run).owner == "new" and not read_lease(run).released
    new.release()
    assert read_lease(run).released
    again = RunLease(run, owner="next")
    assert again.acquire() is None  # a released lease is free, nothing taken over
    again.release()


def test_the_lease_works_on_an_fsspec_store(tmp_path):
    """``memory://`` (an fsspec store with a conditional create): the same protocol."""
    run = f"memory://lease-test-{os.getpid()}/r"
    with hold_lease(run, owner="a", say=print):
        with pytest.raises(LeaseHeldError, match="in use by a"):
            RunLease(run, owner="b").acquire()
    with hold_lease(run, owner="b", say=print) as lease:
        assert lease.info.gen == 2


@pytest.mark.parametrize("argv, fragment", [
    (["--name", ".."], "name must be a run name"),
    (["--name", "a/b"], "name must be a run name"),
    (["--storage", "foo://bucket/runs"], "storage_path 'foo://bucket/runs': unknown URI scheme 'foo'"),
])
def test_bad_run_names_and_storage_uris_stop_vtd_train_in_one_line(tmp_path, tiny_shards, capsys, argv, fragment):
    """``--name ..`` once wrote the run into the parent of storage_path."""
    from vtd_train.cli import main

    rc = main(["train", "--config", _tiny_config(tmp_path, tiny_shards), "--storage", str(tmp_path / "runs"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.splitlines() == [err] and err.startswith("vtd: error:") and fragment in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / LEASE_DIR).exists()
