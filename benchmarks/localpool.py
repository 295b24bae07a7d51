"""A local Ray pool for benchmarks: a loopback-only network namespace, a head and N device nodes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def ensure_isolated() -> None:
    """Re-execute this script under `unshare -n` (loopback only) unless it already runs in such a namespace."""
    if [n for _, n in socket.if_nameindex()] == ["lo"]:
        return
    if os.environ.get("CAIRN_BENCH_NS"):
        sys.exit("could not enter a loopback-only network namespace")
    cmd = "ip link set lo up && exec " + " ".join(map(repr, [sys.executable, *sys.argv]))
    r = subprocess.run(["unshare", "-n", "sh", "-c", cmd], env=dict(os.environ, CAIRN_BENCH_NS="1"), check=False)
    sys.exit(r.returncode)


@contextlib.contextmanager
def local_pool(n_nodes: int, memory: int = 4 * 10**9, object_store: int = 200 * 10**6):
    """Yield (cluster, nodes) with this process connected as the driver; every node declares this machine's
    measured CPU speed and `memory` bytes. Everything is shut down and removed on exit."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    tmp = Path(tempfile.mkdtemp(prefix="cb", dir="/tmp"))  # short: Ray's socket paths must stay under 107 bytes
    (tmp / "ray").mkdir()
    os.environ["RAY_TMPDIR"] = str(tmp)
    import ray
    from ray.cluster_utils import Cluster

    from cairn.pool.devices import measure
    from cairn.pool.service import device_resources

    m = measure("cpu")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": object_store, "node_ip_address": "127.0.0.1",
        "include_dashboard": False, "temp_dir": str(tmp)})
    try:
        nodes = [cluster.add_node(num_cpus=1, object_store_memory=object_store, node_ip_address="127.0.0.1",
                                  resources=device_resources(memory, m.bandwidth, m.flops, False))
                 for _ in range(n_nodes)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
