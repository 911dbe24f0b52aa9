"""Lazy, copy-lean safetensors reading and streaming writing.

The format is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and [start, end) byte range in the data section, then the data.
Reading goes through plain `readinto` into the destination tensor rather than the
`safetensors` library's memory map: pages of a mapped file that a conversion has
touched stay mapped (and counted in the process's RSS) until the file is closed,
so reading a 140 GB checkpoint through one mapping looks like a 140 GB process.
Writing streams tensor by tensor: every shape is known before the first byte is
written (from the checkpoint's metadata), so the header goes first and each tensor
is written, then dropped, as soon as it is produced.

Files are validated on open: header JSON, known dtypes, byte ranges that match the
shapes and tile the data section exactly -- a truncated or padded file is an error
naming the file and the byte counts, not a read failure half-way through a conversion.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: Dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("safetensors_io assumes a little-endian host")


class SafetensorsFormatError(ValueError):
    """A file that is not a complete, well-formed safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    path: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    nbytes: int


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_header(path: str) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """Tensor infos and `__metadata__` of one file, after checking that the file is whole."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise SafetensorsFormatError(f"{path}: cannot stat ({e})") from e
    if size < 8:
        raise SafetensorsFormatError(f"{path}: {size} bytes, too short to be a safetensors file")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise SafetensorsFormatError(
                f"{path}: truncated or not safetensors (header claims {header_len} bytes, file has {size})"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsFormatError(f"{path}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_len = size - data_start
    infos: Dict[str, TensorInfo] = {}
    spans: List[Tuple[int, int, str]] = []
    for name, entry in header.items():
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise SafetensorsFormatError(f"{path}: malformed header entry for {name!r}: {entry!r}") from e
        if dtype_name not in DTYPES:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        dtype = DTYPES[dtype_name]
        shape = tuple(int(s) for s in shape)
        expected = math.prod(shape) * _itemsize(dtype)
        if end - begin != expected:
            raise SafetensorsFormatError(
                f"{path}: tensor {name!r} {dtype_name}{list(shape)} needs {expected} bytes, header gives {end - begin}"
            )
        spans.append((begin, end, name))
        infos[name] = TensorInfo(name, path, dtype, shape, data_start + begin, expected)
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} data does not follow the previous one "
                                         f"(starts at {begin}, expected {cursor})")
        cursor = end
    if cursor != data_len:
        state = "truncated" if cursor > data_len else "has trailing bytes"
        raise SafetensorsFormatError(
            f"{path}: {state}: header declares {cursor} bytes of tensor data, file holds {data_len}"
        )
    return infos, metadata


class SafetensorsReader:
    """Reads tensors of any number of files on demand; one open file handle per file."""

    def __init__(self) -> None:
        self._files: Dict[str, object] = {}

    def _handle(self, path: str):
        f = self._files.get(path)
        if f is None:
            f = open(path, "rb", buffering=0)
            self._files[path] = f
        return f

    def read_into(self, info: TensorInfo, out: torch.Tensor) -> torch.Tensor:
        """Read `info` into `out` (contiguous, same dtype and shape); returns `out`."""
        if out.dtype != info.dtype or tuple(out.shape) != info.shape or not out.is_contiguous():
            raise ValueError(f"read_into({info.name}): target {out.dtype}{list(out.shape)} "
                             f"does not match {info.dtype}{list(info.shape)}")
        if info.nbytes == 0:
            return out
        f = self._handle(info.path)
        f.seek(info.start)
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        got = 0
        while got < info.nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise SafetensorsFormatError(f"{info.path}: truncated while reading {info.name!r}")
            got += n
        return out

    def read(self, info: TensorInfo) -> torch.Tensor:
        return self.read_into(info, torch.empty(info.shape, dtype=info.dtype))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _header_bytes(entries: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]],
                  metadata: Optional[Dict[str, str]]) -> Tuple[bytes, int]:
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in entries:
        n = math.prod(shape) * _itemsize(dtype)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the library writes it
    return struct.pack("<Q", len(raw)) + raw, offset


class StreamingWriter:
    """Writes one safetensors file whose tensor list is fixed up front, one tensor at a time, in order."""

    def __init__(self, path: str, entries: Sequence[Tuple[str, torch.dtype, Tuple[int, ...]]],
                 metadata: Optional[Dict[str, str]] = None):
        self.path = path
        self.entries = list(entries)
        self._next = 0
        header, self.data_bytes = _header_bytes(self.entries, metadata if metadata is not None else {"format": "pt"})
        self._f = open(path, "wb")
        self._f.write(header)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.entries):
            raise RuntimeError(f"{self.path}: unexpected extra tensor {name!r}")
        want_name, want_dtype, want_shape = self.entries[self._next]
        if name != want_name or tensor.dtype != want_dtype or tuple(tensor.shape) != tuple(want_shape):
            raise RuntimeError(f"{self.path}: expected {want_name} {want_dtype}{list(want_shape)}, "
                               f"got {name} {tensor.dtype}{list(tensor.shape)}")
        t = tensor.detach().cpu().contiguous()
        if t.numel():
            self._f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.entries):
            missing = [e[0] for e in self.entries[self._next:]]
            self._f.close()
            raise RuntimeError(f"{self.path}: closed with {len(missing)} tensors unwritten: {missing[:5]}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
