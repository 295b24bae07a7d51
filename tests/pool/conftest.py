import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import ray


def loopback_only() -> bool:
    """True inside a network namespace whose only interface is loopback (scripts/test.sh makes one when it can)."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """Head + 3 device nodes with different memory budgets and speeds, all on 127.0.0.1."""
    if not loopback_only():
        pytest.skip("pool tests run only in a loopback-only network namespace: run scripts/test.sh as root "
                    "(Ray rewrites 127.0.0.1 to the machine's routable address otherwise)")
    from ray.cluster_utils import Cluster

    from cairn.pool.service import device_resources

    tmp = Path(tempfile.mkdtemp(prefix="cr", dir="/tmp"))  # short: Ray's socket paths must stay under 107 bytes
    (tmp / "ray").mkdir()
    os.environ["RAY_TMPDIR"] = str(tmp)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 100 * 10**6, "node_ip_address": "127.0.0.1",
        "include_dashboard": False, "temp_dir": str(tmp)})
    # a: big and fast, b: smaller and slower, c: big and slow
    specs = {"a": (400e6, 20e9), "b": (200e6, 10e9), "c": (400e6, 5e9)}
    nodes = {name: cluster.add_node(num_cpus=1, object_store_memory=80 * 10**6, node_ip_address="127.0.0.1",
                                    resources=device_resources(int(mem), bw, 5e10, False))
             for name, (mem, bw) in specs.items()}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="cairn-test")
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
