"""``vtd cluster up|status|down``: the one-machine development Ray cluster (:mod:`cluster.dev`).

=========================================================  =========================================
``vtd cluster up [--workers N] [--num-cpus C] [...]``      a head and N worker nodes, each its own
                                                           ``ray start``; prints the Jobs API, GCS
                                                           and metrics addresses
``vtd cluster status [--json]``                            the recorded nodes, whether their
                                                           processes run and the cluster sees them
``vtd cluster down``                                       stop exactly that cluster's processes
=========================================================  =========================================

Every command takes ``--dir`` (default ``$VTD_DEV_CLUSTER_DIR`` or ``~/.vtd/dev-cluster``): where
the cluster's state file and node logs live, so several dev clusters can run side by side.
"""

from __future__ import annotations

import argparse
import json


def add_cluster_commands(sub) -> None:
    cl = sub.add_parser("cluster", help="a one-machine development Ray cluster (head + worker nodes)").add_subparsers(
        dest="cluster_command", required=True)

    def common(p) -> None:
        p.add_argument("--dir", default=None,
                       help="state directory of the dev cluster (default: $VTD_DEV_CLUSTER_DIR or ~/.vtd/dev-cluster)")

    u = cl.add_parser("up", help="start a head and N worker nodes on this machine")
    common(u)
    u.add_argument("--workers", type=int, default=1, help="worker nodes besides the head (default 1)")
    u.add_argument("--num-cpus", type=int, default=None,
                   help="logical CPUs of each worker node (default: this machine's cores shared out over the workers)")
    u.add_argument("--head-cpus", type=int, default=1,
                   help="logical CPUs of the head, where stage jobs' drivers may run (default 1; 0: none)")
    u.add_argument("--object-store-mb", type=int, default=512, help="object store of each node in MB (default 512)")
    u.add_argument("--port", type=int, default=None, help="the GCS port (default: a free one)")
    u.add_argument("--dashboard-port", type=int, default=None, help="the dashboard / Jobs API port (default: a free one)")
    u.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the nodes (default 120)")
    u.set_defaults(func=_cmd_up)

    st = cl.add_parser("status", help="the dev cluster's nodes and addresses")
    common(st)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_cmd_status)

    dn = cl.add_parser("down", help="stop the dev cluster (only its own processes)")
    common(dn)
    dn.set_defaults(func=_cmd_down)


def _cmd_up(a: argparse.Namespace) -> int:
    from cluster.dev import describe, up

    cluster = up(a.dir, workers=a.workers, num_cpus=a.num_cpus, head_cpus=a.head_cpus, object_store_mb=a.object_store_mb,
                 port=a.port, dashboard_port=a.dashboard_port, timeout_s=a.timeout)
    for line in describe(cluster):
        print(line)
    return 0


def _cmd_status(a: argparse.Namespace) -> int:
    from cluster.dev import status

    s = status(a.dir)
    if a.json:
        print(json.dumps(s, indent=2))
        return 0 if s["healthy"] else 1
    seen, recorded = s["cluster_nodes"], len(s["nodes"])
    alive = "its dashboard does not answer" if seen is None else f"{len(seen)} of {recorded} nodes alive in the cluster"
    print(f"dev cluster {'up' if s['healthy'] else 'NOT healthy'}: Jobs API {s['dashboard_url']}, GCS {s['gcs_address']}; {alive}")
    for n in s["nodes"]:
        print(f"  {n['name']:<10} pid {n['pid']:<8} {'running' if n['running'] else 'GONE':<8} {n['num_cpus']} CPUs  "
              f"metrics :{n['metrics_export_port']}  temp {n['temp_dir']}")
    print(f"  state: {s['state_file']}")
    return 0 if s["healthy"] else 1


def _cmd_down(a: argparse.Namespace) -> int:
    from cluster.dev import down

    cluster, n = down(a.dir)
    what = f"stopped {n} process(es)" if n else "no process of it was running any more"
    print(f"dev cluster down ({cluster.dashboard_url}, {len(cluster.nodes)} node(s)): {what}; removed {cluster.temp_root}")
    return 0
