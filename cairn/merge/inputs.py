"""The input checkpoints of a merge: their config, which tensors each holds, and a reader that opens their
safetensors files lazily and reads one tensor at a time (never a whole model)."""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from cairn.errors import ModelLoadError, UserError
from cairn.models.checkpoint import weight_map

LAYER = re.compile(r"^(?P<prefix>(?:.+\.)?layers)\.(?P<index>\d+)\.(?P<rest>.+)$")
"""A per-layer tensor name: `model.layers.N.rest`."""

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
"""safetensors header dtype -> torch dtype."""


@dataclass(frozen=True)
class Checkpoint:
    """One input model directory."""

    path: Path
    """The directory (resolved)."""
    config: Mapping
    """Its config.json."""
    files: Mapping[str, str]
    """Tensor name -> the safetensors file (in path) holding it."""
    layers: tuple[Mapping[str, str], ...]
    """Per layer index: the part of each tensor name after `layers.N.` -> the full name."""
    others: tuple[str, ...]
    """Tensors that belong to no layer (embeddings, final norm, head), in name order."""

    @property
    def tied(self) -> bool:
        """True when the head shares the embedding (no lm_head tensor and config does not say otherwise)."""
        return "lm_head.weight" not in self.files and self.config.get("tie_word_embeddings", True) is not False


def open_checkpoint(model: str) -> Checkpoint:
    """Read a model directory's config.json and tensor index (no weights)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        hint = (" (mergekit's `model+lora` syntax is not supported: fold the adapter in first with `cairn lora merge`)"
                if "+" in model else " (cairn merges local checkpoints: download a hub model first)")
        raise UserError(f"model directory {model} not found{hint}", param="model")
    cfg_path = path / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{cfg_path} is missing; a merge input must be a Hugging Face checkpoint") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON ({e})") from None
    files = weight_map(path)
    n_layers = int(config.get("num_hidden_layers", 0))
    layers: list[dict[str, str]] = [{} for _ in range(n_layers)]
    others = []
    for name in sorted(files):
        m = LAYER.match(name)
        if m is None:
            others.append(name)
            continue
        i = int(m["index"])
        if i >= n_layers:
            raise ModelLoadError(f"{path} holds tensor {name!r} but config.json says num_hidden_layers={n_layers}")
        layers[i][m["rest"]] = name
    return Checkpoint(path.resolve(), config, files, tuple(layers), tuple(others))


class Reader:
    """Reads tensors from checkpoints one at a time. Headers come from safetensors' own reader (opened on first use,
    closed with the reader); values are read with positional reads of just their bytes, not through the memory map:
    pages of a mapped file that were touched count as the process's resident memory until it is unmapped, so a merge
    reading every tensor through the map would show all of its inputs resident."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}
        self._files: dict[Path, tuple[int, dict]] = {}  # file -> (its descriptor, its header)

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close every open file."""
        self._handles.clear()
        self._stack.close()
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()

    def _handle(self, ckpt: Checkpoint, name: str):
        if name not in ckpt.files:
            raise UserError(f"tensor {name!r} is missing from {ckpt.path}; every input of a merge needs it",
                            param="model")
        path = ckpt.path / ckpt.files[name]
        if path not in self._handles:
            if not path.is_file():
                raise ModelLoadError(f"weight file {path} is missing (named in the index of {ckpt.path})")
            try:
                self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except SafetensorError as e:
                raise ModelLoadError(f"weight file {path} is corrupt or truncated: {e}") from None
        return self._handles[path]

    def shape(self, ckpt: Checkpoint, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the file header."""
        return tuple(self._handle(ckpt, name).get_slice(name).get_shape())

    def dtype(self, ckpt: Checkpoint, name: str) -> torch.dtype:
        """The tensor's dtype, from the file header."""
        code = self._handle(ckpt, name).get_slice(name).get_dtype()
        if code not in SAFETENSORS_DTYPES:
            raise UserError(f"tensor {name!r} in {ckpt.path} has dtype {code}, which cairn merge cannot read")
        return SAFETENSORS_DTYPES[code]

    def read(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        """The tensor's values (a copy in memory; nothing else of the model is read)."""
        dtype, shape = self.dtype(ckpt, name), self.shape(ckpt, name)  # checks the file and the header
        path = ckpt.path / ckpt.files[name]
        if path not in self._files:
            fd = os.open(path, os.O_RDONLY)
            try:
                (size,) = struct.unpack("<Q", os.pread(fd, 8, 0))
                self._files[path] = (fd, {**json.loads(os.pread(fd, size, 8)), "__start__": 8 + size})
            except BaseException:
                os.close(fd)
                raise
        fd, header = self._files[path]
        begin, end = header[name]["data_offsets"]
        data = bytearray(end - begin)
        with memoryview(data) as view:
            got = os.preadv(fd, [view], header["__start__"] + begin)
        if got != len(data):
            raise ModelLoadError(f"tensor {name!r} in {ckpt.path} is truncated ({got} of {len(data)} bytes)")
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)
