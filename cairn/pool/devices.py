"""Measure a device: matmul throughput and memory read bandwidth, in about a second. A pool node runs this when
it joins; placement uses the numbers to give faster devices more layers."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from cairn.errors import UserError
from cairn.models.device import torch_device

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'6GiB', '512MB', '2e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UserError(f"cannot read {text!r} as a size; write e.g. 6GiB, 512MB or 2e9", param="memory")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise UserError(f"memory must be positive, got {text!r}", param="memory")
    return int(value)


@dataclass(frozen=True)
class Measurement:
    device: str
    flops: float
    """fp32 matmul FLOP/s."""
    bandwidth: float
    """Memory read bandwidth, bytes/s."""


def _best(fn, repeat: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def measure(device: str = "cpu", size: int = 1024, buffer_bytes: int = 256 * 2**20) -> Measurement:
    dev = torch_device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a = torch.randn(size, size, device=dev)
    b = torch.randn(size, size, device=dev)
    t = _best(lambda: a @ b, 5, sync)
    flops = 2 * size**3 / t
    buf = torch.ones(buffer_bytes // 4, device=dev)
    t = _best(lambda: buf.sum(), 5, sync)
    return Measurement(device, flops, buffer_bytes / t)
