"""Start `cairn serve` as a child process on a free loopback port and wait until it is ready; stop it by its PID.

A test helper (it needs httpx, a test dependency) that examples/ and benchmarks/ import too: run from the repo root,
they put the root on sys.path first."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dirs: list[str], *args: str, host: str = "127.0.0.1", timeout: float = 120, **popen):
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        cmd = [sys.executable, "-m", "cairn", "serve", *map(str, model_dirs), "--host", host, "--port", str(self.port),
               *args]
        self.proc = subprocess.Popen(cmd, **popen)
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"cairn serve exited with code {self.proc.returncode} before it was ready")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"cairn serve was not ready after {timeout:.0f} s")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
