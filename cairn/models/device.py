"""The one place a user's device name becomes a torch.device: checked here, with a clear error when it cannot run."""

from __future__ import annotations

import torch

from cairn.errors import UserError


def torch_device(name: str, param: str = "device") -> torch.device:
    """`name` ('cpu', 'cuda', 'cuda:N') as a torch.device; a UserError (naming `param`) when the name is not a
    device or asks for CUDA on a machine without a usable CUDA device (or without that index)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {name!r} (use cpu, cuda or cuda:N)", param=param) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} was asked for but this machine has no usable CUDA device",
                            param=param)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"device {name!r} does not exist: this machine has {count} CUDA device(s), "
                            f"cuda:0 to cuda:{count - 1}", param=param)
    elif device.type not in ("cpu", "mps"):
        raise UserError(f"device {name!r} is not supported (use cpu, cuda or cuda:N)", param=param)
    return device

