"""Pool membership: start a head, join a node, report status, leave, stop. Ray does the clustering and the token
authentication; cairn measures the device, declares it, and keeps the PID of each node it started so that
leave/stop end exactly that node."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cairn.errors import UserError
from cairn.fsutil import atomic_write_text


@dataclass(frozen=True)
class PoolPaths:
    """Where cairn keeps the pool's token and the nodes it started on this machine."""

    root: Path

    @property
    def token(self) -> Path:
        return self.root / "token"

    @property
    def head(self) -> Path:
        return self.root / "head.json"

    def node(self, name: str) -> Path:
        return self.root / "nodes" / f"{name}.json"

    def nodes(self) -> list[Path]:
        return sorted((self.root / "nodes").glob("*.json"))


def _ray_env(token: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               RAY_NUM_REDIS_GET_RETRIES="4")  # a refused join fails in seconds, not after 20 s of retries
    return env


def _spawn_node(args: list[str], token: str, log: Path, timeout: float) -> subprocess.Popen:
    """Run `ray start --block ARGS` as a detached child; return once the node is up (or fail with its reason)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "cairn.pool.raycli", "start", "--block", *args],
                            env=_ray_env(token), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text(errors="replace")
            if "InvalidAuthToken" in text or "AuthenticationError" in text:
                raise UserError("the pool refused this node: its token is missing or wrong (cairn pool token prints "
                                "the right one on the head)")
            last = [line for line in text.splitlines() if line.strip()][-1:] or ["no output"]
            raise UserError(f"ray start failed (exit {proc.returncode}): {last[0][:300]}; log: {log}")
        if "Ray runtime started" in log.read_text(errors="replace"):
            return proc
        time.sleep(0.2)
    _terminate(proc.pid)
    raise UserError(f"the node did not start within {timeout:.0f} s; log: {log}")


def _terminate(pid: int, wait: float = 15.0) -> bool:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not _alive(pid) or _reap(pid):
            return True
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def _reap(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return False


def device_args(device: str, memory: str | None) -> tuple[list[str], dict]:
    """Measure the device and return `ray start` arguments that declare it (and the measurement)."""
    import torch

    from cairn.pool.devices import measure, parse_bytes
    from cairn.pool.service import device_resources

    m = measure(device)
    if memory is None:
        if device.startswith("cuda"):
            budget = int(torch.cuda.get_device_properties(torch.device(device)).total_memory * 0.9)
        else:
            budget = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") * 0.8)
    else:
        budget = parse_bytes(memory)
    res = device_resources(budget, m.bandwidth, m.flops, device.startswith("cuda"))
    args = ["--resources", json.dumps(res)]
    if device.startswith("cuda"):
        args += ["--num-gpus", "1"]
    info = {"device": device, "memory": budget, "bandwidth": m.bandwidth, "flops": m.flops}
    return args, info


def start(paths: PoolPaths, host: str, port: int, device: str | None, memory: str | None,
          num_cpus: int | None = None, object_store: int = 200 * 10**6) -> dict:
    if paths.head.exists() and _alive(json.loads(paths.head.read_text())["pid"]):
        raise UserError(f"a pool head started from {paths.root} is already running; cairn pool stop first")
    token = secrets.token_hex(32)
    paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths.root.chmod(0o700)  # also when it existed: it holds the token and the nodes' logs
    atomic_write_text(paths.token, token + "\n", mode=0o600)
    args = ["--head", "--node-ip-address", host, "--port", str(port), "--disable-usage-stats",
            "--include-dashboard", "false", "--object-store-memory", str(object_store)]
    if num_cpus is not None:
        args += ["--num-cpus", str(num_cpus)]
    info = None
    if device is not None:
        extra, info = device_args(device, memory)
        args += extra
    proc = _spawn_node(args, token, paths.root / "logs" / "head.log", timeout=120)
    state = {"pid": proc.pid, "address": f"{host}:{port}", "device": info}
    paths.head.write_text(json.dumps(state))
    return state


def join(paths: PoolPaths, address: str, token: str, host: str, device: str, memory: str | None,
         num_cpus: int | None = None, object_store: int = 100 * 10**6) -> dict:
    if not token:
        raise UserError("joining a pool needs its token: --token T or $CAIRN_POOL_TOKEN (cairn pool token on the head)")
    extra, info = device_args(device, memory)
    args = ["--address", address, "--node-ip-address", host, "--disable-usage-stats",
            "--object-store-memory", str(object_store), *extra]
    if num_cpus is not None:
        args += ["--num-cpus", str(num_cpus)]
    name = f"{host}-{int(time.time() * 1000)}"
    proc = _spawn_node(args, token, paths.root / "logs" / f"{name}.log", timeout=120)
    state = {"pid": proc.pid, "address": address, "name": name, **info}
    paths.node(name).parent.mkdir(parents=True, exist_ok=True)
    paths.node(name).write_text(json.dumps(state))
    return state


def leave(paths: PoolPaths, name: str | None = None) -> list[str]:
    """End the nodes this machine joined (or just `name`). Returns their names."""
    gone = []
    for f in paths.nodes():
        state = json.loads(f.read_text())
        if name is not None and state["name"] != name:
            continue
        _terminate(state["pid"])
        f.unlink()
        gone.append(state["name"])
    if name is not None and not gone:
        raise UserError(f"no node named {name!r} was joined from this machine")
    return gone


def stop(paths: PoolPaths) -> bool:
    leave(paths)
    if not paths.head.exists():
        return False
    _terminate(json.loads(paths.head.read_text())["pid"])
    paths.head.unlink()
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def connect(address: str, token: str | None) -> None:
    """Connect this process to the pool as a driver (token required: pools always run with token auth).

    Ray reads its auth settings from the environment when it is imported and connects; they are set for that
    moment only, so this process's environment (and whatever it starts later) does not carry the token. Ray
    fixes its auth mode at import: call this before anything else in the process imports ray."""
    if not token:
        raise UserError("connecting to a pool needs its token: --token T or $CAIRN_POOL_TOKEN")
    if "ray" in sys.modules:
        from ray._raylet import AuthenticationMode, get_authentication_mode

        if get_authentication_mode() != AuthenticationMode.TOKEN:
            raise RuntimeError("ray was imported before connect() without token auth; connect to the pool first")
    settings = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_NUM_REDIS_GET_RETRIES": "4"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        import ray

        if ray.is_initialized():
            return
        from cairn.pool.raycli import keep_loopback

        keep_loopback(address.rsplit(":", 1)[0])
        try:
            ray.init(address=address, namespace="cairn", log_to_driver=False, logging_level="error")
        except (ConnectionError, ray.exceptions.RayError) as e:
            raise UserError(f"cannot join the pool at {address} as a client: {str(e).splitlines()[0]} "
                            "(wrong token?)") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def status() -> dict:
    """Every node and device of the connected pool, with what cairn runs on it."""
    import ray

    from cairn.pool.service import RES_BANDWIDTH_MBS, RES_CUDA, RES_DEVICE, RES_MEMORY_MB, RES_MFLOPS, placements

    boards = placements()  # served models by name, training runs as "train:OUT_DIR"
    training = {k.removeprefix("train:"): v for k, v in boards.items() if k.startswith("train:")}
    models = {k: v for k, v in boards.items() if not k.startswith("train:")}
    nodes = []
    for n in ray.nodes():
        res = n.get("Resources", {})
        entry = {"node_id": n["NodeID"], "address": n.get("NodeManagerAddress"), "alive": bool(n.get("Alive")),
                 "is_head": "node:__internal_head__" in res, "device": None}
        if RES_DEVICE in res:
            entry["device"] = {"kind": "cuda" if RES_CUDA in res else "cpu",
                               "memory_bytes": int(res[RES_MEMORY_MB]) * 10**6,
                               "bandwidth_gbs": res[RES_BANDWIDTH_MBS] / 1e3, "gflops": res[RES_MFLOPS] / 1e3}
        entry["running"] = [{"model": m, "layers": f"[{s['start']}, {s['end']})",
                             **{k: v for k, v in s.items() if k.startswith(("blocks_", "kv_", "format"))}}
                            for m, stages in models.items() for s in stages if s["node_id"] == n["NodeID"]]
        entry["training"] = [{"run": run, **{k: v for k, v in w.items() if k != "node_id"}}
                             for run, workers in training.items() for w in workers if w["node_id"] == n["NodeID"]]
        nodes.append(entry)
    return {"nodes": nodes, "models": models, "training": training}
