"""A pipeline run's state: the run manifest (``<storage>/<run>/pipeline.json``), content hashes
and cache keys.

The manifest records, per stage: its cache key, state, attempt, Ray job id, inputs and outputs
(URIs with content hashes), metrics and times, and the earlier attempts. Only the orchestrator
writes it, atomically (:func:`data_pipeline.fsio.write_json_atomic`), after every change, so a
killed orchestrator leaves a manifest that describes every job it submitted — except one
submitted in the instant before the write, whose deterministic submission id
(:func:`job_id`) a restarted orchestrator finds on the cluster (an existing id means "attach").

A stage's **cache key** hashes its resolved definition (:meth:`Stage.describe`), its inputs'
content hashes, the dataset manifest's hash and the code version (:func:`code_version`): a
rerun skips a stage whose key is unchanged and whose outputs still hash as recorded, and reruns
a changed stage and, through their inputs' hashes, its dependants only.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline import fsio
from data_pipeline.errors import VTDInputError

MANIFEST = "pipeline.json"
CANCEL_MARKER = "CANCEL"
FORMAT_VERSION = 1

#: Stage states. ``pending``: not submitted (waiting for inputs, a slot or a retry's backoff);
#: ``submitted``/``running``: its job is queued / running; terminal: ``succeeded``, ``failed``
#: (attempts exhausted), ``cancelled``.
STATES = ("pending", "submitted", "running", "succeeded", "failed", "cancelled")
ACTIVE = ("submitted", "running")
#: The packages whose source makes the code version.
CODE_PACKAGES = ("vtd_train", "data_pipeline", "cluster", "orchestrator")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_files(uris: list[str]) -> str:
    """sha256 over the named files' names and contents (streamed, any fsspec URI)."""
    h = hashlib.sha256()
    for uri in uris:
        h.update(uri.rsplit("/", 1)[-1].encode() + b"\0")
        with fsio.open_read(uri) as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def checkpoint_hash(uri: str) -> str:
    """Content hash of a checkpoint, after verifying every file against its ``checksums.json``
    (:func:`vtd_train.checkpoint.checkpoint_hash`): a stage's input is used only intact."""
    from vtd_train.checkpoint import checkpoint_hash as verified_hash

    return verified_hash(uri)


_code_version: str | None = None


def code_version() -> str:
    """sha256 of the service's Python sources (every ``.py`` file of :data:`CODE_PACKAGES`,
    by relative path): any code change is a new version, whether or not git is present."""
    global _code_version
    if _code_version is None:
        root = Path(__file__).resolve().parent.parent
        h = hashlib.sha256()
        for pkg in CODE_PACKAGES:
            for p in sorted((root / pkg).rglob("*.py")):
                h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
        _code_version = h.hexdigest()
    return _code_version


def cache_key(stage_description: dict[str, Any], inputs: dict[str, str], data_hash: str, extra: dict | None = None) -> str:
    doc = {"stage": stage_description, "inputs": inputs, "data": data_hash, "code": code_version(), "extra": extra or {}}
    return sha256_bytes(json.dumps(doc, sort_keys=True, default=str).encode())


def job_id(run: str, stage: str, key: str, attempt: int) -> str:
    """The Ray job submission id of a stage attempt: deterministic, so that a restarted
    orchestrator re-attaches instead of submitting twice."""
    return f"{run}--{stage}--{key[:10]}--{attempt}"


@dataclass
class StageRecord:
    """What the manifest knows about one stage (its current key)."""

    key: str
    state: str = "pending"
    attempt: int = 0
    job_id: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    submitted_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    retry_at: float | None = None
    error: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageRecord:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def close_attempt(self, state: str, error: str | None = None) -> None:
        self.history.append({"attempt": self.attempt, "job_id": self.job_id, "state": state, "error": error,
                             "submitted_at": self.submitted_at, "started_at": self.started_at, "ended_at": self.ended_at})


@dataclass
class RunManifest:
    """The run manifest (see the module docstring)."""

    uri: str
    pipeline: str
    profile: str
    run: str
    stages: dict[str, StageRecord] = field(default_factory=dict)
    superseded: list[dict[str, Any]] = field(default_factory=list)
    orchestrator: dict[str, Any] = field(default_factory=dict)
    cluster: dict[str, Any] = field(default_factory=dict)
    data_hash: str | None = None
    code_version: str | None = None
    state: str = "running"
    updated_at: float = 0.0

    @staticmethod
    def path(run_dir: str) -> str:
        return fsio.join(run_dir, MANIFEST)

    @classmethod
    def load(cls, run_dir: str) -> RunManifest | None:
        uri = cls.path(run_dir)
        if not fsio.exists(uri):
            return None
        try:
            doc = json.loads(fsio.read_bytes(uri))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VTDInputError(f"{uri}: malformed run manifest: {e}") from None
        if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
            raise VTDInputError(f"{uri}: run manifest format_version {doc.get('format_version') if isinstance(doc, dict) else None!r}, "
                                f"this build reads {FORMAT_VERSION}")
        return cls(
            uri=uri, pipeline=doc["pipeline"], profile=doc["profile"], run=doc["run"],
            stages={k: StageRecord.from_dict(v) for k, v in doc.get("stages", {}).items()},
            superseded=doc.get("superseded", []), orchestrator=doc.get("orchestrator", {}),
            cluster=doc.get("cluster", {}), data_hash=doc.get("data_hash"), code_version=doc.get("code_version"),
            state=doc.get("state", "running"), updated_at=doc.get("updated_at", 0.0),
        )

    def save(self) -> None:
        self.updated_at = time.time()
        doc = {
            "format_version": FORMAT_VERSION, "pipeline": self.pipeline, "profile": self.profile, "run": self.run,
            "state": self.state, "updated_at": self.updated_at, "orchestrator": self.orchestrator,
            "cluster": self.cluster, "data_hash": self.data_hash, "code_version": self.code_version,
            "stages": {k: asdict(v) for k, v in self.stages.items()}, "superseded": self.superseded,
        }
        fsio.write_json_atomic(self.uri, doc)

    def supersede(self, stage: str) -> None:
        """Move a stage's record for an older key into ``superseded`` (its outputs stay where
        they are; a new key writes to a new directory)."""
        old = self.stages.pop(stage, None)
        if old is not None:
            self.superseded.append({"stage": stage, **asdict(old)})


def _own_submission_id() -> str | None:
    """The Ray job submission id of this process when it is a Ray job's driver (the job
    supervisor passes the job's metadata to its driver in ``RAY_JOB_CONFIG_JSON_ENV_VAR``)."""
    try:
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))["metadata"]["job_submission_id"]
    except (KeyError, TypeError, json.JSONDecodeError):
        return None


def whoami() -> dict[str, Any]:
    """The orchestrator process: ``vtd jobs cancel`` also stops it when it runs as a Ray job."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time(), "ray_job_id": _own_submission_id()}
