"""`python -m cairn.pool.raycli ARGS` runs Ray's own CLI, keeping a loopback node address as given.

Ray maps 127.0.0.1/localhost to the machine's routable address when it starts a node or connects a driver;
for a pool declared on loopback (tests, demos, one-machine pools) cairn keeps loopback, so nothing is ever
bound to or sent to another address."""

from __future__ import annotations

import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def keep_loopback(host: str) -> None:
    """Make Ray use `host` as this node's address when it is a loopback address."""
    if host not in LOOPBACK:
        return
    from ray._private import services

    original = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda h: h if h in LOOPBACK else original(h)
    services.get_node_ip_address = lambda *a, **k: host


def main() -> None:
    args = sys.argv[1:]
    if "--node-ip-address" in args:
        keep_loopback(args[args.index("--node-ip-address") + 1])
    from ray.scripts.scripts import main as ray_main

    sys.argv = ["ray", *args]
    ray_main()


if __name__ == "__main__":
    main()
