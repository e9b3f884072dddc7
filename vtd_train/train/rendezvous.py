"""The process-group rendezvous of a run on the embedded local cluster, on loopback only.

Ray Train's torch backend (``ray.train.torch.config._TorchBackend``) has rank 0 host torch's
``TCPStore``, the key-value store every rank meets at before gloo / NCCL connect. Torch binds
that server to every interface (``::``) whatever ``MASTER_ADDR`` says. Measured (2026-12-05,
a 2-worker ``vtd train`` on the embedded cluster): every other process of the cluster listened on
127.0.0.1 (``cluster.local``), the rank-0 worker on ``::`` — any host that can reach the machine
could write into the store of a running job.

:class:`LoopbackTorchConfig` keeps Ray's backend and its process-group setup, with one change:
rank 0 first hosts the store itself on a socket bound to 127.0.0.1 (``TCPStore`` takes a
listening socket as ``master_listen_fd``), and every rank joins it as a client
(``TORCHELASTIC_USE_AGENT_STORE``: torch's ``env://`` rendezvous then connects instead of hosting,
as under torchelastic's agent). It is used only on a cluster in Ray's local-only mode, where
every worker is on this machine (``cluster.local._loopback_only``); a real cluster's ranks are on
other nodes and meet at rank 0's node address as Ray sets it up.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from ray.train.torch.config import TorchConfig, _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

LOOPBACK = "127.0.0.1"
#: the store rank 0 hosts, referenced for as long as its worker process lives
_HOSTED: list = []


def _host_store(timeout_s: float) -> int:
    """Host the run's ``TCPStore`` in this (rank 0) process on a loopback socket; its port."""
    import torch.distributed as dist

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    store = dist.TCPStore(LOOPBACK, port, None, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                          master_listen_fd=sock.detach())
    _HOSTED[:] = [store]
    return port


def _join_store(port: int) -> None:
    os.environ["MASTER_ADDR"] = LOOPBACK
    os.environ["MASTER_PORT"] = str(port)
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "True"


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: LoopbackTorchConfig) -> None:
        backend = backend_config.backend or ("nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo")
        port = worker_group.execute_single(0, _host_store, timeout_s=backend_config.timeout_s)
        worker_group.execute(_join_store, port=port)
        worker_group.execute(_set_torch_distributed_env_vars)
        import ray

        ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend, world_rank=i,
                                                   world_size=len(worker_group), init_method="env://",
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group meets at a store on 127.0.0.1 (see the module)."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


def torch_config(backend: str):
    """The run's torch backend config: loopback rendezvous on a local-only cluster."""
    from ray._private import ray_constants

    return TorchConfig(backend=backend) if ray_constants.ENABLE_RAY_CLUSTER else LoopbackTorchConfig(backend=backend)
